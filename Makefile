# fsmoe: `make demo` and `make test` each set up .venv from nothing, then run.
PY      ?= python3
VENV    := .venv
BIN     := $(VENV)/bin
STAMP   := $(VENV)/.installed

.PHONY: demo test setup clean gpu-check

$(STAMP): pyproject.toml
	$(PY) -m venv $(VENV)
	$(BIN)/pip install -q torch==2.13.0 -e '.[test]'
	touch $(STAMP)

setup: $(STAMP)

# The tiny preset on the stdlib sources; outputs (metrics, plots, checkpoints) in runs/demo/.
# A rerun replaces the previous demo run.
demo: $(STAMP)
	rm -rf runs/demo
	$(BIN)/fsmoe train --config tiny --run-dir runs/demo

test: $(STAMP)
	$(BIN)/python -m pytest -q -x --timeout=600 tests

gpu-check:
	bash scripts/gpu_check.sh

clean:
	rm -rf $(VENV) runs
