# The two commands a new user needs: `make demo` and `make test`.
PYTHON ?= python3
VENV := .venv
BIN := $(VENV)/bin
STAMP := $(VENV)/.installed

.PHONY: install demo test test-slow clean chromium

# `browser` brings the Playwright driver only; the browser is Debian's Chromium (see `chromium`), never a download.
$(STAMP): pyproject.toml sandbox/pyproject.toml Makefile
	test -x $(BIN)/python || $(PYTHON) -m venv $(VENV)
	$(BIN)/python -m pip install -q --upgrade pip
	$(BIN)/python -m pip install -q -e '.[test,browser]' -e ./sandbox
	touch $(STAMP)

install: $(STAMP)

## Start the sandbox, run the main job over the demo's 30 days on the embedded SQLite instance, print the result.
demo: install
	bash scripts/demo.sh

# Dagster's SQLite event log opens a connection per event; on tmpfs the suite's many short-lived instances run
# several times faster than on disk.
TEST_TMP := $(shell test -w /dev/shm && echo /dev/shm || echo /tmp)

## Debian's Chromium for the browser test of the Dagster UI (tests/browser), installed only if missing.
## Needs root (CI runs as root) or password-less sudo; elsewhere the browser test is skipped, in CI it fails.
chromium:
	@if [ ! -x /usr/bin/chromium ]; then \
	  if [ "$$(id -u)" = 0 ]; then SUDO=; elif sudo -n true 2>/dev/null; then SUDO="sudo -n"; else SUDO=none; fi; \
	  if [ "$$SUDO" != none ] && command -v apt-get >/dev/null; then \
	    $$SUDO env DEBIAN_FRONTEND=noninteractive apt-get update -qq \
	      && $$SUDO env DEBIAN_FRONTEND=noninteractive apt-get install -y -qq chromium >/dev/null \
	      || { echo "apt-get install chromium failed" >&2; [ -z "$$CI" ] || exit 1; }; \
	  else \
	    echo "note: /usr/bin/chromium is missing and cannot be installed here (needs root and apt-get);" \
	         "the browser test will be skipped. Install it with: sudo apt-get install chromium" >&2; \
	    [ -z "$$CI" ] || exit 1; \
	  fi; \
	fi

## The suite (unit, HTTP, sandbox, Dagster end-to-end, PostgreSQL, the Dagster UI in Chromium), about ten minutes.
test: install chromium
	TMPDIR=$(TEST_TMP) $(BIN)/python -m pytest -q -m "not slow"

## The slower proofs (real processes SIGKILLed, the daemon topology, 1,000 property examples, the second EntryID
## mode, real waits), about eight minutes; CI runs them after `make test`.
test-slow: install
	TMPDIR=$(TEST_TMP) $(BIN)/python -m pytest -q -m slow

clean:
	rm -rf .dagster_home .demo .pytest_cache
