"""Export a DeepSpeed ZeRO-3 training checkpoint to an inference directory, one tensor at a time.

Layout of an export directory (`spellm-ds export --checkpoint CK --output OUT`):

    config.json, generation_config.json       the base model's HF config (dtype set to the export dtype)
    model.safetensors                          all base-model weights with HF names, or, when larger than
    model-00001-of-0000N.safetensors ...       `max_shard_bytes`, shards plus
    model.safetensors.index.json               the HF index (weight_map, total_size)
    tokenizer files                            the base model's tokenizer
    char_heads.safetensors                     tensor `weight` [k·|C|, d] (row i·|C| + c: head i, symbol c)
    original_mlps.safetensors                  the original (teacher) values of the trained tensors, HF
                                               names, export dtype: what the exact fallback runs
    charset.json                               the CharTable (spellm_ds.charset), verified against the
                                               checkpoint's charset hash
    spellm_config.json                         written last, so a directory without it is incomplete: k,
                                               num_chars, charset and tokenizer hashes, trained layers and
                                               tensors, fallback threshold (+ its source), source checkpoint,
                                               tag and step, dtype, base model reference, training config,
                                               `original_mlps` (below)

`AutoModelForCausalLM.from_pretrained(OUT)` loads the base model with its retrained MLPs (the char heads
are ignored by it); `spellm_ds.inference.SpeLLMForCausalLM.from_pretrained(OUT)` loads everything.
`--delta` writes only `delta.safetensors` (the trained base tensors, HF names), the char heads, charset,
tokenizer and `spellm_config.json` with the base model's path and its config and weights hashes; loading
checks them and applies the delta to that base.

Original weights for the exact fallback (`spellm_ds.inference`). Training changes only the MLPs of the last
N layers, so the teacher is the export with those tensors put back. A full export writes their original
values to `original_mlps.safetensors`, read from the base model directory the checkpoint records (they
are the frozen teacher's weights; the checkpoint holds only the trained ones); a delta export needs
nothing more, as its base model holds them. `spellm_config.json` records it in `original_mlps`: the
file name, `"base model"` for a delta, or null when the export was written without them
(`original_mlps=False`, `--no-original-mlps`), which loads with the approximate fallback. The file costs
the N MLPs' bytes (70B, N = 5, bf16: 7 GB).

How tensors are read. The checkpoint is read directly, without a process group or the model: every
rank's `*_model_states.pt` and `*_optim_states.pt` is opened with `torch.load(mmap=True,
weights_only=True)` (an allowlist admits DeepSpeed's ZeroStageEnum and LossScaler and the numpy types of
stored RNG states; nothing else is unpickled), so no file is read into memory as a whole. A trained
parameter is cut from each rank's fp32 master partition (ZeRO-3 gives parameter p the same
`ceil(numel/W)` slice of every rank's flat group, at one running offset over the parameters in
`param_shapes` order), the W slices are concatenated, trimmed and reshaped; a frozen parameter is
reassembled the same way from every rank's `frozen_param_fragments`. Frozen parameters come back in the
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

import json
import math
import os
import re
import shutil
import struct
from collections import OrderedDict
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
from torch import Tensor, nn

from spellm_ds.errors import SpellmError
from spellm_ds.inference import (
    CHAR_HEADS_FILE,
    CHARSET_FILE,
    DELTA_FILE,
    EXPORT_FORMAT,
    EXPORT_VERSION,
    ORIGINAL_FROM_BASE,
    ORIGINAL_MLPS_FILE,
    PAPER_THRESHOLD,
    SPELLM_CONFIG,
)

META_NAME = "spellm_meta.json"  # written by spellm_ds.train beside each checkpoint
BASE_PREFIX = "base."
HEADS_NAME = "char_heads.weight"
DEFAULT_SHARD_BYTES = 5 * 1024**3

_ST_DTYPES = {
    torch.float64: "F64",
    torch.float32: "F32",
    torch.float16: "F16",
    torch.bfloat16: "BF16",
    torch.int64: "I64",
    torch.int32: "I32",
    torch.int16: "I16",
    torch.int8: "I8",
    torch.uint8: "U8",
    torch.bool: "BOOL",
}
_ST_SIZES = {
    "F64": 8,
    "F32": 4,
    "F16": 2,
    "BF16": 2,
    "I64": 8,
    "I32": 4,
    "I16": 2,
    "I8": 1,
    "U8": 1,
    "BOOL": 1,
}
_ST_SIZES |= {"U16": 2, "U32": 4, "U64": 8, "F8_E4M3": 1, "F8_E5M2": 1}
EXPORT_DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}
_TRAIN_DTYPES = {"fp32": torch.float32, "bf16": torch.bfloat16, "fp16": torch.float16}


# ---------------------------------------------------------------------------------------------------------
# safetensors: checked reading, streamed writing


def read_safetensors_header(path: str | os.PathLike) -> dict[str, tuple[str, tuple[int, ...]]]:
    """Name → (dtype, shape) of a safetensors file, after checking that the file is complete."""
    p = Path(path)
    try:
        size = p.stat().st_size
        with open(p, "rb") as fh:
            head = fh.read(8)
            if len(head) < 8:
                raise SpellmError(f"{p}: truncated safetensors file ({size} bytes)")
            (n,) = struct.unpack("<Q", head)
            if n > min(size - 8, 1 << 28):
                raise SpellmError(f"{p}: truncated or corrupt safetensors file (header of {n} bytes)")
            header = json.loads(fh.read(n).decode("utf-8"))
    except FileNotFoundError:
        raise SpellmError(f"{p}: file does not exist") from None
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as exc:
        raise SpellmError(f"{p}: unreadable safetensors header ({exc})") from None
    out: dict[str, tuple[str, tuple[int, ...]]] = {}
    end = 0
    try:
        for name, info in header.items():
            if name == "__metadata__":
                continue
            shape = tuple(int(x) for x in info["shape"])
            start, stop = (int(x) for x in info["data_offsets"])
            if stop - start != math.prod(shape) * _ST_SIZES[info["dtype"]]:
                raise SpellmError(f"{p}: tensor {name} has {stop - start} bytes for shape {list(shape)}")
            out[name] = (info["dtype"], shape)
            end = max(end, stop)
    except (KeyError, TypeError, ValueError) as exc:
        raise SpellmError(f"{p}: malformed safetensors header ({type(exc).__name__}: {exc})") from None
    if 8 + n + end != size:
        raise SpellmError(
            f"{p}: truncated or padded safetensors file ({size} bytes, header says {8 + n + end})"
        )
    return out


def load_safetensors(path: str | os.PathLike) -> dict[str, Tensor]:
    """Load every tensor of a safetensors file (CPU) after checking the file is complete."""
    from safetensors import SafetensorError
    from safetensors.torch import load_file

    read_safetensors_header(path)
    try:
        return load_file(str(path))
    except (SafetensorError, OSError) as exc:
        raise SpellmError(f"{path}: cannot read ({exc})") from None


class SafetensorsWriter:
    """Writes a safetensors file tensor by tensor: the header comes first, from the announced shapes."""

    def __init__(
        self, path: str | os.PathLike, entries: list[tuple[str, tuple[int, ...], torch.dtype]]
    ) -> None:
        self.path = Path(path)
        self.tmp = self.path.with_name(f".{self.path.name}.tmp-{os.getpid()}")
        header: dict[str, Any] = {"__metadata__": {"format": "pt"}}
        offset = 0
        self._order: list[tuple[str, tuple[int, ...], torch.dtype]] = []
        for name, shape, dtype in entries:
            nbytes = math.prod(shape) * torch.empty((), dtype=dtype).element_size()
            header[name] = {
                "dtype": _ST_DTYPES[dtype],
                "shape": list(shape),
                "data_offsets": [offset, offset + nbytes],
            }
            offset += nbytes
            self._order.append((name, tuple(shape), dtype))
        raw = json.dumps(header, separators=(",", ":")).encode("utf-8")
        raw += b" " * (-len(raw) % 8)
        self._fh = open(self.tmp, "wb")  # noqa: SIM115 (closed in close())
        self._fh.write(struct.pack("<Q", len(raw)))
        self._fh.write(raw)
        self._next = 0

    def write(self, name: str, tensor: Tensor) -> None:
        """Append the next tensor; it must be the next announced one, with its shape and dtype."""
        want_name, shape, dtype = self._order[self._next]
        if name != want_name or tuple(tensor.shape) != shape or tensor.dtype != dtype:
            raise RuntimeError(
                f"safetensors stream expected {want_name} {shape} {dtype}, "
                f"got {name} {tuple(tensor.shape)} {tensor.dtype}"
            )
        flat = tensor.detach().to("cpu").contiguous().reshape(-1)
        if flat.numel():
            self._fh.write(memoryview(flat.view(torch.uint8).numpy()))
        self._next += 1

    def close(self) -> None:
        """Finish the file: every announced tensor written, fsync, rename into place."""
        if self._next != len(self._order):
            self._fh.close()
            raise RuntimeError(
                f"{self.path}: {len(self._order) - self._next} announced tensors were not written"
            )
        self._fh.flush()
        os.fsync(self._fh.fileno())
        self._fh.close()
        os.replace(self.tmp, self.path)


# ---------------------------------------------------------------------------------------------------------
# ZeRO-3 checkpoint reader


def _safe_globals() -> list[Any]:
    """The non-tensor types a DeepSpeed checkpoint with RNG states holds; nothing else is unpickled."""
    import numpy as np

    allowed: list[Any] = [np.ndarray, np.dtype]
    try:
        from numpy._core.multiarray import _reconstruct
    except ImportError:  # numpy < 2
        from numpy.core.multiarray import _reconstruct  # type: ignore[no-redef]
    allowed.append(_reconstruct)
    allowed += [type(np.dtype(t)) for t in ("uint32", "int64", "float64", "float32", "bool")]
    from deepspeed.runtime.fp16.loss_scaler import DynamicLossScaler, LossScaler
    from deepspeed.runtime.zero.config import ZeroStageEnum

    return [*allowed, LossScaler, DynamicLossScaler, ZeroStageEnum]


def torch_load(path: Path) -> Any:
    """`torch.load(mmap=True, weights_only=True)` with the checkpoint allowlist; errors name the file."""
    try:
        with torch.serialization.safe_globals(_safe_globals()):
            return torch.load(str(path), map_location="cpu", mmap=True, weights_only=True)
    except FileNotFoundError:
        raise SpellmError(f"{path}: file does not exist") from None
    except (RuntimeError, OSError, EOFError, ValueError) as exc:
        first = str(exc).strip().splitlines()[0] if str(exc).strip() else type(exc).__name__
        raise SpellmError(f"{path}: cannot be loaded as a weights-only checkpoint file ({first})") from None


def _natural_key(text: str) -> list[Any]:
    return [int(c) if c.isdigit() else c for c in re.split(r"(\d+)", text)]


def resolve_checkpoint(path: str | os.PathLike, tag: str | None = None) -> Path:
    """The directory holding the rank files: CK/TAG, CK/<latest>, or the given directory itself."""
    p = Path(path)
    if not p.is_dir():
        raise SpellmError(f"checkpoint {p} is not a directory")
    if tag is not None:
        p = p / tag
    elif not any(p.glob("*_model_states.pt")) and (p / "latest").is_file():
        p = p / (p / "latest").read_text(encoding="utf-8").strip()
    if not any(p.glob("*_model_states.pt")):
        raise SpellmError(f"{p} holds no DeepSpeed *_model_states.pt files (not a checkpoint tag directory)")
    return p


def _rank_files(root: Path, pattern: str) -> list[Path]:
    files = sorted(root.glob(pattern), key=lambda f: _natural_key(f.name))
    ranks = [int(re.search(r"zero_pp_rank_(\d+)_", f.name).group(1)) for f in files]  # type: ignore[union-attr]
    if ranks != list(range(len(files))):
        raise SpellmError(f"{root}: {pattern} files are not ranks 0..{len(files) - 1} (found ranks {ranks})")
    return files


@dataclass
class ZeroCheckpoint:
    """A read-only view of one ZeRO-3 checkpoint tag directory: names, shapes, one tensor at a time."""

    path: Path
    world_size: int = 0
    trainable: OrderedDict[str, torch.Size] = field(default_factory=OrderedDict)
    frozen: OrderedDict[str, torch.Size] = field(default_factory=OrderedDict)
    shared: dict[str, str] = field(default_factory=dict)
    buffers: dict[str, Tensor] = field(default_factory=dict)
    client_state: dict[str, Any] = field(default_factory=dict)
    global_steps: int | None = None

    @classmethod
    def open(cls, path: str | os.PathLike, tag: str | None = None) -> ZeroCheckpoint:
        """Map every rank's files and check they form one complete ZeRO-3 checkpoint."""
        root = resolve_checkpoint(path, tag)
        model_files = _rank_files(root, "zero_pp_rank_*_mp_rank_00_model_states.pt")
        optim_files = _rank_files(root, "*zero_pp_rank_*_mp_rank_00_optim_states.pt")
        models = [torch_load(f) for f in model_files]
        optims = []
        for f in optim_files:
            state = torch_load(f)
            if not isinstance(state, dict) or "optimizer_state_dict" not in state:
                raise SpellmError(f"{f}: not a DeepSpeed optimizer state file")
            optims.append(state["optimizer_state_dict"])
        if not optims:
            raise SpellmError(f"{root}: no *_optim_states.pt files (an export needs the fp32 master weights)")
        stage = int(optims[0].get("zero_stage", -1))
        if stage != 3:
            raise SpellmError(f"{root}: ZeRO stage {stage} checkpoint; export reads ZeRO-3 checkpoints")
        world = int(optims[0]["partition_count"])
        if not len(models) == len(optims) == world:
            raise SpellmError(
                f"{root}: {len(models)} model-state and {len(optims)} optimizer files for world size {world} "
                "(an incomplete or overwritten checkpoint)"
            )
        m0 = models[0]
        ck = cls(path=root, world_size=world)
        for group in m0["param_shapes"]:
            ck.trainable.update(group)
        ck.frozen.update(m0.get("frozen_param_shapes") or {})
        ck.shared = dict(m0.get("shared_params") or {})
        ck.buffers = {
            k: v for k, v in (m0.get("module") or {}).items() if k in set(m0.get("buffer_names") or [])
        }
        ck.global_steps = m0.get("global_steps")
        ck.client_state = m0.get("spellm") or {}
        ck._frozen_frags = [m.get("frozen_param_fragments") or {} for m in models]
        ck._groups = [list(o["fp32_flat_groups"]) for o in optims]
        ck._locate()
        return ck

    def _locate(self) -> None:
        """Offsets of every trainable parameter in the (concatenated) per-rank flat groups."""
        w = self.world_size
        sizes = [int(g.numel()) for g in self._groups[0]]
        self._group_starts = [0]
        for s in sizes:
            self._group_starts.append(self._group_starts[-1] + s)
        self._offsets: dict[str, tuple[int, int]] = {}
        offset = 0
        for name, shape in self.trainable.items():
            part = math.ceil(math.prod(shape) / w)
            self._offsets[name] = (offset, part)
            offset += part
        if offset != self._group_starts[-1]:
            raise SpellmError(
                f"{self.path}: trainable parameters need {offset} elements per rank but the fp32 flat groups "
                f"hold {self._group_starts[-1]}: unknown partitioning, cannot export"
            )

    @property
    def has_frozen_fragments(self) -> bool:
        """Whether every frozen parameter is stored in the checkpoint."""
        return all(all(n in frags for n in self.frozen) for frags in self._frozen_frags)

    @property
    def frozen_dtype(self) -> torch.dtype | None:
        """The dtype frozen parameters are stored in (the training dtype), None when none are stored."""
        for frags in self._frozen_frags[:1]:
            for t in frags.values():
                return t.dtype
        return None

    def _rank_slice(self, rank: int, offset: int, length: int) -> Tensor:
        pieces = []
        for gi, start in enumerate(self._group_starts[:-1]):
            end = self._group_starts[gi + 1]
            lo, hi = max(offset, start), min(offset + length, end)
            if lo < hi:
                pieces.append(self._groups[rank][gi][lo - start : hi - start])
        return pieces[0] if len(pieces) == 1 else torch.cat(pieces)

    def tensor(self, name: str) -> Tensor:
        """The full tensor `name` (module name, e.g. `base.model.norm.weight`) reassembled from all ranks."""
        if name in self.trainable:
            shape = self.trainable[name]
            offset, part = self._offsets[name]
            flat = torch.cat([self._rank_slice(r, offset, part) for r in range(self.world_size)])
        elif name in self.frozen:
            shape = self.frozen[name]
            frags = [f.get(name) for f in self._frozen_frags]
            if any(f is None for f in frags):
                raise KeyError(name)
            flat = torch.cat([f.reshape(-1) for f in frags])
        else:
            raise KeyError(name)
        return flat[: math.prod(shape)].view(shape)  # `flat` is a fresh tensor (torch.cat), not the map


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


