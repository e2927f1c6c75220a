"""Character vocabulary: symbol table, normalisation, token→chars tables, lookups, files and the CLI.

Tokenizers are trained locally on the Python docs corpus (byte-level BPE and Metaspace fixtures from
conftest, a WordPiece one here). Expected values come from the tokenizer's own decoder, plain Python
references and hand counts. Run alone: `.venv/bin/python -m pytest tests/test_charset.py -q`.
"""

from __future__ import annotations

import base64
import json
import subprocess
import sys
import unicodedata
from pathlib import Path

import numpy as np
import pytest
import torch
from transformers import AutoTokenizer, PreTrainedTokenizerFast

from spellm_ds import cli
from spellm_ds.charset import (
    DEFAULT_CHARS,
    DEFAULT_CHARSET,
    EOS,
    OTHER_SPECIAL,
    Charset,
    CharTable,
    TokenLookup,
    coverage_report,
    detect_conventions,
    surface_of,
    token_surfaces,
)
from spellm_ds.errors import SpellmError

K = 10

# The documented default table, written out independently of the module.
REF_IDS = {chr(c): c - 31 for c in range(0x20, 0x7F)} | {"\n": 96, "\t": 97, "\r": 98}
REF_UNK = 99
REF_SPECIAL = {"<eos>": 100, "<bos>": 101, "<pad>": 102, "<unk-token>": 103, "<other-special>": 104}


def ref_spell(surface: str) -> tuple[list[int], bool]:
    """Reference spelling: NFKD, drop marks, map to the documented ids; returns (ids, normalized)."""
    norm = "".join(c for c in unicodedata.normalize("NFKD", surface) if unicodedata.category(c)[0] != "M")
    return [REF_IDS.get(c, REF_UNK) for c in norm], norm != surface


def ref_surfaces(tok, special: set[int]) -> dict[int, str]:
    """Each token's text as the tokenizer's own decoder writes it after an anchor token "a"."""
    anchor = tok.convert_tokens_to_ids("a")
    base = tok.decode([anchor], clean_up_tokenization_spaces=False)
    out = {}
    for t in range(len(tok)):
        if t in special:
            continue
        text = tok.decode([anchor, t], clean_up_tokenization_spaces=False)
        assert text.startswith(base)
        out[t] = text[len(base) :]
    return out


def ref_canonical(table: CharTable, normalized: dict[int, bool]) -> dict[tuple, int]:
    """Per-row canonical token by the documented rule (not truncated, not normalized, lowest id)."""
    best: dict[tuple, tuple] = {}
    for t in range(table.vocab_size):
        if table.unknown[t]:
            continue
        row = tuple(int(c) for c in table.token_chars[t])
        key = (bool(table.truncated[t]), normalized.get(t, False), t)
        if row not in best or key < best[row]:
            best[row] = key
    return {row: key[2] for row, key in best.items()}


def ref_cut(query: list[int]) -> tuple[int, ...] | None:
    """A query read up to its first END, padded back to k; None if any id is out of range."""
    if any(c < 0 or c >= 105 for c in query):
        return None
    cut = query.index(0) if 0 in query else len(query)
    return tuple(query[:cut]) + (0,) * (len(query) - cut)


def wordpiece_tokenizer(files: list[Path]) -> PreTrainedTokenizerFast:
    """A small WordPiece tokenizer (BERT conventions, no decoder clean-up) trained on a few docs files."""
    from tokenizers import Tokenizer, decoders, models, normalizers, pre_tokenizers, trainers

    tok = Tokenizer(models.WordPiece(unk_token="[UNK]"))
    tok.normalizer = normalizers.BertNormalizer(lowercase=False, strip_accents=False)
    tok.pre_tokenizer = pre_tokenizers.BertPreTokenizer()
    tok.decoder = decoders.WordPiece(prefix="##", cleanup=False)
    specials = ["[PAD]", "[UNK]", "[CLS]", "[SEP]", "[MASK]"]
    trainer = trainers.WordPieceTrainer(vocab_size=1000, special_tokens=specials, show_progress=False)
    tok.train([str(f) for f in files], trainer)
    return PreTrainedTokenizerFast(
        tokenizer_object=tok,
        unk_token="[UNK]",
        pad_token="[PAD]",
        cls_token="[CLS]",
        sep_token="[SEP]",
        mask_token="[MASK]",
    )


