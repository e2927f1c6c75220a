"""Helpers for the export/inference tests: a real multi-rank ZeRO-3 SpeLLM checkpoint made by torchrun.

Run as a script under a launcher (the tests do this):
    torchrun --nproc_per_node 2 tests/export_helpers.py MODEL_DIR CHECKPOINT_DIR [STEPS]
It builds the SpeLLM student with `model.student.build_spellm_model` under a ZeRO-3 config, takes a few
optimizer steps on random char labels (so the char heads and the MLPs of the last 2 layers change), and
saves a checkpoint with a client state and `spellm_meta.json` shaped like the trainer's.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
TRAINABLE_LAYERS = 2
K = 10


def probe_heads(model, table, input_ids) -> None:
    """Fit the char heads as a least-squares probe of the lm_head's own choice: a quick stand-in for training
    that makes exact hits, AutoCorrect and high-entropy rows all appear."""
    import numpy as np
    import torch

    with torch.no_grad():
        hidden = model.body(input_ids=input_ids).last_hidden_state.reshape(
            -1, model.char_heads.weight.shape[1]
        )
        target = model.lm_head(hidden).argmax(-1)
    rows = torch.from_numpy(table.token_chars[target.numpy()].astype(np.int64))  # [T, k]
    onehot = torch.nn.functional.one_hot(rows, table.charset.size).double().reshape(len(rows), -1) * 8.0 - 4.0
    sol = torch.linalg.lstsq(hidden.double(), onehot, driver="gelsd").solution  # [d, k * C]
    with torch.no_grad():
        model.char_heads.weight.copy_(sol.T.to(model.char_heads.weight.dtype))


def make_zero3_checkpoint(model_dir: Path, out: Path, port: int, nproc: int = 2, steps: int = 2) -> Path:
    """Run this file under torchrun with `nproc` CPU ranks; return the checkpoint root."""
    env = dict(os.environ, DS_ACCELERATOR="cpu", PYTHONPATH=str(REPO), OMP_NUM_THREADS="1")
    cmd = [
        sys.executable,
        "-m",
        "torch.distributed.run",
        f"--nproc_per_node={nproc}",
        "--master_addr=127.0.0.1",
        f"--master_port={port}",
        str(Path(__file__).resolve()),
        str(model_dir),
        str(out),
        str(steps),
    ]
    proc = subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=240)
    if proc.returncode != 0:
        raise RuntimeError(
            f"checkpoint worker failed ({proc.returncode}):\n{proc.stdout[-3000:]}\n{proc.stderr[-5000:]}"
        )
    return out


def _main(model_dir: str, out: str, steps: int) -> None:
    import deepspeed
    import numpy as np
    import torch
    import torch.nn.functional as F
    from transformers import AutoConfig, AutoTokenizer

    from spellm_ds.charset import CharTable
    from spellm_ds.dist import exit_process, leave_process_group
    from spellm_ds.fingerprint import tokenizer_hash
    from spellm_ds.model.student import build_spellm_model

    ds = {
        "train_micro_batch_size_per_gpu": 2,
        "gradient_accumulation_steps": 1,
        "train_batch_size": 2 * int(os.environ["WORLD_SIZE"]),
        "zero_optimization": {"stage": 3},
        "optimizer": {"type": "AdamW", "params": {"lr": 1e-2, "torch_adam": True}},
        "steps_per_print": 1000,
    }
    deepspeed.init_distributed("gloo")
    tok = AutoTokenizer.from_pretrained(model_dir)
    vocab = AutoConfig.from_pretrained(model_dir).vocab_size
    table = CharTable.build(tok, k=K, vocab_size=vocab)
    model = build_spellm_model(
        model_dir,
        k=K,
        num_chars=table.charset.size,
        trainable_layers=TRAINABLE_LAYERS,
        ds_config=ds,
        head_init_std=0.02,
    )
    params = [p for p in model.parameters() if p.requires_grad]
    engine, *_ = deepspeed.initialize(model=model, model_parameters=params, config=ds)
    gen = torch.Generator().manual_seed(1234 + engine.global_rank)
    for _ in range(steps):
        ids = torch.randint(0, vocab, (2, 12), generator=gen)
        labels = torch.randint(0, table.charset.size, (2, 12, K), generator=gen)
        res = engine(ids)
        loss = F.cross_entropy(res.char_logits.float().reshape(-1, table.charset.size), labels.reshape(-1))
        engine.backward(loss)
        engine.step()
    cfg = {"model": {"path": model_dir, "k": K, "dtype": "fp32", "trainable_layers": TRAINABLE_LAYERS}}
    client = {
        "spellm": {
            "state": {"step": steps},
            "rng": [{"numpy": np.random.get_state(), "torch": torch.get_rng_state()}],
            "config": cfg,
            "charset_hash": table.hash,
            "tokenizer_hash": tokenizer_hash(tok),
            "world_size": engine.world_size,
        }
    }
    tag = f"step_{steps:08d}"
    engine.save_checkpoint(out, tag=tag, client_state=client, save_latest=True)
    if engine.global_rank == 0:
        meta = {
            "tag": tag,
            "step": steps,
            "charset_hash": table.hash,
            "model_path": model_dir,
            "k": K,
            "config": cfg,
        }
        (Path(out) / tag / "spellm_meta.json").write_text(json.dumps(meta), encoding="utf-8")
    leave_process_group(clean=True)
    exit_process(0)  # DeepSpeed still holds the group: its teardown at exit can abort a rank


if __name__ == "__main__":
    _main(sys.argv[1], sys.argv[2], int(sys.argv[3]) if len(sys.argv) > 3 else 2)
