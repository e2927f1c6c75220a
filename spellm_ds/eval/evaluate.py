"""Intrinsic evaluation of an exported SpeLLM model on held-out teacher shards, and threshold calibration.

The per-position cases come from the model here; the metrics and the calibration rule are defined in
`spellm_ds.eval.metrics`. The held-out samples are split by their order in the shards (`calibration_fraction`,
default half, evenly spread): the threshold is chosen on the calibration samples' positions and every
figure at it is read on the report samples' positions (`spellm_ds.eval.metrics.FIGURE_PARTS`); the JSON lists
both sample sets under `split` and counts `calibration_positions` and `report_positions`.

Outputs: the metrics dict (and `--json`); `curve`: on a grid of τ, `fallback_rate` (the same for both
kinds: it depends on H alone), `agreement_top1` (the `fallback` kind), `agreement_top1_approximate` and,
with the exact fallback, `agreement_top1_exact`; a PNG with agreement and fallback rate against τ and
agreement against fallback rate, both kinds; TensorBoard scalars under `eval/` and the τ curve under
`eval_threshold/` (one tag per curve key, step = τ in milli-nats); and with `calibrate` the chosen τ of
the `fallback` kind in the export's `spellm_config.json` (`fallback_threshold`, the kind in
`calibration.fallback`, every computed kind's τ in `fallback_thresholds`, which loading reads for the
kind it uses).
"""

from __future__ import annotations

import math
import os
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch import Tensor

from spellm_ds.errors import SpellmError
from spellm_ds.eval.metrics import FIGURE_PARTS, calibration_samples, match_flags, summarize
from spellm_ds.jsonio import write_json

# ---------------------------------------------------------------------------------------------------------
# Model-side: per-position cases from a batch


@torch.inference_mode()
def position_cases(
    model: Any,
    input_ids: Tensor,
    topk_ids: Tensor,
    loss_mask: Tensor,
    lm_chunk: int = 512,
    topk_logprobs: Tensor | None = None,
) -> dict[str, np.ndarray]:
    """Run the model on one batch and return per-position arrays for the masked-in positions.

    With the teacher's `topk_logprobs` the cases also carry its top-1 probability."""
    from spellm_ds.inference.decode import canonical_chars, mean_head_entropy

    dec = model.decoder
    exact = getattr(model, "fallback", "approximate") == "exact"
    if exact:
        out, original = model.forward_with_original(input_ids)
    else:
        out = model(input_ids)
    mask = loss_mask.bool()
    hidden = out.hidden[mask]  # [N, d]
    logits = out.char_logits[mask].float()  # [N, k, C]
    topk = topk_ids[mask].long()  # [N, K]
    logp = logits.log_softmax(-1)
    entropy = mean_head_entropy(logp)
    raw = logits.argmax(-1)
    chars = canonical_chars(raw, dec.end_id)
    tokens = dec.decode_chars(chars)
    miss = tokens < 0
    ac_tokens = tokens.clone()
    if bool(miss.any()):
        rows = miss.nonzero().squeeze(1)
        ac_tokens[rows] = dec.autocorrect(logp[rows])
    token_chars = dec.lookup.token_chars
    decodable = dec.lookup.decodable
    ac_chars = torch.where(miss[:, None], token_chars[ac_tokens.clamp(min=0)], chars)
    long_tokens = dec.lookup.long_tokens
    plain = match_flags(tokens, chars, topk, token_chars, decodable, long_tokens, dec.end_id)
    corrected = match_flags(ac_tokens, ac_chars, topk, token_chars, decodable, long_tokens, dec.end_id)

    def lm_argmax(h: Tensor) -> Tensor:
        return torch.cat(
            [model.lm_logits(h[i : i + lm_chunk]).argmax(-1) for i in range(0, len(h), lm_chunk)]
        )

    fb_approx = lm_argmax(hidden)
    fb = lm_argmax(original[mask]) if exact and original is not out.hidden else fb_approx
    v = token_chars.shape[0]
    top1 = topk[:, 0]
    top1_in = (top1 >= 0) & (top1 < v)
    safe1 = top1.clamp(0, v - 1)
    head_valid = top1_in & decodable[safe1]
    lengths = torch.from_numpy(model.table.lengths.astype(np.int64)).to(top1.device)
    unknown = torch.from_numpy(model.table.unknown).to(top1.device)
    top1_len = torch.where(top1_in & ~unknown[safe1], lengths[safe1], torch.full_like(top1, -1))
    res = {
        "entropy": entropy,
        "miss": miss,
        "exact_top1": plain["exact_top1"],
        "exact_top5": plain["exact_top5"],
        "exact_or_prefix_top1": plain["exact_or_prefix_top1"],
        "exact_or_prefix_top5": plain["exact_or_prefix_top5"],
        "any_prefix_top5": plain["any_prefix_top5"],
        "exact_top1_autocorrect": corrected["exact_top1"],
        "exact_top5_autocorrect": corrected["exact_top5"],
        "exact_or_prefix_top5_autocorrect": corrected["exact_or_prefix_top5"],
        "any_prefix_top5_autocorrect": corrected["any_prefix_top5"],
        "fallback_top1": fb == top1,
        "fallback_top5": (fb[:, None] == topk).any(-1),
        "fallback_top1_approximate": fb_approx == top1,
        "fallback_top5_approximate": (fb_approx[:, None] == topk).any(-1),
        "char_ok": raw == token_chars[safe1],
        "head_valid": head_valid,
        "top1_length": top1_len,
    }
    if topk_logprobs is not None:
        res["teacher_top1_prob"] = topk_logprobs[mask][:, 0].double().exp()
    return {key: t.cpu().numpy() for key, t in res.items()}


