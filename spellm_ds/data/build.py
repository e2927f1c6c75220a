"""Teacher-shard building: tokenise and pack a corpus, run any local HF causal LM, write top-k shards.

One command serves every launch: alone, under `mpirun -np N` / `srun -n N` / torchrun, or as SLURM array
tasks (launcher ranks and array tasks combine into `workers = tasks * world`). Worker w builds the global
shards w, w+workers, ...; the bytes of a shard never depend on who builds it, because batches are formed
inside a shard (never across shards) and every rank sees the same global sequence order. Ranks never
wait for each other: each one tokenises the corpus up to its last shard itself (cheap next to the teacher).

Crash safety: a shard is written under a hidden temporary name and renamed; its manifest
`shard-NNNNNN.json` is written after the rename; `index.json` is written (atomically, identical content
from any rank) by whichever rank finds every manifest present once the total is known (`stream.json`).
A rerun skips shards whose manifest and file are present and rebuilds the rest. `build.json` records
what defines the dataset; a non-empty output directory built with anything else is refused.

Token-only shards (`no_teacher`, `--no-teacher`): the same format with top_k 0, input ids (and the loss
mask) only, for runs whose teacher is computed online (`teacher: online`). Only the tokenizer and
config.json of `--teacher` are read; no model is loaded, so building runs at the tokeniser's speed.

This module is the launch (`build_shards`) and the dataset's bookkeeping; the teacher's top-k is
`spellm_ds.data.teacher_topk`, the threaded shard writer `spellm_ds.data.writer`. `BuildConfig` is the
command line of `spellm-ds build-shards`: each field's metadata gives its option's help.
"""

from __future__ import annotations

import math
import os
import sys
import time
import typing
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal

from spellm_ds import jsonio
from spellm_ds.config.schema import Section, positive, within
from spellm_ds.data import shards
from spellm_ds.data.corpus import (
    PackedSequence,
    expand_inputs,
    inputs_fingerprint,
    iter_documents,
    pack_sequences,
    tokenize_documents,
)
from spellm_ds.data.teacher_topk import Teacher, resolve_device, resolve_dtype
from spellm_ds.data.writer import ShardWriter
from spellm_ds.errors import SpellmError
from spellm_ds.log import ALL_RANKS, get_logger

BUILD_NAME = "build.json"
STREAM_NAME = "stream.json"
# The teacher's dtype: "auto" (bfloat16 on CUDA, float32 on CPU) or a name of `spellm_ds.dtypes`.
BuildDType = Literal["auto", "float32", "bfloat16", "float16"]
HeadMode = Literal["auto", "chunked", "full"]
DTYPES = typing.get_args(BuildDType)
HEAD_MODES = typing.get_args(HeadMode)
# Identity fields: a rerun into the same directory must match every one of them.
_IDENTITY_KEYS = ("tokenizer_hash", "vocab_size", "seq_len", "top_k", "samples_per_shard")

_LOG = get_logger("build-shards")


