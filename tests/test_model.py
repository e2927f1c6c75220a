"""SpeLLMModel: layouts, hidden state equal to HF's, freezing, no graph through the frozen prefix, losses
inside forward, bad input, and a 2-rank ZeRO-3 run whose loss and gradients equal one plain process.

Run alone: `.venv/bin/python -m pytest tests/test_model.py -q` (the ZeRO-3 test is marked `dist`).
This file is also the worker of that test: `torchrun --nproc_per_node 2 tests/test_model.py MODEL OUT`.
"""

from __future__ import annotations

import os
import subprocess
import sys
import types
from pathlib import Path

import pytest
import torch

REPO = Path(__file__).resolve().parents[1]
K, C, N_TRAIN = 10, 105, 2
LOSS = types.SimpleNamespace(selection="lowest", tau=1.0, regularizer="kl6", reg_weight=0.5, reg_chunk=5)


def _char_table(vocab: int, seed: int = 0) -> tuple[torch.Tensor, torch.Tensor]:
    gen = torch.Generator().manual_seed(seed)
    chars = torch.randint(1, C, (vocab, K), generator=gen)
    lengths = torch.randint(1, K + 1, (vocab,), generator=gen)
    chars[torch.arange(K)[None, :] >= lengths[:, None]] = 0
    return chars, torch.rand(vocab, generator=gen) > 0.1


def _batch(vocab: int, seed: int, b: int = 2, t: int = 12) -> dict[str, torch.Tensor]:
    gen = torch.Generator().manual_seed(seed)
    ids = torch.randint(0, vocab, (b, t), generator=gen)
    topk = torch.stack([torch.randperm(vocab, generator=gen)[:5] for _ in range(b * t)]).view(b, t, 5)
    lps = torch.rand(b, t, 6, generator=gen).softmax(-1)[..., :5].log().sort(-1, descending=True).values
    mask = torch.ones(b, t, dtype=torch.bool)
    mask[:, -1] = False
    return {"input_ids": ids, "topk_ids": topk, "topk_logprobs": lps, "loss_mask": mask}


@pytest.fixture(scope="module")
def arch_dirs(tmp_path_factory, bytelevel_tokenizer, tiny_llama) -> dict[str, Path]:
    from examples.local_models import make_causal_lm

    dirs = {"llama": tiny_llama}
    for arch in ("qwen2", "mistral"):
        dirs[arch] = make_causal_lm(
            bytelevel_tokenizer, tmp_path_factory.mktemp(arch), arch=arch, num_layers=3
        )
    return dirs


@pytest.mark.parametrize("arch", ["llama", "qwen2", "mistral"])
def test_hidden_and_logits_match_hf(arch_dirs, arch):
    from spellm_ds.model.student import build_spellm_model

    model = build_spellm_model(arch_dirs[arch], k=K, num_chars=C, trainable_layers=2, head_init_std=0.02)
    vocab = model.base.config.vocab_size
    ids = torch.randint(0, vocab, (2, 11), generator=torch.Generator().manual_seed(0))
    attn = torch.ones(2, 11, dtype=torch.long)
    attn[1, :4] = 0  # left padding on the second row
    for mask in (None, attn):
        out = model(ids, attention_mask=mask)
        with torch.no_grad():
            ref = model.base(ids, attention_mask=mask, output_hidden_states=True)
        torch.testing.assert_close(out.hidden, ref.hidden_states[-1], rtol=0, atol=0)
        torch.testing.assert_close(out.hidden @ model.lm_head.weight.t(), ref.logits, rtol=1e-5, atol=1e-5)
        heads = (out.hidden @ model.char_heads.weight.t()).view(2, 11, K, C)
        torch.testing.assert_close(out.char_logits, heads)
    assert model.layout.layers == "model.layers" and model.layout.norm == "model.norm"


