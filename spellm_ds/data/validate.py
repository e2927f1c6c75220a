"""`spellm-ds shards validate` and `spellm-ds shards stats`: check a teacher-shard dataset, describe it.

Validation reads every byte: per shard the size and sha256 against `index.json`, the tar structure, then
every sample (header, shapes, id ranges, log-prob sanity: finite, <= 0 within float16 tolerance, sorted
descending, distinct candidate ids), the sample keys against the shard's sequence range, and the
counts against the manifest and the totals. It reports every problem it finds, each naming its shard
and, for sample problems, the sample key; it never stops at the first one.
"""

from __future__ import annotations

import hashlib
import io
import math
import os
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np

from spellm_ds.data import shards
from spellm_ds.errors import ShardError, SpellmError
from spellm_ds.jsonio import read_json_or_none

# float16 rounding of a log-prob next to 0 stays <= 0; allow a little for producers that round differently.
LOGPROB_TOLERANCE = 1e-3


@dataclass(kw_only=True)
class ValidationReport:
    """Every problem found, and how much was checked."""

    location: str
    problems: list[str] = field(default_factory=list)
    bad_shards: set[str] = field(default_factory=set)
    shards: int = 0
    samples: int = 0
    tokens: int = 0

    @property
    def ok(self) -> bool:
        """True when no problem was found."""
        return not self.problems

    def add(self, shard: str, message: str) -> None:
        """Record one problem of `shard`."""
        self.bad_shards.add(shard)
        self.problems.append(message)

    def summary(self) -> str:
        """One line: OK with the totals, or the number of problems and bad shards."""
        if self.ok:
            return f"OK: {self.location}: {self.shards} shards, {self.samples} samples, {self.tokens} tokens"
        return (
            f"FAILED: {self.location}: {len(self.problems)} problems in {len(self.bad_shards)} shards "
            f"({', '.join(sorted(self.bad_shards)[:10])}{', ...' if len(self.bad_shards) > 10 else ''})"
        )


def _check_sample(
    sample_where: str, payload: bytes, index: dict[str, Any], expected_key: str, key: str
) -> tuple[list[str], int]:
    """Return the problems of one sample and its token count."""
    problems = []
    if key != expected_key:
        problems.append(f"{sample_where}: key out of order (expected {expected_key})")
    try:
        s = shards.decode_sample(payload, sample_where, check_values=False)
    except ShardError as exc:
        return [*problems, str(exc)], 0
    seq_len, top_k, vocab = index["seq_len"], index["top_k"], index["vocab_size"]
    ids, top_ids, lp, mask = s["input_ids"], s["topk_ids"], s["topk_logprobs"], s["loss_mask"]
    if s["vocab_size"] != vocab:
        problems.append(f"{sample_where}: vocab_size {s['vocab_size']} != index vocab_size {vocab}")
    if ids.shape != (seq_len,) or top_ids.shape != (seq_len, top_k) or lp.shape != (seq_len, top_k):
        problems.append(
            f"{sample_where}: shapes input_ids {ids.shape}, topk {top_ids.shape} != ({seq_len},), "
            f"({seq_len}, {top_k}) from index.json"
        )
        return problems, 0
    if ids.dtype != np.int32 or top_ids.dtype != np.int32 or lp.dtype != np.float16 or mask.dtype != bool:
        problems.append(f"{sample_where}: dtypes {ids.dtype}/{top_ids.dtype}/{lp.dtype}/{mask.dtype}")
    for name, arr in (("input_ids", ids), ("topk_ids", top_ids)):
        if arr.size and (int(arr.min()) < 0 or int(arr.max()) >= vocab):
            problems.append(f"{sample_where}: {name} outside [0, {vocab}) (max {int(arr.max())})")
    lp32 = lp.astype(np.float32)
    finite = np.isfinite(lp32)
    if not finite.all():
        bad = np.argwhere(~finite)[0]
        problems.append(
            f"{sample_where}: topk_logprobs holds NaN/inf ({int((~finite).sum())} values, first at position "
            f"{int(bad[0])})"
        )
    else:
        if (lp32 > LOGPROB_TOLERANCE).any():
            problems.append(f"{sample_where}: topk_logprobs > 0 (max {float(lp32.max()):.4g})")
        if top_k > 1 and (np.diff(lp32, axis=1) > 0).any():
            t = int(np.argwhere(np.diff(lp32, axis=1) > 0)[0][0])
            problems.append(f"{sample_where}: topk_logprobs not sorted descending at position {t}")
        if float(np.exp(lp32.astype(np.float64)).sum(axis=1).max()) > 1.0 + 1e-2 * top_k:
            problems.append(f"{sample_where}: top-{top_k} probabilities sum above 1")
    if top_k > 1:
        srt = np.sort(top_ids, axis=1)
        if (srt[:, 1:] == srt[:, :-1]).any():
            problems.append(f"{sample_where}: repeated candidate ids within a position")
    return problems, int(mask.sum())


