# The commands a user types. `make test` and `make demo` work from a fresh clone:
# each installs what it needs into .venv first (fast when already done).
PYTHON ?= python3
VENV := .venv
PY := $(VENV)/bin/python
STAMP := $(VENV)/.installed
MODEL ?= breast_cancer
# Test folders run on this many pytest-xdist workers (tests/conftest.py groups them);
# TEST_WORKERS=0 runs the suite in this one process.
TEST_WORKERS ?= 2

.PHONY: install proto proto-check test lint demo bench clean system-deps

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

test: $(STAMP) system-deps
	$(PY) -m pytest -q -n $(TEST_WORKERS) --dist loadgroup tests

# The dashboard test drives Debian's chromium and the metrics test runs promtool (package
# prometheus): installed here only when missing and running as root; otherwise those
# tests skip and print the command.
system-deps:
	@if [ "$$(id -u)" = 0 ] && command -v apt-get >/dev/null && \
		{ ! command -v chromium >/dev/null || ! command -v promtool >/dev/null; }; then \
		echo "installing chromium and prometheus (promtool) with apt-get"; \
		{ apt-get update -q && DEBIAN_FRONTEND=noninteractive apt-get install -y -q \
			--no-install-recommends chromium prometheus; } >/dev/null \
			|| echo "apt-get failed: the dashboard/promtool tests will skip"; fi

lint: $(STAMP)
	$(PY) -m ruff check fl_core fl_server fl_client fl_models fl_demo fl_sim tests bench
	$(PY) -m mypy

demo: $(STAMP)
	$(PY) -m fl_demo --model_type $(MODEL)

bench: $(STAMP)
	$(PY) -m bench

clean:
	rm -rf $(VENV) .pytest_cache .mypy_cache
