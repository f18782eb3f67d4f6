"""Pacing math on a fake clock: when a request may go, how long a 429 waits, and when we stop for the day.

Waiting too little earns more 429s (and Exact's error limit); waiting too long stalls a run for hours.
"""

from datetime import datetime, timedelta, timezone

import httpx
import pytest

from expensify_exact.api.http.pacing import (
    ExactRateLimits,
    PacedTransport,
    RateLimitSnapshot,
    SlidingWindowLimits,
)
from expensify_exact.errors import RateLimitExhausted
from tests.factories import FakeClock as _FakeClock

T0 = datetime(2024, 5, 13, 8, 18, 25, tzinfo=timezone.utc)


def FakeClock(start: datetime = T0) -> _FakeClock:
    return _FakeClock(start)


def ms(dt: datetime) -> str:
    return str(int(dt.timestamp() * 1000))


def at(seconds: float) -> datetime:
    return T0 + timedelta(seconds=seconds)


# --- SlidingWindowLimits -----------------------------------------------------------------------

@pytest.mark.parametrize("sent_at, now, expected_slot", [
    # nothing sent yet: go now
    ([], 0, 0),
    # 4 of 5 in the 10 s window: one more fits
    ([0, 1, 2, 3], 4, 4),
    # 5 in 10 s: wait until the first leaves the short window
    ([0, 1, 2, 3, 4], 5, 10),
    # the short window is clear but 20 in 60 s: wait for the oldest of the long window
    ([i * 2.5 for i in range(20)], 50, 60),
    # old requests beyond every window do not count
    ([0, 1, 2, 3, 4], 70, 70),
])
def test_sliding_window_next_slot(sent_at, now, expected_slot):
    limits = SlidingWindowLimits(windows=[(5, 10.0), (20, 60.0)])
    for s in sent_at:
        limits.observe(httpx.Response(200), at(s))
    assert limits.next_slot(at(now)) == at(expected_slot)


@pytest.mark.parametrize("sent_at, now, headers, expected_wait", [
    # we counted nothing recent: still wait at least the short window
    ([], 100, {}, 10.0),
    # our oldest request leaves the 60 s window in 55 s: the longest window governs
    ([5, 6], 10, {}, 55.0),
    # a Retry-After longer than our estimate wins
    ([], 100, {"Retry-After": "30"}, 30.0),
])
def test_sliding_window_wait_after_429(sent_at, now, headers, expected_wait):
    limits = SlidingWindowLimits(windows=[(5, 10.0), (20, 60.0)])
    for s in sent_at:
        limits.observe(httpx.Response(200), at(s))
    assert limits.wait_after_429(httpx.Response(429, headers=headers), at(now)) == pytest.approx(expected_wait)


def test_paced_transport_keeps_expensify_within_five_per_ten_seconds():
    clock = FakeClock()
    sent: list[datetime] = []

    def app(request):
        sent.append(clock.now())
        return httpx.Response(200)

    transport = PacedTransport(httpx.MockTransport(app), SlidingWindowLimits(), clock)
    with httpx.Client(transport=transport) as http:
        for _ in range(25):
            http.get("https://integrations.expensify.com/x")
    for i, t in enumerate(sent):
        assert sum(1 for u in sent[: i + 1] if u > t - timedelta(seconds=10)) <= 5
        assert sum(1 for u in sent[: i + 1] if u > t - timedelta(seconds=60)) <= 20
    assert sent[-1] - sent[0] >= timedelta(seconds=60)


# --- ExactRateLimits ---------------------------------------------------------------------------

def minute_headers(remaining: int, reset: datetime) -> dict[str, str]:
    return {"X-RateLimit-Minutely-Limit": "60", "X-RateLimit-Minutely-Remaining": str(remaining),
            "X-RateLimit-Minutely-Reset": ms(reset)}


def daily_headers(remaining: int, reset: datetime) -> dict[str, str]:
    return {"X-RateLimit-Limit": "5000", "X-RateLimit-Remaining": str(remaining), "X-RateLimit-Reset": ms(reset)}


MINUTE_END = datetime(2024, 5, 13, 8, 19, tzinfo=timezone.utc)
DAY_END = datetime(2024, 5, 14, tzinfo=timezone.utc)


@pytest.mark.parametrize("headers, expected_slot", [
    # no headers at all (current/Me has no division): unknown, so no waiting
    ({}, T0),
    # allowance left: go now
    ({**minute_headers(5, MINUTE_END), **daily_headers(4766, DAY_END)}, T0),
    # minute used up: the reset plus one second "for rounding differences"
    ({**minute_headers(0, MINUTE_END), **daily_headers(4766, DAY_END)}, MINUTE_END + timedelta(seconds=1)),
    # the minutely headers alone (as on a 429) are enough
    (minute_headers(0, MINUTE_END), MINUTE_END + timedelta(seconds=1)),
    # a non-numeric header is ignored rather than read as 0
    ({"X-RateLimit-Minutely-Remaining": "n/a"}, T0),
])
def test_exact_next_slot(headers, expected_slot):
    limits = ExactRateLimits(daily_reserve=0)
    limits.observe(httpx.Response(200, headers=headers), T0)
    assert limits.next_slot(T0) == expected_slot