def _iter_batches(location: Path, index: dict[str, Any], batch_size: int, max_samples: int | None):
    from spellm_ds.data.shards import iter_shard

    batch: list[dict[str, Any]] = []
    seen = 0
    for entry in index["shards"]:
        for sample in iter_shard(location / entry["name"]):
            batch.append(sample)
            seen += 1
            if len(batch) == batch_size:
                yield batch
                batch = []
            if max_samples is not None and seen >= max_samples:
                if batch:
                    yield batch
                return
    if batch:
        yield batch


def _stack(batch: list[dict[str, Any]], key: str, dtype: torch.dtype) -> Tensor:
    return torch.from_numpy(np.stack([np.asarray(s[key]) for s in batch])).to(dtype)


def evaluate(
    model_dir: str | os.PathLike,
    shards: str | os.PathLike,
    *,
    json_out: str | os.PathLike | None = None,
    plot: str | os.PathLike | None = None,
    tb_dir: str | os.PathLike | None = None,
    calibrate: bool = False,
    target: float = 0.99,
    batch_size: int = 4,
    max_samples: int | None = None,
    device: str = "cpu",
    base_model: str | os.PathLike | None = None,
    trust_remote_code: bool = False,
    progress: bool = True,
    fallback: str | None = None,
    calibration_fraction: float = 0.5,
) -> dict[str, Any]:
    """Evaluate an export directory on held-out shards; write JSON, PNG, TensorBoard and calibration.

    `fallback`: the kind to evaluate and calibrate (None: the one the export loads with by default).
    `calibration_fraction`: the share of samples whose positions choose the threshold."""
    from tqdm import tqdm

    from spellm_ds.data.shards import read_index
    from spellm_ds.inference.model import SpeLLMForCausalLM

    if not 0 < target <= 1:
        raise SpellmError(f"target must be in (0, 1], got {target}")
    if batch_size < 1:
        raise SpellmError(f"batch_size must be >= 1, got {batch_size}")
    if not 0 < calibration_fraction < 1:
        raise SpellmError(f"calibration fraction must be in (0, 1), got {calibration_fraction}")
    location = Path(shards)
    index = read_index(location)
    if not index["top_k"]:
        raise SpellmError(
            f"{location}: shards hold input ids only (built with --no-teacher, top_k 0); eval scores "
            "against the teacher's top-k: build the held-out shards with a teacher"
        )
    model = SpeLLMForCausalLM.from_pretrained(
        model_dir,
        base_model=base_model,
        device=device,
        fallback=fallback,
        trust_remote_code=trust_remote_code,
    )
    want = model.spellm_config.get("tokenizer_hash")
    if want and index["tokenizer_hash"] != want:
        raise SpellmError(
            f"{location}/index.json: shards were built with tokenizer {index['tokenizer_hash'][:12]}..., "
            f"the model's tokenizer is {want[:12]}...: not this model's data"
        )
    total = sum(int(e["samples"]) for e in index["shards"])
    if max_samples is not None:
        total = min(total, max_samples)
    parts: dict[str, list[np.ndarray]] = {}
    samples_of: list[np.ndarray] = []  # per position, the sample's number in shard order
    seen = 0
    bar = tqdm(total=total, desc="eval", unit="sample", disable=not progress)
    for batch in _iter_batches(location, index, batch_size, max_samples):
        ids = _stack(batch, "input_ids", torch.long).to(model.device)
        topk = _stack(batch, "topk_ids", torch.long).to(model.device)
        if "loss_mask" in batch[0] and batch[0]["loss_mask"] is not None:
            mask = _stack(batch, "loss_mask", torch.bool).to(model.device)
        else:
            mask = torch.ones(ids.shape, dtype=torch.bool, device=model.device)
        lps = _stack(batch, "topk_logprobs", torch.float32).to(model.device)
        for key, arr in position_cases(model, ids, topk, mask, topk_logprobs=lps).items():
            parts.setdefault(key, []).append(arr)
        counts = mask.sum(1).cpu().numpy()
        samples_of.append(np.repeat(np.arange(seen, seen + len(batch)), counts))
        seen += len(batch)
        bar.update(len(batch))
    bar.close()
    if not parts:
        raise SpellmError(f"{location}: no samples to evaluate")
    cases = {key: np.concatenate(v) for key, v in parts.items()}
    if seen < 2:
        raise SpellmError(
            f"{location}: {seen} held-out sample; the threshold is chosen on some samples and reported on "
            "others, so eval needs at least 2"
        )
    cal_samples = calibration_samples(seen, calibration_fraction)
    res = summarize(
        cases,
        k=model.table.k,
        num_chars=model.table.charset.size,
        target=target,
        fallback=model.fallback,
        calibration=cal_samples[np.concatenate(samples_of)],
    )
    res["samples"] = total
    res["split"] = {
        "rule": "sample i (shard order) calibrates when floor((i+1)f) > floor(i f)",
        "fraction": calibration_fraction,
        "calibration_samples": np.flatnonzero(cal_samples).tolist(),
        "report_samples": np.flatnonzero(~cal_samples).tolist(),
        "parts": FIGURE_PARTS,
    }
    res["model"] = str(Path(model_dir).resolve())
    res["shards"] = str(location)
    res["step"] = model.spellm_config.get("step")

    plot_path = (
        Path(plot)
        if plot
        else (Path(json_out).with_suffix(".png") if json_out else Path(model_dir) / "eval_threshold.png")
    )
    write_plot(res, plot_path)
    res["plot"] = str(plot_path)
    if tb_dir:
        write_tensorboard(res, tb_dir, step=int(res["step"] or 0))
    if calibrate:
        write_threshold(model_dir, res, location)
    if json_out:
        Path(json_out).parent.mkdir(parents=True, exist_ok=True)
        write_json(Path(json_out), res)
    return res


