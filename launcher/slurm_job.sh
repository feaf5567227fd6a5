# shellcheck shell=bash
# launcher/slurm_job.sh: the body of every slurm/*.sh job, sourced once the script has set
# MODEL_PATH, OUTPUT_DIR, RUN_CONFIG, DS_CONFIG and PEFT_DS_HOME (DATA_PATH unset or empty: the run
# config's data.train_file). It checks them, starts the ranks through launcher/launch.sh, requeues the
# job when the ranks stopped on the preemption signal after saving a checkpoint (exit 75; the requeued
# job resumes from it), and consolidates the final checkpoint into OUTPUT_DIR/consolidated.
set -euo pipefail
job_name=${SLURM_JOB_NAME:-peft-ds}
fail() { echo "$job_name: error: $*" >&2; exit 2; }

cd "$PEFT_DS_HOME"
if [ -z "${PYTHON:-}" ]; then
  PYTHON=python3
  [ -x .venv/bin/python ] && PYTHON=$PEFT_DS_HOME/.venv/bin/python
fi
export PYTHON
[ -n "${MODEL_PATH:-}" ] || fail "MODEL_PATH is not set (a local Hugging Face model directory)"
if [ ! -d "$MODEL_PATH" ] && [[ "$MODEL_PATH" != tiny-* ]]; then
  fail "MODEL_PATH=$MODEL_PATH does not exist (a local Hugging Face model directory: config.json, safetensors, tokenizer)"
fi
data=()
if [ -n "${DATA_PATH:-}" ]; then
  [ -f "$DATA_PATH" ] || fail "DATA_PATH=$DATA_PATH does not exist (an LLM-Adapters JSON file, e.g. math_10k.json)"
  data=(--set "data.train_file=$DATA_PATH")
fi
[ -f "$RUN_CONFIG" ] || fail "RUN_CONFIG=$RUN_CONFIG does not exist"
[ -f "$DS_CONFIG" ] || fail "DS_CONFIG=$DS_CONFIG does not exist"
# The preemption signal reaches the ranks only where they run in a Slurm job step; the deepspeed
# launcher's other backends start them over ssh (pdsh) or under a helper that USR1 kills (mpich).
ds_launcher=${DS_LAUNCHER:-slurm}
if [ "${LAUNCH_MODE:-srun}" = deepspeed ] && [ "$ds_launcher" != slurm ]; then
  job_info=$(scontrol show job "${SLURM_JOB_ID:-}" 2>/dev/null || true)
  if [[ "$job_info" =~ (^|[[:space:]])Requeue=1([[:space:]]|$) ]]; then
    fail "LAUNCH_MODE=deepspeed with DS_LAUNCHER=$ds_launcher cannot save and requeue on the preemption signal:" \
         "use DS_LAUNCHER=slurm (the default) or submit with --no-requeue"
  fi
fi

echo "$job_name: job ${SLURM_JOB_ID:-?} on ${SLURM_JOB_NODELIST:-this machine}, restart ${SLURM_RESTART_COUNT:-0}," \
     "$(date -u +%FT%TZ)"
args=("$RUN_CONFIG" --set "model.name_or_path=$MODEL_PATH" "${data[@]}" --set "output_dir=$OUTPUT_DIR"
      --set "deepspeed=$DS_CONFIG" --set "train.resume=auto")
read -r -a extra <<< "${EXTRA_ARGS:-}"
# peft-ds writes this after saving on the signal: srun may report a slower rank's SIGTERM instead of 75.
marker=$OUTPUT_DIR/preempted.json
rm -f "$marker"
status=0
bash "$PEFT_DS_HOME/launcher/launch.sh" "${args[@]}" "${extra[@]}" || status=$?
if [ "$status" -eq 75 ] || { [ "$status" -ne 0 ] && [ -f "$marker" ]; }; then
  echo "$job_name: the ranks saved a checkpoint on the signal; requeueing job $SLURM_JOB_ID to resume from it"
  scontrol requeue "$SLURM_JOB_ID"
  exit 0
fi
[ "$status" -eq 0 ] || { echo "$job_name: training failed (exit $status)" >&2; exit "$status"; }
"$PYTHON" -m peft_ds consolidate "$OUTPUT_DIR" --out "$OUTPUT_DIR/consolidated" --force --quiet
echo "$job_name: done, $(date -u +%FT%TZ)"
