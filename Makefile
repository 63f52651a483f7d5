# tspack: `make demo` runs the main job, `make test` the tests. Both set everything up on a fresh clone.
SHELL := /bin/bash
PYTHON ?= $(shell command -v python3.11 || command -v python3)
VENV := .venv
BIN := $(VENV)/bin
STAMP := $(VENV)/.tspack-installed

.PHONY: setup java tools demo test lint unit integration bench bench-optimize bench-preprocess bench-ab bench-cache reliability stop clean

$(STAMP): setup.cfg pyproject.toml
	@scripts/check_java.sh
	@test -x $(BIN)/python || $(PYTHON) -m venv $(VENV)
	$(BIN)/python -m pip install --quiet --disable-pip-version-check -e '.[demo,dev,hf]'
	@touch $@

setup: $(STAMP)

java:
	@scripts/check_java.sh

# promtool and nginx for the alerts.yaml and nginx-snippet tests (installed for root; the tests skip without them).
tools:
	@scripts/check_tools.sh

demo: java $(STAMP)
	$(BIN)/python scripts/demo.py

lint: $(STAMP)
	$(BIN)/ruff check .

test: java tools $(STAMP) lint
	$(BIN)/python -m pytest -q

unit: $(STAMP)
	$(BIN)/python -m pytest -q tests/unit

integration: java $(STAMP)
	$(BIN)/python -m pytest -q tests/integration

# The serving benchmark (GitHub issues 6, 19): tspack vs the model alone, a naive TorchServe, FastAPI and LitServe, in
# interleaved rounds (~16 min), then the text benchmark (issue 13: BERT-style classifier vs a FastAPI peer, ~3.5 min).
# QUICK=1: light model only, one configuration each, 2 rounds (~2-3 min), and a short text run. Peers get benchmarks/.venv.
bench: java $(STAMP)
	$(BIN)/python -m benchmarks.bench $(if $(QUICK),--quick)
	$(BIN)/python -m benchmarks.text_bench $(if $(QUICK),--quick)

# In-process optimization figures (issue 3): int8 and ONNX Runtime speed, size and agreement.
bench-optimize: $(STAMP)
	$(BIN)/python -m benchmarks.optimize_bench

# The A/B paths under load (issue 5): direct, router, router + shadow, .war; 60 s each.
bench-ab: java $(STAMP)
	$(BIN)/python -m benchmarks.ab_bench

# The response cache (issue 21): 50% repeated inputs, light model, c=32, cache on vs off interleaved; hit p50. ~3 min.
bench-cache: java $(STAMP)
	$(BIN)/python -m benchmarks.cache_bench

# Image preprocessing vs torchvision (issue 4); torchvision goes into benchmarks/.venv-vision only.
bench-preprocess: $(STAMP)
	$(BIN)/python -m benchmarks.preprocess_bench

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

.PHONY: image image-test

# The serving image (GitHub issue 16) from this venv's exact versions: starts dockerd when none answers (root),
# makes the Debian base with debootstrap when it cannot be pulled. Needs the archives (tspack build) first.
image: $(STAMP)
	scripts/image.sh

# Not part of `make test` (the build is long): builds the demo's archives and the image, runs the container,
# waits for its health check, predicts with the container's key, reads the metrics port, sends SIGTERM under
# load, and writes the image size and start-to-ready time into docker/README.md.
image-test: $(STAMP)
	$(BIN)/python scripts/image_test.py
