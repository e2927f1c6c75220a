"""The char path's decode math: head log-probs and entropy, sampling, the char-string lookup, AutoCorrect.

Decode step (`decode_hidden`, every row of a batch at once, no loop over tokens):

1. One matmul of the final normed hidden state `[N, d]` with the stacked head weight `[k·|C|, d]`, viewed
   as logits `[N, k, |C|]` (row `i·|C| + c` of the weight is head i, symbol c).
2. Per-head argmax (or per-head sampling, below) gives a char string `[N, k]`; a string ends at its first
   `<end>`: anything a later head predicts is ignored.
3. `TokenLookup.lookup` (spellm_ds.charset) maps the string to its canonical token id on the device, -1
   where the string is no token.
4. AutoCorrect for those rows: the decodable token with the highest sum of per-head log-probs of its own
   END-padded row, `argmax_v Σ_i log p_i(chars[v, i])`. That is k `index_select`s of a `[N, |C|]` row
   over the `[k, V']` table of decodable tokens, summed: `O(N·k·V')` adds, no `[V, d]` matmul (a
   decodable token is one whose own row looks up to it, so the result always round-trips).
5. Entropy fallback: `H = mean_i entropy(softmax(logits_i))`; rows with `H > threshold` take the original
   model's prediction instead (`spellm_ds.inference.fallback`). `threshold=None` never falls back on
   entropy; a negative threshold falls back on every row (the base model's own decode).

Host syncs. By default a step reads back one pair of integers, how many rows need AutoCorrect and how
many need the fallback; only those rows are gathered and run through the `O(V')` AutoCorrect scoring
and the full-vocabulary lm_head, so a step whose strings all hit and whose heads are all confident never
touches a `V`-sized tensor. That one read is what lets the lm_head be skipped (the source of the
speedup). `sync_free=True` removes it: AutoCorrect and the lm_head run on every row of every step and
`torch.where` picks per row (for CUDA graphs or `torch.compile`, or when fallback is frequent anyway).

Sampling (`temperature > 0`): the char path samples each head's symbol from its own softmax at that
temperature, restricted to the head's top-p nucleus; a sampled string that is no token is AutoCorrected
by sampling a token from the AutoCorrect scores (sum of tempered per-head log-probs) under the same
top-p; fallback rows sample from the lm_head softmax at that temperature and top-p. The entropy that
decides the fallback always comes from the untempered heads, as calibrated.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

import numpy as np
import torch
import torch.nn.functional as F
from torch import Tensor

from spellm_ds.errors import SpellmError

EXACT, AUTOCORRECT, FALLBACK = 0, 1, 2
PATH_NAMES = ("exact", "autocorrect", "fallback")


def canonical_chars(chars: Tensor, end_id: int = 0) -> Tensor:
    """Set every symbol after the first `<end>` to `<end>` (a string ends at its first end symbol)."""
    after = (chars == end_id).long().cumsum(-1) > 0
    return chars.masked_fill(after, end_id)


def head_log_probs(hidden: Tensor, head_weight: Tensor, k: int) -> Tensor:
    """Per-head log-probs `[..., k, |C|]` (float32) of the char heads on hidden states `[..., d]`."""
    logits = F.linear(hidden.to(head_weight.dtype), head_weight).float()
    return logits.view(*hidden.shape[:-1], k, -1).log_softmax(-1)


def mean_head_entropy(logp: Tensor) -> Tensor:
    """Mean over the k heads of each head's entropy in nats: `[..., k, |C|]` log-probs → `[...]`."""
    p = logp.exp()
    plogp = torch.where(p > 0, p * logp, torch.zeros_like(p))
    return -plogp.sum(-1).mean(-1)


def top_p_filter(logits: Tensor, top_p: float) -> Tensor:
    """Mask (to -inf) the logits outside the smallest set whose probability reaches `top_p` (last dim)."""
    if top_p >= 1.0:
        return logits
    sorted_logits, order = logits.sort(-1, descending=True)
    probs = sorted_logits.softmax(-1)
    # Drop a symbol when the mass strictly before it already reaches top_p (the first is always kept).
    drop = (probs.cumsum(-1) - probs) >= top_p
    sorted_logits = sorted_logits.masked_fill(drop, float("-inf"))
    return torch.full_like(logits, float("-inf")).scatter(-1, order, sorted_logits)


def sample_logits(
    logits: Tensor, temperature: float, top_p: float = 1.0, generator: torch.Generator | None = None
) -> Tensor:
    """Sample one index per row of `logits [..., n]` at `temperature` within the top-p nucleus."""
    filtered = top_p_filter(logits.float() / temperature, top_p)
    probs = filtered.softmax(-1).reshape(-1, logits.shape[-1])
    return torch.multinomial(probs, 1, generator=generator).view(logits.shape[:-1])


