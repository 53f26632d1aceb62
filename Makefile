# Two commands on a fresh machine: `make run` (the main job) and `make test` (what CI runs).
PYTHON ?= python3
VENV ?= .venv
BIN := $(VENV)/bin
# The CPU build of torch; installed first so no dependency can pull a multi-GB CUDA build.
# On a GPU machine: make TORCH="torch==2.13.0 --index-url https://download.pytorch.org/whl/cu128"
TORCH ?= torch==2.13.0

.PHONY: run install install-test test test-all lint format bench clean

$(BIN)/python:
	$(PYTHON) -m venv $(VENV)
	$(BIN)/python -m pip install --quiet --upgrade pip

$(VENV)/.installed: pyproject.toml | $(BIN)/python
	$(BIN)/python -m pip install --quiet $(TORCH)
	$(BIN)/python -m pip install --quiet -e .
	touch $@

$(VENV)/.installed-test: pyproject.toml $(VENV)/.installed
	$(BIN)/python -m pip install --quiet -e '.[test]'
	touch $@

install: $(VENV)/.installed
install-test: $(VENV)/.installed-test

# Serves the default model at http://127.0.0.1:8000/v1 until Ctrl-C, and the web console at
# http://127.0.0.1:8000/ (sorai serve prints both addresses).
run: install
	$(BIN)/sorai pull
	$(BIN)/sorai serve

lint: install-test
	$(BIN)/ruff check sorai tests benchmarks examples
	$(BIN)/ruff format --check sorai tests benchmarks examples

format: install-test
	$(BIN)/ruff format sorai tests benchmarks examples
	$(BIN)/ruff check --fix sorai tests benchmarks examples

# The default tier, what CI runs: every case not marked slow (each capability keeps a real-model
# or real-server case here), in under 10 minutes on 2 cores. Two worker processes, each file on
# one worker (its module fixtures, such as a live server, start once): much of a case's time is
# waiting on a server or a subprocess, which the other worker fills. TEST_WORKERS=0 runs serially.
# The files of the longest cases (torchrun layouts, training faults) are handed out first, so
# that neither worker is left with one of them at the end while the other idles.
TEST_WORKERS ?= 2
FIRST_TESTS = tests/train/test_parallel.py tests/train/test_faults.py
test: lint
	$(BIN)/python -m pytest -m "not slow" -q --durations=40 -n $(TEST_WORKERS) --dist loadfile \
		$(FIRST_TESTS) tests

# Everything: also the slow tier (the long real-model runs, every parallel layout, the property
# tests), about half an hour on 2 cores.
test-all: lint
	$(BIN)/python -m pytest -q -n $(TEST_WORKERS) --dist loadfile

bench: install-test
	$(BIN)/python benchmarks/bench_generate.py
	$(BIN)/python benchmarks/bench_serving.py

clean:
	rm -rf $(VENV) .pytest_cache .ruff_cache *.egg-info
