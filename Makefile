# The README's two set-up commands: `make demo` (install + main job) and `make test` (install + tests).
VENV ?= .venv
PY := $(VENV)/bin/python
# DeepSpeed JIT-compiles its CPU ops with the ninja found on PATH: use the venv's, always the same one.
export PATH := $(abspath $(VENV))/bin:$(PATH)
DEMO_OUT := runs/demo_tiny_llama_lora_sibo

.PHONY: install demo test test-fast
install:
	bash scripts/install.sh

# LoRA-SIBO on tiny-llama with the shipped math sample, 2 ranks under ZeRO-3 on the CPU; then the
# over-smoothing of the trained adapter against the backbone. A second run resumes the finished run.
demo: install
	$(PY) -m peft_ds train configs/demo_tiny_llama_lora_sibo.yaml --nproc 2
	$(PY) -m peft_ds smoothness --model tiny-llama --adapter $(DEMO_OUT)/adapter --out $(DEMO_OUT)/smoothness --force

# Slurm and shellcheck for the launch tests (apt, only what is missing), then the whole suite: two test
# files at a time (pytest-xdist; each file, with its module fixtures, on one worker), since most tests
# wait on processes part of the time.
test: install
	bash scripts/install_system.sh
	$(PY) -m pytest -q -n 2 --dist loadfile --durations=25 tests

# The suite without the slow multi-process tests (a few minutes): what to run while editing.
test-fast: install
	$(PY) -m pytest -q -m "not slow" tests
