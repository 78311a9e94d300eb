# toile — set up from nothing and run. `make demo` and `make test` are the two entry points.
PYTHON ?= python3
VENV := .venv
PY := $(VENV)/bin/python
# CPU wheel pinned: an unpinned torch pulls several GB of CUDA packages. For a GPU install see README.
TORCH_PIN ?= torch==2.13.0

.PHONY: setup demo test lint clean

$(VENV)/.installed: pyproject.toml
	$(PYTHON) -m venv $(VENV)
	$(PY) -m pip install -q --upgrade pip
	$(PY) -m pip install -q "$(TORCH_PIN)" -e ".[serve,dev]"
	touch $@

setup: $(VENV)/.installed

demo: setup
	HF_HUB_OFFLINE=1 $(PY) -m toile.cli.main demo --out demo

test: setup
	$(VENV)/bin/ruff check src tests
	HF_HUB_OFFLINE=1 $(PY) -m pytest -q

lint: setup
	$(VENV)/bin/ruff check src tests

clean:
	rm -rf $(VENV) .pytest_cache .ruff_cache
