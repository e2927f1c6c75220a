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
"""

from __future__ import annotations

import math
import os
import sys
import time
from concurrent.futures import Future, ThreadPoolExecutor
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np

from spellm_ds import jsonio
from spellm_ds.config.schema import Section, choice, positive, within
from spellm_ds.data import shards
from spellm_ds.data.corpus import (
    PackedSequence,
    expand_inputs,
    inputs_fingerprint,
    iter_documents,
    pack_sequences,
    tokenize_documents,
)
from spellm_ds.errors import SpellmError
from spellm_ds.log import ALL_RANKS, get_logger

BUILD_NAME = "build.json"
STREAM_NAME = "stream.json"
DTYPES = ("auto", "float32", "bfloat16", "float16")
HEAD_MODES = ("auto", "chunked", "full")
# Config fields that post-process the final logits: the chunked head path cannot reproduce them.
_LOGIT_POSTPROCESSING = (
    "final_logit_softcapping",
    "logit_scale",
    "logits_scaling",
    "output_multiplier_scale",
    "logit_softcapping",
)
# Identity fields: a rerun into the same directory must match every one of them.
_IDENTITY_KEYS = ("tokenizer_hash", "vocab_size", "seq_len", "top_k", "samples_per_shard")

_LOG = get_logger("build-shards")


@dataclass(kw_only=True)
class BuildConfig(Section):
    """What `spellm-ds build-shards` builds and how."""

    teacher: str  # local HF causal LM directory (weights + config + tokenizer)
    inputs: list[str]  # text files, .jsonl(.gz) or .parquet; globs allowed
    output: str  # dataset directory
    text_field: str = "text"  # jsonl key / parquet column holding the text
    seq_len: int = 2048  # tokens per packed sequence
    samples_per_shard: int = 256  # sequences per shard (S)
    batch_size: int = 8  # sequences per teacher forward (formed inside one shard)
    dtype: str = "auto"  # teacher dtype: auto = bfloat16 on CUDA, float32 on CPU
    max_samples: int | None = None  # stop after this many sequences
    top_k: int = 5  # teacher candidates stored per position
    device: str = "auto"  # auto = cuda:<local rank> when CUDA is usable, else cpu
    device_map: str | None = None  # "auto": spread one teacher over this node's GPUs (accelerate)
    head: str = "auto"  # auto | chunked (final norm state -> lm_head in row chunks) | full (HF logits)
    progress: bool = True  # tqdm bar on rank 0
    no_teacher: bool = False  # token-only shards (top_k 0): input ids only, no model forward

    def problems(self) -> list[str]:
        p: list[str] = []
        if self.seq_len < 2:
            p.append(f"build.seq_len must be >= 2, got {self.seq_len}")
        positive(p, "build.samples_per_shard", self.samples_per_shard)
        positive(p, "build.batch_size", self.batch_size)
        if not self.no_teacher:
            within(p, "build.top_k", self.top_k, 1, 64)
        positive(p, "build.max_samples", self.max_samples)
        choice(p, "build.dtype", self.dtype, DTYPES)
        choice(p, "build.head", self.head, HEAD_MODES)
        choice(p, "build.device_map", self.device_map, (None, "auto"))
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


# ----------------------------------------------------------------------------------------- teacher


def resolve_device(device: str, local_rank: int = 0) -> str:
    """Return the torch device string for `device` ("auto" picks cuda:<local rank> when usable)."""
    import torch

    if device != "auto":
        if device.startswith("cuda") and not torch.cuda.is_available():
            raise SpellmError(f"--device {device}: CUDA is not available")
        return device
    if torch.cuda.is_available() and os.environ.get("DS_ACCELERATOR", "cuda") != "cpu":
        return f"cuda:{local_rank % torch.cuda.device_count()}"
    return "cpu"


def resolve_dtype(dtype: str, device: str) -> str:
    """Return the concrete teacher dtype name for `dtype` on `device`."""
    if dtype != "auto":
        return dtype
    return "bfloat16" if device.startswith("cuda") else "float32"


class Teacher:
    """A HF causal LM that returns the top-k log-softmax of its next-token distribution per position."""

    def __init__(
        self,
        path: str | os.PathLike,
        *,
        dtype: str = "float32",
        device: str = "cpu",
        device_map: str | None = None,
        top_k: int = 5,
        head: str = "auto",
    ) -> None:
        import torch
        from transformers import AutoModelForCausalLM

        self.top_k = top_k
        kwargs: dict[str, Any] = {"dtype": getattr(torch, dtype)}
        if device_map:
            kwargs["device_map"] = device_map
        try:
            model = AutoModelForCausalLM.from_pretrained(str(path), **kwargs)
        except (OSError, ValueError) as exc:
            raise SpellmError(f"--teacher {path}: cannot load a causal LM ({exc})") from None
        if not device_map:
            model = model.to(device)
        model.eval()
        self.model = model
        self.input_device = model.get_input_embeddings().weight.device
        out = model.get_output_embeddings()
        self.vocab_size = int(out.weight.shape[0]) if out is not None else int(_text_config(model).vocab_size)
        cuda = self.input_device.type == "cuda"
        # Logits that exist at once (elements): 64 MiB of float32 on CPU, 1 GiB on GPU.
        self.block = 1 << (28 if cuda else 24)
        self.head_mode = self._choose_head(head)

    def _chunkable(self) -> bool:
        import torch

        out = self.model.get_output_embeddings()
        cfg = _text_config(self.model)
        post = [k for k in _LOGIT_POSTPROCESSING if getattr(cfg, k, None) not in (None, 0, 1, 1.0, False)]
        return isinstance(out, torch.nn.Linear) and self.model.base_model is not self.model and not post

    def _choose_head(self, head: str) -> str:
        import torch

        if head == "full":
            return "full"
        if not self._chunkable():
            if head == "chunked":
                raise SpellmError("--head chunked: this teacher post-processes its logits; use --head full")
            return "full"
        # Probe: the chunked head must reproduce the model's own logits on a fixed input.
        ids = (torch.arange(16, device=self.input_device) % self.vocab_size)[None]
        with torch.inference_mode():
            ref = self.model(input_ids=ids, use_cache=False).logits[0].float()
            hidden = self.model.base_model(input_ids=ids, use_cache=False).last_hidden_state[0]
            head_mod = self.model.get_output_embeddings()
            got = head_mod(hidden.to(head_mod.weight.device)).float().to(ref.device)
        tol = (1e-3 if head_mod.weight.dtype == torch.float32 else 3e-2) * (1.0 + float(ref.abs().max()))
        ok = got.shape == ref.shape and float((got - ref).abs().max()) <= tol
        if not ok and head == "chunked":
            raise SpellmError("--head chunked: lm_head(final hidden state) differs from the model's logits")
        return "chunked" if ok else "full"

    def forward_logits(self, input_ids: np.ndarray) -> Any:
        """Run the plain HF forward on a batch and return its logits tensor [B, L, V]."""
        import torch

        ids = torch.from_numpy(np.ascontiguousarray(input_ids, dtype=np.int64)).to(self.input_device)
        with torch.inference_mode():
            return self.model(input_ids=ids, use_cache=False).logits

    def topk(self, input_ids: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        """Return (ids int32 [B, L, K], log-probs float16 [B, L, K]) of the next-token distribution."""
        import torch

        b, n = input_ids.shape
        ids = torch.from_numpy(np.ascontiguousarray(input_ids, dtype=np.int64)).to(self.input_device)
        with torch.inference_mode():
            if self.head_mode == "chunked":
                head = self.model.get_output_embeddings()
                hidden = self.model.base_model(input_ids=ids, use_cache=False).last_hidden_state
                hidden = hidden.reshape(b * n, -1).to(head.weight.device)
                top_ids, top_lp = streamed_topk(hidden, head.weight, head.bias, self.top_k, self.block)
            else:
                logits = self.model(input_ids=ids, use_cache=False).logits.reshape(b * n, -1)
                top_ids = torch.empty(b * n, self.top_k, dtype=torch.int64, device=logits.device)
                top_lp = torch.empty(b * n, self.top_k, dtype=torch.float16, device=logits.device)
                rows = max(1, self.block // self.vocab_size)
                for s in range(0, b * n, rows):
                    top_ids[s : s + rows], top_lp[s : s + rows] = _reduce(logits[s : s + rows], self.top_k)
            out_ids = top_ids.to(torch.int32).cpu().numpy().reshape(b, n, self.top_k)
            out_lp = top_lp.cpu().numpy().reshape(b, n, self.top_k)
        return out_ids, out_lp


_TOPK_GROUP = 64


def _topk(x: Any, k: int) -> tuple[Any, Any]:
    """Exact top-k along rows; on CPU over wide rows via group maxima (~3x faster than torch.topk)."""
    import torch

    n, width = x.shape
    if x.is_cuda or width < 128 * _TOPK_GROUP or k > width // _TOPK_GROUP:
        return torch.topk(x, k, dim=-1)
    # The top-k values lie in the k groups with the largest maxima: find those groups, then search them.
    g = _TOPK_GROUP
    body = (width // g) * g
    groups = x[:, :body].view(n, body // g, g)
    top_groups = torch.topk(groups.amax(dim=-1), k, dim=-1).indices
    cand = torch.gather(groups, 1, top_groups.unsqueeze(-1).expand(n, k, g)).reshape(n, k * g)
    vals, pos = torch.topk(cand, k, dim=-1)
    idx = torch.gather(top_groups, 1, pos // g) * g + pos % g
    if body < width:  # the columns after the last whole group
        tail_v, tail_i = torch.topk(x[:, body:], min(k, width - body), dim=-1)
        vals, sel = torch.topk(torch.cat([vals, tail_v], dim=1), k, dim=-1)
        idx = torch.gather(torch.cat([idx, tail_i + body], dim=1), 1, sel)
    return vals, idx


def _reduce(logits: Any, k: int) -> tuple[Any, Any]:
    """Top-k ids and log-softmax values (float16) of each row of a logits block; consumes the block."""
    import torch

    # A float32 copy is made only for 16-bit logits; float32 logits (a private block) are reused in place.
    x = logits if logits.dtype == torch.float32 and logits.is_contiguous() else logits.float()
    vals, idx = _topk(x, k)
    m = vals[:, :1]
    # log-sum-exp shifted by the row max (= top-1 value): one in-place subtract, one in-place exp, one sum.
    lse = m + torch.log(x.sub_(m).exp_().sum(dim=-1, keepdim=True))
    # fp32 rounding can put the top value a hair above the log-sum-exp: clamp to <= 0.
    return idx, (vals - lse).clamp_(max=0.0).to(torch.float16)


def streamed_topk(
    hidden: Any, weight: Any, bias: Any, k: int, block: int, slice_vocab: bool | None = None
) -> tuple[Any, Any]:
    """Top-k ids and float16 log-softmax of `hidden @ weight.T (+ bias)` without the full logits.

    At most about `block` logits exist at once. On GPU the vocabulary is cut into slices whose top-k
    and shifted sums of exp are merged (the weight is read once); on CPU rows are cut into blocks over
    the whole vocabulary (large blocks, so re-reading the weight per block stays cheap, and wide rows
    suit the group-maximum top-k). `slice_vocab` forces one strategy (default: by device).
    """
    import torch

    linear = torch.nn.functional.linear
    rows, vocab = hidden.shape[0], weight.shape[0]
    if rows * vocab <= block:
        return _reduce(linear(hidden, weight, bias), k)
    if not (hidden.is_cuda if slice_vocab is None else slice_vocab):
        step = max(1, block // vocab)
        parts = [_reduce(linear(hidden[r : r + step], weight, bias), k) for r in range(0, rows, step)]
        return torch.cat([p[0] for p in parts]), torch.cat([p[1] for p in parts])
    width = max(min(vocab, 1024), block // rows)
    best_v = best_i = run_m = run_s = None
    for v0 in range(0, vocab, width):
        b = bias[v0 : v0 + width] if bias is not None else None
        x = linear(hidden, weight[v0 : v0 + width], b)
        x = x if x.dtype == torch.float32 else x.float()
        vals, idx = torch.topk(x, min(k, x.shape[1]), dim=-1)
        idx += v0
        if best_v is None:
            best_v, best_i, run_m = vals, idx, vals[:, :1].clone()
            run_s = x.sub_(run_m).exp_().sum(dim=-1, keepdim=True)
            continue
        best_v, sel = torch.topk(torch.cat([best_v, vals], dim=1), k, dim=-1)
        best_i = torch.gather(torch.cat([best_i, idx], dim=1), 1, sel)
        new_m = torch.maximum(run_m, vals[:, :1])
        run_s = run_s * torch.exp(run_m - new_m) + x.sub_(new_m).exp_().sum(dim=-1, keepdim=True)
        run_m = new_m
    lse = run_m + torch.log(run_s)
    return best_i, (best_v - lse).clamp_(max=0.0).to(torch.float16)


def _text_config(model: Any) -> Any:
    cfg = model.config
    return cfg.get_text_config() if hasattr(cfg, "get_text_config") else cfg


# ------------------------------------------------------------------------------------ shard writer


class ShardWriter:
    """Turns one shard's sequences into a shard file + manifest; encoding and writing run in a thread."""

    def __init__(
        self, output: Path, teacher: Teacher | None, *, batch_size: int, vocab_size: int | None = None
    ) -> None:
        self.output = output
        self.teacher = teacher  # None: token-only shards (top_k 0)
        self.batch_size = batch_size
        self.vocab_size = teacher.vocab_size if teacher is not None else int(vocab_size or 0)
        self._pool = ThreadPoolExecutor(max_workers=1, thread_name_prefix="shard-writer")
        self._pending: Future | None = None

    def build(self, shard: int, seqs: list[PackedSequence], on_batch: Any = None) -> None:
        """Run the teacher over `seqs` (batches inside this shard only) and queue the write."""
        ids = np.stack([s.input_ids for s in seqs])
        if self.teacher is None:  # token-only: empty top-k
            top_ids = np.empty((*ids.shape, 0), dtype=np.int32)
            top_lp = np.empty((*ids.shape, 0), dtype=np.float16)
            if on_batch is not None:
                on_batch(int(ids.size))
            self.wait()
            self._pending = self._pool.submit(self._write, shard, seqs, top_ids, top_lp)
            return
        top_ids = np.empty((*ids.shape, self.teacher.top_k), dtype=np.int32)
        top_lp = np.empty((*ids.shape, self.teacher.top_k), dtype=np.float16)
        for s in range(0, len(seqs), self.batch_size):
            top_ids[s : s + self.batch_size], top_lp[s : s + self.batch_size] = self.teacher.topk(
                ids[s : s + self.batch_size]
            )
            if on_batch is not None:
                on_batch(int(ids[s : s + self.batch_size].size))
        bad = ~np.isfinite(top_lp).all(axis=(1, 2))
        if bad.any():
            j = int(np.argmax(bad))
            where = f"{shards.shard_name(shard)}/{shards.sample_key(seqs[j].index)}"
            raise SpellmError(f"{where}: the teacher produced NaN/inf log-probs; try --dtype float32")
        self.wait()
        self._pending = self._pool.submit(self._write, shard, seqs, top_ids, top_lp)

    def _write(self, shard: int, seqs: list[PackedSequence], top_ids: np.ndarray, top_lp: np.ndarray) -> None:
        vocab = self.vocab_size
        samples = []
        for j, seq in enumerate(seqs):
            mask = seq.loss_mask if seq.length < seq.input_ids.shape[0] else None
            payload = shards.encode_sample(seq.input_ids, top_ids[j], top_lp[j], vocab, loss_mask=mask)
            samples.append((shards.sample_key(seq.index), payload))
        path = self.output / shards.shard_name(shard)
        nbytes, sha = shards.write_shard(path, samples)
        entry = shards.ShardEntry(
            name=path.name,
            index=shard,
            samples=len(seqs),
            tokens=sum(s.length for s in seqs),
            bytes=nbytes,
            sha256=sha,
            first_sample=seqs[0].index,
        )
        jsonio.write_json(self.output / shards.manifest_name(shard), entry.to_dict())

    def wait(self) -> None:
        """Block until the queued write (if any) finished; re-raise its error."""
        if self._pending is not None:
            pending, self._pending = self._pending, None
            pending.result()

    def stop(self) -> None:
        """Let a queued write complete without reporting its result, then stop the thread (error path)."""
        self._pool.shutdown(wait=True)

    def close(self) -> None:
        """Finish the queued write and stop the writer thread."""
        try:
            self.wait()
        finally:
            self._pool.shutdown(wait=True)


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
