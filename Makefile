# fsmoe: `make demo` and `make test` each set up .venv from nothing, then run.
PY      ?= python3
VENV    := .venv
BIN     := $(VENV)/bin
STAMP   := $(VENV)/.installed

.PHONY: demo demo-dist test setup clean gpu-check

$(STAMP): pyproject.toml
	$(PY) -m venv $(VENV)
	$(BIN)/pip install -q torch==2.13.0 -e '.[test]'
	touch $(STAMP)

setup: $(STAMP)

# The tiny preset on the stdlib sources; outputs (metrics, plots, checkpoints) in runs/demo/.
# A rerun replaces the previous demo run. It ends with a sample of what the model learned.
demo: $(STAMP)
	rm -rf runs/demo
	$(BIN)/fsmoe train --config tiny --run-dir runs/demo
	$(BIN)/fsmoe generate runs/demo --prompt 'def ' --max-new-tokens 120 --temperature 0.7 --top-p 0.95

# The distributed demo: 4 processes as 2 simulated nodes x 2 ranks, FSMoE's layout (dense part
# DP2 x MP2, MoE part EP2 across the nodes x ESP2 inside each); outputs in runs/demo-dist/.
demo-dist: $(STAMP)
	rm -rf runs/demo-dist
	$(BIN)/fsmoe train --config tiny --nproc 4 --mp 2 --ep 2 --esp 2 --gpus-per-node 2 --steps 150 --run-dir runs/demo-dist

test: $(STAMP)
	$(BIN)/python -m pytest -q -x --timeout=600 tests

gpu-check:
	bash scripts/gpu_check.sh

clean:
	rm -rf $(VENV) runs
