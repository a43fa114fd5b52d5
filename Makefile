# lab-platform: the two commands are `make demo` and `make test`.
SHELL := /bin/bash
PYTHON ?= python3
VENV ?= .venv
PY := $(VENV)/bin/python
PIP := $(VENV)/bin/pip
STAMPS := .stamps
PYTEST_ARGS ?=

.PHONY: help test unit integration e2e lint bench deps deps-system venv clean demo demo-down

help:
	@echo "make demo       virtual lab: a bastion PXE-boots QEMU machines and discovers them"
	@echo "make demo-down  stop the demo lab"
	@echo "make test       install everything and run every test (what CI runs)"
	@echo "make unit | integration | e2e | lint | bench"

deps: deps-system venv

deps-system:
	@bash scripts/install-system-deps.sh

$(STAMPS)/venv-%: pyproject.toml
	@mkdir -p $(STAMPS)
	@test -x $(PY) || $(PYTHON) -m venv $(VENV)
	$(PIP) install --quiet --upgrade pip
	$(PIP) install --quiet -e '.[test]'
	@rm -f $(STAMPS)/venv-* && touch $@

venv: $(STAMPS)/venv-$(shell sha1sum pyproject.toml | cut -c1-12)

# the molecule scenarios run beside the other tests (scripts/test.sh says why)
test: deps
	$(PY) -m ruff check .
	scripts/test.sh $(PY) $(PYTEST_ARGS)

unit: deps
	$(PY) -m pytest tests/unit $(PYTEST_ARGS)

integration: deps
	$(PY) -m pytest tests/integration $(PYTEST_ARGS)

e2e: deps
	$(PY) -m pytest tests/e2e $(PYTEST_ARGS)

lint: deps
	$(PY) -m ruff check .

bench: deps
	@for b in bench/*.py; do echo "== $$b"; $(PY) $$b || exit 1; done

# The virtual lab keeps running after `make demo` returns; its state is under DEMO_DIR.
DEMO_DIR ?= /run/lab-platform-demo

demo: deps
	$(PY) -m tests.e2e.lab demo $(DEMO_DIR)

demo-down:
	@if [ -x $(PY) ]; then $(PY) -m tests.e2e.lab down $(DEMO_DIR); else echo "no virtualenv: nothing was started"; fi

clean:
	rm -rf $(VENV) $(STAMPS) .pytest_cache .hypothesis
