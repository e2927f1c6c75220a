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

Part 2 (`--full-model`), the end-to-end figure: a Llama-3.2-1B-shaped model (hidden 2048, 16
layers, 32 heads, 8 KV heads, FFN 8192, vocab 128,256, tied embeddings) built from config, batch 1 with
a KV cache: time per generated token of SpeLLM (fallback off) vs the base model's greedy decode, same
prompt, alternating runs, plus the ceiling implied by the parameter count (all parameters vs all but the
lm_head), the share of it achieved, the speedup with the fallback taken on ~10% of steps, and the share
of step time spent in lookup + AutoCorrect. The char heads are a least-squares probe of the base model's
own greedy trajectory (there is no trained checkpoint of that size here), so SpeLLM generates the same
tokens through exact lookups: the timing is of the real decode path, not of a distilled model's quality.
Timing is lockstep: every step of the base model's greedy trajectory is run by each variant on its own
KV cache (base: body + lm_head + argmax; SpeLLM: body + `decode_step`; SpeLLM with the fallback forced on
every 10th step; SpeLLM with the fallback forced on every step), the variants interleaved step by step in
rotating order so that load drift on a shared machine hits all of them alike. Per-token times are
medians over steps (means for the 10%-fallback variant, whose cost is in the rare steps). One
`generate()` run checks that SpeLLM reproduces the base tokens and reports its counters.

    .venv/bin/python bench/decode.py [--batches 1 8 64] [--reps 5] [--threads N]
    .venv/bin/python bench/decode.py --full-model [--new-tokens 32] [--device cuda]