@pytest.fixture(scope="module")
def wordpiece(docs_files) -> PreTrainedTokenizerFast:
    return wordpiece_tokenizer(docs_files[:8])


@pytest.fixture(scope="module")
def tokenizers(bytelevel_tokenizer, metaspace_tokenizer, wordpiece) -> dict:
    return {
        "byte_level": AutoTokenizer.from_pretrained(str(bytelevel_tokenizer)),
        "metaspace": AutoTokenizer.from_pretrained(str(metaspace_tokenizer)),
        "wordpiece": wordpiece,
    }


KINDS = ["byte_level", "metaspace", "wordpiece"]


# ---------------------------------------------------------------------------------------------- symbols


def test_default_table_is_the_documented_105_symbols():
    cs = DEFAULT_CHARSET
    assert cs.size == 105 and cs.end_id == 0 and cs.symbols[0] == "<end>"
    for ch, i in REF_IDS.items():
        assert cs.id_of(ch) == i
    assert cs.unk_id == REF_UNK and cs.symbols[REF_UNK] == "<unk>"
    assert (cs.eos_id, cs.bos_id, cs.pad_id, cs.unk_token_id, cs.other_special_id) == (
        100,
        101,
        102,
        103,
        104,
    )
    assert len(set(cs.symbols)) == 105


def test_symbol_table_limits():
    cjk = "".join(chr(0x4E00 + i) for i in range(200))  # stable under NFKD
    with pytest.raises(SpellmError, match="at most 255"):
        Charset.from_chars(DEFAULT_CHARS + cjk)
    assert Charset.from_chars(DEFAULT_CHARS + cjk[:150]).size == 255
    with pytest.raises(SpellmError, match="twice"):
        Charset.from_chars("abca")
    with pytest.raises(SpellmError, match="never occur"):
        Charset.from_chars("abé")


@pytest.mark.parametrize(
    ("text", "expected"),
    [
        ("café", "cafe"),  # accent stripped
        ("Ångström", "Angstrom"),
        ("ﬁle", "file"),  # ligature
        ("Ａｂｃ１", "Abc1"),  # full-width forms
        ("a\u00a0b", "a b"),  # no-break space
        ("x\ty\r\n", "x\ty\r\n"),
    ],
)
def test_normalisation_to_table_characters(text, expected):
    assert DEFAULT_CHARSET.encode(text) == [REF_IDS[c] for c in expected]


@pytest.mark.parametrize("text", ["中文", "Привет", "ελληνικά", "ß", "€"])
def test_non_latin_scripts_become_unk(text):
    ids = DEFAULT_CHARSET.encode(text)
    assert ids and all(i == REF_UNK for i in ids)


# ---------------------------------------------------------------------------------------------- tables


@pytest.mark.parametrize("kind", KINDS)
def test_rows_and_flags_match_the_tokenizers_own_decoder(tokenizers, kind):
    tok = tokenizers[kind]
    table = CharTable.build(tok, k=K)
    special = set(tok.all_special_ids)
    refs = ref_surfaces(tok, special)
    assert table.vocab_size == len(tok)
    assert len(refs) == len(tok) - len(special)
    for t, surface in refs.items():
        ids, normalized = ref_spell(surface)
        row = (ids[:K] + [0] * K)[:K]
        assert table.token_chars[t].tolist() == row, (t, surface)
        assert bool(table.truncated[t]) == (len(ids) > K), (t, surface)
        assert bool(table.unknown[t]) == (not ids or REF_UNK in ids), (t, surface)
        assert bool(table.normalized[t]) == normalized, (t, surface)
    # Both kinds of flagged tokens occur (the WordPiece alphabet of its 8 files is plain ASCII).
    assert table.truncated.any() and (table.unknown.any() or kind == "wordpiece")


@pytest.mark.parametrize("kind", KINDS)
def test_surfaces_concatenate_to_decoded_text(tokenizers, docs_files, kind):
    tok = tokenizers[kind]
    text = docs_files[3].read_text(encoding="utf-8")[:3000]
    ids = tok.encode(text, add_special_tokens=False)
    surfaces = token_surfaces(tok).surfaces
    joined = "".join(surfaces[i] for i in ids)
    decoded = tok.decode(ids, clean_up_tokenization_spaces=False)
    if kind != "byte_level":  # Metaspace and WordPiece decoders drop the first word's leading space
        assert joined[0] == " "
        joined = joined[1:]
    assert joined == decoded


