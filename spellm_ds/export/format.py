"""The export directory's format: file names, `spellm_config.json`, safetensors I/O, opening a directory.

`export.write` writes export directories and `inference.model` / `eval.evaluate` read or
update them; all three go through this module and none imports another for it.

Layout (full export; `--delta` writes `delta.safetensors` instead of the model weights and HF config):

    config.json, generation_config.json       the base model's HF config (dtype set to the export dtype)
    model.safetensors | model-0000i-of-0000N.safetensors + model.safetensors.index.json
    tokenizer files                            the base model's tokenizer
    char_heads.safetensors                     tensor `weight` [k·|C|, d] (row i·|C| + c: head i, symbol c)
    original_mlps.safetensors                  the original (teacher) values of the trained tensors
    charset.json                               the CharTable the heads were trained against
    spellm_config.json                         written last: a directory without it is incomplete

`spellm_config.json` (format `spellm-ds-export`, version 1) always holds `k`, `num_chars`,
`charset_hash`, `delta` and `fallback_threshold`; see `spellm_ds.export.write` for every field it writes and
`spellm_ds.eval.evaluate.write_threshold` for the calibration fields it adds.

safetensors files are read through the `safetensors` package, which refuses truncated or padded files;
`SafetensorsWriter` streams one tensor at a time after writing the header from the announced shapes (the
package has no streamed writer), so an export never holds a whole model in memory.
"""

from __future__ import annotations

import math
import os
import shutil
import struct
from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from torch import Tensor

from spellm_ds.errors import SpellmError
from spellm_ds.jsonio import fsync_dir, read_json, write_json

SPELLM_CONFIG = "spellm_config.json"
CHAR_HEADS_FILE = "char_heads.safetensors"
CHARSET_FILE = "charset.json"
DELTA_FILE = "delta.safetensors"
ORIGINAL_MLPS_FILE = "original_mlps.safetensors"  # original weights of the trained tensors (full export)
ORIGINAL_FROM_BASE = "base model"  # `original_mlps` of a delta export: the base model's own weights
INDEX_FILE = "model.safetensors.index.json"
EXPORT_FORMAT = "spellm-ds-export"
EXPORT_VERSION = 1
REQUIRED_FIELDS = ("k", "num_chars", "charset_hash", "delta", "fallback_threshold")
PAPER_THRESHOLD = 0.22  # mean head entropy (nats) the paper falls back above: the default threshold

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


# ---------------------------------------------------------------------------------------------------------
# spellm_config.json


def read_spellm_config(model_dir: str | os.PathLike) -> dict[str, Any]:
    """Read and check `spellm_config.json` of an export directory."""
    return read_json(
        Path(model_dir) / SPELLM_CONFIG,
        "SpeLLM export config",
        fmt=EXPORT_FORMAT,
        version=EXPORT_VERSION,
        required=REQUIRED_FIELDS,
        missing_hint=f"{model_dir} is not a complete SpeLLM export (no {SPELLM_CONFIG})",
    )


def write_spellm_config(model_dir: str | os.PathLike, cfg: Mapping[str, Any]) -> None:
    """Write `spellm_config.json` (format and version set here); the file that completes an export."""
    doc = {**cfg, "format": EXPORT_FORMAT, "format_version": EXPORT_VERSION}
    missing = [key for key in REQUIRED_FIELDS if key not in doc]
    if missing:
        raise SpellmError(f"{model_dir}: export config lacks {', '.join(missing)}")
    write_json(Path(model_dir) / SPELLM_CONFIG, doc)


def update_spellm_config(model_dir: str | os.PathLike, changes: Mapping[str, Any]) -> dict[str, Any]:
    """Merge `changes` into an export's `spellm_config.json` (atomically); return the new config."""
    cfg = {**read_spellm_config(model_dir), **changes}
    write_spellm_config(model_dir, cfg)
    return cfg


def write_hf_config(base_dir: Path, out: Path, dtype_name: str) -> None:
    """Copy the base model's config (dtype set to the export's) and generation config into `out`."""
    cfg = read_json(base_dir / "config.json", "HF model config")
    for key in [key for key in ("dtype", "torch_dtype") if key in cfg] or ["dtype"]:
        cfg[key] = dtype_name
    write_json(out / "config.json", cfg)
    gen = base_dir / "generation_config.json"
    if gen.is_file():
        shutil.copyfile(gen, out / "generation_config.json")


def weight_file_names(n: int) -> list[str]:
    """The names of the `n` model weight files of a full export (HF's sharded naming when n > 1)."""
    if n == 1:
        return ["model.safetensors"]
    return [f"model-{i + 1:05d}-of-{n:05d}.safetensors" for i in range(n)]


