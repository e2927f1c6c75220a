"""Streaming reader (spellm_ds/data/: loader, stream, state): exactly once, resume, corrupt data, URLs,
tokenizer checks.

Datasets are tiny synthetic shard sets written with spellm_ds.data.shards (6 shards x 5 samples, L=8;
unequal shards of 16/16/16/5 samples for the sample-level balance).
Expected sets and step counts are hand counts or plain set arithmetic, never the loader's own plan.
Multi-process tests run the real launcher (torchrun, 2 ranks x 2 DataLoader workers, gloo) on
tests/data_worker.py. Run alone: `.venv/bin/python -m pytest tests/test_data.py -q`
(`-m "not dist"` skips the launcher tests).
"""

from __future__ import annotations

import io
import itertools
import json
import os
import subprocess
import sys
import tarfile
from pathlib import Path

import numpy as np
import pytest
import torch

from spellm_ds.data.epoch_plan import pack_bitmap, unpack_bitmap
from spellm_ds.data.loader import LoaderConfig, ShardLoader, check_tokenizer
from spellm_ds.data.shards import (
    ShardEntry,
    encode_sample,
    make_index,
    read_index,
    sample_key,
    shard_name,
    write_shard,
)
from spellm_ds.data.state import merge_states
from spellm_ds.errors import ShardError, SpellmError
from spellm_ds.jsonio import write_json
from tests.conftest import REPO_ROOT, free_port

SHARDS, PER, L, V, K = 6, 5, 8, 300, 5
TOTAL = SHARDS * PER
TOK = "tok-hash-a"


def build_dataset(
    out: Path, payloads: dict[int, bytes] | None = None, sizes: list[int] | None = None
) -> dict[int, dict[str, np.ndarray]]:
    """Write shards of `sizes` (default SHARDS x PER) random samples and return the arrays.

    `payloads` overrides payloads by global index.
    """
    out.mkdir(parents=True, exist_ok=True)
    rng = np.random.default_rng(1234)
    arrays: dict[int, dict[str, np.ndarray]] = {}
    entries = []
    sizes = sizes or [PER] * SHARDS
    starts = [sum(sizes[:i]) for i in range(len(sizes))]
    for i, (first, size) in enumerate(zip(starts, sizes, strict=True)):
        members = []
        for g in range(first, first + size):
            a = {
                "input_ids": rng.integers(0, V, L).astype(np.int32),
                "topk_ids": rng.integers(0, V, (L, K)).astype(np.int32),
                "topk_logprobs": -np.sort(rng.random((L, K)), axis=1).astype(np.float16) - 0.01,
                "loss_mask": rng.random(L) > 0.3,
            }
            arrays[g] = a
            payload = encode_sample(a["input_ids"], a["topk_ids"], a["topk_logprobs"], V, a["loss_mask"])
            members.append((sample_key(g), (payloads or {}).get(g, payload)))
        nbytes, sha = write_shard(out / shard_name(i), members)
        entries.append(
            ShardEntry(
                name=shard_name(i),
                index=i,
                samples=size,
                tokens=size * L,
                bytes=nbytes,
                sha256=sha,
                first_sample=first,
            )
        )
    index = make_index(
        teacher={"name": "synthetic"},
        tokenizer_hash=TOK,
        vocab_size=V,
        eos_id=0,
        seq_len=L,
        top_k=K,
        samples_per_shard=max(sizes),
        build_args={},
        entries=entries,
    )
    write_json(out / "index.json", index)
    return arrays


@pytest.fixture
def dataset(tmp_path) -> tuple[Path, dict[int, dict[str, np.ndarray]]]:
    """A clean dataset directory and the arrays written into it."""
    arrays = build_dataset(tmp_path / "ds")
    return tmp_path / "ds", arrays


def loader(location, rank=0, world=1, **kw) -> ShardLoader:
    """A loader with test defaults (batch 2, 2 workers)."""
    kw.setdefault("batch_size", 2)
    kw.setdefault("num_workers", 2)
    return ShardLoader(LoaderConfig(location=str(location), **kw), rank=rank, world_size=world)


def indices(batches) -> list[list[int]]:
    """Sample indices of each batch."""
    return [b["sample_index"].tolist() for b in batches]


def flat(batches: list[list[int]]) -> list[int]:
    """All indices of a list of batches, fillers (-1) removed."""
    return [i for b in batches for i in b if i != -1]