@pytest.mark.parametrize("kind", KINDS)
def test_exact_tokens_round_trip_and_collisions_follow_the_rule(tokenizers, kind):
    tok = tokenizers[kind]
    table = CharTable.build(tok, k=K)
    lookup = TokenLookup(table)
    special = set(tok.all_special_ids)
    refs = ref_surfaces(tok, special)
    normalized = {t: ref_spell(s)[1] for t, s in refs.items()}
    canon = ref_canonical(table, normalized)
    got = lookup.lookup(torch.from_numpy(table.token_chars).long()).tolist()
    for t in range(table.vocab_size):
        row = tuple(int(c) for c in table.token_chars[t])
        expected = -1 if table.unknown[t] else canon[row]
        assert got[t] == expected, (t, table.spelling(t))
        assert bool(table.decodable[t]) == (expected == t)
        if not table.unknown[t] and not table.truncated[t] and expected != t:
            # An exact token that does not come back is shadowed by a token with the same text.
            winner = expected
            assert normalized.get(t) or refs.get(winner) == refs.get(t), (t, winner)
    exact = ~table.unknown & ~table.truncated
    assert table.decodable[exact].mean() > 0.95


def ref_row(symbols: list[str]) -> list[int]:
    """A row from symbols written out by hand (characters and `<name>`s), END-padded or cut to K."""
    ids = [REF_SPECIAL[s] if s in REF_SPECIAL else REF_IDS[s] for s in symbols]
    return (ids + [0] * K)[:K]


def test_special_tokens_map_to_their_symbols_and_round_trip(tokenizers):
    # Role holders (the tokenizer's own eos/bos/pad/unk) are their symbol alone; [CLS], [SEP] and [MASK]
    # are no attribute's token, so they are <other-special> followed by their content.
    expected = {
        "byte_level": {"<|endoftext|>": ["<eos>"], "<|pad|>": ["<pad>"]},
        "metaspace": {"<unk>": ["<unk-token>"], "<s>": ["<bos>"], "</s>": ["<eos>"], "<pad>": ["<pad>"]},
        "wordpiece": {
            "[PAD]": ["<pad>"],
            "[UNK]": ["<unk-token>"],
            "[CLS]": ["<other-special>", "[", "C", "L", "S", "]"],
            "[SEP]": ["<other-special>", "[", "S", "E", "P", "]"],
            "[MASK]": ["<other-special>", "[", "M", "A", "S", "K", "]"],
        },
    }
    for kind, pairs in expected.items():
        tok = tokenizers[kind]
        table = CharTable.build(tok, k=K)
        lookup = TokenLookup(table)
        for content, symbols in pairs.items():
            t = tok.convert_tokens_to_ids(content)
            assert table.token_chars[t].tolist() == ref_row(symbols), (kind, content)
            assert int(table.lengths[t]) == len(symbols)
            assert not table.unknown[t] and not table.truncated[t] and table.decodable[t]
            assert int(lookup.lookup(torch.tensor(ref_row(symbols)))) == t, (kind, content)
        # Every special token of these tokenizers has a row of its own.
        special = sorted(set(tok.all_special_ids))
        assert table.decodable[special].all(), kind


def end_tokens_tokenizer(out: Path) -> Path:
    """Byte-level vocabulary whose eos is <|im_end|> (also pad) and whose unk token is <|endoftext|>."""
    from tokenizers import AddedToken, Tokenizer, decoders, models, pre_tokenizers

    vocab = {"<|endoftext|>": 0, "<|im_end|>": 1, "a": 2, "Ġthe": 3, "<": 4, "Ġ<": 5}
    tok = Tokenizer(models.BPE(vocab=vocab, merges=[], unk_token="<|endoftext|>"))
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    extra = ["<|eot_id|>", "<|end_of_text|>", "<repo_name>", "<reponame>"]  # ids 6..9
    tok.add_special_tokens([AddedToken(c, special=True) for c in ["<|endoftext|>", "<|im_end|>", *extra]])
    fast = PreTrainedTokenizerFast(
        tokenizer_object=tok, eos_token="<|im_end|>", pad_token="<|im_end|>", unk_token="<|endoftext|>"
    )
    fast.save_pretrained(str(out))
    return out


