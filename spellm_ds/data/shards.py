"""The teacher-shard format: one definition of a sample's bytes and of `index.json`.

A dataset is a directory (or URL prefix) holding `index.json` and tar shards `shard-NNNNNN.tar`
(plus one manifest `shard-NNNNNN.json` per shard while building). Shard *i* holds global sequences
``[i*S, (i+1)*S)``; the sample key is the global sequence index as 12 decimal digits. Each tar member
is ``<key>.spl``: one zstd frame (with its content checksum) holding, little endian,

    header  `_HEADER`: magic b"SPLM", format version, seq_len L, top_k K, vocab_size V,
            id width W in bytes (2 when V <= 65536, else 4), flags
    ids     input_ids [L] then topk_ids [L, K] (row major): L*(1+K) unsigned W-byte integers
    logp    topk_logprobs [L, K]: float16 log-softmax over the full vocabulary
    mask    loss_mask [L] bit-packed, present only when flag `HAS_MASK` is set (else all True)

Position t's top-K are the teacher's predictions for token t+1 (the prediction after input t), sorted
by descending log-probability. Version 2 stores plain arrays: on teacher output they compressed as well
as byte-plane (shuffled) layouts (~16-18 bytes per token for a 32K vocabulary against 34 for plain
int32/int32/float16), and decoding is one decompression plus `np.frombuffer` views, one int32 widening
and two vectorised checks, which keeps the reader close to the raw zstd rate. Decoding never unpickles;
every size, the version, the id range and the log-probs' finiteness are checked, corrupt payloads fail
zstd's checksum, and errors name the shard and the sample key. Tar files are read by a strict USTAR
parser: regular files named `<key>.spl` only, header checksums verified, truncation detected.
"""

from __future__ import annotations

import hashlib
import io
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
from spellm_ds.jsonio import fsync_dir, parse_json, read_json, temp_path

FORMAT_NAME = "spellm-ds-shards"
FORMAT_VERSION = 2
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


def manifest_name(index: int) -> str:
    """Return the file name of global shard `index`'s manifest (written after the shard's rename)."""
    return f"shard-{index:06d}.json"


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


_ID_DTYPES = {2: np.dtype("<u2"), 4: np.dtype("<u4")}
_U16 = np.dtype("<u2")
_F16 = np.dtype("<f2")
_ALL_TRUE: dict[int, np.ndarray] = {}


def _all_true(seq_len: int) -> np.ndarray:
    """A shared read-only all-True mask (most samples have no padding)."""
    mask = _ALL_TRUE.get(seq_len)
    if mask is None:
        mask = np.ones(seq_len, dtype=bool)
        mask.flags.writeable = False
        _ALL_TRUE[seq_len] = mask
    return mask


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
    if not 0 < vocab_size < 1 << 31:
        raise SpellmError(f"vocab_size {vocab_size} is outside [1, 2**31)")
    width = _id_bytes(vocab_size)
    for name, ids in (("input_ids", input_ids), ("topk_ids", topk_ids)):
        if ids.size and (ids.min() < 0 or ids.max() >= vocab_size):
            raise SpellmError(f"{name} outside [0, {vocab_size})")
    flags = 0
    id_dtype = _ID_DTYPES[width]
    parts = [
        b"",
        input_ids.astype(id_dtype).tobytes(),
        topk_ids.astype(id_dtype).tobytes(),
        np.ascontiguousarray(topk_logprobs, dtype=_F16).tobytes(),
    ]
    if loss_mask is not None:
        loss_mask = np.asarray(loss_mask, dtype=bool)
        if loss_mask.shape != (seq_len,):
            raise SpellmError(f"loss_mask must be [{seq_len}], got shape {loss_mask.shape}")
        if not bool(loss_mask.all()):
            flags |= HAS_MASK
            parts.append(np.packbits(loss_mask).tobytes())
    parts[0] = _HEADER.pack(MAGIC, FORMAT_VERSION, seq_len, top_k, vocab_size, width, flags)
    cctx = zstandard.ZstdCompressor(level=level, write_checksum=True, write_content_size=True)
    return cctx.compress(b"".join(parts))


_DCTX = zstandard.ZstdDecompressor()


def read_header(raw: bytes, where: str = "<memory>") -> tuple[int, int, int, int, int]:
    """Check a decompressed payload's header; return (seq_len, top_k, vocab_size, id_bytes, flags)."""
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
    return seq_len, top_k, vocab_size, width, flags


