"""Emulated VMs (in-process emulator + asyncssh hosts) and a real OpenSSH sshd, for the runner tests."""

from __future__ import annotations

import getpass
import os
import shutil
import socket
import subprocess
import time
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
from orchestrator.sshkeys import generate_host_key, generate_keypair

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


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


@dataclass
class Sshd:
    node: Node
    layout: RemoteLayout
    base: Path
    host_key_pub: str


@pytest.fixture
def sshd(tmp_path: Path) -> Iterator[Sshd]:
    """OpenSSH's sshd on a free loopback port with its own config, host key and authorized key."""
    binary = shutil.which("sshd") or "/usr/sbin/sshd"
    if not os.path.exists(binary):
        pytest.skip("OpenSSH sshd is not installed (.ci/run installs openssh-server)")
    d = tmp_path / "sshd"
    d.mkdir()
    host = generate_host_key(d / "host_ed25519")
    client_key, client_pub = generate_keypair(d, "client")
    (d / "authorized_keys").write_text(client_pub + "\n")
    os.chmod(d / "authorized_keys", 0o600)
    Path("/run/sshd").mkdir(exist_ok=True) if os.geteuid() == 0 else None
    port = free_port()
    user = getpass.getuser()
    (d / "sshd_config").write_text(
        f"Port {port}\nListenAddress 127.0.0.1\nHostKey {d / 'host_ed25519'}\nPidFile {d / 'sshd.pid'}\n"
        f"AuthorizedKeysFile {d / 'authorized_keys'}\nPasswordAuthentication no\nKbdInteractiveAuthentication no\n"
        "UsePAM no\nStrictModes no\nPermitRootLogin prohibit-password\nAllowTcpForwarding no\n"
        "X11Forwarding no\nPrintMotd no\nLogLevel ERROR\nMaxSessions 64\nMaxStartups 64\n"
    )
    proc = subprocess.Popen(
        [binary, "-D", "-e", "-f", str(d / "sshd_config")], stdout=subprocess.PIPE, stderr=subprocess.STDOUT
    )
    deadline = time.monotonic() + 10
    while time.monotonic() < deadline:
        with socket.socket() as s:
            if s.connect_ex(("127.0.0.1", port)) == 0:
                break
        if proc.poll() is not None:
            out = proc.stdout.read().decode() if proc.stdout else ""
            pytest.skip(f"sshd did not start here: {out[-300:]}")
        time.sleep(0.05)
    base = tmp_path / "remote"
    node = Node(Endpoint("sshd", "127.0.0.1", port, user, host.public, client_key), FAST)
    try:
        yield Sshd(node, RemoteLayout("job-bbbbbb", str(base)), base, host.public)
    finally:
        node.close()
        proc.terminate()
        proc.wait(timeout=10)
