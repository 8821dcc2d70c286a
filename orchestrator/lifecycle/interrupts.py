"""Signals during a run: held back while the DELETE is sent, and the run's time and budget limits."""

from __future__ import annotations

import signal
import threading
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from typing import Any

from orchestrator.lifecycle.outcome import LimitReached
from orchestrator.spec import JobSpec
from orchestrator.verdict import Verdict


@contextmanager
def held_interrupts(tell: Callable[[], None], *, second_stops: bool) -> Iterator[None]:
    """While the block runs, SIGINT/SIGTERM print `tell`; with second_stops the second one raises
    KeyboardInterrupt. Only the main thread can own signals; elsewhere this changes nothing."""
    if threading.current_thread() is not threading.main_thread():
        yield
        return
    previous = {sig: signal.getsignal(sig) for sig in (signal.SIGINT, signal.SIGTERM)}
    count = [0]

    def handler(signum: int, frame: Any) -> None:
        count[0] += 1
        if second_stops and count[0] > 1:
            raise KeyboardInterrupt
        tell()

    for sig in previous:
        signal.signal(sig, handler)
    try:
        yield
    finally:
        for sig, old in previous.items():
            signal.signal(sig, old)


class GroupWatch:
    """While the job runs, check now and then that the run's resource group still exists: deleted
    from elsewhere (`down`, `gc --force`, the portal), the run stops at once instead of waiting for
    SSH to time out. `on_gone` cancels the nodes."""

    def __init__(self, exists: Callable[[], bool], interval: float, on_gone: Callable[[], None]) -> None:
        self.error: Exception | None = None
        self._exists, self._on_gone = exists, on_gone
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._watch, args=(interval,), name="group-watch", daemon=True)
        self._thread.start()

    def _watch(self, interval: float) -> None:
        from orchestrator.errors import CloudError

        while not self._stop.wait(interval):
            try:
                if self._exists():
                    continue
            except Exception:  # a failed check is no evidence: look again next time
                continue
            self.error = CloudError(
                "The run's resource group was deleted while the job was running (by `orchestrator down`, "
                "`gc --all --force`, or outside this tool); the run stopped."
            )
            self._on_gone()
            return

    def cancel(self) -> None:
        self._stop.set()


class ScheduleEnabler:
    """A run of 23 h or more gets its auto-shutdown created disabled (a daily HH:MM created at the
    start would fire the same day); the process watching the run enables it during the last day."""

    def __init__(self, session: Any, plan: Any, say: Callable[[str], None]) -> None:
        from datetime import UTC, datetime

        self._stop = threading.Event()
        enable_at = plan.schedule_enable_at
        if enable_at is None:
            return
        delay = max(0.0, (enable_at - datetime.now(UTC)).total_seconds())

        def enable() -> None:
            from orchestrator.azure.schedules import enable_shutdown_schedules

            if self._stop.wait(delay):
                return
            try:
                names = enable_shutdown_schedules(session, plan, datetime.now(UTC))
                say(f"auto-shutdown enabled for the run's last day ({', '.join(names)})")
            except Exception as e:  # the VM-side watchdog still stops the job at max_duration
                say(f"warning: could not enable the auto-shutdown schedule: {e}")

        threading.Thread(target=enable, name="schedule-enabler", daemon=True).start()

    def cancel(self) -> None:
        self._stop.set()


class Limits:
    """Stops a run when max_duration passes or the projected cost would pass budget_usd: `on_fire`
    cancels the nodes, so the run unwinds into its collection and teardown. The clock starts before
    provisioning."""

    def __init__(self, spec: JobSpec, on_fire: Callable[[], None], say: Callable[[str], None]) -> None:
        hourly = spec.hourly_usd()
        limit, why, verdict = (
            float(spec.max_duration),
            f"max_duration ({spec.max_duration} s) passed",
            Verdict.TIMED_OUT,
        )
        if spec.budget_usd is not None and hourly > 0:
            by_budget = spec.budget_usd / hourly * 3600
            if by_budget < limit:
                limit, verdict = by_budget, Verdict.OVER_BUDGET
                why = (
                    f"the projected cost would pass budget_usd ${spec.budget_usd:,.2f} "
                    f"(${hourly:,.3f}/hour for {spec.nodes} node(s), stopped after {by_budget:,.0f} s)"
                )
        self.error: LimitReached | None = None
        self._why, self._verdict, self._on_fire, self._say = why, verdict, on_fire, say
        self._timer = threading.Timer(limit, self._fire)
        self._timer.daemon = True
        self._timer.start()

    def _fire(self) -> None:
        self.error = LimitReached(f"Stopped and torn down: {self._why}.", self._verdict)
        self._say(str(self.error))
        self._on_fire()

    def check(self) -> None:
        if self.error is not None:
            raise self.error

    def cancel(self) -> None:
        self._timer.cancel()
