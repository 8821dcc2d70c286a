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
    # Private also when it already existed: it holds run keys and the local VMs' host keys.
    if path.stat().st_mode & 0o077:
        os.chmod(path, 0o700)
    return path
