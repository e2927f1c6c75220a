"""chars → token lookup on any torch device (`TokenLookup`): exact and prefix queries, no host sync."""

from __future__ import annotations

from typing import TYPE_CHECKING

import numpy as np
import torch

if TYPE_CHECKING:
    from spellm_ds.charset.table import CharTable

_M1 = 2_147_483_647  # 2**31 - 1, prime
_M2 = 2_147_483_629  # largest prime below it


def _powers(k: int, attempt: int) -> torch.Tensor:
    """Polynomial-hash weights [2, k] for two prime moduli; `attempt` varies the bases."""
    out = []
    for base, mod in ((257 + 2 * attempt, _M1), (263 + 6 * attempt, _M2)):
        out.append([pow(base, i, mod) for i in range(k)])
    return torch.tensor(out, dtype=torch.int64)


def _row_hash(rows: torch.Tensor, pw: torch.Tensor) -> torch.Tensor:
    """62-bit hash of int64 rows [..., k] with values in [0, 255]."""
    h1 = (rows * pw[0]).sum(-1) % _M1
    h2 = (rows * pw[1]).sum(-1) % _M2
    return h1 * (1 << 31) + h2


class _HashIndex:
    """Distinct rows sorted by hash; a query is hashed, binary-searched and verified against the row."""

    def __init__(self, rows: np.ndarray, ids: np.ndarray, device: torch.device) -> None:
        k = rows.shape[1]
        rows_t = torch.from_numpy(np.ascontiguousarray(rows, dtype=np.uint8))
        as_long = rows_t.long()
        for attempt in range(16):
            pw = _powers(k, attempt)
            hashes, order = torch.sort(_row_hash(as_long, pw))
            if hashes.numel() < 2 or not bool((hashes[1:] == hashes[:-1]).any()):
                break
        else:  # 16 colliding 62-bit hash families: practically impossible
            raise RuntimeError("could not find a collision-free row hash")
        self.pw = pw.to(device)
        self.hashes = hashes.to(device)
        self.rows = rows_t[order].to(device)
        self.ids = torch.from_numpy(np.ascontiguousarray(ids, dtype=np.int64))[order].to(device)

    def find(self, query: torch.Tensor, valid: torch.Tensor) -> torch.Tensor:
        n = self.hashes.numel()
        if n == 0:
            return torch.full(query.shape[:-1], -1, dtype=torch.long, device=query.device)
        h = _row_hash(query, self.pw)
        pos = torch.searchsorted(self.hashes, h).clamp_(max=n - 1)
        hit = valid & (self.hashes[pos] == h) & (self.rows[pos] == query).all(-1)
        return torch.where(hit, self.ids[pos], torch.full_like(pos, -1))


class TokenLookup:
    """Char ids → token id on a torch device (exact and prefix), without host syncs or per-token loops."""

    def __init__(self, table: CharTable, device: str | torch.device = "cpu") -> None:
        self.device = torch.device(device)
        self.k = table.k
        self.charset = table.charset
        self.vocab_size = table.vocab_size
        self.table_hash = table.hash
        self.token_chars = torch.from_numpy(table.token_chars.astype(np.int64)).to(self.device)
        self.decodable = torch.from_numpy(table.decodable.copy()).to(self.device)
        # Spelled longer than k with known symbols: their row is their first k characters.
        self.long_tokens = torch.from_numpy(table.truncated & ~table.unknown).to(self.device)
        self._exact = _HashIndex(*table.exact_entries(), self.device)
        self._prefix = _HashIndex(*table.prefix_entries(), self.device)

    def _canonical(self, chars: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        if chars.shape[-1] != self.k:
            raise ValueError(f"char ids must have last dimension k={self.k}, got shape {tuple(chars.shape)}")
        chars = chars.to(device=self.device, dtype=torch.long)
        valid = ((chars >= 0) & (chars < self.charset.size)).all(-1)
        after_end = (chars == 0).cumsum(-1) > 0
        return chars.clamp(0, 255).masked_fill(after_end, 0), valid

    def lookup(self, chars: torch.Tensor) -> torch.Tensor:
        """Return the canonical token id whose row equals `chars` [..., k] (read up to `<end>`), else -1."""
        query, valid = self._canonical(chars)
        return self._exact.find(query, valid)

    def prefix_lookup(self, chars: torch.Tensor) -> torch.Tensor:
        """Return the canonical decodable token whose row starts with `chars` [..., k], else -1."""
        query, valid = self._canonical(chars)
        return self._prefix.find(query, valid)
