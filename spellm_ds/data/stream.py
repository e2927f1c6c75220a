"""One rank's worker-side stream of batches: shard pieces read, shuffled, filtered, decoded and batched.

`ShardDataset` is what each DataLoader worker runs (the pipeline `spellm_ds.data.loader` describes):
raw tar members of its slot's shard pieces, a seeded shuffle buffer, the filter of samples outside the
piece or already consumed, decoding with checks against index.json, then batches of B at the stored
widths as numpy arrays; `to_torch` widens a batch to the contract's tensors in the main process.
"""

from __future__ import annotations

import contextlib
import random
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from typing import Any

import numpy as np
import torch
import webdataset as wds
from torch.utils.data import IterableDataset, get_worker_info

from spellm_ds.data.remote import RemoteStream, RetryPolicy, ShardReadError, open_shard
from spellm_ds.data.shards import decode_sample, iter_tar_members, key_to_index
from spellm_ds.errors import ShardError, SpellmError


@dataclass(frozen=True)
class Shard:
    """One shard of index.json: its URL and the global sample indices first..first+count-1 it holds."""

    url: str
    first: int
    count: int
    nbytes: int | None = None  # the shard's size in index.json


@dataclass(frozen=True)
class Piece:
    """A worker's share of a shard: the whole shard is read, samples lo..hi-1 are kept."""

    url: str
    first: int
    count: int
    lo: int
    hi: int
    nbytes: int | None = None


def _collate(samples: list[dict[str, Any]]) -> dict[str, np.ndarray]:
    # Stored widths cross the process boundary (35 bytes per token with top-5, not 69); the main
    # process widens them. Plain arrays through the worker queue beat torch shared-memory tensors here.
    return {
        "input_ids": np.stack([s["input_ids"] for s in samples]),
        "topk_ids": np.stack([s["topk_ids"] for s in samples]),
        "topk_logprobs": np.stack([s["topk_logprobs"] for s in samples]),
        "loss_mask": np.stack([s["loss_mask"] for s in samples]),
        "sample_index": np.array([s["index"] for s in samples], dtype=np.int64),
    }


def to_torch(batch: dict[str, np.ndarray], pin_memory: bool = False) -> dict[str, torch.Tensor]:
    """Convert a worker batch into the contract's tensors (Long ids, float32 log-probs, bool mask)."""
    out = {
        "input_ids": torch.from_numpy(batch["input_ids"].astype(np.int64)),
        "topk_ids": torch.from_numpy(batch["topk_ids"].astype(np.int64)),
        "topk_logprobs": torch.from_numpy(batch["topk_logprobs"].astype(np.float32)),
        "loss_mask": torch.from_numpy(np.ascontiguousarray(batch["loss_mask"], dtype=bool)),
        "sample_index": torch.from_numpy(np.ascontiguousarray(batch["sample_index"], dtype=np.int64)),
    }
    return {k: v.pin_memory() for k, v in out.items()} if pin_memory else out


