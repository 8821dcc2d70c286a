"""How a run tells the world what happens: one Reporter protocol, several reporters.

The CLI's progress (plain lines or the live panel), the `--json` event stream and the CI step
summary each implement it; the lifecycle only ever calls a Reporter.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import TYPE_CHECKING, Any, Protocol

if TYPE_CHECKING:
    from orchestrator.lifecycle.outcome import RunOutcome


class Reporter(Protocol):
    def say(self, text: str) -> None:
        """The orchestrator's own progress line."""

    def log(self, line: str) -> None:
        """One line of the job's output, already masked (and prefixed by node with several)."""

    def resource(self, event: Any) -> None:
        """A resource changed (azure.provision.ResourceEvent)."""

    def phase(self, name: str, node: int | None, started: bool, seconds: float | None) -> None:
        """A phase started or ended (seconds when it ended)."""

    def result(self, outcome: RunOutcome) -> None:
        """The run ended (or was kept) with this outcome."""


class Quiet:
    """A reporter that says nothing (library use, tests)."""

    def say(self, text: str) -> None:
        pass

    def log(self, line: str) -> None:
        pass

    def resource(self, event: Any) -> None:
        pass

    def phase(self, name: str, node: int | None, started: bool, seconds: float | None) -> None:
        pass

    def result(self, outcome: RunOutcome) -> None:
        pass


class Fanout:
    """Several reporters as one."""

    def __init__(self, reporters: Sequence[Reporter]) -> None:
        self.reporters = list(reporters)

    def say(self, text: str) -> None:
        for r in self.reporters:
            r.say(text)

    def log(self, line: str) -> None:
        for r in self.reporters:
            r.log(line)

    def resource(self, event: Any) -> None:
        for r in self.reporters:
            r.resource(event)

    def phase(self, name: str, node: int | None, started: bool, seconds: float | None) -> None:
        for r in self.reporters:
            r.phase(name, node, started, seconds)

    def result(self, outcome: RunOutcome) -> None:
        for r in self.reporters:
            r.result(outcome)
