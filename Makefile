# The ways in: `make demo` runs a local network with transactions going through; `make test` runs every test.
VENV := .venv
PYTHON := $(VENV)/bin/python
INSTALLED := $(VENV)/.installed
SEEDS ?= 1000
REPLICAS ?= 4,7
JOBS ?= 1
# Workers for the pure tests: one per core (pytest-xdist's "auto").
TEST_WORKERS ?= auto
# 1: traitor replicas and the rest of the adversarial mode (node/traitors.py); 0: network faults only.
ADVERSARIAL ?= 1

.PHONY: test demo sim scenarios lint bench bench-attacks scale clean

$(INSTALLED): pyproject.toml
	test -x $(PYTHON) || python3 -m venv $(VENV)
	$(PYTHON) -m pip install --quiet --upgrade pip
	$(PYTHON) -m pip install --quiet -e '.[test]'
	touch $(INSTALLED)

# Two passes: the pure tests (simulator, core, codecs) on every core at once, then the tests that
# start real replica processes one at a time, so that their timeouts never race a busy CPU.
test: $(INSTALLED)
	$(VENV)/bin/ruff check ledger node client tests
	$(VENV)/bin/pytest -q -m "not integration" -n $(TEST_WORKERS) --durations=10
	$(VENV)/bin/pytest -q -m integration --durations=15

demo: $(INSTALLED)
	$(VENV)/bin/ledger-node demo

# A longer sweep than CI runs: `make sim SEEDS=20000 JOBS=2`, or replay one seed: `make sim SEED=42 REPLICAS=4`.
sim: $(INSTALLED)
	$(VENV)/bin/ledger-node simulate --replicas $(REPLICAS) --jobs $(JOBS) $(if $(filter 1,$(ADVERSARIAL)),--adversarial) $(if $(SEED),--seed $(SEED),--seeds $(SEEDS))

# Every attack scenario real replica processes can run (the rest are listed as skipped), at n=4 and n=7;
# `ledger-scenario run --all --sim` runs them all in the simulator.
scenarios: $(INSTALLED)
	status=0; for replicas in 4 7; do $(VENV)/bin/ledger-scenario run --all --replicas $$replicas || status=1; done; exit $$status

# Throughput and latency of local 4- and 7-replica networks against this machine's CPU floor
# (timings live here, never in tests): `make bench BENCH_ARGS="--sweep"`, "--scenario silent-primary", "--long".
bench: $(INSTALLED)
	$(VENV)/bin/ledger-bench --replicas 4,7 $(BENCH_ARGS)

# Throughput while each attack scenario's f traitors run, as a fraction of a fault-free run (Aardvark's measure);
# the scenarios the bench cannot stage (f+1 traitors, timelines, twins) are listed with the command that runs them.
bench-attacks: $(INSTALLED)
	$(VENV)/bin/ledger-bench --replicas 4 --duration 10 --scenario all $(BENCH_ARGS)

# A replica's start against its history: chains of 10k and 100k transactions (`make scale SCALE_ARGS="10000 1000000"`),
# timed before (replay from genesis) and after (durable state) in one process, then with real `ledger-node run`
# processes: a restart to its first status answer and a new replica's join by state sync to caught up.
# CPU_LOCK=/path makes each measured part hold an exclusive flock on that file (not `flock /path make scale`: the
# second script's own lock would wait for that one forever). Timings live here, never in tests.
scale: $(INSTALLED)
	cd tests && $(if $(CPU_LOCK),flock $(CPU_LOCK)) ../$(PYTHON) scale_restart.py $(SCALE_ARGS)
	cd tests && ../$(PYTHON) scale_processes.py $(if $(CPU_LOCK),--cpu-lock $(CPU_LOCK)) $(SCALE_ARGS)

lint: $(INSTALLED)
	$(VENV)/bin/ruff check ledger node client tests

clean:
	rm -rf $(VENV) demo-net .pytest_cache .ruff_cache .hypothesis
