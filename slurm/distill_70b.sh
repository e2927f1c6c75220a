#!/usr/bin/env bash
# Distil an HF causal LM into SpeLLM char heads with DeepSpeed ZeRO-3 on N nodes x G GPUs.
#
#   mkdir -p logs && sbatch slurm/distill_70b.sh                    # Llama-3-70B recipe, 4 nodes x 8 GPUs
#   sbatch -N 8 slurm/distill_70b.sh                                # same recipe on 8 nodes
#   CONFIG=configs/llama3_8b.yaml sbatch -N 1 slurm/distill_70b.sh  # another recipe
#   EXTRA="optim.lr=3e-5 max_steps=2000" sbatch slurm/distill_70b.sh
#   EXTRA="teacher=online data.train=data/llama3_70b/tokens" sbatch slurm/distill_70b.sh  # no teacher shards
#
# Submit from the repository root (or set REPO). Every tunable below is an environment variable with a
# default; sbatch exports the submitting shell's environment to the job. Options on the sbatch command
# line (-N, --ntasks-per-node, --time, ...) override the #SBATCH header.
#
# One task per GPU: --ntasks-per-node equals the GPUs per node and srun starts every rank itself. Each
# rank maps SLURM_PROCID / SLURM_NTASKS / SLURM_LOCALID to rank / world size / local rank
# (spellm_ds.dist.detect), so there is no torchrun or deepspeed launcher and no MPI between SLURM and
# the ranks: SLURM sees, signals and accounts every rank, and rank placement follows the allocation.
#
# Preemption and time limits: SLURM sends USR1 to this batch shell 600 s before the time limit
# (--signal=B:USR1@600; `scancel --signal=USR1 --batch JOBID` does the same by hand). The trap
# forwards it to srun, which forwards it to every rank. The trainer checkpoints at the next step
# boundary on all ranks and exits with EXIT_INTERRUPTED below; the script then requeues the job
# (`scontrol requeue`), and the requeued job continues from the newest complete checkpoint
# (checkpoint.resume=auto). Any other exit code is a real failure and is not requeued. A TERM (scancel,
# or preemption, where SLURM requeues by itself) is forwarded too but never triggers a requeue here.
#
# Node failure: SLURM cancels the job and requeues it (--requeue) with its original node count, so it
# waits for the dead node. To go on without it, shrink the pending job to the surviving nodes (node
# count, tasks = nodes x tasks per node, CPUs = tasks x cpus-per-task), e.g. 3 of 4 nodes:
#   scontrol update JobId=JOBID NumNodes=3 NumTasks=24 NumCPUs=192
# or scancel it and submit again with -N 3. Either way the training step resumes from the newest
# complete checkpoint at the new world size (converted once to DeepSpeed's universal format).

#SBATCH --job-name=spellm-distill
#SBATCH --nodes=4
#SBATCH --ntasks-per-node=8
#SBATCH --gpus-per-node=8
#SBATCH --cpus-per-task=8
#SBATCH --mem=0
#SBATCH --exclusive
#SBATCH --time=24:00:00
#SBATCH --signal=B:USR1@600
#SBATCH --requeue
#SBATCH --open-mode=append
#SBATCH --output=logs/%x-%j.out

set -euo pipefail

# ---- tunables ------------------------------------------------------------------------------------
REPO=${REPO:-${SLURM_SUBMIT_DIR:-$PWD}}           # repository root (paths in CONFIG are relative to it)
CONFIG=${CONFIG:-configs/llama3_70b.yaml}         # run config
NODES=${NODES:-${SLURM_JOB_NUM_NODES:-1}}         # nodes used by the training step
GPUS_PER_NODE=${GPUS_PER_NODE:-${SLURM_NTASKS_PER_NODE:-8}}  # ranks (= GPUs) per node
VENV=${VENV:-$REPO/.venv}                         # Python environment with spellm-ds installed
PYTHON=${PYTHON:-$VENV/bin/python}
RESUME=${RESUME:-auto}                            # checkpoint.resume: auto | never | <checkpoint dir>
EXTRA=${EXTRA:-}                                  # more key=value config overrides, space separated
MAX_RESTARTS=${MAX_RESTARTS:-50}                  # stop requeueing after this many restarts
TASK_EXIT_WAIT=${TASK_EXIT_WAIT:-300}             # s to wait for the other ranks once one has exited
                                                  # (> the time SLURM takes to declare a dead node DOWN)
LOG_VERSIONS=${LOG_VERSIONS:-1}                   # 1: log torch env + pip freeze at the first start
EXIT_INTERRUPTED=75                               # = spellm_ds.train.loop.EXIT_INTERRUPTED

