# The README's two set-up commands: `make demo` (install + main job) and `make test` (install + tests).
VENV ?= .venv
PY := $(VENV)/bin/python

.PHONY: install demo test
install:
	bash scripts/install.sh

demo: install
	$(PY) -m peft_ds demo --force

test: install
	$(PY) -m pytest -q tests
