"""The epoch plan of the streaming reader, as pure functions: which rank and worker slot reads which
samples, and the consumed-sample bitmap's text form.

`spellm_ds.data.loader` describes the rules (shard permutation by seed and epoch, greedy assignment, cuts that
keep ranks and slots within one sample or one batch of each other); every rank computes the same plan
from the same state, so no communication is needed. Nothing here touches files or tensors.
"""

from __future__ import annotations

import base64
import heapq
import zlib
from collections.abc import Sequence

import numpy as np

from spellm_ds.errors import SpellmError


def pack_bitmap(bits: np.ndarray) -> str:
    """Encode a bool array as base64 text of zlib-compressed packed bits."""
    return base64.b64encode(zlib.compress(np.packbits(bits.astype(bool)).tobytes(), 6)).decode("ascii")


def unpack_bitmap(text: str, count: int, where: str = "state") -> np.ndarray:
    """Decode `pack_bitmap` output back into a bool array of `count` entries."""
    try:
        raw = zlib.decompress(base64.b64decode(text.encode("ascii"), validate=True))
    except (ValueError, zlib.error) as exc:
        raise SpellmError(f"{where}: consumed bitmap is not valid base64/zlib ({exc})") from None
    if len(raw) != (count + 7) // 8:
        raise SpellmError(f"{where}: bitmap holds {len(raw)} bytes, {count} samples need {(count + 7) // 8}")
    return np.unpackbits(np.frombuffer(raw, dtype=np.uint8), count=count).astype(bool)


def _greedy(items: Sequence[tuple[int, int]], bins: int) -> list[list[int]]:
    """Assign (id, weight) items, heaviest first, each to the lightest bin; bins keep the items' order."""
    order = sorted(range(len(items)), key=lambda i: (-items[i][1], i))
    heap = [(0, b) for b in range(bins)]
    chosen: list[list[int]] = [[] for _ in range(bins)]
    for i in order:
        load, b = heapq.heappop(heap)
        chosen[b].append(i)
        heapq.heappush(heap, (load + items[i][1], b))
    return [[items[i][0] for i in sorted(c)] for c in chosen]


def shard_order(num_shards: int, seed: int, epoch: int, shuffle: bool = True) -> list[int]:
    """Return the epoch's global shard order: a permutation drawn from (seed, epoch)."""
    if not shuffle:
        return list(range(num_shards))
    return [int(i) for i in np.random.default_rng([seed, epoch]).permutation(num_shards)]


Piece = tuple[int, int, int]  # (shard position, skip, take) over the shard's remaining samples


def _cut(groups: list[list[Piece]], targets: list[int]) -> list[list[Piece]]:
    """Concatenate the groups' pieces and cut the sequence into consecutive bins of `targets` samples.

    Each cut falls inside at most one piece, so ``len(targets) - 1`` cuts add at most that many pieces.
    """
    out: list[list[Piece]] = [[] for _ in targets]
    last = len(targets) - 1
    b, room = 0, targets[0]
    for s, skip, take in (p for g in groups for p in g):
        while take > 0:
            while room <= 0 and b < last:
                b += 1
                room = targets[b]
            n = take if b == last else min(take, room)
            out[b].append((s, skip, n))
            skip, take, room = skip + n, take - n, room - n
    return out


def _split_slots(pieces: list[Piece], num_slots: int, batch_size: int) -> list[list[Piece]]:
    """Share one rank's pieces among its worker slots so they hold ``total // batch_size`` full batches."""
    grouped = _greedy([(i, p[2]) for i, p in enumerate(pieces)], num_slots)
    groups = [[pieces[i] for i in g] for g in grouped]
    total = sum(p[2] for p in pieces)
    batches = total // batch_size
    if sum(sum(p[2] for p in g) // batch_size for g in groups) == batches:
        return groups  # whole pieces already lose no batch: no extra read
    targets = [(batches // num_slots + (j < batches % num_slots)) * batch_size for j in range(num_slots)]
    targets[-1] += total - sum(targets)
    return _cut(groups, targets)


def plan_epoch(
    remaining: Sequence[int],
    *,
    seed: int,
    epoch: int,
    world_size: int,
    num_slots: int,
    batch_size: int = 1,
    shuffle: bool = True,
) -> list[list[list[Piece]]]:
    """Return plan[rank][slot] = pieces ``(shard, skip, take)``: the rank reads samples skip..skip+take-1
    (in index order) of the shard's remaining ones.

    Whole shards go greedily to ranks; if their remaining counts then differ by more than one, the
    concatenation of the ranks' shards is cut into counts differing by at most one, which splits at most
    ``world_size - 1`` shards between neighbouring ranks. Within a rank the same happens per worker slot
    with cuts at multiples of `batch_size`, so a rank of n samples holds ``n // batch_size`` full batches.
    """
    order = shard_order(len(remaining), seed, epoch, shuffle)
    live = [(s, int(remaining[s])) for s in order if remaining[s] > 0]
    groups = [[(s, 0, int(remaining[s])) for s in g] for g in _greedy(live, world_size)]
    loads = [sum(p[2] for p in g) for g in groups]
    if max(loads) - min(loads) > 1:
        total = sum(loads)
        groups = _cut(groups, [total // world_size + (r < total % world_size) for r in range(world_size)])
    return [_split_slots(g, num_slots, batch_size) for g in groups]


def piece_ranges(
    plan: list[list[list[Piece]]], shards: Sequence[tuple[int, int]], base: np.ndarray
) -> list[list[list[tuple[int, int, int]]]]:
    """Turn a plan's pieces into ``(shard, lo, hi)``: global sample indices lo..hi-1 of the shard.

    A piece's range spans its ``take`` samples unconsumed in `base` plus the consumed ones between them;
    a whole shard's pieces cover its whole index range, so the ranges of a shard never overlap.
    """
    free: dict[int, np.ndarray] = {}

    def unconsumed(s: int) -> np.ndarray:
        if s not in free:
            first, count = shards[s]
            free[s] = first + np.flatnonzero(~base[first : first + count])
        return free[s]

    out = []
    for rank in plan:
        slots = []
        for slot in rank:
            ranges = []
            for s, skip, take in slot:
                first, count = shards[s]
                u = unconsumed(s) if skip > 0 or take < count else None
                lo = first if skip == 0 else int(u[skip])
                hi = first + count if u is None or skip + take >= len(u) else int(u[skip + take])
                ranges.append((s, lo, hi))
            slots.append(ranges)
        out.append(slots)
    return out


def slot_counts(plan: list[list[list[tuple[int, int, int]]]], bits: np.ndarray) -> list[list[int]]:
    """Return the number of samples not set in `bits` in every (rank, slot) of a range plan."""
    csum = np.concatenate([[0], np.cumsum(bits, dtype=np.int64)])
    return [
        [sum((hi - lo) - int(csum[hi] - csum[lo]) for _, lo, hi in slot) for slot in rank] for rank in plan
    ]


def epoch_steps(counts: list[list[int]], batch_size: int, partial: bool, equal_steps: bool, rank: int) -> int:
    """Return the batches rank `rank` yields: the common full-batch minimum, or with partial all batches."""
    if not partial:
        return min(sum(c // batch_size for c in slots) for slots in counts)
    per_rank = [sum(-(-c // batch_size) for c in slots) for slots in counts]
    return max(per_rank) if equal_steps else per_rank[rank]


def slot_seed(seed: int, epoch: int, rank: int, slot: int) -> int:
    """The shuffle seed of one worker slot of one rank in one epoch."""
    return int(np.random.SeedSequence([seed, epoch, rank, slot]).generate_state(1)[0])