def take(ld: ShardLoader, n: int) -> list[tuple[int, list[int]]]:
    """Take n training batches as (epoch, indices)."""
    return [(ld.epoch, b["sample_index"].tolist()) for b in itertools.islice(ld.forever(), n)]


def run_worker(tmp: Path, phase: str, location: Path, nproc: int = 2, **opts) -> list[dict]:
    """Run tests/data_worker.py on `nproc` ranks through torchrun; return each rank's record."""
    out = tmp / f"out-{phase}"
    out.mkdir(exist_ok=True)
    cmd = [sys.executable, "-m", "torch.distributed.run", f"--nproc_per_node={nproc}"]
    cmd += [f"--master_port={free_port()}", str(REPO_ROOT / "tests" / "data_worker.py"), phase]
    cmd += ["--location", str(location), "--out", str(out)]
    for k, v in opts.items():
        cmd += [f"--{k.replace('_', '-')}", str(v)]
    env = dict(os.environ, OMP_NUM_THREADS="1", PYTHONPATH=str(REPO_ROOT))
    proc = subprocess.run(cmd, cwd=REPO_ROOT, env=env, capture_output=True, text=True, timeout=240)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    return [json.loads((out / f"rank{r}.json").read_text()) for r in range(nproc)]


# --- round trip, plan and epoch end ------------------------------------------------------------------


def test_batches_hold_the_written_arrays(dataset):
    location, arrays = dataset
    ld = loader(location, num_workers=0, partial=True, shuffle=False, batch_size=4)
    batches = list(ld.iter_epoch())
    assert flat(indices(batches)) == list(range(TOTAL))  # no shuffle, one slot: file order
    b = batches[0]
    assert b["input_ids"].dtype == torch.int64 and b["input_ids"].shape == (4, L)
    assert b["topk_ids"].dtype == torch.int64 and b["topk_ids"].shape == (4, L, K)
    assert b["topk_logprobs"].dtype == torch.float32 and b["topk_logprobs"].shape == (4, L, K)
    assert b["loss_mask"].dtype == torch.bool and b["loss_mask"].shape == (4, L)
    assert b["sample_index"].dtype == torch.int64
    for batch in batches:
        for row, g in enumerate(batch["sample_index"].tolist()):
            a = arrays[g]
            assert np.array_equal(batch["input_ids"][row].numpy(), a["input_ids"])
            assert np.array_equal(batch["topk_ids"][row].numpy(), a["topk_ids"])
            assert np.array_equal(batch["topk_logprobs"][row].numpy(), a["topk_logprobs"].astype(np.float32))
            assert np.array_equal(batch["loss_mask"][row].numpy(), a["loss_mask"])
    assert [len(b) for b in indices(batches)] == [4] * 7 + [2]


def test_exactly_once_simulated_ranks_and_training_tail(dataset):
    location, _ = dataset
    # Evaluation pass: every sample once over 2 ranks x 2 workers, ranks padded to equal step counts.
    per_rank = [indices(loader(location, r, 2, partial=True).iter_epoch()) for r in range(2)]
    seen = flat(per_rank[0]) + flat(per_rank[1])
    assert sorted(seen) == list(range(TOTAL))
    assert len(per_rank[0]) == len(per_rank[1])
    # Training epoch, hand count: each rank gets 3 shards (15 samples), its two workers 10 and 5,
    # so floor(10/2) + floor(5/2) = 7 full batches per rank; 1 sample per rank is dropped.
    train = [indices(loader(location, r, 2).iter_epoch()) for r in range(2)]
    assert [len(t) for t in train] == [7, 7]
    seen = flat(train[0]) + flat(train[1])
    assert len(seen) == len(set(seen)) == 28
    assert all(len(b) == 2 for t in train for b in t)


def test_epochs_reshuffle_and_cover_everything_again(dataset):
    location, _ = dataset
    ld = loader(location)
    # Two epochs of 15 steps, hand count: whole shards would give the workers 15 + 15 samples, only
    # 7 + 7 full batches, so the slots are cut at a batch multiple, 16 + 14 samples: 8 + 7 batches.
    steps = take(ld, 30)
    assert [e for e, _ in steps] == [0] * 15 + [1] * 15
    ep0 = [i for e, b in steps if e == 0 for i in b]
    ep1 = [i for e, b in steps if e == 1 for i in b]
    assert sorted(ep0) == sorted(ep1) == list(range(TOTAL))  # nothing dropped
    assert ep0 != ep1
    again = take(loader(location), 30)
    assert again == steps  # deterministic for a seed
    assert take(loader(location, seed=7), 15) != steps[:15]