@dataclass(kw_only=True)
class BuildConfig(Section):
    """What `spellm-ds build-shards` builds and how (each field is one option of the command)."""

    teacher: str = field(metadata={"help": "local HF causal LM directory (weights, config and tokenizer)"})
    inputs: list[str] = field(
        metadata={
            "help": "text files, .jsonl(.gz) or .parquet; globs allowed",
            "flag": "--input",
            "metavar": "FILE_OR_GLOB",
        }
    )
    output: str = field(metadata={"help": "dataset directory"})
    text_field: str = field(default="text", metadata={"help": "jsonl key / parquet column holding the text"})
    seq_len: int = field(default=2048, metadata={"help": "tokens per packed sequence"})
    samples_per_shard: int = field(default=256, metadata={"help": "sequences per shard"})
    batch_size: int = field(
        default=8, metadata={"help": "sequences per teacher forward (formed inside one shard)"}
    )
    dtype: BuildDType = field(
        default="auto", metadata={"help": "teacher dtype: auto = bfloat16 on CUDA, float32 on CPU"}
    )
    max_samples: int | None = field(default=None, metadata={"help": "stop after this many sequences"})
    top_k: int = field(default=5, metadata={"help": "teacher candidates stored per position"})
    device: str = field(
        default="auto",
        metadata={
            "help": "teacher device: cpu, cuda:N, or auto (cuda:<local rank> when CUDA is usable, else cpu)"
        },
    )
    device_map: Literal["auto"] | None = field(
        default=None, metadata={"help": "auto: spread one teacher over this node's GPUs (accelerate)"}
    )
    head: HeadMode = field(
        default="auto",
        metadata={
            "help": "top-k path: chunked (final hidden state -> lm_head in row chunks), full (the model's "
            "logits), or auto (chunked where it reproduces the model's logits)"
        },
    )
    progress: bool = field(default=True, metadata={"help": "tqdm progress bar on rank 0 (on by default)"})
    no_teacher: bool = field(
        default=False,
        metadata={
            "help": "token-only shards (input ids, top_k 0) for teacher: online runs; "
            "--teacher gives the tokenizer"
        },
    )

    def problems(self) -> list[str]:
        p: list[str] = []
        if self.seq_len < 2:
            p.append(f"build.seq_len must be >= 2, got {self.seq_len}")
        positive(p, "build.samples_per_shard", self.samples_per_shard)
        positive(p, "build.batch_size", self.batch_size)
        if not self.no_teacher:
            within(p, "build.top_k", self.top_k, 1, 64)
        positive(p, "build.max_samples", self.max_samples)
        if not self.inputs:
            p.append("build.inputs: at least one input file or pattern is required")
        return p


@dataclass(kw_only=True)
class BuildSummary:
    """What one process did."""

    worker: int
    workers: int
    shards_built: list[int] = field(default_factory=list)
    shards_skipped: int = 0
    samples_built: int = 0
    tokens_built: int = 0
    seconds: float = 0.0
    total_sequences: int | None = None
    total_shards: int | None = None
    index_written: bool = False


# ---------------------------------------------------------------------------------- dataset state


def _check_identity(output: Path, meta: dict[str, Any]) -> None:
    """Refuse an output directory that holds anything but a build of exactly this dataset."""
    recorded_path = output / BUILD_NAME
    if not recorded_path.exists():
        foreign = (
            [p.name for p in output.iterdir() if not jsonio.is_temp_name(p.name)] if output.exists() else []
        )
        if foreign:
            raise SpellmError(
                f"--output {output}: directory is not empty and holds no {BUILD_NAME} "
                f"(found {', '.join(sorted(foreign)[:3])}); choose an empty or new directory"
            )
        return
    recorded = jsonio.read_json(recorded_path)
    diffs = []
    for key in _IDENTITY_KEYS:
        if recorded.get(key) != meta[key]:
            diffs.append(f"{key}: recorded {recorded.get(key)!r}, now {meta[key]!r}")
    rec_teacher = recorded.get("teacher") or {}
    for key in ("config_hash", "weights_hash"):
        if rec_teacher.get(key) != meta["teacher"][key]:
            diffs.append(f"teacher {key}: recorded {rec_teacher.get(key)!r}, now {meta['teacher'][key]!r}")
    rec_args = recorded.get("build_args") or {}
    for key, value in meta["build_args"].items():
        if rec_args.get(key) != value:
            diffs.append(f"{key}: recorded {rec_args.get(key)!r}, now {value!r}")
    if diffs:
        raise SpellmError(
            f"--output {output}: it holds shards of a different build ({'; '.join(diffs)}); "
            "use a new directory or rerun with the recorded settings"
        )


def _done(output: Path, shard: int) -> bool:
    manifest = output / shards.manifest_name(shard)
    path = output / shards.shard_name(shard)
    if not manifest.exists() or not path.exists():
        return False
    try:
        entry = shards.ShardEntry.from_dict(jsonio.read_json(manifest), str(manifest))
    except SpellmError:
        return False
    return entry.bytes == path.stat().st_size