def write_weight_index(out: Path, weight_map: dict[str, str] | None, total_size: int) -> None:
    """Write the HF safetensors index of a sharded export, or remove a stale one (`weight_map` None)."""
    if weight_map is None:
        (out / INDEX_FILE).unlink(missing_ok=True)
        return
    write_json(out / INDEX_FILE, {"metadata": {"total_size": total_size}, "weight_map": weight_map})


# ---------------------------------------------------------------------------------------------------------
# safetensors


def model_files(model_dir: str | os.PathLike) -> list[Path]:
    """The HF weight files of a full model directory (index-listed shards or one model.safetensors)."""
    root = Path(model_dir)
    index = root / INDEX_FILE
    if index.is_file():
        weight_map = read_json(index, "safetensors index", required=("weight_map",))["weight_map"]
        if not isinstance(weight_map, dict):
            raise SpellmError(f"{index}: weight_map is not an object")
        return [root / name for name in sorted(set(weight_map.values()))]
    single = root / "model.safetensors"
    if single.is_file():
        return [single]
    raise SpellmError(f"{root}: no model.safetensors or {INDEX_FILE}")


def read_safetensors_header(path: str | os.PathLike) -> dict[str, tuple[str, tuple[int, ...]]]:
    """Name → (dtype, shape) of a safetensors file, after checking that the file is complete."""
    from safetensors import SafetensorError, safe_open

    p = Path(path)
    if not p.is_file():
        raise SpellmError(f"{p}: file does not exist")
    try:
        with safe_open(str(p), framework="pt") as fh:
            out = {}
            for name in fh.keys():  # noqa: SIM118 (safe_open has keys(), no iteration)
                piece = fh.get_slice(name)
                out[name] = (piece.get_dtype(), tuple(int(x) for x in piece.get_shape()))
            return out
    except (SafetensorError, OSError) as exc:
        raise SpellmError(f"{p}: truncated or corrupt safetensors file ({exc})") from None


def tensor_shapes(files: list[Path]) -> dict[str, tuple[int, ...]]:
    """Name → shape of every tensor in safetensors files, after checking each file is complete."""
    return {name: shape for f in files for name, (_dtype, shape) in read_safetensors_header(f).items()}


def tensor_index(model_dir: str | os.PathLike) -> dict[str, tuple[Path, tuple[int, ...]]]:
    """HF tensor name → (the safetensors file of a model directory that holds it, its shape)."""
    return {
        name: (f, shape)
        for f in model_files(model_dir)
        for name, (_, shape) in read_safetensors_header(f).items()
    }


def read_tensor(path: Path, name: str) -> Tensor:
    """One tensor of a safetensors file, without reading the rest."""
    from safetensors import safe_open

    with safe_open(str(path), framework="pt") as fh:
        return fh.get_tensor(name)


def load_safetensors(path: str | os.PathLike) -> dict[str, Tensor]:
    """Load every tensor of a safetensors file (CPU) after checking the file is complete."""
    from safetensors import SafetensorError
    from safetensors.torch import load_file

    if not Path(path).is_file():
        raise SpellmError(f"{path}: file does not exist")
    try:  # the package checks the header and that the data covers the file exactly
        return load_file(str(path))
    except (SafetensorError, OSError) as exc:
        raise SpellmError(f"{path}: truncated or corrupt safetensors file ({exc})") from None


def nbytes(shape: tuple[int, ...], dtype: torch.dtype) -> int:
    """Bytes of a tensor of `shape` and `dtype`."""
    return math.prod(shape) * torch.empty((), dtype=dtype).element_size()


class SafetensorsWriter:
    """Writes a safetensors file tensor by tensor: the header comes first, from the announced shapes."""

    def __init__(
        self, path: str | os.PathLike, entries: list[tuple[str, tuple[int, ...], torch.dtype]]
    ) -> None:
        import json

        self.path = Path(path)
        self.tmp = self.path.with_name(f".{self.path.name}.tmp-{os.getpid()}")
        header: dict[str, Any] = {"__metadata__": {"format": "pt"}}
        offset = 0
        self._order: list[tuple[str, tuple[int, ...], torch.dtype]] = []
        for name, shape, dtype in entries:
            size = nbytes(tuple(shape), dtype)
            header[name] = {
                "dtype": _ST_DTYPES[dtype],
                "shape": list(shape),
                "data_offsets": [offset, offset + size],
            }
            offset += size
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
        fsync_dir(self.path.parent)


def write_safetensors(path: Path, tensors: Mapping[str, Tensor]) -> None:
    """Write a small safetensors file from in-memory tensors (streamed, atomic)."""
    writer = SafetensorsWriter(path, [(n, tuple(t.shape), t.dtype) for n, t in tensors.items()])
    for name, t in tensors.items():
        writer.write(name, t)
    writer.close()


# ---------------------------------------------------------------------------------------------------------
# Opening an export directory


