#!/usr/bin/env bash
# A Celery worker for runs of the code location with EXPENSIFY_EXACT_EXECUTOR=celery: it takes steps from the broker
# and runs each in a process of its pool. Start as many as you like, on any host that reaches the broker, the Dagster
# instance's database and storage and the connector's state DB. docs/scaling-out.md
#
#   scripts/celery-worker.sh [celery worker options, e.g. --hostname w1@%h --concurrency 4]
#
# Reads the same environment as the code server: DAGSTER_HOME (and the DAGSTER_PG_* its dagster.yaml names),
# EXPENSIFY_EXACT_STATE_URL, EXPENSIFY_EXACT_KEY or EXPENSIFY_EXACT_KEY_FILE, EXPENSIFY_EXACT_MAPPINGS, and
# EXPENSIFY_EXACT_CELERY_BROKER / EXPENSIFY_EXACT_CELERY_BACKEND (default: RabbitMQ on 127.0.0.1:5672, rpc://).
set -euo pipefail
cd "$(dirname "$0")/.."
CELERY=.venv/bin/celery
[ -x "$CELERY" ] || CELERY=celery  # an installed wheel: the one on PATH
export EXPENSIFY_EXACT_EXECUTOR=celery  # a worker rebuilds each step's job: the same one its run executes
# Each pool process reserves one step at most (as `dagster-celery worker start` does): a worker busy with long steps
# leaves the queued ones to the idle workers.
exec "$CELERY" -A expensify_exact.defs.executor worker --prefetch-multiplier=1 --loglevel=INFO "$@"
