# `make demo`: set up and run the whole job on Fashion-MNIST. `make test`: set up and run the tests.
# `make app`: the page in the browser for the demo's run.
# `make gpu-check`: on a CUDA machine, the GPU tests, a default run and the GPU benchmark, as one JSON.
PYTHON ?= python3
VENV ?= .venv
BIN := $(VENV)/bin
RUN_DIR ?= runs/default
# The scripts pick their own precision (--mixed-precision auto: bf16 where the hardware has it).
LAUNCH := $(BIN)/accelerate launch --num_processes 1 --num_machines 1 --mixed_precision no --dynamo_backend no

.PHONY: demo test data install clean gpu-check app

$(BIN)/.installed: pyproject.toml
	$(PYTHON) -m venv $(VENV)
	$(BIN)/pip install -q -e '.[test]'
	touch $@

install: $(BIN)/.installed

data: install
	scripts/ensure_data.sh $(BIN)/python

test: install
	scripts/ensure_browser.sh
	$(BIN)/python -m pytest

# The page for a trained run: http://127.0.0.1:7860 (Gradio comes with the test extras).
app: install
	$(BIN)/python -m pipelines.app --run-dir $(RUN_DIR)

demo: data
	$(LAUNCH) stage1_vqvae/train.py --run-dir $(RUN_DIR) --overwrite
	$(LAUNCH) stage2_prior/train.py --run-dir $(RUN_DIR) --overwrite
	$(BIN)/python -m pipelines.sample --run-dir $(RUN_DIR) --n 64
	$(BIN)/python -m pipelines.evaluate --run-dir $(RUN_DIR)
	@echo "Samples: $(RUN_DIR)/samples/grid.png   Metrics: $(RUN_DIR)/metrics.json"

# No install step: a GPU machine may be offline; the script says what it lacks (see its header).
gpu-check:
	PYTHON=$$( [ -x $(BIN)/python ] && echo $(BIN)/python || echo $(PYTHON) ) scripts/gpu_check.sh

clean:
	rm -rf $(VENV) runs
