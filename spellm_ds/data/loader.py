"""Streaming reader for teacher shards: exactly once per epoch across ranks and workers, resumable.

Pipeline (one per DataLoader worker, `spellm_ds.data.stream.ShardDataset`; webdataset stages):

    shard URLs ──► raw (key, payload) from our own tar parser ──► seeded shuffle buffer of raw items
        ──► drop samples already consumed ──► decode survivors ──► batch of B ──► torch tensors

- The shard list comes from `index.json` only (never from listing a directory); a shard's URL is
  ``f"{location}/{name}"``, so `location` may be a local directory or any URL webdataset opens,
  including a ``pipe:`` command that takes the object URL last and writes it to stdout
  (``pipe:curl -sf https://host/ds``, ``pipe:s5cmd cat s3://bucket/ds``, ``pipe:gsutil cat gs://b/ds``).
- Remote shards (``pipe:`` commands, http(s) URLs) are retried and resumed after dropped connections,
  stalls and failed commands, without yielding a sample twice (`spellm_ds.data.remote`); one that keeps
  failing raises `ShardReadError`.
- Workers send batches at the stored widths as numpy arrays; the main process widens them to the
  contract's tensors (`to_torch`): Long ids, float32 log-probs, bool mask, Long ``sample_index``.
- Epoch plan (`spellm_ds.data.epoch_plan.plan_epoch`): the global shard list is permuted by (seed, epoch);
  shards with unconsumed samples are assigned to ranks greedily, largest remaining count first, each to
  the least loaded rank.
  If the ranks' remaining counts then differ by more than one, the ranks' shards are concatenated and
  cut into counts that differ by at most one: a cut splits one shard into contiguous ranges of its
  remaining samples (in index order), each rank keeping only its range. The same is done per rank for
  its worker slots, with cuts at multiples of the batch size, unless whole shards already lose no full
  batch. Every rank computes the whole plan from the same state, so no communication is needed and the
  assignment is identical everywhere.
- Cost of a split: every holder of a piece reads (and decompresses the tar stream of) the whole shard and
  drops the samples outside its range, so an epoch reads at most ``world_size - 1`` extra shards for the
  rank cuts plus at most ``num_workers - 1`` per rank for the slot cuts; balanced shards cause none.
- Exactly once: a global bitmap of consumed sample indices. The consuming process marks what it was
  given (automatically as batches are yielded, or by `mark_consumed`). Before saving, a trainer ORs
  the bitmaps of all ranks (`all_gather_state`, or `merge_states` on gathered states). After
  `load_state_dict` at any world size the epoch's remaining samples are each consumed once.
- Exact resume: at the same world size and worker count the plan is kept and the consumed filter
  runs after the shuffle, so every worker's stream of survivors, and its batch boundaries, equal the
  uninterrupted run's; the DataLoader visits workers round-robin, and the saved cursor (the slot after
  the last batch's slot) rotates the workers so the round-robin continues where it stopped. The next
  batches after a resume are therefore the ones an uninterrupted run would have produced.
- Epoch end (training, ``partial=False``): each worker yields only full batches of exactly B; every rank
  takes the same number of steps, the minimum over ranks of its full batches, so data-parallel ranks
  stay in step. The rest of the epoch (each rank's last partial batch and the surplus of a rank with
  one more sample, fewer than ``world_size * B`` samples in all) is dropped for that epoch, like
  ``drop_last``; the next epoch starts from a fresh bitmap and a
  new permutation. With ``partial=True`` (evaluation) a pass yields every remaining sample, last
  batches possibly smaller, and with ``equal_steps`` ranks with fewer batches pad with filler batches.
- Filler batch: ``sample_index == -1`` and ``loss_mask`` all False (``input_ids`` = EOS). It appears only
  to keep ranks' step counts equal: in evaluation, and in training when skipped corrupt samples left a
  rank short of the common step count. A loss must tolerate a batch with no unmasked position.
- Corrupt data: by default a `ShardError` naming the shard and sample key stops the run; with
  ``skip_corrupt`` the sample (or the rest of a broken shard) is skipped, marked consumed and counted in
  `ShardLoader.corrupt_skipped`. Corrupt means the bytes arrived whole and fail a check (a payload's
  zstd checksum, a tar header checksum, a foreign member, a tar that ends early though its transfer
  completed); a remote read that failed is retried, and one that keeps failing raises `ShardReadError`,
  never a skip, so nothing is marked consumed that was not read.

State (`ShardLoader.state_dict`, JSON-safe): ``format``, ``version``, ``dataset`` (fingerprint, samples),
``seed``, ``epoch``, ``consumed`` (bitmap over global sample indices: ``np.packbits`` → zlib → base64),
``plan`` (``world_size``, ``num_workers``, ``batch_size`` and the ``base`` bitmap the epoch's assignment
was computed from; ``None`` = epoch start; another world size, worker count or batch size re-plans the
rest from the consumed bitmap, as does a version-1 state, whose plan used whole shards only),
``cursor`` (next worker slot per rank; ``None`` for ranks not merged in yet), ``ranks`` (ranks whose
consumption is merged in), ``corrupt_skipped``, ``corrupt_base``. Its format, check and merge live in
`spellm_ds.data.state`.
"""

