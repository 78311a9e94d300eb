# toile — set up from nothing and run. `make demo` and `make test` are the two entry points.
PYTHON ?= python3
VENV := .venv
PY := $(VENV)/bin/python
# Every dependency's exact version (pip-tools' pip-compile output; `make lock` regenerates it).
LOCK := requirements.lock
# The CPU wheel: an unpinned torch pulls several GB of CUDA packages. For a GPU install see README.
TORCH_PIN ?= torch==2.13.0
PIP_TOOLS_PIN := pip-tools==7.6.2
# `make lock LOCK_FLAGS=--upgrade` takes the newest releases the ranges allow; plain `make lock`
# keeps the locked versions and only resolves what changed.

.PHONY: setup demo test lint lock clean

# pip installs exactly the lock, then toile itself without resolving anything again (--no-deps),
# built with the lock's setuptools (--no-build-isolation), so two installs are the same install.
$(VENV)/.installed: pyproject.toml $(LOCK)
	$(PYTHON) -m venv $(VENV)
	$(PY) -m pip install -q -r $(LOCK)
	$(PY) -m pip install -q --no-deps --no-build-isolation -e .
	touch $@

setup: $(VENV)/.installed

demo: setup
	HF_HUB_OFFLINE=1 $(PY) -m toile.cli.main demo --out demo

test: setup
	$(VENV)/bin/ruff check src tests
	HF_HUB_OFFLINE=1 $(PY) -m pytest -q

lint: setup
	$(VENV)/bin/ruff check src tests

# Regenerate the lock from pyproject's ranges (after changing a dependency, or to take newer
# releases on purpose). The lock names torch without its local label (`+cpu`), so the same file
# installs the CPU wheel here and a CUDA build where the index serves one.
lock:
	$(PYTHON) -m venv .venv-lock
	.venv-lock/bin/pip install -q "$(PIP_TOOLS_PIN)"
	printf '%s\n' "$(TORCH_PIN)" > .venv-lock/torch-pin.txt
	.venv-lock/bin/pip-compile --quiet $(LOCK_FLAGS) --strip-extras --allow-unsafe --all-build-deps \
		--extra serve --extra dev --no-emit-index-url --no-emit-find-links \
		--constraint .venv-lock/torch-pin.txt --output-file $(LOCK) pyproject.toml
	sed -i -e 's/^\(torch==[^+ ]*\)+[a-z0-9.]*/\1/' -e 's#\.venv-lock/torch-pin\.txt#TORCH_PIN#' $(LOCK)

clean:
	rm -rf $(VENV) .venv-lock .pytest_cache .ruff_cache
