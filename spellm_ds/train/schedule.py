"""The learning-rate schedule: linear warmup from 0 to `optim.lr`, then cosine decay to `schedule.min_lr`.

The trainer sets every optimizer group's rate from `lr_at` before each optimizer step (the MLP group at
`optim.mlp_lr_scale` times it); the DeepSpeed JSON has no scheduler (`spellm_ds.config.preflight` refuses
one).
"""

from __future__ import annotations

import math

from spellm_ds.config.run import TrainConfig


def lr_at(step: int, cfg: TrainConfig) -> float:
    """Return the learning rate of optimizer step `step` (0-based): linear warmup, then cosine to min_lr."""
    peak, low = cfg.optim.lr, cfg.schedule.min_lr
    warm = cfg.schedule.warmup_steps
    if step < warm:
        return peak * (step + 1) / warm
    span = max(1, cfg.max_steps - warm)
    progress = min(1.0, (step - warm) / span)
    return low + 0.5 * (peak - low) * (1.0 + math.cos(math.pi * progress))
