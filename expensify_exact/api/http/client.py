"""What both API clients are built on: one httpx.Client whose every request waits its turn in a PacedTransport, and
which is closed with the API client (`close()` or `with`)."""

from __future__ import annotations

from typing import Any, Self

import httpx

from expensify_exact.api.http.pacing import PacedTransport, RateLimitPolicy
from expensify_exact.clock import Clock


class PacedClient:
    """An API client whose requests go through `self._http`, paced by `policy` (exact-online.md §6, expensify.md §7).

    Args:
        policy: decides when each request may go out and counts the answers (`calls_made`).
        clock: the time the pacing waits on.
        transport: the inner transport; default `httpx.HTTPTransport(retries=2)` (connection attempts only).
        timeout: seconds per request.
        **client_options: further `httpx.Client` arguments (`base_url`, `headers`).
    """

    def __init__(self, policy: RateLimitPolicy, clock: Clock, transport: httpx.BaseTransport | None,
                 timeout: float, **client_options: Any):
        self._policy = policy
        self._clock = clock
        paced = PacedTransport(transport or httpx.HTTPTransport(retries=2), policy, clock)
        self._http = httpx.Client(transport=paced, timeout=timeout, **client_options)

    @property
    def calls_made(self) -> int:
        """HTTP answers received so far (including 401 and 429 answers that were sent again)."""
        return self._policy.calls_made

    def close(self) -> None:
        self._http.close()

    def __enter__(self) -> Self:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()
