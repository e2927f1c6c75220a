"""Export of a real 2-rank ZeRO-3 checkpoint (made by torchrun): full and delta exports equal DeepSpeed's own
consolidation tensor for tensor, a fresh model differs before loading and equals after, frozen tensors
taken from the base model equal the checkpoint's, a 2-process export writes the same bytes as a
1-process one, and bad input (existing output, a delta on a base of other shapes) is refused. Both
kinds carry the trained MLPs' original weights (the base model's, read directly here), so they load
with the exact fallback, whose logits are the base model's; without them an export loads approximate.

Run alone: `.venv/bin/python -m pytest tests/test_export.py -q` (about a minute: two torchrun launches).
"""

from __future__ import annotations

import json
import os
import subprocess
import sys

import pytest
import torch
from safetensors.torch import load_file
from transformers import AutoModelForCausalLM

from examples.local_models import make_causal_lm
from spellm_ds.cli import main as cli_main
from spellm_ds.errors import SpellmError
from spellm_ds.export.write import export_checkpoint
from spellm_ds.inference.model import SpeLLMForCausalLM
from spellm_ds.model.student import build_spellm_model
from spellm_ds.train.zero_files import ZeroCheckpoint
from tests.conftest import REPO_ROOT, free_port
from tests.export_helpers import TRAINABLE_LAYERS, K, make_zero3_checkpoint

pytestmark = pytest.mark.dist


@pytest.fixture(scope="module")
def checkpoint(tiny_llama, tmp_path_factory):
    return make_zero3_checkpoint(tiny_llama, tmp_path_factory.mktemp("zero3") / "ck", free_port(), nproc=2)


@pytest.fixture(scope="module")
def consolidated(checkpoint):
    """DeepSpeed's own fp32 consolidation of the checkpoint (an independent implementation)."""
    from deepspeed.utils.zero_to_fp32 import get_fp32_state_dict_from_zero_checkpoint

    return {k: v.float() for k, v in get_fp32_state_dict_from_zero_checkpoint(str(checkpoint)).items()}


@pytest.fixture(scope="module")
def full_export(checkpoint, tmp_path_factory):
    out = tmp_path_factory.mktemp("export") / "full"
    export_checkpoint(checkpoint, out, max_shard_bytes=300_000, progress=False)
    return out


def _exported_tensors(out):
    tensors = {}
    for f in sorted(out.glob("model*.safetensors")):
        tensors.update(load_file(str(f)))
    return tensors


def test_full_export_equals_consolidation(full_export, consolidated, checkpoint):
    tensors = _exported_tensors(full_export)
    base = {k[len("base.") :]: v for k, v in consolidated.items() if k.startswith("base.")}
    assert set(tensors) == set(base)
    for name, t in base.items():
        assert torch.equal(tensors[name], t), name
    heads = load_file(str(full_export / "char_heads.safetensors"))["weight"]
    assert torch.equal(heads, consolidated["char_heads.weight"])
    index = json.loads((full_export / "model.safetensors.index.json").read_text())
    assert set(index["weight_map"]) == set(base) and len(set(index["weight_map"].values())) > 1
    cfg = json.loads((full_export / "spellm_config.json").read_text())
    n = 6
    assert cfg["trained_layers"] == list(range(n - TRAINABLE_LAYERS, n))
    assert (
        cfg["k"] == K and cfg["step"] == 2 and cfg["world_size"] == 2 and cfg["frozen_from"] == "checkpoint"
    )
    assert cfg["source_tag"] == "step_00000002" and not cfg["delta"]
    hf = AutoModelForCausalLM.from_pretrained(str(full_export))  # plain HF loading of the sharded layout
    for name, t in hf.state_dict().items():
        assert torch.equal(t, base[name]), name


def test_fresh_model_differs_then_equals(full_export, consolidated, tiny_llama):
    fresh = build_spellm_model(
        tiny_llama, k=K, num_chars=105, trainable_layers=TRAINABLE_LAYERS, head_init_std=0.02
    )
    fresh_sd = fresh.state_dict()
    differ = [n for n, t in consolidated.items() if not torch.equal(fresh_sd[n], t)]
    assert "char_heads.weight" in differ
    assert {n for n in differ if "mlp" in n} == {
        n for n in consolidated if ".mlp." in n and "layers.4" in n
    } | {n for n in consolidated if ".mlp." in n and "layers.5" in n}
    loaded = SpeLLMForCausalLM.from_pretrained(full_export).model.state_dict()
    for name, t in consolidated.items():
        assert torch.equal(loaded[name], t), name


def test_delta_export(checkpoint, consolidated, full_export, tmp_path):
    out = tmp_path / "delta"
    s = export_checkpoint(checkpoint, out, delta=True, progress=False)
    assert s.delta and s.trained_layers == [4, 5]
    assert not list(out.glob("model*.safetensors")) and not (out / "config.json").exists()
    delta = load_file(str(out / "delta.safetensors"))
    trained = {
        k[len("base.") :]: v for k, v in consolidated.items() if k.startswith("base.") and ".mlp." in k
    }
    trained = {k: v for k, v in trained.items() if "layers.4." in k or "layers.5." in k}
    assert set(delta) == set(trained)
    for name, t in trained.items():
        assert torch.equal(delta[name], t), name
    a = SpeLLMForCausalLM.from_pretrained(out).model.state_dict()
    b = SpeLLMForCausalLM.from_pretrained(full_export).model.state_dict()
    assert set(a) == set(b)
    for name in a:
        assert torch.equal(a[name], b[name]), name


