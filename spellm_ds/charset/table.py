"""The token → chars table (`CharTable`): k symbols per token, flags, canonical rows, its file, coverage.

Flags per token: `truncated` (spelled length > k; the row keeps the first k symbols), `unknown` (contains
`<unk>`, or spells to nothing), `normalized` (normalisation changed the surface string, e.g. "é" → "e").

Canonical choice when tokens share one row. Exact lookup considers every token that is not `unknown` and
returns the one that is not truncated, then not normalized, then has the lowest id; `decodable[t]` is True
iff that choice for t's row is t (the tokens a char head can produce; the eligible loss labels). Rows
containing `<unk>` never match. Prefix lookup returns, among decodable tokens whose row starts with the
query, the shortest (full spelled length), then not normalized, then the lowest id. A query string is read
up to its first `<end>`; anything after it is ignored; an empty string is a miss in both modes.

File format (`CharTable.save`): one JSON document {"format": "spellm-charset", "version": 1, "hash",
"symbols", "k", "vocab_size", "tokenizer_hash", "conventions", "arrays"}, each array stored as
{"dtype", "shape", "base64"} of its little-endian bytes. `hash` is a sha256 over the symbols, k,
vocab_size and the arrays (token_chars, lengths, truncated, unknown, normalized); `load` recomputes it.

"""

from __future__ import annotations

import base64
import hashlib
import json
import os
from collections.abc import Collection, Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np

from spellm_ds.charset.surfaces import load_tokenizer, token_surfaces
from spellm_ds.charset.symbols import DEFAULT_CHARSET, DEFAULT_K, Charset, normalize_text
from spellm_ds.errors import SpellmError
from spellm_ds.jsonio import read_json, write_json

FILE_FORMAT = "spellm-charset"
FILE_VERSION = 1
_ARRAYS = {"token_chars": "u1", "lengths": "<i4", "truncated": "?", "unknown": "?", "normalized": "?"}


def _row_view(rows: np.ndarray) -> np.ndarray:
    rows = np.ascontiguousarray(rows, dtype=np.uint8)
    return rows.view(np.dtype((np.void, rows.shape[1]))).ravel()


