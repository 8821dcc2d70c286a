"""The run's `Host orch-<run>` entries in ~/.ssh/config, between markers: written by
`ssh-config --write`, taken out by `ssh-config --remove` and whenever the run's resources are
confirmed gone (`down`, `gc`, the end of `run`, `attach`, `cancel`), so no entry outlives its VM."""

from __future__ import annotations

import os
from pathlib import Path


def begin_marker(run_id: str) -> str:
    return f"# >>> orchestrator {run_id} >>>"


def end_marker(run_id: str) -> str:
    return f"# <<< orchestrator {run_id} <<<"


def user_ssh_config() -> Path:
    return Path.home() / ".ssh" / "config"


def _without_block(text: str, run_id: str) -> tuple[str, bool]:
    """`text` with the run's block (markers included) taken out, and whether there was one."""
    begin, end = begin_marker(run_id), end_marker(run_id)
    out: list[str] = []
    inside = found = False
    for line in text.splitlines(keepends=True):
        stripped = line.strip()
        if not inside and stripped == begin:
            inside = found = True
            continue
        if inside:
            if stripped == end:
                inside = False
            continue
        out.append(line)
    if inside:  # a begin marker without its end (edited by hand): take nothing, never the rest of the file
        return text, False
    return "".join(out), found


def _write_config(path: Path, text: str) -> None:
    """Replace the file's content (following a symlink to its target), keeping it private."""
    real = path.resolve() if path.is_symlink() else path
    real.parent.mkdir(parents=True, exist_ok=True, mode=0o700)
    mode = real.stat().st_mode & 0o777 if real.exists() else 0o600  # an existing file keeps its mode
    tmp = real.with_name(f".{real.name}.orchestrator.tmp")
    tmp.write_text(text)
    os.chmod(tmp, mode)
    tmp.replace(real)


def write_entries(run_id: str, block: str, path: Path | None = None) -> Path:
    """Put the run's block first in ~/.ssh/config (replacing an older one), creating the file 0600."""
    path = path or user_ssh_config()
    old = path.read_text() if path.exists() else ""
    rest, _ = _without_block(old, run_id)
    _write_config(path, block + rest)
    return path


def remove_entries(run: str, path: Path | None = None) -> bool:
    """Take the run's block out of ~/.ssh/config; False when there was none. Called once the run's
    resources are gone; it never fails the caller (an unreadable file is left alone)."""
    path = path or user_ssh_config()
    try:
        if not path.exists():
            return False
        rest, found = _without_block(path.read_text(), run.removeprefix("orch-"))
        if found:
            _write_config(path, rest)
        return found
    except OSError:
        return False
