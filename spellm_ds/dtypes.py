"""Floating-point dtypes by name: the one vocabulary every config, flag and file uses, and its torch map.

The names are torch's own (`float32`, `bfloat16`, `float16`). Checkpoints written before this
vocabulary recorded the run's dtype as `fp32` / `bf16` / `fp16`; `recorded_dtype` reads those too, so
such checkpoints still export, but no config or flag accepts them.
"""

from __future__ import annotations

from typing import Literal

import torch

from spellm_ds.errors import SpellmError

DTypeName = Literal["float32", "bfloat16", "float16"]
TORCH_DTYPES: dict[str, torch.dtype] = {
    "float32": torch.float32,
    "bfloat16": torch.bfloat16,
    "float16": torch.float16,
}
_RECORDED_BEFORE = {"fp32": "float32", "bf16": "bfloat16", "fp16": "float16"}


def torch_dtype(name: str, what: str = "dtype") -> torch.dtype:
    """The torch dtype called `name`; an error names `what` and the choices."""
    if name not in TORCH_DTYPES:
        raise SpellmError(f"{what}: {name!r} is not one of {', '.join(TORCH_DTYPES)}")
    return TORCH_DTYPES[name]


def dtype_name(dtype: torch.dtype) -> str:
    """The vocabulary's name of a torch dtype."""
    for name, value in TORCH_DTYPES.items():
        if value == dtype:
            return name
    raise SpellmError(f"dtype {dtype} is not one of {', '.join(TORCH_DTYPES)}")


def recorded_dtype(name: str | None) -> torch.dtype | None:
    """The dtype a checkpoint's metadata records, in this vocabulary or the one written before it."""
    if name is None:
        return None
    return torch_dtype(_RECORDED_BEFORE.get(name, name), "recorded dtype")
