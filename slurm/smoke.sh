#!/usr/bin/env bash
# Smoke test of the launch path before a long job: one task per GPU on every node, each rank maps the
# SLURM variables to its rank (spellm_ds.dist.detect), joins one process group over the same
# MASTER_ADDR/MASTER_PORT rendezvous as distill_70b.sh and all-reduces a tensor (NCCL on GPUs, gloo
# on CPU). Every rank prints one line; rank 0 prints the sum it expects and the one it got.
#
#   mkdir -p logs && sbatch slurm/smoke.sh                 # 4 nodes x 8 GPUs, a minute at most
#   sbatch -N 1 --ntasks-per-node=2 --gpus-per-node=0 slurm/smoke.sh   # CPU only, gloo

#SBATCH --job-name=spellm-smoke
#SBATCH --nodes=4
#SBATCH --ntasks-per-node=8
#SBATCH --gpus-per-node=8
#SBATCH --cpus-per-task=1
#SBATCH --time=00:10:00
#SBATCH --output=logs/%x-%j.out

set -euo pipefail

REPO=${REPO:-${SLURM_SUBMIT_DIR:-$PWD}}
NODES=${NODES:-${SLURM_JOB_NUM_NODES:-1}}
GPUS_PER_NODE=${GPUS_PER_NODE:-${SLURM_NTASKS_PER_NODE:-8}}
VENV=${VENV:-$REPO/.venv}
PYTHON=${PYTHON:-$VENV/bin/python}

MASTER_ADDR=${MASTER_ADDR:-$(scontrol show hostnames "$SLURM_JOB_NODELIST" | head -n 1)}
MASTER_PORT=${MASTER_PORT:-$((20000 + SLURM_JOB_ID % 40000))}
export MASTER_ADDR MASTER_PORT
export NCCL_DEBUG=${NCCL_DEBUG:-WARN}

cd "$REPO"
echo "[smoke] job ${SLURM_JOB_ID}: ${NODES} node(s) x ${GPUS_PER_NODE} task(s), rendezvous ${MASTER_ADDR}:${MASTER_PORT}"
srun --nodes="$NODES" --ntasks-per-node="$GPUS_PER_NODE" --cpus-per-task="${SLURM_CPUS_PER_TASK:-1}" \
  --kill-on-bad-exit=1 "$PYTHON" -c '
import socket
from datetime import timedelta

import torch
import torch.distributed as dist

from spellm_ds.dist import detect, device_and_backend, export_torch_env

info = detect()
export_torch_env(info)
device, backend = device_and_backend(info)
if device.startswith("cuda"):
    torch.cuda.set_device(device)
dist.init_process_group(backend, timeout=timedelta(minutes=5))
x = torch.tensor([float(info.rank + 1)], device=device)
dist.all_reduce(x)
print(f"[smoke] rank {info.rank}/{info.world_size} local {info.local_rank}/{info.local_world_size} "
      f"launcher {info.launcher} host {socket.gethostname()} device {device} backend {backend}", flush=True)
if info.is_main:
    want = info.world_size * (info.world_size + 1) / 2
    verdict = "OK" if x.item() == want else "WRONG"
    print(f"[smoke] all_reduce sum {x.item():g}, expected {want:g}: {verdict}", flush=True)
dist.destroy_process_group()
'
