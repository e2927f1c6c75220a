"""`make demo`: the whole framework on a real small teacher, end to end, with the paper's metrics.

    python -m examples.demo                       # what `make demo` runs (2 CPU ranks, ~15-20 min warm)
    python -m examples.demo --teacher DIR --train-input 'corpus/*.txt' --heldout-input held.jsonl

Stages (each cached by a hash of its inputs; a rerun skips those whose inputs did not change):

1. teacher          `python -m examples.demo_teacher`: byte-level BPE 8K + a 6-layer Llama trained from
                    scratch on the Python docs (held-out documents kept out); or any HF teacher via --teacher
2. shards-train     `spellm-ds build-shards` on the training documents (teacher top-5 per position)
3. shards-heldout   the same on the held-out documents
4. train            `torchrun --nproc_per_node 2 -m spellm_ds.cli train` (ZeRO-3, gloo, configs/demo_cpu.yaml)
5. export           `spellm-ds export` of the last checkpoint
6. eval             `spellm-ds eval --calibrate` on the held-out shards (writes the fallback threshold)
7. generate         `spellm-ds generate` on held-out prompts, student next to the teacher's greedy text

The report goes to `<out>/report.json` (the eval JSON keys, teacher figures, per-stage wall time and
throughput, training loss first/last, text samples, the TensorBoard command) and a table on the terminal.
"""

from __future__ import annotations

import argparse
import json
import os
import re
import sys
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

from examples.pipeline import (
    REPO,
    SOURCES,
    StageRunner,
    shard_totals,
    source_hash,
    spellm_cli,
    subprocess_env,
    tensorboard_scalars,
    torchrun,
)
from spellm_ds.errors import SpellmError
from spellm_ds.eval.metrics import JSON_KEYS, figure_part

REPORT_NAME = "report.json"
# The project's fidelity targets (the paper, arXiv 2507.16323, reports 94.89% / 97.57% for the first two).
TARGETS = {
    "exact_or_prefix_top5": 0.95,
    "exact_or_prefix_top5_autocorrect": 0.976,
    "agreement_top1_with_fallback": 0.99,
}
# The eval CLI's headline keys, then the ones the report adds: the char path alone and the fallback path
# (of the kind the export uses, and the approximate one: the original head on the student's state).
EVAL_KEYS = (*JSON_KEYS, "agreement_top1_no_fallback", "fallback_top1", "fallback_top1_approximate")


@dataclass(kw_only=True)
class DemoConfig:
    """Sizes and paths of one demo run (defaults: the `make demo` run)."""

    out: str = "runs/demo"  # every artefact and the report go here
    teacher: str | None = None  # any local HF causal LM dir; None uses `teacher_kind`
    teacher_kind: str = "smollm2"  # smollm2: the real pretrained teacher; toy: the self-trained one
    teacher_args: list[str] = field(default_factory=list)  # extra flags of the teacher's examples module
    train_input: list[str] = field(default_factory=list)  # with --teacher: training text (globs)
    heldout_input: list[str] = field(default_factory=list)  # with --teacher: held-out text (globs)
    seq_len: int = 256
    train_samples: int = 640  # sequences of teacher shards for training (one epoch of 80 steps x 8)
    heldout_samples: int = 64
    samples_per_shard: int = 64
    build_batch: int = 16
    ranks: int = 2
    config: str = "configs/demo_cpu.yaml"
    overrides: list[str] = field(default_factory=list)  # extra `key=value` for the run config
    prompts: int = 32  # held-out shard prompts of the generation comparison (report samples only)
    prompt_tokens: int = 48  # ids per shard prompt
    new_tokens: int = 32  # greedy tokens per shard prompt (the text prompts get 48)
    shards_tag: str = ""  # suffix of the shard stages and directories (the bench's own sizes)
    teacher_dir: str | None = None  # where the demo teacher lives (default: <out>/teacher)
    echo: bool = True  # stream each stage's output to the terminal
    eval_start: bool = False  # also export and score step 0 (the warm-started heads) as `start`
    save: str | None = None  # also write the report's figures to bench/results/<save>.json


