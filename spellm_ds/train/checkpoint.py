"""The checkpoint layout, owned here: tags, `latest`, metadata, pruning, saving and loading (collective).

A run's checkpoint directory holds one directory per saved optimizer step, `step_NNNNNNNN/`, with

    zero_pp_rank_R_mp_rank_00_model_states.pt      DeepSpeed's per-rank module state; its client state
    *zero_pp_rank_R_mp_rank_00_optim_states.pt     (key `spellm`) holds the step counters, the merged
                                                   data-loader state, every rank's RNG state, the
                                                   resolved config, the charset and tokenizer hashes
    spellm_meta.json                               the same facts for readers without torch
    charset.json                                   the exact char table trained against

and beside them `latest` (the tag of the newest complete checkpoint) and `universal/<tag>/` (DeepSpeed's
universal format of a tag, made once when a run resumes at another world size).

A checkpoint is complete or invisible. DeepSpeed writes its own `latest` as soon as rank 0's files are
written, before the other ranks are known to be done (deepspeed/runtime/engine.py, `save_checkpoint`),
so `save_checkpoint` here passes `save_latest=False`, waits for the barrier that ends DeepSpeed's save on
every rank, and only then writes `spellm_meta.json` and `latest` atomically (`spellm_ds.jsonio`).
`latest_checkpoint` accepts only what `latest` names when that directory has its metadata, so a crash at
any point leaves the previous checkpoint as the one resumed. Pruning keeps the newest `keep` complete
checkpoints and removes leftovers of crashed saves.

Reading a tag directory without a process group (export's input) is `spellm_ds.train.zero_files`.
"""

from __future__ import annotations

import contextlib
import os
import random
import re
import shutil
import socket
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

import numpy as np
import torch

from spellm_ds.errors import EveryRankError, SpellmError
from spellm_ds.jsonio import read_json, write_json, write_text

LATEST = "latest"
META_NAME = "spellm_meta.json"
CHARSET_NAME = "charset.json"
UNIVERSAL_DIR = "universal"
CLIENT_KEY = "spellm"  # the trainer's entry in DeepSpeed's client state
_TAG_RE = re.compile(r"^step_(\d{8})$")


def tag_for(step: int) -> str:
    """Return the checkpoint tag (directory name) of optimizer step `step`."""
    return f"step_{step:08d}"


def tag_step(tag: str) -> int | None:
    """The step of a checkpoint tag (`step_NNNNNNNN`), None for any other name."""
    m = _TAG_RE.match(tag)
    return int(m.group(1)) if m else None


# ---------------------------------------------------------------------------------------------------
# Discovery and metadata (no process group needed)


def latest_checkpoint(checkpoint_dir: str | os.PathLike) -> Path | None:
    """Return the newest complete checkpoint directory (the one `latest` names), or None."""
    root = Path(checkpoint_dir)
    marker = root / LATEST
    if not marker.is_file():
        return None
    tag = marker.read_text(encoding="utf-8").strip()
    path = root / tag
    if not _TAG_RE.match(tag) or not (path / META_NAME).is_file():
        raise SpellmError(f"{marker} names {tag!r}, which is not a complete checkpoint in {root}")
    return path


def read_meta(checkpoint: str | os.PathLike) -> dict[str, Any]:
    """Read `spellm_meta.json` of one checkpoint directory."""
    return read_json(
        Path(checkpoint) / META_NAME,
        "checkpoint metadata",
        required=("step", "world_size"),
        missing_hint=f"{checkpoint} is not a complete spellm-ds checkpoint (no {META_NAME})",
    )


