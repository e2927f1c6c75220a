"""The teacher-shard format: one definition of a sample's bytes and of `index.json`.

A dataset is a directory (or URL prefix) holding `index.json` and tar shards `shard-NNNNNN.tar`.
Shard *i* holds global sequences ``[i*S, (i+1)*S)``; the sample key is the global sequence index as
12 decimal digits. Each tar member is ``<key>.spl``: one zstd frame holding

    header  (little endian, `_HEADER`): magic b"SPLM", format version, seq_len L, top_k K,
            vocab_size V, id width in bytes (2 when V <= 65536, else 4), flags
    body    input_ids      [L]     ids, byte-shuffled (all low bytes, then all high bytes)
            topk_ids       [L, K]  ids, byte-shuffled
            topk_logprobs  [L, K]  float16 log-softmax over the full vocabulary, byte-shuffled
            loss_mask      [L]     bit-packed, present only when flag `HAS_MASK` is set

Position t's top-K are the teacher's predictions for token t+1 (the prediction after input t).
Byte-shuffling puts the mostly-constant high bytes together, which zstd compresses well: a 32K
vocabulary stores ~17-19 bytes per token against 34 for plain int32/int32/float16 arrays.
Decoding never unpickles: arrays come from `np.frombuffer` on fixed offsets; every size, the
version and the values' finiteness are checked, and errors name the shard and the sample key.
"""

from __future__ import annotations

import hashlib
import io
import json
import os
import re
import struct
import tarfile
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import zstandard

from spellm_ds.errors import ShardError, SpellmError

FORMAT_NAME = "spellm-ds-shards"
FORMAT_VERSION = 1
MAGIC = b"SPLM"
MEMBER_SUFFIX = ".spl"
INDEX_NAME = "index.json"
KEY_DIGITS = 12
HAS_MASK = 1
# magic, version, seq_len, top_k, vocab_size, id_bytes, flags
_HEADER = struct.Struct("<4sHIHIBB")
_KEY_RE = re.compile(rf"^[0-9]{{{KEY_DIGITS}}}$")
_MEMBER_RE = re.compile(rf"^([0-9]{{{KEY_DIGITS}}})\.spl$")
ZSTD_LEVEL = 3

DTYPES = {"input_ids": "int32", "topk_ids": "int32", "topk_logprobs": "float16", "loss_mask": "bool"}


def shard_name(index: int) -> str:
    """Return the file name of global shard `index`."""
    return f"shard-{index:06d}.tar"


def sample_key(global_index: int) -> str:
    """Return the sample key of global sequence `global_index`."""
    return f"{global_index:0{KEY_DIGITS}d}"


def key_to_index(key: str) -> int:
    """Return the global sequence index encoded in a sample key."""
    if not _KEY_RE.match(key):
        raise ShardError(f"sample key {key!r} is not {KEY_DIGITS} decimal digits")
    return int(key)


def _id_bytes(vocab_size: int) -> int:
    return 2 if vocab_size <= 1 << 16 else 4


def _shuffle(arr: np.ndarray) -> bytes:
    flat = np.ascontiguousarray(arr).reshape(-1)
    return flat.view(np.uint8).reshape(flat.size, flat.itemsize).T.tobytes()


def _unshuffle(buf: memoryview | bytes, offset: int, count: int, dtype: np.dtype) -> tuple[np.ndarray, int]:
    nbytes = count * dtype.itemsize
    raw = np.frombuffer(buf, dtype=np.uint8, count=nbytes, offset=offset)
    out = np.empty(count, dtype=dtype)
    out.view(np.uint8).reshape(count, dtype.itemsize)[:] = raw.reshape(dtype.itemsize, count).T
    return out, offset + nbytes


def encode_sample(
    input_ids: np.ndarray,
    topk_ids: np.ndarray,
    topk_logprobs: np.ndarray,
    vocab_size: int,
    loss_mask: np.ndarray | None = None,
    level: int = ZSTD_LEVEL,
) -> bytes:
    """Encode one packed sequence and its teacher top-k into one zstd-compressed payload."""
    input_ids = np.asarray(input_ids)
    topk_ids = np.asarray(topk_ids)
    topk_logprobs = np.asarray(topk_logprobs)
    if input_ids.ndim != 1:
        raise SpellmError(f"input_ids must be [L], got shape {input_ids.shape}")
    seq_len = input_ids.shape[0]
    if topk_ids.ndim != 2 or topk_ids.shape[0] != seq_len:
        raise SpellmError(f"topk_ids must be [{seq_len}, K], got shape {topk_ids.shape}")
    top_k = topk_ids.shape[1]
    if topk_logprobs.shape != topk_ids.shape:
        raise SpellmError(f"topk_logprobs shape {topk_logprobs.shape} != topk_ids shape {topk_ids.shape}")
    width = _id_bytes(vocab_size)
    id_dtype = np.dtype("<u2" if width == 2 else "<u4")
    for name, ids in (("input_ids", input_ids), ("topk_ids", topk_ids)):
        if ids.size and (ids.min() < 0 or ids.max() >= vocab_size):
            raise SpellmError(f"{name} outside [0, {vocab_size})")
    flags = 0
    parts = [b"", _shuffle(input_ids.astype(id_dtype)), _shuffle(topk_ids.astype(id_dtype))]
    parts.append(_shuffle(topk_logprobs.astype("<f2")))
    if loss_mask is not None and not bool(np.all(loss_mask)):
        flags |= HAS_MASK
        parts.append(np.packbits(np.asarray(loss_mask, dtype=bool)).tobytes())
    parts[0] = _HEADER.pack(MAGIC, FORMAT_VERSION, seq_len, top_k, vocab_size, width, flags)
    return zstandard.ZstdCompressor(level=level).compress(b"".join(parts))


