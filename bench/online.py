"""Offline vs online teacher, end to end: the same model, tokens and steps, wall time and fidelity of each.

    .venv/bin/python bench/online.py                                # tiny random teacher, 3 steps
    .venv/bin/python bench/online.py --teacher smollm2 --budget demo  # SmolLM2-135M, 80 steps x 8 x 256
                                                                      # tokens (configs/demo_cpu.yaml)

Offline: `spellm-ds build-shards` runs the teacher over the training tokens, then `spellm-ds train`
(teacher: offline) reads its top-5. Online: `spellm-ds build-shards --no-teacher` writes the same
sequences as token-only shards, then `spellm-ds train` with `teacher=online` computes the teacher's top-5
in the training step. Both train with configs/demo_cpu.yaml's recipe at 8 sequences a step (2-rank ZeRO-3
under torchrun) on the same sequences in the same order, and both are exported and evaluated (`spellm-ds eval
--calibrate`) on the same held-out teacher shards, built once beforehand and not part of either wall
time. A mode's wall time is its shard build + training, every process start included (export and eval
are not timed). `--regularizer kl_full` adds a third mode, online with the full-distribution
regulariser.

Each mode runs `--repeats` times, the modes alternating so that neither always goes first: the modes in
order, then reversed, and so on (offline, online, online, offline, ... at two modes). Per mode the JSON
gives every repeat's times and their min and median; `online_over_offline_wall_median` is the online
mode's median wall time over the offline one's, `..._min` the same from the mins (a ratio below 1: online
is faster end to end). Fidelity comes from every repeat's eval: with the fixed seed the repeats of a mode
should agree exactly, which `fidelity_same_across_repeats` records (the values are given once; when
repeats differ, each repeat's are given too).

Teachers: `tiny` (default: a random 6-layer Llama on a locally trained tokenizer, made in seconds; its
figures only show the mechanics), `toy` (the self-trained demo teacher) and `smollm2` (the real
pretrained SmolLM2-135M, 30 layers, N=5). The last stdout line is one JSON object with every figure;
`--save` also writes it to bench/results/online.json.
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import statistics
import sys
import time
from dataclasses import replace
from pathlib import Path
from typing import Any

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))

from examples.demo import DemoConfig, shards_stage, teacher_stage  # noqa: E402
from examples.pipeline import (  # noqa: E402
    StageRunner,
    run_streaming,
    spellm_cli,
    subprocess_env,
    torchrun,
)
from spellm_ds.errors import SpellmError  # noqa: E402

sys.path.insert(0, str(REPO / "bench"))
import record  # noqa: E402

BATCH = 8  # sequences per optimizer step, set here (configs/demo_cpu.yaml takes 2; the figures took 8)
# budget: (optimizer steps, held-out sequences scored, warm-start positions)
BUDGETS = {"tiny": (3, 8, 2048), "small": (6, 16, 4096), "demo": (80, 64, 32768)}
KEYS = (
    "exact_top5",
    "exact_or_prefix_top5",
    "exact_or_prefix_top5_autocorrect",
    "agreement_top1_no_fallback",
    "fallback_top1_approximate",
    "fallback_rate",
    "agreement_top1_with_fallback",
)


def _tiny_teacher(out: Path) -> tuple[Path, dict[str, Any], list[str], list[str]]:
    """A random tiny Llama on a locally trained tokenizer (cached under `out`), and a docs split."""
    from examples.local_models import make_causal_lm, python_docs_files, train_tokenizer

    files = python_docs_files(limit=120)
    model = out / "tiny_teacher"
    if not (model / "config.json").is_file():
        tok = train_tokenizer(files[:60], out / "tiny_tokenizer", 2048, kind="byte_level")
        make_causal_lm(tok, model, arch="llama")
    half = len(files) * 3 // 4
    return (
        model,
        {"path": str(model), "source": "tiny"},
        [str(f) for f in files[:half]],
        [str(f) for f in files[half:]],
    )


def _run(cmd: list[str], log: Path, env: dict[str, str], echo: bool) -> float:
    t0 = time.perf_counter()
    code = run_streaming(cmd, log, env, echo=echo)
    seconds = time.perf_counter() - t0
    if code != 0:
        tail = log.read_text(errors="replace")[-4000:]
        raise SpellmError(f"{' '.join(cmd[:6])} ... exited {code}; log {log}:\n{tail}")
    return seconds


def _build(
    teacher: Path, inputs: list[str], out: Path, cfg: DemoConfig, n: int, no_teacher: bool
) -> list[str]:
    args = ["build-shards", "--teacher", str(teacher), "--input", *inputs, "--output", str(out)]
    args += ["--seq-len", str(cfg.seq_len), "--samples-per-shard", str(cfg.samples_per_shard)]
    args += ["--batch-size", str(cfg.build_batch), "--max-samples", str(n), "--no-progress"]
    return spellm_cli(*args, *(["--no-teacher"] if no_teacher else []))


def run_mode(
    name: str,
    teacher: Path,
    train_in: list[str],
    held: Path,
    cfg: DemoConfig,
    root: Path,
    overrides: list[str],
    no_teacher: bool,
    echo: bool,
) -> dict[str, Any]:
    """Build this mode's training shards and train (both timed), then export and evaluate (not timed)."""
    work = root / name
    shutil.rmtree(work, ignore_errors=True)
    logs = work / "logs"
    env = subprocess_env()
    train_env = subprocess_env(threads_per_process=max(1, (os.cpu_count() or 2) // cfg.ranks))
    shards = work / "shards"
    build_s = _run(
        _build(teacher, train_in, shards, cfg, cfg.train_samples, no_teacher), logs / "build.log", env, echo
    )
    args = ["-m", "spellm_ds.cli", "train", "--config", cfg.config, f"run_dir={work / 'train'}"]
    args += [
        f"model.path={teacher}",
        f"data.train={shards}",
        f"data.eval={held}",
        f"data.seq_len={cfg.seq_len}",
    ]
    train_s = _run(
        torchrun(cfg.ranks, *args, *cfg.overrides, *overrides), logs / "train.log", train_env, echo
    )
    export = work / "export"
    _run(spellm_cli("export", "--checkpoint", str(work / "train" / "checkpoints"), "--output", str(export)),
         logs / "export.log", env, echo)  # fmt: skip
    result = work / "eval.json"
    eval_args = ["eval", "--model", str(export), "--shards", str(held), "--json", str(result), "--calibrate"]
    _run(spellm_cli(*eval_args, "--max-samples", str(cfg.heldout_samples)), logs / "eval.log", env, echo)
    metrics = json.loads(result.read_text(encoding="utf-8"))
    return {
        "mode": name,
        "build_seconds": build_s,
        "train_seconds": train_s,
        "wall_seconds": build_s + train_s,
        **{k: metrics.get(k) for k in (*KEYS, "positions")},
    }


def summarise(rows: list[dict[str, Any]]) -> dict[str, Any]:
    """One mode's repeats: each repeat's times, their min and median, and its fidelity figures."""
    out: dict[str, Any] = {}
    for key in ("wall", "build", "train"):
        values = [r[f"{key}_seconds"] for r in rows]
        out[f"{key}_s_min"] = round(min(values), 1)
        out[f"{key}_s_median"] = round(statistics.median(values), 1)
        out[f"{key}_s"] = [round(v, 1) for v in values]
    fidelity = {k: rows[0].get(k) for k in (*KEYS, "positions")}
    same = all({k: r.get(k) for k in fidelity} == fidelity for r in rows[1:])
    out["fidelity_same_across_repeats"] = same
    out |= fidelity
    if not same:
        out["fidelity_per_repeat"] = {k: [r.get(k) for r in rows] for k in fidelity}
    return out


def main(argv: list[str] | None = None) -> int:
    """Run offline and online alternately, `--repeats` times each; print a table and a final JSON line."""
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--teacher", choices=["tiny", "toy", "smollm2"], default="tiny")
    p.add_argument("--budget", choices=sorted(BUDGETS), default=None, help="default: small (tiny: tiny)")
    p.add_argument("--steps", type=int, default=None, help="optimizer steps (overrides --budget)")
    p.add_argument("--repeats", type=int, default=2, help="runs of every mode, alternating (default 2)")
    p.add_argument("--out", default="runs/demo", help="root shared with the demo (teacher, held-out shards)")
    p.add_argument("--regularizer", choices=["kl6", "kl_full"], action="append", default=None,
                   help="online regulariser(s) to run (default kl6; repeat for both)")  # fmt: skip
    p.add_argument("--quiet", action="store_true", help="stage output to the logs only")
    record.add_save_flag(p, "online")
    args = p.parse_args(argv)
    if args.repeats < 1:
        p.error("--repeats must be >= 1")
    budget = args.budget or ("tiny" if args.teacher == "tiny" else "small")
    steps, held_n, warm = BUDGETS[budget]
    steps = args.steps or steps
    os.chdir(REPO)
    out = Path(args.out).resolve()
    base = DemoConfig()
    cfg = replace(
        base,
        out=str(out),
        teacher_kind=args.teacher if args.teacher != "tiny" else "toy",
        train_samples=steps * BATCH,
        heldout_samples=held_n,
        shards_tag="" if (steps, held_n) == BUDGETS["demo"][:2] else f"-online-{held_n}",
        overrides=[
            f"max_steps={steps}",
            f"batch.train={BATCH}",
            f"batch.micro={BATCH // base.ranks}",
            "eval.interval=0",
            f"schedule.warmup_steps={min(5, steps // 5)}",
            f"warm_start.positions={warm}",
            f"checkpoint.interval={steps}",
        ],
        echo=not args.quiet,
    )
    if cfg.train_samples < cfg.samples_per_shard:
        cfg = replace(cfg, samples_per_shard=cfg.train_samples)
    runner = StageRunner(cfg.out, echo=cfg.echo)
    t0 = time.perf_counter()
    root = out / "online_bench" / f"{args.teacher}-{steps}"
    regs = args.regularizer or ["kl6"]
    try:
        if args.teacher == "tiny":
            teacher, info, train_in, held_in = _tiny_teacher(out)
            held = out / "shards" / f"tiny-heldout-{held_n}"
            if not (held / "index.json").is_file():
                shutil.rmtree(held, ignore_errors=True)
                _run(
                    _build(teacher, held_in, held, cfg, held_n, False),
                    root / "heldout.log",
                    subprocess_env(),
                    cfg.echo,
                )
        else:
            teacher, info, train_in, held_in = teacher_stage(runner, cfg, out)
            key = info.get("cache_key") or "user"
            held = shards_stage(runner, cfg, f"shards-heldout{cfg.shards_tag}", teacher, key, held_in, held_n)
        modes: dict[str, tuple[list[str], bool]] = {"offline": (["teacher=offline"], False)}
        for reg in regs:
            name = "online" if reg == "kl6" else f"online-{reg}"
            modes[name] = (["teacher=online", f"loss.regularizer={reg}"], True)
        runs: dict[str, list[dict[str, Any]]] = {name: [] for name in modes}
        for name, rep in record.alternating(list(modes), args.repeats):
            over, no_teacher = modes[name]
            print(f"online bench: {name}, repeat {rep + 1}/{args.repeats}", flush=True)
            row = run_mode(name, teacher, train_in, held, cfg, root, over, no_teacher, cfg.echo)
            runs[name].append({**row, "repeat": rep + 1})
    except SpellmError as exc:
        print(f"online bench: error: {exc}", file=sys.stderr)
        return 2
    summary = {name: summarise(rows) for name, rows in runs.items()}
    off_walls = [r["wall_seconds"] for r in runs["offline"]]
    tokens = steps * BATCH * cfg.seq_len
    print()
    print(
        f"online bench: teacher {teacher}; {steps} steps x {BATCH * cfg.seq_len} tokens = {tokens:,} tokens; "
        f"{args.repeats} repeat(s) per mode, alternating"
    )
    head = f"{'mode':<16}{'rep':>4}{'build s':>9}{'train s':>9}{'wall s':>9}" + "".join(
        f"{k[:14]:>16}" for k in KEYS
    )
    print(head)
    print("-" * len(head))
    for name, rows in runs.items():
        for r in rows:
            cells = "".join(f"{r[k]:>16.4f}" if isinstance(r[k], float) else f"{'-':>16}" for k in KEYS)
            times = f"{r['build_seconds']:>9.0f}{r['train_seconds']:>9.0f}{r['wall_seconds']:>9.0f}"
            print(f"{name:<16}{r['repeat']:>4}{times}{cells}")
    print()
    result: dict[str, Any] = {
        "what": "offline vs online teacher: end-to-end wall time (shard build + training) and fidelity",
        "teacher": {k: info.get(k) for k in ("source", "heldout_ppl", "params")}
        | {"path": record.repo_relative(teacher)},
        "budget": budget,
        "steps": steps,
        "tokens": tokens,
        "heldout_samples": held_n,
        "repeats": args.repeats,
    }
    for name, m in summary.items():
        same = "identical" if m["fidelity_same_across_repeats"] else "DIFFERENT"
        print(
            f"{name:<16} wall min {m['wall_s_min']:.0f} s, median {m['wall_s_median']:.0f} s; "
            f"fidelity {same} across repeats"
        )
        if name != "offline":
            walls = [r["wall_seconds"] for r in runs[name]]
            med = statistics.median(walls) / statistics.median(off_walls)
            low = min(walls) / min(off_walls)
            result[f"{name}_over_offline_wall_median"] = round(med, 4)
            result[f"{name}_over_offline_wall_min"] = round(low, 4)
            print(f"{'':<16} {name} / offline wall: {med:.3f} (medians), {low:.3f} (mins)")
    for name, m in summary.items():
        result[f"{name}_exact_or_prefix_top5"] = m["exact_or_prefix_top5"]
    result["modes"] = summary
    result["seconds"] = round(time.perf_counter() - t0, 1)
    record.save(args.save, result)
    print(json.dumps(result))
    return 0


if __name__ == "__main__":
    sys.exit(main())