def decode_sample(
    payload: bytes | memoryview, where: str = "<memory>", check_values: bool = True
) -> dict[str, Any]:
    """Decode one payload into numpy arrays; `where` (shard and key) is named in every error."""
    try:
        raw = _DCTX.decompress(payload)
    except zstandard.ZstdError as exc:
        raise ShardError(f"{where}: not a valid zstd frame or checksum mismatch ({exc})") from None
    seq_len, top_k, vocab_size, width, flags = read_header(raw, where)
    n = seq_len * top_k
    off = _HEADER.size
    ids = np.frombuffer(raw, dtype=_ID_DTYPES[width], count=seq_len + n, offset=off)
    off += width * (seq_len + n)
    lp_bits = np.frombuffer(raw, dtype=_U16, count=n, offset=off)
    off += 2 * n
    if check_values:
        # ids are unsigned on disk, so only the upper bound can fail.
        if ids.size and int(ids.max()) >= vocab_size:
            name = "input_ids" if int(ids[:seq_len].max()) >= vocab_size else "topk_ids"
            raise ShardError(f"{where}: {name} has an id >= vocab_size {vocab_size}")
        # float16 NaN/inf <=> all five exponent bits set; shifting out the sign bit leaves >= 0xF800.
        if n and int((lp_bits << 1).max()) >= 0xF800:
            raise ShardError(f"{where}: topk_logprobs holds NaN or infinite values")
    if flags & HAS_MASK:
        bits = np.frombuffer(raw, dtype=np.uint8, count=(seq_len + 7) // 8, offset=off)
        loss_mask = np.unpackbits(bits, count=seq_len).view(bool)
    else:
        loss_mask = _all_true(seq_len)
    ids = ids.astype(np.int32)
    return {
        "input_ids": ids[:seq_len],
        "topk_ids": ids[seq_len:].reshape(seq_len, top_k),
        "topk_logprobs": lp_bits.view(_F16).reshape(seq_len, top_k).copy(),
        "loss_mask": loss_mask,
        "vocab_size": vocab_size,
    }


def member_key(name: str, where: str) -> str:
    """Return the sample key of tar member `name`, rejecting anything but `<12 digits>.spl`."""
    m = _MEMBER_RE.match(name)
    if not m:
        raise ShardError(f"{where}: unexpected tar member {name!r} (only <key>{MEMBER_SUFFIX} is allowed)")
    return m.group(1)


_BLOCK = 512
_ZERO_BLOCK = bytes(_BLOCK)


_OCTAL_RE = re.compile(rb"^ *([0-7]+)[ \0]*$")


def _octal(field: bytes, what: str, where: str) -> int:
    m = _OCTAL_RE.match(field)
    if not m:
        raise ShardError(f"{where}: tar header field {what} {field!r} is not an octal number")
    return int(m.group(1), 8)


def _read_exact(fileobj: Any, size: int) -> bytes:
    data = fileobj.read(size)
    while len(data) < size:
        more = fileobj.read(size - len(data))
        if not more:
            break
        data += more
    return data


def _template_header() -> tuple[bytes, bytes, bytes, int]:
    """The constant fields of the headers `write_shard` writes, and their checksum contribution."""
    info = _member_info(sample_key(0), 0)
    h = info.tobuf(format=tarfile.USTAR_FORMAT)
    return h[100:124], h[136:148], h[156:512], sum(h[100:124]) + sum(h[136:148]) + sum(h[156:512]) + 256


def _member_info(key: str, size: int) -> tarfile.TarInfo:
    info = tarfile.TarInfo(f"{key}{MEMBER_SUFFIX}")
    info.size = size
    info.mtime = 0
    info.mode = 0o644
    info.uid = info.gid = 0
    info.uname = info.gname = ""
    return info


_NAME_LEN = KEY_DIGITS + len(MEMBER_SUFFIX)
_NAME_PAD = bytes(100 - _NAME_LEN)
_TPL_A, _TPL_B, _TPL_C, _TPL_SUM = _template_header()


def _parse_header(header: bytes, where: str) -> tuple[str, int]:
    """Check one 512-byte USTAR header of a shard member; return (sample key, payload size)."""
    stored = _octal(header[148:156], "chksum", where)
    if (
        header[_NAME_LEN:100] == _NAME_PAD
        and header[100:124] == _TPL_A
        and header[136:148] == _TPL_B
        and header[156:512] == _TPL_C
    ):
        # Fast path: a header exactly as `write_shard` writes it; only name and size vary.
        checksum = _TPL_SUM + sum(header[:_NAME_LEN]) + sum(header[124:136])
    else:
        checksum = sum(header[:148]) + 256 + sum(header[156:])
    if stored != checksum:
        raise ShardError(f"{where}: tar header checksum mismatch (corrupt shard)")
    name_b = header[:100].split(b"\0", 1)[0]
    if header[257:262] == b"ustar":
        prefix = header[345:500].split(b"\0", 1)[0]
        if prefix:
            name_b = prefix + b"/" + name_b
    try:
        name = name_b.decode("utf-8")
    except UnicodeDecodeError:
        raise ShardError(f"{where}: tar member name {name_b!r} is not UTF-8") from None
    if header[156:157] not in (b"0", b"\0"):
        raise ShardError(f"{where}: tar member {name!r} is not a regular file (type {header[156:157]!r})")
    return member_key(name, where), _octal(header[124:136], "size", where)


def iter_tar_members(fileobj: Any, where: str) -> Iterator[tuple[str, bytes]]:
    """Yield (key, payload) from a shard tar stream; rejects links, directories, foreign names, truncation.

    A strict reader for the plain USTAR files `write_shard` produces: header checksums are verified, only
    regular files named `<12 digits>.spl` are accepted, and a stream that ends before the end-of-archive
    marker is an error (so a truncated shard never passes as a shorter one).
    """
    while True:
        header = _read_exact(fileobj, _BLOCK)
        if len(header) < _BLOCK:
            raise ShardError(f"{where}: truncated tar (no end-of-archive marker)")
        if header == _ZERO_BLOCK:
            return
        key, size = _parse_header(header, where)
        data = _read_exact(fileobj, size)
        if len(data) != size:
            raise ShardError(f"{where}/{key}: truncated member ({len(data)} of {size} bytes)")
        pad = -size % _BLOCK
        if pad and len(_read_exact(fileobj, pad)) != pad:
            raise ShardError(f"{where}/{key}: truncated tar after member")
        yield key, data


def iter_tar_buffer(data: bytes | memoryview, where: str) -> Iterator[tuple[str, memoryview]]:
    """Like `iter_tar_members` over a whole shard already in memory; payloads are zero-copy views."""
    view = memoryview(data)
    pos, end = 0, len(view)
    while True:
        if end - pos < _BLOCK:
            raise ShardError(f"{where}: truncated tar (no end-of-archive marker)")
        header = view[pos : pos + _BLOCK].tobytes()
        if header == _ZERO_BLOCK:
            return
        key, size = _parse_header(header, where)
        start = pos + _BLOCK
        if start + size > end:
            raise ShardError(f"{where}/{key}: truncated member ({end - start} of {size} bytes)")
        pos = start + size + (-size % _BLOCK)
        if pos > end:
            raise ShardError(f"{where}/{key}: truncated tar after member")
        yield key, view[start : start + size]


def iter_shard(path: str | os.PathLike, check_values: bool = True) -> Iterator[dict[str, Any]]:
    """Yield every sample of one shard file as a dict with `__key__` and its numpy arrays."""
    where = str(path)
    with open(path, "rb") as fh:
        data = fh.read()
    for key, payload in iter_tar_buffer(data, where):
        sample = decode_sample(payload, f"{where}/{key}", check_values=check_values)
        sample["__key__"] = key
        yield sample


def write_shard(path: str | os.PathLike, samples: list[tuple[str, bytes]]) -> tuple[int, str]:
    """Write (key, payload) pairs as a deterministic tar via a temporary name; return (bytes, sha256)."""
    path = Path(path)
    tmp = temp_path(path)
    buf = io.BytesIO()
    with tarfile.open(fileobj=buf, mode="w", format=tarfile.USTAR_FORMAT) as tar:
        for key, payload in samples:
            tar.addfile(_member_info(key, len(payload)), io.BytesIO(payload))
    data = buf.getvalue()
    with open(tmp, "wb") as fh:
        fh.write(data)
        fh.flush()
        os.fsync(fh.fileno())
    os.replace(tmp, path)
    fsync_dir(path.parent)
    return len(data), hashlib.sha256(data).hexdigest()


@dataclass(frozen=True)
class ShardEntry:
    """One shard's manifest entry (`tokens` counts positions whose loss_mask is True)."""

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

    @classmethod
    def from_dict(cls, d: dict[str, Any], where: str = "<manifest>") -> ShardEntry:
        """Build an entry from its JSON form, naming `where` when a field is missing or mistyped."""
        fields = {"name": str, "index": int, "samples": int, "tokens": int, "bytes": int, "sha256": str}
        fields["first_sample"] = int
        out = {}
        for name, typ in fields.items():
            value = d.get(name) if isinstance(d, dict) else None
            if not isinstance(value, typ) or isinstance(value, bool):
                raise ShardError(f"{where}: field {name!r} is missing or not {typ.__name__}")
            out[name] = value
        return cls(**out)


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
    missing = f"{target}: no index.json (is this a teacher-shard directory?)"
    checks = {"fmt": FORMAT_NAME, "version": FORMAT_VERSION, "required": REQUIRED_INDEX_KEYS}
    if "://" not in loc and not loc.startswith("pipe:"):
        return read_json(target, "teacher-shard index", missing_hint=missing, **checks)
    import webdataset as wds  # only for remote locations

    try:
        with wds.gopen(target, "rb") as fh:
            text = fh.read().decode("utf-8")
    except FileNotFoundError:
        raise SpellmError(missing) from None
    except (OSError, UnicodeDecodeError) as exc:
        raise SpellmError(f"{target}: not readable ({exc})") from None
    return parse_json(text, target, "teacher-shard index", **checks)


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
