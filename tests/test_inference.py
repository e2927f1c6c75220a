"""Inference: decode step (lookup, AutoCorrect, entropy fallback) against a plain reference, generate with a
KV cache and left padding against the base model's greedy decode and a no-cache reference, sampling, and
loading an export directory (good and bad ones).

Run alone: `.venv/bin/python -m pytest tests/test_inference.py -q`
"""

from __future__ import annotations

import json
import math
import shutil

import numpy as np
import pytest
import torch
from transformers import AutoModelForCausalLM, AutoTokenizer

from spellm_ds.errors import SpellmError
from spellm_ds.export.write import save_export
from spellm_ds.inference.decode import (
    AUTOCORRECT,
    EXACT,
    FALLBACK,
    canonical_chars,
    mean_head_entropy,
    top_p_filter,
)
from spellm_ds.inference.model import SpeLLMForCausalLM
from spellm_ds.model.student import build_spellm_model
from tests.export_helpers import probe_heads

PROMPTS = ["The module", "In Python, a list is a", "Return"]


@pytest.fixture(scope="module")
def spellm(tiny_llama, table) -> SpeLLMForCausalLM:
    tok = AutoTokenizer.from_pretrained(str(tiny_llama))
    model = build_spellm_model(tiny_llama, k=10, num_chars=table.charset.size, trainable_layers=0)
    model.eval()
    text = " ".join(PROMPTS * 3) + " a function returns the value of the list and the module imports it"
    probe_heads(model, table, tok(text, return_tensors="pt")["input_ids"])
    return SpeLLMForCausalLM(model, table, tokenizer=tok, threshold=None)


# ---------------------------------------------------------------------------------------------------------
# Pure functions


def test_canonical_chars_and_entropy_by_hand():
    chars = torch.tensor([[5, 0, 7, 0], [3, 4, 6, 0], [0, 9, 9, 9]])
    assert canonical_chars(chars).tolist() == [[5, 0, 0, 0], [3, 4, 6, 0], [0, 0, 0, 0]]
    # Head 0 uniform over 4 symbols (ln 4), head 1 one-hot (0): mean ln(4)/2.
    logp = torch.log(torch.tensor([[[0.25, 0.25, 0.25, 0.25], [1.0, 0.0, 0.0, 0.0]]]))
    assert mean_head_entropy(logp).item() == pytest.approx(math.log(4) / 2, abs=1e-6)


def test_top_p_filter_by_hand():
    logits = torch.log(torch.tensor([0.05, 0.5, 0.15, 0.3]))
    kept = lambda p: torch.isfinite(top_p_filter(logits, p)).tolist()  # noqa: E731
    assert kept(0.4) == [False, True, False, False]
    assert kept(0.7) == [False, True, False, True]  # 0.5 + 0.3 reaches 0.7: the 0.15 is dropped
    assert kept(0.81) == [False, True, True, True]
    assert kept(1.0) == [True, True, True, True]


# ---------------------------------------------------------------------------------------------------------
# Decode step against a plain reference


def _reference_decode(hidden, head_w, lm_w, table, threshold, autocorrect=True):
    """Plain per-row Python/numpy decode: argmax per head, dict lookup, brute-force AutoCorrect, fallback."""
    k, c = table.k, table.charset.size
    rows = {tuple(int(x) for x in table.token_chars[v]): int(v) for v in np.flatnonzero(table.decodable)}
    dec_ids = np.flatnonzero(table.decodable)
    out = []
    for h in hidden.double().numpy():
        logits = (head_w.double().numpy() @ h).reshape(k, c)
        logp = (
            logits
            - np.log(np.exp(logits - logits.max(1, keepdims=True)).sum(1, keepdims=True))
            - logits.max(1, keepdims=True)
        )
        ent = float(np.mean([-(np.exp(lp) * lp).sum() for lp in logp]))
        chars = [int(np.argmax(logits[i])) for i in range(k)]
        if 0 in chars:
            chars = chars[: chars.index(0)] + [0] * (k - chars.index(0))
        tok = rows.get(tuple(chars))
        fallback = threshold is not None and ent > threshold
        if tok is None and not autocorrect:
            fallback = True
        if fallback:
            out.append((int(np.argmax(lm_w.double().numpy() @ h)), FALLBACK))
        elif tok is not None:
            out.append((tok, EXACT))
        else:
            best, best_score = None, -math.inf
            for v in dec_ids:
                score = sum(logp[i, table.token_chars[v, i]] for i in range(k))
                if score > best_score:
                    best, best_score = int(v), score
            out.append((best, AUTOCORRECT))
    return out


