"""Export a DeepSpeed ZeRO-3 training checkpoint to an inference directory, one tensor at a time.

`spellm-ds export --checkpoint CK --output OUT` writes the directory `spellm_ds.export.format` describes:
the base model's weights with the retrained MLPs under HF names (so `AutoModelForCausalLM.from_pretrained
(OUT)` loads the model without its char heads), the char heads, the checkpoint's own `charset.json`, the
tokenizer, `original_mlps.safetensors` and, last, `spellm_config.json`: k, num_chars, charset and
tokenizer hashes, trained layers and tensors, fallback threshold (+ its source), source checkpoint, tag
and step, dtype, base model reference (path, config and weights hashes), training config and
`original_mlps`. `--delta` writes only `delta.safetensors` (the trained base tensors) instead of the model
weights and config; loading checks the recorded base model and applies the delta to it.

Original weights for the exact fallback: `spellm_ds.export.originals` (a full export carries them in
`original_mlps.safetensors`, a delta export's base model holds them).

How tensors are read. `train.zero_files.ZeroCheckpoint` maps every rank's files (no process group,
no model) and gives one full tensor at a time: trained ones from the fp32 master partitions, frozen
ones from every rank's `frozen_param_fragments`. Frozen parameters come back in the
training dtype (the checkpoint holds no fp32 copy of them). A checkpoint without frozen fragments gets
its frozen tensors from the base model recorded in the checkpoint: they are frozen, hence equal to it.
Each tensor is cast to the export dtype and appended to a safetensors file whose header was written
first from the known shapes, so peak memory is about two copies of the largest single tensor.

Across ranks, for a 70B model. The same command runs under `torchrun`, `srun` or `mpirun` with R
processes (any R, unrelated to the training world size): output shard i is written by rank i mod R, each
rank maps all checkpoint files and reads only the slices of its own tensors, so R nodes read and write R
shards in parallel and no process holds more than one tensor. Rank 0 also writes the small files; after
a barrier it writes the index and, last, `spellm_config.json`. With W = 256 training ranks, a 70B
bf16 export reads 140 GB of frozen fragments and 14 GB of trained fp32 masters; peak memory per process
is set by the embedding (128,256 × 8,192, about 2 GB in bf16, 4 GB while cast).
"""

from __future__ import annotations

import os
import re
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from torch import Tensor, nn

from spellm_ds.dtypes import TORCH_DTYPES, dtype_name, recorded_dtype
from spellm_ds.errors import SpellmError
from spellm_ds.export.format import (
    CHAR_HEADS_FILE,
    CHARSET_FILE,
    DELTA_FILE,
    ORIGINAL_MLPS_FILE,
    PAPER_THRESHOLD,
    SPELLM_CONFIG,
    SafetensorsWriter,
    nbytes,
    read_json,
    read_tensor,
    tensor_index,
    weight_file_names,
    write_hf_config,
    write_spellm_config,
    write_weight_index,
)
from spellm_ds.export.originals import (
    check_base_holds,
    check_original_shapes,
    original_mlps_record,
    write_original_mlps,
)
from spellm_ds.train.zero_files import ZeroCheckpoint, checkpoint_meta, checkpoint_table, natural_key

BASE_PREFIX = "base."
HEADS_NAME = "char_heads.weight"
DEFAULT_SHARD_BYTES = 5 * 1024**3


# ---------------------------------------------------------------------------------------------------------
# Export


@dataclass
class ExportSummary:
    """What an export wrote."""

    output: Path
    delta: bool
    files: list[str]
    tensors: int
    bytes: int
    trained_tensors: list[str]
    trained_layers: list[int]
    step: int | None
    dtype: str


def _hf_name(name: str, where: Path) -> str:
    if not name.startswith(BASE_PREFIX):
        raise SpellmError(f"{where}: parameter {name!r} is neither under 'base.' nor the char heads")
    return name[len(BASE_PREFIX) :]


