"""Distillation fidelity on held-out shards: what each lever of the recipe buys, on the same teacher.

    .venv/bin/python bench/fidelity.py                   # small budget, 48 sequences, 2 variants: a smoke
                                                         # run whose figures mean little
    .venv/bin/python bench/fidelity.py --budget demo --variants recipe recipe-batch8
                                                         # the demo's budget: 640 sequences of 256 tokens
    .venv/bin/python bench/fidelity.py --sequences 5120 --curve 4   # any budget, metrics at 4 points
    .venv/bin/python bench/fidelity.py --budget demo --sequences 3840 --curve 3 --variants recipe-online
                                                         # the recorded curve, no teacher pass over its data,
                                                         # scored on the demo's 64 held-out sequences
    .venv/bin/python bench/fidelity.py --teacher toy ...       # the self-trained demo teacher

Students distilled from the same teacher (default: SmolLM2-135M, `examples/real_teacher.py`) on the same
shards, through the real pipeline (the `spellm-ds` CLI: 2-rank ZeRO-3 `train` under torchrun, `export`,
`eval --calibrate`). Every variant trains on the same sequences (the budget); its batch sets how many
optimizer steps they make. Variants are run-config overrides on configs/demo_cpu.yaml (see `VARIANTS`).
`recipe`, `recipe-lr*` and `recipe-online*` take its 2 sequences a step, `recipe-batch4` 4; the others
keep the 8 they were measured with, and each keeps the rate it was measured with:

- `prior`: teacher-prior rule, one learning rate for heads and MLPs, zero heads (the recipe before the
  levers); `prior-mlp-lr`: MLPs at 0.05 x the heads' rate; `recipe`: configs/demo_cpu.yaml as it is (adds
  the warm start of the heads); `paper`: the lowest-char-loss rule, one rate; `N0-warm`: heads only;
- `N0`, `N5-lowest`, `N5-prior`, `N1-prior`: N and the selection rule with one rate and zero heads;
- `recipe-mlp1e-4`, `recipe-mlp5e-4`, `recipe-mlp2e-3`: the recipe with the MLPs at 0.05, 0.25 and 1 x the
  heads' 2e-3 (the recipe's own value is 1); `recipe-mlp1e-4-reg1`, `recipe-mlp1e-4-reg20`,
  `recipe-mlp2e-3-reg20`, `recipe-mlp5e-3-reg20`: an MLP rate with the regulariser's weight at 1 or 20
  instead of 5; `recipe-mlp1e-4-lowest`: MLPs at 1e-4 with the lowest-char-loss rule;
  `recipe-heads5e-3`: heads at 5e-3, MLPs at 2e-3; `recipe-N10`: the MLPs of the last 10 layers trained;
  `recipe-lowest`, `recipe-N10-lowest`: the lowest-char-loss rule at the recipe's rates, N = 5 and 10;
  `recipe-tau3`: the teacher prior at tau 3 instead of 10; `recipe-warm64k`: the warm start on 64K positions;
  `recipe-batch4`, `recipe-batch8`: the recipe at 4 or 8 sequences a step instead of 2, so 1/2 or 1/4 the
  steps on the same tokens; `recipe-lr2e-3`, `recipe-lr8e-3`: the recipe (2 a step) with heads and MLPs
  at 2e-3 or 8e-3 instead of 4e-3; `recipe-lr8e-3-mlp4e-3`: heads at 8e-3, MLPs at 4e-3;
  `recipe-N10-batch2`, `recipe-tau3-batch2`: `recipe-N10` and `recipe-tau3` at the recipe's batch and rate;
- `recipe-online`: the recipe with the teacher computed in the training step (`teacher: online`, the
  shards' top-5 ignored), `recipe-online-lr2e-3` the same at 2e-3 and `recipe-online-batch8` at 8
  sequences a step (and 2e-3), as their curves were measured; `recipe-kl_full`: that
  with the `kl_full` regulariser (KL over the teacher's whole distribution) in place of the top-5 `kl6`.

Columns (fractions of held-out positions; definitions in spellm_ds/eval/metrics.py): exact match with one of
the teacher's top-5, exact-or-prefix match (a prefix only where all k characters equal the start of a
candidate longer than k) without and with AutoCorrect (paper: 94.89% / 97.57%), the heads' character
accuracy against the teacher top-1's k symbols, exact match with the teacher's top-1 without fallback
(the char path alone, with AutoCorrect), the approximate fallback head's top-1 accuracy (original lm_head
on the student's hidden state), and for the fallback the export uses (exact: the original tail) the
calibrated entropy threshold, the fallback rate it costs and the top-1 agreement reached with it (target
99%). With `--curve K` each variant also reports the metrics at K
checkpoints against training tokens, and the tokens each target needs (strict top-5 0.90 and 0.95, top-5
with AutoCorrect 0.976): measured where the curve reaches it, else a straight line in log2(tokens) through
its last three points, printed with its slope per doubling. When every variant is online
(`--variants recipe-online`), the training shards are built token-only (`build-shards --no-teacher`), so a
long curve pays no teacher pass over its data. The teacher is prepared first if it is not cached. The last
line is one JSON object with every figure; `--save [NAME]` also writes it to bench/results/NAME.json
(default NAME: fidelity), with each variant's row keyed by its name, for docs/RESULTS.md. The recorded
figures are there: `fidelity-demo-budget` (the variants at `--budget demo`), `fidelity-budget-curve`
(`recipe-online*` on longer budgets), `fidelity-small-budget` (the default run) and `fidelity-toy-teacher`
(the N and selection-rule comparison on the self-trained teacher).
"""