@pytest.fixture(scope="module")
def decode_case(spellm, table):
    """Hidden states whose heads spell: tokens (exact), near-miss strings (AutoCorrect), and vague rows."""
    torch.manual_seed(0)
    k, c = table.k, table.charset.size
    d = spellm.model.char_heads.weight.shape[1]
    dec = np.flatnonzero(table.decodable & (table.lengths >= 3) & (table.lengths <= k))
    rows = table.token_chars[dec[torch.randperm(len(dec))[:36].numpy()]].astype(np.int64)
    rows[12:24, 1] = (rows[12:24, 1] + 17) % (c - 1) + 1  # change one symbol: mostly no token any more
    w = torch.randn(k * c, d) * 0.3
    for r, row in enumerate(rows):
        scale = 9.0 if r < 24 else 1.5  # the last rows are vague: high entropy
        for i, sym in enumerate(row):
            w[i * c + int(sym), r] += scale
    hidden = torch.eye(d)[: len(rows)] + 0.05 * torch.randn(len(rows), d)
    return hidden, w


@pytest.mark.parametrize("mode", ["never", "mid", "always", "no_autocorrect", "sync_free"])
def test_decode_step_matches_reference(spellm, table, decode_case, mode):
    hidden, w = decode_case
    original = spellm.model.char_heads.weight.detach().clone()
    try:
        with torch.no_grad():
            spellm.model.char_heads.weight.copy_(w)
        logp = (hidden @ w.T).view(len(hidden), table.k, -1).log_softmax(-1)
        ent = np.sort(mean_head_entropy(logp).numpy())
        thr = {"never": None, "always": -1.0, "sync_free": None, "no_autocorrect": None}.get(mode)
        if mode == "mid":
            gaps = np.diff(ent)
            j = int(np.argmax(gaps))
            thr = float((ent[j] + ent[j + 1]) / 2)  # the widest gap: no row near the threshold
        res = spellm.decode_step(
            hidden, threshold=thr, autocorrect=mode != "no_autocorrect", sync_free=mode == "sync_free"
        )
        ref = _reference_decode(
            hidden, w, spellm.model.lm_head.weight.detach(), table, thr, autocorrect=mode != "no_autocorrect"
        )
    finally:
        with torch.no_grad():
            spellm.model.char_heads.weight.copy_(original)
    assert res.tokens.tolist() == [t for t, _ in ref]
    assert res.path.tolist() == [p for _, p in ref]
    paths = set(res.path.tolist())
    if mode in ("never", "sync_free"):
        assert paths == {EXACT, AUTOCORRECT}
    if mode == "mid":
        assert FALLBACK in paths and len(paths) >= 2
    if mode == "always":
        assert paths == {FALLBACK}


# ---------------------------------------------------------------------------------------------------------
# generate


def _batch(tok):
    tok.padding_side = "left"
    enc = tok(PROMPTS, return_tensors="pt", padding=True)
    assert (enc["attention_mask"] == 0).any(), "the prompts should need left padding"
    return enc