# ---- rendezvous: rank 0 runs on the first node; the port follows from the job id -----------------
MASTER_ADDR=${MASTER_ADDR:-$(scontrol show hostnames "$SLURM_JOB_NODELIST" | head -n 1)}
MASTER_PORT=${MASTER_PORT:-$((20000 + SLURM_JOB_ID % 40000))}
export MASTER_ADDR MASTER_PORT
export OMP_NUM_THREADS=${OMP_NUM_THREADS:-${SLURM_CPUS_PER_TASK:-1}}

# ---- NCCL over InfiniBand: overridable defaults; the commented lines are site-specific examples ---
export NCCL_IB_DISABLE=${NCCL_IB_DISABLE:-0}      # use IB/RoCE verbs for inter-node traffic
export NCCL_DEBUG=${NCCL_DEBUG:-WARN}             # INFO once to see which transports NCCL picked
export NCCL_IB_TIMEOUT=${NCCL_IB_TIMEOUT:-22}     # tolerate short fabric hiccups on large clusters
export TORCH_NCCL_ASYNC_ERROR_HANDLING=${TORCH_NCCL_ASYNC_ERROR_HANDLING:-1}  # a dead peer fails the step
# export NCCL_IB_HCA=mlx5_0,mlx5_1,mlx5_2,mlx5_3  # only the compute HCAs (skip storage/ethernet ports)
# export NCCL_SOCKET_IFNAME=ib0                   # bootstrap interface (never lo or docker0)
# export NCCL_IB_GID_INDEX=3                      # RoCE v2 fabrics
# export NCCL_NET_GDR_LEVEL=PHB                   # GPUDirect RDMA when NIC and GPU share a PCIe switch

# ---- signals: USR1 (time limit near) and TERM go to every rank; installed before anything slow ------
srun_pid=""
got_signal=""
# shellcheck disable=SC2317  # invoked by the traps below
forward() {
  got_signal=$1
  echo "[distill] received SIG$1: forwarding to every rank (checkpoint at the next step boundary)"
  if [[ -n $srun_pid ]]; then kill -s "$1" "$srun_pid" 2>/dev/null || true; fi
}
trap 'forward USR1' USR1
trap 'forward TERM' TERM

cd "$REPO"
restarts=${SLURM_RESTART_COUNT:-0}
echo "[distill] job ${SLURM_JOB_ID} restart ${restarts} on ${SLURM_JOB_NODELIST}: ${NODES} node(s) x" \
  "${GPUS_PER_NODE} task(s), rendezvous ${MASTER_ADDR}:${MASTER_PORT}, config ${CONFIG}, $(date -Is)"
echo "[distill] git $(git rev-parse --short HEAD 2>/dev/null || echo unknown), $(srun --version)," \
  "$("$PYTHON" -c 'import platform; print("python", platform.python_version())')"
if [[ $LOG_VERSIONS == 1 && $restarts == 0 ]]; then
  "$PYTHON" -m torch.utils.collect_env 2>&1 || echo "[distill] torch.utils.collect_env failed"
  "$PYTHON" -m pip freeze 2>/dev/null || echo "[distill] pip freeze failed"
fi

if [[ -n $got_signal ]]; then  # signalled before training started: nothing to save
  echo "[distill] SIG${got_signal} before the training step started"
  if [[ $got_signal == USR1 ]]; then scontrol requeue "$SLURM_JOB_ID"; fi
  exit 0
fi
read -r -a overrides <<<"$EXTRA"
# --ntasks explicitly: the job environment keeps the task count of the submission (SLURM_NTASKS), which
# is stale once the job was shrunk with `scontrol update` after a node failure (see slurm/README.md)
srun --nodes="$NODES" --ntasks="$((NODES * GPUS_PER_NODE))" --ntasks-per-node="$GPUS_PER_NODE" \
  --cpus-per-task="${SLURM_CPUS_PER_TASK:-1}" --kill-on-bad-exit=0 --wait="$TASK_EXIT_WAIT" \
  "$PYTHON" -m spellm_ds.cli train --config "$CONFIG" "checkpoint.resume=$RESUME" "${overrides[@]}" &
srun_pid=$!

# A trapped signal interrupts `wait` (status > 128) while srun keeps running: wait again until it exits.
rc=0
while :; do
  wait "$srun_pid" && rc=0 || rc=$?
  kill -0 "$srun_pid" 2>/dev/null || break
done
echo "[distill] training step exited with code ${rc} at $(date -Is)"

if [[ $rc -eq $EXIT_INTERRUPTED && $got_signal != TERM ]]; then
  if ((restarts >= MAX_RESTARTS)); then
    echo "[distill] interrupted, but already restarted ${restarts} times (MAX_RESTARTS): not requeueing"
    exit "$rc"
  fi
  echo "[distill] interrupted after a complete checkpoint: requeueing job ${SLURM_JOB_ID}"
  if ! scontrol requeue "$SLURM_JOB_ID"; then
    echo "[distill] scontrol requeue failed: resubmit the same job to resume"
    exit "$rc"
  fi
  exit 0
fi
exit "$rc"
