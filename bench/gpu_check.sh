#!/usr/bin/env bash
# The GPU path in one command, for a CUDA machine without network (bench/README.md, "GPU check"):
#   install   the wheels of bench/gpu_wheels.sh (.whl/, or WHEELS) into a private folder, offline, and every
#             carried package's requirements checked against the image (bench/gpu_wheels.py check); when
#             it fails nothing else can run: the other stages are reported skipped at once
#   tests     pytest -m gpu: bf16 equality with HF PEFT on CUDA, SIBO with SDPA and KV cache, 2 steps of
#             peft-ds train under ZeRO-3 with NCCL for every method (GC off and on), consolidation
#   mfu       LoRA-SIBO on llama-7b-shape (32 layers, bf16, ZeRO-3, one GPU): tokens/s, MFU, memory
#             against the plan, HF PEFT LoRA without DeepSpeed side by side (bench/gpu_bench.py mfu)
#   methods   AdaMix-LoRA and BiLoRA step time against LoRA (bench/gpu_bench.py methods)
#   report    report.json and report.md (and gpu_check.log, every stage's output) in the output folder
# Each stage runs under its own time limit, sized in bench/README.md from computed estimates; a failed or
# timed-out stage is reported (rows already measured kept) and the next runs. The limits add up to 510 s,
# under 9 minutes, so that a second try fits one loan of 15.
#
#   bash bench/gpu_check.sh [--out DIR] [--dry-run]
# --out: default $OUT (the device tool's folder) or runs/gpu_check. --dry-run: the same stages on the
# CPU with tiny shapes and fp32, skipping what needs CUDA and saying so (CI runs this).
set -uo pipefail
cd "$(dirname "$0")/.." || exit 2

DRY=0
DEST=${OUT:-runs/gpu_check}
while [ $# -gt 0 ]; do
  case "$1" in
    --dry-run) DRY=1 ;;
    --out) DEST=${2:?--out needs a folder}; shift ;;
    -h|--help) sed -n '2,16p' "$0"; exit 0 ;;
    *) echo "gpu_check: unknown argument $1 (see --help)" >&2; exit 2 ;;
  esac
  shift
done
mkdir -p "$DEST" || exit 2
DEST=$(cd "$DEST" && pwd)
WORK=$(mktemp -d "${TMPDIR:-/tmp}/gpu_check.XXXXXX")
LOG="$DEST/gpu_check.log"
STAGES="$WORK/stages.jsonl"
: >"$LOG"
: >"$STAGES"

if [ "$DRY" = 1 ]; then
  PY=${PYTHON:-$( [ -x .venv/bin/python ] && echo .venv/bin/python || echo python3 )}
  export DS_ACCELERATOR=cpu
  LIMITS=(install=300 tests=300 mfu=600 methods=900)
  BENCH_FLAGS=(--dry-run)
else
  PY=${PYTHON:-python3}
  LIMITS=(install=60 tests=150 mfu=180 methods=120)
  BENCH_FLAGS=()
fi
export PYTHONUNBUFFERED=1
limit_of() { local kv; for kv in "${LIMITS[@]}"; do [ "${kv%%=*}" = "$1" ] && echo "${kv#*=}"; done; }

# stage NAME COMMAND...: run under the stage's limit, its output into the log, a JSON line of its status.
stage() {
  local name=$1 limit began rc status
  shift
  limit=$(limit_of "$name")
  began=$(date +%s)
  echo "=== $name (limit ${limit}s) ===" | tee -a "$LOG"
  timeout --kill-after=15 "$limit" "$@" >>"$LOG" 2>&1
  rc=$?
  case $rc in
    0) status=ok ;;
    124|137) status="timed out" ;;
    *) status="failed (exit $rc)" ;;
  esac
  echo "=== $name: $status in $(( $(date +%s) - began ))s ===" | tee -a "$LOG"
  printf '{"stage": "%s", "status": "%s", "seconds": %d, "limit": %d}\n' \
    "$name" "$status" "$(( $(date +%s) - began ))" "$limit" >>"$STAGES"
}