def _check_shard(report: ValidationReport, root: Path, entry: dict[str, Any], index: dict[str, Any]) -> None:
    name = entry.get("name", "?")
    where = f"{root / name}"
    try:
        e = shards.ShardEntry.from_dict(entry, f"index.json entry {name}")
    except ShardError as exc:
        report.add(name, str(exc))
        return
    path = root / e.name
    if not path.is_file():
        report.add(e.name, f"{where}: shard file is missing")
        return
    data = path.read_bytes()
    if len(data) != e.bytes:
        report.add(
            e.name, f"{where}: {len(data)} bytes on disk, manifest says {e.bytes} (truncated or replaced)"
        )
    if hashlib.sha256(data).hexdigest() != e.sha256:
        report.add(e.name, f"{where}: sha256 mismatch (corrupt or replaced)")
    manifest = root / shards.manifest_name(e.index)
    if manifest.exists():
        on_disk = read_json_or_none(manifest)
        if on_disk != e.to_dict():
            report.add(e.name, f"{manifest}: per-shard manifest differs from the index.json entry")
    count = tokens = 0
    try:
        for key, payload in shards.iter_tar_members(io.BytesIO(data), where):
            expected = shards.sample_key(e.first_sample + count)
            problems, n = _check_sample(f"{where}/{key}", payload, index, expected, key)
            for p in problems:
                report.add(e.name, p)
            count += 1
            tokens += n
    except ShardError as exc:
        report.add(e.name, f"{exc} (after {count} samples)")
        report.samples += count
        return
    if count != e.samples:
        report.add(e.name, f"{where}: holds {count} samples, manifest says {e.samples}")
    if tokens != e.tokens:
        report.add(e.name, f"{where}: holds {tokens} tokens, manifest says {e.tokens}")
    report.samples += count
    report.tokens += tokens


def validate_dataset(location: str | os.PathLike) -> ValidationReport:
    """Check every shard and sample of a dataset directory; return every problem found."""
    root = Path(location)
    report = ValidationReport(location=str(root))
    try:
        index = shards.read_index(root)
    except SpellmError as exc:
        report.add(shards.INDEX_NAME, str(exc))
        return report
    entries = index["shards"]
    per_shard = index["samples_per_shard"]
    listed = set()
    for pos, entry in enumerate(entries):
        name = entry.get("name") if isinstance(entry, dict) else None
        listed.add(name)
        if name != shards.shard_name(pos) or entry.get("index") != pos:
            report.add(str(name), f"index.json: entry {pos} is {name!r}, expected {shards.shard_name(pos)}")
        elif entry.get("first_sample") != pos * per_shard:
            report.add(
                name, f"index.json: {name} first_sample {entry.get('first_sample')} != {pos * per_shard}"
            )
        elif entry.get("samples") != per_shard and pos != len(entries) - 1:
            report.add(name, f"index.json: {name} holds {entry.get('samples')} samples, expected {per_shard}")
    totals = index["totals"]
    for key in ("samples", "tokens", "bytes"):
        total = sum(int(e.get(key, 0)) for e in entries if isinstance(e, dict))
        if totals.get(key) != total:
            report.add(
                shards.INDEX_NAME, f"index.json: totals.{key} {totals.get(key)} != sum of entries {total}"
            )
    if totals.get("shards") != len(entries):
        report.add(shards.INDEX_NAME, f"index.json: totals.shards {totals.get('shards')} != {len(entries)}")
    for p in sorted(root.glob("shard-*.tar")):
        if p.name not in listed:
            report.add(p.name, f"{p}: shard file not listed in index.json")
    for entry in entries:
        if isinstance(entry, dict):
            _check_shard(report, root, entry, index)
            report.shards += 1
    return report


# ------------------------------------------------------------------------------------------- stats

