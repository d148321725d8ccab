# One command sets everything up and runs the default experiment; one runs the tests.
PY ?= python3
VENV := .venv
BIN := $(VENV)/bin
# The CPU wheel of PyTorch is pinned so pip never pulls a multi-GB CUDA build.
TORCH_PIN := torch==2.13.0

.PHONY: setup run test bench clean proto

$(BIN)/skyfed: pyproject.toml
	$(PY) -m venv $(VENV)
	$(BIN)/pip install -q $(TORCH_PIN) -e '.[test]'
	touch $@

setup: $(BIN)/skyfed

run: setup
	$(BIN)/skyfed run

test: setup
	$(BIN)/python -m pytest

# Regenerate the gRPC modules from src/skyfed/runtime/grpc/skyfed.proto (needs grpcio-tools).
proto:
	PY=$(BIN)/python scripts/gen_proto.sh

clean:
	rm -rf $(VENV) runs .pytest_cache
