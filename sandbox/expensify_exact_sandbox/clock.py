"""The sandbox's controllable clock: real time plus an offset that tests move forward."""

from __future__ import annotations

import threading
from datetime import datetime, timedelta, timezone


class SandboxClock:
    """Implements the connector's Clock protocol, so a test can hand the same object to a client:
    the client's sleeps then move the simulators' time instead of waiting."""

    def __init__(self, start: datetime | None = None, frozen: bool = False):
        self._lock = threading.Lock()
        self._frozen = frozen
        self._offset = timedelta(0)
        self._frozen_at = start or datetime.now(timezone.utc)
        if start is not None and not frozen:
            self._offset = start - datetime.now(timezone.utc)

    def now(self) -> datetime:
        with self._lock:
            if self._frozen:
                return self._frozen_at
            return datetime.now(timezone.utc) + self._offset

    def advance(self, seconds: float) -> datetime:
        with self._lock:
            if self._frozen:
                self._frozen_at += timedelta(seconds=seconds)
            else:
                self._offset += timedelta(seconds=seconds)
        return self.now()

    def sleep(self, seconds: float) -> None:
        if seconds > 0:
            self.advance(seconds)


class RemoteSandboxClock:
    """The Clock protocol over a running sandbox's `/_sandbox/clock`, for client processes other than the
    sandbox's own: their waits move the shared simulated time instead of sleeping."""

    def __init__(self, sandbox_url: str):
        import httpx

        self._http = httpx.Client(base_url=sandbox_url.rstrip("/"), timeout=10)

    def now(self) -> datetime:
        return datetime.fromisoformat(self._http.get("/_sandbox/clock").json()["now"])

    def sleep(self, seconds: float) -> None:
        if seconds > 0:
            self._http.post("/_sandbox/clock", json={"advance": seconds})
