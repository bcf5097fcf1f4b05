# Two commands do all set-up on a fresh machine:
#   make quickstart   creates .venv on first use, then trains configs/quickstart.toml
#   make test         creates .venv on first use, then runs lint, format check and the whole test suite
VENV ?= .venv
PY := $(VENV)/bin/python
CONFIG ?= configs/quickstart.toml

.PHONY: quickstart test test-fast lint env

$(VENV)/.installed: pyproject.toml constraints.txt
	python3 -m venv $(VENV)
	$(PY) -m pip install --quiet --upgrade pip
	$(PY) -m pip install --quiet torch==2.13.0
	$(PY) -m pip install --quiet -c constraints.txt -e ".[test]"
	touch $@

env: $(VENV)/.installed

quickstart: $(VENV)/.installed
	$(PY) -m engine.launch $(CONFIG) $(ARGS)

lint: $(VENV)/.installed
	$(PY) -m ruff check .
	$(PY) -m ruff format --check .

test: lint
	$(PY) -m pytest

test-fast: lint
	$(PY) -m pytest -m "not slow"
