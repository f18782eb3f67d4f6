"""The executor of the code location's jobs, chosen by the operator in `$EXPENSIFY_EXACT_EXECUTOR`: Dagster's default
(each step a process next to its run) or Celery (steps spread over worker processes on any host), docs/scaling-out.md.
"""

from __future__ import annotations

import os
from functools import cache

import dagster as dg

from expensify_exact.config import ProjectConfig

EXECUTOR_ENV = "EXPENSIFY_EXACT_EXECUTOR"
BROKER_ENV = "EXPENSIFY_EXACT_CELERY_BROKER"
BACKEND_ENV = "EXPENSIFY_EXACT_CELERY_BACKEND"
QUEUE_ENV = "EXPENSIFY_EXACT_CELERY_QUEUE"
MULTIPROCESS, CELERY = "multiprocess", "celery"
DEFAULT_BROKER = "pyamqp://guest@127.0.0.1:5672//"
# Results travel back to the run over the broker itself: nothing else to run or install.
DEFAULT_BACKEND = "rpc://"
DEFAULT_QUEUE = "dagster"  # dagster-celery's own


def celery_queue() -> str:
    """The queue steps go to; deployments that share a broker each take their own."""
    return os.environ.get(QUEUE_ENV) or DEFAULT_QUEUE


def celery_settings() -> dict:
    """The celery executor's config: the broker, result backend and queue that the run submitting steps and the
    workers taking them share."""
    return {"broker": os.environ.get(BROKER_ENV) or DEFAULT_BROKER,
            "backend": os.environ.get(BACKEND_ENV) or DEFAULT_BACKEND,
            "config_source": {"task_default_queue": celery_queue()}}


def chosen_executor() -> str:
    choice = (os.environ.get(EXECUTOR_ENV) or MULTIPROCESS).strip().lower()
    if choice not in (MULTIPROCESS, CELERY):
        raise ValueError(f"{EXECUTOR_ENV}={choice!r}: expected {MULTIPROCESS!r} or {CELERY!r}")
    return choice


def build(config: ProjectConfig) -> dg.Definitions:
    if chosen_executor() == MULTIPROCESS:
        # Dagster's default, named so that this module stays the one place that sets the executor.
        return dg.Definitions(executor=dg.multi_or_in_process_executor)
    from dagster_celery import celery_executor

    return dg.Definitions(executor=celery_executor.configured(celery_settings(), name=CELERY))


@cache
def worker_app():
    """The Celery app of `scripts/celery-worker.sh` (`celery -A expensify_exact.defs.executor worker`): dagster-celery's
    app and step task, built from the same settings as the executor's, so both meet on one broker and queue."""
    from dagster_celery.executor import CeleryExecutor
    from dagster_celery.make_app import make_app
    from dagster_celery.tasks import create_task

    app = make_app(CeleryExecutor.for_cli(**celery_settings()).app_args())  # as dagster-celery's own CLI builds it
    create_task(app)
    # Consume the queue the executor submits to, declared the way the submitting run declares it (dagster-celery's
    # `dagster` queue, or one Celery creates on first use).
    app.amqp.queues.select([celery_queue()])
    return app


def __getattr__(name: str):
    # Celery looks for `app` in the module it is given; built on that first look only, so loading the code location
    # imports no Celery.
    if name == "app":
        return worker_app()
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