install_wheels() {
  local site="$WORK/site" wheels=("$WHEELS"/*.whl) target=()
  if [ ! -e "${wheels[0]}" ]; then
    if [ "$DRY" = 0 ]; then
      echo "no wheels in $WHEELS/: run bash bench/gpu_wheels.sh on the CPU machine and carry .whl"
      return 1
    fi
    echo "dry run: no .whl/ here; installing a freshly built peft-ds wheel alone, the same way"
    "$PY" -m pip wheel -q --no-deps --no-build-isolation -w "$WORK/wheels" . || return 1
    wheels=("$WORK"/wheels/*.whl)
  elif [ "$DRY" = 1 ]; then
    # the GPU machine's interpreter, not this one: install for it, into a folder nothing imports from
    echo "dry run: installing .whl/ for CPython 3.12 x86-64 into a folder that is not used"
    site="$WORK/site-gpu"
    target=(--python-version 3.12 --implementation cp --only-binary=:all:)
    for p in manylinux_2_28_x86_64 manylinux_2_17_x86_64 manylinux2014_x86_64; do target+=(--platform "$p"); done
  fi
  "$PY" -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target "$site" \
    "${target[@]}" "${wheels[@]}" || return 1
  echo "installed ${#wheels[@]} wheel(s) into $site"
  # every carried package's requirements against what the image has: one line per shortfall, in seconds
  PYTHONPATH="$site" "$PY" bench/gpu_wheels.py check --site "$site" || return 1
  [ "$site" = "$WORK/site" ] || return 0
  PYTHONPATH="$site" "$PY" -c 'import deepspeed, peft_ds, torch, transformers, peft
print("torch", torch.__version__, "cuda", torch.cuda.is_available(), "| transformers", transformers.__version__,
      "| peft", peft.__version__, "| deepspeed", deepspeed.__version__, "| peft-ds", peft_ds.__version__)'
}

environment() {
  nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv,noheader 2>/dev/null ||
    echo "no nvidia-smi: CPU only"
  "$PY" --version
}

echo "peft-ds GPU check $( [ "$DRY" = 1 ] && echo '(dry run: CPU, tiny shapes, fp32)' ) -> $DEST" | tee -a "$LOG"
environment >>"$LOG" 2>&1
WHEELS=${WHEELS:-.whl}
export WORK DRY PY WHEELS
export -f install_wheels
stage install bash -c install_wheels
if ! grep -q '"status": "ok"' "$STAGES"; then  # nothing else can run: keep the loan's time for a second try
  for name in tests mfu methods; do
    printf '{"stage": "%s", "status": "skipped (install failed)", "seconds": 0, "limit": %d}\n' \
      "$name" "$(limit_of "$name")" >>"$STAGES"
    echo "=== $name: skipped (install failed) ===" | tee -a "$LOG"
  done
  SKIP_REST=1
fi
# the installed wheels where they exist; the working tree's peft_ds first (the command runs from it)
if [ -d "$WORK/site" ]; then
  export PYTHONPATH="$PWD:$WORK/site${PYTHONPATH:+:$PYTHONPATH}"
  export PATH="$WORK/site/bin:$PATH"
fi
if [ "${SKIP_REST:-0}" = 0 ]; then
  stage tests "$PY" -m pytest -q -rs -m gpu -p no:cacheprovider tests/test_gpu.py
  stage mfu "$PY" bench/gpu_bench.py mfu --json "$WORK/mfu.json" "${BENCH_FLAGS[@]}"
  stage methods "$PY" bench/gpu_bench.py methods --json "$WORK/methods.json" --workdir "$WORK/runs" "${BENCH_FLAGS[@]}"
fi
"$PY" bench/gpu_bench.py report --stages "$STAGES" --dir "$WORK" --out "$DEST" >>"$LOG" 2>&1 ||
  echo "report failed: see $LOG" >&2
cat "$DEST/report.md" 2>/dev/null
failed=$(grep -cv '"status": "ok"' "$STAGES")
rm -rf "$WORK"
[ "$failed" = 0 ]  # exit status 0 when every stage passed
