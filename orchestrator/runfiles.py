"""The one owner of a run's files: `<state>/runs/<run id>/`.

Everything the tool keeps about a run on this machine lives in that folder, and only this module
builds its paths:

    id_ed25519, id_ed25519.pub   the run's login key pair (0600), unless the job names its own key
    hostkeys/<vm>(.pub)          each VM's SSH host key, made here and handed to the VM in cloud-init
    nodes.json                   how to reach each node (name, rank, addresses, pinned host key, user)
    sync-state.json              what the last sync left on the VMs (a re-sync sends only changes)
    logs/<phase>-<node>.log      the job's output, masked, as it streamed
    artifacts/                   the outputs brought home (unless --artifacts says elsewhere)
"""

from __future__ import annotations

import json
import os
from dataclasses import asdict, dataclass
from pathlib import Path


@dataclass(frozen=True)
class NodeRecord:
    """How to reach one node of a run; what `train`, `exec`, `collect` and `logs -f` read back."""

    rank: int
    vm_name: str
    public_ip: str
    private_ip: str
    user: str
    host_key: str  # "ssh-ed25519 AAAA...": the only key accepted for this node


@dataclass(frozen=True)
class RunFiles:
    state: Path
    run_id: str

    @property
    def root(self) -> Path:
        return self.state / "runs" / self.run_id

    def ensure(self) -> RunFiles:
        self.root.mkdir(parents=True, exist_ok=True, mode=0o700)
        os.chmod(self.root, 0o700)
        return self

    def exists(self) -> bool:
        return self.root.is_dir()

    @property
    def client_key(self) -> Path:
        return self.root / "id_ed25519"

    @property
    def hostkeys(self) -> Path:
        return self.root / "hostkeys"

    def hostkey(self, vm_name: str) -> Path:
        return self.hostkeys / vm_name

    @property
    def known_hosts(self) -> Path:
        """The nodes' pinned host keys in OpenSSH's format, for `orchestrator ssh` (never ~/.ssh)."""
        return self.root / "known_hosts"

    @property
    def nodes_file(self) -> Path:
        return self.root / "nodes.json"

    @property
    def sync_state(self) -> Path:
        return self.root / "sync-state.json"

    @property
    def logs(self) -> Path:
        return self.root / "logs"

    def log(self, phase: str, node_label: str) -> Path:
        return self.logs / f"{phase}-{node_label}.log"

    @property
    def artifacts(self) -> Path:
        return self.root / "artifacts"

    @property
    def checkpoints(self) -> Path:
        """Spot runs: each node's $ORCH_CHECKPOINT_DIR copied home, `<rank>/` (lifecycle/recovery.py)."""
        return self.root / "checkpoints"

    def write_nodes(self, nodes: list[NodeRecord]) -> None:
        tmp = self.nodes_file.with_suffix(".tmp")
        tmp.write_text(json.dumps([asdict(n) for n in nodes], indent=2))
        os.chmod(tmp, 0o600)
        tmp.replace(self.nodes_file)

    def read_nodes(self) -> list[NodeRecord] | None:
        try:
            raw = json.loads(self.nodes_file.read_text())
            return [NodeRecord(**{k: n[k] for k in NodeRecord.__dataclass_fields__}) for n in raw]
        except (OSError, ValueError, KeyError, TypeError):
            return None

    def forget_host_private_keys(self) -> None:
        """Once pinned (the public halves are in nodes.json), the host private keys have no use here:
        they travelled to the VMs in their custom data."""
        if self.hostkeys.is_dir():
            for f in self.hostkeys.iterdir():
                if not f.name.endswith(".pub"):
                    f.unlink(missing_ok=True)
