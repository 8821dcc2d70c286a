"""Emulated VMs (in-process emulator + asyncssh hosts) and a real OpenSSH sshd, for the runner tests."""

from __future__ import annotations

from collections.abc import Iterator
from dataclasses import dataclass
from datetime import UTC, datetime
from pathlib import Path

import pytest

from orchestrator.azure.provision import Provisioner
from orchestrator.azure.teardown import delete_group
from orchestrator.lifecycle.steps import RunKeys, make_keys
from orchestrator.plan import build_plan, resource_group_name
from orchestrator.remote.connect import ConnectOptions, Endpoint, Node
from orchestrator.remote.layout import RemoteLayout
from orchestrator.runfiles import NodeRecord, RunFiles
from orchestrator.spec import JobSpec
from orchestrator.targets.local import LocalTarget
from tests.sshd import SshdUnavailable, run_sshd

FAST = ConnectOptions(deadline_s=20, connect_timeout_s=5, first_backoff_s=0.05, max_backoff_s=0.5)


@dataclass
class EmulatedVms:
    """VMs on the local target: real host processes on loopback, reached over real SSH."""

    target: LocalTarget
    keys: RunKeys
    nodes: list[Node]
    records: list[NodeRecord]
    layout: RemoteLayout
    run_id: str

    def home(self, rank: int = 0) -> Path:
        return self.target.vms_dir / self.nodes[rank].ep.name / "home"

    def drop_connections(self, rank: int = 0) -> None:
        self.target.hosts().drop_connections(self.nodes[rank].ep.name)

    def close(self) -> None:
        for n in self.nodes:
            n.close()
        with self.target.session() as session:  # deleting the VMs ends their host processes
            delete_group(session, resource_group_name(self.run_id), wait=True)


def start_vms(tmp: Path, nodes: int = 1, boot_seconds: float = 0.0, run_id: str = "job-aaaaaa") -> EmulatedVms:
    target = LocalTarget(tmp / "state")
    target.hosts().boot_delay_s = boot_seconds
    spec = JobSpec.model_validate({"name": "job", "run": "true", "nodes": nodes, "base_dir": str(tmp)})
    files = RunFiles(target.state, run_id).ensure()
    keys = make_keys(spec, run_id, files)
    with target.session() as session:
        plan = build_plan(
            spec,
            run_id,
            subscription_id=session.subscription_id,
            owner="t",
            now=datetime.now(UTC),
            ssh_public_key=keys.client_public,
            custom_data=keys.custom_data,
        )
        result = Provisioner(session).provision(plan)
    records = [
        NodeRecord(n.rank, n.vm_name, n.public_ip, n.private_ip, "azureuser", keys.host_keys[n.rank])
        for n in result.nodes
    ]
    node_list = []
    for r in records:
        host, port = target.endpoint(r)
        node_list.append(Node(Endpoint(r.vm_name, host, port, "azureuser", r.host_key, keys.client_key, r.rank), FAST))
    return EmulatedVms(target, keys, node_list, records, RemoteLayout(run_id), run_id)


@pytest.fixture
def vms(tmp_path: Path) -> Iterator[EmulatedVms]:
    env = start_vms(tmp_path)
    yield env
    env.close()


@pytest.fixture
def vms2(tmp_path: Path) -> Iterator[EmulatedVms]:
    env = start_vms(tmp_path, nodes=2)
    yield env
    env.close()


@dataclass
class Sshd:
    node: Node
    layout: RemoteLayout
    base: Path
    host_key_pub: str


@pytest.fixture
def sshd(tmp_path: Path) -> Iterator[Sshd]:
    """OpenSSH's sshd on a free loopback port with its own config, keys and port."""
    try:
        server = run_sshd(tmp_path / "sshd")
        local = server.__enter__()
    except SshdUnavailable as e:
        pytest.skip(str(e))
    base = tmp_path / "remote"
    node = Node(Endpoint("sshd", "127.0.0.1", local.port, local.user, local.host_key.public, local.client_key), FAST)
    try:
        yield Sshd(node, RemoteLayout("job-bbbbbb", str(base)), base, local.host_key.public)
    finally:
        node.close()
        server.__exit__(None, None, None)
