"""Fault switches for the simulators: tests arm a fault for the next N calls of a target, or a rate."""

from __future__ import annotations

import random
import threading
from collections import defaultdict


class FaultSwitches:
    """Thread-safe store of armed faults.

    A *target* names a simulator operation (e.g. ``"exact.post_entry"``, ``"expensify.download"``);
    a *fault* names what goes wrong (e.g. ``"drop_after_store"``, ``"http_500"``, ``"rate_limit"``).
    Each simulator documents the targets and faults it understands.
    """

    def __init__(self, seed: int = 0):
        self._lock = threading.Lock()
        self._queued: dict[str, list[str]] = defaultdict(list)
        self._rates: dict[str, tuple[float, tuple[str, ...]]] = {}
        self._random = random.Random(seed)
        self.fired: list[tuple[str, str]] = []

    def arm(self, target: str, fault: str, times: int = 1) -> None:
        with self._lock:
            self._queued[target].extend([fault] * times)

    def set_rate(self, target: str, probability: float, faults: tuple[str, ...], seed: int | None = None) -> None:
        """From now on, each call of `target` fails with one of `faults` with this probability."""
        with self._lock:
            if seed is not None:
                self._random.seed(seed)
            if probability <= 0:
                self._rates.pop(target, None)
            else:
                self._rates[target] = (probability, faults)

    def take(self, target: str) -> str | None:
        """The fault to apply to this call of `target`, if any (consumes one armed fault)."""
        with self._lock:
            if self._queued.get(target):
                fault = self._queued[target].pop(0)
            elif target in self._rates and self._random.random() < self._rates[target][0]:
                fault = self._random.choice(self._rates[target][1])
            else:
                return None
            self.fired.append((target, fault))
            return fault

    def clear(self) -> None:
        with self._lock:
            self._queued.clear()
            self._rates.clear()
