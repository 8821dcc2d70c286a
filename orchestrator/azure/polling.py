"""When to poll a long-running operation: a schedule shaped by how long each kind of operation takes.

The SDK's default polls every 30 s (compute, network) or whatever Retry-After says; a GPU VM that
is ready at 95 s is then noticed at 120 s, and a 7 s VNet costs 30 s on the critical path. We poll
by a schedule instead: the first poll when the operation could plausibly be done, then intervals
that grow with the time already waited (`growth` x elapsed, clamped). The overshoot after an
operation ends is then at most about `growth` of its duration, and the number of polls grows only
with the logarithm of the duration. Retry-After on an LRO status is a hint ARM gives every caller
alike; we do not let it push a VM on the critical path back by 10-30 s. Throttling (429) is still
honoured, by azure-core's RetryPolicy, which runs before this code sees a response.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

from orchestrator.clock import Clock


@dataclass(frozen=True)
class PollSchedule:
    first: float  # seconds after the request before the first status poll
    growth: float  # each later interval is growth x the time waited so far...
    min_interval: float  # ...but at least this
    max_interval: float  # ...and at most this

    def scaled(self, factor: float, floor: float = 0.02) -> PollSchedule:
        return PollSchedule(
            self.first * factor,
            self.growth,
            max(floor, self.min_interval * factor),
            max(floor, self.max_interval * factor),
        )

    def next_delay(self, elapsed: float) -> float:
        return min(self.max_interval, max(self.min_interval, self.growth * elapsed))


# In Azure seconds; see catalog.TYPICAL_SECONDS for the durations they are shaped around.
SCHEDULES: dict[str, PollSchedule] = {
    # A VM create is never done before ~40 s (allocation, disk from image, OS boot, agent ready).
    "Microsoft.Compute/virtualMachines": PollSchedule(first=30.0, growth=0.1, min_interval=2.0, max_interval=15.0),
    "Microsoft.Network/virtualNetworks": PollSchedule(first=2.0, growth=0.2, min_interval=1.0, max_interval=5.0),
    "Microsoft.Network/networkSecurityGroups": PollSchedule(first=2.0, growth=0.2, min_interval=1.0, max_interval=5.0),
    "delete": PollSchedule(first=5.0, growth=0.2, min_interval=2.0, max_interval=30.0),
    "group-delete": PollSchedule(first=10.0, growth=0.2, min_interval=5.0, max_interval=30.0),
    "default": PollSchedule(first=1.0, growth=0.2, min_interval=1.0, max_interval=15.0),
}


def schedule_for(kind: str, scale: float = 1.0) -> PollSchedule:
    base = SCHEDULES.get(kind, SCHEDULES["default"])
    return base if scale == 1.0 else base.scaled(scale)


def make_polling(schedule: PollSchedule, clock: Clock, **kwargs: Any) -> Any:
    """An azure-mgmt-core ARMPolling that follows `schedule` (imported lazily: the SDK is heavy)."""
    from azure.mgmt.core.polling.arm_polling import ARMPolling

    class ScheduledARMPolling(ARMPolling):  # type: ignore[misc]
        def __init__(self) -> None:
            super().__init__(timeout=schedule.min_interval, **kwargs)
            self._started = 0.0
            self.polls = 0

        def run(self) -> None:
            self._started = clock.now()
            if not self.finished() and schedule.first > 0:
                self._sleep(schedule.first)
            super().run()

        def _extract_delay(self) -> float:
            return schedule.next_delay(clock.now() - self._started)

    return ScheduledARMPolling()
