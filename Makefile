# The two commands:  `make start` (install, then run the relay on its defaults)
#                    `make test`  (install everything the tests need, then run the whole suite)
PYTHON ?= python3
VENV   := .venv
PY     := $(VENV)/bin/python

.PHONY: start test lint bench bench-quick nodes clean mutate fuzz

start: $(VENV)/.runtime
	$(PY) relay.py serve --demo

test: $(VENV)/.dev
	deploy/install-system-packages.sh
	$(MAKE) tests/js/node_modules/.installed
	$(VENV)/bin/ruff check .
	$(VENV)/bin/lint-imports
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

# Mutation testing (not part of CI; docs/development.md, "Mutation testing"): mutmut 3 ([tool.mutmut] in
# pyproject.toml) over the parts where a silent bug costs most, each mutant run against the tests that
# reach its function. It works in a copy of the tree ($(MUTATE_DIR), which keeps mutmut's cache between
# runs), nice'd. `make mutate SCOPE=webhooks` runs one scope; the last lines are the kill rate per scope.
MUTATE_DIR  ?= /var/tmp/relay-mutate
MUTATE_JOBS ?= 2
SCOPE       ?= webhooks security private ownership ledger
MUTANTS_webhooks  := relay.webhooks.x_address_allowed* relay.webhooks.x__literal* relay.webhooks.x_host_problem* \
                     relay.webhooks.x_check_url* relay.webhooks.xǁGuardedResolverǁresolve*
MUTANTS_security  := relay.security.*
MUTANTS_private   := relay.serve.x__check_token* relay.serve.x__locate* relay.serve.x__stored_auth* \
                     relay.serve.x_read_auth* relay.api.x_tokens* relay.intake.x_resolve_parent* relay.api.x_authorize*
MUTANTS_ownership := relay.facade.common.x_owner_of* relay.facade.common.x_caller* relay.facade.common.x__located* \
                     relay.facade.common.x_find* relay.facade.common.x_owned* relay.facade.common.xǁAnswersǁanswer* \
                     relay.facade.common.x_stored_answer* relay.facade.chat_index.xǁChatIndexǁlisted*
MUTANTS_ledger    := relay.ledger.x_tokens* relay.ledger.x_entry* relay.ledger.x_key_label* relay.ledger.x__int* \
                     relay.ledger.x__text_chars* relay.metrics.xǁMetricsǁcount_tokens*
MUTATE_REPORT := import fnmatch, os, sys; rows = [l.strip().rsplit(": ", 1) for l in sys.stdin if ": " in l]; \
  [print(f"{s:10} {k}/{n} killed ({100 * k / max(n, 1):.1f} %), survivors: {sv}") \
   for s in os.environ["SCOPE"].split() \
   for mine in [[(m, r) for m, r in rows if any(fnmatch.fnmatch(m, g) for g in os.environ["MUTANTS_" + s].split())]] \
   for done in [[(m, r) for m, r in mine if r != "not checked"]] \
   for n, k, sv in [(len(done), sum(r in ("killed", "timeout") for _, r in done), \
                     " ".join(m for m, r in done if r not in ("killed", "timeout")) or "-")]]

mutate: $(VENV)/.dev
	mkdir -p $(MUTATE_DIR)
	tar -c --exclude=./.venv --exclude=./.venv-peer --exclude=./.git --exclude=./data --exclude=./mutants \
	    --exclude=./test-output --exclude=./tests/js/node_modules --exclude=__pycache__ . | tar -x -C $(MUTATE_DIR)
	rm -f $(MUTATE_DIR)/mutants/mutmut-stats.json  # (which tests reach what, learnt afresh: see docs/development.md)
	cd $(MUTATE_DIR) && nice -n 10 $(CURDIR)/$(VENV)/bin/mutmut run --max-children $(MUTATE_JOBS) \
	    $(foreach s,$(SCOPE),$(foreach m,$(MUTANTS_$(s)),'$(m)'))
	cd $(MUTATE_DIR) && $(CURDIR)/$(VENV)/bin/mutmut results --all true | \
	    SCOPE='$(SCOPE)' $(foreach s,$(SCOPE),MUTANTS_$(s)='$(MUTANTS_$(s))') $(CURDIR)/$(PY) -c '$(MUTATE_REPORT)'

# The generated tests, long (not part of CI; docs/security.md, "Fuzzing"): random upstream streams (2,000
# examples, the `fuzz` Hypothesis profile), hostile header bytes and schemathesis at their higher counts.
fuzz: $(VENV)/.dev
	HYPOTHESIS_PROFILE=fuzz RELAY_FUZZ_EXAMPLES=300 RELAY_FUZZ_SCENARIOS=300 $(PY) -m pytest -x -p no:timeout \
	    tests/test_upstream_fuzz.py tests/test_hostile_bytes.py tests/test_openapi.py

lint: $(VENV)/.dev
	$(VENV)/bin/ruff check . && $(VENV)/bin/ruff format --check . && $(VENV)/bin/lint-imports

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
