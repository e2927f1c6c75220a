"""Reading a ZeRO-3 checkpoint's files without a process group or the model: export's input.

`ZeroCheckpoint` reads a tag directory (the layout of `spellm_ds.train.checkpoint`): every rank's
`*_model_states.pt` and `*_optim_states.pt` is opened with `torch.load(mmap=True, weights_only=True)`
(an allowlist admits DeepSpeed's ZeroStageEnum and LossScaler and the numpy types of stored RNG states;
nothing else is unpickled). A trained parameter is cut from each rank's fp32 master partition (ZeRO-3
gives parameter p the same `ceil(numel/W)` slice of every rank's flat group, at one running offset over
the parameters in `param_shapes` order); a frozen one is reassembled from every rank's
`frozen_param_fragments`. `checkpoint_meta` and `checkpoint_table` give the training metadata and the
char table a checkpoint was trained against, also for checkpoints without `spellm_meta.json`.
"""

from __future__ import annotations

import math
import os
import re
from collections import OrderedDict
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
from torch import Tensor

from spellm_ds.errors import SpellmError
from spellm_ds.jsonio import read_json
from spellm_ds.train.checkpoint import CHARSET_NAME, CLIENT_KEY, LATEST, META_NAME, latest_checkpoint


def _safe_globals() -> list[Any]:
    """The non-tensor types a DeepSpeed checkpoint with RNG states holds; nothing else is unpickled."""
    import numpy as np

    allowed: list[Any] = [np.ndarray, np.dtype]
    try:
        from numpy._core.multiarray import _reconstruct
    except ImportError:  # numpy < 2
        from numpy.core.multiarray import _reconstruct  # type: ignore[no-redef]
    allowed.append(_reconstruct)
    allowed += [type(np.dtype(t)) for t in ("uint32", "int64", "float64", "float32", "bool")]
    from deepspeed.runtime.fp16.loss_scaler import DynamicLossScaler, LossScaler
    from deepspeed.runtime.zero.config import ZeroStageEnum

    return [*allowed, LossScaler, DynamicLossScaler, ZeroStageEnum]


def torch_load(path: Path) -> Any:
    """`torch.load(mmap=True, weights_only=True)` with the checkpoint allowlist; errors name the file."""
    try:
        with torch.serialization.safe_globals(_safe_globals()):
            return torch.load(str(path), map_location="cpu", mmap=True, weights_only=True)
    except FileNotFoundError:
        raise SpellmError(f"{path}: file does not exist") from None
    except (RuntimeError, OSError, EOFError, ValueError) as exc:
        first = str(exc).strip().splitlines()[0] if str(exc).strip() else type(exc).__name__
        raise SpellmError(f"{path}: cannot be loaded as a weights-only checkpoint file ({first})") from None


def natural_key(text: str) -> list[Any]:
    """Sort key that orders embedded numbers numerically (`rank_2` before `rank_10`)."""
    return [int(c) if c.isdigit() else c for c in re.split(r"(\d+)", text)]


def resolve_checkpoint(path: str | os.PathLike, tag: str | None = None) -> Path:
    """The directory holding the rank files: CK/TAG, the checkpoint `latest` names in CK, or CK itself."""
    p = Path(path)
    if not p.is_dir():
        raise SpellmError(f"checkpoint {p} is not a directory")
    if tag is not None:
        p = p / tag
    elif not any(p.glob("*_model_states.pt")) and (p / LATEST).is_file():
        p = latest_checkpoint(p) or p
    if not any(p.glob("*_model_states.pt")):
        raise SpellmError(f"{p} holds no DeepSpeed *_model_states.pt files (not a checkpoint tag directory)")
    return p


def _rank_files(root: Path, pattern: str) -> list[Path]:
    files = sorted(root.glob(pattern), key=lambda f: natural_key(f.name))
    ranks = [int(re.search(r"zero_pp_rank_(\d+)_", f.name).group(1)) for f in files]  # type: ignore[union-attr]
    if ranks != list(range(len(files))):
        raise SpellmError(f"{root}: {pattern} files are not ranks 0..{len(files) - 1} (found ranks {ranks})")
    return files