def _plan_shards(entries: list[tuple[str, tuple[int, ...], torch.dtype]], max_bytes: int) -> list[list[Any]]:
    shards: list[list[Any]] = [[]]
    total = 0
    for e in entries:
        size = nbytes(e[1], e[2])
        if shards[-1] and total + size > max_bytes:
            shards.append([])
            total = 0
        shards[-1].append(e)
        total += size
    return shards


def _rank_info() -> tuple[int, int]:
    from spellm_ds.dist import detect

    info = detect()
    return info.rank, info.world_size


@dataclass(kw_only=True)
class _Plan:
    """Everything one export writes; `fetch` returns one full tensor by HF name."""

    out: Path
    delta: bool
    entries: list[tuple[str, tuple[int, ...], torch.dtype]]
    fetch: Callable[[str], Tensor]
    heads: Callable[[], Tensor]
    table: Any
    tokenizer: Any
    base_dir: Path
    dtype: torch.dtype
    trained: list[str]
    info: dict[str, Any]
    threshold: float | None
    max_shard_bytes: int
    originals: list[tuple[str, tuple[int, ...], torch.dtype]]  # the trained tensors, HF names
    fetch_original: Callable[[str], Tensor]  # full export: one original (base model) tensor by HF name
    original_mlps: bool = True  # the export carries the trained tensors' original weights
    trust_remote_code: bool = False


def _resolve_dtype(dtype: str | torch.dtype, default: torch.dtype) -> torch.dtype:
    if isinstance(dtype, torch.dtype):
        return dtype
    if dtype == "auto":
        return default
    if dtype not in TORCH_DTYPES:
        raise SpellmError(f"dtype {dtype!r} is not one of auto, {', '.join(TORCH_DTYPES)}")
    return TORCH_DTYPES[dtype]


def _load_tokenizer(base_dir: Path, trust_remote_code: bool) -> Any:
    from transformers import AutoTokenizer

    try:
        return AutoTokenizer.from_pretrained(str(base_dir), trust_remote_code=trust_remote_code)
    except (OSError, ValueError) as exc:
        raise SpellmError(f"{base_dir}: cannot load the tokenizer ({exc})") from None


def _check_base_dir(base_dir: Path, what: str) -> None:
    if not str(base_dir) or not (base_dir / "config.json").is_file():
        raise SpellmError(
            f"the base model {str(base_dir) or '(not recorded)'} of {what} is not a HF model directory: "
            "pass --base-model"
        )


def _prepare_output(out: Path, overwrite: bool, rank: int, world: int) -> None:
    """Never leave a loadable but incomplete export: `spellm_config.json` is removed first, written last."""
    if rank == 0:
        if (out / SPELLM_CONFIG).exists():
            if not overwrite:
                raise SpellmError(f"output {out} already holds an export (pass --overwrite to replace it)")
            (out / SPELLM_CONFIG).unlink()
        out.mkdir(parents=True, exist_ok=True)
    _barrier(world)


