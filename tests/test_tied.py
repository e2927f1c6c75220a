"""Tied input/output embeddings (lm_head = embed_tokens, as in SmolLM2), from the student to the export.

A tiny Llama built from a config with `tie_word_embeddings=True` is the teacher. In process: the student
built by `build_spellm_model` keeps the tie, the tied weight is frozen, outside the trainable parameters
and optimizer groups, and a forward + backward with the kl6 regulariser on leaves it without a gradient
and unchanged after an optimizer step. Then a real 3-step 2-rank ZeRO-3 run through torchrun and
`spellm-ds export` (full and `--delta`): plain transformers loads the full export with the tie intact
and the weight equal to the teacher's embedding, its logits are the teacher's lm_head on the student's
hidden state, and the delta export on the teacher gives the full export's char logits.

Run alone: `.venv/bin/python -m pytest tests/test_tied.py -q` (about a minute; `-m "not dist"` keeps the
in-process test).
"""

from __future__ import annotations

import json
import types
from pathlib import Path

import pytest
import torch
import torch.nn.functional as F
from safetensors import safe_open
from transformers import AutoModelForCausalLM, AutoTokenizer

from examples.local_models import make_causal_lm
from spellm_ds.charset import CharTable
from spellm_ds.cli import main as cli_main
from spellm_ds.inference.model import SpeLLMForCausalLM
from spellm_ds.model.student import build_spellm_model, trainable_parameter_names
from spellm_ds.train.checkpoint import tag_for
from tests import train_helpers as th

K, C = 10, 105
STEPS = 3
LOSS = types.SimpleNamespace(selection="lowest", tau=1.0, regularizer="kl6", reg_weight=0.5, reg_chunk=7)


@pytest.fixture(scope="module")
def tied_llama(tmp_path_factory, bytelevel_tokenizer) -> Path:
    """A tiny randomly initialised Llama (6 layers, d=64) whose lm_head is tied to its embedding."""
    return make_causal_lm(
        bytelevel_tokenizer, tmp_path_factory.mktemp("tied_llama"), arch="llama", tie_word_embeddings=True
    )


def _saved_tensor_names(model_dir: Path) -> set[str]:
    names: set[str] = set()
    for f in sorted(model_dir.glob("*.safetensors")):
        if f.name == "char_heads.safetensors":
            continue
        with safe_open(str(f), framework="pt") as fh:
            names.update(fh.keys())
    return names


def _teacher_batch(vocab: int, seed: int, b: int = 2, t: int = 12) -> dict[str, torch.Tensor]:
    gen = torch.Generator().manual_seed(seed)
    ids = torch.randint(0, vocab, (b, t), generator=gen)
    topk = torch.stack([torch.randperm(vocab, generator=gen)[:5] for _ in range(b * t)]).view(b, t, 5)
    lps = torch.rand(b, t, 6, generator=gen).softmax(-1)[..., :5].log().sort(-1, descending=True).values
    return {
        "input_ids": ids,
        "topk_ids": topk,
        "topk_logprobs": lps,
        "loss_mask": torch.ones(b, t, dtype=bool),
    }


def test_student_keeps_the_tie_frozen_and_out_of_training(tied_llama):
    # The teacher directory really is tied: plain transformers shares one tensor, and it saved no lm_head.
    hf = AutoModelForCausalLM.from_pretrained(str(tied_llama))
    assert hf.lm_head.weight is hf.model.embed_tokens.weight
    assert "lm_head.weight" not in _saved_tensor_names(tied_llama)

    model = build_spellm_model(tied_llama, k=K, num_chars=C, trainable_layers=2, head_init_std=0.02)
    tied = model.base.model.embed_tokens.weight
    assert model.lm_head.weight is tied and not tied.requires_grad
    assert all(p is not tied for p in model.parameters() if p.requires_grad)
    assert not [n for n in trainable_parameter_names(model) if "embed" in n or "lm_head" in n]
    groups = model.param_groups(mlp_lr_scale=0.1)
    assert all(p is not tied for g in groups for p in g["params"])
    # Every trainable parameter is in exactly one group: the char heads and the 2 x 3 MLP projections.
    assert sorted(len(g["params"]) for g in groups) == [1, 6]

    tok = AutoTokenizer.from_pretrained(str(tied_llama))
    vocab = model.base.config.vocab_size
    table = CharTable.build(tok, k=K, vocab_size=vocab)
    model.set_loss(LOSS, table.token_chars, table.decodable)
    before = tied.detach().clone()
    opt = torch.optim.AdamW(groups, lr=0.01, weight_decay=0.1)
    out = model(**_teacher_batch(vocab, seed=3))
    assert out.reg_loss is not None and float(out.reg_loss.detach()) > 0
    out.loss.backward()
    assert tied.grad is None
    mlp = model.layers[-1].mlp.down_proj.weight
    assert mlp.grad is not None and mlp.grad.abs().sum() > 0  # backward reached the trainable MLPs
    mlp_before = mlp.detach().clone()
    opt.step()
    assert torch.equal(tied, before) and model.lm_head.weight is tied
    assert not torch.equal(mlp, mlp_before)


