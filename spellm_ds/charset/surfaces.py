"""How a tokenizer's tokens read as text: surface strings, conventions and special-token roles.

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
"""

from __future__ import annotations

import json
import os
import re
from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from spellm_ds.charset.symbols import BOS, END_TOKENS, EOS, OTHER_SPECIAL, PAD, UNK_TOKEN
from spellm_ds.errors import SpellmError

_BYTE_TOKEN = re.compile(r"<0x([0-9A-Fa-f]{2})>")


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
