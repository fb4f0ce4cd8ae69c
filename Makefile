# Everything installs from nothing: a fresh python3.11 and the package registries.
PYTHON ?= python3.11
VENV   ?= .venv
BIN    := $(VENV)/bin
STAMP  := $(VENV)/.installed

.PHONY: install lint test demo bench bench-quick gpu-check clean

$(STAMP): pyproject.toml Makefile
	test -x $(BIN)/python || $(PYTHON) -m venv $(VENV)
	$(BIN)/python -m pip install --quiet --upgrade pip
	# A torch range with no torch present pulls a multi-GB CUDA build: take the CPU
	# build 2.13.0 first when none is installed; the project's own range then accepts it.
	$(BIN)/python -c "import torch" 2>/dev/null || $(BIN)/python -m pip install --quiet torch==2.13.0
	$(BIN)/python -m pip install --quiet -e ".[dev]"
	touch $(STAMP)

install: $(STAMP)

lint: install
	$(BIN)/python -m ruff check gmoe gmoe_kernels benchmarks tests examples

test: install lint
	$(BIN)/python -m pytest tests -n 2 --durations=15

demo: install
	$(BIN)/python examples/demo.py

bench-quick: install
	$(BIN)/python benchmarks/run.py --device cpu --quick --json benchmarks/results/cpu-2core.json --csv benchmarks/results/cpu-2core.csv --plot benchmarks/results/cpu-2core

bench: install
	$(BIN)/python benchmarks/run.py

gpu-check:
	bash benchmarks/gpu_check.sh benchmarks/results/gpu-run

clean:
	rm -rf $(VENV) build *.egg-info .pytest_cache