from __future__ import annotations

import hashlib
import itertools
import json
from collections.abc import Iterator, Sequence
from dataclasses import dataclass
from typing import Any

import numpy as np
import torch
from torch.utils.data import DataLoader

from spellm_ds.config.schema import Section, positive
from spellm_ds.data.epoch_plan import (
    epoch_steps,
    pack_bitmap,
    piece_ranges,
    plan_epoch,
    slot_counts,
    slot_seed,
    unpack_bitmap,
)
from spellm_ds.data.remote import RetryPolicy, ShardReadError
from spellm_ds.data.shards import read_index
from spellm_ds.data.state import STATE_FORMAT, STATE_VERSION, check_state, merge_states
from spellm_ds.data.stream import Piece, Shard, ShardDataset, to_torch
from spellm_ds.errors import ShardError, SpellmError

FILLER_INDEX = -1


def check_tokenizer(
    index: dict[str, Any],
    tokenizer_hash: str,
    *,
    seq_len: int | None = None,
    top_k: int | None = None,
    where: str = "dataset",
) -> None:
    """Refuse a dataset whose tokenizer hash (or seq_len / top_k, when given) differs from the model's."""
    problems = []
    if index.get("tokenizer_hash") != tokenizer_hash:
        problems.append(
            f"tokenizer hash {index.get('tokenizer_hash')!r} differs from the model's {tokenizer_hash!r} "
            "(the shards were built with another tokenizer; rebuild them with the model's)"
        )
    if seq_len is not None and index.get("seq_len") != seq_len:
        problems.append(f"seq_len {index.get('seq_len')} differs from the expected {seq_len}")
    if top_k is not None and index.get("top_k") != top_k:
        problems.append(f"top_k {index.get('top_k')} differs from the expected {top_k}")
    if problems:
        raise SpellmError(f"{where}: " + "; ".join(problems))