class ShardDataset(IterableDataset):
    """The batches of one rank's worker slots; DataLoader worker j streams slot (cursor + j) % slots."""

    def __init__(
        self,
        *,
        slots: list[list[Piece]],
        cursor: int,
        consumed: np.ndarray,
        batch_size: int,
        seq_len: int,
        top_k: int,
        vocab_size: int,
        seeds: list[int],
        shuffle: bool,
        shuffle_buffer: int,
        partial: bool,
        skip_corrupt: bool,
        retry: RetryPolicy,
    ) -> None:
        super().__init__()
        self.slots = slots
        self.cursor = cursor
        self.consumed = consumed
        self.batch_size = batch_size
        self.seq_len = seq_len
        self.top_k = top_k
        self.vocab_size = vocab_size
        self.seeds = seeds
        self.shuffle = shuffle
        self.shuffle_buffer = shuffle_buffer
        self.partial = partial
        self.skip_corrupt = skip_corrupt
        self.retry = retry

    def __iter__(self) -> Iterator[dict[str, Any]]:
        """Yield this worker's batches, then one final item carrying leftover skip reports."""
        info = get_worker_info()
        worker, workers = (info.id, info.num_workers) if info is not None else (0, 1)
        if workers != len(self.slots):
            raise SpellmError(f"DataLoader has {workers} workers but the plan has {len(self.slots)} slots")
        slot = (self.cursor + worker) % len(self.slots)
        skipped: list[int] = []
        try:
            for batch in self._pipeline(slot, skipped):
                batch["_slot"] = slot
                batch["_skipped"], skipped[:] = list(skipped), []
                yield batch
        except ShardError as exc:
            yield {"_error": str(exc), "_read": isinstance(exc, ShardReadError)}
            return
        yield {"_final": True, "_skipped": list(skipped)}

    def _pipeline(self, slot: int, skipped: list[int]) -> wds.DataPipeline:
        consumed = self.consumed
        shards = list(self.slots[slot])
        stages: list[Any] = [lambda: iter(shards), self._raw_stage(skipped)]
        if self.shuffle:
            rng = random.Random(self.seeds[slot])
            stages.append(wds.shuffle(self.shuffle_buffer, self.shuffle_buffer, rng=rng))
        # After the shuffle: a worker's stream of survivors then matches the uninterrupted run's.
        stages.append(wds.select(lambda item: item[4] <= item[1] < item[5] and not consumed[item[1]]))
        stages.append(self._decode_stage(skipped))
        stages.append(wds.batched(self.batch_size, collation_fn=_collate, partial=self.partial))
        return wds.DataPipeline(*stages)

    def _raw_stage(self, skipped: list[int]) -> Callable[[Iterator[Piece]], Iterator[tuple]]:
        consumed, skip, policy = self.consumed, self.skip_corrupt, self.retry

        def raw(shards: Iterator[Piece]) -> Iterator[tuple[str, int, bytes, str, int, int]]:
            for shard in shards:
                seen: set[int] = set()
                fh = None
                try:
                    fh = open_shard(shard.url, shard.nbytes, policy)
                    for key, payload in iter_tar_members(fh, shard.url):
                        index = key_to_index(key)
                        if not shard.first <= index < shard.first + shard.count or index in seen:
                            why = "a duplicate" if index in seen else "outside the shard's range"
                            raise ShardError(
                                f"{shard.url}/{key}: sample is {why} "
                                f"[{shard.first}, {shard.first + shard.count}) of index.json"
                            )
                        seen.add(index)
                        yield shard.url, index, payload, key, shard.lo, shard.hi
                    if isinstance(fh, RemoteStream):
                        fh.drain()  # the transfer's end is confirmed, or it fails as a read error
                    fh, handle = None, fh
                    handle.close()  # a gopen pipe (other URL schemes) reports its command's exit status here
                    if len(seen) != shard.count:
                        raise ShardError(
                            f"{shard.url}: holds {len(seen)} samples, index.json says {shard.count}"
                        )
                except ShardReadError:
                    raise  # a transfer that kept failing is not corrupt data: never skipped
                except (ShardError, OSError, ValueError) as exc:
                    msg = str(exc) if isinstance(exc, ShardError) else f"{shard.url}: cannot read ({exc})"
                    if not skip:
                        raise ShardError(msg) from None
                    lost = np.arange(shard.lo, shard.hi)  # only this piece: other pieces report theirs
                    skipped.extend(int(i) for i in lost[~consumed[lost]] if int(i) not in seen)
                finally:
                    if fh is not None:  # stopped early or failed: close quietly
                        with contextlib.suppress(OSError, ValueError):
                            fh.close()

        return raw

    def _decode_stage(self, skipped: list[int]) -> Callable[[Iterator[tuple]], Iterator[dict[str, Any]]]:
        skip = self.skip_corrupt
        seq_len, top_k, vocab = self.seq_len, self.top_k, self.vocab_size

        def decode(items: Iterator[tuple[str, int, bytes, str, int, int]]) -> Iterator[dict[str, Any]]:
            for url, index, payload, key, _, _ in items:
                where = f"{url}/{key}"
                try:
                    sample = decode_sample(payload, where)
                    if sample["input_ids"].shape[0] != seq_len or sample["topk_ids"].shape[1] != top_k:
                        raise ShardError(
                            f"{where}: sample is L={sample['input_ids'].shape[0]}, "
                            f"K={sample['topk_ids'].shape[1]}; index.json says L={seq_len}, K={top_k}"
                        )
                    if sample["vocab_size"] != vocab:
                        raise ShardError(
                            f"{where}: vocab_size {sample['vocab_size']} differs from index.json's {vocab}"
                        )
                except ShardError:
                    if not skip:
                        raise
                    skipped.append(index)
                    continue
                sample["index"] = index
                yield sample

        return decode
