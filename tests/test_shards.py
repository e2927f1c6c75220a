"""Shard format and validation: encode/decode round trips, the strict tar reader, `shards validate`/`stats`.

No teacher is needed: datasets here are written from synthetic arrays through the public format API,
and corrupted on purpose. Run alone: `.venv/bin/python -m pytest tests/test_shards.py -q`.
"""

from __future__ import annotations

import io
import json
import struct
import tarfile
from pathlib import Path

import numpy as np
import pytest
import zstandard

from spellm_ds import jsonio
from spellm_ds.cli import main
from spellm_ds.data import shards
from spellm_ds.data.validate import dataset_stats, validate_dataset
from spellm_ds.errors import ShardError, SpellmError

SEQ_LEN, TOP_K, VOCAB, PER_SHARD = 16, 5, 300, 3


def _sample(rng: np.random.Generator, vocab: int = VOCAB, seq_len: int = SEQ_LEN):
    ids = rng.integers(0, vocab, seq_len)
    top = np.stack([rng.choice(vocab, TOP_K, replace=False) for _ in range(seq_len)])
    logits = rng.normal(size=(seq_len, TOP_K + 3)) * 3
    lse = np.log(np.exp(logits).sum(axis=1, keepdims=True))
    lp = np.sort(logits[:, :TOP_K] - lse, axis=1)[:, ::-1].astype(np.float16)
    return ids, top, lp