def test_trainable_set_and_no_graph_through_frozen_prefix(tiny_llama):
    from spellm_ds.model.student import build_spellm_model, trainable_parameter_names

    model = build_spellm_model(tiny_llama, k=K, num_chars=C, trainable_layers=N_TRAIN, head_init_std=0.02)
    n_layers = len(model.layers)
    projs = ("gate_proj", "up_proj", "down_proj")
    expected = sorted(
        f"base.model.layers.{i}.mlp.{p}.weight" for i in range(n_layers - N_TRAIN, n_layers) for p in projs
    )
    assert sorted(trainable_parameter_names(model)) == [*expected, "char_heads.weight"]

    seen: list[tuple[str, bool]] = []
    embed = model.base.model.embed_tokens
    hooks = [embed.register_forward_hook(lambda m, a, o: seen.append(("embed", o.requires_grad)))]
    for i, layer in enumerate(model.layers):
        hooks.append(
            layer.register_forward_hook(lambda m, a, o, i=i: seen.append((f"layer{i}", o.requires_grad)))
        )
    vocab = model.base.config.vocab_size
    model.set_loss(LOSS, *_char_table(vocab))
    out = model(**_batch(vocab, seed=1))
    for h in hooks:
        h.remove()
    assert torch.is_grad_enabled()
    want = [("embed", False)] + [(f"layer{i}", i >= n_layers - N_TRAIN) for i in range(n_layers)]
    assert seen == want
    out.loss.backward()
    for name, p in model.named_parameters():
        if p.requires_grad:
            assert p.grad is not None and torch.count_nonzero(p.grad) > 0, name
        else:
            assert p.grad is None, name

    with torch.no_grad():
        ev = model(**_batch(vocab, seed=2))
        assert not torch.is_grad_enabled()
    assert not ev.loss.requires_grad and not ev.hidden.requires_grad
    assert torch.is_grad_enabled()
    # Calling the body directly (as generation does) leaves grad mode alone in both modes.
    ids = _batch(vocab, seed=2)["input_ids"]
    with torch.no_grad():
        model.body(input_ids=ids)
        assert not torch.is_grad_enabled()
    assert model.body(input_ids=ids).last_hidden_state.requires_grad and torch.is_grad_enabled()


def test_grad_mode_restored_after_an_error(tiny_llama):
    from spellm_ds.model.student import build_spellm_model

    model = build_spellm_model(tiny_llama, k=K, num_chars=C, trainable_layers=1)
    with pytest.raises(IndexError):
        model(torch.tensor([[10**6]]))  # an id outside the embedding fails inside the frozen prefix
    assert torch.is_grad_enabled()


def test_losses_in_forward_equal_the_pure_functions(tiny_llama):
    from spellm_ds.model.student import build_spellm_model
    from spellm_ds.train import losses

    model = build_spellm_model(tiny_llama, k=K, num_chars=C, trainable_layers=N_TRAIN, head_init_std=0.02)
    vocab = model.base.config.vocab_size
    table, eligible = _char_table(vocab)
    model.set_loss(LOSS, table, eligible)
    batch = _batch(vocab, seed=3)
    out = model(**batch)
    char = losses.char_selection_loss(
        out.char_logits, batch["topk_ids"], batch["topk_logprobs"], batch["loss_mask"], table, eligible
    )
    reg = losses.token_regularizer_dense(
        out.hidden, model.lm_head.weight, batch["topk_ids"], batch["topk_logprobs"], batch["loss_mask"]
    )
    torch.testing.assert_close(out.char_loss, char.loss)
    torch.testing.assert_close(out.reg_loss, reg.loss)
    torch.testing.assert_close(out.loss, char.loss + LOSS.reg_weight * reg.loss)
    assert out.selected_ids.shape == batch["input_ids"].shape
    assert out.selected_ids[:, -1].eq(-1).all()  # masked positions
    metrics = losses.char_metrics(out.char_logits, char, batch["topk_logprobs"])
    for key, value in metrics.items():
        torch.testing.assert_close(out.metrics[key], value)
    torch.testing.assert_close(out.metrics["fallback_top1"], reg.fallback_top1)
    # Regularizer off: no reg term, the fallback metric is still measured.
    model.set_loss(types.SimpleNamespace(**{**vars(LOSS), "reg_weight": 0.0}), table, eligible)
    off = model(**batch)
    assert off.reg_loss is None and "reg_loss" not in off.metrics
    torch.testing.assert_close(off.loss, char.loss)
    torch.testing.assert_close(off.metrics["fallback_top1"], reg.fallback_top1)


