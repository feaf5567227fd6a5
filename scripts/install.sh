#!/usr/bin/env bash
# Create (or reuse) the virtual environment .venv and install peft-ds into it. Safe to run twice: a
# second run only reinstalls when setup.py or constraints.txt changed. Every package is installed at
# the exact version of constraints.txt (the stack the test suite runs on; PEFT_DS_CONSTRAINTS= empty:
# any version inside setup.py's ranges). Without a GPU, torch is installed first as the CPU build, so
# nothing pulls the multi-GB CUDA build.
set -euo pipefail
cd "$(dirname "$0")/.."
VENV=${VENV:-.venv}
PYTHON=${PYTHON:-python3}
CONSTRAINTS=${PEFT_DS_CONSTRAINTS-constraints.txt}
TORCH_VERSION=${TORCH_VERSION:-$(sed -n 's/^torch==//p' constraints.txt)}
STAMP="$VENV/.peft-ds-installed"

[ -x "$VENV/bin/python" ] || "$PYTHON" -m venv "$VENV"
pip_install() { "$VENV/bin/python" -m pip install -q ${CONSTRAINTS:+-c "$CONSTRAINTS"} "$@"; }

if ! "$VENV/bin/python" -c "import torch" 2>/dev/null; then
  if command -v nvidia-smi >/dev/null 2>&1 && nvidia-smi -L >/dev/null 2>&1; then
    pip_install "torch==$TORCH_VERSION" || pip_install torch
  else
    # CPU build: the local wheel where the registry mirror has one, else PyTorch's CPU index.
    pip_install "torch==$TORCH_VERSION" ||
      pip_install --index-url https://download.pytorch.org/whl/cpu torch
  fi
fi
if [ ! -f "$STAMP" ] || [ setup.py -nt "$STAMP" ] || [ constraints.txt -nt "$STAMP" ] || ! "$VENV/bin/python" -c "import peft_ds" 2>/dev/null; then
  # ninja: DeepSpeed JIT-compiles its CPU ops on first use.
  pip_install -e ".[test${EXTRAS:+,$EXTRAS}]" ninja
  touch "$STAMP"
fi
echo "peft-ds installed in $VENV ($("$VENV/bin/python" -c 'import torch; print("torch", torch.__version__)'))"