UNEQUAL = [16, 16, 16, 5]  # 53 samples


@pytest.mark.parametrize("workers", [1, 2])
def test_unequal_shards_are_shared_at_sample_level(tmp_path, workers):
    location = tmp_path / "ds"
    build_dataset(location, sizes=UNEQUAL)
    total = sum(UNEQUAL)
    # Whole shards would give the ranks 32 and 21 samples, 10 common steps, 40 samples an epoch.
    # Split at sample level, hand count: ranks of 27 and 26 samples, each 13 full batches of 2
    # (the worker slots are cut at batch multiples), so 52 of 53 samples are consumed.
    train = [indices(loader(location, r, 2, num_workers=workers).iter_epoch()) for r in range(2)]
    assert [len(t) for t in train] == [13, 13]
    seen = flat(train[0]) + flat(train[1])
    assert len(seen) == len(set(seen)) == 52
    assert total - len(seen) < 2 * workers * 2
    assert all(len(b) == 2 for t in train for b in t)
    # Evaluation pass: everything once, ranks' sample counts differ by at most one.
    evals = [
        flat(indices(loader(location, r, 2, num_workers=workers, partial=True).iter_epoch()))
        for r in range(2)
    ]
    assert sorted(evals[0] + evals[1]) == list(range(total))
    assert sorted(len(e) for e in evals) == [26, 27]


@pytest.mark.parametrize("stop", [4, 11])
def test_unequal_shards_resume_same_world_size_in_the_same_order(tmp_path, stop):
    location = tmp_path / "ds"
    build_dataset(location, sizes=UNEQUAL)
    steps = 16  # 13 steps per epoch (see above): the resumed ranks cross into epoch 1
    uninterrupted = [take(loader(location, r, 2), steps) for r in range(2)]
    first = [loader(location, r, 2) for r in range(2)]
    before = [take(f, stop) for f in first]
    state = json.loads(json.dumps(merge_states([f.state_dict() for f in first])))
    resumed = [loader(location, r, 2) for r in range(2)]
    for r in resumed:
        r.load_state_dict(state)
    after = [take(r, steps - stop) for r in resumed]
    for r in range(2):
        assert before[r] + after[r] == uninterrupted[r], f"rank {r}"


def test_unequal_shards_resume_at_other_world_sizes(tmp_path):
    location = tmp_path / "ds"
    build_dataset(location, sizes=UNEQUAL)
    total = sum(UNEQUAL)
    two = [loader(location, r, 2) for r in range(2)]
    before = [i for t in two for _, b in take(t, 5) for i in b]
    state = merge_states([t.state_dict() for t in two])
    # 2 -> 3 ranks, training: the rest of epoch 0 is consumed once, less than 3 x 2 x 2 dropped.
    three = [loader(location, r, 3) for r in range(3)]
    for t in three:
        t.load_state_dict(state)
    # Hand count: 53 - 20 = 33 samples remain, 11 per rank, 5 full batches of 2 each.
    assert [t.remaining_steps() for t in three] == [5, 5, 5]
    rest = [flat(indices(t.iter_epoch())) for t in three]
    assert [len(r) for r in rest] == [10, 10, 10]
    seen = before + rest[0] + rest[1] + rest[2]
    assert len(seen) == len(set(seen)) and total - len(seen) < 3 * 2 * 2
    # 2 -> 1 rank, evaluation: no repeat, no gap.
    one = loader(location, partial=True)
    one.load_state_dict(state)
    assert sorted(before + flat(indices(one.iter_epoch()))) == list(range(total))


