"""The shard writer: one shard's packed sequences through the teacher, then encoded and written in a thread.

`ShardWriter.build` runs the teacher over a shard's sequences in batches formed inside that shard (none
for token-only shards), refuses non-finite log-probs, and queues the write: the samples are encoded, the
shard is written under a temporary name and renamed, then its manifest ``shard-NNNNNN.json`` is written,
while the teacher already works on the next shard. One write is queued at a time.
"""

from __future__ import annotations

from concurrent.futures import Future, ThreadPoolExecutor
from pathlib import Path
from typing import Any

import numpy as np

from spellm_ds import jsonio
from spellm_ds.data import shards
from spellm_ds.data.corpus import PackedSequence
from spellm_ds.data.teacher_topk import Teacher
from spellm_ds.errors import SpellmError


class ShardWriter:
    """Turns one shard's sequences into a shard file + manifest; encoding and writing run in a thread."""

    def __init__(
        self, output: Path, teacher: Teacher | None, *, batch_size: int, vocab_size: int | None = None
    ) -> None:
        self.output = output
        self.teacher = teacher  # None: token-only shards (top_k 0)
        self.batch_size = batch_size
        self.vocab_size = teacher.vocab_size if teacher is not None else int(vocab_size or 0)
        self._pool = ThreadPoolExecutor(max_workers=1, thread_name_prefix="shard-writer")
        self._pending: Future | None = None

    def build(self, shard: int, seqs: list[PackedSequence], on_batch: Any = None) -> None:
        """Run the teacher over `seqs` (batches inside this shard only) and queue the write."""
        ids = np.stack([s.input_ids for s in seqs])
        if self.teacher is None:  # token-only: empty top-k
            top_ids = np.empty((*ids.shape, 0), dtype=np.int32)
            top_lp = np.empty((*ids.shape, 0), dtype=np.float16)
            if on_batch is not None:
                on_batch(int(ids.size))
            self.wait()
            self._pending = self._pool.submit(self._write, shard, seqs, top_ids, top_lp)
            return
        top_ids = np.empty((*ids.shape, self.teacher.top_k), dtype=np.int32)
        top_lp = np.empty((*ids.shape, self.teacher.top_k), dtype=np.float16)
        for s in range(0, len(seqs), self.batch_size):
            top_ids[s : s + self.batch_size], top_lp[s : s + self.batch_size] = self.teacher.topk(
                ids[s : s + self.batch_size]
            )
            if on_batch is not None:
                on_batch(int(ids[s : s + self.batch_size].size))
        bad = ~np.isfinite(top_lp).all(axis=(1, 2))
        if bad.any():
            j = int(np.argmax(bad))
            where = f"{shards.shard_name(shard)}/{shards.sample_key(seqs[j].index)}"
            raise SpellmError(f"{where}: the teacher produced NaN/inf log-probs; try --dtype float32")
        self.wait()
        self._pending = self._pool.submit(self._write, shard, seqs, top_ids, top_lp)

    def _write(self, shard: int, seqs: list[PackedSequence], top_ids: np.ndarray, top_lp: np.ndarray) -> None:
        vocab = self.vocab_size
        samples = []
        for j, seq in enumerate(seqs):
            mask = seq.loss_mask if seq.length < seq.input_ids.shape[0] else None
            payload = shards.encode_sample(seq.input_ids, top_ids[j], top_lp[j], vocab, loss_mask=mask)
            samples.append((shards.sample_key(seq.index), payload))
        path = self.output / shards.shard_name(shard)
        nbytes, sha = shards.write_shard(path, samples)
        entry = shards.ShardEntry(
            name=path.name,
            index=shard,
            samples=len(seqs),
            tokens=sum(s.length for s in seqs),
            bytes=nbytes,
            sha256=sha,
            first_sample=seqs[0].index,
        )
        jsonio.write_json(self.output / shards.manifest_name(shard), entry.to_dict())

    def wait(self) -> None:
        """Block until the queued write (if any) finished; re-raise its error."""
        if self._pending is not None:
            pending, self._pending = self._pending, None
            pending.result()

    def stop(self) -> None:
        """Let a queued write complete without reporting its result, then stop the thread (error path)."""
        self._pool.shutdown(wait=True)

    def close(self) -> None:
        """Finish the queued write and stop the writer thread."""
        try:
            self.wait()
        finally:
            self._pool.shutdown(wait=True)