TEXT_PROMPTS = (
    "The capital of France is",
    "def fibonacci(n):\n",
    "To list every file in the current directory, including hidden ones, run:\n$ ls",
)


def teacher_stage(runner: StageRunner, cfg: DemoConfig, out: Path) -> tuple[Path, dict[str, Any], list, list]:
    """Prepare or reuse the teacher; return (teacher dir, its figures, train inputs, held-out inputs)."""
    if cfg.teacher:
        teacher = Path(cfg.teacher)
        if not (teacher / "config.json").is_file():
            raise SpellmError(f"--teacher {teacher}: not a HF model directory (no config.json)")
        if not cfg.train_input or not cfg.heldout_input:
            raise SpellmError("--teacher needs --train-input and --heldout-input (text, .jsonl or .parquet)")
        return teacher, {"path": str(teacher), "source": "user"}, cfg.train_input, cfg.heldout_input
    if cfg.teacher_kind == "smollm2":
        return _real_teacher_stage(runner, cfg, out)
    if cfg.teacher_kind != "toy":
        raise SpellmError(f"--teacher-kind {cfg.teacher_kind!r} is not smollm2 or toy")
    from examples import demo_teacher
    from examples.demo_teacher import META_NAME

    teacher = Path(cfg.teacher_dir) if cfg.teacher_dir else out / "teacher"
    command = [sys.executable, "-m", "examples.demo_teacher", "--out", str(teacher), *cfg.teacher_args]
    runner.run(
        "teacher",
        inputs={
            "teacher": demo_teacher.cache_key_for_args(cfg.teacher_args),
            "code": source_hash(SOURCES["teacher"]),
        },
        command=command,
        artefact=teacher / META_NAME,
        outputs=[],  # the teacher script keeps its own cache and replaces its directory atomically
        measure=lambda s: _teacher_metrics(teacher),
    )
    meta = json.loads((teacher / META_NAME).read_text(encoding="utf-8"))
    info = {
        "path": str(teacher),
        "source": "examples.demo_teacher",
        "cache_key": meta["cache_key"],
        "params": meta["num_params"],
        "heldout_ppl": meta["heldout_ppl"],
        "heldout_tokens": meta["heldout_tokens"],
        "train_tokens": meta["train_tokens"],
        "train_seconds": meta["train_seconds"],
        "tokens_per_s": meta["tokens_per_s"],
        "config": meta["config"],
    }
    corpus = teacher / "corpus"
    return teacher, info, [str(corpus / "train.jsonl")], [str(corpus / "heldout.jsonl")]


def _real_teacher_stage(
    runner: StageRunner, cfg: DemoConfig, out: Path
) -> tuple[Path, dict[str, Any], list, list]:
    """SmolLM2-135M imported from its GGUF, the Python-docs split and its held-out perplexity."""
    from examples.real_teacher import META_NAME

    root = Path(cfg.teacher_dir) if cfg.teacher_dir else out / "smollm2"
    command = [sys.executable, "-m", "examples.real_teacher", "--out", str(root), *cfg.teacher_args]

    def measure(seconds: float) -> dict[str, Any]:
        meta = json.loads((root / META_NAME).read_text(encoding="utf-8"))
        return {
            "throughput": meta["heldout_tokens"] / seconds,
            "unit": "ppl tok/s",
            "heldout_ppl": meta["heldout_ppl"],
        }

    runner.run(
        "teacher",
        inputs={"args": cfg.teacher_args, "code": source_hash(SOURCES["real_teacher"])},
        command=command,
        artefact=root / META_NAME,
        outputs=[],  # the module keeps its own cache (the GGUF's hash, the corpus, its sizes)
        measure=measure,
    )
    meta = json.loads((root / META_NAME).read_text(encoding="utf-8"))
    info = {
        "path": meta["model"],
        "source": "examples.real_teacher",
        "name": "SmolLM2-135M-Instruct",
        "cache_key": meta["cache_key"],
        "params": meta["num_params"],
        "heldout_ppl": meta["heldout_ppl"],
        "heldout_tokens": meta["heldout_tokens"],
    }
    corpus = root / "corpus"
    return Path(meta["model"]), info, [str(corpus / "train.jsonl")], [str(corpus / "heldout.jsonl")]