def test_generate_fallback_forced_equals_base_greedy(spellm, tiny_llama):
    tok = AutoTokenizer.from_pretrained(str(tiny_llama))
    enc = _batch(tok)
    base = AutoModelForCausalLM.from_pretrained(str(tiny_llama)).eval()
    n = 12
    free = base.generate(**enc, max_new_tokens=n, do_sample=False, pad_token_id=tok.pad_token_id)
    # An end token the base emits mid-way for row 0: rows stop at different steps.
    eos = int(free[0, enc["input_ids"].shape[1] + 3])
    want = base.generate(
        **enc, max_new_tokens=n, do_sample=False, eos_token_id=eos, pad_token_id=tok.pad_token_id
    )
    for sync_free, every in ((False, 1), (True, 5)):  # no host read per step: same tokens, same stop
        out = spellm.generate(
            enc["input_ids"],
            enc["attention_mask"],
            max_new_tokens=n,
            threshold=-1.0,
            eos_token_id=eos,
            pad_token_id=tok.pad_token_id,
            sync_free=sync_free,
            eos_check_every=every,
        )
        assert torch.equal(out.sequences, want)
        assert out.counters["fallback"] == out.counters["tokens"] > 0
        assert out.counters["exact"] == out.counters["autocorrect"] == 0
    # Every row ends by its third token: a loop that checks only every 5 steps trims back to HF's length.
    eos_all = sorted({int(free[i, enc["input_ids"].shape[1] + 2]) for i in range(len(PROMPTS))})
    want_all = base.generate(
        **enc, max_new_tokens=n, do_sample=False, eos_token_id=eos_all, pad_token_id=tok.pad_token_id
    )
    out = spellm.generate(
        enc["input_ids"],
        enc["attention_mask"],
        max_new_tokens=n,
        threshold=-1.0,
        eos_token_id=eos_all,
        pad_token_id=tok.pad_token_id,
        sync_free=True,
        eos_check_every=5,
    )
    assert torch.equal(out.sequences, want_all) and want_all.shape[1] <= enc["input_ids"].shape[1] + 3
    new = want[0, enc["input_ids"].shape[1] :]
    assert int(new[3]) == eos and (new[4:] == tok.pad_token_id).all()  # row 0 ended; the others went on


def _no_cache_reference(spellm, ids, n, threshold):
    """Full recompute per step of one unpadded prompt, then the decode step on the last position."""
    seq = ids.clone()
    toks, paths = [], []
    for _ in range(n):
        hidden = spellm.model(seq[None]).hidden[0, -1:]
        res = spellm.decode_step(hidden, threshold=threshold)
        toks.append(int(res.tokens[0]))
        paths.append(int(res.path[0]))
        seq = torch.cat([seq, res.tokens])
    return toks, paths


def test_generate_char_path_kv_cache_left_padding(spellm, tiny_llama):
    tok = AutoTokenizer.from_pretrained(str(tiny_llama))
    enc = _batch(tok)
    n = 10
    out = spellm.generate(
        enc["input_ids"], enc["attention_mask"], max_new_tokens=n, threshold=None, eos_token_id=[]
    )
    prompt_len = enc["input_ids"].shape[1]
    counts = {"exact": 0, "autocorrect": 0, "fallback": 0}
    for i in range(len(PROMPTS)):
        ids = enc["input_ids"][i][enc["attention_mask"][i].bool()]
        toks, paths = _no_cache_reference(spellm, ids, n, None)
        assert out.sequences[i, prompt_len:].tolist() == toks
        assert out.paths[i].tolist() == paths
        for p in paths:
            counts[("exact", "autocorrect", "fallback")[p]] += 1
    assert {key: out.counters[key] for key in counts} == counts
    assert out.counters["tokens"] == n * len(PROMPTS)
    assert counts["exact"] > 0 and counts["autocorrect"] > 0  # both char paths are exercised


def test_generate_sampling(spellm, tiny_llama):
    tok = AutoTokenizer.from_pretrained(str(tiny_llama))
    enc = _batch(tok)
    args = (enc["input_ids"], enc["attention_mask"])
    kw = {"max_new_tokens": 8, "eos_token_id": []}
    for thr in (None, -1.0):
        greedy = spellm.generate(*args, threshold=thr, **kw)
        # A nucleus of one symbol/token per head, AutoCorrect and fallback: sampling reduces to greedy.
        narrow = spellm.generate(*args, threshold=thr, temperature=1.0, top_p=1e-9, **kw)
        assert torch.equal(narrow.sequences, greedy.sequences)
        a = spellm.generate(
            *args, threshold=thr, temperature=5.0, generator=torch.Generator().manual_seed(3), **kw
        )
        b = spellm.generate(
            *args, threshold=thr, temperature=5.0, generator=torch.Generator().manual_seed(3), **kw
        )
        assert torch.equal(a.sequences, b.sequences)
        assert not torch.equal(a.sequences, greedy.sequences)