def _remove_stale_temps(output: Path, owned: Any) -> None:
    """Delete hidden temporary files of shards this worker owns (left by a killed run)."""
    for p in output.iterdir():
        name = p.name
        if not jsonio.is_temp_name(name) or not name.startswith(".shard-"):
            continue
        try:
            index = int(name[len(".shard-") : len(".shard-") + 6])
        except ValueError:
            continue
        if owned(index):
            p.unlink(missing_ok=True)


def merge_index(output: str | os.PathLike) -> bool:
    """Write `index.json` when the total is known and every shard's manifest exists; True if written."""
    out = Path(output)
    stream_path, build_path = out / STREAM_NAME, out / BUILD_NAME
    if not stream_path.exists() or not build_path.exists():
        return False
    n_shards = int(jsonio.read_json(stream_path)["shards"])
    entries = []
    for i in range(n_shards):
        manifest = out / shards.manifest_name(i)
        if not manifest.exists():
            return False
        entries.append(shards.ShardEntry.from_dict(jsonio.read_json(manifest), str(manifest)))
    meta = jsonio.read_json(build_path)
    index = shards.make_index(
        teacher=meta["teacher"],
        tokenizer_hash=meta["tokenizer_hash"],
        vocab_size=meta["vocab_size"],
        eos_id=meta["eos_id"],
        seq_len=meta["seq_len"],
        top_k=meta["top_k"],
        samples_per_shard=meta["samples_per_shard"],
        build_args=meta["build_args"],
        entries=entries,
    )
    index["pad_id"] = meta["pad_id"]
    index["loss_mask"] = "False at padding of the final partial sequence; True elsewhere"
    jsonio.write_json(out / shards.INDEX_NAME, index)
    return True


# ------------------------------------------------------------------------------------------- build


def worker_slot(rank: int | None = None, world_size: int | None = None) -> tuple[int, int, int, int]:
    """Return (worker, workers, rank, local_rank) combining the launcher's ranks and SLURM array tasks."""
    from spellm_ds.dist import array_task, detect

    info = detect()
    task, tasks = array_task()
    r = info.rank if rank is None else rank
    w = info.world_size if world_size is None else world_size
    if not 0 <= r < w:
        raise SpellmError(f"rank {r} is outside world size {w}")
    return task * w + r, tasks * w, r, info.local_rank


def _log(msg: str) -> None:
    """Log a progress line of this worker (every worker shows its own)."""
    _LOG.info(msg, extra=ALL_RANKS)


