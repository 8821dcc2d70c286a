"""Clocks: one notion of time shared by the SDK's sleeps (through the transport) and the emulator.

Everything above this module measures time in Azure seconds. A ScaledClock runs those seconds
faster than the wall (benchmarks run a 3-minute provision in a couple of seconds); a VirtualClock
never sleeps at all (tests and --dry-run).
"""

from __future__ import annotations

import threading
import time
from typing import Protocol


class Clock(Protocol):
    def now(self) -> float: ...

    def sleep(self, seconds: float) -> None: ...


class SystemClock:
    def now(self) -> float:
        return time.time()

    def sleep(self, seconds: float) -> None:
        if seconds > 0:
            time.sleep(seconds)


class ScaledClock:
    """Emulated time runs `speed` times faster than the wall clock."""

    def __init__(self, speed: float, start: float | None = None) -> None:
        if speed <= 0:
            raise ValueError("speed must be positive")
        self.speed = speed
        self._origin = time.monotonic()
        self._start = time.time() if start is None else start

    def now(self) -> float:
        return self._start + (time.monotonic() - self._origin) * self.speed

    def sleep(self, seconds: float) -> None:
        if seconds > 0:
            time.sleep(seconds / self.speed)


class VirtualClock:
    """Time moves only when someone sleeps or a test calls advance().

    Concurrent sleepers each push time forward, so overlapping waits add up instead of overlapping:
    time only ever runs ahead, which makes pending operations finish sooner, never later.
    """

    def __init__(self, start: float = 1_767_225_600.0) -> None:  # 2026-01-01T00:00:00Z
        self._now = start
        self._lock = threading.Lock()

    def now(self) -> float:
        with self._lock:
            return self._now

    def sleep(self, seconds: float) -> None:
        self.advance(seconds)

    def advance(self, seconds: float) -> None:
        if seconds > 0:
            with self._lock:
                self._now += seconds