def test_end_tokens_and_other_specials_get_distinct_rows(tmp_path):
    tok = AutoTokenizer.from_pretrained(str(end_tokens_tokenizer(tmp_path / "tok")))
    ids = {c: tok.convert_tokens_to_ids(c) for c in tok.get_vocab()}
    assert (tok.eos_token_id, tok.pad_token_id, tok.unk_token_id) == (1, 1, 0)
    # Rows written out by hand: k=10 keeps the role symbol and the first 9 characters of the content.
    expected = {
        "<|im_end|>": (["<eos>"], 1),  # the eos token (and pad): its symbol alone
        "<|endoftext|>": (["<eos>", *"<|endofte"], 14),  # the unk token, but an end marker
        "<|eot_id|>": (["<eos>", *"<|eot_id|"], 11),
        "<|end_of_text|>": (["<eos>", *"<|end_of_"], 16),
        "<repo_name>": (["<other-special>", *"<repo_nam"], 12),
        "<reponame>": (["<other-special>", *"<reponame"], 11),
    }
    ts = token_surfaces(tok)
    assert ts.special_roles == {
        0: "<eos>",
        1: "<eos>",
        6: "<eos>",
        7: "<eos>",
        8: "<other-special>",
        9: "<other-special>",
    }
    assert ts.role_holders == {1}
    table = CharTable.build(tok, k=K)
    lookup = TokenLookup(table)
    for content, (symbols, length) in expected.items():
        t = ids[content]
        assert table.token_chars[t].tolist() == ref_row(symbols), content
        assert int(table.lengths[t]) == length and bool(table.truncated[t]) == (length > K), content
        assert not table.unknown[t] and table.decodable[t], content
        assert int(lookup.lookup(torch.tensor(ref_row(symbols)))) == t, content
    rows = {tuple(table.token_chars[ids[c]].tolist()) for c in expected}
    assert len(rows) == len(expected)
    for content in ("<|im_end|>", "<|endoftext|>", "<|eot_id|>", "<|end_of_text|>"):
        assert table.token_chars[ids[content], 0] == REF_SPECIAL["<eos>"]
    for content in ("<repo_name>", "<reponame>"):
        assert table.token_chars[ids[content], 0] == REF_SPECIAL["<other-special>"]
    # Ordinary tokens keep their plain spelling, also the ones that start like a special's content.
    assert table.token_chars[ids["Ġ<"]].tolist() == ref_row([" ", "<"]) and table.decodable[ids["<"]]


def test_wordpiece_pieces_and_conventions(tokenizers):
    wp = tokenizers["wordpiece"]
    surfaces = token_surfaces(wp)
    assert surfaces.conventions.name == "wordpiece"
    vocab = wp.get_vocab()
    cont = next(t for t in vocab if t.startswith("##") and len(t) > 3)
    word = next(t for t in vocab if t.isalpha() and len(t) > 3)
    assert surfaces.surfaces[vocab[cont]] == cont[2:]
    assert surfaces.surfaces[vocab[word]] == " " + word
    assert token_surfaces(tokenizers["byte_level"]).conventions.name == "byte_level"
    assert token_surfaces(tokenizers["metaspace"]).conventions.name == "metaspace+byte_fallback"