@dataclass(kw_only=True)
class LoaderConfig(Section):
    """How to stream one teacher-shard dataset."""

    location: str  # dataset directory or URL prefix (``pipe:...`` allowed) holding index.json
    batch_size: int  # samples per batch (per rank)
    seed: int = 0  # shuffles shards and samples; a loaded state's seed takes precedence
    num_workers: int = 2  # DataLoader worker processes per rank (0 = read in the calling process)
    shuffle: bool = True  # permute shards per epoch and shuffle samples through a buffer
    shuffle_buffer: int = 1000  # raw (still compressed) samples held per worker for shuffling
    partial: bool = False  # evaluation pass: yield every sample, last batches may be smaller
    equal_steps: bool = True  # with partial: pad ranks with filler batches to the same step count
    skip_corrupt: bool = False  # skip and count corrupt samples instead of raising ShardError
    auto_mark: bool = True  # mark a batch consumed as it is yielded (else call mark_consumed)
    tokenizer_hash: str | None = None  # refuse a dataset built with another tokenizer
    seq_len: int | None = None  # refuse a dataset with another sequence length
    top_k: int | None = None  # refuse a dataset with another top-k
    prefetch_factor: int = 2  # batches prefetched per worker
    pin_memory: bool = False  # pin batches for faster host-to-GPU copies
    read_retries: int = 5  # remote shards: failed attempts in a row retried before giving up (0 = none)
    retry_backoff_s: float = 0.5  # remote shards: wait before the first retry, doubled per failure in a row
    retry_backoff_max_s: float = 4.0  # remote shards: longest wait between two attempts
    read_timeout_s: float = 60.0  # remote shards: a read that receives nothing this long has stalled

    def problems(self) -> list[str]:
        p: list[str] = []
        if not str(self.location):
            p.append("loader.location must not be empty")
        positive(p, "loader.batch_size", self.batch_size)
        positive(p, "loader.num_workers", self.num_workers, allow_zero=True)
        positive(p, "loader.shuffle_buffer", self.shuffle_buffer)
        positive(p, "loader.prefetch_factor", self.prefetch_factor)
        positive(p, "loader.read_retries", self.read_retries, allow_zero=True)
        positive(p, "loader.retry_backoff_s", self.retry_backoff_s, allow_zero=True)
        positive(p, "loader.retry_backoff_max_s", self.retry_backoff_max_s, allow_zero=True)
        positive(p, "loader.read_timeout_s", self.read_timeout_s)
        return p


def _keep(item: Any) -> Any:
    return item


# ---------------------------------------------------------------------------------------------------
# Main-process side


def _piece(shard: Shard, lo: int, hi: int) -> Piece:
    return Piece(shard.url, shard.first, shard.count, lo, hi, shard.nbytes)


def _dataset_fingerprint(index: dict[str, Any]) -> str:
    rows = [(e["name"], e["first_sample"], e["samples"], e["sha256"]) for e in index["shards"]]
    return hashlib.sha256(json.dumps([index["tokenizer_hash"], rows]).encode()).hexdigest()[:32]


