"""Decides when a request may go out: a transport wrapper plus per-API rate-limit policies."""

from __future__ import annotations

import threading
from collections import deque
from collections.abc import Sequence
from dataclasses import dataclass
from datetime import datetime, timedelta, timezone
from email.utils import parsedate_to_datetime
from typing import Protocol

import httpx

from expensify_exact import progress
from expensify_exact.clock import Clock
from expensify_exact.errors import RateLimitExhausted


class RateLimitPolicy(Protocol):
    """What a PacedTransport asks before and after each request."""

    calls_made: int  # answers observed so far

    def next_slot(self, now: datetime) -> datetime:
        """The earliest moment the next request may be sent (may raise RateLimitExhausted)."""

    def observe(self, response: httpx.Response, now: datetime) -> None:
        """Learn from a response (any status, including errors and 429s)."""

    def wait_after_429(self, response: httpx.Response, now: datetime) -> float:
        """Seconds to wait before re-sending a request that got this 429 (may raise RateLimitExhausted)."""


class PacedTransport(httpx.BaseTransport):
    """Waits for the policy's next slot, sends, lets the policy observe, and re-sends 429s only.

    A 429 means the request was refused, not processed, so re-sending is safe even for a POST.
    Other statuses are returned untouched: retrying them is the client's decision.
    """

    def __init__(self, inner: httpx.BaseTransport, policy: RateLimitPolicy, clock: Clock,
                 max_retries: int = 3):
        self._inner = inner
        self._policy = policy
        self._clock = clock
        self._max_retries = max_retries
        # Requests through one transport go out one at a time: both APIs count per credential, and
        # Exact explicitly asks for sequential requests (exact-online.md §6).
        self._lock = threading.Lock()

    def handle_request(self, request: httpx.Request) -> httpx.Response:
        with self._lock:
            attempt = 0
            while True:
                self._wait_until(self._policy.next_slot(self._clock.now()))
                response = self._inner.handle_request(request)
                self._policy.observe(response, self._clock.now())
                if response.status_code != 429 or attempt >= self._max_retries:
                    return response
                try:
                    wait = self._policy.wait_after_429(response, self._clock.now())
                finally:
                    response.close()
                self._announce(wait, "the API answered 429 Too Many Requests")
                self._clock.sleep(wait)
                attempt += 1

    def close(self) -> None:
        self._inner.close()

    def _wait_until(self, slot: datetime) -> None:
        seconds = (slot - self._clock.now()).total_seconds()
        if seconds > 0:
            self._announce(seconds, getattr(self._policy, "wait_reason", "rate limit"))
            self._clock.sleep(seconds)

    def _announce(self, seconds: float, reason: str) -> None:
        """Tell a watching display how long and why (progress.Waiting); never prints from here."""
        progress.publish(progress.Waiting(getattr(self._policy, "SERVICE", "api"), seconds, reason,
                                          self._clock.now() + timedelta(seconds=seconds)))


class RequestLog(Protocol):
    """Where every process calling with one credential records when its requests went out."""

    def since(self, moment: datetime) -> list[datetime]:
        """The recorded requests after `moment`, oldest first."""

    def add(self, at: datetime, keep: timedelta) -> None:
        """Record a request; entries older than `keep` may be forgotten."""


# A time recorded further ahead than this was written on another clock (a sandbox's simulated time, a skewed
# host): trusting it could mean waiting for a moment that never comes.
CLOCK_TOLERANCE = timedelta(seconds=5)


