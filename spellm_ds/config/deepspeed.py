"""The DeepSpeed JSON as the trainer hands it to DeepSpeed: the run config's values filled in.

The JSON (`ds_configs/*.json`, checked by `spellm_ds.config.preflight`) keeps what only DeepSpeed
reads (ZeRO stage and buckets, offload, communication); the keys in `DS_OWNED_KEYS` come from the run
config and the resolved batch identity, so batch sizes and optimizer hyper-parameters live in one place.
"""

from __future__ import annotations

import json
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    from spellm_ds.config.preflight import Preflight
    from spellm_ds.config.run import TrainConfig

# Keys of the DeepSpeed JSON that the trainer sets from the run config (values in the JSON are replaced).
DS_OWNED_KEYS = (
    "train_batch_size",
    "train_micro_batch_size_per_gpu",
    "gradient_accumulation_steps",
    "gradient_clipping",
    "optimizer.params.lr",
    "optimizer.params.betas",
    "optimizer.params.eps",
    "optimizer.params.weight_decay",
    "bf16.enabled",
    "fp16.enabled",
    "seed",
)


def fill_ds_config(ds: dict[str, Any], cfg: TrainConfig, pre: Preflight) -> dict[str, Any]:
    """Return a copy of the DeepSpeed config with the run-owned keys (`DS_OWNED_KEYS`) set from `cfg`."""
    out = json.loads(json.dumps(ds))
    out["train_batch_size"] = pre.train_batch
    out["train_micro_batch_size_per_gpu"] = pre.micro
    out["gradient_accumulation_steps"] = pre.grad_accum
    out["gradient_clipping"] = cfg.optim.grad_clip
    opt = out.setdefault("optimizer", {"type": "AdamW", "params": {"torch_adam": True}})
    params = opt.setdefault("params", {})
    params.update(
        lr=cfg.optim.lr, betas=list(cfg.optim.betas), eps=cfg.optim.eps, weight_decay=cfg.optim.weight_decay
    )
    out["bf16"] = {**out.get("bf16", {}), "enabled": cfg.model.dtype == "bfloat16"}
    out["fp16"] = {**out.get("fp16", {}), "enabled": False}
    out["seed"] = cfg.seed
    return out