def _meta(ck: ZeroCheckpoint) -> dict[str, Any]:
    """Training metadata: `spellm_meta.json` beside the checkpoint, else the client state it holds."""
    path = ck.path / META_NAME
    if path.is_file():
        try:
            meta = json.loads(path.read_text(encoding="utf-8"))
        except (OSError, json.JSONDecodeError) as exc:
            raise SpellmError(f"{path}: not valid JSON ({exc})") from None
    else:
        cs = ck.client_state
        cfg = cs.get("config") or {}
        meta = {
            "step": (cs.get("state") or {}).get("step", ck.global_steps),
            "charset_hash": cs.get("charset_hash"),
            "tokenizer_hash": cs.get("tokenizer_hash"),
            "model_path": (cfg.get("model") or {}).get("path"),
            "k": (cfg.get("model") or {}).get("k"),
            "config": cfg,
        }
    if meta.get("step") is None:
        meta["step"] = ck.global_steps
    return meta


def _hf_name(name: str, where: Path) -> str:
    if not name.startswith(BASE_PREFIX):
        raise SpellmError(f"{where}: parameter {name!r} is neither under 'base.' nor the char heads")
    return name[len(BASE_PREFIX) :]


def _plan_shards(entries: list[tuple[str, tuple[int, ...], torch.dtype]], max_bytes: int) -> list[list[Any]]:
    shards: list[list[Any]] = [[]]
    size = 0
    for e in entries:
        nbytes = math.prod(e[1]) * torch.empty((), dtype=e[2]).element_size()
        if shards[-1] and size + nbytes > max_bytes:
            shards.append([])
            size = 0
        shards[-1].append(e)
        size += nbytes
    return shards


