"""The symbols the k char heads predict: the default table, named symbols, normalisation.

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

Normalisation: Unicode NFKD, then every combining mark (category M*) is dropped, then each character that
is not a single-character symbol becomes `<unk>`. So é→e, ﬁ→fi, Ａ→A, a no-break space → space, and
non-Latin letters (中, П) → `<unk>`.
"""

from __future__ import annotations

import hashlib
import json
import re
import unicodedata
from collections.abc import Sequence
from dataclasses import dataclass, field

from spellm_ds.errors import SpellmError

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

_NAMED = re.compile(r"<[^<>\s]+>")


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