def test_exact_missing_header_keeps_the_last_known_value_instead_of_zero():
    limits = ExactRateLimits(daily_reserve=0)
    limits.observe(httpx.Response(200, headers=daily_headers(4000, DAY_END)), T0)
    limits.observe(httpx.Response(200), T0)  # e.g. current/Me
    assert limits.remaining_daily == 4000
    assert limits.remaining_minutely is None
    assert limits.calls_made == 2


@pytest.mark.parametrize("remaining, reserve, raises", [
    (51, 50, False),   # one call leaves exactly the reserve
    (50, 50, True),    # the next call would dip into the reserve
    (1, 0, False),     # no reserve: the last call may go
    (0, 0, True),      # nothing left at all
])
def test_exact_daily_reserve(remaining, reserve, raises):
    limits = ExactRateLimits(daily_reserve=reserve)
    limits.observe(httpx.Response(200, headers=daily_headers(remaining, DAY_END)), T0)
    if raises:
        with pytest.raises(RateLimitExhausted) as info:
            limits.next_slot(T0)
        assert info.value.resets_at == DAY_END
    else:
        assert limits.next_slot(T0) == T0


def test_exact_daily_count_is_forgotten_after_the_reset():
    limits = ExactRateLimits(daily_reserve=10)
    limits.observe(httpx.Response(200, headers=daily_headers(0, DAY_END)), T0)
    assert limits.next_slot(DAY_END) == DAY_END


@pytest.mark.parametrize("headers, now, expected_wait", [
    # minutely 429 with its headers: until reset + 1 s
    (minute_headers(0, MINUTE_END), T0, 36.0),
    # a 429 without any header: wait for the next clock minute + 1 s
    ({}, T0, 36.0),
    # a stale reset in the past is not trusted
    (minute_headers(0, T0 - timedelta(minutes=5)), T0, 36.0),
])
def test_exact_wait_after_429(headers, now, expected_wait):
    limits = ExactRateLimits(daily_reserve=0)
    response = httpx.Response(429, headers=headers)
    limits.observe(response, now)
    assert limits.wait_after_429(response, now) == pytest.approx(expected_wait)


def test_exact_daily_429_raises_instead_of_sleeping_for_hours():
    limits = ExactRateLimits(daily_reserve=0)
    response = httpx.Response(429, headers=daily_headers(0, DAY_END))
    limits.observe(response, T0)
    with pytest.raises(RateLimitExhausted):
        limits.wait_after_429(response, T0)


# --- budgets shared between processes ------------------------------------------------------------

class MemoryBoard:
    def __init__(self):
        self.snapshot: RateLimitSnapshot | None = None
        self.saves = 0

    def load(self):
        return self.snapshot

    def save(self, snapshot):
        self.snapshot = snapshot
        self.saves += 1


def test_a_fresh_process_waits_for_the_minute_another_one_used_up():
    board = MemoryBoard()
    first = ExactRateLimits(daily_reserve=0, board=board)
    first.observe(httpx.Response(200, headers={**minute_headers(0, MINUTE_END), **daily_headers(4000, DAY_END)}), T0)
    second = ExactRateLimits(daily_reserve=0, board=board)
    assert second.next_slot(T0) == MINUTE_END + timedelta(seconds=1)
    assert second.remaining_daily == 4000 and second.calls_made == 0


def test_a_fresh_process_stops_before_its_first_call_when_the_day_is_used_up():
    board = MemoryBoard()
    ExactRateLimits(board=board).observe(httpx.Response(200, headers=daily_headers(40, DAY_END)), T0)
    with pytest.raises(RateLimitExhausted):
        ExactRateLimits(daily_reserve=50, board=board).next_slot(T0)


def test_an_older_snapshot_does_not_overwrite_what_this_process_saw_later():
    board = MemoryBoard()
    limits = ExactRateLimits(daily_reserve=0, board=board)
    board.snapshot = RateLimitSnapshot(at(-5), 0, 60, MINUTE_END, None, None, None)
    limits.observe(httpx.Response(200, headers=minute_headers(7, MINUTE_END)), T0)  # publishes its own, newer
    board.snapshot = RateLimitSnapshot(at(-1), 0, 60, MINUTE_END, None, None, None)
    assert limits.next_slot(T0) == T0 and limits.remaining_minutely == 7


def test_a_window_the_other_process_did_not_know_keeps_what_we_know():
    board = MemoryBoard()
    limits = ExactRateLimits(daily_reserve=0, board=board)
    limits.observe(httpx.Response(200, headers=daily_headers(4000, DAY_END)), T0)
    board.snapshot = RateLimitSnapshot(at(1), 0, 60, MINUTE_END, None, None, None)  # e.g. from a 429
    assert limits.next_slot(at(2)) == MINUTE_END + timedelta(seconds=1)
    assert limits.remaining_daily == 4000


