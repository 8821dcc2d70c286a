"""What a run came to, and the one function that decides its verdict (pure)."""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from orchestrator.errors import CloudError, CredentialsError, OrchestratorError, Terminated, UserInputError
from orchestrator.verdict import Verdict, exit_code


class LimitReached(OrchestratorError):
    """max_duration or budget_usd stopped the run (it was torn down)."""

    def __init__(self, message: str, verdict: Verdict) -> None:
        super().__init__(message)
        self.verdict = verdict


@dataclass
class RunOutcome:
    run_id: str
    verdict: Verdict
    job_exit_code: int | None = None  # the job's own code (None: it never ran)
    failed_phase: str | None = None
    artifacts: Path | None = None
    skipped: list[tuple[str, str]] = field(default_factory=list)  # artifact members left out, and why
    metrics: dict[str, Any] = field(default_factory=dict)
    seconds: float = 0.0
    torn_down: bool = False
    kept: bool = False
    message: str = ""  # one paragraph: why the verdict is not `succeeded`, and what to do
    gates: list[Any] = field(default_factory=list)  # gates.GateResult for each `expect` metric
    cost_usd: float = 0.0
    sigterm: bool = False

    @property
    def exit_code(self) -> int:
        """The exit code of the command that watched this run."""
        return exit_code(self.verdict, sigterm=self.sigterm)

    def detail(self) -> dict[str, Any]:
        """What the stored verdict rests on."""
        return {
            "message": self.message or None,
            "failed_phase": self.failed_phase,
            "gates": [g.__dict__ for g in self.gates if not g.passed],
            "skipped": [{"path": p, "reason": r} for p, r in self.skipped],
        }

    def to_json(self) -> dict[str, Any]:
        return {
            "run_id": self.run_id,
            "verdict": str(self.verdict),
            "exit_code": self.exit_code,
            "job_exit_code": self.job_exit_code,
            "failed_phase": self.failed_phase,
            "message": self.message or None,
            "metrics": self.metrics,
            "gates": [g.__dict__ for g in self.gates],
            "artifacts": str(self.artifacts) if self.artifacts else None,
            "skipped": [{"path": p, "reason": r} for p, r in self.skipped],
            "seconds": round(self.seconds, 2),
            "torn_down": self.torn_down,
            "kept": self.kept,
            "cost_usd": round(self.cost_usd, 4),
        }


def verdict_of(
    *,
    error: BaseException | None,
    job_exit_code: int | None,
    gates: list[Any],
    artifacts_error: str,
    skipped: list[tuple[str, str]],
) -> tuple[Verdict, str]:
    """The verdict and its one-paragraph reason, in DESIGN.md's order of precedence."""
    if isinstance(error, LimitReached):
        return error.verdict, str(error)
    if isinstance(error, Terminated):
        return Verdict.INTERRUPTED, "Stopped by SIGTERM: everything was deleted without collecting."
    if isinstance(error, KeyboardInterrupt):
        return Verdict.INTERRUPTED, "Interrupted."
    if isinstance(error, UserInputError):
        return Verdict.BAD_INPUT, str(error)
    from orchestrator.lifecycle.recovery import RestartsExhausted

    if isinstance(error, RestartsExhausted):
        return Verdict.RESTARTS_EXHAUSTED, str(error)
    if isinstance(error, CloudError | CredentialsError):
        return Verdict.AZURE_REFUSED, str(error)
    if error is not None:
        from orchestrator.remote.connect import ConnectTimeout

        if isinstance(error, ConnectTimeout):
            return Verdict.AZURE_REFUSED, str(error)
        text = str(error) if isinstance(error, OrchestratorError) else f"{type(error).__name__}: {error}"
        return Verdict.JOB_FAILED, text
    if job_exit_code not in (None, 0):
        return Verdict.JOB_FAILED, ""
    failed = [g for g in gates if not g.passed]
    if failed:
        return Verdict.GATE_FAILED, (
            "The job ran, but its metrics missed the gates in `expect`: "
            + "; ".join(g.describe() for g in failed)
            + "."
        )
    if artifacts_error or skipped:
        parts = [artifacts_error] if artifacts_error else []
        if skipped:
            parts.append(
                f"{len(skipped)} output(s) were left out: "
                + "; ".join(f"{p} ({r})" for p, r in skipped[:10])
                + ("; ..." if len(skipped) > 10 else "")
            )
        return Verdict.ARTIFACTS_INCOMPLETE, "Some artifacts did not come home: " + " ".join(parts)
    return Verdict.SUCCEEDED, ""
