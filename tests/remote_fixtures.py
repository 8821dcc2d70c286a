"""Emulated VMs (in-process emulator + asyncssh hosts) and a real OpenSSH sshd, for the runner tests."""

from __future__ import annotations

from collections.abc import Iterator
from dataclasses import dataclass
from datetime import UTC, datetime
from pathlib import Path

import pytest

from orchestrator.azure.provision import Provisioner
from orchestrator.azure.session import AzureSession, emulator_session
from orchestrator.clock import SystemClock
from orchestrator.emulator import Emulator
from orchestrator.emulator.sshhost import SshHosts
from orchestrator.lifecycle import RunKeys, _keys
from orchestrator.plan import build_plan
from orchestrator.remote.connect import ConnectOptions, Endpoint, Node
from orchestrator.remote.layout import RemoteLayout
from orchestrator.spec import JobSpec
from tests.sshd import SshdUnavailable, run_sshd

FAST = ConnectOptions(deadline_s=20, connect_timeout_s=5, first_backoff_s=0.05, max_backoff_s=0.5)


@dataclass
class EmulatedVms:
    emulator: Emulator
    hosts: SshHosts
    session: AzureSession
    keys: RunKeys
    nodes: list[Node]
    layout: RemoteLayout
    run_id: str

    def home(self, rank: int = 0) -> Path:
        return self.hosts.home_of(self.nodes[rank].ep.name)


def start_vms(tmp: Path, nodes: int = 1, boot_seconds: float = 0.0, run_id: str = "job-aaaaaa") -> EmulatedVms:
    emu = Emulator("instant", clock=SystemClock())
    hosts = SshHosts(tmp / "vms", emu.clock, lambda: boot_seconds)
    emu.attach_hosts(hosts)
    session = emulator_session(emu, poll_scale=0)
    spec = JobSpec.model_validate({"name": "job", "run": "true", "nodes": nodes, "base_dir": str(tmp)})
    folder = tmp / "run"
    folder.mkdir(exist_ok=True)
    keys = _keys(spec, run_id, folder)
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
    node_list = []
    for n in result.nodes:
        host, port = session.ssh_endpoint(n.public_ip)
        node_list.append(
            Node(Endpoint(n.vm_name, host, port, "azureuser", keys.host_keys[n.rank], keys.client_key, n.rank), FAST)
        )
    return EmulatedVms(emu, hosts, session, keys, node_list, RemoteLayout(run_id), run_id)


@pytest.fixture
def vms(tmp_path: Path) -> Iterator[EmulatedVms]:
    env = start_vms(tmp_path)
    yield env
    for n in env.nodes:
        n.close()
    env.hosts.close()


@pytest.fixture
def vms2(tmp_path: Path) -> Iterator[EmulatedVms]:
    env = start_vms(tmp_path, nodes=2)
    yield env
    for n in env.nodes:
        n.close()
    env.hosts.close()


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
