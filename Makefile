# Every target sets itself up from nothing: a fresh clone needs only python3 and pip.
VENV ?= .venv
PY := $(VENV)/bin/python
STAMP := $(VENV)/.rlora-installed

.PHONY: install lint test test-fast demo bench clean

$(STAMP): pyproject.toml
	test -x $(PY) || python3 -m venv $(VENV)
	$(PY) -m pip install -q --upgrade pip
	$(PY) -m pip install -q -e ".[cpu,dev]"
	# PyPI's torchvision/torchaudio/torchcodec are built against another torch and break
	# `transformers` imports beside torch 2.13.0+cpu (operator torchvision::nms does not exist).
	$(PY) -m pip uninstall -q -y torchvision torchaudio torchcodec || true
	touch $(STAMP)

install: $(STAMP)

# ruff (lint + format check) and mypy, configured in pyproject.toml; the test command runs them first.
lint: $(STAMP)
	$(VENV)/bin/ruff check rlora rewards tests scripts
	$(VENV)/bin/ruff format --check rlora rewards tests scripts
	$(VENV)/bin/mypy

test: lint
	$(PY) -m pytest -q -ra --durations=15 tests

test-fast: $(STAMP)
	$(PY) -m pytest -q -m "not slow" tests

demo: $(STAMP)
	$(VENV)/bin/rlora demo

clean:
	rm -rf $(VENV) runs .pytest_cache
