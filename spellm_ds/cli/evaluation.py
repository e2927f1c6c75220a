"""Subcommands that measure an export against its teacher: eval, compare, lm-eval-local."""

from __future__ import annotations

import argparse

from spellm_ds.cli.args import add_device_option, add_export_options
from spellm_ds.dist import default_device
from spellm_ds.errors import SpellmError


# --- eval ---
def _add_eval(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser(
        "eval",
        help="intrinsic metrics of a SpeLLM export on held-out shards; threshold calibration",
        description="Exact and exact-or-truncation-prefix match against the teacher's top-1/top-5 with and "
        "without AutoCorrect, char accuracy per head and by token length, accuracy by entropy, the fallback "
        "threshold that reaches a target top-1 agreement, the fallback path's accuracy, AUROC of entropy as "
        "an error predictor.",
    )
    add_export_options(p, remote_code=True)
    p.add_argument("--shards", required=True, metavar="DIR", help="held-out teacher-shard directory")
    p.add_argument("--json", default=None, metavar="OUT", help="write the metrics JSON here")
    p.add_argument("--plot", default=None, metavar="PNG", help="plot path (default: beside --json)")
    p.add_argument("--calibrate", action="store_true", help="write the threshold into spellm_config.json")
    p.add_argument("--tb-dir", default=None, metavar="DIR", help="also write TensorBoard scalars here")
    p.add_argument("--target", type=float, default=0.99, help="top-1 agreement to reach (default 0.99)")
    p.add_argument(
        "--calibration-fraction",
        type=float,
        default=0.5,
        help="share of the held-out samples that choose the threshold; its figures are read on the others "
        "(default 0.5)",
    )
    p.add_argument("--batch-size", type=int, default=4)
    p.add_argument("--max-samples", type=int, default=None)
    p.add_argument(
        "--fallback",
        default=None,
        choices=["exact", "approximate"],
        help="fallback kind to evaluate and calibrate (default: the one the export loads with, exact where "
        "it holds the original MLPs); the approximate figures are always reported too",
    )
    add_device_option(p)
    p.set_defaults(func=_run_eval)


def _run_eval(args: argparse.Namespace) -> int:
    from spellm_ds.eval.evaluate import evaluate
    from spellm_ds.eval.metrics import JSON_KEYS, figure_part

    res = evaluate(
        args.model,
        args.shards,
        json_out=args.json,
        plot=args.plot,
        tb_dir=args.tb_dir,
        calibrate=args.calibrate,
        target=args.target,
        batch_size=args.batch_size,
        max_samples=args.max_samples,
        device=default_device(args.device),
        base_model=args.base_model,
        trust_remote_code=args.trust_remote_code,
        fallback=args.fallback,
        calibration_fraction=args.calibration_fraction,
    )
    print(
        f"positions {res['positions']} ({res['samples']} samples), {res['fallback']} fallback; thresholds "
        f"chosen on {res['calibration_positions']} calibration positions, read on the other "
        f"{res['report_positions']} (report)"
    )
    keys = (*JSON_KEYS, "exact_top1_autocorrect", "fallback_top1", "auroc_entropy_error_top1")
    if res["fallback"] != "approximate":
        keys += (
            "fallback_top1_approximate",
            "threshold_approximate",
            "fallback_rate_approximate",
            "agreement_top1_with_fallback_approximate",
        )
    for key in keys:
        val = res[key]
        print(f"  {key:<42} {'n/a' if val is None else f'{val:.4f}':>8}  [{figure_part(key)}]")
    reached = "reached" if res["target_reached"] else "NOT reached"
    print(f"  target top-1 agreement {res['target']} {reached} on the report part; plot {res['plot']}")
    if args.calibrate:
        rate = 100 * res["fallback_rate"]
        print(
            f"  threshold {res['threshold']:.4g} ({res['fallback']} fallback, {rate:.1f}% of report "
            f"positions fall back) written to {args.model}/spellm_config.json"
        )
    return 0


# --- compare ---
def _add_compare(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser(
        "compare",
        help="greedy generation of a SpeLLM export next to its teacher's",
        description="Greedy continuations of held-out shard prompts by the teacher and by the student "
        "(without and with fallback): agreement before the first divergence; text prompts side by side.",
    )
    add_export_options(p)
    p.add_argument("--teacher", required=True, metavar="DIR", help="the teacher's HF directory")
    p.add_argument(
        "--shards", default=None, metavar="DIR", help="held-out shards: prompts are sample prefixes"
    )
    p.add_argument("--prompts", type=int, default=64, help="shard prompts (default 64)")
    p.add_argument("--prompt-tokens", type=int, default=48, help="ids per shard prompt (default 48)")
    p.add_argument("--new-tokens", type=int, default=32, help="greedy tokens per shard prompt (default 32)")
    p.add_argument("--text", action="append", default=[], help="a text prompt shown in full (repeatable)")
    p.add_argument("--text-tokens", type=int, default=48, help="greedy tokens per text prompt (default 48)")
    p.add_argument("--batch-size", type=int, default=16)
    add_device_option(p)
    p.add_argument("--json", default=None, metavar="OUT", help="also write the result JSON here")
    p.set_defaults(func=_run_compare)


def _run_compare(args: argparse.Namespace) -> int:
    from pathlib import Path

    from spellm_ds.eval.compare import compare_generation

    for name in ("prompts", "prompt_tokens", "new_tokens", "text_tokens", "batch_size"):
        if getattr(args, name) < 1:
            raise SpellmError(f"--{name.replace('_', '-')} must be >= 1, got {getattr(args, name)}")
    res = compare_generation(
        args.model,
        args.teacher,
        shards=args.shards,
        prompts=args.prompts,
        prompt_tokens=args.prompt_tokens,
        new_tokens=args.new_tokens,
        texts=args.text,
        text_tokens=args.text_tokens,
        batch_size=args.batch_size,
        device=default_device(args.device),
        base_model=args.base_model,
    )
    for name, s in res["settings"].items():
        print(
            f"{name:<14} agreement before divergence {s['agreement_tokens_mean']:.1f} of {res['new_tokens']} "
            f"tokens ({100 * s['agreement_share']:.1f}% of generated), "
            f"full match {100 * s['full_match']:.1f}%"
        )
    for row in res["samples"]:
        print(f"\nprompt : {row['prompt']!r}\nteacher: {row['teacher']!r}")
        print(f"student: {row['with_fallback']!r}\n  (no fallback: {row['no_fallback']!r})")
    if args.json:
        from spellm_ds.jsonio import write_json

        Path(args.json).parent.mkdir(parents=True, exist_ok=True)
        write_json(args.json, res, indent=1, sort_keys=False)
    return 0


# --- lm-eval-local ---
def _add_lm_eval_local(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser(
        "lm-eval-local",
        help="lm-evaluation-harness tasks from a local directory on a SpeLLM export, offline",
        description="Run lm-eval's simple_evaluate with the `spellm` model (spellm_ds.eval.harness) on task "
        "YAMLs of a local directory whose data paths are relative to each YAML; needs the `eval` extra. "
        "Prints the results table and the share of positions taken by each path.",
    )
    add_export_options(p, base_model=False)
    p.add_argument("--tasks-dir", required=True, metavar="D", help="directory of task YAMLs and their data")
    p.add_argument("--tasks", required=True, help="comma-separated task names")
    p.add_argument(
        "--model-args",
        default="",
        metavar="K=V,...",
        help="fallback=exact|approximate, threshold=FLOAT|default|none, base_model=DIR, dtype=..., "
        "stop_check_tokens=N (see spellm_ds/eval/harness.py)",
    )
    p.add_argument("--output", default=None, metavar="JSON", help="write the results and counters here")
    p.add_argument("--limit", type=float, default=None, help="documents per task (a fraction when < 1)")
    p.add_argument("--batch-size", default="1", help="an integer, or auto")
    add_device_option(p)
    p.add_argument("--seed", type=int, default=0, help="seed of sampling and few-shot selection")
    p.add_argument("--log-samples", action="store_true", help="keep per-document samples in --output")
    p.set_defaults(func=_run_lm_eval_local)


def _run_lm_eval_local(args: argparse.Namespace) -> int:
    try:
        from spellm_ds.eval.local_run import evaluate_local
    except ImportError as exc:
        raise SpellmError(f"{exc}") from None
    from lm_eval.utils import make_table

    tasks = [t.strip() for t in args.tasks.split(",") if t.strip()]
    limit = None if args.limit is None else (int(args.limit) if args.limit >= 1 else args.limit)
    batch = int(args.batch_size) if args.batch_size.isdigit() else args.batch_size
    res = evaluate_local(
        args.model,
        args.tasks_dir,
        tasks,
        model_args=args.model_args,
        output=args.output,
        limit=limit,
        batch_size=batch,
        device=default_device(args.device),
        log_samples=args.log_samples,
        seed=args.seed,
    )
    print(make_table(res))
    info = res.get("spellm", {})
    for kind, c in info.get("counters", {}).items():
        if c["positions"]:
            shares = ", ".join(f"{n} {100 * r:.1f}%" for n, r in info["rates"][kind].items())
            print(f"{kind}: {c['positions']} positions: {shares}")
    return 0


def register(sub: argparse._SubParsersAction) -> None:
    """Add this module's subcommands to `sub`."""
    _add_eval(sub)
    _add_compare(sub)
    _add_lm_eval_local(sub)
