# The two commands:  `make start` (install, then run the relay on its defaults)
#                    `make test`  (install everything the tests need, then run the whole suite)
PYTHON ?= python3
VENV   := .venv
PY     := $(VENV)/bin/python

.PHONY: start test lint bench bench-quick clean

start: $(VENV)/.runtime
	$(PY) relay.py serve --demo

test: $(VENV)/.dev
	deploy/install-system-packages.sh
	$(VENV)/bin/ruff check .
	$(PY) -m pytest

bench: $(VENV)/.dev
	deploy/install-system-packages.sh --bench
	$(PY) bench/run.py --out docs/benchmarks.md --json docs/benchmarks.json

bench-quick: $(VENV)/.dev
	deploy/install-system-packages.sh --bench
	$(PY) bench/run.py --quick

lint: $(VENV)/.dev
	$(VENV)/bin/ruff check . && $(VENV)/bin/ruff format --check .

$(VENV)/.venv:
	$(PYTHON) -m venv $(VENV)
	touch $@

$(VENV)/.runtime: $(VENV)/.venv requirements.txt constraints.txt
	$(PY) -m pip install --quiet --disable-pip-version-check -r requirements.txt -c constraints.txt
	touch $@

$(VENV)/.dev: $(VENV)/.runtime requirements-dev.txt
	$(PY) -m pip install --quiet --disable-pip-version-check -r requirements-dev.txt -c constraints.txt
	touch $@

clean:
	rm -rf $(VENV) .pytest_cache .ruff_cache