class SlidingWindowLimits:
    """Client-side counting of requests in sliding windows, e.g. Expensify's 5 per 10 s and 20 per 60 s.

    The API counts per credential, not per client: with a request log, every request is recorded there and
    the windows are counted over what all clients of the credential sent (the steps of a run are separate
    clients, and with Dagster's multiprocess executor separate processes).
    """

    SERVICE = "expensify"

    def __init__(self, windows: Sequence[tuple[int, float]] = ((5, 10.0), (20, 60.0)),
                 log: RequestLog | None = None):
        if not windows:
            raise ValueError("SlidingWindowLimits needs at least one (count, seconds) window")
        self._windows = [(int(n), float(s)) for n, s in windows]
        self._longest = max(s for _, s in self._windows)
        self._shortest = min(s for _, s in self._windows)
        self._sent: deque[datetime] = deque()
        self._log = log
        self.calls_made = 0
        self.wait_reason = "request window full (" + ", ".join(f"{n} per {s:g} s" for n, s in self._windows) + ")"

    def next_slot(self, now: datetime) -> datetime:
        self._forget_before(now)
        sent = list(self._sent)
        if self._log is not None:
            shared = [t for t in self._log.since(now - timedelta(seconds=self._longest)) if t <= now + CLOCK_TOLERANCE]
            if len(shared) >= len(sent):  # the log holds our requests too, unless it could not be written
                sent = shared
        slot = now
        for limit, seconds in self._windows:
            recent = [t for t in sent if t > now - timedelta(seconds=seconds)]
            if len(recent) >= limit:
                # The request that must leave the window before one more fits in.
                slot = max(slot, recent[len(recent) - limit] + timedelta(seconds=seconds))
        return slot

    def observe(self, response: httpx.Response, now: datetime) -> None:
        # Counting at response time rather than send time errs on the safe side.
        self._sent.append(now)
        self.calls_made += 1
        self._forget_before(now)
        if self._log is not None:
            self._log.add(now, keep=timedelta(seconds=self._longest))

    def wait_after_429(self, response: httpx.Response, now: datetime) -> float:
        # The server counted more than we did (another process on the same credentials?), so wait
        # until our oldest request leaves every window, and never less than a whole window.
        wait = self._shortest
        for _, seconds in self._windows:
            recent = [t for t in self._sent if t > now - timedelta(seconds=seconds)]
            if recent:
                wait = max(wait, (recent[0] + timedelta(seconds=seconds) - now).total_seconds())
        retry_after = _retry_after_seconds(response, now)
        if retry_after is not None:
            wait = max(wait, retry_after)
        return wait

    def _forget_before(self, now: datetime) -> None:
        cutoff = now - timedelta(seconds=self._longest)
        while self._sent and self._sent[0] <= cutoff:
            self._sent.popleft()


@dataclass(frozen=True)
class RateLimitSnapshot:
    """The budgets an API reported in one response, as published on a RateLimitBoard."""

    observed_at: datetime
    remaining_minutely: int | None
    minutely_limit: int | None
    minutely_resets_at: datetime | None
    remaining_daily: int | None
    daily_limit: int | None
    daily_resets_at: datetime | None


class RateLimitBoard(Protocol):
    """Where every process calling with one credential publishes the budgets the API last reported."""

    def load(self) -> RateLimitSnapshot | None:
        """The newest published snapshot, or None."""

    def save(self, snapshot: RateLimitSnapshot) -> None:
        """Publish a snapshot (the newest wins)."""


