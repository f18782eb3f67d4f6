"""Progress of long runs as plain events: the posting loop, the assets and the rate-limit pacing publish them, and
whoever watches in this process (the CLI's display) subscribes. Without a subscriber, publishing does nothing.

Runs started by `expensify-exact run` execute in this process (Dagster's in-process executor), so the events of
their steps reach the CLI directly; runs in the daemon's processes have no subscriber.
"""

from __future__ import annotations

import logging
import threading
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass, field
from datetime import datetime

logger = logging.getLogger(__name__)


@dataclass(frozen=True)
class Phase:
    """A connection's run moved on to a step that has no countable items (an export, a snapshot)."""
    connection: str
    text: str


@dataclass(frozen=True)
class ReportsPlanned:
    """The reports about to be posted (or replayed), per approval day."""
    connection: str
    reports_per_day: dict[str, int]


@dataclass(frozen=True)
class ReportSettled:
    connection: str
    day: str
    report_id: str
    outcome: str  # posted | already_posted | quarantined | deferred
    reason: str | None = None  # why this one report was deferred (no certain answer, not sent, ...)


@dataclass(frozen=True)
class DayDone:
    connection: str
    day: str
    counts: dict[str, int] = field(default_factory=dict)  # outcome -> reports


@dataclass(frozen=True)
class Waiting:
    """A request waits for an API's rate limit; published before the wait starts."""
    service: str  # exact | expensify
    seconds: float
    reason: str
    until: datetime | None = None


@dataclass(frozen=True)
class PostingStopped:
    """Nothing more goes through the connection in this run (Exact's daily call budget or an endpoint's hourly
    error budget is spent, or Exact refused the connection: 401 after a refresh, 403): the rest is deferred to the
    next run, not waited for."""
    connection: str
    deferred: int
    reason: str
    resets_at: str | None = None


Event = Phase | ReportsPlanned | ReportSettled | DayDone | Waiting | PostingStopped

_subscribers: list[Callable[[Event], None]] = []
_lock = threading.Lock()


def publish(event: Event) -> None:
    """Hand `event` to every subscriber. A subscriber's error is logged and never reaches the publisher."""
    with _lock:
        subscribers = list(_subscribers)
    for subscriber in subscribers:
        try:
            subscriber(event)
        except Exception:  # noqa: BLE001 - a display must never break a posting
            logger.exception("progress subscriber failed on %s", type(event).__name__)


@contextmanager
def subscribed(subscriber: Callable[[Event], None]) -> Iterator[None]:
    with _lock:
        _subscribers.append(subscriber)
    try:
        yield
    finally:
        with _lock:
            _subscribers.remove(subscriber)
