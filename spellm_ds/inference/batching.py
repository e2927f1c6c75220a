"""Batches of token rows for generation: left padding with its attention mask, and the ids that end a row.

`left_pad` lines token rows up on the right, as causal generation reads a batch; `eos_ids` gives the end
ids the way transformers' `generate` takes them: given ones, else the model's generation config, else its
config.
"""

from __future__ import annotations

from typing import Any

import torch
from torch import Tensor


def left_pad(rows: list[list[int]], pad: int) -> tuple[Tensor, Tensor]:
    """Left-padded ids `[n, L]` (long) and their attention mask of token rows; an empty row is all pad."""
    width = max(len(r) for r in rows)
    ids = torch.full((len(rows), width), pad, dtype=torch.long)
    mask = torch.zeros((len(rows), width), dtype=torch.long)
    for i, r in enumerate(rows):
        if r:
            ids[i, width - len(r) :] = torch.tensor(r, dtype=torch.long)
            mask[i, width - len(r) :] = 1
    return ids, mask


def eos_ids(model: Any, eos_token_id: int | list[int] | None = None) -> list[int]:
    """The ids that end a row: `eos_token_id` if given, else the generation config's, then the config's."""
    if eos_token_id is None:
        eos_token_id = getattr(getattr(model, "generation_config", None), "eos_token_id", None)
        if eos_token_id is None:
            eos_token_id = getattr(model.config, "eos_token_id", None)
    if eos_token_id is None:
        return []
    return [int(x) for x in (eos_token_id if isinstance(eos_token_id, (list, tuple)) else [eos_token_id])]