class ExactRateLimits:
    """Paces by Exact Online's X-RateLimit-* headers (exact-online.md §6).

    A header that is absent means "unknown", never 0: Exact sends only the exceeded window's
    headers on a 429 and none at all on division-less URLs such as current/Me. A known value is
    kept until its reset time passes.

    Exact counts per app and division, not per process: with a board, every response's budgets are
    published and a newer snapshot from another process (a concurrent run, or the previous step of
    this one) is adopted before each request, so a run that starts in a minute someone else used up
    waits for the reset instead of collecting a 429.
    """

    SERVICE = "exact"

    @property
    def wait_reason(self) -> str:
        """Why next_slot asked for a wait: the minute allowance is the only window Exact makes us wait for."""
        return f"minute budget used up ({self.minutely_limit or 60} calls a minute per division)"

    def __init__(self, daily_reserve: int = 50, board: RateLimitBoard | None = None):
        """Args:
            daily_reserve: daily calls to leave unused (for a person's ad-hoc checks); when the
                next call would dip below it, RateLimitExhausted is raised instead of waiting.
            board: where the budgets are shared with other processes using the same division.
        """
        self.daily_reserve = daily_reserve
        self._board = board
        self._observed_at: datetime | None = None
        self.remaining_daily: int | None = None
        self.daily_limit: int | None = None
        self.daily_resets_at: datetime | None = None
        self.remaining_minutely: int | None = None
        self.minutely_limit: int | None = None
        self.minutely_resets_at: datetime | None = None
        self.calls_made = 0

    def next_slot(self, now: datetime) -> datetime:
        if self._board is not None:
            self._adopt(self._board.load(), now)
        self._raise_if_daily_exhausted(now, reserve=self.daily_reserve)
        if self.remaining_minutely is not None and self.remaining_minutely <= 0 and self.minutely_resets_at:
            # "add a second for rounding differences" (picqer Connection.php, exact-online.md §6)
            return max(now, self.minutely_resets_at + timedelta(seconds=1))
        return now

    def observe(self, response: httpx.Response, now: datetime) -> None:
        self.calls_made += 1
        headers = response.headers
        self.remaining_daily = _int_header(headers, "X-RateLimit-Remaining", self.remaining_daily)
        self.daily_limit = _int_header(headers, "X-RateLimit-Limit", self.daily_limit)
        self.daily_resets_at = _epoch_ms_header(headers, "X-RateLimit-Reset", self.daily_resets_at)
        self.remaining_minutely = _int_header(headers, "X-RateLimit-Minutely-Remaining", self.remaining_minutely)
        self.minutely_limit = _int_header(headers, "X-RateLimit-Minutely-Limit", self.minutely_limit)
        self.minutely_resets_at = _epoch_ms_header(headers, "X-RateLimit-Minutely-Reset", self.minutely_resets_at)
        if response.status_code == 429 and "X-RateLimit-Minutely-Remaining" in headers:
            # The minute allowance is what refused us, whatever the header claims.
            self.remaining_minutely = 0
        if any(name.lower().startswith("x-ratelimit-") for name in headers):
            self._observed_at = now
            if self._board is not None:
                self._board.save(RateLimitSnapshot(
                    now, self.remaining_minutely, self.minutely_limit, self.minutely_resets_at,
                    self.remaining_daily, self.daily_limit, self.daily_resets_at))

    def _adopt(self, shared: RateLimitSnapshot | None, now: datetime) -> None:
        """Take a newer snapshot published by another process as what we know."""
        if shared is None or shared.observed_at > now + CLOCK_TOLERANCE:
            return
        if self._observed_at is not None and shared.observed_at <= self._observed_at:
            return
        self._observed_at = shared.observed_at
        # A window the other process knew nothing about keeps what we know of it.
        if shared.remaining_minutely is not None:
            self.remaining_minutely, self.minutely_limit = shared.remaining_minutely, shared.minutely_limit
            self.minutely_resets_at = shared.minutely_resets_at
        if shared.remaining_daily is not None:
            self.remaining_daily, self.daily_limit = shared.remaining_daily, shared.daily_limit
            self.daily_resets_at = shared.daily_resets_at

    def wait_after_429(self, response: httpx.Response, now: datetime) -> float:
        if response.headers.get("X-RateLimit-Remaining") is not None:
            # A 429 carrying daily headers is the daily window: waiting hours helps nobody.
            self._raise_if_daily_exhausted(now, reserve=0)
        reset = self.minutely_resets_at
        if reset is None or reset <= now:
            # No usable header (older reports, exact-online.md §6): the minute window is a fixed
            # clock minute, so wait for the next one.
            reset = now.replace(second=0, microsecond=0) + timedelta(minutes=1)
        return (reset + timedelta(seconds=1) - now).total_seconds()

    def status(self) -> dict[str, object]:
        """What is known about the budgets, for logs and Dagster metadata."""
        return {
            "calls_made": self.calls_made,
            "remaining_daily": self.remaining_daily,
            "daily_resets_at": self.daily_resets_at.isoformat() if self.daily_resets_at else None,
            "remaining_minutely": self.remaining_minutely,
        }

    def _raise_if_daily_exhausted(self, now: datetime, reserve: int) -> None:
        if self.remaining_daily is None:
            return
        if self.daily_resets_at is not None and now >= self.daily_resets_at:
            self.remaining_daily = None  # a new day: the old count says nothing any more
            return
        if self.remaining_daily - 1 < reserve:
            raise RateLimitExhausted(
                self.SERVICE,
                f"daily API budget used up ({self.remaining_daily} calls left, reserve {reserve}); "
                f"resume after {self.daily_resets_at.isoformat() if self.daily_resets_at else 'the daily reset'}",
                status=429, resets_at=self.daily_resets_at)


def _int_header(headers: httpx.Headers, name: str, previous: int | None) -> int | None:
    value = headers.get(name)
    if value is None or not value.strip().lstrip("-").isdigit():
        return previous
    return int(value.strip())


def _epoch_ms_header(headers: httpx.Headers, name: str, previous: datetime | None) -> datetime | None:
    value = headers.get(name)
    if value is None or not value.strip().isdigit():
        return previous
    # Exact's reset headers are UTC epoch milliseconds (exact-online.md §6).
    return datetime.fromtimestamp(int(value.strip()) / 1000, tz=timezone.utc)


def _retry_after_seconds(response: httpx.Response, now: datetime) -> float | None:
    value = response.headers.get("Retry-After")
    if not value:
        return None
    value = value.strip()
    if value.isdigit():
        return float(value)
    try:
        return max(0.0, (parsedate_to_datetime(value) - now).total_seconds())
    except (TypeError, ValueError):
        return None
