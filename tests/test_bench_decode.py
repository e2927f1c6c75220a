"""Pure helpers of the decode benchmark (`bench/decode.py`): the evenly spread fallback schedule of the
rate rows, the model shapes built from config, checked against the published parameter counts, and the
command line (`--save`'s record name, the default fallback rate and where its figure lives).

Run alone: `.venv/bin/python -m pytest tests/test_bench_decode.py -q`
"""

from __future__ import annotations

import importlib.util
import itertools
import json
import math
from fractions import Fraction
from pathlib import Path

import pytest
import torch
from transformers import LlamaConfig, LlamaForCausalLM

_PATH = Path(__file__).resolve().parents[1] / "bench" / "decode.py"
_SPEC = importlib.util.spec_from_file_location("bench_decode", _PATH)
decode = importlib.util.module_from_spec(_SPEC)
_SPEC.loader.exec_module(decode)


def test_fallback_schedule_by_hand():
    # floor(i·0.77) for i = 0..8: 0 0 1 2 3 3 4 5 6, so steps 0 and 4 stay on the char path.
    assert decode.fallback_schedule(8, 0.77) == [False, True, True, True, False, True, True, True]
    assert decode.fallback_schedule(5, 1.0) == [True] * 5
    assert decode.fallback_schedule(5, 0.0) == [False] * 5
    assert decode.fallback_schedule(6, 0.5) == [False, True] * 3


@pytest.mark.parametrize("rate", [0.1, 0.25, 0.29, 0.5, 0.77, 0.9, 0.999])
def test_fallback_schedule_counts_and_spread(rate):
    steps = 200
    sched = decode.fallback_schedule(steps, rate)
    exact = Fraction(str(rate))  # the decimal rate, as the helper reads it
    for m in range(steps + 1):  # every prefix holds floor(m·rate) fallbacks: no drift from float rounding
        assert sum(sched[:m]) == math.floor(m * exact), m
    hits = [i for i, f in enumerate(sched) if f]
    gaps = [b - a for a, b in itertools.pairwise(hits)]
    assert max(gaps) <= math.ceil(1 / rate) and min(gaps) >= math.floor(1 / rate)


def test_fallback_schedule_rejects_rates_outside_0_1():
    for bad in (-0.1, 1.5):
        with pytest.raises(ValueError, match="fallback rate"):
            decode.fallback_schedule(4, bad)


@pytest.mark.parametrize(
    ("shape", "params"), [("llama-3.2-1b", 1_235_814_400), ("smollm2-135m", 134_515_008)]
)
def test_shapes_have_the_published_parameter_counts(shape, params):
    with torch.device("meta"):
        model = LlamaForCausalLM(LlamaConfig(**decode.SHAPES[shape], tie_word_embeddings=True))
    assert sum(p.numel() for p in model.parameters()) == params
    assert model.config.head_dim == 64


def test_save_names_the_record_by_the_part_run():
    assert decode.build_parser().parse_args([]).save is None
    assert decode.build_parser().parse_args(["--save"]).save == "decode"
    full = decode.build_parser(full_model=True).parse_args(["--full-model", "--save"])
    assert full.save == "decode-full-model"
    assert decode.build_parser().parse_args(["--save", "decode-bf16"]).save == "decode-bf16"


def test_default_fallback_rate_is_the_demo_calibration_named_in_the_results():
    assert 0.0 <= decode.DEMO_FALLBACK_RATE <= 1.0
    action = next(a for a in decode.build_parser()._actions if a.dest == "fallback_rate")
    assert action.default == decode.DEMO_FALLBACK_RATE
    assert "docs/RESULTS.md" in action.help and "`demo: fallback_rate`" in action.help
    # The constant is the recorded demo figure itself, so a re-measured demo cannot leave it stale.
    demo = json.loads((_PATH.parent / "results" / "demo.json").read_text())
    assert round(demo["figures"]["fallback_rate"], 3) == decode.DEMO_FALLBACK_RATE