def _shard_names(n: int) -> list[str]:
    if n == 1:
        return ["model.safetensors"]
    return [f"model-{i + 1:05d}-of-{n:05d}.safetensors" for i in range(n)]


def _base_source(base_dir: Path) -> dict[str, Path]:
    """HF tensor name → safetensors file of the base model."""
    from spellm_ds.inference import _model_files

    out: dict[str, Path] = {}
    for f in _model_files(base_dir):
        for name in read_safetensors_header(f):
            out[name] = f
    return out


def _rank_info() -> tuple[int, int]:
    from spellm_ds.dist import detect

    info = detect()
    return info.rank, info.world_size


def _char_table(meta: dict[str, Any], tokenizer: Any, base_cfg: dict[str, Any], k: int) -> Any:
    """The checkpoint's CharTable: its charset file when training named one, else rebuilt; hash checked."""
    from spellm_ds.charset import CharTable

    want = meta.get("charset_hash")
    charset_file = ((meta.get("config") or {}).get("model") or {}).get("charset")
    if charset_file:
        return CharTable.load(charset_file, expected_hash=want)
    table = CharTable.build(tokenizer, k=k, vocab_size=int(base_cfg.get("vocab_size") or len(tokenizer)))
    if want and table.hash != want:
        table_small = CharTable.build(tokenizer, k=k)
        if table_small.hash == want:
            return table_small
        raise SpellmError(
            f"the char table rebuilt from the tokenizer (k={k}) hashes to {table.hash[:12]}..., checkpoint "
            f"was trained with {want[:12]}...: tokenizer or charset changed since training"
        )
    return table


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