_DCTX = zstandard.ZstdDecompressor()


def decode_sample(payload: bytes, where: str = "<memory>", check_values: bool = True) -> dict[str, Any]:
    """Decode one payload into numpy arrays; `where` (shard and key) is named in every error."""
    try:
        raw = _DCTX.decompress(payload)
    except zstandard.ZstdError as exc:
        raise ShardError(f"{where}: not a valid zstd frame ({exc})") from None
    if len(raw) < _HEADER.size:
        raise ShardError(f"{where}: payload of {len(raw)} bytes is shorter than the header")
    magic, version, seq_len, top_k, vocab_size, width, flags = _HEADER.unpack_from(raw, 0)
    if magic != MAGIC:
        raise ShardError(f"{where}: bad magic {magic!r} (expected {MAGIC!r})")
    if version != FORMAT_VERSION:
        raise ShardError(f"{where}: format version {version} is not supported (expected {FORMAT_VERSION})")
    if width not in (2, 4) or width != _id_bytes(vocab_size):
        raise ShardError(f"{where}: id width {width} does not match vocab_size {vocab_size}")
    if flags & ~HAS_MASK:
        raise ShardError(f"{where}: unknown flags {flags:#x}")
    n = seq_len * top_k
    mask_bytes = (seq_len + 7) // 8 if flags & HAS_MASK else 0
    expected = _HEADER.size + width * (seq_len + n) + 2 * n + mask_bytes
    if len(raw) != expected:
        raise ShardError(f"{where}: payload is {len(raw)} bytes, header implies {expected}")
    id_dtype = np.dtype("<u2" if width == 2 else "<u4")
    off = _HEADER.size
    input_ids, off = _unshuffle(raw, off, seq_len, id_dtype)
    topk_ids, off = _unshuffle(raw, off, n, id_dtype)
    topk_lp, off = _unshuffle(raw, off, n, np.dtype("<f2"))
    if mask_bytes:
        bits = np.frombuffer(raw, dtype=np.uint8, count=mask_bytes, offset=off)
        loss_mask = np.unpackbits(bits, count=seq_len).astype(bool)
    else:
        loss_mask = np.ones(seq_len, dtype=bool)
    topk_ids = topk_ids.reshape(seq_len, top_k)
    topk_lp = topk_lp.reshape(seq_len, top_k)
    if check_values:
        if input_ids.size and input_ids.max() >= vocab_size:
            raise ShardError(f"{where}: input_ids has id {int(input_ids.max())} >= vocab_size {vocab_size}")
        if topk_ids.size and topk_ids.max() >= vocab_size:
            raise ShardError(f"{where}: topk_ids has id {int(topk_ids.max())} >= vocab_size {vocab_size}")
        if not np.isfinite(topk_lp).all():
            raise ShardError(f"{where}: topk_logprobs holds NaN or infinite values")
    return {
        "input_ids": input_ids.astype(np.int32),
        "topk_ids": topk_ids.astype(np.int32),
        "topk_logprobs": topk_lp,
        "loss_mask": loss_mask,
        "vocab_size": vocab_size,
    }


def member_key(name: str, where: str) -> str:
    """Return the sample key of tar member `name`, rejecting anything but `<12 digits>.spl`."""
    m = _MEMBER_RE.match(name)
    if not m:
        raise ShardError(f"{where}: unexpected tar member {name!r} (only <key>{MEMBER_SUFFIX} is allowed)")
    return m.group(1)


def iter_tar_members(fileobj: Any, where: str) -> Iterator[tuple[str, bytes]]:
    """Yield (key, payload) from a shard tar stream; rejects links, directories and foreign names."""
    try:
        with tarfile.open(fileobj=fileobj, mode="r|") as tar:
            for info in tar:
                if not info.isreg():
                    raise ShardError(f"{where}: tar member {info.name!r} is not a regular file")
                key = member_key(info.name, where)
                f = tar.extractfile(info)
                data = f.read() if f is not None else b""
                if len(data) != info.size:
                    raise ShardError(f"{where}/{key}: truncated member ({len(data)} of {info.size} bytes)")
                yield key, data
    except tarfile.TarError as exc:
        raise ShardError(f"{where}: broken tar ({exc})") from None


