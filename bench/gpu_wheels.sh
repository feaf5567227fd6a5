#!/usr/bin/env bash
# Build or download, here (CPU machine with the package index), every wheel the GPU machine lacks:
# deepspeed, datasets and their missing dependencies, the tested transformers/peft stack, peft-ds
# itself; into .whl/ (git-ignored, under 60 MiB). bench/gpu_check.sh installs them there, offline.
#   bash bench/gpu_wheels.sh [--out DIR] [--limit-mib N]
set -euo pipefail
cd "$(dirname "$0")/.."
[ -x .venv/bin/python ] || bash scripts/install.sh
exec .venv/bin/python bench/gpu_wheels.py "$@"
