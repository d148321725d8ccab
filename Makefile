# One command sets everything up and runs the default experiment; one runs the tests.
PY ?= python3
VENV := .venv
BIN := $(VENV)/bin
# The CPU wheel of PyTorch is pinned so pip never pulls a multi-GB CUDA build.
TORCH_PIN := torch==2.13.0

.PHONY: setup run test test-fast paper bench clean proto fuzz tables

# Independent prerequisites build side by side: `make test` sets up .venv and the SkyPilot
# venv at once (most of each is one pip process unpacking and compiling on one core).
MAKEFLAGS += -j2

$(BIN)/skyfed: pyproject.toml
	$(PY) -m venv $(VENV)
	$(BIN)/pip install -q $(TORCH_PIN) -e '.[dev]'
	touch $@

setup: $(BIN)/skyfed

run: setup
	$(BIN)/skyfed run

# Four pytest-xdist workers (a file each at a time): most end-to-end tests wait on their
# processes, so four overlap well on two cores; the 20 slowest tests are listed at the end.
PYTEST_WORKERS ?= 4
test: setup .venv-sky/bin/python
	$(BIN)/python -m pytest -n $(PYTEST_WORKERS) --dist loadfile --durations=20
	.venv-sky/bin/python -m pytest -p no:cacheprovider tests/test_deploy_skypilot.py

# SkyPilot pins an older click than transformers' hub client allows, so the test that
# loads the deploy/skypilot/ YAMLs with SkyPilot's own API runs in a venv of its own.
.venv-sky/bin/python:
	$(PY) -m venv .venv-sky
	.venv-sky/bin/pip install -q "skypilot==0.14.1" "pytest>=8"

# The unit tests only: everything that starts no process (about a minute).
test-fast: setup
	$(BIN)/python -m pytest -n $(PYTEST_WORKERS) --dist loadfile -m "not processes"

# The paper's three experiments (45 runs, 120 min measured at one thread a run) into runs/suite-paper/; docs/results.md.
# `PYTHONPATH=src .venv/bin/python bench/paper_suite.py collect` then commits their summaries.
paper: setup
	$(BIN)/skyfed suite paper

# Rewrite the generated tables in docs/ (between <!-- table: NAME --> markers) and the
# figures of docs/results.md's experiments and docs/compression.md from the committed
# bench/results files: the JSONs and the paper suite's run summaries (bench/doc_tables.py,
# --check only compares; bench/paper_suite.py; bench/plot_compression.py).
tables: setup
	PYTHONPATH=src $(BIN)/python bench/doc_tables.py
	PYTHONPATH=src $(BIN)/python bench/paper_suite.py figures
	PYTHONPATH=src $(BIN)/python bench/plot_compression.py

# 10^5 mutated inputs per target through the update decoder, the client's model receiver and
# the gRPC PushUpdate handler (bench/fuzz.py); writes bench/results/fuzz.json. ARGS="--n 2000" for a short run.
fuzz: setup
	PYTHONPATH=src nice -n 10 $(BIN)/python bench/fuzz.py $(ARGS)

# Regenerate the gRPC modules from src/skyfed/runtime/grpc/skyfed.proto (needs grpcio-tools).
proto:
	PY=$(BIN)/python scripts/gen_proto.sh

clean:
	rm -rf $(VENV) runs .pytest_cache

# Flower is a benchmark-only dependency, in its own venv (never in .venv): skyfed vs Flower FedAvg.
.venv-flower/bin/python:
	$(PY) -m venv .venv-flower
	.venv-flower/bin/pip install -q $(TORCH_PIN) "flwr[simulation]==1.42.0" transformers tokenizers safetensors numpy pydantic pyyaml

.PHONY: bench-flower
bench-flower: setup .venv-flower/bin/python
	PYTHONPATH=src $(BIN)/python bench/vs_flower.py --flower-python .venv-flower/bin/python $(ARGS)
