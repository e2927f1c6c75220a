"""The original weights of the trained tensors, which the exact fallback (`spellm_ds.inference`) needs.

Training changes only the MLPs of the last N layers, so the teacher is the export with those tensors put
back. A full export writes their original values to `original_mlps.safetensors`, read from the base model
directory the checkpoint records (they are the frozen teacher's weights; the checkpoint holds only the
trained ones); a delta export needs nothing more, as its base model holds them. `spellm_config.json`
records it in `original_mlps`: the file name, `"base model"` for a delta, or null when the export was
written without them (`original_mlps=False`, `--no-original-mlps`), which loads with the approximate
fallback. The file costs the N MLPs' bytes (70B, N = 5, bf16: 7 GB).

`spellm_ds.export.write` checks the base model against the trained tensors here before writing anything,
and writes the file and the record through this module.
"""

from __future__ import annotations

from collections.abc import Callable
from pathlib import Path

import torch
from torch import Tensor

from spellm_ds.errors import SpellmError
from spellm_ds.export.format import ORIGINAL_FROM_BASE, ORIGINAL_MLPS_FILE, SafetensorsWriter


def check_base_holds(
    base_dir: Path, base_files: dict[str, tuple[Path, tuple[int, ...]]], names: list[str], what: str
) -> None:
    """Refuse a base model that has no tensor for some trained name (HF names) of `what`."""
    missing = [n for n in names if n not in base_files]
    if missing:
        raise SpellmError(f"base model {base_dir} has no tensors {missing[:5]}: not {what}'s base")


def check_original_shapes(
    base_dir: Path,
    base_files: dict[str, tuple[Path, tuple[int, ...]]],
    originals: list[tuple[str, tuple[int, ...], torch.dtype]],
) -> None:
    """Refuse a base model whose tensors for the trained names have other shapes than the trained ones."""
    shapes = {name: shape for name, (_, shape) in base_files.items()}
    bad = [f"{n} {shape} vs base {shapes.get(n)}" for n, shape, _ in originals if shapes.get(n) != shape]
    if bad:
        raise SpellmError(f"base model {base_dir} does not fit the trained tensors: " + "; ".join(bad[:5]))


def write_original_mlps(
    out: Path,
    originals: list[tuple[str, tuple[int, ...], torch.dtype]],
    fetch_original: Callable[[str], Tensor],
) -> None:
    """Write `original_mlps.safetensors` in `out`: each trained tensor's original weight, in its dtype."""
    writer = SafetensorsWriter(out / ORIGINAL_MLPS_FILE, originals)
    for hf_name, _shape, dt in originals:
        writer.write(hf_name, fetch_original(hf_name).to(dt))
    writer.close()


def original_mlps_record(delta: bool, carried: bool) -> str | None:
    """The `original_mlps` field of `spellm_config.json`: the file, the base model (delta), or None."""
    return (ORIGINAL_FROM_BASE if delta else ORIGINAL_MLPS_FILE) if carried else None