def _teacher_metrics(teacher: Path) -> dict[str, Any]:
    meta = json.loads((teacher / "demo_teacher.json").read_text(encoding="utf-8"))
    return {"throughput": meta["tokens_per_s"], "unit": "train tok/s", "heldout_ppl": meta["heldout_ppl"]}


def shards_stage(
    runner: StageRunner,
    cfg: DemoConfig,
    name: str,
    teacher: Path,
    teacher_key: str,
    inputs: list[str],
    n: int,
    no_teacher: bool = False,
) -> Path:
    """Build (or reuse) one shard dataset of at most `n` sequences (token-only with `no_teacher`)."""
    output = Path(cfg.out) / "shards" / name.split("-", 1)[1]  # shards-train-small -> shards/train-small
    args = [
        "build-shards",
        "--teacher",
        str(teacher),
        "--input",
        *inputs,
        "--output",
        str(output),
        "--seq-len",
        str(cfg.seq_len),
        "--samples-per-shard",
        str(cfg.samples_per_shard),
        "--batch-size",
        str(cfg.build_batch),
        "--max-samples",
        str(n),
        *(["--no-teacher"] if no_teacher else []),
    ]
    sizes = [[p, Path(p).stat().st_size] for p in inputs if Path(p).is_file()]

    def measure(seconds: float) -> dict[str, Any]:
        totals = shard_totals(output)
        return {"throughput": totals["tokens"] / seconds, "unit": "tok/s", **totals}

    runner.run(
        name,
        inputs={"args": args, "teacher": teacher_key, "sizes": sizes, "code": source_hash(SOURCES["shards"])},
        command=spellm_cli(*args),
        artefact=output / "index.json",
        outputs=[output],
        measure=measure,
        env=subprocess_env(),
    )
    return output