def _nbytes(entry: tuple[str, tuple[int, ...], torch.dtype]) -> int:
    return math.prod(entry[1]) * torch.empty((), dtype=entry[2]).element_size()


def _resolve_dtype(dtype: str | torch.dtype, default: torch.dtype) -> torch.dtype:
    if isinstance(dtype, torch.dtype):
        return dtype
    if dtype == "auto":
        return default
    if dtype not in EXPORT_DTYPES:
        raise SpellmError(f"dtype {dtype!r} is not one of auto, {', '.join(EXPORT_DTYPES)}")
    return EXPORT_DTYPES[dtype]


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
        file_names = _shard_names(len(file_plan))
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
        writer = SafetensorsWriter(out / ORIGINAL_MLPS_FILE, plan.originals)
        for hf_name, _shape, dt in plan.originals:
            writer.write(hf_name, plan.fetch_original(hf_name).to(dt))
        writer.close()
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
            _write_hf_config(plan.base_dir, out, _dtype_name(plan.dtype))
    _barrier(world)
    files = [*file_names, CHAR_HEADS_FILE] + ([ORIGINAL_MLPS_FILE] if write_originals else [])
    total = sum(_nbytes(e) for e in plan.entries)
    if rank == 0:
        if not write_originals:
            (out / ORIGINAL_MLPS_FILE).unlink(missing_ok=True)  # a stale one from an overwritten export
        if not plan.delta:
            _cleanup_stale_shards(out, set(file_names))
            if len(file_names) > 1:
                weight_map = {e[0]: file_names[i] for i, fp in enumerate(file_plan) for e in fp}
                _write_json(
                    out / "model.safetensors.index.json",
                    {"metadata": {"total_size": total}, "weight_map": weight_map},
                )
            else:
                (out / "model.safetensors.index.json").unlink(missing_ok=True)
        _write_json(out / SPELLM_CONFIG, _spellm_config(plan, files, heads_shape))
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
        dtype=_dtype_name(plan.dtype),
    )


