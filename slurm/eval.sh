#!/usr/bin/env bash
# Evaluate an exported SpeLLM model on held-out teacher shards: exact / prefix match against the
# teacher's top-1 and top-5, AutoCorrect, per-head accuracy, the entropy-fallback threshold and its
# cost; a JSON report and a PNG plot next to it.
#
#   mkdir -p logs && MODEL=exports/llama3_70b SHARDS=data/llama3_70b/heldout sbatch slurm/eval.sh
#   CALIBRATE=1 MODEL=... SHARDS=... sbatch slurm/eval.sh    # also write the threshold into the export
#
# One node, one task, one GPU: `spellm-ds eval` puts the whole export on one device (DEVICE; cuda when
# present, else cpu), so that device must hold the model in its export dtype. A 70B export in bf16 is
# ~141 GB: more than one 80 GB GPU holds (DEVICE=cpu on a large-memory node works, slowly).

#SBATCH --job-name=spellm-eval
#SBATCH --nodes=1
#SBATCH --ntasks=1
#SBATCH --gpus-per-node=1
#SBATCH --cpus-per-task=8
#SBATCH --mem=0
#SBATCH --time=04:00:00
#SBATCH --output=logs/%x-%j.out

set -euo pipefail

REPO=${REPO:-${SLURM_SUBMIT_DIR:-$PWD}}           # repository root (relative paths resolve against it)
MODEL=${MODEL:-exports/llama3_70b}                # export directory (spellm-ds export)
SHARDS=${SHARDS:-data/llama3_70b/heldout}         # held-out teacher shards
JSON=${JSON:-$MODEL/eval.json}                    # report path
CALIBRATE=${CALIBRATE:-0}                         # 1: write the calibrated threshold into the export
DEVICE=${DEVICE:-}                                # cpu | cuda | cuda:N; empty: cuda when present
EXTRA=${EXTRA:-}                                  # more `spellm-ds eval` options, space separated
VENV=${VENV:-$REPO/.venv}
PYTHON=${PYTHON:-$VENV/bin/python}
export OMP_NUM_THREADS=${OMP_NUM_THREADS:-${SLURM_CPUS_PER_TASK:-1}}

cd "$REPO"
args=(--model "$MODEL" --shards "$SHARDS" --json "$JSON")
[[ $CALIBRATE == 1 ]] && args+=(--calibrate)
[[ -n $DEVICE ]] && args+=(--device "$DEVICE")
read -r -a extra <<<"$EXTRA"
echo "[eval] job ${SLURM_JOB_ID}: ${MODEL} on ${SHARDS} -> ${JSON}, $(date -Is)"
srun --nodes=1 --ntasks=1 --cpus-per-task="${SLURM_CPUS_PER_TASK:-1}" \
  "$PYTHON" -m spellm_ds.cli eval "${args[@]}" "${extra[@]}"
echo "[eval] done at $(date -Is)"
