"""One view of the launch environment: rank, world size and local rank from any launcher.

Supported, in order of precedence: torchrun / the `deepspeed` launcher (RANK, WORLD_SIZE, LOCAL_RANK),
Open MPI (OMPI_COMM_WORLD_*), MPICH / Intel MPI (PMI_RANK, PMI_SIZE), SLURM tasks (SLURM_PROCID,
SLURM_NTASKS, SLURM_LOCALID). No MPI library is needed for any of them. A SLURM array job is a
separate concern (`array_task()`): each array task is an independent world of its own.

Topology checks for ZeRO++ hpZ: `check_hpz_fits_node` refuses a secondary partition that cannot stay
inside one node before anything starts, and `hpz_layout` reads the groups DeepSpeed built (ranks and
hosts) and refuses one that spans hosts.
"""

from __future__ import annotations

import contextlib
import logging
import os
import socket
import subprocess
import sys
from dataclasses import dataclass
from typing import Any, NoReturn

from spellm_ds.errors import SpellmError

DEFAULT_PORT = 29500


@dataclass(frozen=True, kw_only=True)
class RankInfo:
    """Where this process sits in the job."""

    rank: int
    world_size: int
    local_rank: int
    local_world_size: int
    master_addr: str
    master_port: int
    launcher: str

    @property
    def is_main(self) -> bool:
        """True on global rank 0."""
        return self.rank == 0


def _int(env: dict[str, str], name: str) -> int:
    try:
        return int(env[name])
    except ValueError:
        raise SpellmError(f"environment variable {name}={env[name]!r} is not an integer") from None


def _slurm_master(env: dict[str, str]) -> str:
    nodelist = env.get("SLURM_JOB_NODELIST") or env.get("SLURM_NODELIST")
    if not nodelist:
        return "127.0.0.1"
    try:
        out = subprocess.run(
            ["scontrol", "show", "hostnames", nodelist],
            capture_output=True,
            text=True,
            check=True,
            timeout=30,
        ).stdout.split()
        return out[0] if out else "127.0.0.1"
    except (OSError, subprocess.SubprocessError):
        return nodelist.split(",")[0]


def detect(env: dict[str, str] | None = None) -> RankInfo:
    """Map the launcher's environment variables to one `RankInfo` (a single process when none is set)."""
    env = dict(os.environ if env is None else env)
    port = _int(env, "MASTER_PORT") if "MASTER_PORT" in env else DEFAULT_PORT
    if "RANK" in env and "WORLD_SIZE" in env:
        rank, world = _int(env, "RANK"), _int(env, "WORLD_SIZE")
        local = _int(env, "LOCAL_RANK") if "LOCAL_RANK" in env else 0
        local_world = _int(env, "LOCAL_WORLD_SIZE") if "LOCAL_WORLD_SIZE" in env else world
        launcher = "torchrun"
        addr = env.get("MASTER_ADDR", "127.0.0.1")
    elif "OMPI_COMM_WORLD_RANK" in env:
        rank, world = _int(env, "OMPI_COMM_WORLD_RANK"), _int(env, "OMPI_COMM_WORLD_SIZE")
        local = _int(env, "OMPI_COMM_WORLD_LOCAL_RANK")
        local_world = _int(env, "OMPI_COMM_WORLD_LOCAL_SIZE")
        launcher = "mpirun"
        addr = env.get("MASTER_ADDR", "127.0.0.1")
    elif "PMI_RANK" in env and "PMI_SIZE" in env:
        rank, world = _int(env, "PMI_RANK"), _int(env, "PMI_SIZE")
        local = _int(env, "MPI_LOCALRANKID") if "MPI_LOCALRANKID" in env else 0
        local_world = _int(env, "MPI_LOCALNRANKS") if "MPI_LOCALNRANKS" in env else world
        launcher = "mpich"
        addr = env.get("MASTER_ADDR", "127.0.0.1")
    elif "SLURM_PROCID" in env and "SLURM_NTASKS" in env and "SLURM_STEP_ID" in env:
        rank, world = _int(env, "SLURM_PROCID"), _int(env, "SLURM_NTASKS")
        local = _int(env, "SLURM_LOCALID") if "SLURM_LOCALID" in env else 0
        tasks_per_node = env.get("SLURM_NTASKS_PER_NODE", "").split("(")[0]
        local_world = int(tasks_per_node) if tasks_per_node.isdigit() else world
        launcher = "srun"
        addr = env.get("MASTER_ADDR") or _slurm_master(env)
    else:
        rank, world, local, local_world, launcher = 0, 1, 0, 1, "single"
        addr = env.get("MASTER_ADDR", "127.0.0.1")
    if world < 1 or not 0 <= rank < world:
        raise SpellmError(f"rank {rank} is outside world size {world} (launcher {launcher})")
    return RankInfo(
        rank=rank,
        world_size=world,
        local_rank=local,
        local_world_size=local_world,
        master_addr=addr,
        master_port=port,
        launcher=launcher,
    )


