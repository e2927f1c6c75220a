"""The exact fallback: the original tail (original MLPs of the trained layers, shared attention, its own
lazily filled KV cache) gives the base model's own prediction, checked against plain transformers on the
base model directory: greedy `generate` at a negative threshold equals the base model's greedy decode
(batched, left padding, per-row EOS, full and delta exports whose last MLPs were changed, while the
approximate fallback differs), and at random forced fallback patterns every fallback's logits equal the
base model's logits from a full forward over the sequence so far (Llama with sdpa and eager attention,
Qwen2 and Mistral with a sliding window shorter than the sequence).

Run alone: `.venv/bin/python -m pytest tests/test_exact_fallback.py -q`
"""

from __future__ import annotations

import json
import shutil

import numpy as np
import pytest
import torch
from safetensors.torch import load_file
from transformers import AutoModelForCausalLM, AutoTokenizer

from examples.local_models import make_causal_lm
from spellm_ds.charset import CharTable
from spellm_ds.errors import SpellmError
from spellm_ds.export.write import save_export
from spellm_ds.inference import decode
from spellm_ds.inference.decode import FALLBACK
from spellm_ds.inference.model import SpeLLMForCausalLM
from spellm_ds.model.student import build_spellm_model
from spellm_ds.model.tail import tail_attention_mask
from tests.export_helpers import probe_heads

PROMPTS = ["The module", "In Python, a list is a", "Return"]
TRAINED = 2  # the MLPs of the last 2 of 6 layers are changed


def _base_tensors(model_dir, names):
    """The named tensors as saved in the base model's directory (read directly, not through our loader)."""
    tensors = load_file(str(model_dir / "model.safetensors"))
    return {n: tensors[n].clone() for n in names}


def _student(model_dir, table, tok, scale=0.5):
    """A SpeLLM student whose last MLPs moved away from the base (so the approximate fallback is not the
    teacher), with heads probed on some text; returns it and the original weights of its trained tensors."""
    model = build_spellm_model(model_dir, k=10, num_chars=table.charset.size, trainable_layers=TRAINED).eval()
    trained = [
        n[len("base.") :] for n, p in model.named_parameters() if p.requires_grad and n != "char_heads.weight"
    ]
    gen = torch.Generator().manual_seed(5)
    with torch.no_grad():
        for name, p in model.base.named_parameters():
            if name in trained:
                p.add_(torch.randn(p.shape, generator=gen) * scale * p.std())
    text = " ".join(PROMPTS * 3) + " a function returns the value of the list and the module imports it"
    probe_heads(model, table, tok(text, return_tensors="pt")["input_ids"])
    return model, _base_tensors(model_dir, trained)


def _batch(tok):
    tok.padding_side = "left"
    enc = tok(PROMPTS, return_tensors="pt", padding=True)
    assert (enc["attention_mask"] == 0).any(), "the prompts should need left padding"
    return enc


@pytest.fixture(scope="module")
def exports(tiny_llama, table, tok, tmp_path_factory):
    model, _ = _student(tiny_llama, table, tok)
    root = tmp_path_factory.mktemp("exact_exports")
    save_export(model, table, root / "full", base_model=tiny_llama, threshold=-1.0)
    save_export(model, table, root / "delta", base_model=tiny_llama, threshold=-1.0, delta=True)
    save_export(model, table, root / "bare", base_model=tiny_llama, threshold=-1.0, original_mlps=False)
    return root


# ---------------------------------------------------------------------------------------------------------


def test_tail_attention_mask_by_hand():
    # Row 0: columns 0-1 are left padding; row 1: none. Queries at columns 3 and 4 of 5, window 3.
    keys = torch.tensor([[0, 0, 1, 1, 1], [1, 1, 1, 1, 1]], dtype=torch.bool)
    seen = tail_attention_mask(keys, start=3, q_len=2) == 0
    assert seen[:, 0].tolist() == [
        [[False, False, True, True, False], [False, False, True, True, True]],
        [[True, True, True, True, False], [True, True, True, True, True]],
    ]
    window = tail_attention_mask(keys, start=3, q_len=2, window=3) == 0  # keys after column q - 3
    assert window[1, 0].tolist() == [[False, True, True, True, False], [False, False, True, True, True]]
    # A padding query sees nothing: a finite row, never -inf.
    pad = tail_attention_mask(keys, start=0, q_len=1)
    assert torch.isfinite(pad).all() and (pad[0, 0, 0] < -1e30).all()