def build_shards(cfg: BuildConfig, rank: int | None = None, world_size: int | None = None) -> BuildSummary:
    """Build this process's share of the dataset `cfg` describes; return what it did."""
    from transformers import AutoConfig, AutoTokenizer

    from spellm_ds.fingerprint import config_hash, tokenizer_hash, weights_hash

    t0 = time.perf_counter()
    worker, workers, launcher_rank, local_rank = worker_slot(rank, world_size)
    summary = BuildSummary(worker=worker, workers=workers)
    teacher_dir = Path(cfg.teacher)
    if not (teacher_dir / "config.json").is_file():
        raise SpellmError(f"--teacher {cfg.teacher}: no config.json (a local HF model directory is required)")
    try:
        tok = AutoTokenizer.from_pretrained(str(teacher_dir))
        model_cfg = AutoConfig.from_pretrained(str(teacher_dir))
    except (OSError, ValueError) as exc:
        raise SpellmError(f"--teacher {cfg.teacher}: cannot load tokenizer/config ({exc})") from None
    if tok.eos_token_id is None:
        raise SpellmError(f"--teacher {cfg.teacher}: the tokenizer has no EOS token to separate documents")
    text_cfg = model_cfg.get_text_config() if hasattr(model_cfg, "get_text_config") else model_cfg
    vocab_size = int(text_cfg.vocab_size)
    if len(tok) > vocab_size:
        raise SpellmError(
            f"--teacher {cfg.teacher}: tokenizer has {len(tok)} tokens, model vocab {vocab_size}"
        )
    if cfg.device_map:
        import torch

        # One process per node drives all of its GPUs; `device` only decides the default dtype.
        device = "cuda" if torch.cuda.is_available() else "cpu"
    else:
        device = resolve_device(cfg.device, local_rank)
    dtype = resolve_dtype(cfg.dtype, device) if not cfg.no_teacher else None
    top_k = 0 if cfg.no_teacher else cfg.top_k
    files = expand_inputs(cfg.inputs)
    meta = {
        "format": shards.FORMAT_NAME,
        "format_version": shards.FORMAT_VERSION,
        "teacher": {
            "path": str(teacher_dir.resolve()),
            "name": teacher_dir.resolve().name,
            "config_hash": config_hash(model_cfg),
            "weights_hash": None if cfg.no_teacher else weights_hash(teacher_dir),
        },
        "tokenizer_hash": tokenizer_hash(tok),
        "vocab_size": vocab_size,
        "eos_id": int(tok.eos_token_id),
        "pad_id": int(tok.pad_token_id if tok.pad_token_id is not None else tok.eos_token_id),
        "seq_len": cfg.seq_len,
        "top_k": top_k,
        "samples_per_shard": cfg.samples_per_shard,
        "build_args": {
            "inputs": list(cfg.inputs),
            "input_files": len(files),
            "inputs_fingerprint": inputs_fingerprint(files),
            "text_field": cfg.text_field,
            "seq_len": cfg.seq_len,
            "samples_per_shard": cfg.samples_per_shard,
            "max_samples": cfg.max_samples,
            "top_k": top_k,
            "dtype": dtype,
        },
    }
    if cfg.no_teacher:  # recorded only here, so the build.json of teacher shards is unchanged
        meta["teacher"]["none"] = True
        meta["build_args"]["no_teacher"] = True
    output = Path(cfg.output)
    _check_identity(output, meta)
    output.mkdir(parents=True, exist_ok=True)
    if not (output / BUILD_NAME).exists():
        jsonio.write_json(output / BUILD_NAME, meta)

    def owned(index: int) -> bool:
        return index % workers == worker

    _remove_stale_temps(output, owned)
    per_shard, seq_len = cfg.samples_per_shard, cfg.seq_len
    known_total = (
        jsonio.read_json(output / STREAM_NAME)["sequences"] if (output / STREAM_NAME).exists() else None
    )
    limit = cfg.max_samples if known_total is None else known_total
    if known_total is not None:
        n_shards = math.ceil(known_total / per_shard)
        mine = [i for i in range(n_shards) if owned(i)]
        todo = [i for i in mine if not _done(output, i)]
        summary.shards_skipped = len(mine) - len(todo)
        if not todo:
            summary.total_sequences, summary.total_shards = known_total, n_shards
            summary.index_written = merge_index(output)
            summary.seconds = time.perf_counter() - t0
            _report(summary)
            return summary
        last_needed = max(todo)
    else:
        todo = None
        last_needed = None
    expected_tokens = None
    if limit is not None:
        n_shards = math.ceil(limit / per_shard)
        mine = todo if todo is not None else [i for i in range(n_shards) if owned(i) and not _done(output, i)]
        expected_tokens = sum(min(per_shard, limit - i * per_shard) for i in mine) * seq_len

    from tqdm import tqdm

    bar = tqdm(
        total=expected_tokens,
        unit="tok",
        unit_scale=True,
        desc=f"build-shards {worker}/{workers}",
        disable=not (cfg.progress and launcher_rank == 0),
        mininterval=1.0 if sys.stderr.isatty() else 30.0,
    )
    teacher: Teacher | None = None
    writer: ShardWriter | None = None
    pending: list[PackedSequence] = []
    pending_shard = -1
    checked: dict[int, bool] = {}
    count = 0
    try:
        docs = iter_documents(files, cfg.text_field)
        for seq in pack_sequences(tokenize_documents(tok, docs), seq_len, meta["eos_id"], meta["pad_id"]):
            if limit is not None and seq.index >= limit:
                break
            count = seq.index + 1
            shard = seq.index // per_shard
            if last_needed is not None and shard > last_needed:
                break
            if not owned(shard):
                continue
            if shard not in checked:
                checked[shard] = _done(output, shard)
                if checked[shard] and todo is None:
                    summary.shards_skipped += 1
            if checked[shard]:
                continue
            if shard != pending_shard and pending:
                teacher, writer = _flush(
                    cfg, output, pending_shard, pending, teacher, writer, device, dtype, bar
                )
                _account(summary, pending_shard, pending)
                pending = []
            pending_shard = shard
            pending.append(seq)
        if pending:
            teacher, writer = _flush(cfg, output, pending_shard, pending, teacher, writer, device, dtype, bar)
            _account(summary, pending_shard, pending)
        if writer is not None:
            writer.close()
            writer = None
    finally:
        bar.close()
        if writer is not None:  # an error: a write already queued still completes (a whole shard)
            writer.stop()
    if known_total is None:
        if count == 0:
            raise SpellmError(f"--input: the corpus holds no text ({len(files)} files)")
        if not (output / STREAM_NAME).exists():
            jsonio.write_json(
                output / STREAM_NAME, {"sequences": count, "shards": math.ceil(count / per_shard)}
            )
        known_total = jsonio.read_json(output / STREAM_NAME)["sequences"]
        if known_total != count:
            raise SpellmError(
                f"{output / STREAM_NAME}: records {known_total} sequences, this corpus gives {count}"
            )
    summary.total_sequences, summary.total_shards = known_total, math.ceil(known_total / per_shard)
    summary.index_written = merge_index(output)
    summary.seconds = time.perf_counter() - t0
    _report(summary)
    return summary


