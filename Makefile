# The two commands a new user needs: `make demo` and `make test`.
PYTHON ?= python3
VENV := .venv
BIN := $(VENV)/bin
STAMP := $(VENV)/.installed

.PHONY: install demo test test-fast clean

$(STAMP): pyproject.toml
	test -x $(BIN)/python || $(PYTHON) -m venv $(VENV)
	$(BIN)/python -m pip install -q --upgrade pip
	$(BIN)/python -m pip install -q -e '.[test]'
	touch $(STAMP)

install: $(STAMP)

## Start the sandbox, run the main job over the demo's 30 days on the embedded SQLite instance, print the result.
demo: install
	bash scripts/demo.sh

# Dagster's SQLite event log opens a connection per event; on tmpfs the suite's many short-lived instances run
# several times faster than on disk.
TEST_TMP := $(shell test -w /dev/shm && echo /dev/shm || echo /tmp)

## The whole suite (unit, HTTP, sandbox, Dagster end-to-end, PostgreSQL).
test: install
	TMPDIR=$(TEST_TMP) $(BIN)/python -m pytest -q

clean:
	rm -rf .dagster_home .demo .pytest_cache
