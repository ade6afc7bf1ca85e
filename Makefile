# The two commands:  `make start` (install, then run the relay on its defaults)
#                    `make test`  (install everything the tests need, then run the whole suite)
PYTHON ?= python3
VENV   := .venv
PY     := $(VENV)/bin/python

.PHONY: start test lint bench bench-quick nodes clean

start: $(VENV)/.runtime
	$(PY) relay.py serve --demo

test: $(VENV)/.dev
	deploy/install-system-packages.sh
	$(MAKE) tests/js/node_modules/.installed
	$(VENV)/bin/ruff check .
	$(PY) -m pytest

# the official OpenAI JavaScript SDK, pinned by tests/js/package-lock.json (tests/test_openai_js.py)
tests/js/node_modules/.installed: tests/js/package.json tests/js/package-lock.json
	cd tests/js && npm ci --no-audit --no-fund --loglevel=error
	touch $@

bench: $(VENV)/.dev .venv-peer/.installed
	deploy/install-system-packages.sh --bench
	$(PY) bench/run.py --out docs/benchmarks.md --json docs/benchmarks.json

bench-quick: $(VENV)/.dev .venv-peer/.installed
	deploy/install-system-packages.sh --bench
	$(PY) bench/run.py --quick

# the peer the benchmarks compare with (LiteLLM's proxy), in a venv of its own
.venv-peer/.installed: bench/requirements-peer.txt bench/constraints-peer.txt
	$(PYTHON) -m venv .venv-peer
	.venv-peer/bin/pip install --quiet --disable-pip-version-check -r bench/requirements-peer.txt -c bench/constraints-peer.txt
	touch $@

# one relay process per core (nodes 1…N on ports 8081…), for nginx's relay_all upstream in front
N ?= $(shell nproc)
nodes: $(VENV)/.runtime
	$(PY) relay.py nodes --count $(N)

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
	rm -rf $(VENV) .venv-peer .pytest_cache .ruff_cache
