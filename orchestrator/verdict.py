"""A run's verdict: one per run, stored, shown identically by every verb, mapped to one exit code.

DESIGN.md's run model is the table below; nothing else decides an exit code for a run.
"""

from __future__ import annotations

from enum import StrEnum


class Verdict(StrEnum):
    SUCCEEDED = "succeeded"
    JOB_FAILED = "job-failed"
    GATE_FAILED = "gate-failed"
    ARTIFACTS_INCOMPLETE = "artifacts-incomplete"
    TIMED_OUT = "timed-out"
    OVER_BUDGET = "over-budget"
    BAD_INPUT = "bad-input"
    AZURE_REFUSED = "azure-refused"
    RESTARTS_EXHAUSTED = "restarts-exhausted"
    INTERRUPTED = "interrupted"
    CANCELLED = "cancelled"

    @property
    def ok(self) -> bool:
        return self is Verdict.SUCCEEDED


EXIT_CODES: dict[Verdict, int] = {
    Verdict.SUCCEEDED: 0,
    Verdict.JOB_FAILED: 1,
    Verdict.GATE_FAILED: 1,
    Verdict.ARTIFACTS_INCOMPLETE: 1,
    Verdict.TIMED_OUT: 1,
    Verdict.OVER_BUDGET: 1,
    Verdict.BAD_INPUT: 2,
    Verdict.AZURE_REFUSED: 3,
    Verdict.RESTARTS_EXHAUSTED: 3,
    Verdict.INTERRUPTED: 130,
    Verdict.CANCELLED: 130,
}

EXIT_SIGTERM = 143


def exit_code(verdict: Verdict, *, sigterm: bool = False) -> int:
    """The exit code of the command that watched a run to this verdict."""
    if verdict is Verdict.INTERRUPTED and sigterm:
        return EXIT_SIGTERM
    return EXIT_CODES[verdict]
