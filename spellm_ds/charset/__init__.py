"""Character vocabulary: the symbols the k char heads predict, the token→chars table and chars→token lookup.

One concern per module:

- `symbols`: the symbol table (`Charset`, `DEFAULT_CHARSET`), named symbols, normalisation.
- `surfaces`: what each token of a tokenizer reads as (surface strings, conventions, special-token roles).
- `table`: `CharTable`, the token → k symbols table with its flags, canonical rows, file and coverage.
- `lookup`: `TokenLookup`, chars → token id on any torch device.

The names below are the package's public interface.
"""

from spellm_ds.charset.lookup import (
    TokenLookup,
)
from spellm_ds.charset.surfaces import (
    Conventions,
    TokenSurfaces,
    bytes_to_unicode,
    detect_conventions,
    load_tokenizer,
    surface_of,
    token_surfaces,
)
from spellm_ds.charset.symbols import (
    BOS,
    DEFAULT_CHARS,
    DEFAULT_CHARSET,
    DEFAULT_K,
    DEFAULT_SPECIALS,
    END,
    END_TOKENS,
    EOS,
    MAX_SYMBOLS,
    OTHER_SPECIAL,
    PAD,
    UNK,
    UNK_TOKEN,
    Charset,
    normalize_text,
)
from spellm_ds.charset.table import (
    FILE_FORMAT,
    FILE_VERSION,
    CharTable,
    coverage_report,
    format_report,
)

__all__ = [
    "BOS",
    "DEFAULT_CHARS",
    "DEFAULT_CHARSET",
    "DEFAULT_K",
    "DEFAULT_SPECIALS",
    "END",
    "END_TOKENS",
    "EOS",
    "FILE_FORMAT",
    "FILE_VERSION",
    "MAX_SYMBOLS",
    "OTHER_SPECIAL",
    "PAD",
    "UNK",
    "UNK_TOKEN",
    "CharTable",
    "Charset",
    "Conventions",
    "TokenLookup",
    "TokenSurfaces",
    "bytes_to_unicode",
    "coverage_report",
    "detect_conventions",
    "format_report",
    "load_tokenizer",
    "normalize_text",
    "surface_of",
    "token_surfaces",
]