# ---------------------------------------------------------------------------------------------------
# A real run and its exports


@pytest.fixture(scope="module")
def exports(tmp_path_factory, tied_llama, docs_files) -> dict[str, Path]:
    """3 steps of 2-rank ZeRO-3 through torchrun on the tied teacher's shards, exported full and delta."""
    tmp = tmp_path_factory.mktemp("tied_run")
    train, held = th.build_tiny_dataset(tied_llama, docs_files[:8], tmp / "shards")
    cfg = th.write_config(
        tmp / "run.yaml",
        model=tied_llama,
        train=train,
        held=held,
        run_dir=tmp / "run",
        max_steps=STEPS,
        eval={"interval": 0},
        checkpoint={"interval": STEPS, "keep_latest_k": 1, "resume": "auto"},
    )
    proc = th.launch("torchrun", cfg)
    assert proc.returncode == 0, proc.stdout[-8000:]
    ck = tmp / "run" / "checkpoints"
    assert (ck / "latest").read_text() == tag_for(STEPS)
    full, delta = tmp / "full", tmp / "delta"
    assert cli_main(["export", "--checkpoint", str(ck), "--output", str(full)]) == 0
    assert cli_main(["export", "--checkpoint", str(ck), "--output", str(delta), "--delta"]) == 0
    return {"full": full, "delta": delta, "run": tmp / "run"}


def _input_ids(vocab: int) -> torch.Tensor:
    return torch.randint(0, vocab, (2, 16), generator=torch.Generator().manual_seed(7))


@pytest.mark.dist
def test_full_export_loads_tied_in_plain_transformers(exports, tied_llama):
    full = exports["full"]
    # The regulariser ran on the gathered tied weight at every step.
    reg = [v for _, v in th.read_scalars(exports["run"] / "tensorboard")["train/reg_loss"]]
    assert len(reg) == STEPS and all(0 < v < float("inf") for v in reg)
    # The tied weight came from the checkpoint's frozen fragments, stored once (DeepSpeed shares lm_head).
    assert json.loads((full / "spellm_config.json").read_text())["frozen_from"] == "checkpoint"
    teacher = AutoModelForCausalLM.from_pretrained(str(tied_llama)).eval()
    student = AutoModelForCausalLM.from_pretrained(str(full)).eval()
    assert json.loads((full / "config.json").read_text())["tie_word_embeddings"] is True
    assert _saved_tensor_names(full) == _saved_tensor_names(tied_llama)  # one embedding tensor, no lm_head
    assert student.lm_head.weight is student.model.embed_tokens.weight
    assert torch.equal(student.model.embed_tokens.weight, teacher.model.embed_tokens.weight)

    ids = _input_ids(teacher.config.vocab_size)
    spellm = SpeLLMForCausalLM.from_pretrained(full).model
    with torch.no_grad():
        logits = student(ids).logits
        hidden = spellm(ids).hidden
        teacher_hidden = teacher(ids, output_hidden_states=True).hidden_states[-1]
        want = F.linear(hidden, teacher.lm_head.weight)
    torch.testing.assert_close(logits, want, rtol=1e-5, atol=1e-5)
    # The trained MLPs moved the hidden state: the equality above is not the teacher's own logits.
    assert (hidden - teacher_hidden).abs().max() > 1e-4


@pytest.mark.dist
def test_delta_export_on_the_teacher_gives_the_full_exports_char_logits(exports, tied_llama):
    delta_dir = exports["delta"]
    cfg = json.loads((delta_dir / "spellm_config.json").read_text())
    assert cfg["delta"] and not list(delta_dir.glob("model*.safetensors"))
    # Only the trained MLPs of the last 2 of 6 layers: the tied weight is taken from the base model.
    trained = {
        f"model.layers.{i}.mlp.{m}.weight" for i in (4, 5) for m in ("gate_proj", "up_proj", "down_proj")
    }
    assert _saved_tensor_names(delta_dir) == trained
    delta = SpeLLMForCausalLM.from_pretrained(delta_dir, base_model=tied_llama)
    full = SpeLLMForCausalLM.from_pretrained(exports["full"])
    assert delta.model.lm_head.weight is delta.model.base.model.embed_tokens.weight
    ids = _input_ids(delta.model.base.config.vocab_size)
    with torch.no_grad():
        a, b = delta.model(ids), full.model(ids)
    assert b.char_logits.abs().max() > 0  # trained heads (they start at zero)
    torch.testing.assert_close(a.char_logits, b.char_logits, rtol=0, atol=0)
    torch.testing.assert_close(delta.lm_logits(a.hidden), full.lm_logits(b.hidden), rtol=0, atol=0)
