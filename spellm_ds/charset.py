"""Character vocabulary: the symbols the k char heads predict, the token→chars table and chars→token lookup.

Default symbol table (`DEFAULT_CHARSET`, 105 symbols; ids fit uint8, so a table holds at most 255):

    id       symbol              meaning
    0        <end>               end of the token's string; pads every row to k
    1..95    " " .. "~"          printable ASCII U+0020..U+007E in code-point order (id = code point - 31)
    96       "\\n"                line feed
    97       "\\t"                tab
    98       "\\r"                carriage return
    99       <unk>               a character that is still outside the table after normalisation
    100      <eos>               end tokens: the tokenizer's eos token and every special token in `END_TOKENS`
    101      <bos>               its bos token (when that is not also the eos token)
    102      <pad>               its pad token
    103      <unk-token>         its own unknown token (e.g. SentencePiece `<unk>`)
    104      <other-special>     every other special token (chat markers, reserved tokens, [CLS], ...)

Single-character symbols are literal characters; named symbols are written `<name>`.

Special tokens (the tokenizer's added tokens marked special, its `all_special_ids` and its eos, bos, pad
and unk ids) each get a role, the first that applies of: eos (the tokenizer's `eos_token_id`), bos
(`bos_token_id`), end marker (content in `END_TOKENS`, such as `<|endoftext|>`, `<|eot_id|>`,
`<end_of_turn>`: role eos, also when the token is the pad or unk token), pad (`pad_token_id`), unk
(`unk_token_id`), other. The role holder, the token whose role comes from that tokenizer attribute (at
most one per role), is spelled as the role symbol alone: `<|im_end|>` as eos is `[<eos>]`. Every other
special token is spelled as its role symbol followed by its content, spelled like any surface string
(normalised, `<unk>` for characters outside the table, truncated at k; full length 1 + len(content)):
`<|endoftext|>` that is not the eos token is `[<eos>, <, |, e, n, d, o, f, t, e]` at k = 10 (length 14),
`<repo_name>` is `[<other-special>, <, r, e, p, o, _, n, a, m]`. So special tokens share a row only when
role and the first k - 1 content characters agree, and then the canonical rule below picks one. A role
whose symbol is missing from a custom table falls back to `<other-special>`, and without that the token
is unrepresentable.

Normalisation: Unicode NFKD, then every combining mark (category M*) is dropped, then each character that
is not a single-character symbol becomes `<unk>`. So é→e, ﬁ→fi, Ａ→A, a no-break space → space, and
non-Latin letters (中, П) → `<unk>`.

Surface string of a token (what the token adds to decoded text), read from the tokenizer's backend JSON
(decoder, pre-tokenizer and model), never guessed from the token strings:
- byte-level BPE (a ByteLevel decoder or pre-tokenizer): each character maps back to its byte through the
  GPT-2 bytes→unicode table (`Ġ` = space, `Ċ` = newline); the bytes are decoded as UTF-8. A token that is a
  partial UTF-8 sequence is decoded with U+FFFD in place of the broken bytes, hence contains `<unk>`.
- SentencePiece / Metaspace (Metaspace decoder or pre-tokenizer, or a Replace decoder `▁`→space): `▁`
  becomes a space, also at the start of a word (`▁the` → " the").
- byte fallback (`byte_fallback` in the model or a ByteFallback decoder): `<0xNN>` is the character NN for
  an ASCII byte (NN < 0x80); any other byte is a fragment of a UTF-8 sequence and is unrepresentable.
- WordPiece (WordPiece model or decoder): a continuation piece `##ing` is "ing"; a word-initial piece gets
  a leading space, " the", as the WordPiece decoder joins words with a space (its punctuation clean-up is
  not applied). Without the space "the" and "##the" would share one spelling.
- BPE with an end-of-word suffix (`</w>`): the suffix becomes a trailing space.
- added tokens that are not special: their literal content. Special tokens: their content (as written
  in the tokenizer), which the table spells after the role symbol (above).

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
import re
import unicodedata
from collections.abc import Collection, Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import torch

from spellm_ds.errors import SpellmError
from spellm_ds.jsonio import read_json, write_json

DEFAULT_K = 10
MAX_SYMBOLS = 255  # ids are stored as uint8 and 0 is <end>

END = "<end>"
UNK = "<unk>"
EOS = "<eos>"
BOS = "<bos>"
PAD = "<pad>"
UNK_TOKEN = "<unk-token>"
OTHER_SPECIAL = "<other-special>"
DEFAULT_SPECIALS = (EOS, BOS, PAD, UNK_TOKEN, OTHER_SPECIAL)
# Contents of end-of-text / end-of-turn special tokens: spelled with <eos> even when not the eos token.
END_TOKENS = (
    "<|endoftext|>",
    "<|im_end|>",
    "<|eot_id|>",
    "<|end_of_text|>",
    "<|eom_id|>",
    "</s>",
    "<|end|>",
    "<end_of_turn>",
)
DEFAULT_CHARS = "".join(chr(c) for c in range(0x20, 0x7F)) + "\n\t\r"

FILE_FORMAT = "spellm-charset"
FILE_VERSION = 1
_ARRAYS = {"token_chars": "u1", "lengths": "<i4", "truncated": "?", "unknown": "?", "normalized": "?"}
_NAMED = re.compile(r"<[^<>\s]+>")
_BYTE_TOKEN = re.compile(r"<0x([0-9A-Fa-f]{2})>")


def normalize_text(text: str) -> str:
    """Return `text` in NFKD with combining marks removed (é→e, ﬁ→fi, Ａ→A)."""
    return "".join(
        c for c in unicodedata.normalize("NFKD", text) if not unicodedata.category(c).startswith("M")
    )


@dataclass(frozen=True, kw_only=True)
class Charset:
    """An ordered symbol table: id 0 is `<end>`, then single characters and `<name>` symbols."""

    symbols: tuple[str, ...]
    _index: dict[str, int] = field(init=False, repr=False, compare=False)

    def __post_init__(self) -> None:
        symbols = tuple(self.symbols)
        object.__setattr__(self, "symbols", symbols)
        if len(symbols) > MAX_SYMBOLS:
            raise SpellmError(f"symbol table has {len(symbols)} symbols; at most {MAX_SYMBOLS} fit uint8 ids")
        if not symbols or symbols[0] != END:
            raise SpellmError(f"symbol table must start with {END!r} (id 0)")
        index: dict[str, int] = {}
        for i, s in enumerate(symbols):
            if not isinstance(s, str) or not s:
                raise SpellmError(f"symbol {i} is {s!r}, not a non-empty string")
            if s in index:
                raise SpellmError(f"symbol {s!r} appears twice (ids {index[s]} and {i})")
            if len(s) > 1 and not _NAMED.fullmatch(s):
                raise SpellmError(f"symbol {i} {s!r} is neither one character nor a <name>")
            if len(s) == 1 and normalize_text(s) != s:
                raise SpellmError(
                    f"symbol {i} {s!r} can never occur: normalisation turns it into {normalize_text(s)!r}"
                )
            index[s] = i
        if UNK not in index:
            raise SpellmError(f"symbol table has no {UNK!r} symbol")
        object.__setattr__(self, "_index", index)

    @classmethod
    def from_chars(cls, chars: str | Sequence[str], specials: Sequence[str] = DEFAULT_SPECIALS) -> Charset:
        """Build `<end>`, the given characters, `<unk>`, then the special-token symbols, in that order."""
        return cls(symbols=(END, *chars, UNK, *specials))

    @classmethod
    def default(cls) -> Charset:
        """Return the default 105-symbol table documented in this module."""
        return cls.from_chars(DEFAULT_CHARS, DEFAULT_SPECIALS)

    @property
    def size(self) -> int:
        """Number of symbols (the width of each char head)."""
        return len(self.symbols)

    def __len__(self) -> int:
        return len(self.symbols)

    @property
    def end_id(self) -> int:
        """Id of `<end>` (always 0)."""
        return 0

    @property
    def unk_id(self) -> int:
        """Id of `<unk>`, the symbol for characters outside the table."""
        return self._index[UNK]

    @property
    def eos_id(self) -> int | None:
        """Id of `<eos>`, or None if the table has none."""
        return self._index.get(EOS)

    @property
    def bos_id(self) -> int | None:
        """Id of `<bos>`, or None."""
        return self._index.get(BOS)

    @property
    def pad_id(self) -> int | None:
        """Id of `<pad>`, or None."""
        return self._index.get(PAD)

    @property
    def unk_token_id(self) -> int | None:
        """Id of `<unk-token>` (the tokenizer's unknown token), or None."""
        return self._index.get(UNK_TOKEN)

    @property
    def other_special_id(self) -> int | None:
        """Id of `<other-special>`, or None."""
        return self._index.get(OTHER_SPECIAL)

    def id_of(self, symbol: str) -> int | None:
        """Return the id of a symbol (a character or a `<name>`), or None."""
        return self._index.get(symbol)

    def encode(self, text: str) -> list[int]:
        """Normalise `text` and return one symbol id per resulting character (`<unk>` when outside)."""
        unk = self.unk_id
        return [self._index.get(c, unk) for c in normalize_text(text)]

    def decode(self, ids: Sequence[int]) -> str:
        """Render symbol ids up to the first `<end>` (named symbols as their names), for reading."""
        out = []
        for i in ids:
            if int(i) == 0:
                break
            out.append(self.symbols[int(i)])
        return "".join(out)

    @property
    def hash(self) -> str:
        """sha256 of the symbol list."""
        return hashlib.sha256(json.dumps(list(self.symbols), ensure_ascii=True).encode()).hexdigest()


DEFAULT_CHARSET = Charset.default()


# ---------------------------------------------------------------------------------------------------------
# Token surface strings


@dataclass(frozen=True, kw_only=True)
class Conventions:
    """How a tokenizer writes text into token strings, as read from its backend JSON."""

    byte_level: bool = False  # GPT-2 bytes→unicode map
    metaspace: str | None = None  # the space replacement character, usually "▁"
    byte_fallback: bool = False  # <0xNN> tokens
    subword_prefix: str | None = None  # WordPiece continuation prefix, usually "##"
    word_suffix: str | None = None  # BPE end-of-word suffix, e.g. "</w>"

    @property
    def name(self) -> str:
        """Short description such as `byte_level` or `metaspace+byte_fallback`."""
        parts = []
        if self.byte_level:
            parts.append("byte_level")
        if self.metaspace is not None:
            parts.append("metaspace")
        if self.byte_fallback:
            parts.append("byte_fallback")
        if self.subword_prefix is not None:
            parts.append("wordpiece")
        if self.word_suffix is not None:
            parts.append("word_suffix")
        return "+".join(parts) or "plain"


def _components(node: Any, list_key: str) -> list[dict]:
    """Flatten a decoder / pre-tokenizer node (possibly a Sequence) into its components."""
    if not isinstance(node, dict):
        return []
    if node.get("type") == "Sequence":
        out: list[dict] = []
        for child in node.get(list_key) or []:
            out.extend(_components(child, list_key))
        return out
    return [node]


def detect_conventions(spec: Mapping[str, Any]) -> Conventions:
    """Read the surface conventions from a `tokenizers` JSON document (decoder, pre-tokenizer, model)."""
    decoders = _components(spec.get("decoder"), "decoders")
    pretoks = _components(spec.get("pre_tokenizer"), "pretokenizers")
    model = spec.get("model") or {}
    dec_types = {d.get("type") for d in decoders}
    pre_types = {p.get("type") for p in pretoks}

    byte_level = "ByteLevel" in dec_types or "ByteLevel" in pre_types
    metaspace = None
    for d in decoders:
        if d.get("type") == "Metaspace":
            metaspace = d.get("replacement", "▁")
        elif d.get("type") == "Replace" and d.get("content") == " ":
            pattern = d.get("pattern") or {}
            if isinstance(pattern, dict) and isinstance(pattern.get("String"), str):
                metaspace = pattern["String"]
    if metaspace is None:
        for p in pretoks:
            if p.get("type") == "Metaspace":
                metaspace = p.get("replacement", "▁")
    byte_fallback = bool(model.get("byte_fallback")) or "ByteFallback" in dec_types
    subword_prefix = None
    for d in decoders:
        if d.get("type") == "WordPiece":
            subword_prefix = d.get("prefix", "##")
    if subword_prefix is None and model.get("type") == "WordPiece":
        subword_prefix = model.get("continuing_subword_prefix") or "##"
    word_suffix = None
    for d in decoders:
        if d.get("type") == "BPEDecoder":
            word_suffix = d.get("suffix", "</w>")
    if word_suffix is None and model.get("type") == "BPE" and model.get("end_of_word_suffix"):
        word_suffix = model["end_of_word_suffix"]
    return Conventions(
        byte_level=byte_level,
        metaspace=metaspace,
        byte_fallback=byte_fallback,
        subword_prefix=subword_prefix,
        word_suffix=word_suffix,
    )


def bytes_to_unicode() -> dict[int, str]:
    """Return the GPT-2 byte-level map: printable bytes map to themselves, the rest to U+0100 upwards."""
    keep = [*range(0x21, 0x7F), *range(0xA1, 0xAD), *range(0xAE, 0x100)]
    mapping = {b: chr(b) for b in keep}
    shift = 0
    for b in range(256):
        if b not in mapping:
            mapping[b] = chr(0x100 + shift)
            shift += 1
    return mapping


_UNICODE_TO_BYTE = {c: b for b, c in bytes_to_unicode().items()}


def surface_of(token: str, conventions: Conventions) -> str:
    """Return the text a vocabulary (non-added) token contributes to decoded output."""
    if conventions.byte_fallback:
        m = _BYTE_TOKEN.fullmatch(token)
        if m:
            b = int(m.group(1), 16)
            return chr(b) if b < 0x80 else "\ufffd"
    if conventions.byte_level:
        data = bytearray()
        for ch in token:
            b = _UNICODE_TO_BYTE.get(ch)
            if b is None:
                data += ch.encode("utf-8")
            else:
                data.append(b)
        return data.decode("utf-8", errors="replace")
    s = token
    if conventions.metaspace:
        s = s.replace(conventions.metaspace, " ")
    prefix = conventions.subword_prefix
    if prefix is not None:
        s = s[len(prefix) :] if s.startswith(prefix) and len(s) > len(prefix) else " " + s
    suffix = conventions.word_suffix
    if suffix and s.endswith(suffix) and len(s) > len(suffix):
        s = s[: -len(suffix)] + " "
    return s


@dataclass(kw_only=True)
class TokenSurfaces:
    """Per-token surface strings of a tokenizer (None where an id has no token) and its special tokens."""

    surfaces: list[str | None]  # special tokens: their content
    special_roles: dict[int, str]  # token id -> role symbol name (<eos>, <bos>, <pad>, <unk-token>, ...)
    role_holders: frozenset[int]  # special ids whose role is the tokenizer's own attribute for it
    conventions: Conventions


def load_tokenizer(path: str | os.PathLike) -> Any:
    """Load a HF fast tokenizer from a directory; a missing directory or a slow-only tokenizer is an error."""
    p = Path(path)
    if not p.exists():
        raise SpellmError(f"tokenizer directory {str(path)!r} does not exist")
    if not p.is_dir():
        raise SpellmError(f"tokenizer path {str(path)!r} is not a directory")
    from transformers import AutoTokenizer

    try:
        tok = AutoTokenizer.from_pretrained(str(p))
    except (OSError, ValueError, KeyError) as exc:
        reason = " ".join(str(exc).split())[:300] or type(exc).__name__
        raise SpellmError(f"{p}: cannot load a tokenizer: {reason}") from exc
    _backend_of(tok, where=str(p))
    return tok


def _backend_of(tokenizer: Any, where: str | None = None) -> Any:
    backend = getattr(tokenizer, "backend_tokenizer", None)
    if backend is None:
        at = f"{where}: " if where else ""
        raise SpellmError(
            f"{at}{type(tokenizer).__name__} is a slow (Python-only) tokenizer; "
            "a fast tokenizer (tokenizer.json) is required"
        )
    return backend


def token_surfaces(tokenizer: Any) -> TokenSurfaces:
    """Return every token's surface string, the special tokens' roles and the role holders (module doc)."""
    backend = _backend_of(tokenizer)
    spec = json.loads(backend.to_str())
    conventions = detect_conventions(spec)
    vocab = backend.get_vocab(with_added_tokens=True)
    size = max(vocab.values()) + 1 if vocab else 0
    tokens: list[str | None] = [None] * size
    for tok, i in vocab.items():
        tokens[i] = tok
    added = {int(a["id"]): a for a in spec.get("added_tokens") or []}

    attributes = (
        (EOS, "eos_token_id"),
        (BOS, "bos_token_id"),
        (PAD, "pad_token_id"),
        (UNK_TOKEN, "unk_token_id"),
    )
    role_ids = [(role, getattr(tokenizer, name, None)) for role, name in attributes]
    role_ids = [(role, tid) for role, tid in role_ids if isinstance(tid, int)]
    special_ids = {i for i, a in added.items() if a.get("special")}
    special_ids.update(int(i) for i in getattr(tokenizer, "all_special_ids", None) or [])
    special_ids.update(tid for _, tid in role_ids)

    def content(i: int) -> str | None:
        if i in added:
            return added[i]["content"]
        return tokens[i] if 0 <= i < size else None

    roles: dict[int, str] = {}
    for role, tid in role_ids:
        if role in (EOS, BOS):
            roles.setdefault(tid, role)
    for tid in sorted(special_ids):  # end markers take the eos role before pad and unk are given
        if tid not in roles and content(tid) in END_TOKENS:
            roles[tid] = EOS
    for role, tid in role_ids:
        roles.setdefault(tid, role)
    for tid in special_ids:
        roles.setdefault(tid, OTHER_SPECIAL)
    holders = frozenset(tid for role, tid in role_ids if roles[tid] == role)

    surfaces: list[str | None] = []
    for i, tok in enumerate(tokens):
        if tok is None:
            surfaces.append(None)
        elif i in roles or i in added:
            surfaces.append(content(i))
        else:
            surfaces.append(surface_of(tok, conventions))
    return TokenSurfaces(
        surfaces=surfaces, special_roles=roles, role_holders=holders, conventions=conventions
    )


# ---------------------------------------------------------------------------------------------------------
# The token -> chars table


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


# ---------------------------------------------------------------------------------------------------------
# chars -> token lookup on any torch device

_M1 = 2_147_483_647  # 2**31 - 1, prime
_M2 = 2_147_483_629  # largest prime below it


def _powers(k: int, attempt: int) -> torch.Tensor:
    """Polynomial-hash weights [2, k] for two prime moduli; `attempt` varies the bases."""
    out = []
    for base, mod in ((257 + 2 * attempt, _M1), (263 + 6 * attempt, _M2)):
        out.append([pow(base, i, mod) for i in range(k)])
    return torch.tensor(out, dtype=torch.int64)


def _row_hash(rows: torch.Tensor, pw: torch.Tensor) -> torch.Tensor:
    """62-bit hash of int64 rows [..., k] with values in [0, 255]."""
    h1 = (rows * pw[0]).sum(-1) % _M1
    h2 = (rows * pw[1]).sum(-1) % _M2
    return h1 * (1 << 31) + h2


class _HashIndex:
    """Distinct rows sorted by hash; a query is hashed, binary-searched and verified against the row."""

    def __init__(self, rows: np.ndarray, ids: np.ndarray, device: torch.device) -> None:
        k = rows.shape[1]
        rows_t = torch.from_numpy(np.ascontiguousarray(rows, dtype=np.uint8))
        as_long = rows_t.long()
        for attempt in range(16):
            pw = _powers(k, attempt)
            hashes, order = torch.sort(_row_hash(as_long, pw))
            if hashes.numel() < 2 or not bool((hashes[1:] == hashes[:-1]).any()):
                break
        else:  # 16 colliding 62-bit hash families: practically impossible
            raise RuntimeError("could not find a collision-free row hash")
        self.pw = pw.to(device)
        self.hashes = hashes.to(device)
        self.rows = rows_t[order].to(device)
        self.ids = torch.from_numpy(np.ascontiguousarray(ids, dtype=np.int64))[order].to(device)

    def find(self, query: torch.Tensor, valid: torch.Tensor) -> torch.Tensor:
        n = self.hashes.numel()
        if n == 0:
            return torch.full(query.shape[:-1], -1, dtype=torch.long, device=query.device)
        h = _row_hash(query, self.pw)
        pos = torch.searchsorted(self.hashes, h).clamp_(max=n - 1)
        hit = valid & (self.hashes[pos] == h) & (self.rows[pos] == query).all(-1)
        return torch.where(hit, self.ids[pos], torch.full_like(pos, -1))


class TokenLookup:
    """Char ids → token id on a torch device (exact and prefix), without host syncs or per-token loops."""

    def __init__(self, table: CharTable, device: str | torch.device = "cpu") -> None:
        self.device = torch.device(device)
        self.k = table.k
        self.charset = table.charset
        self.vocab_size = table.vocab_size
        self.table_hash = table.hash
        self.token_chars = torch.from_numpy(table.token_chars.astype(np.int64)).to(self.device)
        self.decodable = torch.from_numpy(table.decodable.copy()).to(self.device)
        # Spelled longer than k with known symbols: their row is their first k characters.
        self.long_tokens = torch.from_numpy(table.truncated & ~table.unknown).to(self.device)
        self._exact = _HashIndex(*table.exact_entries(), self.device)
        self._prefix = _HashIndex(*table.prefix_entries(), self.device)

    def _canonical(self, chars: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        if chars.shape[-1] != self.k:
            raise ValueError(f"char ids must have last dimension k={self.k}, got shape {tuple(chars.shape)}")
        chars = chars.to(device=self.device, dtype=torch.long)
        valid = ((chars >= 0) & (chars < self.charset.size)).all(-1)
        after_end = (chars == 0).cumsum(-1) > 0
        return chars.clamp(0, 255).masked_fill(after_end, 0), valid

    def lookup(self, chars: torch.Tensor) -> torch.Tensor:
        """Return the canonical token id whose row equals `chars` [..., k] (read up to `<end>`), else -1."""
        query, valid = self._canonical(chars)
        return self._exact.find(query, valid)

    def prefix_lookup(self, chars: torch.Tensor) -> torch.Tensor:
        """Return the canonical decodable token whose row starts with `chars` [..., k], else -1."""
        query, valid = self._canonical(chars)
        return self._prefix.find(query, valid)


# ---------------------------------------------------------------------------------------------------------
# Coverage report


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
