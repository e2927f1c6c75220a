"""Decode benchmark: the SpeLLM output path vs the original lm_head, side by side in one process.

Part 1 (default), the decode step alone at the Llama-3-8B output shape (d=4096, V=128,256, k=10,
|C|=105), batch 1 / 8 / 64, CPU fp32. Timed with the real `SpeLLMForCausalLM.decode_step`:

    lm_head      F.linear(h, W[V, d]) + argmax                         (the base model's greedy step)
    hit          head matmul [d, k·|C|] + per-head argmax + lookup + entropy, every row an exact hit
    autocorrect  as hit, one row's string is no token (AutoCorrect on that row, [V', k] gather)
    fallback     as hit, one row above the entropy threshold (lm_head on that row)
    mixed        ~5% of rows AutoCorrect and ~10% fallback (B >= 8); for B = 1 the expectation
                 0.85·hit + 0.05·autocorrect + 0.10·fallback

The vocabulary is synthetic (distinct random strings, about half with a leading space, lengths 1..14,
like a byte-level BPE's), spelled by the real `CharTable`; hidden states are built so the heads spell
chosen tokens (hit), strings that are no token (autocorrect) or nothing clearly (fallback). Repetitions
of all variants alternate so they see the same machine load; medians are reported.

Part 2 (`--full-model`), the end-to-end figure: a model built from config at a real shape (`--shape`),
batch 1 with a KV cache, tied embeddings:

    llama-3.2-1b   hidden 2048, 16 layers, 32 heads / 8 KV heads, FFN 8192, vocab 128,256 (default)
    smollm2-135m   hidden 576, 30 layers, 9 heads / 3 KV heads, FFN 1536, vocab 49,152 (the demo's teacher)

Time per generated token of SpeLLM (fallback off) vs the base model's greedy decode, same prompt, plus
the ceiling implied by the parameter count (all parameters vs all but the lm_head), the share of it
achieved, the speedup with the fallback taken on ~10% of steps, and the share of step time spent in
lookup + AutoCorrect. The char heads are a least-squares probe of the base model's own greedy trajectory
(there is no trained checkpoint of that size here), so SpeLLM generates the same tokens through exact
lookups: the timing is of the real decode path, not of a distilled model's quality.

Rows at the calibrated fallback rate R (`--fallback-rate`, default `DEMO_FALLBACK_RATE`: the demo's
calibrated fallback rate for 99% top-1 agreement on SmolLM2-135M, as docs/RESULTS.md records it under
`demo: fallback_rate`; pass the rate your own `spellm-ds eval --calibrate` reported): SpeLLM falls back on
a share R of the steps, spread evenly (step i when floor((i+1)·R) > floor(i·R)), once with
the approximate fallback (lm_head on the student's hidden state) and once with the exact one (the last N
layers, `--trainable-layers`, default 5, rerun with their original MLPs over the positions since the
previous fallback, on their own N-layer KV cache, then lm_head: `spellm_ds.inference`). Here the original
MLPs are copies of the student's, so both give the base's tokens; the work is the real catch-up path.
Reported: ms/token (mean over steps: the cost is in the fallback steps), speedup vs base, share of the
head-removal ceiling, and the exact fallback's catch-up cost per token (exact minus approximate) against
the model R · N/L · (the base's body time per token, i.e. the layers' weight reads). Both variants fall
back on step 0 too (untimed), so the exact tail's one-off catch-up over the prompt is reported apart
(`exact_prompt_catchup_ms`) and the per-token rows are the steady state. Check: with the student's tail
MLPs moved (output weights times -2, so its own lm_head disagrees with the base), `generate` with the
exact fallback on every step (R = 1) must give the base's greedy tokens
(`exact_fallback_always_same_tokens_as_base`; `moved_student_top1_differs_share` shows the move matters).

Timing is lockstep: every step of the base greedy trajectory is run by each variant on its own KV cache
(one prefill, copied), base: body + lm_head + argmax; SpeLLM: body + `decode_step`; SpeLLM with the
fallback forced on every 10th step, on every step, and at rate R approximate and exact; the variants
interleaved step by step in rotating order so that load drift on a shared machine hits all of them
alike. Per-token times are medians over steps (means for the 10%-fallback and rate-R variants, whose
cost is in the fallback steps). One `generate()` run checks that SpeLLM reproduces the base tokens and
reports its counters. `--num-layers` overrides the shape's layer count (quick checks).

    .venv/bin/python bench/decode.py [--batches 1 8 64] [--reps 5] [--threads N]
    .venv/bin/python bench/decode.py --full-model [--shape smollm2-135m] [--new-tokens 32] [--reps 3]
        [--fallback-rate R] [--trainable-layers 5] [--device cuda]

Threads: one intra-op thread by default, for both sides. On a small machine shared with other jobs, two
threads make small ops (the lookup, the AutoCorrect gather) wait for a descheduled sibling thread and
their times jump; `--threads N` measures another setting. The last stdout line is one JSON object;
`--save [NAME]` also writes it to bench/results/NAME.json for docs/RESULTS.md (default NAME: decode, or
decode-full-model with `--full-model`).
"""

