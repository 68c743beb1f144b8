# Two commands for a fresh machine (see README):
#   make run    install and run the service on its embedded default (in-memory store, --dev)
#   make test   install what the tests need and run the whole suite
PYTHON ?= python3
VENV   ?= .venv
PY     := $(VENV)/bin/python
PIP    := $(VENV)/bin/pip

# xds-protos ships an old copy of opentelemetry/proto/*_pb2 that overwrites
# opentelemetry-proto's and breaks the OTLP exporters: after installing, put the right files back.
FIX_OTEL_PROTO = $(PIP) install -q --force-reinstall --no-deps \
  "opentelemetry-proto==$$($(PY) -c 'import importlib.metadata as m; print(m.version("opentelemetry-proto"))')"

.PHONY: run test lint install install-test image test-image

$(VENV)/bin/activate:
	$(PYTHON) -m venv $(VENV)

install: $(VENV)/bin/activate
	$(PIP) install -q -e .
	@$(FIX_OTEL_PROTO)

install-test: $(VENV)/bin/activate
	$(PIP) install -q -e '.[test,load]'
	@$(FIX_OTEL_PROTO)
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

image:
	bash scripts/image/build.sh

test-image: install-test
	$(VENV)/bin/pytest -q -m image tests/image