@pytest.mark.parametrize(
    ("spec", "name", "surface"),
    [
        (  # Llama-3 / Qwen2 shape: split regex then byte-level
            {
                "pre_tokenizer": {
                    "type": "Sequence",
                    "pretokenizers": [{"type": "Split"}, {"type": "ByteLevel", "use_regex": False}],
                },
                "decoder": {"type": "ByteLevel"},
                "model": {"type": "BPE"},
            },
            "byte_level",
            {"ĠhelloĊ": " hello\n", "Ã©": "é", "âĢ": "\ufffd"},
        ),
        (  # Llama-2 / Mistral shape: no pre-tokenizer, Replace decoder, byte fallback
            {
                "pre_tokenizer": None,
                "decoder": {
                    "type": "Sequence",
                    "decoders": [
                        {"type": "Replace", "pattern": {"String": "▁"}, "content": " "},
                        {"type": "ByteFallback"},
                        {"type": "Fuse"},
                        {"type": "Strip", "content": " ", "start": 1, "stop": 0},
                    ],
                },
                "model": {"type": "BPE", "byte_fallback": True},
            },
            "metaspace+byte_fallback",
            {"▁the": " the", "<0x0A>": "\n", "<0xE2>": "\ufffd", "ing": "ing"},
        ),
        (  # T5 shape: Unigram with a Metaspace decoder
            {"decoder": {"type": "Metaspace", "replacement": "▁"}, "model": {"type": "Unigram"}},
            "metaspace",
            {"▁the": " the", "<0x41>": "<0x41>"},
        ),
        (  # BERT shape
            {"decoder": {"type": "WordPiece", "prefix": "##"}, "model": {"type": "WordPiece"}},
            "wordpiece",
            {"##ing": "ing", "the": " the", "##": " ##"},
        ),
        (  # GPT-1 shape: end-of-word suffix
            {"decoder": {"type": "BPEDecoder", "suffix": "</w>"}, "model": {"type": "BPE"}},
            "word_suffix",
            {"the</w>": "the ", "th": "th"},
        ),
    ],
)
def test_conventions_are_read_from_the_backend_json(spec, name, surface):
    conv = detect_conventions(spec)
    assert conv.name == name
    assert {t: surface_of(t, conv) for t in surface} == surface


def test_metaspace_byte_fallback_tokens(tokenizers):
    tok = tokenizers["metaspace"]
    table = CharTable.build(tok, k=K)
    a = tok.convert_tokens_to_ids("<0x41>")
    assert table.token_chars[a, 0] == REF_IDS["A"] and not table.unknown[a]
    # "A" is also an ordinary token with a lower id: the byte token is shadowed.
    assert not table.decodable[a] and tok.convert_tokens_to_ids("A") < a
    for b in (0xC3, 0xE4, 0xFF):
        assert table.unknown[tok.convert_tokens_to_ids(f"<0x{b:02X}>")]


def test_batched_lookup_equals_python_reference(tokenizers):
    table = CharTable.build(tokenizers["byte_level"], k=K)
    lookup = TokenLookup(table)
    rng = np.random.default_rng(0)
    v = table.vocab_size
    rows = table.token_chars[rng.integers(0, v, 300)].astype(np.int64)
    junk = rows.copy()  # symbols after the first END are ignored
    for r in junk:
        n = int((r != 0).sum())
        if n < K:
            r[n + 1 :] = rng.integers(1, 99, K - n - 1)
    garbage = rng.integers(0, 105, (300, K))
    short = rows.copy()  # prefixes of tokens: some are tokens themselves
    short[np.arange(300), rng.integers(1, K, 300)] = 0
    odd = rows[:20].copy()
    odd[:10, 0] = 200  # out of range
    odd[10:, 1] = -1
    queries = np.concatenate([rows, junk, garbage, short, odd, np.zeros((5, K), np.int64)])
    queries = torch.from_numpy(queries).reshape(-1, 5, K)  # [..., k] batch
    exact = {}
    for t in range(v):
        if table.decodable[t]:
            exact[tuple(int(c) for c in table.token_chars[t])] = t
    decodable = [t for t in range(v) if table.decodable[t]]
    spelled = {t: [int(c) for c in table.token_chars[t] if c] for t in decodable}

    def ref_prefix(q: tuple | None) -> int:
        if q is None or not any(q):
            return -1
        s = [c for c in q if c]
        hits = [t for t in decodable if spelled[t][: len(s)] == s]
        return min(hits, key=lambda t: (table.lengths[t], table.normalized[t], t), default=-1)

    flat = [ref_cut(q) for q in queries.reshape(-1, K).tolist()]
    want_exact = [-1 if q is None else exact.get(q, -1) for q in flat]
    want_prefix = [ref_prefix(q) for q in flat]
    got_exact = lookup.lookup(queries)
    got_prefix = lookup.prefix_lookup(queries)
    assert got_exact.shape == queries.shape[:-1] and got_exact.dtype == torch.long
    assert got_exact.reshape(-1).tolist() == want_exact
    assert got_prefix.reshape(-1).tolist() == want_prefix
    assert sum(w >= 0 for w in want_exact) > 300 and sum(w >= 0 for w in want_prefix) > 600