from __future__ import annotations

import argparse
import contextlib
import copy
import json
import math
import statistics
import sys
import time
from collections.abc import Callable, Iterator
from fractions import Fraction
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn

from spellm_ds.charset import CharTable
from spellm_ds.dtypes import torch_dtype
from spellm_ds.export.format import PAPER_THRESHOLD
from spellm_ds.inference.model import SpeLLMForCausalLM
from spellm_ds.model.tail import cache_kwarg, returned_cache

sys.path.insert(0, str(Path(__file__).resolve().parent))
import record

V, K = 128_256, 10


def synthetic_table(vocab: int, k: int = K, seed: int = 0) -> CharTable:
    """A `CharTable` of distinct random spellings: ~half start with a space, lengths 1..14 (mode ~4)."""
    from spellm_ds.charset import DEFAULT_CHARSET

    cs = DEFAULT_CHARSET
    rng = np.random.default_rng(seed)
    letters = np.array(cs.encode("etaoinshrdlcumwfgypbvkjxqz"))
    freq = np.linspace(2.0, 0.2, len(letters))
    freq /= freq.sum()
    others = np.array(cs.encode("ETAOINSHRDLCUMWFGYPBVKJXQZ0123456789.,;:!?()[]{}<>=+-*/_'#%&|^~@$"))
    width = 14
    full = np.zeros((0, width), dtype=np.uint8)
    while len(full) < vocab:
        n = 2 * (vocab - len(full))
        lengths = np.clip(rng.gamma(3.0, 1.6, n).astype(int), 1, width)
        rows = rng.choice(letters, (n, width), p=freq).astype(np.uint8)
        rows[rng.random(n) < 0.1, 0] = rng.choice(others, 1)[0]
        rows[rng.random(n) < 0.5, 0] = cs.encode(" ")[0]
        rows[np.arange(width)[None, :] >= lengths[:, None]] = 0
        full = np.unique(np.concatenate([full, rows]), axis=0)
    full = full[rng.permutation(len(full))[:vocab]]
    lengths = (full != 0).sum(1).astype(np.int32)
    z = np.zeros(vocab, dtype=bool)
    return CharTable(
        charset=cs,
        k=k,
        vocab_size=vocab,
        tokenizer_hash="",
        token_chars=np.ascontiguousarray(full[:, :k]),
        lengths=lengths,
        truncated=lengths > k,
        unknown=z,
        normalized=z.copy(),
    )


class _Heads(nn.Module):
    """Just the output layers of a SpeLLM model (what `decode_step` touches)."""

    def __init__(self, d: int, k: int, num_chars: int, vocab: int, dtype: torch.dtype) -> None:
        super().__init__()
        self.k, self.num_chars = k, num_chars
        self.char_heads = nn.Linear(d, k * num_chars, bias=False, dtype=dtype)
        self.lm_head = nn.Linear(d, vocab, bias=False, dtype=dtype)
        self.layers = nn.ModuleList()  # no decoder layers: the fallback is the lm_head on `h` (approximate)


def _sync(device: str) -> None:
    if device.startswith("cuda"):
        torch.cuda.synchronize()


def _timeit(fn: Callable[[], object], device: str = "cpu") -> float:
    _sync(device)
    t = time.perf_counter()
    fn()
    _sync(device)
    return time.perf_counter() - t


def _alternate(fns: dict[str, Callable[[], object]], reps: int, device: str = "cpu") -> dict[str, float]:
    for fn in fns.values():  # warm-up
        fn()
    times: dict[str, list[float]] = {name: [] for name in fns}
    for _ in range(reps):
        for name, fn in fns.items():
            times[name].append(_timeit(fn, device))
    return {name: statistics.median(v) for name, v in times.items()}