@pytest.mark.parametrize("kind", ["full", "delta"])
def test_exact_generate_equals_base_greedy(exports, tiny_llama, tok, kind):
    exact = SpeLLMForCausalLM.from_pretrained(exports / kind)
    approx = SpeLLMForCausalLM.from_pretrained(exports / kind, fallback="approximate")
    assert exact.fallback == "exact" and approx.fallback == "approximate"
    assert exact.threshold == -1.0 and len(exact.original_mlps) == TRAINED and exact.tail_start == 6 - TRAINED
    enc = _batch(tok)
    base = AutoModelForCausalLM.from_pretrained(str(tiny_llama)).eval()
    n = 12
    free = base.generate(**enc, max_new_tokens=n, do_sample=False, pad_token_id=tok.pad_token_id)
    eos = int(free[0, enc["input_ids"].shape[1] + 4])  # row 0 ends at its 5th token, the others go on
    want = base.generate(
        **enc, max_new_tokens=n, do_sample=False, eos_token_id=eos, pad_token_id=tok.pad_token_id
    )
    kw = {"max_new_tokens": n, "eos_token_id": eos, "pad_token_id": tok.pad_token_id}
    for sync_free in (False, True):
        out = exact.generate(enc["input_ids"], enc["attention_mask"], sync_free=sync_free, **kw)
        assert torch.equal(out.sequences, want), sync_free
        assert out.counters["fallback"] == out.counters["tokens"] > 0
    new = want[0, enc["input_ids"].shape[1] :]
    assert int(new[4]) == eos and (new[5:] == tok.pad_token_id).all()
    # Sampling uses it too: a nucleus of one token is greedy.
    narrow = exact.generate(enc["input_ids"], enc["attention_mask"], temperature=1.0, top_p=1e-9, **kw)
    assert torch.equal(narrow.sequences, want)
    # The approximate fallback (original head on the moved hidden state) is not the teacher.
    assert not torch.equal(approx.generate(enc["input_ids"], enc["attention_mask"], **kw).sequences, want)


def test_export_records_and_loads_the_original_mlps(exports, tiny_llama):
    full = json.loads((exports / "full" / "spellm_config.json").read_text())
    delta = json.loads((exports / "delta" / "spellm_config.json").read_text())
    bare = json.loads((exports / "bare" / "spellm_config.json").read_text())
    assert (
        full["original_mlps"] == "original_mlps.safetensors" and "original_mlps.safetensors" in full["files"]
    )
    assert delta["original_mlps"] == "base model" and bare["original_mlps"] is None
    assert not (exports / "bare" / "original_mlps.safetensors").exists()
    trained = full["trained_tensors"]
    assert len(trained) == 3 * TRAINED and all(".mlp." in n for n in trained)
    stored = load_file(str(exports / "full" / "original_mlps.safetensors"))
    base = _base_tensors(tiny_llama, trained)
    assert set(stored) == set(base)
    for name, t in base.items():
        assert torch.equal(stored[name], t), name
    for kind in ("full", "delta"):
        m = SpeLLMForCausalLM.from_pretrained(exports / kind)
        for i, mlp in enumerate(m.original_mlps):
            for pname, p in mlp.named_parameters():
                name = f"model.layers.{m.tail_start + i}.mlp.{pname}"
                assert torch.equal(p, base[name]) and not torch.equal(p, m.model.base.get_parameter(name))
    loaded = SpeLLMForCausalLM.from_pretrained(exports / "bare")
    assert loaded.fallback == "approximate" and not len(loaded.original_mlps)
    with pytest.raises(SpellmError, match="exact fallback is not available"):
        SpeLLMForCausalLM.from_pretrained(exports / "bare", fallback="exact")
    with pytest.raises(SpellmError, match="fallback must be one of"):
        SpeLLMForCausalLM.from_pretrained(exports / "full", fallback="teacher")
    with pytest.raises(SpellmError, match="needs the original weights"):
        SpeLLMForCausalLM(loaded.model, loaded.table, fallback="exact")


def test_exports_from_before_original_mlps(exports, tmp_path):
    """Without the `original_mlps` record: a delta still has its base model's weights, a full export none."""
    for kind, want in (("delta", "exact"), ("full", "approximate")):
        old = tmp_path / kind
        shutil.copytree(exports / kind, old)
        cfg = json.loads((old / "spellm_config.json").read_text())
        del cfg["original_mlps"]
        (old / "spellm_config.json").write_text(json.dumps(cfg))
        (old / "original_mlps.safetensors").unlink(missing_ok=True)
        assert SpeLLMForCausalLM.from_pretrained(old).fallback == want, kind


