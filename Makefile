# Two commands for a fresh machine (see README):
#   make run    install and run the service on its embedded default (in-memory store, --dev)
#   make test   install what the tests need and run the whole suite
PYTHON ?= python3
VENV   ?= .venv
PY     := $(VENV)/bin/python
PIP    := $(VENV)/bin/pip

.PHONY: run test lint install install-test tools

$(VENV)/bin/activate:
	$(PYTHON) -m venv $(VENV)

install: $(VENV)/bin/activate
	$(PIP) install -q -e .

install-test: $(VENV)/bin/activate
	$(PIP) install -q -e '.[test,load]'
	bash scripts/install-test-tools.sh

run: install
	$(VENV)/bin/authz serve --dev

lint: install-test
	$(VENV)/bin/ruff check authz tests loadtests
	$(VENV)/bin/mypy

test: install-test
	$(VENV)/bin/ruff check authz
	$(VENV)/bin/mypy
	$(VENV)/bin/pytest -q