# ---------------------------------------------------------------------------------------------- rules


def _row(text: str) -> list[int]:
    ids = DEFAULT_CHARSET.encode(text)
    return (ids + [0] * K)[:K]


def test_collision_rule_on_hand_built_surfaces():
    surfaces = ["é", "e", "abcdefghijKL", "abcdefghij", "abcdefghijMN", "x", "x"]
    surfaces += ["<sep>", "<mask>", "</s>", "<|endoftext|>", "<|endoftext_2|>", "<|endoftext|>", "中"]
    roles = {
        7: OTHER_SPECIAL,
        8: OTHER_SPECIAL,
        9: EOS,
        10: EOS,
        11: EOS,
        12: OTHER_SPECIAL,
        13: OTHER_SPECIAL,
    }
    table = CharTable.from_surfaces(surfaces, k=K, special_roles=roles, role_holders={9})
    lookup = TokenLookup(table)
    # "e" beats the normalized "é" despite the higher id; the exact 10-char token beats truncated ones;
    # equal strings go to the lowest id. The role holder 9 is <eos> alone; the other specials are their
    # symbol then their content: 10 and 11 agree in role and first 9 characters (10 wins, lower id), 12
    # has 10's content under another role, 13's content is outside the table.
    rows = {
        7: ["<other-special>", *"<sep>"],
        8: ["<other-special>", *"<mask>"],
        9: ["<eos>"],
        10: ["<eos>", *"<|endofte"],
        11: ["<eos>", *"<|endofte"],
        12: ["<other-special>", *"<|endofte"],
    }
    for t, symbols in rows.items():
        assert table.token_chars[t].tolist() == ref_row(symbols), t
    assert table.lengths[7:].tolist() == [6, 7, 1, 14, 16, 14, 2]
    assert table.truncated[7:].tolist() == [False, False, False, True, True, True, False]
    assert table.unknown[7:].tolist() == [False] * 6 + [True]
    decodable = [False, True, False, True, False, True, False, True, True, True, True, False, True, False]
    assert table.decodable.tolist() == decodable
    q = torch.tensor(
        [_row("e"), _row("abcdefghij"), _row("x")] + [ref_row(rows[t]) for t in (7, 8, 9, 11, 12)]
    )
    assert lookup.lookup(q).tolist() == [1, 3, 5, 7, 8, 9, 10, 12]
    only_truncated = CharTable.from_surfaces(["abcdefghijKL", "abcdefghijMN"], k=K)
    assert only_truncated.decodable.tolist() == [True, False]
    assert only_truncated.truncated.tolist() == [True, True]


def test_prefix_lookup_on_hand_built_surfaces():
    surfaces = [" then", " the", " th", "x", " thé", "abcdefghijKL"]
    table = CharTable.from_surfaces(surfaces, k=K)
    lookup = TokenLookup(table)
    assert table.decodable.tolist() == [True, True, True, True, False, True]
    cases = {" t": 2, " th": 2, " the": 1, " then": 0, " thenx": -1, "y": -1, "abc": 5, "": -1}
    q = torch.tensor([_row(s) for s in cases])
    assert lookup.prefix_lookup(q).tolist() == list(cases.values())
    junk_after_end = torch.tensor([REF_IDS[" "], REF_IDS["t"], REF_IDS["h"], 0, 50, 60, 0, 0, 0, 0])
    assert int(lookup.prefix_lookup(junk_after_end)) == 2
    assert int(lookup.lookup(junk_after_end)) == 2
    assert lookup.lookup(q).tolist() == [-1, 2, 1, 0, -1, -1, -1, -1]


# ---------------------------------------------------------------------------------------------- coverage


