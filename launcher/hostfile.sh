#!/usr/bin/env bash
# launcher/hostfile.sh OUT: write the DeepSpeed hostfile of the current Slurm allocation, one line
# 'host slots=GPUS_PER_NODE' per node, in `scontrol show hostnames $SLURM_JOB_NODELIST` order.
set -euo pipefail
[ $# -eq 1 ] || { echo "usage: launcher/hostfile.sh OUT" >&2; exit 2; }
[ -n "${SLURM_JOB_NODELIST:-}" ] || { echo "hostfile.sh: error: not inside a Slurm allocation (no SLURM_JOB_NODELIST)" >&2; exit 2; }
slots=${GPUS_PER_NODE:-8}
scontrol show hostnames "$SLURM_JOB_NODELIST" | while read -r host; do
  echo "$host slots=$slots"
done > "$1"
