#!/usr/bin/env bash
#SBATCH --job-name=llama7b-adamix-lora
#SBATCH --nodes=1
#SBATCH --ntasks-per-node=8
#SBATCH --gres=gpu:8
#SBATCH --cpus-per-task=10
#SBATCH --time=24:00:00
#SBATCH --signal=USR1@300
#SBATCH --requeue
#SBATCH --open-mode=append
#SBATCH --output=%x-%j.out
# AdaMix-LoRA on LLaMA-7B, Math10K, 1 node x 8 A100 (configs/llama7b_adamix_lora.yaml).
# Submit from the peft-ds checkout:  sbatch slurm/llama7b_adamix_lora.sh
# Settings (environment variables; defaults after the colon), documented in slurm/README.md:
#   MODEL_PATH     local Hugging Face model directory  : /path/to/llama-7b-hf
#   DATA_PATH      training JSON (LLM-Adapters format)  : unset, the run config's data.train_file
#   OUTPUT_DIR     run directory (checkpoints, adapter) : runs/llama7b_adamix_lora
#   RUN_CONFIG     run config YAML                      : configs/llama7b_adamix_lora.yaml
#   DS_CONFIG      DeepSpeed config                     : ds_configs/zero3_bf16.json
#   GPUS_PER_NODE  ranks per node (= --ntasks-per-node) : 8
#   LAUNCH_MODE    srun | torchrun | deepspeed | mpi    : srun
#   EXTRA_ARGS     more peft-ds train arguments, e.g. "--set train.lr=1e-4 --set method.sibo_lambda=0.2"
#   PYTHON         the Python with peft-ds installed    : .venv/bin/python, else python3
# sbatch options on the command line override the headers above (e.g. --nodes=4, --time=12:00:00).
#
# NCCL and timeouts (uncomment or export before sbatch as your cluster needs):
# export NCCL_DEBUG=WARN                   # INFO to see the chosen transport and rings
# export NCCL_SOCKET_IFNAME=ib0            # the interface between nodes
# export NCCL_IB_HCA=mlx5                  # InfiniBand adapters to use
# export TORCH_NCCL_ASYNC_ERROR_HANDLING=1 # a failed collective ends the process instead of hanging
# export PEFT_DS_DIST_TIMEOUT=30           # minutes any collective may wait (a lost rank ends the job)
set -euo pipefail
MODEL_PATH=${MODEL_PATH:-/path/to/llama-7b-hf}
OUTPUT_DIR=${OUTPUT_DIR:-runs/llama7b_adamix_lora}
RUN_CONFIG=${RUN_CONFIG:-configs/llama7b_adamix_lora.yaml}
DS_CONFIG=${DS_CONFIG:-ds_configs/zero3_bf16.json}
export MODEL_PATH OUTPUT_DIR RUN_CONFIG DS_CONFIG
# sbatch runs a copy of this script: the checkout is where it was submitted from (or PEFT_DS_HOME).
PEFT_DS_HOME=${PEFT_DS_HOME:-${SLURM_SUBMIT_DIR:-$PWD}}
[ -f "$PEFT_DS_HOME/launcher/slurm_job.sh" ] ||
  { echo "llama7b_adamix_lora.sh: error: $PEFT_DS_HOME is not a peft-ds checkout: submit from it or set PEFT_DS_HOME" >&2; exit 2; }
# shellcheck source=launcher/slurm_job.sh
source "$PEFT_DS_HOME/launcher/slurm_job.sh"
