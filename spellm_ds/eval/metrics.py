"""Fidelity metrics of the char heads against the teacher's top-5, and entropy-threshold calibration.

Pure functions on arrays (no model): `spellm_ds.eval.evaluate` computes the per-position cases and calls
these; `bench/fidelity.py` and the demo read the same keys.

Every masked-in position t of every sample is one case: the student's char heads at t against the
teacher's top-5 for token t+1 (index 0 is the teacher's top-1; shards store them sorted). Definitions:

- decoded token: the heads' argmax string (read up to its first `<end>`) looked up exactly
  (`TokenLookup.lookup`); no token when the string is none. With AutoCorrect: the decoded token, or the
  AutoCorrect token (best decodable token under the heads' log-probs) where the string is no token.
- `exact_top1` / `exact_top5`: the decoded token is the teacher's top-1 / one of its top-5.
- `exact_or_prefix_top5` (the headline, strict): exact, or a truncation prefix of one of the top-5: the
  predicted string has all k characters and equals the first k characters of a candidate spelled longer
  than k (the only prefix k heads can be asked for; such a candidate counts even when another token with the
  same first k characters shadows it in the lookup). `exact_or_prefix_top1` is the same against the top-1.
- `any_prefix_top5` (lenient, reported under this name only): a strict match, or the predicted string up
  to its first `<end>` is non-empty and starts a decodable candidate's string. One common character (" ")
  starts most candidates, so it rewards short guesses; an empty string never matches.
  The `_autocorrect` variants use the AutoCorrect token's own row as the predicted string.
- `char_acc_per_head[i]`: head i's argmax symbol equals symbol i of the teacher top-1's row (positions
  whose top-1 is decodable); `char_acc` is their mean: the heads' agreement with the teacher top-1's k
  symbols, independent of token boundaries.
- fallback path, of the kind the export uses at inference (`fallback`: "exact" where the export holds
  the original weights of its trained MLPs, else "approximate"; `--fallback` chooses):
  exact: the original model's argmax (the original tail run over the whole sequence in one pass, see
  `inference.fallback`), i.e. the teacher's own prediction; approximate: the original lm_head's argmax
  on the student's final hidden state. `fallback_top1` / `fallback_top5` = its agreement with the
  teacher's top-1 / membership in the top-5, over all positions. On shards whose teacher is the base
  model itself, the exact `fallback_top1` is 1 up to ties.
- mean head entropy H (nats) per position. At threshold τ a position uses the char path with
  AutoCorrect when H ≤ τ and the fallback when H > τ (as `SpeLLMForCausalLM.decode_step` does).
  `threshold` is the largest τ whose top-1 agreement reaches `target` (i.e. the lowest fallback rate);
  when no τ reaches it, the τ of the highest agreement (`target_reached: false`). Negative τ means
  "always fall back". `fallback_rate` and `agreement_top1_with_fallback` are at that τ; all of these use
  the `fallback` kind.
- calibration split (`summarize(..., calibration=mask)`, what `spellm_ds.eval.evaluate` always does): τ is
  chosen on the `calibration_positions` alone, and `fallback_rate`, `agreement_top1_with_fallback`,
  `target_reached` and `exact_or_prefix_top5_with_fallback` are read on the other `report_positions`, so
  they measure positions the choice never saw; `calibration_part` holds the same figures in-sample, for
  comparison. The figures that do not depend on τ use all positions. Without a mask both parts are
  all positions (in-sample). `calibration_samples` splits samples evenly by their order.
- the approximate fallback always, beside them: `fallback_top1_approximate`, `fallback_top5_approximate`,
  `threshold_approximate`, `fallback_rate_approximate`, `agreement_top1_with_fallback_approximate`,
  `target_reached_approximate`, `exact_or_prefix_top5_with_fallback_approximate` (equal to the
  unsuffixed ones when `fallback` is "approximate").
- `auroc_entropy_error_top1`: AUROC of H as a score for "the char path with AutoCorrect disagrees with
  teacher top-1" (ties count one half; the Mann-Whitney statistic); `..._top5` likewise for "not exact or
  prefix of any top-5".
- `by_length`: by the spelled length of the teacher's top-1 (1..k, `>k` truncated, `unk` unspellable),
  with count, share, `exact_top1_autocorrect`, `exact_or_prefix_top5` (strict, without AutoCorrect),
  `exact_or_prefix_top5_autocorrect` and `char_acc` (each key as at the top level); `by_entropy`: by
  bins of H, with count, share and the three token-level figures; `by_teacher_confidence` (when the
  cases carry the teacher's top-1 probability): by bins of that probability, with the same figures and
  `share_of_strict_misses`, the bin's part of all positions whose strict top-5 match fails.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Any

import numpy as np
from torch import Tensor

from spellm_ds.errors import SpellmError
from spellm_ds.train.losses import string_matches

DEFAULT_ENTROPY_BINS = (0.0, 0.01, 0.02, 0.05, 0.1, 0.22, 0.5, 1.0, 2.0, math.inf)
DEFAULT_CONFIDENCE_BINS = (0.0, 0.2, 0.4, 0.6, 0.8, 0.95, 1.0)  # the teacher's top-1 probability
JSON_KEYS = (
    "exact_top1",
    "exact_top5",
    "exact_or_prefix_top5",
    "exact_or_prefix_top5_autocorrect",
    "char_acc",
    "any_prefix_top5",
    "threshold",
    "fallback_rate",
    "agreement_top1_with_fallback",
)


def match_flags(
    pred_tokens: Tensor,
    pred_chars: Tensor,
    topk_ids: Tensor,
    token_chars: Tensor,
    decodable: Tensor,
    long_tokens: Tensor,
    end_id: int = 0,
) -> dict[str, Tensor]:
    """Per-position match flags of predicted tokens `[N]` (-1: none) and strings `[N, k]` vs the top-K.

    `long_tokens` Bool[V]: spelled longer than k with known symbols (their row is their first k chars).
    """
    v = token_chars.shape[0]
    inside = (topk_ids >= 0) & (topk_ids < v)
    safe = topk_ids.clamp(0, v - 1)
    eligible = inside & decodable[safe]  # [N, K]
    cand = token_chars[safe]  # [N, K, k]
    long = inside & long_tokens[safe]
    _, truncation, any_prefix = string_matches(pred_chars[:, None, :], cand, long, end_id)
    exact = (pred_tokens[:, None] == topk_ids) & (pred_tokens[:, None] >= 0)
    strict = exact | truncation
    return {
        "exact_top1": exact[:, 0],
        "exact_top5": exact.any(-1),
        "exact_or_prefix_top1": strict[:, 0],
        "exact_or_prefix_top5": strict.any(-1),
        "any_prefix_top5": (strict | (any_prefix & eligible)).any(-1),
    }


def auroc(scores: np.ndarray, labels: np.ndarray) -> float | None:
    """Area under the ROC curve of `scores` for binary `labels` (1 = positive), ties counted one half."""
    scores = np.asarray(scores, dtype=np.float64)
    labels = np.asarray(labels).astype(bool)
    n_pos, n_neg = int(labels.sum()), int((~labels).sum())
    if n_pos == 0 or n_neg == 0:
        return None
    order = np.argsort(scores, kind="mergesort")
    s = scores[order]
    ranks = np.empty(len(s), dtype=np.float64)
    # Average rank (1-based) within each group of equal scores.
    starts = np.flatnonzero(np.r_[True, s[1:] != s[:-1]])
    ends = np.r_[starts[1:], len(s)]
    for a, b in zip(starts, ends):
        ranks[a:b] = (a + 1 + b) / 2.0
    rank_of = np.empty_like(ranks)
    rank_of[order] = ranks
    u = rank_of[labels].sum() - n_pos * (n_pos + 1) / 2.0
    return float(u / (n_pos * n_neg))


@dataclass
class Sweep:
    """Agreement with teacher top-1 and fallback rate at every distinct threshold (ascending)."""

    thresholds: np.ndarray  # [M]; the first is -1.0 (always fall back)
    agreement: np.ndarray  # [M]
    fallback_rate: np.ndarray  # [M]


def threshold_sweep(entropy: np.ndarray, char_correct: np.ndarray, fallback_correct: np.ndarray) -> Sweep:
    """Exact agreement/fallback-rate curve: char path where entropy ≤ τ, fallback where entropy > τ."""
    h = np.asarray(entropy, dtype=np.float64)
    n = len(h)
    if n == 0:
        return Sweep(np.array([-1.0]), np.array([0.0]), np.array([1.0]))
    order = np.argsort(h, kind="mergesort")
    hs = h[order]
    cc = np.cumsum(np.asarray(char_correct, dtype=np.int64)[order])
    fc = np.cumsum(np.asarray(fallback_correct, dtype=np.int64)[order])
    fb_total = fc[-1]
    last = np.flatnonzero(np.r_[hs[1:] != hs[:-1], True])  # last index of each group of equal entropies
    j = last + 1  # number of positions on the char path at τ = hs[last]
    agree = np.r_[fb_total, cc[last] + fb_total - fc[last]] / n
    rate = np.r_[n, n - j] / n
    return Sweep(thresholds=np.r_[-1.0, hs[last]], agreement=agree.astype(np.float64), fallback_rate=rate)


def calibrate_threshold(
    entropy: np.ndarray, char_correct: np.ndarray, fallback_correct: np.ndarray, target: float = 0.99
) -> dict[str, Any]:
    """The largest threshold whose top-1 agreement reaches `target` (else the best one), with its costs."""
    sw = threshold_sweep(entropy, char_correct, fallback_correct)
    ok = np.flatnonzero(sw.agreement >= target - 1e-12)
    if ok.size:
        i, reached = int(ok[-1]), True
    else:
        best = sw.agreement.max()
        i, reached = int(np.flatnonzero(sw.agreement == best)[-1]), False
    return {
        "threshold": float(sw.thresholds[i]),
        "fallback_rate": float(sw.fallback_rate[i]),
        "agreement_top1_with_fallback": float(sw.agreement[i]),
        "target": float(target),
        "target_reached": reached,
    }


def at_threshold(
    cases: dict[str, np.ndarray],
    part: np.ndarray,
    threshold: float,
    fallback_correct: np.ndarray,
    fallback_top5: np.ndarray,
    target: float,
) -> dict[str, Any]:
    """Fallback rate, top-1 agreement and top-5 match of the positions in `part` at a given threshold."""
    entropy = cases["entropy"][part]
    on_fb = entropy > threshold
    char_ok = cases["exact_top1_autocorrect"][part]
    agree = float(np.where(on_fb, fallback_correct[part], char_ok).mean())
    top5 = np.where(on_fb, fallback_top5[part], cases["exact_or_prefix_top5_autocorrect"][part])
    return {
        "fallback_rate": float(on_fb.mean()),
        "agreement_top1_with_fallback": agree,
        "target_reached": bool(agree >= target - 1e-12),
        "exact_or_prefix_top5_with_fallback": float(top5.mean()),
    }


# Which positions each figure of a split result is read on: the threshold is chosen on the calibration
# part, what it costs and gains is read on the report part (their `_approximate` twins alike), and every
# other figure does not depend on it and uses all positions.
FIGURE_PARTS = {
    "threshold": "calibration",
    "fallback_rate": "report",
    "agreement_top1_with_fallback": "report",
    "exact_or_prefix_top5_with_fallback": "report",
    "target_reached": "report",
    "calibration_part": "calibration (in-sample, for comparison)",
    "other figures": "all positions",
}


def figure_part(key: str) -> str:
    """The part of the positions a result key is read on: calibration, report or all."""
    part = FIGURE_PARTS.get(key.removesuffix("_approximate"), "all")
    return part.split(" ")[0]


def calibration_samples(num_samples: int, fraction: float = 0.5) -> np.ndarray:
    """Which samples calibrate (True) and which report (False): `fraction` of them, evenly spread."""
    if not 0 < fraction < 1:
        raise SpellmError(f"calibration fraction must be in (0, 1), got {fraction}")
    i = np.arange(num_samples, dtype=np.float64)
    return np.floor((i + 1) * fraction + 1e-9) > np.floor(i * fraction + 1e-9)


def curve_at(
    entropy: np.ndarray, char_correct: np.ndarray, fallback_correct: np.ndarray, thresholds: np.ndarray
) -> tuple[np.ndarray, np.ndarray]:
    """Agreement with teacher top-1 and fallback rate at the given thresholds."""
    h = np.asarray(entropy, dtype=np.float64)
    n = max(1, len(h))
    order = np.argsort(h, kind="mergesort")
    hs = h[order]
    cc = np.r_[0, np.cumsum(np.asarray(char_correct, dtype=np.int64)[order])]
    fc = np.r_[0, np.cumsum(np.asarray(fallback_correct, dtype=np.int64)[order])]
    j = np.searchsorted(hs, np.asarray(thresholds, dtype=np.float64), side="right")
    agree = (cc[j] + fc[-1] - fc[j]) / n
    return agree, (len(h) - j) / n


def default_threshold_grid(num_chars: int) -> np.ndarray:
    """Thresholds for plots and TensorBoard: fine below 0.5 nats, coarse up to ln|C|."""
    top = math.log(max(2, num_chars))
    grid = np.r_[np.linspace(0.0, 0.5, 101), np.linspace(0.5, top, 41)]
    return np.unique(np.round(grid, 3))


# The per-position figures each bin of by_length / by_entropy / by_teacher_confidence averages, under the
# same keys as at the top level.
BIN_FIGURES = ("exact_top1_autocorrect", "exact_or_prefix_top5", "exact_or_prefix_top5_autocorrect")


def _bucket_stats(
    keys: np.ndarray, labels: list[str], flags: dict[str, np.ndarray]
) -> dict[str, dict[str, float]]:
    n = max(1, len(keys))
    out: dict[str, dict[str, float | None]] = {}
    for i, name in enumerate(labels):
        sel = keys == i
        cnt = int(sel.sum())
        row: dict[str, float | None] = {"count": cnt, "share": cnt / n}
        for fname, f in flags.items():
            row[fname] = float(f[sel].mean()) if cnt else None
        out[name] = row
    return out


def _bins(values: np.ndarray, edges_in: tuple[float, ...], closed_last: bool) -> tuple[np.ndarray, list[str]]:
    """Bin index per value (values past either end go to the end bins) and the bins' labels."""
    edges = np.asarray(edges_in, dtype=np.float64)
    keys = np.clip(np.searchsorted(edges, values, side="right") - 1, 0, len(edges) - 2)
    labels = [f"[{edges[i]:g},{edges[i + 1]:g})" for i in range(len(edges) - 1)]
    if closed_last:
        labels[-1] = labels[-1][:-1] + "]"
    return keys, labels