def test_split_shard_corruption_is_counted_once(tmp_path):
    location = tmp_path / "ds"
    build_dataset(location, sizes=UNEQUAL)
    for i in range(len(UNEQUAL)):  # keep the first 2 members of every shard, cut inside the third
        shard = location / shard_name(i)
        shard.write_bytes(shard.read_bytes()[: 2 * 1024 + 512 + 50])
    ranks = [loader(location, r, 2, partial=True, skip_corrupt=True) for r in range(2)]
    seen = [i for r in ranks for i in flat(indices(r.iter_epoch()))]
    kept = {f + j for f in (0, 16, 32, 48) for j in (0, 1)}
    assert sorted(seen) == sorted(kept)  # each kept sample once, though a shard is read by both ranks
    assert sum(r.corrupt_skipped for r in ranks) == sum(UNEQUAL) - len(kept)
    state = merge_states([r.state_dict() for r in ranks])
    assert state["corrupt_skipped"] == sum(UNEQUAL) - len(kept)
    again = loader(location, partial=True, skip_corrupt=True)
    again.load_state_dict(state)
    assert list(again.iter_epoch()) == []


def test_old_state_version_is_replanned(dataset):
    location, _ = dataset
    two = [loader(location, r, 2) for r in range(2)]
    before = [i for t in two for _, b in take(t, 3) for i in b]
    state = merge_states([t.state_dict() for t in two])
    state["version"] = 1
    del state["plan"]["batch_size"]
    resumed = [loader(location, r, 2, partial=True) for r in range(2)]
    for r in resumed:
        r.load_state_dict(state)
    rest = [i for r in resumed for i in flat(indices(r.iter_epoch()))]
    assert sorted(before + rest) == list(range(TOTAL))
    state["version"] = 0
    with pytest.raises(SpellmError, match="version 0"):
        loader(location).load_state_dict(state)


@pytest.mark.dist
def test_exactly_once_two_ranks_two_workers_real_processes(dataset, tmp_path):
    location, _ = dataset
    ranks = run_worker(tmp_path, "epoch", location)
    seen = [i for r in ranks for b in r["partial"] for i in b["idx"] if i != -1]
    assert sorted(seen) == list(range(TOTAL))  # union is everything, no duplicate
    assert len(ranks[0]["partial"]) == len(ranks[1]["partial"])
    train = [[i for b in r["train"] for i in b["idx"]] for r in ranks]
    assert [len(r["train"]) for r in ranks] == [7, 7]  # hand count, see the simulated test
    assert len(set(train[0] + train[1])) == 28 and not set(train[0]) & set(train[1])


# --- resume ------------------------------------------------------------------------------------------


@pytest.mark.parametrize("stop", [3, 8, 14, 17])
def test_resume_same_world_size_continues_the_same_order(dataset, stop):
    location, _ = dataset
    uninterrupted = take(loader(location), 20)
    first = loader(location)
    before = take(first, stop)
    state = json.loads(json.dumps(first.state_dict()))  # through JSON, as a checkpoint would
    resumed = loader(location)
    resumed.load_state_dict(state)
    after = take(resumed, 20 - stop)
    assert before + after == uninterrupted


def test_resume_simulated_two_ranks_then_one_and_one_then_two(dataset):
    location, _ = dataset
    ranks = [loader(location, r, 2, partial=True) for r in range(2)]
    streams = [r.iter_epoch() for r in ranks]
    before = [indices(itertools.islice(s, 3)) for s in streams]
    state = merge_states([r.state_dict() for r in ranks])
    one = loader(location, partial=True)
    one.load_state_dict(state)
    after = flat(indices(one.iter_epoch()))
    consumed = flat(before[0]) + flat(before[1])
    assert sorted(consumed + after) == list(range(TOTAL))  # no repeat, no gap
    # 1 -> 2 ranks
    single = loader(location, partial=True, num_workers=1)
    head = flat(indices(itertools.islice(single.iter_epoch(), 5)))
    two = [loader(location, r, 2, partial=True) for r in range(2)]
    for t in two:
        t.load_state_dict(single.state_dict())
    rest = [flat(indices(t.iter_epoch())) for t in two]
    assert sorted(head + rest[0] + rest[1]) == list(range(TOTAL))