def _write_export(plan: _Plan, rank: int = 0, world: int = 1, progress: bool = True) -> ExportSummary:
    """Write the planned files: rank r writes output shards r, r+world, ...; rank 0 the rest, config last."""
    from tqdm import tqdm

    out = plan.out
    if plan.delta:
        file_plan, file_names = [plan.entries], [DELTA_FILE]
    else:
        file_plan = _plan_shards(plan.entries, plan.max_shard_bytes)
        file_names = weight_file_names(len(file_plan))
    mine = [i for i in range(len(file_plan)) if i % world == rank]
    bar = tqdm(
        total=sum(len(file_plan[i]) for i in mine),
        desc=f"export rank {rank}",
        unit="tensor",
        disable=not progress,
        leave=False,
    )
    for i in mine:
        writer = SafetensorsWriter(out / file_names[i], file_plan[i])
        for hf_name, _shape, dt in file_plan[i]:
            t = plan.fetch(hf_name).to(dt)
            writer.write(hf_name, t)
            del t
            bar.update(1)
        writer.close()
    write_originals = plan.original_mlps and not plan.delta
    if write_originals and len(file_plan) % world == rank:
        write_original_mlps(out, plan.originals, plan.fetch_original)
    bar.close()
    heads_shape: tuple[int, ...] = ()
    if rank == 0:
        heads = plan.heads().to(plan.dtype)
        heads_shape = tuple(heads.shape)
        w = SafetensorsWriter(out / CHAR_HEADS_FILE, [("weight", heads_shape, heads.dtype)])
        w.write("weight", heads)
        w.close()
        plan.table.save(out / CHARSET_FILE)
        plan.tokenizer.save_pretrained(str(out))
        if not plan.delta:
            write_hf_config(plan.base_dir, out, dtype_name(plan.dtype))
    _barrier(world)
    files = [*file_names, CHAR_HEADS_FILE] + ([ORIGINAL_MLPS_FILE] if write_originals else [])
    total = sum(nbytes(e[1], e[2]) for e in plan.entries)
    if rank == 0:
        if not write_originals:
            (out / ORIGINAL_MLPS_FILE).unlink(missing_ok=True)  # a stale one from an overwritten export
        if not plan.delta:
            _cleanup_stale_shards(out, set(file_names))
            weight_map = {e[0]: file_names[i] for i, fp in enumerate(file_plan) for e in fp}
            write_weight_index(out, weight_map if len(file_names) > 1 else None, total)
        write_spellm_config(out, _spellm_config(plan, files, heads_shape))
    _barrier(world)
    layers = _trained_layers(plan.trained)
    return ExportSummary(
        output=out,
        delta=plan.delta,
        files=files,
        tensors=len(plan.entries) + 1,
        bytes=total,
        trained_tensors=plan.trained,
        trained_layers=layers,
        step=plan.info.get("step"),
        dtype=dtype_name(plan.dtype),
    )


def _trained_layers(names: list[str]) -> list[int]:
    return sorted({int(m.group(1)) for n in names if (m := re.search(r"layers\.(\d+)\.", n))})


def _spellm_config(plan: _Plan, files: list[str], heads_shape: tuple[int, ...]) -> dict[str, Any]:
    from transformers import AutoConfig

    from spellm_ds.fingerprint import config_hash, tokenizer_hash, weights_hash

    try:
        base_cfg = AutoConfig.from_pretrained(str(plan.base_dir), trust_remote_code=plan.trust_remote_code)
    except (OSError, ValueError) as exc:
        raise SpellmError(f"{plan.base_dir}: cannot read config.json ({exc})") from None
    train_cfg = plan.info.get("train_config") or {}
    return {
        "k": plan.table.k,
        "num_chars": plan.table.charset.size,
        "charset_hash": plan.table.hash,
        "tokenizer_hash": tokenizer_hash(plan.tokenizer),
        "hidden_size": int(heads_shape[1]),
        "trained_layers": _trained_layers(plan.trained),
        "trained_tensors": plan.trained,
        "fallback_threshold": PAPER_THRESHOLD if plan.threshold is None else float(plan.threshold),
        "threshold_source": "default (paper)" if plan.threshold is None else "given at export",
        "delta": plan.delta,
        "original_mlps": original_mlps_record(plan.delta, plan.original_mlps),
        "dtype": dtype_name(plan.dtype),
        "files": files,
        "frozen_from": plan.info.get("frozen_from"),
        "source_checkpoint": plan.info.get("source_checkpoint"),
        "source_tag": plan.info.get("source_tag"),
        "step": plan.info.get("step"),
        "world_size": plan.info.get("world_size"),
        "selection": (train_cfg.get("loss") or {}).get("selection"),
        "base_model": {
            "path": str(plan.base_dir.resolve()),
            "config_hash": config_hash(base_cfg),
            "weights_hash": weights_hash(plan.base_dir),
        },
        "train_config": train_cfg,
    }