def hand_tokenizer(out: Path) -> Path:
    """Byte-level vocabulary of 11 hand-picked tokens (see the hand counts in the coverage test)."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers

    vocab = {
        "<|endoftext|>": 0,  # special, eos
        "a": 1,  # "a", 1
        "Ġthe": 2,  # " the", 4
        "Ġinternational": 3,  # " international", 14 -> truncated at k=10
        "Ã©": 4,  # "é" -> "e", normalized, collides with 5
        "e": 5,
        "âĢ": 6,  # bytes E2 80: partial UTF-8 -> unknown
        "ä¸Ń": 7,  # "中" -> unknown
        "Ġinternationally": 8,  # 16, truncated, same row as 3
        "ĊĠĠ": 9,  # "\n  ", 3
        "<|pad|>": 10,  # special, pad
    }
    tok = Tokenizer(models.BPE(vocab=vocab, merges=[]))
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    fast = PreTrainedTokenizerFast(tokenizer_object=tok, eos_token="<|endoftext|>", pad_token="<|pad|>")
    fast.save_pretrained(str(out))
    return out


def test_coverage_on_hand_built_vocabulary(tmp_path):
    tok_dir = hand_tokenizer(tmp_path / "tok")
    report = coverage_report(CharTable.build(str(tok_dir), k=10))
    hand = {
        "vocab_size": 11,
        "k": 10,
        "exact": 7,  # 0 1 2 4 5 9 10
        "truncated": 2,  # 3 8
        "unknown": 2,  # 6 7
        "normalized": 1,  # 4
        "collisions": 2,  # 4 (behind 5), 8 (behind 3)
        "collision_groups": 2,
        "decodable": 7,  # 0 1 2 3 5 9 10
        "length_histogram": {"1": 7, "3": 1, "4": 1, "14": 1, "16": 1},
        "k_for_99": 16,  # 9 spellable tokens: 99% needs all 9, the longest has 16 chars
        "k_for_999": 16,
    }
    assert {key: report[key] for key in hand} == hand
    assert report["shares"]["exact"] == round(7 / 11, 6)
    at14 = coverage_report(CharTable.build(str(tok_dir), k=14))
    # At k=14 token 3 is exact; 8's first 14 chars are still " international", so it stays shadowed.
    assert (at14["exact"], at14["truncated"], at14["collisions"], at14["decodable"]) == (8, 1, 2, 7)


def test_smallest_k_for_coverage_quantiles():
    surfaces = ["abc"] * 985 + ["abcde"] * 10 + ["abcdefg"] * 4 + ["abcdefghijkl"] + ["中"] * 7
    report = coverage_report(CharTable.from_surfaces(surfaces, k=K))
    # Over the 1,000 spellable tokens: 995 have <= 5 chars (99.5% >= 99%), 999 have <= 7 (99.9%).
    assert (report["k_for_99"], report["k_for_999"]) == (5, 7)
    assert (report["unknown"], report["truncated"]) == (7, 1)


def test_table_padded_to_model_vocab(tokenizers):
    tok = tokenizers["byte_level"]
    table = CharTable.build(tok, k=K, vocab_size=len(tok) + 64)
    assert table.vocab_size == len(tok) + 64
    assert table.unknown[len(tok) :].all() and not table.decodable[len(tok) :].any()
    with pytest.raises(SpellmError, match="smaller"):
        CharTable.build(tok, k=K, vocab_size=10)


# ---------------------------------------------------------------------------------------------- files


def test_save_load_round_trip_and_hash_checks(tokenizers, tmp_path):
    table = CharTable.build(tokenizers["metaspace"], k=8)
    path = table.save(tmp_path / "charset.json")
    loaded = CharTable.load(path, expected_hash=table.hash)
    assert loaded.hash == table.hash and loaded.k == 8 and loaded.charset == table.charset
    for name in ("token_chars", "lengths", "truncated", "unknown", "normalized", "decodable"):
        assert np.array_equal(getattr(loaded, name), getattr(table, name)), name
    assert loaded.tokenizer_hash == table.tokenizer_hash and loaded.conventions == table.conventions
    q = torch.from_numpy(table.token_chars).long()
    assert torch.equal(TokenLookup(loaded).lookup(q), TokenLookup(table).lookup(q))

    with pytest.raises(SpellmError, match=r"charset\.json.*does not match the expected"):
        CharTable.load(path, expected_hash="0" * 64)
    other = CharTable.build(tokenizers["metaspace"], k=9)
    assert other.hash != table.hash

    doc = json.loads(path.read_text())
    chars = bytearray(base64.b64decode(doc["arrays"]["token_chars"]["base64"]))
    chars[0] = (chars[0] % 98) + 1  # another valid symbol id
    doc["arrays"]["token_chars"]["base64"] = base64.b64encode(bytes(chars)).decode()
    bad = tmp_path / "edited.json"
    bad.write_text(json.dumps(doc))
    with pytest.raises(SpellmError, match=r"edited\.json.*content hash"):
        CharTable.load(bad)
    with pytest.raises(SpellmError, match="does not exist"):
        CharTable.load(tmp_path / "missing.json")
    (tmp_path / "junk.json").write_text("{not json")
    with pytest.raises(SpellmError, match=r"junk\.json"):
        CharTable.load(tmp_path / "junk.json")


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")
def test_lookup_on_cuda_equals_cpu_without_host_sync():
    rng = np.random.default_rng(1)
    letters = list(DEFAULT_CHARS[:95])
    surfaces = ["".join(rng.choice(letters, size=int(rng.integers(1, 14)))) for _ in range(20000)]
    surfaces += surfaces[:500]  # duplicates: collisions
    table = CharTable.from_surfaces(surfaces, k=K)
    rows = torch.from_numpy(table.token_chars).long()
    short = rows.clone()
    short[:, 3:] = 0
    q = torch.cat([rows, short, torch.randint(0, 105, (4096, K))]).reshape(-1, 8, K)
    cpu, gpu = TokenLookup(table), TokenLookup(table, "cuda")
    want_exact, want_prefix = cpu.lookup(q), cpu.prefix_lookup(q)
    assert (want_exact >= 0).sum() > 19000 and (want_prefix >= 0).sum() > 39000
    assert torch.equal(gpu.lookup(q.cuda()).cpu(), want_exact)
    assert torch.equal(gpu.prefix_lookup(q.cuda()).cpu(), want_prefix)
    # Capturing a CUDA graph fails on any host synchronisation inside the lookups.
    static = q.cuda()
    side = torch.cuda.Stream()
    side.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(side):
        gpu.lookup(static), gpu.prefix_lookup(static)
    torch.cuda.current_stream().wait_stream(side)
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        out_exact, out_prefix = gpu.lookup(static), gpu.prefix_lookup(static)
    static.copy_(q.flip(0).cuda())
    graph.replay()
    torch.cuda.synchronize()
    assert torch.equal(out_exact.cpu(), want_exact.flip(0))
    assert torch.equal(out_prefix.cpu(), want_prefix.flip(0))


# ---------------------------------------------------------------------------------------------- CLI


def test_cli_json_report(tmp_path, capsys):
    tok_dir = hand_tokenizer(tmp_path / "tok")
    out = tmp_path / "charset.json"
    assert cli.main(["charset", "--tokenizer", str(tok_dir), "-k", "10", "--json", "--save", str(out)]) == 0
    report = json.loads(capsys.readouterr().out)
    for key in ("vocab_size", "k", "exact", "truncated", "unknown", "collisions", "k_for_99", "k_for_999"):
        assert key in report
    assert (report["vocab_size"], report["exact"], report["collisions"]) == (11, 7, 2)
    assert CharTable.load(out, expected_hash=report["charset_hash"]).vocab_size == 11


def test_cli_bad_input_exits_2_with_one_message(tmp_path, capsys, bytelevel_tokenizer):
    slow = tmp_path / "slow"
    slow.mkdir()
    (slow / "tokenizer_config.json").write_text(json.dumps({"tokenizer_class": "ByT5Tokenizer"}))
    cjk = "".join(chr(0x4E00 + i) for i in range(200))
    cases = {
        "does not exist": ["--tokenizer", str(tmp_path / "missing")],
        "slow": ["--tokenizer", str(slow)],
        "k (characters per token)": ["--tokenizer", str(bytelevel_tokenizer), "-k", "0"],
        "at most 255": ["--tokenizer", str(bytelevel_tokenizer), "--extra-chars", cjk],
    }
    for needle, args in cases.items():
        assert cli.main(["charset", *args]) == 2, needle
        err = capsys.readouterr().err
        assert needle in err and "Traceback" not in err and len(err.strip().splitlines()) == 1, err
    proc = subprocess.run(
        [sys.executable, "-m", "spellm_ds.cli", "charset", "--tokenizer", str(tmp_path / "missing")],
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert proc.returncode == 2 and "does not exist" in proc.stderr and "Traceback" not in proc.stderr