class CharDecoder:
    """Device-side tables of the char path: exact chars→token lookup and the AutoCorrect gather table."""

    def __init__(self, table: Any, device: str | torch.device = "cpu") -> None:
        from spellm_ds.charset import TokenLookup

        self.device = torch.device(device)
        self.k = int(table.k)
        self.num_chars = int(table.charset.size)
        self.end_id = int(table.charset.end_id)
        self.lookup = TokenLookup(table, self.device)
        ids = np.flatnonzero(table.decodable).astype(np.int64)
        if ids.size == 0:
            raise SpellmError("the char table has no decodable token: the char heads cannot produce any")
        self.cand_ids = torch.from_numpy(ids).to(self.device)  # [V']
        # [k, V'], one contiguous index row per head: head i gathers its log-prob of each token's char i.
        rows = np.ascontiguousarray(table.token_chars[ids].T.astype(np.int64))
        self.cand_chars = torch.from_numpy(rows).to(self.device)

    def autocorrect_scores(self, logp: Tensor) -> Tensor:
        """Scores `[N, V']` of every decodable token: the sum of per-head log-probs of its chars."""
        per_head = logp.transpose(0, 1).contiguous()  # [k, N, C]: each head's rows contiguous
        scores = per_head[0].index_select(1, self.cand_chars[0])
        for i in range(1, self.k):
            scores.add_(per_head[i].index_select(1, self.cand_chars[i]))
        return scores

    def autocorrect(self, logp: Tensor) -> Tensor:
        """The decodable token id `[N]` with the best AutoCorrect score for each row of `logp [N, k, C]`."""
        return self.cand_ids[self.autocorrect_scores(logp).argmax(-1)]

    def decode_chars(self, chars: Tensor) -> Tensor:
        """Token ids `[...]` of char strings `[..., k]` (read up to the first `<end>`), -1 for no token."""
        return self.lookup.lookup(chars)


@dataclass
class DecodeResult:
    """One decode step for N rows."""

    tokens: Tensor  # Long[N] the chosen token ids
    path: Tensor  # Long[N] EXACT (0), AUTOCORRECT (1) or FALLBACK (2)
    entropy: Tensor  # Float[N] mean head entropy (nats)
    chars: Tensor  # Long[N, k] the (canonical) char string of the char path


def decode_hidden(
    dec: CharDecoder,
    head_weight: Tensor,
    hidden: Tensor,
    fallback_tokens: Callable[[Tensor], Tensor],
    *,
    threshold: float | None,
    autocorrect: bool = True,
    temperature: float = 0.0,
    top_p: float = 1.0,
    generator: torch.Generator | None = None,
    sync_free: bool = False,
    fallback_hidden: Callable[[list[int] | None], Tensor] | None = None,
) -> DecodeResult:
    """One decode step: the next token of each row of final hidden states `[N, d]` (see the module doc).

    `head_weight` is the stacked char head weight `[k·|C|, d]`; `fallback_tokens(h)` gives the fallback's
    token ids for hidden states `[n, d]`; `fallback_hidden(rows)` gives the hidden states it takes for
    falling-back rows (a sorted list; None: every row), by default the rows of `hidden` (approximate).
    """
    w = head_weight
    logits = F.linear(hidden.to(w.dtype), w).float().view(hidden.shape[0], dec.k, dec.num_chars)
    logp = logits.log_softmax(-1)
    entropy = mean_head_entropy(logp)
    sampling = temperature > 0
    if sampling:
        chars = sample_logits(logits, temperature, top_p, generator)
    else:
        chars = logits.argmax(-1)
    chars = canonical_chars(chars, dec.end_id)
    tokens = dec.decode_chars(chars)
    miss = tokens < 0
    need_fb = entropy > threshold if threshold is not None else torch.zeros_like(miss)
    if not autocorrect:
        need_fb = need_fb | miss
    need_ac = miss & ~need_fb
    path = torch.where(need_fb, FALLBACK, torch.where(miss, AUTOCORRECT, EXACT))
    if sync_free:
        if autocorrect:
            ac = _autocorrect(dec, logits, logp, temperature, top_p, generator)
            tokens = torch.where(need_ac, ac, tokens)
        fb_hidden = hidden if fallback_hidden is None else fallback_hidden(None)
        fb = fallback_tokens(fb_hidden)
        tokens = torch.where(need_fb, fb, tokens)
    else:
        # The one host read of the step: how many rows need AutoCorrect and the fallback (with
        # `fallback_hidden`, which rows fall back). Only those rows are gathered and run through the
        # AutoCorrect table and the full-vocabulary lm_head.
        fb_rows: list[int] | None = None
        if fallback_hidden is None:
            n_ac, n_fb = torch.stack([need_ac.sum(), need_fb.sum()]).tolist()
        else:
            flags = torch.cat([need_ac.sum().view(1), need_fb.long()]).tolist()
            n_ac, fb_rows = flags[0], [i for i, f in enumerate(flags[1:]) if f]
            n_fb = len(fb_rows)
        if n_ac:
            rows = torch.argsort((~need_ac).to(torch.int8), stable=True)[:n_ac]
            ac = _autocorrect(dec, logits[rows], logp[rows], temperature, top_p, generator)
            tokens = tokens.index_put((rows,), ac)
        if n_fb:
            if fallback_hidden is not None and fb_rows is not None:
                rows = torch.tensor(fb_rows, device=hidden.device)
                fb_hidden = fallback_hidden(fb_rows)
            else:
                rows = torch.argsort((~need_fb).to(torch.int8), stable=True)[:n_fb]
                fb_hidden = hidden[rows]
            tokens = tokens.index_put((rows,), fallback_tokens(fb_hidden))
    return DecodeResult(tokens=tokens, path=path, entropy=entropy, chars=chars)


def _autocorrect(
    dec: CharDecoder,
    logits: Tensor,
    logp: Tensor,
    temperature: float,
    top_p: float,
    generator: torch.Generator | None,
) -> Tensor:
    """AutoCorrect token ids `[N]` of rows: the best score, or a sample of the tempered scores."""
    if temperature > 0:
        scores = dec.autocorrect_scores((logits / temperature).log_softmax(-1))
        return dec.cand_ids[sample_logits(scores, 1.0, top_p, generator)]
    return dec.autocorrect(logp)
