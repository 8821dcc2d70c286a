"""Where the tool keeps its files: the user's state directory (XDG), overridable per command."""

from __future__ import annotations

import os
from pathlib import Path


def state_dir(override: str | Path | None = None) -> Path:
    if override:
        path = Path(override).expanduser()
    else:
        base = os.environ.get("XDG_STATE_HOME") or str(Path.home() / ".local" / "state")
        path = Path(base) / "orchestrator"
    path.mkdir(parents=True, exist_ok=True, mode=0o700)
    return path


def run_dir(state: Path, run_id: str) -> Path:
    path = state / "runs" / run_id
    path.mkdir(parents=True, exist_ok=True, mode=0o700)
    return path