def iter_shard(path: str | os.PathLike, check_values: bool = True) -> Iterator[dict[str, Any]]:
    """Yield every sample of one shard file as a dict with `__key__` and its numpy arrays."""
    where = str(path)
    with open(path, "rb") as fh:
        for key, payload in iter_tar_members(fh, where):
            sample = decode_sample(payload, f"{where}/{key}", check_values=check_values)
            sample["__key__"] = key
            yield sample


def write_shard(path: str | os.PathLike, samples: list[tuple[str, bytes]]) -> tuple[int, str]:
    """Write (key, payload) pairs as a deterministic tar via a temporary name; return (bytes, sha256)."""
    path = Path(path)
    tmp = path.with_name(f".{path.name}.tmp-{os.getpid()}")
    buf = io.BytesIO()
    with tarfile.open(fileobj=buf, mode="w", format=tarfile.USTAR_FORMAT) as tar:
        for key, payload in samples:
            info = tarfile.TarInfo(f"{key}{MEMBER_SUFFIX}")
            info.size = len(payload)
            info.mtime = 0
            info.mode = 0o644
            info.uid = info.gid = 0
            info.uname = info.gname = ""
            tar.addfile(info, io.BytesIO(payload))
    data = buf.getvalue()
    with open(tmp, "wb") as fh:
        fh.write(data)
        fh.flush()
        os.fsync(fh.fileno())
    os.replace(tmp, path)
    return len(data), hashlib.sha256(data).hexdigest()


@dataclass(frozen=True)
class ShardEntry:
    """One shard's manifest entry."""

    name: str
    index: int
    samples: int
    tokens: int
    bytes: int
    sha256: str
    first_sample: int

    def to_dict(self) -> dict[str, Any]:
        """Return the JSON form."""
        return dict(self.__dict__)


def write_json_atomic(path: str | os.PathLike, obj: Any) -> None:
    """Write JSON through a temporary file and rename, so readers never see a partial file."""
    path = Path(path)
    tmp = path.with_name(f".{path.name}.tmp-{os.getpid()}")
    with open(tmp, "w", encoding="utf-8") as fh:
        json.dump(obj, fh, indent=2, sort_keys=True)
        fh.write("\n")
        fh.flush()
        os.fsync(fh.fileno())
    os.replace(tmp, path)


REQUIRED_INDEX_KEYS = (
    "format",
    "format_version",
    "teacher",
    "tokenizer_hash",
    "vocab_size",
    "seq_len",
    "top_k",
    "samples_per_shard",
    "dtypes",
    "build_args",
    "shards",
    "totals",
)


def read_index(location: str | os.PathLike) -> dict[str, Any]:
    """Read and check `index.json` of a dataset directory or URL prefix."""
    loc = str(location).rstrip("/")
    target = f"{loc}/{INDEX_NAME}"
    try:
        if "://" in loc or loc.startswith("pipe:"):
            import webdataset as wds  # only for remote locations

            with wds.gopen(target, "rb") as fh:
                index = json.loads(fh.read().decode("utf-8"))
        else:
            with open(target, encoding="utf-8") as fh:
                index = json.load(fh)
    except FileNotFoundError:
        raise SpellmError(f"{target}: no index.json (is this a teacher-shard directory?)") from None
    except json.JSONDecodeError as exc:
        raise SpellmError(f"{target}: not valid JSON ({exc})") from None
    missing = [k for k in REQUIRED_INDEX_KEYS if k not in index]
    if missing:
        raise SpellmError(f"{target}: missing fields {', '.join(missing)}")
    if index["format"] != FORMAT_NAME or index["format_version"] != FORMAT_VERSION:
        raise SpellmError(
            f"{target}: format {index['format']!r} v{index['format_version']} is not "
            f"{FORMAT_NAME!r} v{FORMAT_VERSION}"
        )
    return index


def make_index(
    *,
    teacher: dict[str, Any],
    tokenizer_hash: str,
    vocab_size: int,
    eos_id: int,
    seq_len: int,
    top_k: int,
    samples_per_shard: int,
    build_args: dict[str, Any],
    entries: list[ShardEntry],
) -> dict[str, Any]:
    """Assemble the `index.json` document from the dataset's metadata and its shard entries."""
    entries = sorted(entries, key=lambda e: e.index)
    return {
        "format": FORMAT_NAME,
        "format_version": FORMAT_VERSION,
        "teacher": teacher,
        "tokenizer_hash": tokenizer_hash,
        "vocab_size": vocab_size,
        "eos_id": eos_id,
        "seq_len": seq_len,
        "top_k": top_k,
        "samples_per_shard": samples_per_shard,
        "dtypes": dict(DTYPES),
        "build_args": build_args,
        "shards": [e.to_dict() for e in entries],
        "totals": {
            "shards": len(entries),
            "samples": sum(e.samples for e in entries),
            "tokens": sum(e.tokens for e in entries),
            "bytes": sum(e.bytes for e in entries),
        },
    }