def test_heads_only_and_zero_init(tiny_llama):
    from spellm_ds.model.student import build_spellm_model, trainable_parameter_names

    model = build_spellm_model(tiny_llama, k=K, num_chars=C, trainable_layers=0)
    assert trainable_parameter_names(model) == ["char_heads.weight"]
    assert torch.count_nonzero(model.char_heads.weight) == 0
    vocab = model.base.config.vocab_size
    model.set_loss(LOSS, *_char_table(vocab))
    out = model(**_batch(vocab, seed=4))
    assert not out.hidden.requires_grad and out.char_logits.requires_grad
    # Uniform heads: every candidate costs k*ln|C| exactly.
    torch.testing.assert_close(out.char_loss, torch.tensor(K * torch.log(torch.tensor(float(C))).item()))


def test_bad_input_errors(tiny_llama, tmp_path):
    from spellm_ds.config.run import LossConfig
    from spellm_ds.errors import SpellmError
    from spellm_ds.model.student import build_spellm_model, check_model

    with pytest.raises(SpellmError, match="trainable_layers=7"):
        check_model(tiny_llama, 7)
    with pytest.raises(SpellmError, match="trainable_layers=7"):
        build_spellm_model(tiny_llama, k=K, num_chars=C, trainable_layers=7)
    with pytest.raises(SpellmError, match=r"no config\.json"):
        build_spellm_model(tmp_path, k=K, num_chars=C)
    assert check_model(tiny_llama, 6) == 6
    model = build_spellm_model(tiny_llama, k=K, num_chars=C, trainable_layers=1)
    vocab = model.base.config.vocab_size
    table, eligible = _char_table(vocab)
    with pytest.raises(SpellmError, match="does not fit k"):
        model.set_loss(LOSS, table[:, :4], eligible)
    with pytest.raises(SpellmError, match="symbol ids outside"):
        model.set_loss(LOSS, table + C, eligible)
    with pytest.raises(SpellmError, match="selection"):
        LossConfig(**{**vars(LOSS), "selection": "best"})  # refused where configs are validated
    with pytest.raises(SpellmError, match="set_loss"):
        model(**_batch(vocab, seed=5))
    with pytest.raises(SpellmError, match="dtype"):
        build_spellm_model(tiny_llama, k=K, num_chars=C, trainable_layers=1, dtype="fp8")


def test_generic_layout_by_probing():
    from transformers import GPT2Config, GPT2LMHeadModel

    from spellm_ds.errors import SpellmError
    from spellm_ds.model.layouts import find_layout
    from spellm_ds.model.student import SpeLLMModel, trainable_parameter_names

    torch.manual_seed(0)
    cfg = GPT2Config(
        n_layer=3, n_embd=32, n_head=2, vocab_size=100, n_positions=64, bos_token_id=0, eos_token_id=0
    )
    base = GPT2LMHeadModel(cfg).eval()  # eval: no dropout
    layout = find_layout(base)
    assert (layout.body, layout.layers, layout.mlp, layout.norm) == (
        "transformer",
        "transformer.h",
        "mlp",
        "transformer.ln_f",
    )
    model = SpeLLMModel(base, k=4, num_chars=9, trainable_layers=1, head_init_std=0.02)
    names = trainable_parameter_names(model)
    assert names[-1] == "char_heads.weight" and all(
        n.startswith("base.transformer.h.2.mlp.") for n in names[:-1]
    )
    ids = torch.randint(0, 100, (2, 7))
    out = model(ids)
    with torch.no_grad():
        ref = base(ids)
    torch.testing.assert_close(out.hidden @ base.lm_head.weight.t(), ref.logits, rtol=1e-5, atol=1e-5)

    class NoLayers(torch.nn.Module):
        config = types.SimpleNamespace(model_type="mystery")

        def get_output_embeddings(self):
            return torch.nn.Linear(2, 2)

    with pytest.raises(SpellmError, match="add its layout"):
        find_layout(NoLayers())


