# The two commands a fresh machine needs:  make run  (the demo)  and  make test  (all tests).
VENV := .venv
PY := $(VENV)/bin/python

.PHONY: setup tools run test lint bench clean

setup:
	@hack/setup >/dev/null

tools:
	@hack/tools >/dev/null
	@hack/test-deps >/dev/null

run: setup
	$(VENV)/bin/atlax demo

test: setup tools
	$(PY) -m pytest -q

lint: setup
	$(VENV)/bin/ruff check atlax operator tests
	$(VENV)/bin/ruff format --check atlax operator tests
	$(VENV)/bin/mypy
	$(VENV)/bin/lint-imports --no-cache

bench: setup
	$(PY) -m atlax.bench --json bench-results/bench.json

clean:
	rm -rf $(VENV) .tools bench-results