def export_checkpoint(
    checkpoint: str | os.PathLike,
    output: str | os.PathLike,
    *,
    delta: bool = False,
    tag: str | None = None,
    dtype: str = "auto",
    base_model: str | os.PathLike | None = None,
    threshold: float | None = None,
    max_shard_bytes: int = DEFAULT_SHARD_BYTES,
    overwrite: bool = False,
    trust_remote_code: bool = False,
    progress: bool = True,
    original_mlps: bool = True,
) -> ExportSummary:
    """Write an inference directory (full, or `delta`) from a ZeRO-3 checkpoint of any world size.

    `original_mlps`: also carry the trained tensors' original weights (exact fallback; module doc)."""
    rank, world = _rank_info()
    ck = ZeroCheckpoint.open(checkpoint, tag)
    meta = checkpoint_meta(ck)
    base_dir = Path(base_model or meta.get("model_path") or "")
    _check_base_dir(base_dir, f"checkpoint {ck.path}")
    if HEADS_NAME not in ck.trainable and HEADS_NAME not in ck.frozen:
        raise SpellmError(f"{ck.path}: no {HEADS_NAME} parameter: not a SpeLLM checkpoint")
    base_cfg = read_json(base_dir / "config.json", "HF model config")
    train_dtype = ((meta.get("config") or {}).get("model") or {}).get("dtype")
    out_dtype = _resolve_dtype(dtype, recorded_dtype(train_dtype) or ck.frozen_dtype or torch.float32)

    heads_shape = tuple(ck.trainable.get(HEADS_NAME) or ck.frozen[HEADS_NAME])
    shared = set(ck.shared)
    trained = [n for n in ck.trainable if n != HEADS_NAME and n not in shared]
    # The online teacher's frozen copy of the original MLPs (model.teacher) is no part of the export.
    frozen = [n for n in ck.frozen if n != HEADS_NAME and n not in shared and not n.startswith("teacher.")]
    tokenizer = _load_tokenizer(base_dir, trust_remote_code)
    k = int(meta.get("k") or ((meta.get("config") or {}).get("model") or {}).get("k") or 10)
    table = checkpoint_table(ck, meta, tokenizer, base_cfg.get("vocab_size"), k)
    if heads_shape[0] != table.k * table.charset.size:
        raise SpellmError(
            f"{ck.path}: char heads have {heads_shape[0]} rows, the char table needs k·|C| = "
            f"{table.k}·{table.charset.size}"
        )
    from_base = not ck.has_frozen_fragments
    base_files = tensor_index(base_dir) if (from_base or delta or original_mlps) else {}
    if delta or original_mlps:
        check_base_holds(base_dir, base_files, [_hf_name(n, ck.path) for n in trained], "this checkpoint")
    if delta:
        names = trained
        buffers: dict[str, Tensor] = {}
    else:
        names = sorted(trained + frozen, key=natural_key)
        buffers = {_hf_name(n, ck.path): t for n, t in ck.buffers.items()}
    shapes = {**ck.frozen, **ck.trainable}
    source = {_hf_name(n, ck.path): n for n in names}
    entries = [(h, tuple(shapes[n]), out_dtype) for h, n in source.items()]
    entries += [(h, tuple(t.shape), t.dtype) for h, t in buffers.items()]

    def fetch(hf_name: str) -> Tensor:
        if hf_name in buffers:
            return buffers[hf_name]
        name = source[hf_name]
        if name in ck.frozen and from_base:
            return read_tensor(base_files[hf_name][0], hf_name)
        return ck.tensor(name)

    originals = [(_hf_name(n, ck.path), tuple(ck.trainable[n]), out_dtype) for n in trained]
    if original_mlps and not delta:
        check_original_shapes(base_dir, base_files, originals)

    out = Path(output)
    _prepare_output(out, overwrite, rank, world)
    plan = _Plan(
        out=out,
        delta=delta,
        entries=entries,
        fetch=fetch,
        heads=lambda: ck.tensor(HEADS_NAME),
        table=table,
        tokenizer=tokenizer,
        base_dir=base_dir,
        dtype=out_dtype,
        trained=[_hf_name(n, ck.path) for n in trained],
        info={
            "frozen_from": "base model" if from_base else "checkpoint",
            "source_checkpoint": str(ck.path.resolve()),
            "source_tag": ck.path.name,
            "step": meta.get("step"),
            "world_size": ck.world_size,
            "train_config": meta.get("config") or {},
        },
        threshold=threshold,
        max_shard_bytes=max_shard_bytes,
        trust_remote_code=trust_remote_code,
        original_mlps=original_mlps,
        originals=originals,
        fetch_original=lambda hf_name: read_tensor(base_files[hf_name][0], hf_name),
    )
    return _write_export(plan, rank, world, progress)