def summarize(
    cases: dict[str, np.ndarray],
    *,
    k: int,
    num_chars: int,
    target: float = 0.99,
    entropy_bins: tuple[float, ...] = DEFAULT_ENTROPY_BINS,
    confidence_bins: tuple[float, ...] = DEFAULT_CONFIDENCE_BINS,
    fallback: str = "approximate",
    calibration: np.ndarray | None = None,
) -> dict[str, Any]:
    """All metrics from per-position arrays (the keys `position_cases` returns).

    `fallback` names the kind of `cases["fallback_top1"]`; `fallback_top1_approximate` (when given) adds
    the approximate figures beside them. `calibration` (a boolean mask over positions) splits them: the
    thresholds are chosen on the masked-in part and every figure at a threshold is read on the rest;
    None chooses and reads them on all positions (in-sample)."""
    n = len(cases["entropy"])
    if n == 0:
        raise SpellmError("no masked-in positions to evaluate")

    def mean(key: str) -> float:
        return float(np.mean(cases[key]))

    res: dict[str, Any] = {"positions": n, "fallback": fallback}
    for key in (
        "exact_top1",
        "exact_top5",
        "exact_or_prefix_top1",
        "exact_or_prefix_top5",
        "any_prefix_top5",
        "exact_top1_autocorrect",
        "exact_top5_autocorrect",
        "exact_or_prefix_top5_autocorrect",
        "any_prefix_top5_autocorrect",
        "fallback_top1",
        "fallback_top5",
    ):
        res[key] = mean(key)
    res["lookup_miss_rate"] = mean("miss")
    res["agreement_top1_no_fallback"] = res["exact_top1_autocorrect"]
    hv = cases["head_valid"]
    res["char_acc_per_head"] = [float(cases["char_ok"][hv, i].mean()) if hv.any() else None for i in range(k)]
    res["char_acc"] = float(np.mean(res["char_acc_per_head"])) if hv.any() else None
    res["mean_head_entropy"] = mean("entropy")
    char_ok = cases["exact_top1_autocorrect"]
    fb_ok = cases["fallback_top1"]
    res["auroc_entropy_error_top1"] = auroc(cases["entropy"], ~char_ok)
    res["auroc_entropy_error_top5"] = auroc(cases["entropy"], ~cases["exact_or_prefix_top5_autocorrect"])
    cal_part = np.ones(n, dtype=bool) if calibration is None else np.asarray(calibration, dtype=bool)
    if cal_part.shape != (n,):
        raise SpellmError(f"calibration mask has shape {cal_part.shape}, expected ({n},)")
    rep_part = cal_part if calibration is None else ~cal_part
    if not cal_part.any() or not rep_part.any():
        raise SpellmError(
            f"the calibration split leaves {int(cal_part.sum())} calibration and {int(rep_part.sum())} "
            "report positions; both parts need some (evaluate more held-out samples)"
        )
    res["calibration_positions"] = int(cal_part.sum())
    res["report_positions"] = int(rep_part.sum())
    kinds = [("", fb_ok, cases["fallback_top5"])]
    approx_ok = cases.get("fallback_top1_approximate")
    if approx_ok is not None:
        res["fallback_top1_approximate"] = mean("fallback_top1_approximate")
        res["fallback_top5_approximate"] = mean("fallback_top5_approximate")
        kinds.append(("_approximate", approx_ok, cases["fallback_top5_approximate"]))
    for suffix, ok, top5 in kinds:
        # The threshold comes from the calibration part; its costs and gains are read on the report part.
        threshold = calibrate_threshold(cases["entropy"][cal_part], char_ok[cal_part], ok[cal_part], target)
        res[f"threshold{suffix}"] = threshold["threshold"]
        report = at_threshold(cases, rep_part, threshold["threshold"], ok, top5, target)
        for key, value in report.items():
            res[f"{key}{suffix}"] = value
        if calibration is not None:
            res[f"calibration_part{suffix}"] = at_threshold(
                cases, cal_part, threshold["threshold"], ok, top5, target
            )
    res["target"] = float(target)
    flags = {key: cases[key] for key in BIN_FIGURES}
    length = cases["top1_length"]
    len_key = np.where(length < 0, k + 1, np.minimum(length, k + 1) - 1)  # 0..k-1, k = ">k", k+1 = unk
    len_labels = [str(i + 1) for i in range(k)] + [f">{k}", "unk"]
    res["by_length"] = _bucket_stats(len_key, len_labels, flags)
    pos_char = cases["char_ok"].mean(-1)
    for i, name in enumerate(len_labels):
        sel = (len_key == i) & hv
        res["by_length"][name]["char_acc"] = float(pos_char[sel].mean()) if sel.any() else None
    ent_key, ent_labels = _bins(cases["entropy"], entropy_bins, closed_last=False)
    res["by_entropy"] = _bucket_stats(ent_key, ent_labels, flags)
    p1 = cases.get("teacher_top1_prob")
    if p1 is not None:
        conf_key, conf_labels = _bins(p1, confidence_bins, closed_last=True)
        res["by_teacher_confidence"] = _bucket_stats(conf_key, conf_labels, flags)
        missed = ~cases["exact_or_prefix_top5"].astype(bool)
        for i, name in enumerate(conf_labels):
            share = float(missed[conf_key == i].sum() / missed.sum()) if missed.any() else None
            res["by_teacher_confidence"][name]["share_of_strict_misses"] = share
    grid = default_threshold_grid(num_chars)
    agree, rate = curve_at(cases["entropy"], char_ok, fb_ok, grid)
    res["curve"] = {
        "threshold": grid.tolist(),
        "agreement_top1": agree.tolist(),
        "fallback_rate": rate.tolist(),
    }
    if approx_ok is not None:
        res["curve"]["agreement_top1_approximate"] = curve_at(cases["entropy"], char_ok, approx_ok, grid)[
            0
        ].tolist()
    if fallback == "exact":
        res["curve"]["agreement_top1_exact"] = agree.tolist()
    return res