@pytest.mark.dist
def test_zero3_two_ranks_match_one_process(tiny_llama, tmp_path):
    """Built under ZeRO-3 (partitioned at load), 2 ranks: loss and full gradients equal one plain process."""
    from spellm_ds.model.student import build_spellm_model
    from tests.conftest import free_port

    out_file = tmp_path / "zero3.pt"
    env = dict(os.environ, DS_ACCELERATOR="cpu", PYTHONPATH=str(REPO), OMP_NUM_THREADS="1")
    cmd = [sys.executable, "-m", "torch.distributed.run", "--nproc_per_node=2", "--master_addr=127.0.0.1"]
    cmd += [f"--master_port={free_port()}", str(Path(__file__).resolve()), str(tiny_llama), str(out_file)]
    proc = subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=240)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-6000:]
    got = torch.load(out_file)
    assert got["partitioned"], "base parameters were not partitioned at load"

    model = build_spellm_model(tiny_llama, k=K, num_chars=C, trainable_layers=N_TRAIN, head_init_std=0.02)
    vocab = model.base.config.vocab_size
    model.set_loss(LOSS, *_char_table(vocab))
    losses_ = [model(**_batch(vocab, seed=100 + r)).loss for r in range(2)]
    mean = (losses_[0] + losses_[1]) / 2
    mean.backward()
    torch.testing.assert_close(torch.tensor(got["losses"]).mean(), mean.detach(), rtol=1e-5, atol=1e-5)
    ref = {n: p.grad for n, p in model.named_parameters() if p.requires_grad}
    assert sorted(got["grads"]) == sorted(ref)
    for name, grad in ref.items():
        torch.testing.assert_close(got["grads"][name], grad, rtol=1e-4, atol=1e-6, msg=name)


def _zero3_worker(model_dir: str, out_file: str) -> None:
    """One rank of the ZeRO-3 test: build partitioned, one forward/backward, save loss and full grads."""
    import deepspeed
    import torch.distributed as dist
    from deepspeed.utils import safe_get_full_grad

    from spellm_ds.dist import exit_process, leave_process_group
    from spellm_ds.model.student import build_spellm_model

    deepspeed.init_distributed("gloo")
    rank, world = dist.get_rank(), dist.get_world_size()
    ds = {
        "train_micro_batch_size_per_gpu": 2,
        "gradient_accumulation_steps": 1,
        "train_batch_size": 2 * world,
        "zero_optimization": {"stage": 3, "stage3_param_persistence_threshold": 0},
        "zero_allow_untested_optimizer": True,
        "steps_per_print": 10**6,
    }
    model = build_spellm_model(
        model_dir, k=K, num_chars=C, trainable_layers=N_TRAIN, ds_config=ds, head_init_std=0.02
    )
    partitioned = all(hasattr(p, "ds_id") and p.ds_tensor.numel() < p.ds_numel for p in model.parameters())
    vocab = model.base.config.vocab_size
    model.set_loss(LOSS, *_char_table(vocab))
    params = [p for p in model.parameters() if p.requires_grad]
    engine, *_ = deepspeed.initialize(model=model, optimizer=torch.optim.SGD(params, lr=0.0), config=ds)
    out = engine(**_batch(vocab, seed=100 + rank))
    engine.backward(out.loss)
    grads = {n: safe_get_full_grad(p) for n, p in engine.module.named_parameters() if p.requires_grad}
    losses_ = [torch.zeros(()) for _ in range(world)]
    dist.all_gather(losses_, out.loss.detach())
    if rank == 0:
        torch.save(
            {"losses": [float(x) for x in losses_], "grads": grads, "partitioned": partitioned}, out_file
        )
    leave_process_group(clean=True)
    exit_process(0)  # DeepSpeed still holds the group: its teardown at exit can abort a rank


if __name__ == "__main__":
    _zero3_worker(sys.argv[1], sys.argv[2])