class ShardLoader:
    """Batches of one rank: `forever()` (training, over epochs), `iter_epoch()` (the epoch's remainder)."""

    def __init__(self, config: LoaderConfig, *, rank: int | None = None, world_size: int | None = None):
        if rank is None or world_size is None:
            from spellm_ds.dist import detect

            info = detect()
            rank = info.rank if rank is None else rank
            world_size = info.world_size if world_size is None else world_size
        if world_size < 1 or not 0 <= rank < world_size:
            raise SpellmError(f"rank {rank} is outside world size {world_size}")
        self.config = config
        self.rank, self.world_size = rank, world_size
        self.num_slots = max(1, config.num_workers)
        self.location = str(config.location).rstrip("/")
        self.index = read_index(self.location)
        if config.tokenizer_hash is not None or config.seq_len is not None or config.top_k is not None:
            check_tokenizer(
                self.index,
                config.tokenizer_hash if config.tokenizer_hash is not None else self.index["tokenizer_hash"],
                seq_len=config.seq_len,
                top_k=config.top_k,
                where=self.location,
            )
        self.seq_len, self.top_k = int(self.index["seq_len"]), int(self.index["top_k"])
        self.vocab_size = int(self.index["vocab_size"])
        self.eos_id = int(self.index.get("eos_id", 0))
        self._shards = self._read_shards()
        self.num_samples = max((s.first + s.count for s in self._shards), default=0)
        self.fingerprint = _dataset_fingerprint(self.index)
        self.seed = config.seed
        self.epoch = 0
        self.consumed = np.zeros(self.num_samples, dtype=bool)
        self._base: np.ndarray | None = None
        self._plan_world = (self.world_size, self.num_slots, self.config.batch_size)
        self._cursors: list[int | None] = [None] * self.world_size
        self._cursors[self.rank] = 0
        self._corrupt_base = 0
        self._corrupt_new = 0
        self._plan_cache: tuple[Any, ...] | None = None
        self._plan_gen = 0

    def _read_shards(self) -> list[Shard]:
        shards, spans = [], []
        for e in self.index["shards"]:
            try:
                name, first, count = str(e["name"]), int(e["first_sample"]), int(e["samples"])
            except (KeyError, TypeError, ValueError):
                raise SpellmError(f"{self.location}/index.json: malformed shard entry {e!r}") from None
            if "/" in name or name.startswith(".") or first < 0 or count < 0:
                raise SpellmError(f"{self.location}/index.json: bad shard entry {name!r}")
            nbytes = e.get("bytes")
            if nbytes is not None and (not isinstance(nbytes, int) or isinstance(nbytes, bool) or nbytes < 0):
                raise SpellmError(f"{self.location}/index.json: shard {name!r} has bad bytes {nbytes!r}")
            shards.append(Shard(f"{self.location}/{name}", first, count, nbytes))
            spans.append((first, first + count, name))
        spans.sort()
        for (_, end, a), (start, _, b) in itertools.pairwise(spans):
            if start < end:
                raise SpellmError(f"{self.location}/index.json: shards {a} and {b} overlap")
        return shards

    # -- accounting --------------------------------------------------------------------------------

    @property
    def corrupt_skipped(self) -> int:
        """Corrupt samples skipped so far (all ranks before the last load, plus this rank since)."""
        return self._corrupt_base + self._corrupt_new

    def mark_consumed(self, sample_index: torch.Tensor | np.ndarray | Sequence[int]) -> None:
        """Record samples as consumed by this rank (filler indices -1 are ignored)."""
        idx = np.asarray(
            sample_index.cpu().numpy() if isinstance(sample_index, torch.Tensor) else sample_index,
            dtype=np.int64,
        ).reshape(-1)
        idx = idx[idx != FILLER_INDEX]
        if idx.size and (idx.min() < 0 or idx.max() >= self.num_samples):
            raise SpellmError(f"sample index outside [0, {self.num_samples}) of {self.location}")
        self.consumed[idx] = True

    def _remaining(self, bits: np.ndarray) -> np.ndarray:
        csum = np.concatenate([[0], np.cumsum(bits, dtype=np.int64)])
        first = np.array([s.first for s in self._shards], dtype=np.int64)
        count = np.array([s.count for s in self._shards], dtype=np.int64)
        return count - (csum[first + count] - csum[first])

    def _build_plan(self, base: np.ndarray, epoch: int) -> list[list[list[tuple[int, int, int]]]]:
        plan = plan_epoch(
            self._remaining(base),
            seed=self.seed,
            epoch=epoch,
            world_size=self.world_size,
            num_slots=self.num_slots,
            batch_size=self.config.batch_size,
            shuffle=self.config.shuffle,
        )
        return piece_ranges(plan, [(sh.first, sh.count) for sh in self._shards], base)

    def _plan(self) -> list[list[list[tuple[int, int, int]]]]:
        key = (self.seed, self.epoch, self._plan_world, self._plan_gen)
        if self._plan_cache is None or self._plan_cache[0] != key:
            base = self._base if self._base is not None else np.zeros(self.num_samples, dtype=bool)
            self._plan_cache = (key, self._build_plan(base, self.epoch))
        return self._plan_cache[1]

    def remaining_steps(self) -> int:
        """Batches this rank yields in the rest of the current epoch (equal on all ranks in training)."""
        counts = slot_counts(self._plan(), self.consumed)
        cfg = self.config
        return epoch_steps(counts, cfg.batch_size, cfg.partial, cfg.equal_steps, self.rank)

    def steps_per_epoch(self, epoch: int | None = None) -> int:
        """Batches per rank in a whole fresh epoch (default: the next one) at this world size."""
        epoch = self.epoch + 1 if epoch is None else epoch
        fresh = np.zeros(self.num_samples, dtype=bool)
        cfg = self.config
        counts = slot_counts(self._build_plan(fresh, epoch), fresh)
        return epoch_steps(counts, cfg.batch_size, cfg.partial, cfg.equal_steps, self.rank)

    def start_epoch(self, epoch: int) -> None:
        """Begin `epoch` afresh: empty bitmap, new permutation, plan for the current world size."""
        self.epoch = int(epoch)
        self.consumed = np.zeros(self.num_samples, dtype=bool)
        self._base = None
        self._plan_gen += 1
        self._plan_world = (self.world_size, self.num_slots, self.config.batch_size)
        self._cursors = [None] * self.world_size
        self._cursors[self.rank] = 0

    # -- iteration ---------------------------------------------------------------------------------

    def _filler(self) -> dict[str, torch.Tensor]:
        b, n, k = self.config.batch_size, self.seq_len, self.top_k
        return {
            "input_ids": torch.full((b, n), self.eos_id, dtype=torch.int64),
            "topk_ids": torch.full((b, n, k), self.eos_id, dtype=torch.int64),
            "topk_logprobs": torch.zeros((b, n, k), dtype=torch.float32),
            "loss_mask": torch.zeros((b, n), dtype=torch.bool),
            "sample_index": torch.full((b,), FILLER_INDEX, dtype=torch.int64),
        }

    def _make_dataset(self, plan: list[list[list[tuple[int, int, int]]]]) -> ShardDataset:
        cfg = self.config
        mine = plan[self.rank]
        return ShardDataset(
            slots=[[_piece(self._shards[s], lo, hi) for s, lo, hi in slot] for slot in mine],
            cursor=self._cursors[self.rank] or 0,
            consumed=self.consumed.copy(),
            batch_size=cfg.batch_size,
            seq_len=self.seq_len,
            top_k=self.top_k,
            vocab_size=self.vocab_size,
            seeds=[slot_seed(self.seed, self.epoch, self.rank, j) for j in range(len(mine))],
            shuffle=cfg.shuffle,
            shuffle_buffer=cfg.shuffle_buffer,
            partial=cfg.partial,
            skip_corrupt=cfg.skip_corrupt,
            retry=RetryPolicy(
                retries=cfg.read_retries,
                backoff_s=cfg.retry_backoff_s,
                backoff_max_s=cfg.retry_backoff_max_s,
                timeout_s=cfg.read_timeout_s,
            ),
        )

    def iter_epoch(self) -> Iterator[dict[str, torch.Tensor]]:
        """Yield the batches of the rest of the current epoch (see the module docstring for its end)."""
        cfg = self.config
        target = self.remaining_steps()
        if target == 0:
            return
        dataset = self._make_dataset(self._plan())
        loader = DataLoader(
            dataset,
            batch_size=None,
            num_workers=cfg.num_workers,
            prefetch_factor=cfg.prefetch_factor if cfg.num_workers > 0 else None,
            collate_fn=_keep,
        )
        done = 0
        stream = iter(loader)
        try:
            for item in stream:
                if "_error" in item:
                    raise (ShardReadError if item.get("_read") else ShardError)(item["_error"])
                lost = item.pop("_skipped")
                if lost:
                    self._corrupt_new += len(lost)
                    self.consumed[np.asarray(lost, dtype=np.int64)] = True
                if item.pop("_final", False):
                    continue
                self._cursors[self.rank] = (item.pop("_slot") + 1) % self.num_slots
                batch = to_torch(item, cfg.pin_memory)
                if cfg.auto_mark:
                    self.mark_consumed(batch["sample_index"])
                done += 1
                yield batch
                if done >= target:
                    return
        finally:
            del stream
        while done < target:
            done += 1
            yield self._filler()

    def forever(self) -> Iterator[dict[str, torch.Tensor]]:
        """Yield training batches over successive epochs, resuming inside the current one."""
        while True:
            if self.remaining_steps() == 0 and self._base is None and not self.consumed.any():
                raise SpellmError(
                    f"{self.location}: {self.num_samples} samples give no batch of {self.config.batch_size} "
                    f"at world size {self.world_size} with {self.num_slots} worker slot(s)"
                )
            yield from self.iter_epoch()
            self.start_epoch(self.epoch + 1)

    def __iter__(self) -> Iterator[dict[str, torch.Tensor]]:
        """Training (`partial=False`): `forever()`; evaluation (`partial=True`): `iter_epoch()`."""
        return self.iter_epoch() if self.config.partial else self.forever()

    # -- state -------------------------------------------------------------------------------------

    def state_dict(self) -> dict[str, Any]:
        """Return this rank's resumable state (merge all ranks' states before saving)."""
        return {
            "format": STATE_FORMAT,
            "version": STATE_VERSION,
            "dataset": {"fingerprint": self.fingerprint, "samples": self.num_samples},
            "seed": self.seed,
            "epoch": self.epoch,
            "consumed": pack_bitmap(self.consumed),
            "plan": {
                "world_size": self._plan_world[0],
                "num_workers": self._plan_world[1],
                "batch_size": self._plan_world[2],
                "base": None if self._base is None else pack_bitmap(self._base),
            },
            "cursor": list(self._cursors),
            "ranks": [self.rank],
            "corrupt_skipped": self.corrupt_skipped,
            "corrupt_base": self._corrupt_base,
        }

    def load_state_dict(self, state: dict[str, Any]) -> None:
        """Restore a merged state; at another world size or worker count the rest is re-planned."""
        check_state(state)
        if state["dataset"] != {"fingerprint": self.fingerprint, "samples": self.num_samples}:
            raise SpellmError(
                f"loader state belongs to another dataset (fingerprint {state['dataset']['fingerprint']}, "
                f"{state['dataset']['samples']} samples) than {self.location} "
                f"({self.fingerprint}, {self.num_samples} samples)"
            )
        plan = state["plan"]
        if sorted(state["ranks"]) != list(range(plan["world_size"])):
            raise SpellmError(
                f"loader state holds ranks {sorted(state['ranks'])} of world size {plan['world_size']}: "
                "merge every rank's state (all_gather_state or merge_states) before saving it"
            )
        self.seed = int(state["seed"])
        self.epoch = int(state["epoch"])
        self.consumed = unpack_bitmap(state["consumed"], self.num_samples)
        saved = (plan["world_size"], plan["num_workers"], plan.get("batch_size"))
        # A version-1 state was planned by whole shards only: re-plan its rest like another world size.
        same = state["version"] == STATE_VERSION and saved == self._plan_world
        if same:
            self._base = None if plan["base"] is None else unpack_bitmap(plan["base"], self.num_samples)
            self._cursors = [int(c) for c in state["cursor"]]
        else:
            self._base = self.consumed.copy()
            self._cursors = [0] * self.world_size
        self._plan_world = (self.world_size, self.num_slots, self.config.batch_size)
        self._plan_gen += 1
        self._corrupt_base = int(state["corrupt_skipped"])
        self._corrupt_new = 0


def all_gather_state(loader: ShardLoader, group: Any = None) -> dict[str, Any]:
    """Collective: gather every rank's loader state and return the merged state on every rank."""
    import torch.distributed as dist

    if not (dist.is_available() and dist.is_initialized()):
        return merge_states([loader.state_dict()])
    states: list[Any] = [None] * dist.get_world_size(group)
    dist.all_gather_object(states, loader.state_dict(), group=group)
    return merge_states(states)