def save_export(
    model: nn.Module,
    table: Any,
    output: str | os.PathLike,
    *,
    base_model: str | os.PathLike,
    delta: bool = False,
    dtype: str | torch.dtype = "auto",
    threshold: float | None = None,
    max_shard_bytes: int = DEFAULT_SHARD_BYTES,
    overwrite: bool = False,
    step: int | None = None,
    train_config: dict[str, Any] | None = None,
    original_mlps: bool = True,
) -> ExportSummary:
    """Write an inference directory from an in-memory (not partitioned) `SpeLLMModel` in one process.

    The original weights of the trained tensors (`original_mlps`) are read from `base_model`."""
    base_dir = Path(base_model)
    _check_base_dir(base_dir, "the model")
    params = dict(model.base.named_parameters())  # tied weights appear once
    persistent = set(model.base.state_dict())
    buffers = {n: b for n, b in model.base.named_buffers() if n in persistent}
    trained = [
        n[len(BASE_PREFIX) :]
        for n, p in model.named_parameters()
        if p.requires_grad and n.startswith(BASE_PREFIX)
    ]
    out_dtype = _resolve_dtype(dtype, model.char_heads.weight.dtype)
    if delta:
        entries = [(n, tuple(params[n].shape), out_dtype) for n in trained]
    else:
        entries = [
            (n, tuple(p.shape), out_dtype) for n, p in sorted(params.items(), key=lambda x: natural_key(x[0]))
        ]
        entries += [(n, tuple(b.shape), b.dtype) for n, b in buffers.items()]
    tensors = {**params, **buffers}
    originals = [(n, tuple(params[n].shape), out_dtype) for n in trained]
    base_files: dict[str, tuple[Path, tuple[int, ...]]] = {}
    if original_mlps and not delta:
        base_files = tensor_index(base_dir)
        check_base_holds(base_dir, base_files, trained, "this model")
        check_original_shapes(base_dir, base_files, originals)
    out = Path(output)
    _prepare_output(out, overwrite, 0, 1)
    plan = _Plan(
        out=out,
        delta=delta,
        entries=entries,
        fetch=lambda name: tensors[name].detach(),
        heads=lambda: model.char_heads.weight.detach(),
        table=table,
        tokenizer=_load_tokenizer(base_dir, False),
        base_dir=base_dir,
        dtype=out_dtype,
        trained=trained,
        info={"frozen_from": "model", "step": step, "world_size": 1, "train_config": train_config or {}},
        threshold=threshold,
        max_shard_bytes=max_shard_bytes,
        original_mlps=original_mlps,
        originals=originals,
        fetch_original=lambda name: read_tensor(base_files[name][0], name),
    )
    return _write_export(plan, progress=False)


def _cleanup_stale_shards(out: Path, keep: set[str]) -> None:
    for f in out.glob("model*.safetensors"):
        if f.name not in keep:
            f.unlink()


def _barrier(world: int) -> None:
    """A barrier across export ranks (a gloo group joined on first use when world > 1; the CLI leaves it)."""
    if world <= 1:
        return
    import torch.distributed as dist

    if not dist.is_initialized():
        from spellm_ds.dist import detect, export_torch_env

        export_torch_env(detect())
        dist.init_process_group("gloo")
    dist.barrier()