@pytest.mark.dist
def test_resume_real_processes_same_world_size_and_two_to_one(dataset, tmp_path):
    location, _ = dataset
    steps, stop = 18, 5  # 14 training steps per epoch: the resumed run crosses into epoch 1
    first = run_worker(tmp_path, "interrupt", location, steps=steps, stop=stop)
    state = tmp_path / "out-interrupt" / "state.json"
    second = run_worker(tmp_path, "resume", location, steps=steps - stop, state=state)
    for r in range(2):
        assert first[r]["before"] + second[r]["after"] == first[r]["uninterrupted"], f"rank {r}"
    # 2 ranks -> 1 rank: the rest of epoch 0 (evaluation pass: every remaining sample) fills the gap.
    one = loader(location, partial=True)
    one.load_state_dict(json.loads(state.read_text()))
    rest = flat(indices(one.iter_epoch()))
    consumed = [i for r in first for b in r["before"] for i in b["idx"]]
    assert len(consumed) == 2 * stop * 2
    assert sorted(consumed + rest) == list(range(TOTAL))


def test_state_is_compact_and_checked(dataset, tmp_path):
    location, _ = dataset
    bits = np.random.default_rng(0).random(1_000_003) < 0.5
    text = pack_bitmap(bits)
    assert np.array_equal(unpack_bitmap(text, bits.size), bits)
    assert len(text) < 1_000_003 / 8 * 1.4  # about one bit per sample, base64-inflated
    ranks = [loader(location, r, 2) for r in range(2)]
    for r in ranks:
        next(iter(r))
    with pytest.raises(SpellmError, match="merge every rank"):
        loader(location).load_state_dict(ranks[0].state_dict())
    later = loader(location, 1, 2)
    later.start_epoch(1)
    with pytest.raises(SpellmError, match="epoch"):
        merge_states([ranks[0].state_dict(), later.state_dict()])
    other = tmp_path / "other"
    build_dataset(other)
    index = read_index(other)
    index["shards"][0]["sha256"] = "0" * 64
    write_json(other / "index.json", index)
    with pytest.raises(SpellmError, match="another dataset"):
        loader(other).load_state_dict(merge_states([r.state_dict() for r in ranks]))


# --- locations ---------------------------------------------------------------------------------------


def test_pipe_url_reads_like_a_directory(dataset):
    location, _ = dataset
    local = take(loader(location), 16)
    piped = take(loader(f"pipe:cat {location}"), 16)
    assert piped == local
    (location / shard_name(3)).unlink()
    with pytest.raises(ShardError, match=rf"pipe:cat {location}/shard-000003\.tar"):
        list(loader(f"pipe:cat {location}", partial=True, retry_backoff_s=0.01).iter_epoch())


def test_index_is_the_only_shard_list(dataset):
    location, _ = dataset
    (location / "shard-000099.tar").write_bytes((location / shard_name(0)).read_bytes())
    seen = flat(indices(loader(location, partial=True).iter_epoch()))
    assert sorted(seen) == list(range(TOTAL))  # the stray file is not read


# --- corrupt data ------------------------------------------------------------------------------------


def test_corrupt_payload_error_names_shard_and_key_or_is_skipped(tmp_path):
    location = tmp_path / "ds"
    build_dataset(location, payloads={12: b"\x28\xb5\x2f\xfd garbage"})
    with pytest.raises(ShardError, match=r"shard-000002\.tar/000000000012"):
        list(loader(location, partial=True).iter_epoch())
    ld = loader(location, partial=True, skip_corrupt=True)
    seen = flat(indices(ld.iter_epoch()))
    assert sorted(seen) == [i for i in range(TOTAL) if i != 12]
    assert ld.corrupt_skipped == 1
    # A skipped sample is marked consumed: resuming from the state never counts it twice.
    again = loader(location, partial=True, skip_corrupt=True)
    again.load_state_dict(ld.state_dict())
    assert list(again.iter_epoch()) == [] and again.corrupt_skipped == 1


def _rewrite_tar(path: Path, transform) -> None:
    """Rewrite a shard's members through transform(name, data) -> list of (name, data)."""
    with tarfile.open(path) as tar:
        members = [(m.name, tar.extractfile(m).read()) for m in tar.getmembers()]
    buf = io.BytesIO()
    with tarfile.open(fileobj=buf, mode="w", format=tarfile.USTAR_FORMAT) as tar:
        for name, data in members:
            for new_name, new_data in transform(name, data):
                info = tarfile.TarInfo(new_name)
                info.size = len(new_data)
                tar.addfile(info, io.BytesIO(new_data))
    path.write_bytes(buf.getvalue())


