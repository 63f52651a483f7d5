# tspack: `make demo` runs the main job, `make test` the tests. Both set everything up on a fresh clone.
SHELL := /bin/bash
PYTHON ?= $(shell command -v python3.11 || command -v python3)
VENV := .venv
BIN := $(VENV)/bin
STAMP := $(VENV)/.tspack-installed

.PHONY: setup java demo test lint unit integration bench bench-optimize bench-preprocess bench-ab reliability stop clean

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

# The serving benchmark (GitHub issue 6): tspack vs the model alone, a naive TorchServe, FastAPI and LitServe.
# ~15 min; QUICK=1: light model only, fewer configurations, shorter runs (~2 min). Peers get benchmarks/.venv.
bench: java $(STAMP)
	$(BIN)/python -m benchmarks.bench $(if $(QUICK),--quick)

# In-process optimization figures (issue 3): int8 and ONNX Runtime speed, size and agreement.
bench-optimize: $(STAMP)
	$(BIN)/python benchmarks/optimize_bench.py

# The A/B paths under load (issue 5): direct, router, router + shadow, .war; 60 s each.
bench-ab: java $(STAMP)
	$(BIN)/python benchmarks/ab_bench.py

# Image preprocessing vs torchvision (issue 4); torchvision goes into benchmarks/.venv-vision only.
bench-preprocess: $(STAMP)
	$(BIN)/python benchmarks/preprocess_bench.py

# Reliability, security and monitoring (GitHub issue 8) against a real TorchServe: version swap, worker crash,
# overload, a 5-minute soak, bad input, security, metrics. ~7 min; QUICK=1: 60 s soak (~3-4 min).
# Writes RELIABILITY.md and benchmarks/results/reliability.json.
reliability: java $(STAMP)
	$(BIN)/python -m benchmarks.reliability $(if $(QUICK),--quick)

stop: $(STAMP)
	$(BIN)/tspack serve stop

clean:
	-$(BIN)/tspack serve stop 2>/dev/null
	rm -rf .tspack model_store/*.mar model_store/*.war model_store/work model_store/build_report.json