def array_task(env: dict[str, str] | None = None) -> tuple[int, int]:
    """Return (task index, task count) of a SLURM array job counted from 0, or (0, 1) outside one."""
    env = dict(os.environ if env is None else env)
    if "SLURM_ARRAY_TASK_ID" not in env:
        return 0, 1
    task = _int(env, "SLURM_ARRAY_TASK_ID") - (
        _int(env, "SLURM_ARRAY_TASK_MIN") if "SLURM_ARRAY_TASK_MIN" in env else 0
    )
    count = _int(env, "SLURM_ARRAY_TASK_COUNT") if "SLURM_ARRAY_TASK_COUNT" in env else 1
    return task, count


def export_torch_env(info: RankInfo) -> None:
    """Set RANK/WORLD_SIZE/LOCAL_RANK/MASTER_ADDR/MASTER_PORT so torch.distributed's env:// init works."""
    os.environ.update(
        RANK=str(info.rank),
        WORLD_SIZE=str(info.world_size),
        LOCAL_RANK=str(info.local_rank),
        LOCAL_WORLD_SIZE=str(info.local_world_size),
        MASTER_ADDR=info.master_addr,
        MASTER_PORT=str(info.master_port),
    )


def device_and_backend(info: RankInfo) -> tuple[str, str]:
    """Return ("cuda:<local_rank>", "nccl") when CUDA is usable, else ("cpu", "gloo")."""
    import torch

    if torch.cuda.is_available() and os.environ.get("DS_ACCELERATOR", "cuda") != "cpu":
        return f"cuda:{info.local_rank % torch.cuda.device_count()}", "nccl"
    return "cpu", "gloo"


def default_device(device: str | None = None) -> str:
    """Return `device`, or cuda when one is present and cpu otherwise (single-process inference)."""
    import torch

    return device or ("cuda" if torch.cuda.is_available() else "cpu")


def check_hpz_fits_node(ds_path: str, ds_config: dict[str, Any], ranks_per_node: int) -> None:
    """Refuse a ZeRO++ hpZ partition that cannot stay inside one node (it would gather across nodes)."""
    hpz = int(ds_config.get("zero_optimization", {}).get("zero_hpz_partition_size", 1) or 1)
    if hpz > 1 and ranks_per_node % hpz:
        raise SpellmError(
            f"{ds_path}: zero_optimization.zero_hpz_partition_size is {hpz}, but this job runs "
            f"{ranks_per_node} rank(s) per node; the secondary partition must stay inside a node: set it "
            f"to the ranks per node (--ntasks-per-node) or a divisor of it"
        )


def hpz_layout() -> list[tuple[list[int], list[str]]]:
    """Collective: the ranks and hosts of every hpZ secondary-partition group DeepSpeed built ([] if off).

    DeepSpeed groups consecutive ranks; a group whose ranks sit on different hosts would pull the
    frozen weights across nodes at every forward, so that is an error (rank placement not in blocks).
    """
    import deepspeed.comm as dist
    from deepspeed.utils import groups

    group = getattr(groups, "_ZERO_PARAM_INTRA_PARALLEL_GROUP", None)
    mine = sorted(dist.get_all_ranks_from_group(group)) if group is not None else []
    gathered: list[Any] = [None] * dist.get_world_size()
    dist.all_gather_object(gathered, (mine, socket.gethostname()))
    if not any(ranks for ranks, _ in gathered):
        return []
    layout = []
    for ranks in sorted({tuple(r) for r, _ in gathered}):
        layout.append((list(ranks), [gathered[r][1] for r in ranks]))
    spanning = [f"ranks {list(r)} on {sorted(set(h))}" for r, h in layout if len(set(h)) > 1]
    if spanning:
        raise SpellmError(
            "ZeRO++ hpZ secondary partitions span nodes (" + "; ".join(spanning) + "): launch ranks in "
            "blocks per node (srun --distribution=block) with zero_hpz_partition_size = ranks per node"
        )
    return layout


_LEFT_A_GROUP = False  # set once this process has left a process group


def leave_process_group(clean: bool) -> None:
    """Leave the process group if one was joined; after a clean end wait for every rank first.

    Leaving explicitly matters on errors too: a group still alive at interpreter exit has aborted a rank
    (SIGABRT, exit 134) instead of letting it exit with the error's code 2.
    """
    global _LEFT_A_GROUP
    tdist = sys.modules.get("torch.distributed")  # never imported: no group to leave
    if tdist is None or not (tdist.is_available() and tdist.is_initialized()):
        return
    if clean:  # after an error on one rank the others may sit in a collective: do not wait for them
        tdist.barrier()
    tdist.destroy_process_group()
    _LEFT_A_GROUP = True


def exit_process(code: int) -> NoReturn:
    """End the process with `code`; without interpreter teardown once it has left a process group.

    DeepSpeed keeps references to the gloo group after it is destroyed, so the group's object would
    otherwise be freed during interpreter finalization, and that has aborted a rank (SIGABRT, exit 134)
    after its work was done and saved.
    """
    if _LEFT_A_GROUP:
        exit_without_teardown(code)
    sys.exit(code)


def exit_without_teardown(code: int) -> NoReturn:
    """Flush logs and standard streams, then end the process with `code`, skipping interpreter teardown."""
    logging.shutdown()
    for stream in (sys.stdout, sys.stderr):
        with contextlib.suppress(OSError, ValueError):  # a closed or broken stream: nothing to flush
            stream.flush()
    os._exit(code)