def test_delta_on_base_of_other_shapes(checkpoint, tiny_llama, tmp_path):
    out = tmp_path / "delta"
    export_checkpoint(checkpoint, out, delta=True, progress=False)
    other = make_causal_lm(tiny_llama, tmp_path / "other", arch="llama", intermediate_size=96)
    with pytest.raises(SpellmError, match="does not fit the base model"):
        SpeLLMForCausalLM.from_pretrained(out, base_model=other)


def test_frozen_from_base_model(checkpoint, full_export, tmp_path, monkeypatch):
    """A checkpoint without frozen fragments: frozen tensors come from the base model, and equal."""
    monkeypatch.setattr(ZeroCheckpoint, "has_frozen_fragments", property(lambda self: False))
    out = tmp_path / "from_base"
    export_checkpoint(checkpoint, out, max_shard_bytes=300_000, progress=False)
    assert json.loads((out / "spellm_config.json").read_text())["frozen_from"] == "base model"
    a, b = _exported_tensors(out), _exported_tensors(full_export)
    assert set(a) == set(b)
    for name in a:
        assert torch.equal(a[name], b[name]), name


def test_export_without_meta_reads_the_client_state(checkpoint, full_export, tmp_path):
    """A checkpoint copied without `spellm_meta.json`: the same facts come from the client state."""
    import shutil

    tag = tmp_path / "ck" / "step_00000002"
    shutil.copytree(checkpoint / "step_00000002", tag)
    (tag / "spellm_meta.json").unlink()
    out = tmp_path / "out"
    export_checkpoint(tag, out, max_shard_bytes=300_000, progress=False)
    a = json.loads((out / "spellm_config.json").read_text())
    b = json.loads((full_export / "spellm_config.json").read_text())
    for key in ("k", "charset_hash", "tokenizer_hash", "step", "trained_tensors", "base_model", "dtype"):
        assert a[key] == b[key], key
    for name in [p.name for p in full_export.glob("*.safetensors")]:
        assert (out / name).read_bytes() == (full_export / name).read_bytes(), name


def test_two_rank_export_writes_the_same_bytes(checkpoint, full_export, tmp_path):
    out = tmp_path / "two"
    env = dict(os.environ, PYTHONPATH=str(REPO_ROOT), OMP_NUM_THREADS="1")
    cmd = [
        sys.executable,
        "-m",
        "torch.distributed.run",
        "--nproc_per_node=2",
        "--master_addr=127.0.0.1",
        f"--master_port={free_port()}",
        "-m",
        "spellm_ds.cli",
        "export",
        "--checkpoint",
        str(checkpoint),
        "--output",
        str(out),
        "--max-shard-gb",
        str(300_000 / 1024**3),
    ]
    proc = subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=180)
    assert proc.returncode == 0, proc.stderr[-3000:]
    names = sorted(p.name for p in full_export.glob("model*.safetensors*"))
    assert names == sorted(p.name for p in out.glob("model*.safetensors*"))
    for name in [*names, "char_heads.safetensors", "original_mlps.safetensors"]:
        assert (out / name).read_bytes() == (full_export / name).read_bytes(), name


def test_cli_export_refuses_existing_output_and_generates(checkpoint, full_export, capsys):
    rc = cli_main(["export", "--checkpoint", str(checkpoint), "--output", str(full_export)])
    assert rc == 2
    assert "already holds an export" in capsys.readouterr().err
    rc = cli_main(
        ["generate", "--model", str(full_export), "--prompt", "The module", "--max-new-tokens", "4"]
    )
    assert rc == 0
    out = capsys.readouterr().out
    assert out.startswith("The module") and "tokens 4: exact" in out


def test_exports_carry_the_original_mlps(checkpoint, full_export, consolidated, tiny_llama, tmp_path):
    """The original weights are the base model's; loaded, the exact fallback is the base model's logits."""
    base_file = load_file(str(tiny_llama / "model.safetensors"))
    trained = {
        k[len("base.") :] for k in consolidated if ".mlp." in k and ("layers.4." in k or "layers.5." in k)
    }
    cfg = json.loads((full_export / "spellm_config.json").read_text())
    assert cfg["original_mlps"] == "original_mlps.safetensors" and set(cfg["trained_tensors"]) == trained
    originals = load_file(str(full_export / "original_mlps.safetensors"))
    assert set(originals) == trained
    for name in trained:
        assert torch.equal(originals[name], base_file[name]), name
        assert not torch.equal(originals[name], consolidated["base." + name]), name  # training moved them
    delta = tmp_path / "delta"
    export_checkpoint(checkpoint, delta, delta=True, progress=False)
    assert json.loads((delta / "spellm_config.json").read_text())["original_mlps"] == "base model"
    assert not (delta / "original_mlps.safetensors").exists()
    ids = torch.randint(
        0, len(base_file["model.embed_tokens.weight"]), (2, 10), generator=torch.Generator().manual_seed(1)
    )
    base = AutoModelForCausalLM.from_pretrained(str(tiny_llama)).eval()
    with torch.no_grad():
        want = base(ids).logits
    for out in (full_export, delta):
        model = SpeLLMForCausalLM.from_pretrained(out)
        assert model.fallback == "exact" and model.tail_start == 4
        student, original = model.forward_with_original(ids)
        torch.testing.assert_close(model.lm_logits(original), want, rtol=0, atol=1e-5)
        assert (model.lm_logits(student.hidden) - want).abs().max() > 1e-3
    bare = tmp_path / "bare"
    assert (
        cli_main(["export", "--checkpoint", str(checkpoint), "--output", str(bare), "--no-original-mlps"])
        == 0
    )
    assert json.loads((bare / "spellm_config.json").read_text())["original_mlps"] is None
    assert not (bare / "original_mlps.safetensors").exists()
    assert SpeLLMForCausalLM.from_pretrained(bare).fallback == "approximate"
