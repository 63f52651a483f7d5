# tspack: `make demo` runs the main job, `make test` the tests. Both set everything up on a fresh clone.
SHELL := /bin/bash
PYTHON ?= $(shell command -v python3.11 || command -v python3)
VENV := .venv
BIN := $(VENV)/bin
STAMP := $(VENV)/.tspack-installed

.PHONY: setup java demo test lint unit integration bench reliability stop clean

$(STAMP): setup.cfg pyproject.toml
	@scripts/check_java.sh
	@test -x $(BIN)/python || $(PYTHON) -m venv $(VENV)
	$(BIN)/python -m pip install --quiet --disable-pip-version-check -e '.[demo,dev]'
	@touch $@

setup: $(STAMP)

java:
	@scripts/check_java.sh

demo: java $(STAMP)
	$(BIN)/python scripts/demo.py

lint: $(STAMP)
	$(BIN)/ruff check .

test: java $(STAMP) lint
	$(BIN)/python -m pytest -q

unit: $(STAMP)
	$(BIN)/python -m pytest -q tests/unit

integration: java $(STAMP)
	$(BIN)/python -m pytest -q tests/integration

stop: $(STAMP)
	$(BIN)/tspack serve stop

clean:
	-$(BIN)/tspack serve stop 2>/dev/null
	rm -rf .tspack model_store/*.mar model_store/*.war model_store/work model_store/build_report.json
