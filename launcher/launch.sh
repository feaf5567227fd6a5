#!/usr/bin/env bash
# launcher/launch.sh: start the ranks of `peft-ds train RUN_CONFIG [ARGS...]` on the nodes of a
# Slurm allocation (or on this machine), the one entry every launch path goes through. Each rank
# then finds its rank, local rank, world size and master itself (peft_ds/distributed.py: discover).
#
#   launcher/launch.sh RUN_CONFIG [--set section.key=value ...]
#
# Environment (default):
#   LAUNCH_MODE     srun (one task per GPU; default) | torchrun (one torchrun per node) |
#                   deepspeed (the deepspeed launcher with a hostfile) | mpi (mpirun, mpi4py discovery)
#   GPUS_PER_NODE   ranks per node (8)
#   GPU_BIND        srun --gpu-bind for the ranks' tasks (none: each rank sees its node's GPUs and takes
#                   the one of its local rank; single:1 or map_gpu:0,1,...: one GPU per task, which the
#                   rank takes whatever its local rank)
#   NNODES          nodes (SLURM_JOB_NUM_NODES, else 1)
#   PYTHON          the Python that has peft-ds (python3)
#   MASTER_PORT     rendezvous port (derived from SLURM_JOB_ID, else 29500)
#   DS_LAUNCHER     deepspeed mode: slurm (default inside a Slurm job: the ranks are srun tasks) |
#                   pdsh (default outside) | mpich | openmpi
#   HOSTFILE        deepspeed mode: the hostfile to use (written by launcher/hostfile.sh under Slurm)
#   DEEPSPEED_ARGS  deepspeed mode: extra launcher arguments, e.g. "--no_ssh_check" or "--venv_script V"
#   MPIRUN_ARGS     mpi mode: extra mpirun arguments ("-ppn GPUS_PER_NODE", MPICH's; Open MPI: "--map-by ppr:8:node")
#   PEFT_DS_GPU_MEMORY  GiB of one GPU for the plan's verdict (default: nvidia-smi's smallest GPU, else none)
#   PEFT_DS_HOST_MEMORY GiB of one node's host memory for the verdict on the load's host peak (default: the
#                   job's SLURM_MEM_PER_NODE when it is at least 1 GiB, else none)
#   PEFT_DS_SKIP_PLAN   1: do not print the plan nor refuse a run that does not fit
#   TORCH_ELASTIC_SHUTDOWN_TIMEOUT  torchrun mode: seconds torchrun waits for its ranks to save and exit
#                   after SIGUSR1/SIGTERM (or for the others after one failed) before it kills them (240)
# Exit code: the ranks' (75: stopped on a signal after saving a checkpoint; requeue and resume).
# Preemption: SIGUSR1 or SIGTERM to the job step (Slurm's --signal=USR1@300, scancel --signal=USR1) reaches
# every rank in srun, torchrun (which forwards it and waits), deepspeed with DS_LAUNCHER=slurm and mpi
# with MPICH's mpirun; each rank saves at the next step boundary and exits 75.
set -euo pipefail

here=$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)
die() { echo "launch.sh: error: $*" >&2; exit 2; }

[ $# -ge 1 ] || die "usage: launcher/launch.sh RUN_CONFIG [--set section.key=value ...]"
LAUNCH_MODE=${LAUNCH_MODE:-srun}
GPUS_PER_NODE=${GPUS_PER_NODE:-8}
GPU_BIND=${GPU_BIND:-none}
NNODES=${NNODES:-${SLURM_JOB_NUM_NODES:-1}}
PYTHON=${PYTHON:-python3}
if [ -n "${SLURM_JOB_ID:-}" ]; then DS_LAUNCHER=${DS_LAUNCHER:-slurm}; else DS_LAUNCHER=${DS_LAUNCHER:-pdsh}; fi
case "$LAUNCH_MODE" in
  srun|torchrun|deepspeed|mpi) ;;
  *) die "unknown LAUNCH_MODE '$LAUNCH_MODE' (srun, torchrun, deepspeed or mpi)" ;;
esac
[[ "$GPUS_PER_NODE" =~ ^[1-9][0-9]*$ ]] || die "GPUS_PER_NODE must be a positive integer, got '$GPUS_PER_NODE'"
[[ "$NNODES" =~ ^[1-9][0-9]*$ ]] || die "NNODES must be a positive integer, got '$NNODES'"
if [ "$LAUNCH_MODE" != mpi ] && [ -z "${SLURM_JOB_ID:-}" ] && [ "$LAUNCH_MODE" != deepspeed ]; then
  die "LAUNCH_MODE=$LAUNCH_MODE needs a Slurm allocation (sbatch/salloc); outside one use mpi, deepspeed, or peft-ds train --nproc"
fi
world=$((NNODES * GPUS_PER_NODE))

# Every check before any rank starts: config, model, data, and that the world size divides the batch.
"$PYTHON" -m peft_ds check "$@" --world-size "$world" ||
  die "the run above cannot start on $NNODES node(s) x GPUS_PER_NODE=$GPUS_PER_NODE = $world ranks"