def _write_dataset(root: Path, n_samples: int = 8, seed: int = 0) -> Path:
    """A small valid dataset (3 shards, the last one short and with a padded final sequence)."""
    rng = np.random.default_rng(seed)
    root.mkdir(parents=True, exist_ok=True)
    entries = []
    for shard in range(-(-n_samples // PER_SHARD)):
        members, tokens = [], 0
        for g in range(shard * PER_SHARD, min(n_samples, (shard + 1) * PER_SHARD)):
            ids, top, lp = _sample(rng)
            mask = np.ones(SEQ_LEN, dtype=bool)
            if g == n_samples - 1:
                mask[SEQ_LEN - 5 :] = False
            tokens += int(mask.sum())
            members.append((shards.sample_key(g), shards.encode_sample(ids, top, lp, VOCAB, loss_mask=mask)))
        nbytes, sha = shards.write_shard(root / shards.shard_name(shard), members)
        entry = shards.ShardEntry(
            name=shards.shard_name(shard),
            index=shard,
            samples=len(members),
            tokens=tokens,
            bytes=nbytes,
            sha256=sha,
            first_sample=shard * PER_SHARD,
        )
        jsonio.write_json(root / shards.manifest_name(shard), entry.to_dict())
        entries.append(entry)
    _write_index(root, entries)
    return root


def _write_index(root: Path, entries: list[shards.ShardEntry]) -> None:
    index = shards.make_index(
        teacher={"path": "/x", "name": "x", "config_hash": "c", "weights_hash": "w"},
        tokenizer_hash="t",
        vocab_size=VOCAB,
        eos_id=0,
        seq_len=SEQ_LEN,
        top_k=TOP_K,
        samples_per_shard=PER_SHARD,
        build_args={},
        entries=entries,
    )
    jsonio.write_json(root / shards.INDEX_NAME, index)


def _entries(root: Path) -> list[shards.ShardEntry]:
    return [shards.ShardEntry.from_dict(e) for e in json.loads((root / "index.json").read_text())["shards"]]


def _rewrite_shard(
    root: Path, shard: int, members: list[tuple[str, bytes]], manifest_too: bool = True
) -> None:
    """Replace a shard's members and (optionally) update its index entry so only content checks can fail."""
    nbytes, sha = shards.write_shard(root / shards.shard_name(shard), members)
    if manifest_too:
        entries = _entries(root)
        entries[shard] = shards.ShardEntry(**{**entries[shard].to_dict(), "bytes": nbytes, "sha256": sha})
        (root / shards.manifest_name(shard)).unlink()
        _write_index(root, entries)


def _members(path: Path) -> list[tuple[str, bytes]]:
    with open(path, "rb") as fh:
        return list(shards.iter_tar_members(fh, str(path)))


# ------------------------------------------------------------------------------------------ codec


@pytest.mark.parametrize("vocab", [300, 65536, 70000, 128256])
def test_encode_decode_round_trip(vocab):
    rng = np.random.default_rng(vocab)
    ids, top, lp = _sample(rng, vocab=vocab, seq_len=37)
    ids[0], top[0, 0] = vocab - 1, 0
    mask = rng.random(37) > 0.3
    for m in (None, mask):
        out = shards.decode_sample(shards.encode_sample(ids, top, lp, vocab, loss_mask=m))
        assert out["input_ids"].dtype == np.int32 and out["topk_ids"].dtype == np.int32
        assert out["topk_logprobs"].dtype == np.float16 and out["loss_mask"].dtype == bool
        np.testing.assert_array_equal(out["input_ids"], ids)
        np.testing.assert_array_equal(out["topk_ids"], top)
        np.testing.assert_array_equal(out["topk_logprobs"].view(np.uint16), lp.view(np.uint16))
        np.testing.assert_array_equal(out["loss_mask"], np.ones(37, bool) if m is None else mask)
        assert out["vocab_size"] == vocab


def test_encode_rejects_bad_input():
    rng = np.random.default_rng(0)
    ids, top, lp = _sample(rng)
    with pytest.raises(SpellmError, match="topk_ids outside"):
        shards.encode_sample(ids, top + VOCAB, lp, VOCAB)
    with pytest.raises(SpellmError, match="shape"):
        shards.encode_sample(ids, top[:, :3], lp, VOCAB)


def test_decode_names_where_and_rejects_bad_payloads():
    rng = np.random.default_rng(1)
    ids, top, lp = _sample(rng)
    raw = bytearray(zstandard.ZstdDecompressor().decompress(shards.encode_sample(ids, top, lp, VOCAB)))
    bad_version = bytearray(raw)
    struct.pack_into("<H", bad_version, 4, shards.FORMAT_VERSION + 1)
    with pytest.raises(ShardError, match=r"s\.tar/000000000007: format version"):
        shards.decode_sample(zstandard.ZstdCompressor().compress(bytes(bad_version)), "s.tar/000000000007")
    with pytest.raises(ShardError, match="header implies"):
        shards.decode_sample(zstandard.ZstdCompressor().compress(bytes(raw[:-3])), "here")
    with pytest.raises(ShardError, match="not a valid zstd frame"):
        shards.decode_sample(b"not zstd at all", "here")
    nan = lp.copy()
    nan[3, 1] = np.nan
    with pytest.raises(ShardError, match="NaN"):
        shards.decode_sample(shards.encode_sample(ids, top, nan, VOCAB), "here")


def test_write_read_round_trip_is_deterministic(tmp_path):
    rng = np.random.default_rng(2)
    originals = [_sample(rng) for _ in range(5)]
    members = [(shards.sample_key(10 + i), shards.encode_sample(*s, VOCAB)) for i, s in enumerate(originals)]
    a, b = tmp_path / "a.tar", tmp_path / "b.tar"
    size, sha = shards.write_shard(a, members)
    assert shards.write_shard(b, members) == (size, sha)
    assert a.read_bytes() == b.read_bytes() and a.stat().st_size == size
    assert [p.name for p in tmp_path.iterdir() if p.name.startswith(".")] == []  # temp file renamed away
    read = list(shards.iter_shard(a))
    assert [s["__key__"] for s in read] == [shards.sample_key(10 + i) for i in range(5)]
    for (ids, top, lp), s in zip(originals, read):
        np.testing.assert_array_equal(s["input_ids"], ids)
        np.testing.assert_array_equal(s["topk_ids"], top)
        np.testing.assert_array_equal(s["topk_logprobs"], lp)
    # Python's own tar reader agrees with the layout (plain USTAR, <key>.spl members).
    with tarfile.open(a) as tf:
        assert tf.getnames() == [f"{shards.sample_key(10 + i)}.spl" for i in range(5)]


# ------------------------------------------------------------------------------------- tar reader


def _tar_with(name: str, payload: bytes, kind: bytes = tarfile.REGTYPE) -> bytes:
    buf = io.BytesIO()
    with tarfile.open(fileobj=buf, mode="w", format=tarfile.USTAR_FORMAT) as tf:
        info = tarfile.TarInfo(name)
        info.type = kind
        if kind == tarfile.SYMTYPE:
            info.linkname = "/etc/passwd"
            tf.addfile(info)
        else:
            info.size = len(payload)
            tf.addfile(info, io.BytesIO(payload))
    return buf.getvalue()


@pytest.mark.parametrize(
    ("name", "kind", "match"),
    [
        ("000000000000.pyd", tarfile.REGTYPE, "unexpected tar member '000000000000.pyd'"),
        ("x.pyd", tarfile.REGTYPE, "unexpected tar member 'x.pyd'"),
        ("../x.spl", tarfile.REGTYPE, r"unexpected tar member '\.\./x\.spl'"),
        ("../000000000000.spl", tarfile.REGTYPE, "unexpected tar member"),
        ("/tmp/000000000000.spl", tarfile.REGTYPE, "unexpected tar member"),
        ("000000000000.spl", tarfile.SYMTYPE, "not a regular file"),
    ],
)
def test_reader_rejects_foreign_members(tmp_path, name, kind, match):
    import pickle

    payload = pickle.dumps({"input_ids": [1, 2, 3]})
    path = tmp_path / "evil.tar"
    path.write_bytes(_tar_with(name, payload, kind))
    with pytest.raises(ShardError, match=match) as err:
        list(shards.iter_shard(path))
    assert str(path) in str(err.value)
    assert not (tmp_path.parent / "x.spl").exists()


def test_reader_detects_truncation_and_header_corruption(tmp_path):
    rng = np.random.default_rng(3)
    members = [(shards.sample_key(i), shards.encode_sample(*_sample(rng), VOCAB)) for i in range(3)]
    path = tmp_path / "s.tar"
    shards.write_shard(path, members)
    data = path.read_bytes()
    ends = np.cumsum([512 + len(p) + (-len(p) % 512) for _, p in members])
    for cut in (100, 700, int(ends[0]), int(ends[-1])):
        (tmp_path / "cut.tar").write_bytes(data[:cut])
        with pytest.raises(ShardError, match="truncated"):
            list(shards.iter_shard(tmp_path / "cut.tar"))
    corrupt = bytearray(data)
    corrupt[20] ^= 0x01  # inside the first member's name: the header checksum no longer matches
    (tmp_path / "bad.tar").write_bytes(bytes(corrupt))
    with pytest.raises(ShardError, match="checksum"):
        list(shards.iter_shard(tmp_path / "bad.tar"))


# ------------------------------------------------------------------------------------- validation


def test_validate_accepts_a_good_dataset_and_stats_count_it(tmp_path, capsys):
    root = _write_dataset(tmp_path / "ds")
    report = validate_dataset(root)
    assert report.ok, report.problems
    assert (report.shards, report.samples, report.tokens) == (3, 8, 8 * SEQ_LEN - 5)
    assert main(["shards", "validate", str(root)]) == 0
    stats = dataset_stats(root)
    assert stats["samples"] == 8 and stats["tokens"] == 8 * SEQ_LEN - 5
    size = sum(p.stat().st_size for p in root.glob("shard-*.tar"))
    assert stats["bytes_per_token"] == pytest.approx(size / (8 * SEQ_LEN - 5), abs=1e-3)
    # Top-1 probability, computed independently from the stored arrays.
    p1 = [
        np.exp(s["topk_logprobs"][s["loss_mask"], 0].astype(np.float64))
        for p in sorted(root.glob("*.tar"))
        for s in shards.iter_shard(p)
    ]
    p1 = np.concatenate(p1)
    assert stats["top1_prob"]["mean"] == pytest.approx(p1.mean(), abs=1e-3)
    assert stats["top1_prob"]["quantiles"]["p50"] == pytest.approx(np.median(p1), abs=2e-3)
    assert sum(stats["top1_prob"]["histogram"]["counts"]) == len(p1)
    capsys.readouterr()
    assert main(["shards", "stats", str(root), "--json"]) == 0
    assert json.loads(capsys.readouterr().out)["samples"] == 8


def test_validate_catches_a_truncated_tar(tmp_path):
    root = _write_dataset(tmp_path / "ds")
    path = root / shards.shard_name(1)
    path.write_bytes(path.read_bytes()[:1500])
    report = validate_dataset(root)
    assert report.bad_shards == {shards.shard_name(1)}
    text = "\n".join(report.problems)
    assert "sha256 mismatch" in text and "truncated" in text and str(path) in text


def test_validate_catches_a_flipped_byte(tmp_path):
    root = _write_dataset(tmp_path / "ds")
    path = root / shards.shard_name(0)
    data = bytearray(path.read_bytes())
    data[512 + 40] ^= 0xFF  # inside the first member's zstd payload
    path.write_bytes(bytes(data))
    report = validate_dataset(root)
    assert not report.ok and report.bad_shards == {shards.shard_name(0)}
    assert any("sha256 mismatch" in p for p in report.problems)
    assert main(["shards", "validate", str(root)]) == 1


def test_validate_names_a_wrong_version_sample(tmp_path):
    root = _write_dataset(tmp_path / "ds")
    members = _members(root / shards.shard_name(1))
    raw = bytearray(zstandard.ZstdDecompressor().decompress(members[1][1]))
    struct.pack_into("<H", raw, 4, 99)
    members[1] = (members[1][0], zstandard.ZstdCompressor().compress(bytes(raw)))
    _rewrite_shard(root, 1, members)
    report = validate_dataset(root)
    assert len(report.problems) >= 1 and report.bad_shards == {shards.shard_name(1)}
    assert any(
        f"{shards.shard_name(1)}/{shards.sample_key(4)}: format version 99" in p for p in report.problems
    )
    assert not any("sha256" in p for p in report.problems)


def test_validate_names_nan_logprobs(tmp_path):
    root = _write_dataset(tmp_path / "ds")
    members = _members(root / shards.shard_name(2))
    s = shards.decode_sample(members[0][1], check_values=False)
    lp = s["topk_logprobs"].copy()
    lp[2, 0] = np.nan
    members[0] = (members[0][0], shards.encode_sample(s["input_ids"], s["topk_ids"], lp, VOCAB))
    _rewrite_shard(root, 2, members)
    report = validate_dataset(root)
    key = shards.sample_key(6)
    assert any(f"{shards.shard_name(2)}/{key}: topk_logprobs holds NaN" in p for p in report.problems)


def test_validate_catches_unsorted_and_positive_logprobs(tmp_path):
    root = _write_dataset(tmp_path / "ds")
    members = _members(root / shards.shard_name(0))
    s = shards.decode_sample(members[2][1])
    lp = s["topk_logprobs"].copy()
    lp[5] = lp[5][::-1]
    lp[6, 0] = 0.5
    members[2] = (members[2][0], shards.encode_sample(s["input_ids"], s["topk_ids"], lp, VOCAB))
    _rewrite_shard(root, 0, members)
    text = "\n".join(validate_dataset(root).problems)
    assert f"{shards.sample_key(2)}: topk_logprobs not sorted descending at position 5" in text
    assert f"{shards.sample_key(2)}: topk_logprobs > 0" in text


def test_validate_catches_manifest_count_mismatch(tmp_path):
    root = _write_dataset(tmp_path / "ds")
    members = _members(root / shards.shard_name(0))
    _rewrite_shard(root, 0, members[:2])  # one sample fewer than the manifest says
    report = validate_dataset(root)
    assert any(f"{shards.shard_name(0)}: holds 2 samples, manifest says 3" in p for p in report.problems)
    index = json.loads((root / "index.json").read_text())
    index["totals"]["samples"] += 1
    (root / "index.json").write_text(json.dumps(index))
    assert any("totals.samples" in p for p in validate_dataset(root).problems)


def test_validate_reports_every_bad_shard(tmp_path):
    root = _write_dataset(tmp_path / "ds")
    for shard in (0, 2):
        path = root / shards.shard_name(shard)
        path.write_bytes(path.read_bytes()[:1000])
    report = validate_dataset(root)
    assert report.bad_shards == {shards.shard_name(0), shards.shard_name(2)}
    assert "FAILED" in report.summary() and shards.shard_name(2) in report.summary()
