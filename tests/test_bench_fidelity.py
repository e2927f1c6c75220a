"""Pure helpers of the fidelity benchmark (`bench/fidelity.py`): reading the budget a target needs off a
metric-vs-tokens curve, measured where the curve reaches it and extrapolated (log-linearly) where not,
turning a budget of sequences into each variant's steps at its own batch, and the figures `--save` writes
(each variant keyed by a name the bench has).

Run alone: `.venv/bin/python -m pytest tests/test_bench_fidelity.py -q`
"""

from __future__ import annotations

import importlib.util
import json
from pathlib import Path

import pytest
import yaml

_PATH = Path(__file__).resolve().parents[1] / "bench" / "fidelity.py"
_SPEC = importlib.util.spec_from_file_location("bench_fidelity", _PATH)
fidelity = importlib.util.module_from_spec(_SPEC)
_SPEC.loader.exec_module(fidelity)

KEY = "exact_or_prefix_top5"


def _curve(points: list[tuple[int, float]]) -> list[dict]:
    return [{"tokens": t, KEY: v} for t, v in points]


def test_measured_where_the_curve_reaches_the_target():
    got = fidelity.tokens_to_reach(_curve([(100, 0.5), (200, 0.91), (400, 0.95)]), KEY, 0.9)
    assert got == {"tokens": 200, "how": "measured"}  # the first point at or above it


def test_extrapolated_by_hand():
    # 0.5, 0.6, 0.7 at 2^10, 2^11, 2^12 tokens: +0.1 per doubling, so 0.9 is two doublings past 2^12.
    got = fidelity.tokens_to_reach(_curve([(1024, 0.5), (2048, 0.6), (4096, 0.7)]), KEY, 0.9)
    assert got["tokens"] == pytest.approx(2**14)
    assert got["per_doubling"] == pytest.approx(0.1)
    assert got["how"].startswith("extrapolated")


def test_extrapolation_uses_only_the_last_points():
    # The first point (a fast start) is left out: the last three rise 0.02 per doubling from 0.70 at 2^12.
    pts = [(512, 0.1), (1024, 0.66), (2048, 0.68), (4096, 0.70)]
    got = fidelity.tokens_to_reach(_curve(pts), KEY, 0.8)
    assert got["per_doubling"] == pytest.approx(0.02)
    assert got["tokens"] == pytest.approx(2.0 ** (12 + 0.1 / 0.02))


def test_flat_or_short_curves_give_no_budget():
    flat = fidelity.tokens_to_reach(_curve([(1, 0.7), (2, 0.7), (4, 0.69)]), KEY, 0.9)
    assert flat["tokens"] is None and "not rising" in flat["how"]
    short = fidelity.tokens_to_reach(_curve([(1, 0.7)]), KEY, 0.9)
    assert short["tokens"] is None and "too few" in short["how"]
    missing = fidelity.tokens_to_reach([{"tokens": 1}, {"tokens": 2, KEY: None}], KEY, 0.9)
    assert missing["tokens"] is None


def test_budget_table_has_one_row_per_target():
    curve = [{"tokens": t, KEY: v, f"{KEY}_autocorrect": v + 0.05} for t, v in [(1024, 0.5), (2048, 0.6)]]
    rows = fidelity.budget_table(curve)
    assert [(r["key"], r["target"]) for r in rows] == list(fidelity.TARGETS)
    # The AutoCorrect figure is 0.05 higher on the same slope: 0.976 is (0.976 - 0.65) / 0.1 doublings on.
    assert rows[2]["tokens"] == pytest.approx(2.0 ** (11 + (0.976 - 0.65) / 0.1))


def test_each_batch_trains_the_same_sequences():
    # The demo budget, 640 sequences: 80 steps of 8 or 320 of 2, the warm-up 40 sequences either way.
    assert fidelity.variant_schedule(640, 8) == (80, ["max_steps=80", "schedule.warmup_steps=5"])
    assert fidelity.variant_schedule(640, 2) == (320, ["max_steps=320", "schedule.warmup_steps=20"])
    # The small budget, 48 sequences: the warm-up is at most a fifth of them (9), 1 step of 8 or 4 of 2.
    assert fidelity.variant_schedule(48, 8) == (6, ["max_steps=6", "schedule.warmup_steps=1"])
    assert fidelity.variant_schedule(48, 2) == (24, ["max_steps=24", "schedule.warmup_steps=4"])


