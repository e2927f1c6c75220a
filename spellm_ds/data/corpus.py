"""Corpus reading, tokenising and packing into fixed-length sequences, in one deterministic global order.

Documents come from `--input` patterns in the order given; each pattern's matches are sorted, and a file
matched twice is read once. A plain text file is one document; a `.jsonl` (or `.jsonl.gz`) row and a
`.parquet` row are one document each (the text in `text_field`). Empty documents are skipped.

Packing: every document's tokens are followed by EOS and appended to one token stream; global sequence
i is stream tokens ``[i*L, (i+1)*L)``. The final partial sequence (fewer than L tokens left) is kept,
padded with the pad id (EOS when the tokenizer has none), and its padding positions get
``loss_mask = False``; so no text is dropped and every sequence has exactly L tokens.
"""

from __future__ import annotations

import glob
import gzip
import hashlib
import json
import os
from collections.abc import Iterable, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

from spellm_ds.errors import SpellmError

TOKENIZE_GROUP_CHARS = 1 << 20


def expand_inputs(patterns: list[str]) -> list[Path]:
    """Expand file names and glob patterns into a de-duplicated list of files in a stable order."""
    if not patterns:
        raise SpellmError("--input: no input files given")
    files: list[Path] = []
    seen: set[str] = set()
    for pattern in patterns:
        expanded = os.path.expanduser(pattern)
        matches = sorted(glob.glob(expanded, recursive=True)) if glob.has_magic(expanded) else [expanded]
        matches = [m for m in matches if not Path(m).is_dir()]
        if not matches:
            raise SpellmError(f"--input {pattern!r}: no such file (or the pattern matches no file)")
        for m in matches:
            key = os.path.realpath(m)
            if key in seen:
                continue
            if not Path(m).exists():
                raise SpellmError(f"--input {m!r}: no such file")
            seen.add(key)
            files.append(Path(m))
    return files


def inputs_fingerprint(files: list[Path]) -> str:
    """Return a sha256 over the input files' resolved paths and sizes (a changed corpus changes it)."""
    h = hashlib.sha256()
    for f in files:
        h.update(os.path.realpath(f).encode("utf-8"))
        h.update(b"\0")
        h.update(str(f.stat().st_size).encode())
        h.update(b"\n")
    return h.hexdigest()


def _kind(path: Path) -> str:
    name = path.name.lower()
    if name.endswith((".jsonl", ".jsonl.gz", ".ndjson")):
        return "jsonl"
    if name.endswith(".parquet"):
        return "parquet"
    return "text"


def _iter_jsonl(path: Path, text_field: str) -> Iterator[str]:
    opener = gzip.open if path.name.lower().endswith(".gz") else open
    with opener(path, "rt", encoding="utf-8") as fh:
        for lineno, line in enumerate(fh, 1):
            if not line.strip():
                continue
            try:
                row = json.loads(line)
            except json.JSONDecodeError as exc:
                raise SpellmError(f"{path}:{lineno}: not valid JSON ({exc.msg})") from None
            if not isinstance(row, dict) or text_field not in row:
                raise SpellmError(f"{path}:{lineno}: no field {text_field!r} (set --text-field)")
            text = row[text_field]
            if text is None:
                continue
            if not isinstance(text, str):
                raise SpellmError(f"{path}:{lineno}: field {text_field!r} is {type(text).__name__}, not text")
            yield text


def _iter_parquet(path: Path, text_field: str) -> Iterator[str]:
    import pyarrow.parquet as pq

    try:
        pf = pq.ParquetFile(path)
    except Exception as exc:  # pyarrow raises several types for an unreadable file
        raise SpellmError(f"{path}: not a readable parquet file ({exc})") from None
    if text_field not in pf.schema_arrow.names:
        raise SpellmError(f"{path}: no column {text_field!r} (columns: {', '.join(pf.schema_arrow.names)})")
    for batch in pf.iter_batches(columns=[text_field], batch_size=1024):
        for text in batch.column(0).to_pylist():
            if text is None:
                continue
            if not isinstance(text, str):
                raise SpellmError(f"{path}: column {text_field!r} holds {type(text).__name__}, not text")
            yield text


def iter_documents(files: list[Path], text_field: str = "text") -> Iterator[str]:
    """Yield every non-empty document of the input files in the global order."""
    for path in files:
        kind = _kind(path)
        if kind == "jsonl":
            docs: Iterable[str] = _iter_jsonl(path, text_field)
        elif kind == "parquet":
            docs = _iter_parquet(path, text_field)
        else:
            try:
                docs = [path.read_text(encoding="utf-8")]
            except UnicodeDecodeError as exc:
                raise SpellmError(f"{path}: not UTF-8 text ({exc.reason} at byte {exc.start})") from None
        for doc in docs:
            if doc:
                yield doc


def tokenize_documents(tokenizer: Any, docs: Iterable[str]) -> Iterator[list[int]]:
    """Yield each document's token ids (no special tokens), tokenising groups of documents at once."""
    group: list[str] = []
    chars = 0
    for doc in docs:
        group.append(doc)
        chars += len(doc)
        if chars >= TOKENIZE_GROUP_CHARS:
            yield from tokenizer(group, add_special_tokens=False, verbose=False)["input_ids"]
            group, chars = [], 0
    if group:
        yield from tokenizer(group, add_special_tokens=False, verbose=False)["input_ids"]


@dataclass(frozen=True)
class PackedSequence:
    """One global sequence: `input_ids` int32 [L] and how many leading positions are real text."""

    index: int
    input_ids: np.ndarray
    length: int

    @property
    def loss_mask(self) -> np.ndarray:
        """True at real-text positions, False at padding."""
        mask = np.zeros(self.input_ids.shape[0], dtype=bool)
        mask[: self.length] = True
        return mask


def pack_sequences(
    token_docs: Iterable[list[int]], seq_len: int, eos_id: int, pad_id: int | None = None
) -> Iterator[PackedSequence]:
    """Pack documents (each followed by EOS) into consecutive sequences of `seq_len` tokens."""
    if seq_len < 1:
        raise SpellmError(f"seq_len must be >= 1, got {seq_len}")
    pad = eos_id if pad_id is None else pad_id
    buf = np.empty(seq_len, dtype=np.int32)
    fill = 0
    index = 0
    for doc in token_docs:
        ids = np.asarray(doc, dtype=np.int32)
        pos = 0
        total = ids.shape[0] + 1  # the document, then EOS
        while pos < total:
            take = min(seq_len - fill, total - pos)
            end = pos + take
            doc_end = min(end, ids.shape[0])
            if doc_end > pos:
                buf[fill : fill + doc_end - pos] = ids[pos:doc_end]
            if end > ids.shape[0]:
                buf[fill + take - 1] = eos_id
            fill += take
            pos = end
            if fill == seq_len:
                yield PackedSequence(index=index, input_ids=buf.copy(), length=seq_len)
                index += 1
                fill = 0
    if fill:
        buf[fill:] = pad
        yield PackedSequence(index=index, input_ids=buf.copy(), length=fill)
