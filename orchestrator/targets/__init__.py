"""Where a run's resources live: real Azure, the dry-run's throwaway emulator, or the local emulator.

open_target("azure" | "local", state, subscription)  -> the target a command acts on
target_for(record, state, fallback)                  -> the target a recorded run was created on
"""

from __future__ import annotations

from pathlib import Path
from typing import TYPE_CHECKING

from orchestrator.targets.base import SshSources, Target, opens_to_internet

if TYPE_CHECKING:
    from orchestrator.state import RunRecord

__all__ = ["SshSources", "Target", "open_target", "opens_to_internet", "target_for"]


def open_target(kind: str, state: Path, subscription: str | None = None, *, dry_run: bool = False) -> Target:
    if dry_run:
        from orchestrator.targets.dryrun import DryRunTarget

        return DryRunTarget(state, of=kind)
    if kind == "local":
        from orchestrator.targets.local import LocalTarget

        return LocalTarget(state)
    return Target(state, subscription)


def target_for(record: RunRecord | None, fallback: Target) -> Target:
    """A recorded run is acted on where it was created (its target and subscription)."""
    if record is None:
        return fallback
    if record.target == "local":
        return open_target("local", fallback.state)
    return Target(fallback.state, record.subscription or fallback.subscription)
