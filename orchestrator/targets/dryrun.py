"""--dry-run: the real provisioner and teardown against a throwaway in-process emulator.

Nothing leaves the process. The target records every ARM request so the dry-run can show them, and
resolves SSH sources to exactly the rule a real run would create, without refusing: where a real
run would refuse, it warns instead (the user is looking, not creating).
"""

from __future__ import annotations

from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, ClassVar

from orchestrator.targets.base import OPEN_WARNING, Say, SshSources, Target, opens_to_internet

if TYPE_CHECKING:
    from orchestrator.azure.session import AzureSession
    from orchestrator.emulator import Emulator

DRY_RUN_SUBSCRIPTION = "00000000-0000-0000-0000-000000000000"
# A documentation address (RFC 5737) standing in for the user's own, detected only by a real run.
DETECTED_PLACEHOLDER = "192.0.2.1/32"


@dataclass(frozen=True)
class RecordedRequest:
    method: str
    path: str
    api_version: str
    status: int
    poll: bool


class DryRunTarget(Target):
    emulated: ClassVar[bool] = True

    def __init__(self, state: Path, *, of: str = "azure", start: float | None = None) -> None:
        super().__init__(state)
        self.of = of  # the target a real run would use: its SSH rules are the ones shown
        self.start = start
        self._emulator: Emulator | None = None

    @property
    def kind(self) -> str:  # type: ignore[override]
        return "dryrun"

    @contextmanager
    def session(self) -> Iterator[AzureSession]:
        import time

        from orchestrator.clock import VirtualClock
        from orchestrator.emulator import Emulator
        from orchestrator.targets.emulated import emulator_session

        self._emulator = Emulator("instant", clock=VirtualClock(self.start or time.time()))
        yield emulator_session(self._emulator, DRY_RUN_SUBSCRIPTION)

    def requests(self) -> list[RecordedRequest]:
        """Every ARM request the session sent so far, in order."""
        if self._emulator is None:
            return []
        return [
            RecordedRequest(r.method, r.path, r.api_version or "", r.status, r.kind == "poll")
            for r in self._emulator.requests()
        ]

    def ssh_sources(self, cidrs: list[str], source: str, say: Say) -> SshSources:
        if self.of == "local":
            return SshSources(["127.0.0.1/32"], [], {"127.0.0.1/32": "loopback (the local target)"})
        rest = [c for c in cidrs if c not in {"auto", "any"}]
        if not cidrs:
            return SshSources(
                [],
                ["a real run would refuse this job: ssh.allowed_cidrs is empty (use --ssh-cidr auto for your address)"],
                {},
            )
        if "any" in cidrs or opens_to_internet(rest):
            warning = OPEN_WARNING
            if "any" not in cidrs:
                warning = "a real run would refuse this job unless `any` is written: " + OPEN_WARNING
            return SshSources(["any"], [warning], {"any": "the whole Internet"})
        labels = {}
        if "auto" in cidrs:
            rest.append(DETECTED_PLACEHOLDER)
            labels[DETECTED_PLACEHOLDER] = "your address, detected at run time"
        return SshSources(rest, [], labels)

    def describe(self) -> str:
        return "dry run (nothing is created)"
