#!/usr/bin/env bash
# Build teacher top-k shards as a SLURM array job: array task a of A (and srun task r of n inside it)
# builds the global shards w, w+W, ... with w = a*n + r and W = A*n. Tasks never wait for each other;
# the last one to finish writes index.json. Resubmitting the same job builds only the missing shards.
#
#   mkdir -p logs
#   TEACHER=/models/llama-3.1-8b INPUT='/data/corpus/*.parquet' OUTPUT=/data/shards/l31-8b \
#     sbatch --array=0-15 --gpus-per-node=1 slurm/build_shards.sh
#   # 8 GPUs per node, one builder per GPU (srun tasks), 4 nodes' worth of array tasks:
#   TEACHER=... INPUT=... OUTPUT=... sbatch --array=0-3 --ntasks-per-node=8 --gpus-per-node=8 slurm/build_shards.sh
#   # a teacher too large for one GPU: one builder per node over all its GPUs
#   DEVICE_MAP=auto TEACHER=/models/llama-3.1-70b ... sbatch --array=0-7 --gpus-per-node=8 slurm/build_shards.sh
#
#SBATCH --job-name=build-shards
#SBATCH --output=logs/%x-%j.out
#SBATCH --nodes=1
#SBATCH --ntasks-per-node=1
#SBATCH --time=24:00:00
set -euo pipefail

# ---- tunables (override with the environment, e.g. sbatch --export=ALL,SEQ_LEN=4096) ----
TEACHER=${TEACHER:?set TEACHER to a local HF causal LM directory}
INPUT=${INPUT:?set INPUT to files or glob patterns (space separated, quoted so the shell keeps globs)}
OUTPUT=${OUTPUT:?set OUTPUT to the dataset directory}
TEXT_FIELD=${TEXT_FIELD:-text}             # jsonl key / parquet column
SEQ_LEN=${SEQ_LEN:-2048}                   # tokens per packed sequence
SAMPLES_PER_SHARD=${SAMPLES_PER_SHARD:-256}
BATCH_SIZE=${BATCH_SIZE:-8}                # sequences per teacher forward
DTYPE=${DTYPE:-auto}                       # auto = bfloat16 on GPU, float32 on CPU
TOP_K=${TOP_K:-5}
MAX_SAMPLES=${MAX_SAMPLES:-}               # empty = the whole corpus
DEVICE_MAP=${DEVICE_MAP:-}                 # auto = spread one teacher over the node's GPUs
PYTHON=${PYTHON:-.venv/bin/python}
# -----------------------------------------------------------------------------------------

cd "${SLURM_SUBMIT_DIR:-.}"
export TOKENIZERS_PARALLELISM=false HF_HUB_OFFLINE=${HF_HUB_OFFLINE:-1}
read -r -a inputs <<<"$INPUT"

args=(
  build-shards --teacher "$TEACHER" --input "${inputs[@]}" --output "$OUTPUT"
  --text-field "$TEXT_FIELD" --seq-len "$SEQ_LEN" --samples-per-shard "$SAMPLES_PER_SHARD"
  --batch-size "$BATCH_SIZE" --dtype "$DTYPE" --top-k "$TOP_K"
)
[[ -n "$MAX_SAMPLES" ]] && args+=(--max-samples "$MAX_SAMPLES")
[[ -n "$DEVICE_MAP" ]] && args+=(--device-map "$DEVICE_MAP")

echo "[build-shards] job ${SLURM_JOB_ID:-?} array task ${SLURM_ARRAY_TASK_ID:-0} of ${SLURM_ARRAY_TASK_COUNT:-1}," \
  "${SLURM_NTASKS:-1} task(s) on $(hostname)"
"$PYTHON" -c 'import torch, transformers; print("torch", torch.__version__, "transformers", transformers.__version__)'

srun --kill-on-bad-exit=1 --ntasks="${SLURM_NTASKS:-1}" --cpus-per-task="${SLURM_CPUS_PER_TASK:-1}" "$PYTHON" -m spellm_ds.cli "${args[@]}"