from __future__ import annotations

import argparse
import json
import math
import sys
import time
from dataclasses import replace
from pathlib import Path
from typing import Any

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))

from examples.demo import (  # noqa: E402
    DemoConfig,
    eval_stage,
    export_stage,
    shards_stages,
    teacher_stage,
    train_stage,
)
from examples.pipeline import StageRunner  # noqa: E402
from spellm_ds.config.run import load_config  # noqa: E402
from spellm_ds.errors import SpellmError  # noqa: E402

sys.path.insert(0, str(REPO / "bench"))
import record  # noqa: E402

# Variants as run-config overrides on top of configs/demo_cpu.yaml (whose own settings are the recipe).
# Each variant pins the rate and the batch it was measured with where they differ from the recipe's, so its
# recorded figure reproduces whatever demo_cpu.yaml says later. BATCH8: heads and MLPs at 2e-3, 8 sequences
# a step (the recipe of the first measurements); LR2E3: the 2e-3 of the first runs at 2 a step.
# A variant's figures: docs/RESULTS.md, `fidelity-demo-budget: variants.<name>` (at `--budget demo`),
# `fidelity-budget-curve: variants.<name>` (the recipe-online* curves) and `fidelity-toy-teacher:
# variants.<name>` (N0, N5-lowest, N5-prior, N1-prior on the self-trained teacher).
LR2E3 = "optim.lr=0.002"
LR4E3 = "optim.lr=0.004"  # the recipe's rate since it moved from 2e-3, pinned by the variants measured at it
BATCH8 = [LR2E3, "batch.train=8", "batch.micro=4"]
BASE_RECIPE = ["optim.mlp_lr_scale=1.0", "warm_start.positions=0"]  # one rate, heads start at zero
RECIPE = ["model.trainable_layers=5", "loss.selection=teacher_prior"]  # demo_cpu.yaml as it is
MLP_1E4 = "optim.mlp_lr_scale=0.05"  # the MLPs at 1e-4, the demo's rate before it became the heads' rate
VARIANTS = {
    # The recipe levers, measured on the same teacher, shards and budget:
    "paper": ["model.trainable_layers=5", "loss.selection=lowest", *BASE_RECIPE, *BATCH8],
    "prior": [*RECIPE, *BASE_RECIPE, *BATCH8],
    "prior-mlp-lr": [*RECIPE, "warm_start.positions=0", MLP_1E4, *BATCH8],
    "recipe": [*RECIPE],
    "N0-warm": ["model.trainable_layers=0", "loss.selection=teacher_prior", *BATCH8],
    # The earlier comparison (N and the selection rule, one learning rate, zero heads):
    "N0": ["model.trainable_layers=0", "loss.selection=lowest", *BASE_RECIPE, *BATCH8],
    "N5-lowest": ["model.trainable_layers=5", "loss.selection=lowest", *BASE_RECIPE, *BATCH8],
    "N5-prior": [*RECIPE, *BASE_RECIPE, *BATCH8],
    "N1-prior": ["model.trainable_layers=1", "loss.selection=teacher_prior", *BASE_RECIPE, *BATCH8],
    # The MLPs' rate (demo_cpu.yaml: 1.0 x the heads'), with the regulariser's weight (demo_cpu.yaml: 5)
    # and the selection rule beside the old rate of 1e-4, as those were measured:
    "recipe-mlp1e-4": [*RECIPE, MLP_1E4, *BATCH8],
    "recipe-mlp1e-4-reg1": [*RECIPE, MLP_1E4, "loss.reg_weight=1", *BATCH8],
    "recipe-mlp1e-4-reg20": [*RECIPE, MLP_1E4, "loss.reg_weight=20", *BATCH8],
    "recipe-mlp1e-4-lowest": ["model.trainable_layers=5", "loss.selection=lowest", MLP_1E4, *BATCH8],
    "recipe-mlp5e-4": [*RECIPE, "optim.mlp_lr_scale=0.25", *BATCH8],
    "recipe-mlp2e-3": [*RECIPE, "optim.mlp_lr_scale=1.0", *BATCH8],
    "recipe-mlp2e-3-reg20": [*RECIPE, "optim.mlp_lr_scale=1.0", "loss.reg_weight=20", *BATCH8],
    "recipe-mlp5e-3-reg20": [*RECIPE, "optim.mlp_lr_scale=2.5", "loss.reg_weight=20", *BATCH8],
    # The heads' rate (MLPs kept at 2e-3) and the depth trained (demo_cpu.yaml: the last 5 layers):
    "recipe-heads5e-3": [*RECIPE, *BATCH8, "optim.lr=0.005", "optim.mlp_lr_scale=0.4"],
    "recipe-N10": ["model.trainable_layers=10", "loss.selection=teacher_prior", *BATCH8],
    # The selection rule at the recipe's rates: the paper's lowest-char-loss rule (with N = 5 and 10), and
    # the teacher prior with a smaller tau (closer to the lowest-loss rule; demo_cpu.yaml: tau 10).
    "recipe-lowest": ["model.trainable_layers=5", "loss.selection=lowest", *BATCH8],
    "recipe-tau3": [*RECIPE, "loss.tau=3", *BATCH8],
    "recipe-N10-lowest": ["model.trainable_layers=10", "loss.selection=lowest", *BATCH8],
    # The warm start fitted on twice the positions (demo_cpu.yaml: 32K).
    "recipe-warm64k": [*RECIPE, "warm_start.positions=65536", *BATCH8],
    # Sequences per optimizer step (demo_cpu.yaml: 2) on the same tokens: 4 and 8 take 1/2 and 1/4 the steps.
    "recipe-batch4": [*RECIPE, LR2E3, "batch.train=4", "batch.micro=2"],
    "recipe-batch8": [*RECIPE, *BATCH8],
    # The rate at 2 a step (demo_cpu.yaml: heads and MLPs at 4e-3): 2e-3 and 8e-3 for both, 8e-3 heads with
    # 4e-3 MLPs.
    "recipe-lr2e-3": [*RECIPE, LR2E3],
    "recipe-lr8e-3": [*RECIPE, "optim.lr=0.008"],
    "recipe-lr8e-3-mlp4e-3": [*RECIPE, "optim.lr=0.008", "optim.mlp_lr_scale=0.5"],
    # recipe-N10 and recipe-tau3 (the two levers that gained most strict top-5 at 8 a step, see
    # fidelity-demo-budget: variants.recipe-N10, variants.recipe-tau3) retried at the recipe's 2 a step and
    # 4e-3.
    "recipe-N10-batch2": ["model.trainable_layers=10", "loss.selection=teacher_prior", LR4E3],
    "recipe-tau3-batch2": [*RECIPE, LR4E3, "loss.tau=3"],
    # The teacher computed in the training step (spellm_ds.model.teacher): the recipe with its top-5
    # regulariser (at the recipe's batch, at the earlier 2e-3 and at 8 sequences a step as its curves were
    # measured: fidelity-budget-curve), and with the full-distribution one only the online teacher can give.
    "recipe-online": [*RECIPE, "teacher=online"],
    "recipe-online-lr2e-3": [*RECIPE, LR2E3, "teacher=online"],
    "recipe-online-batch8": [*RECIPE, "teacher=online", *BATCH8],
    "recipe-kl_full": [*RECIPE, "teacher=online", "loss.regularizer=kl_full", *BATCH8],
}
DEFAULT_VARIANTS = ["prior", "recipe"]
# budget: (training sequences per variant, held-out sequences scored). Each variant trains on the same
# sequences; its batch sets how many optimizer steps they make (the demo's: 640 sequences, 320 steps of 2).
BUDGETS = {"small": (48, 16), "demo": (640, 64), "large": (5120, 64)}
WARMUP_SEQUENCES = 40  # the rate's warm-up, in sequences (at most a fifth of the budget)
COLUMNS = (
    ("exact_top5", "exact top5"),
    ("exact_or_prefix_top5", "EoP top5"),
    ("exact_or_prefix_top5_autocorrect", "+AC"),
    ("char_acc", "char acc"),
    ("agreement_top1_no_fallback", "top1 no fb"),
    ("fallback_top1_approximate", "apx head"),
    ("threshold", "thresh"),
    ("fallback_rate", "fb rate"),
    ("agreement_top1_with_fallback", "top1 w/ fb"),
)