_HIST_BINS = 1000
_QUANTILES = (0.05, 0.1, 0.25, 0.5, 0.75, 0.9, 0.95)


def dataset_stats(location: str | os.PathLike, max_shards: int | None = None) -> dict[str, Any]:
    """Return samples, tokens, bytes on disk per token and the teacher's top-1 probability distribution."""
    root = Path(location)
    index = shards.read_index(root)
    if not index["top_k"]:
        raise SpellmError(f"{root}: token-only shards (top_k 0) hold no teacher predictions to summarise")
    entries = index["shards"][:max_shards] if max_shards else index["shards"]
    hist = np.zeros(_HIST_BINS, dtype=np.int64)
    samples = tokens = nbytes = 0
    top1_sum = top5_sum = hit1 = hit5 = targets = 0.0
    for entry in entries:
        path = root / entry["name"]
        nbytes += path.stat().st_size
        for s in shards.iter_shard(path):
            mask = s["loss_mask"]
            lp = s["topk_logprobs"][mask].astype(np.float64)
            p1 = np.exp(lp[:, 0])
            hist += np.bincount(
                np.minimum((p1 * _HIST_BINS).astype(np.int64), _HIST_BINS - 1), minlength=_HIST_BINS
            )
            top1_sum += float(p1.sum())
            top5_sum += float(np.exp(lp).sum())
            samples += 1
            tokens += int(mask.sum())
            # Next-token agreement: position t predicts input t+1 (only where t+1 is real text).
            nxt = mask[1:] & mask[:-1]
            target = s["input_ids"][1:][nxt]
            top = s["topk_ids"][:-1][nxt]
            hit1 += float((top[:, 0] == target).sum())
            hit5 += float((top == target[:, None]).any(axis=1).sum())
            targets += float(nxt.sum())
    cdf = np.cumsum(hist)
    quantiles = {}
    for q in _QUANTILES:
        b = int(np.searchsorted(cdf, q * cdf[-1])) if cdf.size and cdf[-1] else 0
        quantiles[f"p{round(q * 100):02d}"] = round((b + 0.5) / _HIST_BINS, 4)
    coarse = hist.reshape(10, -1).sum(axis=1)
    return {
        "location": str(root),
        "teacher": index["teacher"].get("name"),
        "seq_len": index["seq_len"],
        "top_k": index["top_k"],
        "vocab_size": index["vocab_size"],
        "shards": len(entries),
        "samples": samples,
        "tokens": tokens,
        "bytes": nbytes,
        "bytes_per_token": round(nbytes / tokens, 3) if tokens else math.nan,
        "top1_prob": {
            "mean": round(top1_sum / tokens, 4) if tokens else math.nan,
            "quantiles": quantiles,
            "histogram": {"edges": [round(i / 10, 1) for i in range(11)], "counts": coarse.tolist()},
        },
        "topk_mass_mean": round(top5_sum / tokens, 4) if tokens else math.nan,
        "next_token_in_top1": round(hit1 / targets, 4) if targets else math.nan,
        "next_token_in_topk": round(hit5 / targets, 4) if targets else math.nan,
    }


def format_stats(stats: dict[str, Any]) -> str:
    """Render `dataset_stats` output as a short human-readable report."""
    t1 = stats["top1_prob"]
    lines = [
        f"{stats['location']}: teacher {stats['teacher']}, vocab {stats['vocab_size']}, "
        f"seq_len {stats['seq_len']}, top-{stats['top_k']}",
        f"  shards {stats['shards']}  samples {stats['samples']}  tokens {stats['tokens']}  "
        f"bytes {stats['bytes']}  bytes/token {stats['bytes_per_token']}",
        f"  teacher top-1 probability: mean {t1['mean']}  "
        + "  ".join(f"{k} {v}" for k, v in t1["quantiles"].items()),
        f"  top-{stats['top_k']} mass mean {stats['topk_mass_mean']}; next token is top-1 "
        f"{stats['next_token_in_top1']}, in top-{stats['top_k']} {stats['next_token_in_topk']}",
        "  top-1 probability histogram:",
    ]
    counts = t1["histogram"]["counts"]
    edges = t1["histogram"]["edges"]
    peak = max(counts) or 1
    for i, c in enumerate(counts):
        lines.append(f"    [{edges[i]:.1f}, {edges[i + 1]:.1f}) {c:>10d} {'#' * round(40 * c / peak)}")
    return "\n".join(lines)
