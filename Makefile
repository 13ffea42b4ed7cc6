# The commands a user types. `make test` and `make demo` work from a fresh clone:
# each installs what it needs into .venv first (fast when already done).
PYTHON ?= python3
VENV := .venv
PY := $(VENV)/bin/python
STAMP := $(VENV)/.installed
MODEL ?= breast_cancer

.PHONY: install proto proto-check test lint demo bench clean

install: $(STAMP)

$(STAMP): pyproject.toml
	test -x $(PY) || $(PYTHON) -m venv $(VENV)
	$(PY) -m pip install -q --upgrade pip
	# torch first and pinned: pip takes the local CPU build, never a CUDA download
	$(PY) -m pip install -q torch==2.13.0
	$(PY) -m pip install -q -e '.[dev]'
	touch $(STAMP)

proto: $(STAMP)
	$(PY) -m grpc_tools.protoc -Iprotos --python_out=. --pyi_out=. --grpc_python_out=. \
		protos/fl_proto/*.proto
	touch fl_proto/__init__.py

test: $(STAMP)
	$(PY) -m pytest -q tests

lint: $(STAMP)
	$(PY) -m ruff check fl_core fl_server fl_client fl_models fl_demo fl_sim tests bench
	$(PY) -m mypy

demo: $(STAMP)
	$(PY) -m fl_demo --model_type $(MODEL)

bench: $(STAMP)
	$(PY) -m bench

clean:
	rm -rf $(VENV) .pytest_cache .mypy_cache