def test_a_snapshot_stamped_on_a_clock_far_ahead_is_not_trusted():
    board = MemoryBoard()
    board.snapshot = RateLimitSnapshot(at(3600), 0, 60, at(3620), 0, 5000, at(7200))
    assert ExactRateLimits(daily_reserve=0, board=board).next_slot(T0) == T0


def test_only_answers_with_rate_headers_are_published():
    board = MemoryBoard()
    limits = ExactRateLimits(board=board)
    limits.observe(httpx.Response(200), T0)  # current/Me: nothing to tell the others
    assert board.saves == 0
    limits.observe(httpx.Response(429, headers=minute_headers(3, MINUTE_END)), T0)
    assert board.saves == 1 and board.snapshot.remaining_minutely == 0 and board.snapshot.observed_at == T0


class MemoryLog:
    def __init__(self):
        self.times: list[datetime] = []

    def since(self, moment):
        return sorted(t for t in self.times if t > moment)

    def add(self, at, keep):
        self.times = [t for t in self.times if t >= at - keep] + [at]


def test_clients_sharing_a_request_log_count_one_window():
    log = MemoryLog()
    first, second = (SlidingWindowLimits([(5, 10.0)], log=log) for _ in range(2))
    for n in range(5):
        first.observe(httpx.Response(200), at(n))
    assert second.next_slot(at(5)) == at(10), "the sixth request waits for the first to leave the window"
    assert second.calls_made == 0 and len(log.times) == 5


def test_a_request_logged_on_a_clock_far_ahead_is_not_counted():
    log = MemoryLog()
    log.times = [at(3600 + n) for n in range(5)]
    assert SlidingWindowLimits([(5, 10.0)], log=log).next_slot(T0) == T0


# --- PacedTransport ----------------------------------------------------------------------------

def test_paced_transport_resends_a_429_after_the_minute_resets():
    clock = FakeClock()
    calls: list[datetime] = []

    def app(request):
        calls.append(clock.now())
        if len(calls) == 1:
            return httpx.Response(429, headers=minute_headers(0, MINUTE_END))
        return httpx.Response(201, headers=minute_headers(59, MINUTE_END + timedelta(minutes=1)), json={"ok": 1})

    transport = PacedTransport(httpx.MockTransport(app), ExactRateLimits(daily_reserve=0), clock)
    with httpx.Client(transport=transport) as http:
        response = http.post("https://start.exactonline.nl/api/v1/1/x", json={"a": 1})
    assert response.status_code == 201
    assert calls[1] == MINUTE_END + timedelta(seconds=1)


def test_paced_transport_gives_up_after_max_retries_and_returns_the_429():
    clock = FakeClock()
    count = 0

    def app(request):
        nonlocal count
        count += 1
        return httpx.Response(429)

    transport = PacedTransport(httpx.MockTransport(app), ExactRateLimits(daily_reserve=0), clock, max_retries=2)
    with httpx.Client(transport=transport) as http:
        assert http.get("https://start.exactonline.nl/x").status_code == 429
    assert count == 3


@pytest.mark.parametrize("status", [400, 401, 404, 500, 503])
def test_paced_transport_never_resends_other_statuses(status):
    count = 0

    def app(request):
        nonlocal count
        count += 1
        return httpx.Response(status)

    transport = PacedTransport(httpx.MockTransport(app), ExactRateLimits(), FakeClock())
    with httpx.Client(transport=transport) as http:
        assert http.get("https://start.exactonline.nl/x").status_code == status
    assert count == 1


def test_a_wait_for_the_minute_budget_is_announced_with_its_length_and_reason_before_it_starts():
    from expensify_exact import progress

    clock = FakeClock()
    announced: list = []

    def app(request):
        return httpx.Response(200, headers=minute_headers(0, MINUTE_END), json={})

    transport = PacedTransport(httpx.MockTransport(app), ExactRateLimits(daily_reserve=0), clock)
    with progress.subscribed(lambda event: announced.append((event, clock.now()))), \
            httpx.Client(transport=transport) as http:
        http.get("https://start.exactonline.nl/api/v1/1/a")  # uses the minute up
        http.get("https://start.exactonline.nl/api/v1/1/b")  # waits for the next minute
    assert len(announced) == 1
    event, at_time = announced[0]
    assert at_time == T0  # published before the sleep, not after
    assert event.service == "exact" and "minute budget used up (60 calls a minute" in event.reason
    assert event.seconds == clock.sleeps[0] == (MINUTE_END + timedelta(seconds=1) - T0).total_seconds()
    assert event.until == MINUTE_END + timedelta(seconds=1)


def test_expensifys_window_wait_names_the_windows():
    from expensify_exact import progress

    clock = FakeClock()
    announced: list = []
    transport = PacedTransport(httpx.MockTransport(lambda r: httpx.Response(200)), SlidingWindowLimits(), clock)
    with progress.subscribed(announced.append), httpx.Client(transport=transport) as http:
        for _ in range(6):
            http.get("https://integrations.expensify.com/x")
    assert [(e.service, e.reason) for e in announced] == [("expensify", "request window full (5 per 10 s, 20 per 60 s)")]