def _flush(
    cfg: BuildConfig,
    output: Path,
    shard: int,
    seqs: list[PackedSequence],
    teacher: Teacher | None,
    writer: ShardWriter | None,
    device: str,
    dtype: str | None,
    bar: Any,
) -> tuple[Teacher | None, ShardWriter]:
    if writer is None and cfg.no_teacher:
        writer = ShardWriter(output, None, batch_size=cfg.batch_size, vocab_size=_vocab_size(cfg))
    if writer is None:
        teacher = Teacher(
            cfg.teacher, dtype=dtype, device=device, device_map=cfg.device_map, top_k=cfg.top_k, head=cfg.head
        )
        writer = ShardWriter(output, teacher, batch_size=cfg.batch_size)
    writer.build(shard, seqs, on_batch=bar.update)
    return teacher, writer


def _vocab_size(cfg: BuildConfig) -> int:
    from transformers import AutoConfig

    model_cfg = AutoConfig.from_pretrained(cfg.teacher)
    return int(_text_config_of(model_cfg).vocab_size)


def _text_config_of(model_cfg: Any) -> Any:
    return model_cfg.get_text_config() if hasattr(model_cfg, "get_text_config") else model_cfg


def _account(summary: BuildSummary, shard: int, seqs: list[PackedSequence]) -> None:
    summary.shards_built.append(shard)
    summary.samples_built += len(seqs)
    summary.tokens_built += sum(s.length for s in seqs)


def _report(s: BuildSummary) -> None:
    rate = s.tokens_built / s.seconds if s.seconds > 0 else 0.0
    _log(
        f"worker {s.worker}/{s.workers}: built {len(s.shards_built)} shards ({s.samples_built} samples, "
        f"{s.tokens_built} tokens, {rate:,.0f} tok/s over {s.seconds:.1f} s), skipped {s.shards_skipped} "
        f"already built; dataset: {s.total_sequences} sequences in {s.total_shards} shards; "
        + ("index.json written" if s.index_written else "index.json pending (other workers still building)")
    )
