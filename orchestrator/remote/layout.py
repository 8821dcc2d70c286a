"""Where a run lives on a VM, and how to name those paths safely in a remote shell."""

from __future__ import annotations

import shlex
from dataclasses import dataclass


def rq(path: str) -> str:
    """Shell-quote a remote path; a leading ~/ becomes "$HOME"/ so it still expands on the VM."""
    if path.startswith("~/"):
        return '"$HOME"/' + shlex.quote(path[2:])
    return shlex.quote(path)


@dataclass(frozen=True)
class RemoteLayout:
    """Where a run lives on a VM: <base>/<run id>/{job,outputs,checkpoints,phases/<phase>}."""

    run_id: str
    base: str = "~/orch"

    @property
    def root(self) -> str:
        return f"{self.base}/{self.run_id}"

    @property
    def job_dir(self) -> str:
        return f"{self.root}/job"

    @property
    def outputs(self) -> str:
        return f"{self.root}/outputs"

    @property
    def checkpoints(self) -> str:
        return f"{self.root}/checkpoints"

    @property
    def manifest(self) -> str:
        return f"{self.root}/sync-manifest.json"

    def phase(self, name: str) -> str:
        return f"{self.root}/phases/{name}"
