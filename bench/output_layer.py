"""Output-layer benchmark, CPU fp32, one run: SpeLLM char heads vs the full-vocabulary head.

1. Speed: char heads (one [d, k*|C|] matmul) + the top-5 selection char loss, forward + backward, vs
   lm_head ([d, V] matmul) + full-vocabulary cross-entropy, forward + backward. Both compute the
   gradients of the hidden states and of the head weight (each head trains in its own setting), so the
   FLOP ratio is V / (k*|C|) = 122x at the defaults. Reps of the two alternate so both see the same
   machine load; the median of each is reported.
2. Memory: the token regularizer (kl6, frozen lm_head, gradient to the hidden states) chunked over
   tokens vs the same loss on materialised [tokens, V] logits through autograd. Peak memory is the
   maximum of the "Total Allocated" counter that torch's profiler records at every CPU allocation and
   free (`profile_memory=True`, read from the exported trace): the bytes held by torch tensors at the
   worst moment of forward + backward, above what was live before. It counts every allocation through
   torch's CPU allocator (temporaries inside ops included) and nothing else, so it does not depend on
   how glibc returns freed pages to the OS (RSS does: it over-reports reused heap and under-reports
   short spikes).

Defaults are the target shapes, a Llama-3-8B-sized head: d=4096, V=128256, k=10, |C|=105, 1024 tokens.
One full-vocab step is 3.2 TFLOP (about 75 s at the ~42 GFLOP/s two idle cores give; 138 s on busy ones)
and the two regularizer runs cost about as much again, so the default run takes 3-4 minutes on two idle
cores (7 on busy ones);
`--tokens 256` takes about a quarter (the speed ratio hardly depends on tokens; the memory ratio is less
favourable with fewer tokens), `--full-reps 3` gives a steadier median. The last stdout line is one JSON
object.

    .venv/bin/python bench/output_layer.py [--tokens 1024] [--char-reps 5] [--full-reps 1] [--chunk 128]
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import tempfile
import time
from collections.abc import Callable

import torch
import torch.nn.functional as F
from torch.profiler import ProfilerActivity, profile

from spellm_ds import losses


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


def char_step(x: dict[str, torch.Tensor], k: int, c: int) -> None:
    """Char heads + selection loss, forward and backward (grads of hidden and head weight)."""
    h = x["hidden"].detach().requires_grad_(True)
    w = x["char_w"].detach().requires_grad_(True)
    logits = (h @ w.t()).view(-1, k, c)
    out = losses.char_selection_loss(
        logits, x["topk_ids"], x["topk_logprobs"], x["mask"], x["token_chars"], x["eligible"]
    )
    out.loss.backward()


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
    p.add_argument("--char-reps", type=int, default=5, help="timed char-head reps (after one warm-up)")
    p.add_argument("--full-reps", type=int, default=1, help="timed full-vocab reps (~75 s each at defaults)")
    p.add_argument("--chunk", type=int, default=128, help="regularizer tokens per chunk")
    p.add_argument("--skip-memory", action="store_true", help="only the speed comparison")
    args = p.parse_args()
    start = time.perf_counter()
    n, d, vocab, k, c = args.tokens, args.d, args.vocab, args.k, args.chars
    x = make_inputs(n, d, vocab, k, c)
    print(
        f"shapes: tokens={n} d={d} V={vocab} k={k} |C|={c}; torch threads={torch.get_num_threads()}",
        flush=True,
    )

    char_step(x, k, c)  # warm-up (allocator, thread pool)
    char_t: list[float] = []
    full_t: list[float] = []
    for i in range(max(args.char_reps, args.full_reps)):
        if i < args.char_reps:
            char_t.append(timed(lambda: char_step(x, k, c)))
        if i < args.full_reps:
            full_t.append(timed(lambda: full_step(x)))
            print(f"  full-vocab rep {i + 1}: {full_t[-1]:.1f} s", flush=True)
    char_med, full_med = statistics.median(char_t), statistics.median(full_t)
    speedup = full_med / char_med
    print(f"char heads + selection loss: median {char_med * 1e3:.1f} ms over {len(char_t)} reps")
    print(f"lm_head + full CE:           median {full_med * 1e3:.1f} ms over {len(full_t)} reps")
    print(f"speedup {speedup:.1f}x (FLOP ratio {vocab / (k * c):.1f}x)", flush=True)

    result = {
        "char_vs_full_speedup": round(speedup, 2),
        "char_ms_median": round(char_med * 1e3, 2),
        "full_ms_median": round(full_med * 1e3, 1),
        "char_reps": len(char_t),
        "full_reps": len(full_t),
        "flop_ratio": round(vocab / (k * c), 1),
    }
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
    print(json.dumps(result))


if __name__ == "__main__":
    main()