def test_generate_text(spellm):
    texts, out = spellm.generate_text(["The module"], max_new_tokens=5, threshold=None, eos_token_id=[])
    assert len(texts) == 1 and texts[0]
    assert out.counters["tokens"] == 5
    assert sum(out.rates().values()) == pytest.approx(1.0)


# ---------------------------------------------------------------------------------------------------------
# Export directories: round trip and bad input


@pytest.fixture(scope="module")
def export_dir(spellm, table, tiny_llama, tmp_path_factory):
    out = tmp_path_factory.mktemp("infer_export") / "model"
    save_export(spellm.model, table, out, base_model=tiny_llama, threshold=0.5, max_shard_bytes=200_000)
    return out


def test_save_export_round_trip(spellm, export_dir):
    cfg = json.loads((export_dir / "spellm_config.json").read_text())
    assert cfg["fallback_threshold"] == 0.5 and cfg["k"] == 10 and not cfg["delta"]
    assert (export_dir / "model.safetensors.index.json").is_file()
    loaded = SpeLLMForCausalLM.from_pretrained(export_dir)
    assert loaded.threshold == 0.5
    want = spellm.model.state_dict()
    got = loaded.model.state_dict()
    assert set(want) == set(got)
    for name, t in want.items():
        assert torch.equal(got[name], t), name
    hf = AutoModelForCausalLM.from_pretrained(str(export_dir))
    for name, t in hf.state_dict().items():
        assert torch.equal(t, want["base." + name]), name


def test_bad_export_dirs(export_dir, tmp_path, metaspace_tokenizer):
    # 1. the tokenizer does not match the charset table
    bad = tmp_path / "tok"
    shutil.copytree(export_dir, bad)
    for f in ("tokenizer.json", "tokenizer_config.json"):
        shutil.copyfile(metaspace_tokenizer / f, bad / f)
    with pytest.raises(SpellmError, match="charset and tokenizer do not match"):
        SpeLLMForCausalLM.from_pretrained(bad)
    # 2. a truncated weight shard
    trunc = tmp_path / "trunc"
    shutil.copytree(export_dir, trunc)
    shard = sorted(trunc.glob("model-*.safetensors"))[-1]
    shard.write_bytes(shard.read_bytes()[:-100])
    with pytest.raises(SpellmError, match="truncated"):
        SpeLLMForCausalLM.from_pretrained(trunc)
    # 3. a truncated char-head file, 4. an incomplete export (no spellm_config.json)
    heads = tmp_path / "heads"
    shutil.copytree(export_dir, heads)
    (heads / "char_heads.safetensors").write_bytes((heads / "char_heads.safetensors").read_bytes()[:50])
    with pytest.raises(SpellmError, match=r"char_heads\.safetensors"):
        SpeLLMForCausalLM.from_pretrained(heads)
    (heads / "spellm_config.json").unlink()
    with pytest.raises(SpellmError, match="not a complete SpeLLM export"):
        SpeLLMForCausalLM.from_pretrained(heads)


def test_bf16_export(spellm, table, tiny_llama, tmp_path):
    out = tmp_path / "bf16"
    save_export(spellm.model, table, out, base_model=tiny_llama, dtype="bfloat16")
    assert json.loads((out / "config.json").read_text())["dtype"] == "bfloat16"
    loaded = SpeLLMForCausalLM.from_pretrained(out)
    want = spellm.model.state_dict()
    for name, t in loaded.model.state_dict().items():
        assert t.dtype == torch.bfloat16 and torch.equal(t, want[name].to(torch.bfloat16)), name
    res = loaded.decode_step(torch.randn(2, want["char_heads.weight"].shape[1], dtype=torch.bfloat16))
    assert res.tokens.shape == (2,)