def resume_target(checkpoint_dir: Path, resume: str) -> Path | None:
    """The checkpoint to resume from; refuses to start where saves would overwrite newer checkpoints."""
    newest = latest_checkpoint(checkpoint_dir)
    if resume == "auto":
        return newest
    path = None if resume == "never" else Path(resume)
    start = 0 if path is None else int(read_meta(path)["step"])
    if newest is not None and int(read_meta(newest)["step"]) > start:
        raise SpellmError(
            f"checkpoint.resume={resume} starts at step {start}, but {checkpoint_dir} "
            f"already holds {newest.name}, which this run would overwrite: use another checkpoint.dir "
            "(or run_dir), resume: auto, or delete those checkpoints"
        )
    return path


def prune_checkpoints(root: str | os.PathLike, keep: int) -> list[str]:
    """Delete all but the newest `keep` complete checkpoints (0 keeps all) and partial ones; return tags."""
    root = Path(root)
    current = latest_checkpoint(root)
    if current is None:
        return []
    newest = int(_TAG_RE.match(current.name).group(1))
    tags = sorted((int(m.group(1)), p) for p in root.iterdir() if p.is_dir() and (m := _TAG_RE.match(p.name)))
    complete = [(s, p) for s, p in tags if s <= newest and (p / META_NAME).is_file()]
    keep_set = {p for _, p in (complete[-keep:] if keep else complete)} | {current}
    removed = []
    for _, p in tags:
        if p not in keep_set:
            shutil.rmtree(p, ignore_errors=True)
            shutil.rmtree(root / UNIVERSAL_DIR / p.name, ignore_errors=True)
            removed.append(p.name)
    return removed


# ---------------------------------------------------------------------------------------------------
# Saving and loading through the engine (collective)


def check_writable_everywhere(directory: Path, rank: int) -> None:
    """Collective: raise on every rank unless every rank can create a file in `directory`.

    Checkpoints are written by all ranks into one shared directory; a node that sees it read-only (or
    as a node-local path that does not exist) would otherwise fail only at the first save, hours in.
    """
    import torch.distributed as dist

    if rank == 0:
        with contextlib.suppress(OSError):  # reported below, with every other rank's view
            directory.mkdir(parents=True, exist_ok=True)
    dist.barrier()
    probe = directory / f".write-probe-{socket.gethostname()}-{rank}"
    try:
        probe.write_bytes(b"")
        probe.unlink()
        problem = ""
    except OSError as exc:
        problem = f"rank {rank} on {socket.gethostname()}: {exc.strerror or exc}"
    problems: list[Any] = [None] * dist.get_world_size()
    dist.all_gather_object(problems, problem)
    bad = [p for p in problems if p]
    if bad:
        raise EveryRankError(
            f"checkpoint directory {directory} is not writable from every rank ({'; '.join(bad)}); "
            "checkpoint.dir must be one shared path that every node can write"
        )


def rng_state() -> dict[str, Any]:
    """This process's Python, numpy, torch (and CUDA) RNG states."""
    state = {
        "python": random.getstate(),
        "numpy": np.random.get_state(),
        "torch": torch.get_rng_state(),
    }
    if torch.cuda.is_available():
        state["cuda"] = torch.cuda.get_rng_state()
    return state


def set_rng_state(state: dict[str, Any]) -> None:
    """Restore RNG states saved by `rng_state`."""
    random.setstate(state["python"])
    np.random.set_state(state["numpy"])
    torch.set_rng_state(state["torch"])
    if "cuda" in state and torch.cuda.is_available():
        torch.cuda.set_rng_state(state["cuda"])