# ---------------------------------------------------------------------------------------------------------
# Outputs


def write_plot(res: dict[str, Any], path: str | os.PathLike) -> Path:
    """PNG: top-1 agreement and fallback rate against τ; top-1 agreement against fallback rate, both kinds."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    curve = res["curve"]
    kind = res.get("fallback", "approximate")
    fig, (ax, ax3) = plt.subplots(1, 2, figsize=(12, 4.2), dpi=110)
    ax.plot(
        curve["threshold"],
        curve["agreement_top1"],
        color="tab:blue",
        label=f"agreement with teacher top-1 ({kind} fallback)",
    )
    if kind != "approximate" and "agreement_top1_approximate" in curve:
        ax.plot(
            curve["threshold"],
            curve["agreement_top1_approximate"],
            color="tab:blue",
            linestyle="--",
            alpha=0.6,
            label="approximate fallback",
        )
    ax.set_xlabel("fallback threshold τ (mean head entropy, nats)")
    ax.set_ylabel("agreement with teacher top-1", color="tab:blue")
    ax.axhline(res["target"], color="tab:blue", linestyle=":", linewidth=1)
    if res["threshold"] >= 0:
        ax.axvline(
            res["threshold"], color="gray", linestyle="--", linewidth=1, label=f"τ = {res['threshold']:.3g}"
        )
    ax.set_xscale("symlog", linthresh=0.01)
    ax2 = ax.twinx()
    ax2.plot(curve["threshold"], curve["fallback_rate"], color="tab:red", label="fallback rate")
    ax2.set_ylabel("fallback rate", color="tab:red")
    ax2.set_ylim(0, 1)
    lines = ax.get_legend_handles_labels()
    lines2 = ax2.get_legend_handles_labels()
    ax.legend(lines[0] + lines2[0], lines[1] + lines2[1], loc="center right", fontsize=8)
    ax.set_title(
        f"exact-or-prefix top-5 {100 * res['exact_or_prefix_top5']:.1f}% "
        f"({100 * res['exact_or_prefix_top5_autocorrect']:.1f}% with AutoCorrect)",
        fontsize=9,
    )
    # Agreement against the fallback rate it costs: one curve per kind, the calibrated point marked.
    kinds = [(kind, curve["agreement_top1"], res["fallback_rate"], res["agreement_top1_with_fallback"])]
    if kind != "approximate" and "agreement_top1_approximate" in curve:
        kinds.append(
            (
                "approximate",
                curve["agreement_top1_approximate"],
                res["fallback_rate_approximate"],
                res["agreement_top1_with_fallback_approximate"],
            )
        )
    for (name, agree, rate, at), color in zip(kinds, ("tab:blue", "tab:orange")):
        ax3.plot(curve["fallback_rate"], agree, color=color, label=f"{name} fallback")
        ax3.plot([rate], [at], marker="o", color=color, linestyle="none")
    ax3.axhline(res["target"], color="gray", linestyle=":", linewidth=1, label=f"target {res['target']:g}")
    ax3.set_xlabel("fallback rate")
    ax3.set_ylabel("agreement with teacher top-1")
    ax3.set_xlim(0, 1.01)
    ax3.legend(loc="lower right", fontsize=8)
    ax3.set_title(
        f"{kind} fallback: {100 * res['agreement_top1_with_fallback']:.1f}% at "
        f"{100 * res['fallback_rate']:.1f}% fallback",
        fontsize=9,
    )
    fig.tight_layout()
    out = Path(path)
    out.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(out)
    plt.close(fig)
    return out


def scalar_metrics(res: dict[str, Any]) -> dict[str, float]:
    """The scalar metrics of a result (TensorBoard tags under `eval/`)."""
    out = {k: float(v) for k, v in res.items() if isinstance(v, (int, float)) and not isinstance(v, bool)}
    out.pop("step", None)
    for i, acc in enumerate(res.get("char_acc_per_head", [])):
        if acc is not None:
            out[f"char_acc_h{i}"] = float(acc)
    return out


def write_tensorboard(res: dict[str, Any], tb_dir: str | os.PathLike, step: int = 0) -> None:
    """Scalars under `eval/` at `step`, the τ curves under `eval_threshold/` (step = τ in milli-nats)."""
    from torch.utils.tensorboard import SummaryWriter

    writer = SummaryWriter(str(tb_dir))
    try:
        for key, val in scalar_metrics(res).items():
            if math.isfinite(val):
                writer.add_scalar(f"eval/{key}", val, step)
        curve = res["curve"]
        for key, values in curve.items():
            if key == "threshold":
                continue
            for t, v in zip(curve["threshold"], values):
                writer.add_scalar(f"eval_threshold/{key}", v, round(t * 1000))
    finally:
        writer.close()


def write_threshold(model_dir: str | os.PathLike, res: dict[str, Any], shards: Path) -> None:
    """Record the calibrated threshold of the evaluated fallback kind in `spellm_config.json`."""
    from spellm_ds.export.format import update_spellm_config

    kind = res.get("fallback", "approximate")
    thresholds = {kind: res["threshold"]}
    if "threshold_approximate" in res:
        thresholds["approximate"] = res["threshold_approximate"]
    update_spellm_config(
        model_dir,
        {
            "fallback_threshold": res["threshold"],
            "fallback_thresholds": thresholds,
            "threshold_source": "calibrated",
            "calibration": {
                "shards": str(shards),
                "positions": res["positions"],
                "calibration_positions": res["calibration_positions"],
                "report_positions": res["report_positions"],
                "samples": res["samples"],
                "calibration_fraction": res["split"]["fraction"],
                "fallback": kind,
                "target": res["target"],
                "target_reached": res["target_reached"],
                "fallback_rate": res["fallback_rate"],
                "agreement_top1_with_fallback": res["agreement_top1_with_fallback"],
            },
        },
    )