def variant_batch(config: str, ranks: int, name: str) -> int:
    """Sequences per optimizer step of variant `name`: the run config's batch with the variant's overrides."""
    return load_config(config, VARIANTS[name]).batch.resolve(ranks)[2]


def variant_schedule(sequences: int, batch: int) -> tuple[int, list[str]]:
    """(optimizer steps, step overrides) that train `sequences` sequences at `batch` sequences a step."""
    if sequences % batch:
        raise SpellmError(f"fidelity: {sequences} training sequences are not a multiple of the batch {batch}")
    steps = sequences // batch
    warmup = min(WARMUP_SEQUENCES, sequences // 5) // batch
    return steps, [f"max_steps={steps}", f"schedule.warmup_steps={warmup}"]


def run_variant(
    runner: StageRunner,
    cfg: DemoConfig,
    name: str,
    teacher: Path,
    shards: dict[str, Path],
    sequences: int,
    curve: int,
) -> dict[str, Any]:
    """Train, export and evaluate one variant; with `curve` > 1 also evaluate intermediate checkpoints."""
    batch = variant_batch(cfg.config, cfg.ranks, name)
    steps, schedule = variant_schedule(sequences, batch)
    points = sorted({max(1, round(steps * (i + 1) / curve)) for i in range(curve)}) if curve > 1 else [steps]
    interval = points[0] if curve > 1 else steps
    root = Path(cfg.out) / "fidelity" / name
    t0 = time.perf_counter()
    run_dir = train_stage(
        runner,
        cfg,
        teacher,
        shards,
        name=f"{name}-train",
        run_dir=root / "train",
        overrides=[
            *VARIANTS[name],
            *schedule,
            f"checkpoint.interval={interval}",
            "checkpoint.keep_latest_k=0",
        ],
    )
    train_seconds = runner.results[f"{name}-train"].seconds
    curve_rows = []
    for step in points:
        tag = f"step_{step:08d}"
        export = export_stage(
            runner,
            cfg,
            run_dir,
            name=f"{name}-export-{step}",
            train_stage=f"{name}-train",
            export=root / f"export-{step}",
            tag=tag,
        )
        metrics = eval_stage(
            runner,
            cfg,
            export,
            shards["heldout"],
            name=f"{name}-eval-{step}",
            export_stage=f"{name}-export-{step}",
            out=root / f"eval-{step}",
            max_samples=cfg.heldout_samples,
        )
        curve_rows.append({"step": step, "tokens": step * batch * cfg.seq_len, **_pick(metrics)})
    return {
        "variant": name,
        "overrides": VARIANTS[name],
        "batch": batch,
        "steps": steps,
        **_pick(metrics),
        "train_seconds": train_seconds,
        "seconds": time.perf_counter() - t0,
        "curve": curve_rows if curve > 1 else [],
        "budget": budget_table(curve_rows) if curve > 1 else [],
    }


# The figures each curve is read against: the demo-budget bar and the paper's two figures.
TARGETS = (
    ("exact_or_prefix_top5", 0.90),
    ("exact_or_prefix_top5", 0.95),
    ("exact_or_prefix_top5_autocorrect", 0.976),
)


def tokens_to_reach(
    curve: list[dict[str, Any]], key: str, target: float, fit_points: int = 3
) -> dict[str, Any]:
    """Training tokens at which `key` reaches `target`: measured on the curve, else extrapolated log-linearly.

    The extrapolation is a least-squares line of the figure against log2(tokens) through the last
    `fit_points` points of the curve; `per_doubling` is its slope. It is a reading aid, not a promise: the
    true curve bends (it saturates near 1, and it steepens once the MLPs reshape the hidden state).
    """
    pts = [(c["tokens"], c[key]) for c in curve if isinstance(c.get(key), int | float)]
    hit = next((t for t, v in pts if v >= target), None)
    if hit is not None:
        return {"tokens": hit, "how": "measured"}
    pts = pts[-fit_points:]
    if len(pts) < 2:
        return {"tokens": None, "how": "too few curve points to extrapolate"}
    xs = [math.log2(t) for t, _ in pts]
    ys = [v for _, v in pts]
    mx, my = sum(xs) / len(xs), sum(ys) / len(ys)
    sxx = sum((x - mx) ** 2 for x in xs)
    slope = sum((x - mx) * (y - my) for x, y in zip(xs, ys, strict=True)) / sxx
    if slope <= 0:
        return {"tokens": None, "how": "not rising over the last points", "per_doubling": slope}
    tokens = 2.0 ** (mx + (target - my) / slope)
    return {
        "tokens": tokens,
        "how": f"extrapolated (log-linear, last {len(pts)} points)",
        "per_doubling": slope,
    }


def budget_table(curve: list[dict[str, Any]]) -> list[dict[str, Any]]:
    """One `tokens_to_reach` row per entry of TARGETS."""
    return [{"key": key, "target": t, **tokens_to_reach(curve, key, t)} for key, t in TARGETS]


def _pick(metrics: dict[str, Any]) -> dict[str, Any]:
    keys = [k for k, _ in COLUMNS] + ["exact_top1", "any_prefix_top5", "target_reached", "positions"]
    return {k: metrics.get(k) for k in keys}


def format_table(rows: list[dict[str, Any]]) -> str:
    """Return the comparison table (one row per variant, then each variant's curve if any)."""
    head = f"{'variant':<18}" + "".join(f"{label:>11}" for _, label in COLUMNS) + f"{'train s':>9}"
    lines = [head, "-" * len(head)]
    for r in rows:
        cells = "".join(f"{_fmt(r.get(k)):>11}" for k, _ in COLUMNS)
        lines.append(f"{r['variant']:<18}{cells}{r['train_seconds']:>9.0f}")
    for r in rows:
        for c in r["curve"]:
            cells = "".join(f"{_fmt(c.get(k)):>11}" for k, _ in COLUMNS)
            lines.append(f"{r['variant'] + ' @' + format(c['tokens'] / 1e6, '.2f') + 'M':<18}{cells}")
    for r in rows:
        for b in r.get("budget", []):
            tokens = "-" if b["tokens"] is None else f"{b['tokens'] / 1e6:,.1f}M tokens"
            slope = f", {b['per_doubling']:+.4f} per doubling" if "per_doubling" in b else ""
            lines.append(f"{r['variant']}: {b['key']} >= {b['target']}: {tokens} ({b['how']}{slope})")
    return "\n".join(lines)


def _fmt(v: Any) -> str:
    return f"{v:.4f}" if isinstance(v, int | float) and not isinstance(v, bool) else "-"


def tokens_label(tokens: int) -> str:
    """A curve point's key: its training tokens in thousands (327,680 -> "328K")."""
    return f"{round(tokens / 1000)}K"


def saved_figures(result: dict[str, Any], what: str) -> dict[str, Any]:
    """The final JSON as a record's figures: `what`, then each variant's row (curve, budget) by name."""
    variants = {}
    for row in result["variants"]:
        entry = {k: v for k, v in row.items() if k not in ("variant", "curve", "budget")}
        if row.get("curve"):
            entry["curve"] = {tokens_label(c["tokens"]): c for c in row["curve"]}
        if row.get("budget"):
            entry["budget"] = {
                f"{b['key']}>={b['target']}": {k: v for k, v in b.items() if k not in ("key", "target")}
                for b in row["budget"]
            }
        variants[row["variant"]] = entry
    return {"what": what, **{k: v for k, v in result.items() if k != "variants"}, "variants": variants}


def build_parser() -> argparse.ArgumentParser:
    """The command line of the fidelity benchmark."""
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--budget", choices=sorted(BUDGETS), default="small")
    p.add_argument(
        "--sequences", type=int, default=None, help="training sequences per variant (overrides --budget)"
    )
    p.add_argument("--heldout-samples", type=int, default=None, help="held-out sequences scored")
    p.add_argument("--curve", type=int, default=1, help="evaluate this many checkpoints per variant")
    p.add_argument("--variants", nargs="+", choices=list(VARIANTS), default=DEFAULT_VARIANTS)
    p.add_argument("--out", default="runs/demo", help="root shared with the demo (teacher and shards)")
    p.add_argument(
        "--teacher",
        choices=["smollm2", "toy"],
        default="smollm2",
        help="smollm2: the real pretrained teacher (default); toy: the self-trained demo teacher",
    )
    p.add_argument("--teacher-arg", action="append", default=[], help="extra flag of the teacher's module")
    p.add_argument("--quiet", action="store_true", help="stage output to the logs only")
    record.add_save_flag(p, "fidelity")
    return p


def main(argv: list[str] | None = None) -> int:
    """Run the chosen variants on one budget and print the table and a final JSON line."""
    p = build_parser()
    args = p.parse_args(argv)
    if args.save and not args.save.replace("-", "").replace("_", "").isalnum():
        p.error(f"--save {args.save!r}: use letters, digits, '-' and '_' only")  # before hours of training
    sequences, held = BUDGETS[args.budget]
    sequences = args.sequences or sequences
    held = args.heldout_samples or held
    tag = "" if (sequences, held) == BUDGETS["demo"] else f"-{sequences}x{held}"  # the demo's are shared
    # Variants that all compute the teacher in the training step need no teacher pass over the train shards.
    online_only = all("teacher=online" in VARIANTS[name] for name in args.variants)
    tag += "-tokens" if online_only else ""
    base = DemoConfig()
    cfg = replace(
        base,
        out=args.out,
        teacher_kind=args.teacher,
        teacher_args=args.teacher_arg,
        train_samples=max(base.samples_per_shard, sequences),
        heldout_samples=held,
        shards_tag=tag,
        overrides=["eval.interval=0"],
        echo=not args.quiet,
    )
    runner = StageRunner(cfg.out, echo=cfg.echo)
    t0 = time.perf_counter()
    try:
        teacher, info, train_in, held_in = teacher_stage(runner, cfg, Path(cfg.out))
        shards = shards_stages(runner, cfg, teacher, info, train_in, held_in, train_no_teacher=online_only)
        rows = [
            run_variant(runner, cfg, name, teacher, shards, sequences, args.curve) for name in args.variants
        ]
    except SpellmError as exc:
        print(f"fidelity: error: {exc}", file=sys.stderr)
        return 2
    print()
    print(
        f"fidelity: teacher {teacher} (held-out ppl {info.get('heldout_ppl', float('nan')):.1f}); "
        f"{sequences} sequences x {cfg.seq_len} tokens = {sequences * cfg.seq_len / 1e6:.2f}M tokens per "
        f"variant; {held} held-out sequences"
    )
    print(format_table(rows))
    result = {
        "bench": "fidelity",
        "teacher": {k: info.get(k) for k in ("path", "heldout_ppl", "params")},
        "sequences": sequences,
        "tokens_per_variant": sequences * cfg.seq_len,
        "heldout_samples": held,
        "variants": rows,
        "seconds": time.perf_counter() - t0,
    }
    names = ", ".join(args.variants) if len(args.variants) <= 4 else f"{len(args.variants)} variants"
    what = f"distillation fidelity, {args.teacher} teacher, {sequences} training sequences each: {names}"
    record.save(args.save, saved_figures(result, what))
    print(json.dumps(result))
    return 0


if __name__ == "__main__":
    sys.exit(main())