@dataclass
class ZeroCheckpoint:
    """A read-only view of one ZeRO-3 checkpoint tag directory: names, shapes, one tensor at a time."""

    path: Path
    world_size: int = 0
    trainable: OrderedDict[str, torch.Size] = field(default_factory=OrderedDict)
    frozen: OrderedDict[str, torch.Size] = field(default_factory=OrderedDict)
    shared: dict[str, str] = field(default_factory=dict)
    buffers: dict[str, Tensor] = field(default_factory=dict)
    client_state: dict[str, Any] = field(default_factory=dict)
    global_steps: int | None = None

    @classmethod
    def open(cls, path: str | os.PathLike, tag: str | None = None) -> ZeroCheckpoint:
        """Map every rank's files and check they form one complete ZeRO-3 checkpoint."""
        root = resolve_checkpoint(path, tag)
        model_files = _rank_files(root, "zero_pp_rank_*_mp_rank_00_model_states.pt")
        optim_files = _rank_files(root, "*zero_pp_rank_*_mp_rank_00_optim_states.pt")
        models = [torch_load(f) for f in model_files]
        optims = []
        for f in optim_files:
            state = torch_load(f)
            if not isinstance(state, dict) or "optimizer_state_dict" not in state:
                raise SpellmError(f"{f}: not a DeepSpeed optimizer state file")
            optims.append(state["optimizer_state_dict"])
        if not optims:
            raise SpellmError(f"{root}: no *_optim_states.pt files (an export needs the fp32 master weights)")
        stage = int(optims[0].get("zero_stage", -1))
        if stage != 3:
            raise SpellmError(f"{root}: ZeRO stage {stage} checkpoint; export reads ZeRO-3 checkpoints")
        world = int(optims[0]["partition_count"])
        if not len(models) == len(optims) == world:
            raise SpellmError(
                f"{root}: {len(models)} model-state and {len(optims)} optimizer files for world size {world} "
                "(an incomplete or overwritten checkpoint)"
            )
        m0 = models[0]
        ck = cls(path=root, world_size=world)
        for group in m0["param_shapes"]:
            ck.trainable.update(group)
        ck.frozen.update(m0.get("frozen_param_shapes") or {})
        ck.shared = dict(m0.get("shared_params") or {})
        ck.buffers = {
            k: v for k, v in (m0.get("module") or {}).items() if k in set(m0.get("buffer_names") or [])
        }
        ck.global_steps = m0.get("global_steps")
        ck.client_state = m0.get(CLIENT_KEY) or {}
        ck._frozen_frags = [m.get("frozen_param_fragments") or {} for m in models]
        ck._groups = [list(o["fp32_flat_groups"]) for o in optims]
        ck._locate()
        return ck

    def _locate(self) -> None:
        """Offsets of every trainable parameter in the (concatenated) per-rank flat groups."""
        w = self.world_size
        sizes = [int(g.numel()) for g in self._groups[0]]
        self._group_starts = [0]
        for s in sizes:
            self._group_starts.append(self._group_starts[-1] + s)
        self._offsets: dict[str, tuple[int, int]] = {}
        offset = 0
        for name, shape in self.trainable.items():
            part = math.ceil(math.prod(shape) / w)
            self._offsets[name] = (offset, part)
            offset += part
        if offset != self._group_starts[-1]:
            raise SpellmError(
                f"{self.path}: trainable parameters need {offset} elements per rank but the fp32 flat groups "
                f"hold {self._group_starts[-1]}: unknown partitioning, cannot export"
            )

    @property
    def has_frozen_fragments(self) -> bool:
        """Whether every frozen parameter is stored in the checkpoint."""
        return all(all(n in frags for n in self.frozen) for frags in self._frozen_frags)

    @property
    def frozen_dtype(self) -> torch.dtype | None:
        """The dtype frozen parameters are stored in (the training dtype), None when none are stored."""
        for frags in self._frozen_frags[:1]:
            for t in frags.values():
                return t.dtype
        return None

    def _rank_slice(self, rank: int, offset: int, length: int) -> Tensor:
        pieces = []
        for gi, start in enumerate(self._group_starts[:-1]):
            end = self._group_starts[gi + 1]
            lo, hi = max(offset, start), min(offset + length, end)
            if lo < hi:
                pieces.append(self._groups[rank][gi][lo - start : hi - start])
        return pieces[0] if len(pieces) == 1 else torch.cat(pieces)

    def tensor(self, name: str) -> Tensor:
        """The full tensor `name` (module name, e.g. `base.model.norm.weight`) reassembled from all ranks."""
        if name in self.trainable:
            shape = self.trainable[name]
            offset, part = self._offsets[name]
            flat = torch.cat([self._rank_slice(r, offset, part) for r in range(self.world_size)])
        elif name in self.frozen:
            shape = self.frozen[name]
            frags = [f.get(name) for f in self._frozen_frags]
            if any(f is None for f in frags):
                raise KeyError(name)
            flat = torch.cat([f.reshape(-1) for f in frags])
        else:
            raise KeyError(name)
        return flat[: math.prod(shape)].view(shape)  # `flat` is a fresh tensor (torch.cat), not the map


def checkpoint_meta(ck: ZeroCheckpoint) -> dict[str, Any]:
    """Training metadata: `spellm_meta.json` beside the checkpoint, else the client state it holds."""
    path = ck.path / META_NAME
    if path.is_file():
        meta = read_json(path, "checkpoint metadata")
    else:
        cs = ck.client_state
        cfg = cs.get("config") or {}
        meta = {
            "step": (cs.get("state") or {}).get("step", ck.global_steps),
            "charset_hash": cs.get("charset_hash"),
            "tokenizer_hash": cs.get("tokenizer_hash"),
            "model_path": (cfg.get("model") or {}).get("path"),
            "k": (cfg.get("model") or {}).get("k"),
            "config": cfg,
        }
    if meta.get("step") is None:
        meta["step"] = ck.global_steps
    return meta


def checkpoint_table(
    ck: ZeroCheckpoint, meta: dict[str, Any], tokenizer: Any, vocab_size: int | None, k: int
) -> Any:
    """The CharTable a checkpoint was trained against, its hash checked against the metadata.

    The checkpoint's own `charset.json`; for a checkpoint without one, the charset file its config named,
    else the table rebuilt from the tokenizer."""
    from spellm_ds.charset import CharTable

    want = meta.get("charset_hash")
    if (ck.path / CHARSET_NAME).is_file():
        return CharTable.load(ck.path / CHARSET_NAME, expected_hash=want)
    charset_file = ((meta.get("config") or {}).get("model") or {}).get("charset")
    if charset_file:
        return CharTable.load(charset_file, expected_hash=want)
    table = CharTable.build(tokenizer, k=k, vocab_size=vocab_size or len(tokenizer))
    if want and table.hash != want:
        table_small = CharTable.build(tokenizer, k=k)
        if table_small.hash == want:
            return table_small
        raise SpellmError(
            f"the char table rebuilt from the tokenizer (k={k}) hashes to {table.hash[:12]}..., checkpoint "
            f"was trained with {want[:12]}...: tokenizer or charset changed since training"
        )
    return table
