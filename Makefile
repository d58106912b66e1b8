# The two commands of the README's quick start:
#   make demo   sets up .venv and trains the built-in default task (about two minutes on 2 cores)
#   make test   sets up .venv and runs lint, format check, type check and the tests
PYTHON ?= python3
VENV   ?= .venv
BIN    := $(VENV)/bin
TORCH  ?= torch==2.13.0

.PHONY: setup demo test lint typecheck pytest bench bench-env clean

setup: $(VENV)/.installed

# Reuse a torch that is already installed (a CUDA build on a GPU box, say) through the system
# site-packages; otherwise install the CPU build $(TORCH), which never pulls a CUDA download.
# Everything after torch is installed against a constraints file that pins the torch now in the
# venv, so no dependency or optional integration can replace it (a multi-GB CUDA download).
$(VENV)/.installed: pyproject.toml
	@if $(PYTHON) -c "import torch" 2>/dev/null; then \
	    echo "using the installed torch"; $(PYTHON) -m venv --system-site-packages $(VENV); \
	else \
	    $(PYTHON) -m venv $(VENV) && $(BIN)/pip install -q --upgrade pip && $(BIN)/pip install -q "$(TORCH)"; \
	fi
	$(BIN)/python -c "import torch; print('torch==' + torch.__version__)" > $(VENV)/constraints.txt
	$(BIN)/pip install -q -c $(VENV)/constraints.txt -e ".[dev,all]"
	@touch $@

demo: setup
	$(BIN)/regimen train

lint: setup
	$(BIN)/ruff check regimen tests benchmarks examples
	$(BIN)/ruff format --check regimen tests benchmarks examples

typecheck: setup
	$(BIN)/mypy

pytest: setup
	$(BIN)/pytest

test: lint typecheck pytest

# The benchmark suite (BENCH_ARGS: e.g. --quick, --only loop_speed, --threads 1; --write updates
# BENCHMARKS.md). It runs in .venv; the benchmarks that compare with peers (loop_speed,
# own_optimizers) run their measurements in .bench-venv when it exists (make bench-env), and
# leave the peer rows out when it does not.
BENCH_VENV ?= .bench-venv
BENCH_ARGS ?= --write

bench: setup
	$(BIN)/python -m benchmarks $(BENCH_ARGS)

# The peers live in their own environment, never in regimen's dependencies. torch goes in first and
# the constraints file pins it, so no peer can pull another (CUDA) torch; timm goes in without its
# dependencies because PyPI's torchvision does not import beside this torch (only timm.optim is used).
bench-env: $(BENCH_VENV)/.installed

$(BENCH_VENV)/.installed: benchmarks/requirements-bench.txt benchmarks/constraints-bench.txt pyproject.toml | setup
	$(BIN)/python -m venv $(BENCH_VENV)
	$(BENCH_VENV)/bin/pip install -q --upgrade pip
	$(BENCH_VENV)/bin/pip install -q "$(TORCH)"
	$(BENCH_VENV)/bin/pip install -q -c benchmarks/constraints-bench.txt -r benchmarks/requirements-bench.txt
	$(BENCH_VENV)/bin/pip install -q --no-deps -c benchmarks/constraints-bench.txt timm
	$(BENCH_VENV)/bin/pip install -q -c benchmarks/constraints-bench.txt -e .
	$(BENCH_VENV)/bin/python -m benchmarks.peers --check
	@touch $@

clean:
	rm -rf $(VENV) runs .pytest_cache .mypy_cache .ruff_cache