def save_checkpoint(
    engine: Any,
    root: Path,
    step: int,
    *,
    client: dict[str, Any],
    meta: dict[str, Any],
    table: Any,
    keep: int,
    rank: int,
    world_size: int,
) -> str:
    """Collective: write checkpoint `step_<step>` on every rank, mark it complete, prune; return its tag.

    `client` (plus every rank's RNG state) goes into DeepSpeed's client state, `meta` (plus tag, step and
    world size) into `spellm_meta.json`, `table` into `charset.json`."""
    import torch.distributed as dist

    tag = tag_for(step)
    if rank == 0:
        root.mkdir(parents=True, exist_ok=True)
        if (root / tag).exists():  # leftovers of a crashed save of the same step
            shutil.rmtree(root / tag)
    rngs: list[Any] = [None] * world_size
    dist.all_gather_object(rngs, rng_state())
    state = {CLIENT_KEY: {**client, "rng": rngs, "world_size": world_size}}
    try:
        engine.save_checkpoint(str(root), tag=tag, client_state=state, save_latest=False)
    except OSError as exc:  # the other ranks fail in the barrier that ends save_checkpoint; `latest` stays
        raise SpellmError(
            f"writing checkpoint {root / tag} failed on rank {rank} ({socket.gethostname()}): {exc}"
        ) from exc
    # save_checkpoint ends with a barrier: every rank's files are written when rank 0 gets here.
    if rank == 0:
        table.save(root / tag / CHARSET_NAME)
        info = {**meta, "tag": tag, "step": step, "world_size": world_size, "time": time.time()}
        write_json(root / tag / META_NAME, info)
        write_text(root / LATEST, tag)
        prune_checkpoints(root, keep)
    dist.barrier()
    return tag


def load_checkpoint(
    engine: Any, checkpoint: Path, *, universal_root: Path | None, rank: int, charset_hash: str
) -> dict[str, Any]:
    """Collective: load `checkpoint` into the engine; return the trainer's saved client state.

    `universal_root` set: the run has another world size, so the checkpoint is converted once into
    `universal_root/<tag>` and loaded from there (RNG states then restart from the seed); otherwise
    each rank's RNG state is restored."""
    load_root = (
        checkpoint.parent if universal_root is None else to_universal(checkpoint, universal_root, rank)
    )
    path, client = engine.load_checkpoint(str(load_root), tag=checkpoint.name)
    if path is None or not client or CLIENT_KEY not in client:
        raise SpellmError(f"could not load checkpoint {checkpoint}")
    saved = client[CLIENT_KEY]
    if saved["charset_hash"] != charset_hash:
        raise SpellmError(
            f"checkpoint {checkpoint} was trained with charset {saved['charset_hash'][:12]}..., "
            f"this run uses {charset_hash[:12]}... (model.charset / model.k changed?)"
        )
    if universal_root is not None:
        unshare_step_counters(engine)
    else:
        set_rng_state(saved["rng"][rank])
    return saved


def to_universal(checkpoint: Path, out_root: Path, rank: int) -> Path:
    """Collective: rank 0 converts `checkpoint` to DeepSpeed's universal format once; return `out_root`."""
    import torch.distributed as dist

    out = out_root / checkpoint.name
    done = out / ".complete"
    if rank == 0 and not done.is_file():
        shutil.rmtree(out, ignore_errors=True)
        out_root.mkdir(parents=True, exist_ok=True)
        cmd = [
            sys.executable,
            "-m",
            "deepspeed.checkpoint.ds_to_universal",
            "--input_folder",
            str(checkpoint),
            "--output_folder",
            str(out),
            "--num_extract_workers",
            "1",
            "--num_merge_workers",
            "1",
        ]
        proc = subprocess.run(cmd, capture_output=True, text=True, check=False)
        if proc.returncode != 0:
            raise SpellmError(
                f"converting {checkpoint} to a universal checkpoint failed:\n{proc.stdout[-2000:]}"
                f"{proc.stderr[-2000:]}"
            )
        write_text(done, checkpoint.name)
    dist.barrier()
    return out_root


def unshare_step_counters(engine: Any) -> None:
    """Give every optimizer group its own Adam step tensor after a universal load.

    DeepSpeed's universal ZeRO-3 load assigns one step tensor object to every group's state; torch's Adam
    increments it in place once per group, so with two groups the count (and the bias correction) would
    advance twice per step.
    """
    inner = getattr(engine.optimizer, "optimizer", engine.optimizer)
    for state in inner.state.values():
        step = state.get("step")
        if isinstance(step, torch.Tensor):
            state["step"] = step.clone()