def train_stage(
    runner: StageRunner,
    cfg: DemoConfig,
    teacher: Path,
    shards: dict[str, Path],
    *,
    name: str = "train",
    run_dir: Path | None = None,
    overrides: list[str] | None = None,
) -> Path:
    """Distil with the real trainer under torchrun (ZeRO-3, `cfg.ranks` CPU ranks); return the run dir."""
    run_dir = run_dir or Path(cfg.out) / "train"
    args = [
        "-m",
        "spellm_ds.cli",
        "train",
        "--config",
        cfg.config,
        f"run_dir={run_dir}",
        f"model.path={teacher}",
        f"data.train={shards['train']}",
        f"data.eval={shards['heldout']}",
        f"data.seq_len={cfg.seq_len}",
        *cfg.overrides,
        *(overrides or []),
    ]
    inputs = {
        "args": args,
        "ranks": cfg.ranks,
        "shards": {n: runner.results[f"shards-{n}{cfg.shards_tag}"].key for n in shards},
        "config": Path(cfg.config).read_text(encoding="utf-8"),
        "code": source_hash(SOURCES["train"]),
        "ds": source_hash(["ds_configs/*.json"]),
    }

    def measure(seconds: float) -> dict[str, Any]:
        log = (runner.dir / f"{name}.log").read_text(errors="replace")
        found = re.findall(r"done: (\d+) steps, (\d+) tokens", log)
        steps, tokens = (int(found[-1][0]), int(found[-1][1])) if found else (0, 0)
        scalars = tensorboard_scalars(run_dir / "tensorboard")
        loss = scalars.get("train/loss", [])
        rates = [v for _, v in scalars.get("throughput/tokens_per_s", [])]
        return {
            "throughput": tokens / seconds,
            "unit": "tok/s (wall, with start-up)",
            "steady_tokens_per_s": sum(rates) / len(rates) if rates else None,
            "steps": steps,
            "tokens": tokens,
            "loss_first": loss[0][1] if loss else None,
            "loss_last": loss[-1][1] if loss else None,
        }

    runner.run(
        name,
        inputs=inputs,
        command=torchrun(cfg.ranks, *args),
        artefact=run_dir / "checkpoints" / "latest",
        outputs=[run_dir],
        measure=measure,
        env=subprocess_env(threads_per_process=max(1, (os.cpu_count() or 2) // cfg.ranks)),
    )
    return run_dir


def export_stage(
    runner: StageRunner,
    cfg: DemoConfig,
    run_dir: Path,
    *,
    name: str = "export",
    train_stage: str = "train",
    export: Path | None = None,
    tag: str | None = None,
) -> Path:
    """Export a checkpoint (the newest, or `tag`) of a training run to an inference directory."""
    export = export or Path(cfg.out) / "export"
    args = ["export", "--checkpoint", str(run_dir / "checkpoints"), "--output", str(export), "--overwrite"]
    args += ["--tag", tag] if tag else []

    def measure(seconds: float) -> dict[str, Any]:
        size = sum(p.stat().st_size for p in export.rglob("*") if p.is_file())
        return {"throughput": size / 1e6 / seconds, "unit": "MB/s", "bytes": size}

    runner.run(
        name,
        inputs={
            "args": args,
            "train": runner.results[train_stage].key,
            "code": source_hash(SOURCES["export"]),
        },
        command=spellm_cli(*args),
        artefact=export / "spellm_config.json",
        outputs=[export],
        measure=measure,
    )
    return export


def eval_stage(
    runner: StageRunner,
    cfg: DemoConfig,
    export: Path,
    heldout: Path,
    *,
    name: str = "eval",
    export_stage: str = "export",
    out: Path | None = None,
    tb_dir: Path | None = None,
    max_samples: int | None = None,
) -> dict[str, Any]:
    """Evaluate on held-out shards, calibrating the fallback threshold into the export; return the JSON."""
    out = out or Path(cfg.out) / "eval"
    result = out / "eval.json"
    args = ["eval", "--model", str(export), "--shards", str(heldout), "--json", str(result), "--calibrate"]
    args += ["--plot", str(out / "threshold.png")]
    args += ["--tb-dir", str(tb_dir)] if tb_dir else []
    args += ["--max-samples", str(max_samples)] if max_samples else []

    def measure(seconds: float) -> dict[str, Any]:
        positions = json.loads(result.read_text(encoding="utf-8")).get("positions")
        return {"throughput": (positions or 0) / seconds, "unit": "positions/s", "positions": positions}

    runner.run(
        name,
        inputs={
            "args": args,
            "export": runner.results[export_stage].key,
            "heldout": runner.results[f"shards-heldout{cfg.shards_tag}"].key,
            "code": source_hash(SOURCES["eval"]),
        },
        command=spellm_cli(*args),
        artefact=result,
        outputs=[out],
        measure=measure,
    )
    return json.loads(result.read_text(encoding="utf-8"))


def compare_stage(
    runner: StageRunner, cfg: DemoConfig, export: Path, teacher: Path, heldout: Path
) -> dict[str, Any]:
    """Teacher vs student greedy generation (`spellm-ds compare`): shard prompts and the text prompts."""
    result = Path(cfg.out) / "compare" / "compare.json"
    args = ["compare", "--model", str(export), "--teacher", str(teacher), "--shards", str(heldout)]
    args += ["--prompts", str(cfg.prompts), "--prompt-tokens", str(cfg.prompt_tokens)]
    args += ["--new-tokens", str(cfg.new_tokens), "--json", str(result)]
    args += [a for p in TEXT_PROMPTS for a in ("--text", p)]

    def measure(seconds: float) -> dict[str, Any]:
        res = json.loads(result.read_text(encoding="utf-8"))
        tokens = sum(s["counters"]["tokens"] for s in res["settings"].values())
        return {"throughput": tokens / seconds, "unit": "student tok/s (wall, with both models)"}

    runner.run(
        "compare",
        inputs={
            "args": args,
            "export": runner.results["export"].key,
            "eval": runner.results["eval"].key,
            "code": source_hash(SOURCES["generate"]),
        },
        command=spellm_cli(*args),
        artefact=result,
        outputs=[result.parent],
        measure=measure,
    )
    return json.loads(result.read_text(encoding="utf-8"))


def run_demo(cfg: DemoConfig) -> dict[str, Any]:
    """Run every stage (reusing cached ones), write `<out>/report.json` and return the report."""
    t0 = time.perf_counter()
    out = Path(cfg.out)
    out.mkdir(parents=True, exist_ok=True)
    runner = StageRunner(out, echo=cfg.echo)
    teacher, teacher_info, train_in, held_in = teacher_stage(runner, cfg, out)
    shards = shards_stages(runner, cfg, teacher, teacher_info, train_in, held_in)
    start_overrides = (
        ["checkpoint.save_at_start=true", "checkpoint.keep_latest_k=0"] if cfg.eval_start else []
    )
    run_dir = train_stage(runner, cfg, teacher, shards, overrides=start_overrides)
    export = export_stage(runner, cfg, run_dir)
    # A run of its own inside the training logdir: the trainer writes eval/* at the same step.
    metrics = eval_stage(
        runner, cfg, export, shards["heldout"], tb_dir=run_dir / "tensorboard" / "export-eval"
    )
    start = None
    if cfg.eval_start:
        first = export_stage(
            runner, cfg, run_dir, name="export-start", export=out / "export-start", tag="step_00000000"
        )
        start = eval_stage(
            runner,
            cfg,
            first,
            shards["heldout"],
            name="eval-start",
            export_stage="export-start",
            out=out / "eval-start",
        )
    generation = compare_stage(runner, cfg, export, teacher, shards["heldout"])
    report = build_report(cfg, runner, teacher_info, metrics, generation, run_dir, time.perf_counter() - t0)
    if start is not None:
        report["start"] = {k: start.get(k) for k in EVAL_KEYS}
    (out / REPORT_NAME).write_text(json.dumps(report, indent=1) + "\n", encoding="utf-8")
    return report


def shards_stages(
    runner: StageRunner,
    cfg: DemoConfig,
    teacher: Path,
    teacher_info: dict[str, Any],
    train_in: list[str],
    held_in: list[str],
    train_no_teacher: bool = False,
) -> dict[str, Path]:
    """Build (or reuse) the train and held-out shards (the train ones token-only for online runs)."""
    key = teacher_info.get("cache_key") or _dir_key(teacher)
    return {
        "train": shards_stage(
            runner,
            cfg,
            f"shards-train{cfg.shards_tag}",
            teacher,
            key,
            train_in,
            cfg.train_samples,
            no_teacher=train_no_teacher,
        ),
        "heldout": shards_stage(
            runner, cfg, f"shards-heldout{cfg.shards_tag}", teacher, key, held_in, cfg.heldout_samples
        ),
    }


def _dir_key(path: Path) -> str:
    from spellm_ds.fingerprint import weights_hash

    return weights_hash(path)[:16]


def build_report(
    cfg: DemoConfig,
    runner: StageRunner,
    teacher: dict[str, Any],
    metrics: dict[str, Any],
    generation: dict[str, Any],
    run_dir: Path,
    seconds: float,
) -> dict[str, Any]:
    """Assemble the report: eval keys at the top level, then teacher, stages, generation, TensorBoard."""
    tb = run_dir / "tensorboard"
    report: dict[str, Any] = {k: metrics.get(k) for k in EVAL_KEYS}
    report.update(
        calibration_positions=metrics.get("calibration_positions"),
        report_positions=metrics.get("report_positions"),
        eval=metrics,
        targets={
            k: {"target": v, "value": metrics.get(k), "met": _met(metrics.get(k), v)}
            for k, v in TARGETS.items()
        },
        teacher=teacher,
        stages={name: asdict(r) for name, r in runner.results.items()},
        generation={k: v for k, v in generation.items() if k != "samples"},
        samples=generation["samples"],
        tensorboard={"logdir": str(tb), "command": f"tensorboard --logdir {tb}"},
        config=asdict(cfg),
        total_seconds=seconds,
    )
    return report


def report_figures(report: dict[str, Any]) -> dict[str, Any]:
    """The figures of a report worth keeping as a result: eval keys, their parts, generation, stage times."""
    ev = report["eval"]
    keys = (
        *EVAL_KEYS,
        "exact_top1_autocorrect",
        "exact_or_prefix_top5_with_fallback",
        "auroc_entropy_error_top1",
        "threshold_approximate",
        "fallback_rate_approximate",
        "agreement_top1_with_fallback_approximate",
        "target_reached",
        "positions",
        "calibration_positions",
        "report_positions",
    )
    figures: dict[str, Any] = {
        "what": "make demo: SmolLM2-135M distilled on 2 CPU ranks, held-out figures",
        **{k: ev.get(k) for k in keys if k in ev},
        "calibration_part": ev.get("calibration_part"),
    }
    t = report["teacher"]
    figures["teacher"] = {k: t[k] for k in ("name", "params", "heldout_ppl", "heldout_tokens") if k in t}
    gen = report["generation"]
    figures["generation"] = {
        "prompts": next(iter(gen["settings"].values()))["prompts"] if gen.get("settings") else 0,
        "prompt_tokens": gen.get("prompt_tokens"),
        "new_tokens": gen.get("new_tokens"),
        "prompt_samples": gen.get("prompt_samples"),
        **{
            name: {k: s[k] for k in ("agreement_tokens_mean", "agreement_share", "full_match")}
            for name, s in gen.get("settings", {}).items()
        },
    }
    figures["stages_seconds"] = {name: round(st["seconds"], 1) for name, st in report["stages"].items()}
    train = report["stages"].get("train", {}).get("metrics", {})
    figures["train"] = {k: train[k] for k in ("steps", "tokens") if k in train}
    if report.get("start"):
        figures["start"] = report["start"]
    return figures


def _met(value: Any, target: float) -> bool | None:
    return None if not isinstance(value, int | float) else value >= target


def format_report(report: dict[str, Any]) -> str:
    """Return the short terminal summary of a report."""
    lines = ["", "=" * 78, "spellm-ds demo report", "=" * 78]
    t = report["teacher"]
    if "heldout_ppl" in t:
        trained = (
            f", trained here: {t['tokens_per_s']:,.0f} tok/s, {t['train_seconds']:.0f} s"
            if "train_seconds" in t
            else ""
        )
        lines.append(
            f"teacher: {t.get('name', t['path'])}, {t['params'] / 1e6:.1f}M params, held-out ppl "
            f"{t['heldout_ppl']:.2f} over {t['heldout_tokens']:,} tokens{trained}"
        )
    lines.append(f"{'stage':<16}{'cached':>7}{'seconds':>9}  throughput")
    for name, st in report["stages"].items():
        m = st["metrics"]
        rate = (
            f"{m['throughput']:,.1f} {m.get('unit', '')}"
            if isinstance(m.get("throughput"), int | float)
            else ""
        )
        lines.append(f"{name:<16}{'yes' if st['cached'] else 'no':>7}{st['seconds']:>9.0f}  {rate}")
    lines.append("")
    lines.append(
        f"held-out positions: the threshold is chosen on {report.get('calibration_positions')} "
        f"(calibration), the figures marked [report] are read on the other {report.get('report_positions')}"
    )
    start = report.get("start") or {}
    lines.append(f"{'metric (held-out)':<36}{'value':>9}{'target':>9}{'step 0' if start else '':>9}  part")
    for key in EVAL_KEYS:
        value = report.get(key)
        target = TARGETS.get(key)
        shown = f"{value:.4f}" if isinstance(value, int | float) else "-"
        first = start.get(key)
        first_shown = f"{first:.4f}" if isinstance(first, int | float) else ""
        lines.append(
            f"{key:<36}{shown:>9}{(f'{target:.3f}' if target else ''):>9}{first_shown:>9}  "
            f"[{figure_part(key)}]"
        )
    gen = report["generation"]
    lines.append("")
    lines.append(
        f"greedy generation vs the teacher, {gen.get('prompt_tokens')}-token held-out prompts, "
        f"{gen['new_tokens']} new tokens:"
    )
    for name, s in gen["settings"].items():
        lines.append(
            f"  {name:<14} agreement before the first divergence {s['agreement_tokens_mean']:5.1f} tokens "
            f"({100 * s['agreement_share']:.1f}% of generated), "
            f"whole continuation equal {100 * s['full_match']:.0f}%"
        )
    for s in report["samples"]:
        lines += ["", f"prompt : {s['prompt']!r}", f"teacher: {s['teacher']!r}"]
        lines += [f"student: {s['with_fallback']!r}", f"  (no fallback: {s['no_fallback']!r})"]
    lines += [
        "",
        f"report: {report['config']['out']}/{REPORT_NAME}",
        f"TensorBoard: {report['tensorboard']['command']}",
    ]
    lines.append(f"total {report['total_seconds']:.0f} s")
    return "\n".join(lines)


def _parse_args(argv: list[str] | None) -> DemoConfig:
    """Parse the command line into a DemoConfig."""
    d = DemoConfig()
    p = argparse.ArgumentParser(prog="python -m examples.demo", description=__doc__.split("\n")[0])
    p.add_argument("--out", default=d.out)
    p.add_argument("--teacher", default=None, help="use this HF teacher dir instead of the demo teacher")
    p.add_argument(
        "--teacher-kind",
        default=d.teacher_kind,
        choices=["smollm2", "toy"],
        help="smollm2: the real pretrained teacher (default); toy: the self-trained small Llama",
    )
    p.add_argument("--teacher-arg", action="append", default=[], help="extra flag of the teacher's module")
    p.add_argument("--train-input", nargs="+", default=[], help="with --teacher: training text files/globs")
    p.add_argument("--heldout-input", nargs="+", default=[], help="with --teacher: held-out text files/globs")
    for name in ("seq_len", "train_samples", "heldout_samples", "samples_per_shard", "build_batch", "ranks"):
        p.add_argument(f"--{name.replace('_', '-')}", type=int, default=getattr(d, name))
    p.add_argument("--prompts", type=int, default=d.prompts, help="held-out prompts for the comparison")
    p.add_argument("--prompt-tokens", type=int, default=d.prompt_tokens)
    p.add_argument("--new-tokens", type=int, default=d.new_tokens)
    p.add_argument("--config", default=d.config, help="run config YAML for the training stage")
    p.add_argument(
        "--save",
        nargs="?",
        const="demo",
        default=None,
        metavar="NAME",
        help="also write the report's figures to bench/results/NAME.json (default NAME: demo)",
    )
    p.add_argument(
        "--eval-start",
        action="store_true",
        help="also export and score step 0 (the warm-started heads), reported as `start`",
    )
    p.add_argument(
        "overrides", nargs="*", metavar="KEY=VALUE", help="run config overrides (e.g. max_steps=100)"
    )
    a = p.parse_args(argv)
    return DemoConfig(
        out=a.out,
        teacher=a.teacher,
        teacher_kind=a.teacher_kind,
        teacher_args=list(a.teacher_arg),
        train_input=a.train_input,
        heldout_input=a.heldout_input,
        seq_len=a.seq_len,
        train_samples=a.train_samples,
        heldout_samples=a.heldout_samples,
        samples_per_shard=a.samples_per_shard,
        build_batch=a.build_batch,
        ranks=a.ranks,
        config=a.config,
        overrides=a.overrides,
        prompts=a.prompts,
        prompt_tokens=a.prompt_tokens,
        new_tokens=a.new_tokens,
        eval_start=a.eval_start,
        save=a.save,
    )


def main(argv: list[str] | None = None) -> int:
    """Run the demo; print the report table. A failed stage prints its log tail and exits 2."""
    cfg = _parse_args(argv)
    if Path.cwd().resolve() != REPO:
        # Stage commands run from the repository root: make the caller's relative paths absolute first.
        cfg.out = os.path.abspath(cfg.out)
        cfg.config = os.path.abspath(cfg.config)
        cfg.teacher = os.path.abspath(cfg.teacher) if cfg.teacher else None
        cfg.train_input = [os.path.abspath(p) for p in cfg.train_input]
        cfg.heldout_input = [os.path.abspath(p) for p in cfg.heldout_input]
        os.chdir(REPO)
    try:
        report = run_demo(cfg)
    except SpellmError as exc:
        print(f"demo: error: {exc}", file=sys.stderr)
        return 2
    print(format_report(report))
    if cfg.save:
        from bench import record

        args = " ".join(argv if argv is not None else sys.argv[1:])
        record.save(cfg.save, report_figures(report), command=f"make demo DEMO_ARGS='{args}'")
    return 0


if __name__ == "__main__":
    sys.exit(main())