# The run's memory per rank (peft-ds plan) into the job log; a run that cannot fit one GPU is refused here
# with one line. GPU memory: PEFT_DS_GPU_MEMORY (GiB) when set, else the smallest GPU nvidia-smi reports;
# with neither the plan is printed without a verdict. PEFT_DS_SKIP_PLAN=1 skips this.
if [ "${PEFT_DS_SKIP_PLAN:-0}" != 1 ]; then
  gpu_memory=${PEFT_DS_GPU_MEMORY:-}
  if [ -z "$gpu_memory" ] && command -v nvidia-smi >/dev/null 2>&1; then
    mib=$(nvidia-smi --query-gpu=memory.total --format=csv,noheader,nounits 2>/dev/null | sort -n | head -n 1 || true)
    [[ "$mib" =~ ^[0-9]+$ ]] && gpu_memory=$(awk -v m="$mib" 'BEGIN { printf "%.2f", m / 1024 }')
  fi
  plan=("$PYTHON" -m peft_ds plan "$@" --nodes "$NNODES" --gpus-per-node "$GPUS_PER_NODE")
  host_memory=${PEFT_DS_HOST_MEMORY:-}
  if [ -z "$host_memory" ] && [[ "${SLURM_MEM_PER_NODE:-}" =~ ^[0-9]+$ ]] && [ "$SLURM_MEM_PER_NODE" -ge 1024 ]; then
    host_memory=$(awk -v m="$SLURM_MEM_PER_NODE" 'BEGIN { printf "%.2f", m / 1024 }')
  fi
  [ -z "$host_memory" ] || plan+=(--host-memory "$host_memory")
  if [ -n "$gpu_memory" ]; then
    "${plan[@]}" --gpu-memory "$gpu_memory" --require-fit || exit 2
  else
    echo "launch.sh: GPU memory unknown (no nvidia-smi, PEFT_DS_GPU_MEMORY unset): the plan is not checked"
    "${plan[@]}" || exit 2
  fi
fi

if [ -n "${SLURM_JOB_ID:-}" ]; then
  MASTER_ADDR=${MASTER_ADDR:-$(scontrol show hostnames "$SLURM_JOB_NODELIST" | head -n 1)}
  MASTER_PORT=${MASTER_PORT:-$((20000 + SLURM_JOB_ID % 20000))}
fi
export MASTER_ADDR=${MASTER_ADDR:-127.0.0.1} MASTER_PORT=${MASTER_PORT:-29500}
echo "launch.sh: $LAUNCH_MODE, $NNODES node(s) x $GPUS_PER_NODE = $world ranks, master $MASTER_ADDR:$MASTER_PORT"

case "$LAUNCH_MODE" in
  srun)
    # One task per GPU; each reads its own SLURM_PROCID / SLURM_LOCALID. A task that dies ends the step.
    exec srun --kill-on-bad-exit=1 --nodes="$NNODES" --ntasks="$world" --ntasks-per-node="$GPUS_PER_NODE" \
      --gpu-bind="$GPU_BIND" "$PYTHON" -m peft_ds train "$@" ;;
  torchrun)
    # One torchrun per node, fixed node ranks (the c10d rendezvous form is less reliable at exit).
    # torchrun dies on SIGUSR1 unless told to handle it: it then sends it on to its ranks and waits
    # up to the shutdown timeout for them to save and exit.
    # SLURM_NODEID is read by each task (single quotes), not by this shell.
    # shellcheck disable=SC2016
    exec srun --kill-on-bad-exit=1 --nodes="$NNODES" --ntasks="$NNODES" --ntasks-per-node=1 --gpu-bind=none \
      bash -c 'exec "$0" -m torch.distributed.run --nnodes "$1" --nproc_per_node "$2" --node_rank "$SLURM_NODEID" \
               --master_addr "$MASTER_ADDR" --master_port "$MASTER_PORT" \
               --signals-to-handle SIGTERM,SIGINT,SIGHUP,SIGQUIT,SIGUSR1 --shutdown-timeout "$3" \
               -m peft_ds train "${@:4}"' \
      "$PYTHON" "$NNODES" "$GPUS_PER_NODE" "${TORCH_ELASTIC_SHUTDOWN_TIMEOUT:-240}" "$@" ;;
  deepspeed)
    HOSTFILE=${HOSTFILE:-${TMPDIR:-/tmp}/peft_ds_hostfile.${SLURM_JOB_ID:-$$}}
    if [ -n "${SLURM_JOB_ID:-}" ]; then
      GPUS_PER_NODE=$GPUS_PER_NODE bash "$here/hostfile.sh" "$HOSTFILE"
    fi
    [ -f "$HOSTFILE" ] || die "deepspeed mode outside Slurm needs HOSTFILE (lines 'host slots=N')"
    read -r -a deepspeed_args <<< "${DEEPSPEED_ARGS:-}"
    if [ "$DS_LAUNCHER" = slurm ]; then
      # srun starts every rank as a task (peft-ds finds them from SLURM_PROCID), so the preemption
      # signal reaches them as in srun mode; --force_multi: srun on one node too, no ssh anywhere.
      deepspeed_args=(--force_multi --no_ssh_check --launcher_args
                      "--kill-on-bad-exit=1 --nodes=$NNODES --ntasks-per-node=$GPUS_PER_NODE --gpu-bind=$GPU_BIND"
                      "${deepspeed_args[@]}")
    fi
    # A script path, not --module: the launcher's mpich/openmpi runners mangle --module.
    exec "$PYTHON" -m deepspeed.launcher.runner --hostfile "$HOSTFILE" --launcher "$DS_LAUNCHER" \
      --master_addr "$MASTER_ADDR" --master_port "$MASTER_PORT" "${deepspeed_args[@]}" \
      "$here/train.py" train "$@" ;;
  mpi)
    # mpirun (MPICH's hydra or Open MPI) starts every rank; peft-ds reads them through mpi4py.
    read -r -a mpirun_args <<< "${MPIRUN_ARGS:--ppn $GPUS_PER_NODE}"
    exec mpirun -n "$world" "${mpirun_args[@]}" "$PYTHON" -m peft_ds train "$@" ;;
esac
