# One-word entry points. `make test` is what CI runs (.ci/run).
VENV        ?= .venv
PYTHON      ?= python3
PY          := $(VENV)/bin/python
PIP         := $(PY) -m pip
CONSTRAINTS := constraints/cpu.txt
STAMP       := $(VENV)/.caikit-installed

.PHONY: setup test lint typecheck unit quickstart slow clean

# The virtual environment, with caikit (editable), the PyTorch backend and the
# dev tools. The constraints file pins torch to the CPU build so a machine
# without a GPU never pulls a multi-GB CUDA wheel.
$(STAMP): pyproject.toml $(CONSTRAINTS)
	test -x $(PY) || $(PYTHON) -m venv $(VENV)
	$(PIP) install --quiet --upgrade pip setuptools wheel
	$(PIP) install --quiet -c $(CONSTRAINTS) -e '.[dev,torch]'
	touch $(STAMP)

setup: $(STAMP)

lint: setup
	$(VENV)/bin/ruff check .
	$(VENV)/bin/ruff format --check .

typecheck: setup
	$(VENV)/bin/mypy

unit: setup
	$(VENV)/bin/pytest -m "not slow and not gpu"

# The README's test command: lint, types, then the default (fast) test suite.
test: lint typecheck unit

# Tests on the real demo model (minutes on CPU).
slow: setup
	$(VENV)/bin/pytest -m slow

# The README's main command: fetch the demo model, then run the quickstart.
quickstart: setup
	$(VENV)/bin/caikit models fetch smollm2-135m-instruct
	$(VENV)/bin/caikit run examples/quickstart.toml

clean:
	rm -rf $(VENV) runs .mypy_cache .ruff_cache .pytest_cache