def test_a_budget_the_batch_does_not_divide_is_refused():
    with pytest.raises(
        fidelity.SpellmError, match=r"640 training sequences are not a multiple of the batch 3$"
    ):
        fidelity.variant_schedule(640, 3)


def test_a_variant_batch_is_the_run_config_batch_with_its_overrides():
    config = Path(__file__).resolve().parents[1] / "configs" / "demo_cpu.yaml"
    own = yaml.safe_load(config.read_text(encoding="utf-8"))["batch"]["train"]
    assert fidelity.variant_batch(str(config), 2, "recipe") == own
    assert fidelity.variant_batch(str(config), 2, "recipe-batch4") == 4
    assert fidelity.variant_batch(str(config), 2, "recipe-batch8") == 8
    assert fidelity.variant_batch(str(config), 2, "recipe-tau3") == 8  # measured at 8, kept there
    assert fidelity.variant_batch(str(config), 2, "recipe-tau3-batch2") == 2


def test_a_variant_keeps_the_rate_it_was_measured_with():
    # Measured at 2e-3 (the recipe's rate then) or at a rate of their own, whatever the YAML says now.
    config = Path(__file__).resolve().parents[1] / "configs" / "demo_cpu.yaml"
    measured = {
        "recipe-batch8": (0.002, 1.0),
        "recipe-tau3": (0.002, 1.0),
        "recipe-heads5e-3": (0.005, 0.4),
        "recipe-mlp1e-4": (0.002, 0.05),
        "recipe-lr2e-3": (0.002, 1.0),
        "recipe-online-lr2e-3": (0.002, 1.0),
        "recipe-lr8e-3-mlp4e-3": (0.008, 0.5),
        "recipe-N10-batch2": (0.004, 1.0),
        "recipe-tau3-batch2": (0.004, 1.0),
    }
    for name, (lr, mlp_scale) in measured.items():
        optim = fidelity.load_config(str(config), fidelity.VARIANTS[name]).optim
        assert (optim.lr, optim.mlp_lr_scale) == (lr, mlp_scale), name


def test_save_names_the_record_fidelity_unless_told():
    parser = fidelity.build_parser()
    assert parser.parse_args([]).save is None
    assert parser.parse_args(["--save"]).save == "fidelity"
    assert parser.parse_args(["--budget", "demo", "--save", "fidelity-demo-budget"]).save == (
        "fidelity-demo-budget"
    )


def test_saved_figures_key_each_variant_its_curve_and_its_budget():
    curve = [{"step": 40, "tokens": 81920, KEY: 0.5}, {"step": 80, "tokens": 163840, KEY: 0.6}]
    row = {"variant": "recipe", "batch": 2, KEY: 0.6, "curve": curve, "budget": fidelity.budget_table(curve)}
    plain = {"variant": "prior", "batch": 8, KEY: 0.4, "curve": [], "budget": []}
    result = {"bench": "fidelity", "sequences": 640, "variants": [row, plain], "seconds": 1.0}
    figures = fidelity.saved_figures(result, "a test")
    assert list(figures) == ["what", "bench", "sequences", "seconds", "variants"]
    assert figures["what"] == "a test" and list(figures["variants"]) == ["recipe", "prior"]
    recipe = figures["variants"]["recipe"]
    assert recipe[KEY] == 0.6 and "variant" not in recipe
    assert list(recipe["curve"]) == ["82K", "164K"] and recipe["curve"]["164K"]["step"] == 80
    assert list(recipe["budget"]) == [f"{k}>={t}" for k, t in fidelity.TARGETS]
    assert "curve" not in figures["variants"]["prior"] and "budget" not in figures["variants"]["prior"]
    assert result["variants"][0] is row and row["curve"] is curve  # the printed JSON is left as it was


def test_recorded_fidelity_results_name_only_variants_the_bench_has():
    results = Path(__file__).resolve().parents[1] / "bench" / "results"
    for path in sorted(results.glob("fidelity*.json")):
        figures = json.loads(path.read_text(encoding="utf-8"))["figures"]
        unknown = set(figures.get("variants", {})) - set(fidelity.VARIANTS)
        assert not unknown, f"{path.name}: {sorted(unknown)} are no variants of bench/fidelity.py"
