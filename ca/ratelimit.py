"""Counting failures per key (device id, source address) in a sliding window.

In memory and per process: a restart forgets, and with several worker
processes each keeps its own count (the limit is then per worker).
"""
from __future__ import annotations

from collections import deque
from datetime import timedelta

from .errors import RateLimitedError
from .timefmt import Clock, utc_now


class FailureLimiter:
    """After `limit` failures within `window`, refuse the key until the oldest one ages out."""

    def __init__(self, *, limit: int, window: timedelta, what: str, clock: Clock = utc_now,
                 max_keys: int = 100_000) -> None:
        self._limit = limit
        self._window = window
        self._what = what
        self._clock = clock
        self._max_keys = max_keys
        self._failures: dict[str, deque] = {}

    def check(self, key: str) -> None:
        times = self._failures.get(key)
        if not times:
            return
        now = self._clock()
        while times and times[0] <= now - self._window:
            times.popleft()
        if not times:
            del self._failures[key]
        elif len(times) >= self._limit:
            retry = int((times[0] + self._window - now).total_seconds()) + 1
            raise RateLimitedError(f"too many failed attempts for {self._what} {key}; retry in {retry} s",
                                   retry_after=retry)

    def failed(self, key: str) -> None:
        if key not in self._failures and len(self._failures) >= self._max_keys:
            # bounded memory under a flood of distinct keys: forget the oldest key
            self._failures.pop(next(iter(self._failures)))
        self._failures.setdefault(key, deque(maxlen=self._limit)).append(self._clock())

    def succeeded(self, key: str) -> None:
        self._failures.pop(key, None)
