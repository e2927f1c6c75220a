#!/usr/bin/env bash
# Export a ZeRO-3 training checkpoint to an inference directory (HF safetensors + char heads + charset).
#
#   mkdir -p logs && CHECKPOINT=runs/llama3_70b/checkpoints OUTPUT=exports/llama3_70b sbatch slurm/export.sh
#   DELTA=1 CHECKPOINT=... OUTPUT=exports/llama3_70b-delta sbatch slurm/export.sh   # heads + trained MLPs only
#
# One node. The export reads the checkpoint files directly (no process group, no model in memory) and
# splits the output safetensors shards over the tasks: with 8 tasks each writes every 8th shard and
# holds about two copies of one tensor at a time (the 128,256 x 8,192 embedding: ~4 GB), so a 70B
# export needs neither GPUs nor a large-memory node. Any task count works, including 1.

#SBATCH --job-name=spellm-export
#SBATCH --nodes=1
#SBATCH --ntasks-per-node=8
#SBATCH --cpus-per-task=2
#SBATCH --mem=0
#SBATCH --time=04:00:00
#SBATCH --output=logs/%x-%j.out

set -euo pipefail

REPO=${REPO:-${SLURM_SUBMIT_DIR:-$PWD}}           # repository root (relative paths resolve against it)
CHECKPOINT=${CHECKPOINT:-runs/llama3_70b/checkpoints}  # checkpoint dir (its `latest`) or one step dir
OUTPUT=${OUTPUT:-exports/llama3_70b}              # inference directory to write
TAG=${TAG:-}                                      # a checkpoint tag (step_NNNNNNNN); empty: latest
DELTA=${DELTA:-0}                                 # 1: only heads + trained tensors + a base reference
DTYPE=${DTYPE:-auto}                              # auto (training dtype) | bfloat16 | float16 | float32
EXTRA=${EXTRA:-}                                  # more `spellm-ds export` options, space separated
NTASKS=${NTASKS:-${SLURM_NTASKS:-1}}              # parallel writers
VENV=${VENV:-$REPO/.venv}
PYTHON=${PYTHON:-$VENV/bin/python}

MASTER_ADDR=${MASTER_ADDR:-$(scontrol show hostnames "$SLURM_JOB_NODELIST" | head -n 1)}
MASTER_PORT=${MASTER_PORT:-$((20000 + SLURM_JOB_ID % 40000))}
export MASTER_ADDR MASTER_PORT
export OMP_NUM_THREADS=${OMP_NUM_THREADS:-${SLURM_CPUS_PER_TASK:-1}}

cd "$REPO"
args=(--checkpoint "$CHECKPOINT" --output "$OUTPUT" --dtype "$DTYPE")
[[ -n $TAG ]] && args+=(--tag "$TAG")
[[ $DELTA == 1 ]] && args+=(--delta)
read -r -a extra <<<"$EXTRA"
echo "[export] job ${SLURM_JOB_ID}: ${CHECKPOINT}${TAG:+ tag $TAG} -> ${OUTPUT} (delta=${DELTA}, ${NTASKS} task(s)), $(date -Is)"
srun --nodes=1 --ntasks="$NTASKS" --cpus-per-task="${SLURM_CPUS_PER_TASK:-1}" --kill-on-bad-exit=1 \
  "$PYTHON" -m spellm_ds.cli export "${args[@]}" "${extra[@]}"
echo "[export] done at $(date -Is)"