@pytest.mark.parametrize("member", ["000000000007.pyd", "../000000000007.spl", "000000000099.spl"])
def test_foreign_member_is_refused_or_skips_the_rest_of_its_shard(tmp_path, member):
    location = tmp_path / "ds"
    build_dataset(location)
    shard = location / shard_name(1)
    _rewrite_tar(shard, lambda n, d: [(member, d)] if n == "000000000007.spl" else [(n, d)])
    with pytest.raises(ShardError, match=r"shard-000001\.tar") as err:
        list(loader(location, partial=True).iter_epoch())
    assert member.split("/")[-1].split(".")[0] in str(err.value)
    ld = loader(location, partial=True, skip_corrupt=True)
    seen = flat(indices(ld.iter_epoch()))
    assert len(seen) == len(set(seen))
    others = {i for i in range(TOTAL) if not 5 <= i < 10}
    assert others <= set(seen)
    assert {5, 6} <= set(seen) and not {7, 8, 9} & set(seen)  # members after the bad one are lost
    assert ld.corrupt_skipped == TOTAL - len(seen) == 3


# Each member is a 512-byte header plus its payload padded to 512 bytes (payloads here are < 512).
@pytest.mark.parametrize("cut", [2 * 1024 + 512 + 50, 2 * 1024 + 100], ids=["mid-data", "mid-header"])
def test_truncated_shard_is_an_error_or_counted(tmp_path, cut):
    location = tmp_path / "ds"
    build_dataset(location)
    shard = location / shard_name(4)
    shard.write_bytes(shard.read_bytes()[:cut])
    with pytest.raises(ShardError, match=r"shard-000004\.tar"):
        list(loader(location, partial=True).iter_epoch())
    ld = loader(location, partial=True, skip_corrupt=True)
    seen = flat(indices(ld.iter_epoch()))
    assert {i for i in range(TOTAL) if not 20 <= i < 25} <= set(seen)
    assert len(seen) == len(set(seen)) and ld.corrupt_skipped == TOTAL - len(seen) > 0
    (location / shard_name(4)).unlink()
    with pytest.raises(ShardError, match=r"shard-000004\.tar: cannot read"):
        list(loader(location, partial=True).iter_epoch())


def test_short_rank_is_padded_with_a_filler_batch_in_training(tmp_path):
    location = tmp_path / "ds"
    build_dataset(location, payloads={i: b"bad" for i in range(0, 5)})  # all of shard 0
    # One rank, one slot, batch 5: 6 full batches planned; shard 0 is skipped, 5 real + 1 filler.
    ld = loader(location, num_workers=0, batch_size=5, skip_corrupt=True)
    batches = list(ld.iter_epoch())
    assert len(batches) == 6
    fillers = [b for b in batches if (b["sample_index"] == -1).all()]
    assert len(fillers) == 1 and not fillers[0]["loss_mask"].any()
    assert sorted(flat(indices(batches))) == list(range(5, TOTAL))
    assert ld.corrupt_skipped == 5


# --- tokenizer and config checks ---------------------------------------------------------------------


def test_tokenizer_mismatch_is_refused(dataset):
    location, _ = dataset
    index = read_index(location)
    check_tokenizer(index, TOK, seq_len=L, top_k=K)
    with pytest.raises(SpellmError, match=f"{location}.*tokenizer hash"):
        check_tokenizer(index, "tok-hash-b", where=str(location))
    with pytest.raises(SpellmError, match="seq_len 8 differs from the expected 16"):
        check_tokenizer(index, TOK, seq_len=16)
    with pytest.raises(SpellmError, match=f"{location}.*tokenizer hash"):
        loader(location, tokenizer_hash="tok-hash-b")
    with pytest.raises(SpellmError, match="top_k 5 differs"):
        loader(location, tokenizer_hash=TOK, top_k=10)
    ok = loader(location, tokenizer_hash=TOK, seq_len=L, top_k=K)
    assert ok.remaining_steps() == ok.steps_per_epoch() == 15  # slots of 16 + 14 samples: 30 // 2


def test_config_and_empty_epoch_errors(dataset):
    location, _ = dataset
    with pytest.raises(SpellmError, match=r"loader\.batch_size must be > 0"):
        LoaderConfig(location=str(location), batch_size=0)
    ld = loader(location, batch_size=64)  # 30 samples give no full batch of 64
    with pytest.raises(SpellmError, match="no batch of 64"):
        next(iter(ld))
    with pytest.raises(SpellmError, match=r"no index\.json"):
        loader(location / "missing")