def _trained_layers(names: list[str]) -> list[int]:
    return sorted({int(m.group(1)) for n in names if (m := re.search(r"layers\.(\d+)\.", n))})


def _dtype_name(dtype: torch.dtype) -> str:
    return next(n for n, d in EXPORT_DTYPES.items() if d == dtype)


def _spellm_config(plan: _Plan, files: list[str], heads_shape: tuple[int, ...]) -> dict[str, Any]:
    from transformers import AutoConfig

    from spellm_ds.fingerprint import config_hash, tokenizer_hash, weights_hash

    try:
        base_cfg = AutoConfig.from_pretrained(str(plan.base_dir), trust_remote_code=plan.trust_remote_code)
    except (OSError, ValueError) as exc:
        raise SpellmError(f"{plan.base_dir}: cannot read config.json ({exc})") from None
    train_cfg = plan.info.get("train_config") or {}
    held = (ORIGINAL_FROM_BASE if plan.delta else ORIGINAL_MLPS_FILE) if plan.original_mlps else None
    return {
        "format": EXPORT_FORMAT,
        "format_version": EXPORT_VERSION,
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
        "original_mlps": held,
        "dtype": _dtype_name(plan.dtype),
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
    meta = _meta(ck)
    base_dir = Path(base_model or meta.get("model_path") or "")
    _check_base_dir(base_dir, f"checkpoint {ck.path}")
    if HEADS_NAME not in ck.trainable and HEADS_NAME not in ck.frozen:
        raise SpellmError(f"{ck.path}: no {HEADS_NAME} parameter: not a SpeLLM checkpoint")
    base_cfg = json.loads((base_dir / "config.json").read_text(encoding="utf-8"))
    train_dtype = ((meta.get("config") or {}).get("model") or {}).get("dtype")
    out_dtype = _resolve_dtype(dtype, _TRAIN_DTYPES.get(train_dtype) or ck.frozen_dtype or torch.float32)

    heads_shape = tuple(ck.trainable.get(HEADS_NAME) or ck.frozen[HEADS_NAME])
    shared = set(ck.shared)
    trained = [n for n in ck.trainable if n != HEADS_NAME and n not in shared]
    # The online teacher's frozen copy of the original MLPs (spellm_ds.teacher) is no part of the export.
    frozen = [n for n in ck.frozen if n != HEADS_NAME and n not in shared and not n.startswith("teacher.")]
    tokenizer = _load_tokenizer(base_dir, trust_remote_code)
    k = int(meta.get("k") or ((meta.get("config") or {}).get("model") or {}).get("k") or 10)
    table = _char_table(meta, tokenizer, base_cfg, k)
    if heads_shape[0] != table.k * table.charset.size:
        raise SpellmError(
            f"{ck.path}: char heads have {heads_shape[0]} rows, the char table needs k·|C| = "
            f"{table.k}·{table.charset.size}"
        )
    from_base = not ck.has_frozen_fragments
    base_files = _base_source(base_dir) if (from_base or delta or original_mlps) else {}
    if delta or original_mlps:
        missing = [_hf_name(n, ck.path) for n in trained if _hf_name(n, ck.path) not in base_files]
        if missing:
            raise SpellmError(
                f"base model {base_dir} has no tensors {missing[:5]}: not this checkpoint's base"
            )
    if delta:
        names = trained
        buffers: dict[str, Tensor] = {}
    else:
        names = sorted(trained + frozen, key=_natural_key)
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
            return _base_tensor(base_files, hf_name)
        return ck.tensor(name)

    originals = [(_hf_name(n, ck.path), tuple(ck.trainable[n]), out_dtype) for n in trained]
    if original_mlps and not delta:
        _check_original_shapes(base_dir, originals)

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
        fetch_original=lambda hf_name: _base_tensor(base_files, hf_name),
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
            (n, tuple(p.shape), out_dtype)
            for n, p in sorted(params.items(), key=lambda x: _natural_key(x[0]))
        ]
        entries += [(n, tuple(b.shape), b.dtype) for n, b in buffers.items()]
    tensors = {**params, **buffers}
    originals = [(n, tuple(params[n].shape), out_dtype) for n in trained]
    base_files: dict[str, Path] = {}
    if original_mlps and not delta:
        base_files = _base_source(base_dir)
        missing = [n for n in trained if n not in base_files]
        if missing:
            raise SpellmError(f"base model {base_dir} has no tensors {missing[:5]}: not this model's base")
        _check_original_shapes(base_dir, originals)
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
        fetch_original=lambda name: _base_tensor(base_files, name),
    )
    return _write_export(plan, progress=False)