# ---------------------------------------------------------------------------------------------------------
# The lazily filled KV cache against a full recompute, at random fallback patterns


def _arch_model(tokenizer_dir, root, variant):
    """A tiny base model of one architecture; the sliding variants see only the last 5 columns."""
    arch = variant.split("_")[0]
    out = make_causal_lm(tokenizer_dir, root / variant, arch=arch)
    if variant.endswith("sliding"):
        cfg_path = out / "config.json"
        cfg = json.loads(cfg_path.read_text())
        cfg["sliding_window"] = 5
        if arch == "qwen2":  # sliding attention in the layers from 3 on: the whole original tail
            cfg.update(use_sliding_window=True, max_window_layers=3)
            cfg["layer_types"] = ["full_attention"] * 3 + ["sliding_attention"] * 3
        cfg_path.write_text(json.dumps(cfg))
    return out


@pytest.mark.parametrize("variant", ["llama", "llama_eager", "qwen2_sliding", "mistral_sliding"])
def test_lazy_cache_matches_full_recompute(bytelevel_tokenizer, tmp_path, monkeypatch, variant):
    model_dir = _arch_model(bytelevel_tokenizer, tmp_path, variant)
    tok = AutoTokenizer.from_pretrained(str(model_dir))
    table = CharTable.build(tok, k=10, vocab_size=len(tok))
    student, originals = _student(model_dir, table, tok)
    attn = "eager" if variant.endswith("eager") else "sdpa"
    student.base.set_attn_implementation(attn)
    spellm = SpeLLMForCausalLM(student, table, tokenizer=tok, threshold=1.0, original_weights=originals)
    assert spellm.fallback == "exact" and spellm.tail_start == 6 - TRAINED
    base = AutoModelForCausalLM.from_pretrained(str(model_dir), attn_implementation=attn).eval()
    enc = _batch(tok)
    prompt_len, rows, steps = enc["input_ids"].shape[1], len(PROMPTS), 14
    # Forced fallback per (step, row): entropy 2 (> threshold 1) falls back, 0 does not.
    pattern = np.random.default_rng(3).random((steps, rows)) < 0.35
    pattern[0] = [True, False, False]  # the prompt's catch-up for one row only
    pattern[4] = [False, True, True]  # two rows whose last catch-ups differ
    pattern[13] = True
    step = {"i": -1}

    def scripted_entropy(logp):
        step["i"] += 1
        return torch.from_numpy(pattern[step["i"]].astype(np.float32) * 2.0)

    monkeypatch.setattr(decode, "mean_head_entropy", scripted_entropy)
    got: dict[tuple[int, int], torch.Tensor] = {}  # (step, row) -> logits the fallback chose from
    real_fallback = spellm.fallback_tokens

    def recording_fallback(hidden, temperature, top_p, generator):
        every_row = len(hidden) == rows and not pattern[step["i"]].all()
        rows_here = range(rows) if every_row else np.flatnonzero(pattern[step["i"]])
        for r, h in zip(rows_here, hidden):
            got[(step["i"], int(r))] = spellm.lm_logits(h)
        return real_fallback(hidden, temperature, top_p, generator)

    monkeypatch.setattr(spellm, "fallback_tokens", recording_fallback)
    for sync_free in (False, True):  # sync-free: every row catches up every step
        got.clear()
        step["i"] = -1
        out = spellm.generate(
            enc["input_ids"],
            enc["attention_mask"],
            max_new_tokens=steps,
            eos_token_id=[],
            sync_free=sync_free,
        )
        assert ((out.paths == FALLBACK).numpy() == pattern.T).all()
        checked = 0
        for t, r in zip(*np.nonzero(pattern)):
            real = enc["input_ids"][r][enc["attention_mask"][r].bool()]
            seq = torch.cat([real, out.sequences[r, prompt_len : prompt_len + t]])
            with torch.no_grad():
                want = base(seq[None]).logits[0, -1]
            torch.testing.assert_close(got[(int(t), int(r))], want, rtol=0, atol=1e-4)
            checked += 1
        assert checked == int(pattern.sum()) >= 14
        # The moved MLPs matter: the student's own head on its hidden state is not the teacher.
        assert not torch.allclose(spellm.lm_logits(spellm.model(seq[None]).hidden[0, -1]), want, atol=1e-2)