def _first_per_row(rows: np.ndarray, ids: np.ndarray, order: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Among entries sorted by `order` (best first), keep the first entry of every distinct row."""
    rows, ids = rows[order], ids[order]
    if len(ids) == 0:
        return rows, ids
    _, first = np.unique(_row_view(rows), return_index=True)
    return rows[first], ids[first]


@dataclass(kw_only=True, eq=False)
class CharTable:
    """A tokenizer's vocabulary spelled in a `Charset`: END-padded rows `[V, k]` plus per-token flags."""

    charset: Charset
    k: int
    vocab_size: int
    tokenizer_hash: str
    token_chars: np.ndarray  # uint8 [V, k], END (0) padded
    lengths: np.ndarray  # int32 [V], full spelled length (may exceed k)
    truncated: np.ndarray  # bool [V], lengths > k
    unknown: np.ndarray  # bool [V], contains <unk> or spells to nothing
    normalized: np.ndarray  # bool [V], normalisation changed the surface string
    conventions: str = "plain"
    decodable: np.ndarray = field(init=False)  # bool [V], exact lookup of the token's row returns it

    def __post_init__(self) -> None:
        _check_k(self.k)
        v, k = self.vocab_size, self.k
        want = {
            "token_chars": (v, k),
            "lengths": (v,),
            "truncated": (v,),
            "unknown": (v,),
            "normalized": (v,),
        }
        for name, shape in want.items():
            arr = np.asarray(getattr(self, name), dtype=np.dtype(_ARRAYS[name]).newbyteorder("="))
            if arr.shape != shape:
                raise SpellmError(f"char table field {name} has shape {arr.shape}, expected {shape}")
            setattr(self, name, np.ascontiguousarray(arr))
        if v and int(self.token_chars.max()) >= self.charset.size:
            raise SpellmError(f"char table holds symbol ids >= {self.charset.size} (the charset size)")
        _, ids = self.exact_entries()
        self.decodable = np.zeros(v, dtype=bool)
        self.decodable[ids] = True
        self._hash: str | None = None

    @classmethod
    def from_surfaces(
        cls,
        surfaces: Sequence[str | None],
        *,
        k: int = DEFAULT_K,
        charset: Charset | None = None,
        special_roles: Mapping[int, str] | None = None,
        role_holders: Collection[int] = (),
        tokenizer_hash: str = "",
        conventions: str = "plain",
    ) -> CharTable:
        """Spell surface strings (None = no token) and special tokens (id → role symbol) into a table.

        A special token in `role_holders` is its role symbol alone; any other is its role symbol followed
        by its surface string (its content; None or "" adds nothing).
        """
        _check_k(k)
        cs = charset or DEFAULT_CHARSET
        roles = dict(special_roles or {})
        holders = set(role_holders)
        v = len(surfaces)
        chars = np.zeros((v, k), dtype=np.uint8)
        lengths = np.zeros(v, dtype=np.int32)
        unknown = np.zeros(v, dtype=bool)
        normalized = np.zeros(v, dtype=bool)
        other = cs.other_special_id
        for i, s in enumerate(surfaces):
            head: list[int] = []
            if i in roles:
                sym = cs.id_of(roles[i])
                sym = other if sym is None else sym
                if sym is None:
                    unknown[i] = True
                    continue
                head = [sym]
                if i in holders or s is None:
                    s = ""
            elif s is None:
                unknown[i] = True
                continue
            norm = normalize_text(s)
            ids = head + cs.encode(norm)
            lengths[i] = len(ids)
            unknown[i] = not ids or cs.unk_id in ids
            normalized[i] = norm != s
            chars[i, : min(k, len(ids))] = ids[:k]
        return cls(
            charset=cs,
            k=k,
            vocab_size=v,
            tokenizer_hash=tokenizer_hash,
            token_chars=chars,
            lengths=lengths,
            truncated=lengths > k,
            unknown=unknown,
            normalized=normalized,
            conventions=conventions,
        )

    @classmethod
    def build(
        cls,
        tokenizer: Any,
        k: int = DEFAULT_K,
        charset: Charset | None = None,
        *,
        vocab_size: int | None = None,
    ) -> CharTable:
        """Spell a HF fast tokenizer's vocabulary (object or directory) into a `[V, k]` table.

        `vocab_size` pads the table to a model's (larger) embedding size; padded ids are `unknown`.
        """
        _check_k(k)
        if isinstance(tokenizer, (str, os.PathLike)):
            tokenizer = load_tokenizer(tokenizer)
        from spellm_ds.fingerprint import tokenizer_hash

        ts = token_surfaces(tokenizer)
        surfaces = list(ts.surfaces)
        if vocab_size is not None:
            if vocab_size < len(surfaces):
                raise SpellmError(
                    f"vocab_size {vocab_size} is smaller than the tokenizer's {len(surfaces)} ids"
                )
            surfaces += [None] * (vocab_size - len(surfaces))
        return cls.from_surfaces(
            surfaces,
            k=k,
            charset=charset,
            special_roles=ts.special_roles,
            role_holders=ts.role_holders,
            tokenizer_hash=tokenizer_hash(tokenizer),
            conventions=ts.conventions.name,
        )

    def exact_entries(self) -> tuple[np.ndarray, np.ndarray]:
        """Return (rows uint8[N, k], token ids int64[N]): the canonical token of every matchable row."""
        ids = np.flatnonzero(~self.unknown).astype(np.int64)
        order = np.lexsort((ids, self.normalized[ids], self.truncated[ids]))
        return _first_per_row(self.token_chars[ids], ids, order)

    def prefix_entries(self) -> tuple[np.ndarray, np.ndarray]:
        """Return (prefix rows uint8[N, k], token ids int64[N]): the canonical completion of every prefix."""
        dec = np.flatnonzero(self.decodable).astype(np.int64)
        rowlen = np.minimum(self.lengths[dec], self.k)
        all_rows, all_ids = [], []
        for p in range(1, self.k + 1):
            sel = dec[rowlen >= p]
            rows = self.token_chars[sel].copy()
            rows[:, p:] = 0
            all_rows.append(rows)
            all_ids.append(sel)
        rows = np.concatenate(all_rows) if all_rows else np.zeros((0, self.k), np.uint8)
        ids = np.concatenate(all_ids) if all_ids else np.zeros(0, np.int64)
        order = np.lexsort((ids, self.normalized[ids], self.lengths[ids]))
        return _first_per_row(rows, ids, order)

    def spelling(self, token_id: int) -> str:
        """Render one token's row for reading (named symbols as `<name>`)."""
        return self.charset.decode(self.token_chars[token_id])

    @property
    def hash(self) -> str:
        """sha256 over the symbols, k, vocab_size and the arrays (not the tokenizer hash)."""
        if self._hash is None:
            h = hashlib.sha256()
            head = {
                "format": FILE_FORMAT,
                "version": FILE_VERSION,
                "symbols": list(self.charset.symbols),
                "k": self.k,
                "vocab_size": self.vocab_size,
            }
            h.update(json.dumps(head, ensure_ascii=True, sort_keys=True).encode())
            for name, dtype in _ARRAYS.items():
                h.update(name.encode())
                h.update(np.ascontiguousarray(getattr(self, name), dtype=dtype).tobytes())
            self._hash = h.hexdigest()
        return self._hash

    def save(self, path: str | os.PathLike) -> Path:
        """Write the charset and table to one JSON file (atomically) and return its path."""
        arrays = {}
        for name, dtype in _ARRAYS.items():
            arr = np.ascontiguousarray(getattr(self, name), dtype=dtype)
            arrays[name] = {
                "dtype": dtype,
                "shape": list(arr.shape),
                "base64": base64.b64encode(arr.tobytes()).decode("ascii"),
            }
        doc = {
            "format": FILE_FORMAT,
            "version": FILE_VERSION,
            "hash": self.hash,
            "symbols": list(self.charset.symbols),
            "k": self.k,
            "vocab_size": self.vocab_size,
            "tokenizer_hash": self.tokenizer_hash,
            "conventions": self.conventions,
            "arrays": arrays,
        }
        out = Path(path)
        write_json(out, doc, indent=1, sort_keys=False, ascii_only=True)
        return out

    @classmethod
    def load(cls, path: str | os.PathLike, expected_hash: str | None = None) -> CharTable:
        """Read a file written by `save`, verify its content hash and, if given, `expected_hash`."""
        p = Path(path)
        doc = read_json(
            p,
            "charset file",
            fmt=FILE_FORMAT,
            required=("version", "hash", "symbols", "k", "vocab_size", "tokenizer_hash", "arrays"),
            missing_hint=f"charset file {p} does not exist",
        )
        if doc["version"] != FILE_VERSION:
            raise SpellmError(f"{p}: charset file version {doc['version']!r}, expected {FILE_VERSION}")
        try:
            arrays = {}
            for name, dtype in _ARRAYS.items():
                entry = doc["arrays"].get(name)
                if not isinstance(entry, dict) or entry.get("dtype") != dtype:
                    raise SpellmError(f"array {name} is missing or not of dtype {dtype}")
                raw = base64.b64decode(entry["base64"], validate=True)
                shape = tuple(int(n) for n in entry["shape"])
                if len(raw) != int(np.prod(shape)) * np.dtype(dtype).itemsize:
                    raise SpellmError(
                        f"array {name} has {len(raw)} bytes, not shape {list(shape)} of {dtype}"
                    )
                arrays[name] = np.frombuffer(raw, dtype=dtype).reshape(shape).copy()
            table = cls(
                charset=Charset(symbols=tuple(doc["symbols"])),
                k=int(doc["k"]),
                vocab_size=int(doc["vocab_size"]),
                tokenizer_hash=str(doc["tokenizer_hash"]),
                conventions=str(doc.get("conventions", "plain")),
                **arrays,
            )
        except SpellmError as exc:
            raise SpellmError(f"{p}: {exc}") from None
        except (TypeError, ValueError, KeyError, AttributeError) as exc:
            raise SpellmError(f"{p}: malformed charset file ({type(exc).__name__}: {exc})") from exc
        if table.hash != doc["hash"]:
            raise SpellmError(
                f"{p}: content hash {table.hash} differs from the recorded {doc['hash']}: "
                "the file is damaged or was edited"
            )
        if expected_hash is not None and table.hash != expected_hash:
            raise SpellmError(f"{p}: charset hash {table.hash} does not match the expected {expected_hash}")
        return table


def _check_k(k: Any) -> None:
    if isinstance(k, bool) or not isinstance(k, (int, np.integer)) or k < 1:
        raise SpellmError(f"k (characters per token) must be an integer >= 1, got {k!r}")


def _k_for(lengths: np.ndarray, num: int, den: int) -> int | None:
    """Smallest k with at least num/den of `lengths` <= k (None for an empty set)."""
    if lengths.size == 0:
        return None
    sorted_len = np.sort(lengths)
    need = -(-num * lengths.size // den)  # ceil(n * num / den)
    return max(1, int(sorted_len[need - 1]))


def coverage_report(table: CharTable) -> dict[str, Any]:
    """Return the vocabulary coverage of a table: counts, shares, collisions, lengths and k for 99%/99.9%.

    `exact` = neither truncated nor unknown; `collisions` = representable tokens shadowed by another token
    with the same row (not decodable); `collision_groups` = rows shared by several such tokens. The length
    histogram covers all tokens (full spelled length); `k_for_99`/`k_for_999` are over the tokens without
    unknown symbols (k cannot fix the others).
    """
    v = table.vocab_size
    known = ~table.unknown
    exact = known & ~table.truncated
    shadowed = known & ~table.decodable
    _, counts = (
        np.unique(_row_view(table.token_chars[known]), return_counts=True)
        if known.any()
        else (None, np.zeros(0))
    )
    hist_keys, hist_counts = np.unique(table.lengths, return_counts=True)
    counts_by_name = {
        "exact": int(exact.sum()),
        "truncated": int(table.truncated.sum()),
        "unknown": int(table.unknown.sum()),
        "normalized": int(table.normalized.sum()),
        "collisions": int(shadowed.sum()),
        "decodable": int(table.decodable.sum()),
    }
    return {
        "vocab_size": v,
        "k": table.k,
        "symbols": table.charset.size,
        "conventions": table.conventions,
        **counts_by_name,
        "collision_groups": int((counts > 1).sum()),
        "shares": {name: round(n / v, 6) if v else 0.0 for name, n in counts_by_name.items()},
        "length_histogram": {str(int(n)): int(c) for n, c in zip(hist_keys, hist_counts)},
        "k_for_99": _k_for(table.lengths[known], 99, 100),
        "k_for_999": _k_for(table.lengths[known], 999, 1000),
        "charset_hash": table.hash,
        "tokenizer_hash": table.tokenizer_hash,
    }


def format_report(report: Mapping[str, Any]) -> str:
    """Render a coverage report as a few human-readable lines."""
    shares = report["shares"]
    lines = [
        f"vocabulary: {report['vocab_size']} tokens, k={report['k']}, {report['symbols']} symbols, "
        f"conventions: {report['conventions']}",
    ]
    for name in ("exact", "truncated", "unknown", "normalized", "collisions", "decodable"):
        lines.append(f"  {name:<11} {report[name]:>8}  {100 * shares[name]:6.2f}%")
    lines.append(f"  collision groups: {report['collision_groups']}")
    lines.append(f"  smallest k covering 99%: {report['k_for_99']}, 99.9%: {report['k_for_999']}")
    lines.append(
        "  length histogram: " + ", ".join(f"{n}:{c}" for n, c in report["length_histogram"].items())
    )
    lines.append(f"  charset hash: {report['charset_hash']}")
    return "\n".join(lines)
