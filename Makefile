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
$(VENV)/.installed: pyproject.toml
	@if $(PYTHON) -c "import torch" 2>/dev/null; then \
	    echo "using the installed torch"; $(PYTHON) -m venv --system-site-packages $(VENV); \
	else \
	    $(PYTHON) -m venv $(VENV) && $(BIN)/pip install -q --upgrade pip && $(BIN)/pip install -q "$(TORCH)"; \
	fi
	$(BIN)/pip install -q -e ".[dev]"
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

bench: setup
	$(BIN)/python -m benchmarks

clean:
	rm -rf $(VENV) runs .pytest_cache .mypy_cache .ruff_cache