@dataclass
class ExportDir:
    """The checked contents of an export directory that inference needs before building the model."""

    root: Path
    config: dict[str, Any]
    table: Any  # spellm_ds.charset.CharTable
    heads: Tensor  # [k·|C|, d]
    weights_dir: Path  # where the base weights load from: the export, or a delta's base model
    delta: dict[str, Tensor]  # HF name → trained tensor (delta export), else empty
    trained: list[str]
    originals_source: str | None  # ORIGINAL_MLPS_FILE-like name, ORIGINAL_FROM_BASE, or None

    @property
    def has_originals(self) -> bool:
        """Whether the original weights of the trained tensors are available (exact fallback)."""
        if not self.trained:
            return True
        if self.config["delta"]:
            return self.originals_source == ORIGINAL_FROM_BASE
        return bool(self.originals_source)

    def original_weights(self) -> dict[str, Tensor]:
        """The original weights of the trained tensors of a full export (HF names)."""
        if not self.trained:
            return {}
        return load_safetensors(self.root / str(self.originals_source))


def open_export(model_dir: str | os.PathLike, base_model: str | os.PathLike | None = None) -> ExportDir:
    """Check every file of an export directory (and a delta's base model) and read its small parts."""
    from spellm_ds.charset import CharTable

    root = Path(model_dir)
    if not root.is_dir():
        raise SpellmError(f"model directory {root} does not exist")
    cfg = read_spellm_config(root)
    table = CharTable.load(root / CHARSET_FILE, expected_hash=cfg["charset_hash"])
    k, num_chars = int(cfg["k"]), int(cfg["num_chars"])
    if table.k != k or table.charset.size != num_chars:
        raise SpellmError(
            f"{root / CHARSET_FILE}: k={table.k}, {table.charset.size} symbols; "
            f"{SPELLM_CONFIG} says k={k}, {num_chars} symbols"
        )
    heads = load_safetensors(root / CHAR_HEADS_FILE)
    if set(heads) != {"weight"}:
        raise SpellmError(f"{root / CHAR_HEADS_FILE}: expected one tensor 'weight', found {sorted(heads)}")
    trained = list(cfg.get("trained_tensors") or [])
    # Exports written before `original_mlps` existed: a delta's base model holds the originals.
    source = cfg.get("original_mlps", ORIGINAL_FROM_BASE if cfg["delta"] else None)
    delta: dict[str, Tensor] = {}
    if cfg["delta"]:
        weights_dir = Path(base_model or (cfg.get("base_model") or {}).get("path") or "")
        delta = load_safetensors(root / DELTA_FILE)
        check_delta_base(weights_dir, cfg, delta, root)
    else:
        weights_dir = root
        tensor_shapes(model_files(root))  # every shard present and complete before loading
        if source and trained:
            shapes = tensor_shapes([root / str(source)])
            if set(shapes) != set(trained):
                raise SpellmError(
                    f"{root / str(source)}: holds {sorted(shapes)[:5]}..., expected the trained tensors "
                    f"{trained[:5]}..."
                )
    return ExportDir(
        root=root,
        config=cfg,
        table=table,
        heads=heads["weight"],
        weights_dir=weights_dir,
        delta=delta,
        trained=trained,
        originals_source=source,
    )


def check_delta_base(base_dir: Path, cfg: dict[str, Any], delta: dict[str, Tensor], where: Path) -> None:
    """Refuse a base model that is missing or differs in architecture, shapes or weights from the record."""
    from transformers import AutoConfig

    from spellm_ds.fingerprint import config_hash, weights_hash

    if not str(base_dir) or not (base_dir / "config.json").is_file():
        raise SpellmError(
            f"{where} is a delta export; its base model {str(base_dir) or '(none recorded)'} is not a model "
            "directory: pass the base model's directory (--base-model)"
        )
    rec = cfg.get("base_model") or {}
    try:
        base_cfg = AutoConfig.from_pretrained(str(base_dir))
    except (OSError, ValueError) as exc:
        raise SpellmError(f"{base_dir}: cannot read config.json ({exc})") from None
    shapes = tensor_shapes(model_files(base_dir))
    bad = [
        f"{name} {tuple(t.shape)} vs base {shapes.get(name)}"
        for name, t in delta.items()
        if shapes.get(name) != tuple(t.shape)
    ]
    if bad:
        raise SpellmError(
            f"{where / DELTA_FILE} does not fit the base model {base_dir}: " + "; ".join(bad[:5])
        )
    if rec.get("config_hash") and config_hash(base_cfg) != rec["config_hash"]:
        raise SpellmError(
            f"base model {base_dir} has another architecture config than the one the delta was trained on"
        )
    if rec.get("weights_hash") and weights_hash(base_dir) != rec["weights_hash"]:
        raise SpellmError(
            f"base model {base_dir} has other weight files than the ones the delta was trained on "
            f"(weights hash {rec['weights_hash'][:12]}... recorded)"
        )