def _spelling_hidden(model: _Heads, rows: np.ndarray, alpha: float, gen: torch.Generator) -> torch.Tensor:
    """Hidden states whose head logits peak (by `alpha`) at the given char rows `[N, k]`."""
    w = model.char_heads.weight.detach().float()
    c = model.num_chars
    idx = torch.from_numpy(rows.astype(np.int64)) + torch.arange(model.k) * c  # [N, k] rows of w
    h = w[idx.to(w.device)].sum(1) * alpha
    return (h + 0.01 * torch.randn(h.shape, generator=gen).to(h.device)).to(w.dtype)


def bench_heads(batches: list[int], reps: int, dtype: torch.dtype, device: str = "cpu") -> dict[str, object]:
    """Part 1: the decode step at d=4096, V=128,256."""
    d = 4096
    t0 = time.perf_counter()
    table = synthetic_table(V)
    build_s = time.perf_counter() - t0
    gen = torch.Generator().manual_seed(0)
    model = _Heads(d, K, table.charset.size, V, dtype)
    with torch.no_grad():
        model.char_heads.weight.copy_(
            torch.randn(model.char_heads.weight.shape, generator=gen) / math.sqrt(d)
        )
        model.lm_head.weight.copy_(torch.randn(model.lm_head.weight.shape, generator=gen) * 0.02)
    model = model.to(device)
    spellm = SpeLLMForCausalLM(model, table, threshold=PAPER_THRESHOLD)
    dec_ids = np.flatnonzero(table.decodable & ~table.truncated)
    rng = np.random.default_rng(0)
    nonword = np.zeros((1, K), dtype=np.int64)
    nonword[0, :7] = table.charset.encode("zqxjzqx")
    lm_w = model.lm_head.weight
    results: dict[str, object] = {
        "shape": {
            "d": d,
            "V": V,
            "k": K,
            "num_chars": table.charset.size,
            "dtype": str(dtype).split(".")[-1],
        },
        "decodable_share": round(float(table.decodable.mean()), 4),
        "table_build_s": round(build_s, 2),
        "threads": torch.get_num_threads(),
        "device": device,
    }
    per_batch = {}
    for b in batches:
        hit = _spelling_hidden(model, table.token_chars[rng.choice(dec_ids, b)], 40.0, gen)
        n_ac, n_fb = max(1, round(0.05 * b)), max(1, round(0.10 * b))
        ac = hit.clone()
        ac[:1] = _spelling_hidden(model, nonword, 40.0, gen)
        fb = hit.clone()
        fb[:1] = _spelling_hidden(model, table.token_chars[rng.choice(dec_ids, 1)], 0.3, gen)
        mixed = hit.clone()
        if b >= 8:
            mixed[:n_ac] = _spelling_hidden(model, np.repeat(nonword, n_ac, 0), 40.0, gen)
            mixed[n_ac : n_ac + n_fb] = _spelling_hidden(
                model, table.token_chars[rng.choice(dec_ids, n_fb)], 0.3, gen
            )
        # Check the constructed cases take the intended paths.
        paths = {name: spellm.decode_step(h).path for name, h in (("hit", hit), ("ac", ac), ("fb", fb))}
        assert bool((paths["hit"] == 0).all()), "hit rows should all be exact lookups"
        assert int(paths["ac"][0]) == 1 and int(paths["fb"][0]) == 2, "constructed rows took other paths"
        lookup_chars = torch.from_numpy(table.token_chars[rng.choice(dec_ids, b)].astype(np.int64)).to(device)
        with torch.inference_mode():
            fns = {
                "lm_head": lambda h=hit: F.linear(h, lm_w).argmax(-1),
                "hit": lambda h=hit: spellm.decode_step(h),
                "autocorrect": lambda h=ac: spellm.decode_step(h),
                "fallback": lambda h=fb: spellm.decode_step(h),
                "lookup": lambda c=lookup_chars: spellm.decoder.decode_chars(c),
            }
            if b >= 8:
                fns["mixed"] = lambda h=mixed: spellm.decode_step(h)
            r = reps if b < 64 else max(3, reps // 2)
            t = _alternate(fns, r, device)
        if b < 8:
            t["mixed"] = 0.85 * t["hit"] + 0.05 * t["autocorrect"] + 0.10 * t["fallback"]
        row = {f"{name}_ms": round(1e3 * v, 3) for name, v in t.items()}
        row["speedup_hit"] = round(t["lm_head"] / t["hit"], 2)
        row["speedup_mixed"] = round(t["lm_head"] / t["mixed"], 2)
        row["lookup_share_of_hit"] = round(t["lookup"] / t["hit"], 4)
        row["autocorrect_row_ms"] = round(1e3 * (t["autocorrect"] - t["hit"]), 3)
        per_batch[str(b)] = row
        print(
            f"B={b:<3} lm_head {1e3 * t['lm_head']:9.2f} ms | SpeLLM hit {1e3 * t['hit']:7.3f} ms "
            f"(x{row['speedup_hit']}) | +1 AutoCorrect row {1e3 * t['autocorrect']:7.3f} ms | "
            f"+1 fallback row {1e3 * t['fallback']:8.2f} ms | "
            f"mixed {1e3 * t['mixed']:8.2f} ms (x{row['speedup_mixed']}) | "
            f"lookup {100 * row['lookup_share_of_hit']:.1f}% of hit",
            flush=True,
        )
    results["batches"] = per_batch
    return results


# ---------------------------------------------------------------------------------------------------------
# Part 2: a model of a real shape built from config, end to end

SHAPES: dict[str, dict[str, object]] = {
    "llama-3.2-1b": {
        "vocab_size": 128_256,
        "hidden_size": 2048,
        "intermediate_size": 8192,
        "num_hidden_layers": 16,
        "num_attention_heads": 32,
        "num_key_value_heads": 8,
        "max_position_embeddings": 4096,
        "rope_theta": 500000.0,
    },
    "smollm2-135m": {
        "vocab_size": 49_152,
        "hidden_size": 576,
        "intermediate_size": 1536,
        "num_hidden_layers": 30,
        "num_attention_heads": 9,
        "num_key_value_heads": 3,
        "max_position_embeddings": 8192,
        "rope_theta": 100000.0,
        "rms_norm_eps": 1e-5,
    },
}
# The default of `--fallback-rate`: the demo's calibrated fallback rate (the exact fallback's share of
# the report positions at the threshold chosen for 99% top-1 agreement on SmolLM2-135M), rounded, as
# docs/RESULTS.md records it under `demo: fallback_rate`. Update it when the demo is re-measured.
DEMO_FALLBACK_RATE = 0.618


def fallback_schedule(steps: int, rate: float) -> list[bool]:
    """Steps that fall back at `rate`, spread evenly: step i when floor((i+1)·rate) > floor(i·rate)."""
    if not 0.0 <= rate <= 1.0:
        raise ValueError(f"fallback rate must be in [0, 1], got {rate}")
    r = Fraction(rate).limit_denominator(10**6)
    n, d = r.numerator, r.denominator
    return [(i + 1) * n // d > i * n // d for i in range(steps)]


def _original_mlp_weights(model: nn.Module, first: int) -> dict[str, torch.Tensor]:
    """HF name → weight of the MLPs of layers `first`..L-1 (what an export keeps as `original_mlps`)."""
    layout, layers = model.layout, model.layers
    return {
        f"{layout.layers}.{i}.{layout.mlp}.{name}": p.detach()
        for i in range(first, len(layers))
        for name, p in getattr(layers[i], layout.mlp).named_parameters()
    }


@contextlib.contextmanager
def _moved_tail_mlps(model: nn.Module, first: int) -> Iterator[None]:
    """While inside, the student's MLPs of layers `first`..L-1 have their output weights scaled by -2."""
    weights = [
        p
        for layer in list(model.layers)[first:]
        for name, p in getattr(layer, model.layout.mlp).named_parameters()
        if name.startswith("down_proj")
    ]
    with torch.no_grad():
        for p in weights:
            p.mul_(-2.0)
    try:
        yield
    finally:
        with torch.no_grad():
            for p in weights:
                p.mul_(-0.5)  # exact: both factors are powers of two


def bench_full_model(
    new_tokens: int,
    reps: int,
    device: str,
    dtype: torch.dtype,
    shape: str = "llama-3.2-1b",
    trainable_layers: int = 5,
    fallback_rate: float = DEMO_FALLBACK_RATE,
    num_layers: int | None = None,
) -> dict[str, object]:
    """Part 2: time per generated token, SpeLLM vs base greedy, batch 1 with a KV cache."""
    from transformers import LlamaConfig, LlamaForCausalLM

    from spellm_ds.inference.fallback import ExactFallback
    from spellm_ds.model.student import SpeLLMModel

    spec = dict(SHAPES[shape])
    if num_layers is not None:
        spec["num_hidden_layers"] = num_layers
    vocab, n_layers = int(spec["vocab_size"]), int(spec["num_hidden_layers"])
    if not 0 <= trainable_layers <= n_layers:
        raise ValueError(f"--trainable-layers must be in 0..{n_layers}, got {trainable_layers}")
    cfg = LlamaConfig(**spec, tie_word_embeddings=True)
    torch.manual_seed(0)
    t0 = time.perf_counter()
    with torch.device(device):
        base = LlamaForCausalLM(cfg).to(dtype).eval()
    init_s = time.perf_counter() - t0
    table = synthetic_table(vocab)
    model = SpeLLMModel(base, K, table.charset.size, trainable_layers=0).to(device).eval()
    spellm = SpeLLMForCausalLM(model, table, threshold=None)
    # The same model with the exact fallback: the original MLPs of the last N layers kept beside the
    # student's (copies of the same values here, so the timed trajectories agree; the check below moves
    # the student's).
    tail_start = n_layers - trainable_layers
    exact_sp = SpeLLMForCausalLM(
        model,
        table,
        threshold=None,
        original_weights=_original_mlp_weights(model, tail_start),
        fallback="exact",
    )
    has_tail = len(exact_sp.original_mlps) > 0
    n_params = sum(p.numel() for p in base.parameters())
    n_lm = base.lm_head.weight.numel()
    ceiling = n_params / (n_params - n_lm + model.char_heads.weight.numel())

    prompt = torch.randint(0, vocab, (1, 32), generator=torch.Generator().manual_seed(1)).to(device)
    p_len = prompt.shape[1]
    with torch.inference_mode():
        ref = base.generate(
            prompt, max_new_tokens=new_tokens, do_sample=False, eos_token_id=None, pad_token_id=0
        )
        # Fit the heads to spell the base's own greedy tokens along this trajectory (least squares).
        hidden = model.body(input_ids=ref[:, :-1]).last_hidden_state[0, p_len - 1 :].double()
    targets = ref[0, p_len:].cpu().numpy()
    rows = torch.from_numpy(table.token_chars[targets % vocab].astype(np.int64))
    onehot = F.one_hot(rows, table.charset.size).double().reshape(len(rows), -1) * 16.0 - 8.0
    sol = torch.linalg.lstsq(hidden.cpu(), onehot, driver="gelsd").solution
    with torch.no_grad():
        model.char_heads.weight.copy_(sol.T.to(model.char_heads.weight.dtype))
    decodable = torch.from_numpy(table.decodable[targets % vocab]).to(device)

    def run_spellm(thr: float | None) -> object:
        return spellm.generate(prompt, max_new_tokens=new_tokens, threshold=thr, eos_token_id=[])

    def sync() -> None:
        if device.startswith("cuda"):
            torch.cuda.synchronize()

    with torch.inference_mode():
        out = run_spellm(None)
        same = bool(torch.equal(out.sequences[:, p_len:][:, decodable], ref[:, p_len:][:, decodable]))
        # The exact fallback on every step is the base model: with the student's tail MLPs moved, greedy
        # generate at a negative threshold must still give the base's greedy tokens, while the moved
        # student's own lm_head disagrees (so the check is not vacuous).
        with _moved_tail_mlps(model, tail_start):
            exact_all = exact_sp.generate(prompt, max_new_tokens=new_tokens, threshold=-1.0, eos_token_id=[])
            moved = model.body(input_ids=ref[:, :-1]).last_hidden_state[0, p_len - 1 :]
            moved_top1 = spellm.lm_logits(moved).argmax(-1)
        exact_same = bool(torch.equal(exact_all.sequences, ref))
        moved_differs = float((moved_top1 != ref[0, p_len:]).float().mean())
        # A threshold that sends ~10% of this trajectory's steps to the fallback.
        h_all = model.body(input_ids=ref[:, :-1]).last_hidden_state[0, p_len - 1 :]
        ent = spellm.decode_step(h_all, threshold=None).entropy.float().cpu().numpy()
        thr10 = float(np.quantile(ent, 0.9))
        fb_out = run_spellm(thr10)
        # Lockstep timing: every step of the base greedy trajectory is run by each variant on its own KV
        # cache, variants interleaved step by step (rotating order), so load drift hits all alike. The
        # rate variants fall back on step 0 (the prompt's last position, untimed: the exact tail's catch-up
        # over the prompt is timed apart) and then on `fallback_rate` of the timed steps, spread evenly.
        at_rate = [True, *fallback_schedule(new_tokens - 1, fallback_rate)]
        ones = torch.ones(1, p_len + new_tokens, dtype=torch.long, device=device)
        tails: dict[str, ExactFallback] = {}

        def exact_step(h: torch.Tensor, t: int) -> object:
            if not has_tail:
                return exact_sp.decode_step(h, threshold=-1.0 if at_rate[t] else None)
            tail = tails["exact_rate"]
            tail.mask = ones[:, : tail.columns]
            return exact_sp.decode_step(
                h, threshold=-1.0 if at_rate[t] else None, fallback_hidden=tail.hidden
            )

        variants = {
            "base": lambda h, t: base.lm_head(h).argmax(-1),
            "spellm": lambda h, t: spellm.decode_step(h, threshold=None),
            "spellm_fb10": lambda h, t: spellm.decode_step(h, threshold=-1.0 if t % 10 == 0 else None),
            "spellm_fb_all": lambda h, t: spellm.decode_step(h, threshold=-1.0),
            "approx_rate": lambda h, t: spellm.decode_step(h, threshold=-1.0 if at_rate[t] else None),
            "exact_rate": exact_step,
        }
        body = model.body
        cache_kw = cache_kwarg(body)
        times: dict[str, list[float]] = {name: [] for name in variants}
        first_step: dict[str, list[float]] = {"approx_rate": [], "exact_rate": []}
        body_times: list[float] = []
        exact_tokens_ok = True
        names = list(variants)

        def recording(name: str) -> contextlib.AbstractContextManager[None]:
            if name == "exact_rate" and has_tail:
                return exact_sp.recording(tails[name].record)
            return contextlib.nullcontext()

        # One prefill, its KV cache copied for each variant and rep; the exact tail's record of the prompt
        # (the input of layer L-N there) is kept for each rep's fresh tail.
        prompt_in: list[torch.Tensor] = []
        with exact_sp.recording(prompt_in.append) if has_tail else contextlib.nullcontext():
            o = body(input_ids=prompt, use_cache=True)
        prompt_cache, h_prompt = returned_cache(o), o.last_hidden_state[:, -1]
        for _ in range(reps):
            caches = {name: copy.deepcopy(prompt_cache) for name in names}
            tails["exact_rate"] = ExactFallback(exact_sp, 1, p_len + new_tokens)
            for x in prompt_in:
                tails["exact_rate"].record(x)
            for t in range(new_tokens):
                tok = ref[:, p_len - 1 + t : p_len + t] if t else None
                for j in range(len(names)):
                    name = names[(t + j) % len(names)]
                    sync()
                    t0 = time.perf_counter()
                    if tok is None:  # the first new token comes from the prefill's last state
                        h = h_prompt
                    else:
                        with recording(name):
                            o = body(input_ids=tok, use_cache=True, **{cache_kw: caches[name]})
                        caches[name] = returned_cache(o)
                        h = o.last_hidden_state[:, -1]
                        if name == "base":
                            sync()
                            body_times.append(time.perf_counter() - t0)
                    res = variants[name](h, t)
                    sync()
                    if tok is not None:
                        times[name].append(time.perf_counter() - t0)
                    elif name in first_step:
                        first_step[name].append(time.perf_counter() - t0)
                    if name == "exact_rate" and at_rate[t]:
                        exact_tokens_ok &= bool(torch.equal(res.tokens, ref[0, p_len + t : p_len + t + 1]))
        # Lookup + AutoCorrect cost per step at batch 1 (AutoCorrect as if every step missed).
        h1 = h_all[:1]
        logp = (h1 @ model.char_heads.weight.T).float().view(1, K, -1).log_softmax(-1)
        chars = logp.argmax(-1)
        dec = spellm.decoder

        def lookup_ac() -> None:
            dec.decode_chars(chars)
            dec.autocorrect(logp)

        def lookup_only() -> None:
            dec.decode_chars(chars)

        for fn in (lookup_ac, lookup_only):
            fn()
        sync()
        part = {}
        for name, fn in (("lookup_autocorrect", lookup_ac), ("lookup", lookup_only)):
            t = time.perf_counter()
            for _ in range(20):
                fn()
            sync()
            part[name] = (time.perf_counter() - t) / 20
    med = {name: statistics.median(v) for name, v in times.items()}
    mean = {name: statistics.fmean(v) for name, v in times.items()}
    speedup = med["base"] / med["spellm"]

    def share(s: float) -> float | None:
        return round((s - 1) / (ceiling - 1), 3) if ceiling > 1 else None

    # Catch-up model: each fallback step reruns N of the L layers over (about) one position, reading N/L
    # of the layers' weights, and the base's body time per token is those reads.
    rate_timed = sum(at_rate[1:]) / max(1, new_tokens - 1)
    body_s = statistics.median(body_times)
    predicted = rate_timed * trainable_layers / n_layers * body_s
    measured = mean["exact_rate"] - mean["approx_rate"]
    speed_exact = med["base"] / mean["exact_rate"]
    speed_approx = med["base"] / mean["approx_rate"]
    prompt_catchup = statistics.median(
        e - a for e, a in zip(first_step["exact_rate"], first_step["approx_rate"])
    )
    res = {
        "device": device,
        "dtype": str(dtype).split(".")[-1],
        "threads": torch.get_num_threads(),
        "params": n_params,
        "init_s": round(init_s, 1),
        "new_tokens": new_tokens,
        "ms_per_token_base": round(1e3 * med["base"], 2),
        "ms_per_token_spellm": round(1e3 * med["spellm"], 2),
        "ms_per_token_spellm_fallback10": round(1e3 * mean["spellm_fb10"], 2),
        "speedup": round(speedup, 3),
        "ceiling": round(ceiling, 3),
        "share_of_ceiling": share(speedup),
        "speedup_fallback10": round(med["base"] / mean["spellm_fb10"], 3),
        "ms_per_token_spellm_fallback_always": round(1e3 * med["spellm_fb_all"], 2),
        "speedup_vs_same_loop_fallback_always": round(med["spellm_fb_all"] / med["spellm"], 3),
        "fallback10_rate": round(
            sum(1 for t in range(1, new_tokens) if t % 10 == 0) / max(1, new_tokens - 1), 3
        ),
        "generate_fallback_rate_at_entropy_quantile_0.9": round(
            fb_out.counters["fallback"] / max(1, fb_out.counters["tokens"]), 3
        ),
        "counters_fallback_off": out.counters,
        "same_tokens_as_base": same,
        "lookup_share_of_step": round(part["lookup"] / med["spellm"], 4),
        "lookup_autocorrect_share_of_step_if_every_step_missed": round(
            part["lookup_autocorrect"] / med["spellm"], 4
        ),
        "shape": shape,
        "num_layers": n_layers,
        "trainable_layers": trainable_layers,
        "fallback_rate": fallback_rate,
        "fallback_rate_timed_steps": round(rate_timed, 4),
        "body_ms_per_token_base": round(1e3 * body_s, 2),
        "exact_at_rate_ms_per_token": round(1e3 * mean["exact_rate"], 2),
        "approximate_at_rate_ms_per_token": round(1e3 * mean["approx_rate"], 2),
        "speedup_exact_at_rate": round(speed_exact, 3),
        "speedup_approximate_at_rate": round(speed_approx, 3),
        "share_of_ceiling_exact": share(speed_exact),
        "share_of_ceiling_approximate": share(speed_approx),
        "exact_catchup_predicted_ms": round(1e3 * predicted, 3),
        "exact_catchup_measured_ms": round(1e3 * measured, 3),
        "exact_catchup_measured_over_predicted": round(measured / predicted, 3) if predicted > 0 else None,
        "exact_prompt_catchup_ms": round(1e3 * prompt_catchup, 2),
        "exact_at_rate_fallback_tokens_match_base": exact_tokens_ok,
        "exact_fallback_always_same_tokens_as_base": exact_same,
        "moved_student_top1_differs_share": round(moved_differs, 3),
    }
    print(
        f"{shape}-shaped model on {device}: base {res['ms_per_token_base']} ms/token, SpeLLM "
        f"{res['ms_per_token_spellm']} ms/token -> x{res['speedup']} (ceiling x{res['ceiling']}, "
        f"{100 * (res['share_of_ceiling'] or 0):.0f}% of it); fallback on "
        f"{100 * res['fallback10_rate']:.0f}% of steps x{res['speedup_fallback10']}; lookup "
        f"{100 * res['lookup_share_of_step']:.2f}% of a step, lookup + AutoCorrect "
        f"{100 * res['lookup_autocorrect_share_of_step_if_every_step_missed']:.2f}%",
        flush=True,
    )
    print(
        f"fallback on {100 * rate_timed:.1f}% of steps (rate {fallback_rate}), N={trainable_layers} of "
        f"L={n_layers}: exact {res['exact_at_rate_ms_per_token']} ms/token x{res['speedup_exact_at_rate']} "
        f"({100 * (res['share_of_ceiling_exact'] or 0):.0f}% of the ceiling), approximate "
        f"{res['approximate_at_rate_ms_per_token']} ms/token x{res['speedup_approximate_at_rate']} "
        f"({100 * (res['share_of_ceiling_approximate'] or 0):.0f}%); catch-up "
        f"{res['exact_catchup_measured_ms']} ms/token measured vs {res['exact_catchup_predicted_ms']} "
        f"predicted (rate x N/L x body {res['body_ms_per_token_base']} ms); prompt catch-up "
        f"{res['exact_prompt_catchup_ms']} ms once",
        flush=True,
    )
    if not exact_same:
        print("WARNING: exact fallback on every step did not reproduce the base's greedy tokens", flush=True)
    return res


def build_parser(full_model: bool = False) -> argparse.ArgumentParser:
    """The command line of the decode benchmark (`--save` names decode-full-model when `full_model`)."""
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--batches", type=int, nargs="+", default=[1, 8, 64])
    ap.add_argument("--reps", type=int, default=None, help="repetitions (default 5; 3 with --full-model)")
    ap.add_argument("--threads", type=int, default=1, help="torch intra-op threads (default 1, see above)")
    ap.add_argument("--dtype", default="float32", choices=["float32", "bfloat16"])
    ap.add_argument("--full-model", action="store_true", help="part 2: the end-to-end figure of a real shape")
    ap.add_argument("--new-tokens", type=int, default=32)
    ap.add_argument("--device", default="cpu")
    ap.add_argument("--shape", default="llama-3.2-1b", choices=list(SHAPES), help="part 2: model shape")
    ap.add_argument(
        "--trainable-layers", type=int, default=5, help="part 2: N, the layers the exact fallback reruns"
    )
    ap.add_argument(
        "--fallback-rate",
        type=float,
        default=DEMO_FALLBACK_RATE,
        help=(
            f"part 2: share of steps falling back in the rate rows (default {DEMO_FALLBACK_RATE}: the demo's "
            "calibrated fallback rate, as docs/RESULTS.md records it under `demo: fallback_rate`)"
        ),
    )
    ap.add_argument("--num-layers", type=int, default=None, help="part 2: override the shape's layer count")
    record.add_save_flag(ap, "decode-full-model" if full_model else "decode")
    return ap


def main(argv: list[str] | None = None) -> None:
    """Parse arguments, run the chosen part, print one JSON line last."""
    pre = argparse.ArgumentParser(add_help=False)
    pre.add_argument("--full-model", action="store_true")
    ap = build_parser(full_model=pre.parse_known_args(argv)[0].full_model)
    args = ap.parse_args(argv)
    if not 0.0 <= args.fallback_rate <= 1.0:
        ap.error(f"--fallback-rate must be in [0, 1], got {args.fallback_rate}")
    if args.new_tokens < 2:
        ap.error("--new-tokens must be at least 2 (the first step is not timed)")
    if args.save and not args.save.replace("-", "").replace("_", "").isalnum():
        ap.error(f"--save {args.save!r}: use letters, digits, '-' and '_' only")
    reps = args.reps if args.reps is not None else (3 if args.full_model else 5)
    torch.set_num_threads(args.threads)
    dtype = torch_dtype(args.dtype, "--dtype")
    if args.full_model:
        res = {
            "full_model": bench_full_model(
                args.new_tokens,
                reps,
                args.device,
                dtype,
                shape=args.shape,
                trainable_layers=args.trainable_layers,
                fallback_rate=args.fallback_rate,
                num_layers=args.num_layers,
            )
        }
        what = (
            f"time per generated token, SpeLLM vs the base's greedy decode, {args.shape}-shaped model, "
            f"batch 1, fallback at rate {args.fallback_rate}"
        )
    else:
        res = {"decode_step": bench_heads(args.batches, reps, dtype, args.device)}
        what = "the decode step alone at the Llama-3-8B output shape: SpeLLM heads vs lm_head"
    record.save(args.save, {"what": what, **res})
    print(json.dumps(res))


if __name__ == "__main__":
    main()