def _base_tensor(base_files: dict[str, Path], hf_name: str) -> Tensor:
    """One tensor of the base model by HF name (`base_files`: name → safetensors file)."""
    from safetensors import safe_open

    with safe_open(str(base_files[hf_name]), framework="pt") as fh:
        return fh.get_tensor(hf_name)


def _check_original_shapes(base_dir: Path, originals: list[tuple[str, tuple[int, ...], torch.dtype]]) -> None:
    """Refuse a base model whose tensors for the trained names have other shapes than the trained ones."""
    from spellm_ds.inference import _model_files, tensor_shapes

    shapes = tensor_shapes(_model_files(base_dir))
    bad = [f"{n} {shape} vs base {shapes.get(n)}" for n, shape, _ in originals if shapes.get(n) != shape]
    if bad:
        raise SpellmError(f"base model {base_dir} does not fit the trained tensors: " + "; ".join(bad[:5]))


def _write_json(path: Path, obj: Any) -> None:
    tmp = path.with_name(f".{path.name}.tmp-{os.getpid()}")
    tmp.write_text(json.dumps(obj, indent=2, sort_keys=True) + "\n", encoding="utf-8")
    os.replace(tmp, path)


def _write_hf_config(base_dir: Path, out: Path, dtype_name: str) -> None:
    """Copy the base model's config (dtype set to the export's) and generation config."""
    cfg = json.loads((base_dir / "config.json").read_text(encoding="utf-8"))
    keys = [key for key in ("dtype", "torch_dtype") if key in cfg] or ["dtype"]
    for key in keys:
        cfg[key] = dtype_name
    _write_json(out / "config.json", cfg)
    gen = base_dir / "generation_config.json"
    if gen.is_file():
        shutil.copyfile(gen, out / "generation_config.json")


def _cleanup_stale_shards(out: Path, keep: set[str]) -> None:
    for f in out.glob("model*.safetensors"):
        if f.name not in keep:
            f.unlink()


_PG_OWNED = False


def _barrier(world: int) -> None:
    """A barrier across export ranks (a gloo group is created on first use when world > 1)."""
    global _PG_OWNED
    if world <= 1:
        return
    import torch.distributed as dist

    if not dist.is_initialized():
        from spellm_ds.dist import detect, export_torch_env

        export_torch_env(detect())
        dist.init_process_group("gloo")
        _PG_OWNED = True
    dist.barrier()