Threads: one intra-op thread by default, for both sides. On a small machine shared with other jobs, two
threads make small ops (the lookup, the AutoCorrect gather) wait for a descheduled sibling thread and
their times jump tenfold; `--threads N` measures another setting. The last stdout line is one JSON object.
"""

from __future__ import annotations

import argparse
import json
import math
import statistics
import time
from collections.abc import Callable

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn

from spellm_ds.charset import CharTable
from spellm_ds.inference import PAPER_THRESHOLD, SpeLLMForCausalLM, _cache_kwarg, _returned_cache

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
# Part 2: a Llama-3.2-1B-shaped model, end to end


def bench_full_model(new_tokens: int, reps: int, device: str, dtype: torch.dtype) -> dict[str, object]:
    """Part 2: time per generated token, SpeLLM vs base greedy, batch 1 with a KV cache."""
    from transformers import LlamaConfig, LlamaForCausalLM

    from spellm_ds.model import SpeLLMModel

    cfg = LlamaConfig(
        vocab_size=V,
        hidden_size=2048,
        intermediate_size=8192,
        num_hidden_layers=16,
        num_attention_heads=32,
        num_key_value_heads=8,
        tie_word_embeddings=True,
        max_position_embeddings=4096,
        rope_theta=500000.0,
    )
    torch.manual_seed(0)
    t0 = time.perf_counter()
    with torch.device(device):
        base = LlamaForCausalLM(cfg).to(dtype).eval()
    init_s = time.perf_counter() - t0
    table = synthetic_table(V)
    model = SpeLLMModel(base, K, table.charset.size, trainable_layers=0).to(device).eval()
    spellm = SpeLLMForCausalLM(model, table, threshold=None)
    n_params = sum(p.numel() for p in base.parameters())
    n_lm = base.lm_head.weight.numel()
    ceiling = n_params / (n_params - n_lm + model.char_heads.weight.numel())

    prompt = torch.randint(0, V, (1, 32), generator=torch.Generator().manual_seed(1)).to(device)
    with torch.inference_mode():
        ref = base.generate(
            prompt, max_new_tokens=new_tokens, do_sample=False, eos_token_id=None, pad_token_id=0
        )
        # Fit the heads to spell the base's own greedy tokens along this trajectory (least squares).
        hidden = model.body(input_ids=ref[:, :-1]).last_hidden_state[0, prompt.shape[1] - 1 :].double()
    targets = ref[0, prompt.shape[1] :].cpu().numpy()
    rows = torch.from_numpy(table.token_chars[targets % V].astype(np.int64))
    onehot = F.one_hot(rows, table.charset.size).double().reshape(len(rows), -1) * 16.0 - 8.0
    sol = torch.linalg.lstsq(hidden.cpu(), onehot, driver="gelsd").solution
    with torch.no_grad():
        model.char_heads.weight.copy_(sol.T.to(model.char_heads.weight.dtype))
    decodable = torch.from_numpy(table.decodable[targets % V]).to(device)

    def run_spellm(thr: float | None) -> object:
        return spellm.generate(prompt, max_new_tokens=new_tokens, threshold=thr, eos_token_id=[])

    def sync() -> None:
        if device.startswith("cuda"):
            torch.cuda.synchronize()

    with torch.inference_mode():
        out = run_spellm(None)
        same = bool(
            torch.equal(
                out.sequences[:, prompt.shape[1] :][:, decodable], ref[:, prompt.shape[1] :][:, decodable]
            )
        )
        # A threshold that sends ~10% of this trajectory's steps to the fallback.
        h_all = model.body(input_ids=ref[:, :-1]).last_hidden_state[0, prompt.shape[1] - 1 :]
        ent = spellm.decode_step(h_all, threshold=None).entropy.float().cpu().numpy()
        thr10 = float(np.quantile(ent, 0.9))
        fb_out = run_spellm(thr10)
        # Lockstep timing: every step of the base greedy trajectory is run by each variant on its own KV
        # cache, variants interleaved step by step (rotating order), so load drift hits all alike.
        variants = {
            "base": lambda h, t: base.lm_head(h).argmax(-1),
            "spellm": lambda h, t: spellm.decode_step(h, threshold=None),
            "spellm_fb10": lambda h, t: spellm.decode_step(h, threshold=-1.0 if t % 10 == 0 else None),
            "spellm_fb_all": lambda h, t: spellm.decode_step(h, threshold=-1.0),
        }
        body = model.body
        cache_kw = _cache_kwarg(body)
        times: dict[str, list[float]] = {name: [] for name in variants}
        names = list(variants)
        for _ in range(reps):
            caches = {}
            for name in names:
                o = body(input_ids=prompt, use_cache=True)
                caches[name] = _returned_cache(o)
            for t in range(new_tokens):
                tok = ref[:, prompt.shape[1] - 1 + t : prompt.shape[1] + t] if t else None
                for j in range(len(names)):
                    name = names[(t + j) % len(names)]
                    sync()
                    t0 = time.perf_counter()
                    if tok is None:  # the first new token comes from the prefill's last state
                        h = body(input_ids=prompt, use_cache=False).last_hidden_state[:, -1]
                    else:
                        o = body(input_ids=tok, use_cache=True, **{cache_kw: caches[name]})
                        caches[name] = _returned_cache(o)
                        h = o.last_hidden_state[:, -1]
                    variants[name](h, t)
                    sync()
                    if tok is not None:
                        times[name].append(time.perf_counter() - t0)
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
        "share_of_ceiling": round((speedup - 1) / (ceiling - 1), 3) if ceiling > 1 else None,
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
    }
    print(
        f"1B-shaped model on {device}: base {res['ms_per_token_base']} ms/token, SpeLLM "
        f"{res['ms_per_token_spellm']} ms/token -> x{res['speedup']} (ceiling x{res['ceiling']}, "
        f"{100 * (res['share_of_ceiling'] or 0):.0f}% of it); fallback on "
        f"{100 * res['fallback10_rate']:.0f}% of steps x{res['speedup_fallback10']}; lookup "
        f"{100 * res['lookup_share_of_step']:.2f}% of a step, lookup + AutoCorrect "
        f"{100 * res['lookup_autocorrect_share_of_step_if_every_step_missed']:.2f}%",
        flush=True,
    )
    return res


def main() -> None:
    """Parse arguments, run the chosen part, print one JSON line last."""
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--batches", type=int, nargs="+", default=[1, 8, 64])
    ap.add_argument("--reps", type=int, default=5)
    ap.add_argument("--threads", type=int, default=1, help="torch intra-op threads (default 1, see above)")
    ap.add_argument("--dtype", default="float32", choices=["float32", "bfloat16"])
    ap.add_argument("--full-model", action="store_true", help="part 2: the 1B-shaped end-to-end figure")
    ap.add_argument("--new-tokens", type=int, default=32)
    ap.add_argument("--device", default="cpu")
    args = ap.parse_args()
    torch.set_num_threads(args.threads)
    dtype = {"float32": torch.float32, "bfloat16": torch.bfloat16}[args.dtype]
    if args.full_model:
        res = {"full_model": bench_full_model(args.new_tokens, args.reps, args.device, dtype)}
    else:
        res = {"decode_step": bench_heads(args.batches, args.reps, dtype, args.device)}
    print(json.dumps(res))


if __name__ == "__main__":
    main()
