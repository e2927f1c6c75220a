"""Output-layer benchmark, CPU fp32: SpeLLM char heads vs the full-vocabulary head.

1. Speed of one training step of the output layer, three sides, forward + backward, each computing the
   gradients of the hidden states and of its trainable head weight:
   - `char`: char heads (one [d, k*|C|] matmul) + the top-5 selection char loss
     (`losses.char_selection_loss`, with the selection rule and tau of the run-config defaults);
   - `char_kl6`: the same plus the kl6 token regulariser on the frozen lm_head, chunked over
     `--reg-chunk` tokens (`losses.token_regularizer`, weighted by the default `loss.reg_weight`): what
     a training step with the default `loss.regularizer: kl6` runs, a full [d, V] matmul forward and one
     backward to the hidden states (no lm_head weight gradient);
   - `full`: lm_head ([d, V] matmul) + full-vocabulary cross-entropy to the teacher top-1.
   Every side gets the same `--warmup` untimed calls and then the same `--reps` timed ones; the timed reps
   interleave the sides, in reversed order every other rep (char, char_kl6, full, then full, char_kl6,
   char), so all see the same machine load. Each side reports its min and median; `full_over_char` is the
   full side's time over the char side's (from medians and from mins), `full_over_char_kl6` the same
   against the char step with its regulariser, and `flop_ratio` is V / (k*|C|), the matmul FLOP ratio of
   the two heads.
2. Memory: the token regularizer (kl6, frozen lm_head, gradient to the hidden states) chunked over
   `--chunk` tokens vs the same loss on materialised [tokens, V] logits through autograd, one run each.
   Peak memory is the maximum of the "Total Allocated" counter that torch's profiler records at every CPU
   allocation and free (`profile_memory=True`, read from the exported trace): the bytes held by torch
   tensors at the worst moment of forward + backward, above what was live before. It counts every
   allocation through torch's CPU allocator (temporaries inside ops included) and nothing else, so it
   does not depend on how glibc returns freed pages to the OS (RSS does: it over-reports reused heap and
   under-reports short spikes).

Defaults are the target shapes, a Llama-3-8B-sized head: d=4096, V=128256, k=10, |C|=105, 1024 tokens.
The run time is dominated by the (warmup + reps) full and char_kl6 steps and the two regulariser runs, all
[tokens, d] x [d, V] matmuls; `--tokens 256` takes about a quarter (the speed ratios hardly depend on
tokens; the memory ratio is less favourable with fewer tokens). The last stdout line is one JSON object;
`--save` also writes it to bench/results/output_layer.json.

    .venv/bin/python bench/output_layer.py [--tokens 1024] [--warmup 1] [--reps 3] [--chunk 128] [--save]
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import sys
import tempfile
import time
from collections.abc import Callable
from dataclasses import replace
from pathlib import Path

import torch
import torch.nn.functional as F
from torch.profiler import ProfilerActivity, profile

sys.path.insert(0, str(Path(__file__).resolve().parent))

import record

from spellm_ds.config.run import LossConfig
from spellm_ds.train import losses

SIDES = ("char", "char_kl6", "full")


def make_inputs(n: int, d: int, vocab: int, k: int, c: int, seed: int = 0) -> dict[str, torch.Tensor]:
    """Random hidden states, heads, teacher top-5 and an END-padded char table at the given shapes."""
    gen = torch.Generator().manual_seed(seed)
    chars = torch.randint(1, c, (vocab, k), generator=gen)
    lengths = torch.randint(1, k + 1, (vocab,), generator=gen)
    chars[torch.arange(k)[None, :] >= lengths[:, None]] = 0
    ids = torch.randint(0, vocab - 5, (n, 1), generator=gen) + torch.arange(5)  # distinct per row
    lps = torch.rand(n, 6, generator=gen).softmax(-1)[:, :5].log().sort(-1, descending=True).values
    return {
        "hidden": torch.randn(n, d, generator=gen),
        "char_w": torch.randn(k * c, d, generator=gen) * 0.02,
        "lm_w": torch.randn(vocab, d, generator=gen) * 0.02,
        "token_chars": chars,
        "eligible": torch.rand(vocab, generator=gen) > 0.05,
        "topk_ids": ids,
        "topk_logprobs": lps,
        "mask": torch.ones(n, dtype=torch.bool),
    }


def char_step(x: dict[str, torch.Tensor], k: int, c: int, cfg: LossConfig, kl6: bool = False) -> None:
    """Char heads + selection loss (+ kl6 on the frozen lm_head when `kl6`), forward and backward."""
    h = x["hidden"].detach().requires_grad_(True)
    w = x["char_w"].detach().requires_grad_(True)
    logits = (h @ w.t()).view(-1, k, c)
    ids, lps, mask = x["topk_ids"], x["topk_logprobs"], x["mask"]
    out = losses.char_selection_loss(
        logits, ids, lps, mask, x["token_chars"], x["eligible"], selection=cfg.selection, tau=cfg.tau
    )
    loss = out.loss
    if kl6:  # the lm_head stays frozen, as in training: the gradient goes to the hidden states only
        reg = losses.token_regularizer(h, x["lm_w"].detach(), ids, lps, mask, kind="kl6", chunk=cfg.reg_chunk)
        loss = loss + cfg.reg_weight * reg.loss
    loss.backward()


def full_step(x: dict[str, torch.Tensor]) -> None:
    """lm_head + full-vocabulary cross-entropy to the teacher top-1, forward and backward."""
    h = x["hidden"].detach().requires_grad_(True)
    w = x["lm_w"].detach().requires_grad_(True)
    F.cross_entropy(h @ w.t(), x["topk_ids"][:, 0]).backward()


def regularizer_step(x: dict[str, torch.Tensor], chunk: int | None) -> None:
    """kl6 regularizer on the frozen lm_head, forward and backward; chunk None materialises the logits."""
    h = x["hidden"].detach().requires_grad_(True)
    args = (h, x["lm_w"], x["topk_ids"], x["topk_logprobs"], x["mask"])
    out = (
        losses.token_regularizer_dense(*args)
        if chunk is None
        else losses.token_regularizer(*args, chunk=chunk)
    )
    out.loss.backward()


def timed(fn: Callable[[], None]) -> float:
    """Wall seconds of one call."""
    t = time.perf_counter()
    fn()
    return time.perf_counter() - t


def time_sides(steps: dict[str, Callable[[], None]], warmup: int, reps: int) -> dict[str, list[float]]:
    """Wall seconds of `reps` calls of every step after `warmup` untimed ones each, interleaved."""
    names = list(steps)
    for name, _ in record.alternating(names, warmup):
        steps[name]()
    print(f"  warm-up done ({warmup} call(s) per side)", flush=True)
    times: dict[str, list[float]] = {name: [] for name in names}
    for name, i in record.alternating(names, reps):
        times[name].append(timed(steps[name]))
        if all(len(t) == i + 1 for t in times.values()):  # the round is complete
            cells = ", ".join(f"{n} {times[n][-1] * 1e3:.0f} ms" for n in names)
            print(f"  rep {i + 1}/{reps}: {cells}", flush=True)
    return times


def peak_bytes(fn: Callable[[], None]) -> tuple[int, float]:
    """Peak bytes held by torch CPU allocations during `fn` (profiler "Total Allocated"), and its seconds."""
    with profile(activities=[ProfilerActivity.CPU], profile_memory=True) as prof:
        seconds = timed(fn)
    with tempfile.TemporaryDirectory() as tmp:
        path = os.path.join(tmp, "trace.json")
        prof.export_chrome_trace(path)
        with open(path, encoding="utf-8") as f:
            events = json.load(f)["traceEvents"]
    totals = [e["args"]["Total Allocated"] for e in events if e.get("name") == "[memory]"]
    return max([0, *totals]), seconds


def main() -> None:
    """Run both comparisons and print a summary plus one JSON line."""
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--tokens", type=int, default=1024)
    p.add_argument("--d", type=int, default=4096)
    p.add_argument("--vocab", type=int, default=128256)
    p.add_argument("-k", type=int, default=10)
    p.add_argument("--chars", type=int, default=105)
    p.add_argument("--warmup", type=int, default=1, help="untimed calls of every side before the reps")
    p.add_argument("--reps", type=int, default=3, help="timed calls of every side, interleaved")
    p.add_argument(
        "--reg-chunk",
        type=int,
        default=LossConfig().reg_chunk,
        help="tokens per regulariser chunk in the char_kl6 step (loss.reg_chunk)",
    )
    p.add_argument("--chunk", type=int, default=128, help="regularizer tokens per chunk, memory comparison")
    p.add_argument("--skip-memory", action="store_true", help="only the speed comparison")
    record.add_save_flag(p, "output_layer")
    args = p.parse_args()
    if args.reps < 1 or args.warmup < 0:
        p.error("--reps must be >= 1 and --warmup >= 0")
    start = time.perf_counter()
    n, d, vocab, k, c = args.tokens, args.d, args.vocab, args.k, args.chars
    x = make_inputs(n, d, vocab, k, c)
    cfg = replace(LossConfig(), regularizer="kl6", reg_chunk=args.reg_chunk)
    print(
        f"shapes: tokens={n} d={d} V={vocab} k={k} |C|={c}; torch threads={torch.get_num_threads()}",
        flush=True,
    )
    steps = {
        "char": lambda: char_step(x, k, c, cfg),
        "char_kl6": lambda: char_step(x, k, c, cfg, kl6=True),
        "full": lambda: full_step(x),
    }
    times = time_sides(steps, args.warmup, args.reps)
    mins = {s: min(times[s]) for s in SIDES}
    meds = {s: statistics.median(times[s]) for s in SIDES}
    labels = {
        "char": "char heads + selection loss",
        "char_kl6": f"  + kl6 regulariser (chunk {args.reg_chunk})",
        "full": "lm_head + full CE",
    }
    for s in SIDES:
        print(f"{labels[s]:<34} min {mins[s] * 1e3:9.1f} ms  median {meds[s] * 1e3:9.1f} ms")
    ratios = {
        "full_over_char_median": meds["full"] / meds["char"],
        "full_over_char_min": mins["full"] / mins["char"],
        "full_over_char_kl6_median": meds["full"] / meds["char_kl6"],
        "full_over_char_kl6_min": mins["full"] / mins["char_kl6"],
    }
    print(
        f"full / char: {ratios['full_over_char_median']:.1f}x (medians), {ratios['full_over_char_min']:.1f}x "
        f"(mins); full / char+kl6: {ratios['full_over_char_kl6_median']:.2f}x (medians), "
        f"{ratios['full_over_char_kl6_min']:.2f}x (mins); FLOP ratio of the heads {vocab / (k * c):.1f}x",
        flush=True,
    )

    result: dict = {
        "what": "output-layer train step: char heads (with and without kl6) vs full-vocab head; kl6 memory",
        **{key: round(v, 3) for key, v in ratios.items()},
        "flop_ratio": round(vocab / (k * c), 1),
    }
    for s in SIDES:
        result[f"{s}_s_min"] = round(mins[s], 4)
        result[f"{s}_s_median"] = round(meds[s], 4)
    result |= {"warmup": args.warmup, "reps": args.reps, "reg_chunk_tokens": args.reg_chunk}
    result |= {"selection": cfg.selection, "tau": cfg.tau, "reg_weight": cfg.reg_weight}
    if not args.skip_memory:
        chunked, chunked_s = peak_bytes(lambda: regularizer_step(x, args.chunk))
        dense, dense_s = peak_bytes(lambda: regularizer_step(x, None))
        ratio = chunked / dense
        print(
            f"regularizer peak: chunked ({args.chunk} tokens) {chunked / 2**20:.0f} MiB in {chunked_s:.1f} s,"
        )
        print(
            f"                  materialised {dense / 2**20:.0f} MiB in {dense_s:.1f} s -> ratio {ratio:.3f}"
        )
        result |= {
            "regulariser_peak_mem_ratio": round(ratio, 4),
            "regulariser_chunked_peak_mib": round(chunked / 2**20, 1),
            "regulariser_dense_peak_mib": round(dense / 2**20, 1),
            "regulariser_chunk_tokens": args.chunk,
            "regulariser_chunked_s": round(chunked_s, 1),
            "regulariser_dense_s": round(dense_s, 1),
        }
    result |= {"tokens": n, "d": d, "vocab": vocab, "k": k, "chars": c, "threads": torch.get_num_threads()}
    result["wall_s"] = round(time.perf_counter() - start, 1)
    record.save(args.save, result)
    print(json.dumps(result))


if __name__ == "__main__":
    main()
