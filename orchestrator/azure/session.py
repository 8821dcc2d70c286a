"""Credentials, subscription and SDK clients for one target (real Azure or the emulator).

The emulator is chosen here, at client construction, and nowhere else: the provisioner and teardown
code run unchanged against either.
"""

from __future__ import annotations

import os
import shutil
import subprocess
import threading
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any

from orchestrator.azure.polling import make_polling, schedule_for
from orchestrator.clock import Clock, SystemClock
from orchestrator.errors import CredentialsError

if TYPE_CHECKING:
    from orchestrator.emulator import Emulator

DRY_RUN_SUBSCRIPTION = "00000000-0000-0000-0000-000000000000"
LOCAL_SUBSCRIPTION = "11111111-1111-1111-1111-111111111111"


@dataclass
class AzureSession:
    subscription_id: str
    credential: Any
    clock: Clock = field(default_factory=SystemClock)
    transport: Any = None  # None: azure-core's default HTTP transport
    poll_scale: float = 1.0
    backend: str = "azure"
    emulator: Emulator | None = None
    _clients: dict[str, Any] = field(default_factory=dict, repr=False)
    _lock: threading.Lock = field(default_factory=threading.Lock, repr=False)

    def _client(self, name: str) -> Any:
        with self._lock:
            if name not in self._clients:
                self._clients[name] = self._build(name)
            return self._clients[name]

    def _build(self, name: str) -> Any:
        # azure-core retries 429/5xx and honours Retry-After; its default of 3 status retries gives up
        # too early in a throttling storm for an unattended nightly job.
        kwargs: dict[str, Any] = {
            "retry_total": 10,
            "retry_status": 10,
            "retry_backoff_factor": 0.8,
            "retry_backoff_max": 60,
        }
        if self.transport is not None:
            kwargs["transport"] = self.transport
        if name == "resource":
            from azure.mgmt.resource.resources import ResourceManagementClient

            return ResourceManagementClient(self.credential, self.subscription_id, **kwargs)
        if name == "compute":
            from azure.mgmt.compute import ComputeManagementClient

            return ComputeManagementClient(self.credential, self.subscription_id, **kwargs)
        from azure.mgmt.network import NetworkManagementClient

        return NetworkManagementClient(self.credential, self.subscription_id, **kwargs)

    @property
    def resources(self) -> Any:
        return self._client("resource")

    @property
    def compute(self) -> Any:
        return self._client("compute")

    @property
    def network(self) -> Any:
        return self._client("network")

    def ssh_endpoint(self, public_ip: str) -> tuple[str, int]:
        """Where to dial a VM's SSH: on Azure always its public IP and port 22."""
        if self.emulator is not None and self.emulator.ssh_resolver is not None:
            return self.emulator.ssh_resolver(public_ip)
        return public_ip, 22

    def polling(self, kind: str) -> Any:
        """A fresh poller strategy for one LRO of `kind` (an ARM type, 'delete' or 'group-delete')."""
        return make_polling(schedule_for(kind, self.poll_scale), self.clock)


def resolve_subscription(flag: str | None) -> str:
    """--subscription, then AZURE_SUBSCRIPTION_ID, then the az CLI's default subscription."""
    if flag:
        return flag
    env = os.environ.get("AZURE_SUBSCRIPTION_ID", "").strip()
    if env:
        return env
    az = shutil.which("az")
    if az:
        try:
            out = subprocess.run(
                [az, "account", "show", "--query", "id", "-o", "tsv"],
                capture_output=True,
                text=True,
                timeout=20,
                check=False,
            )
        except (OSError, subprocess.TimeoutExpired):
            out = None
        if out is not None and out.returncode == 0 and out.stdout.strip():
            return out.stdout.strip()
    raise CredentialsError(
        "No Azure subscription found: pass --subscription ID, set AZURE_SUBSCRIPTION_ID, or run `az login` "
        "(and `az account set -s ID`). To try the tool without Azure, add --dry-run or use --target local."
    )


def azure_session(subscription: str | None) -> AzureSession:
    from azure.identity import DefaultAzureCredential

    sub = resolve_subscription(subscription)
    credential = DefaultAzureCredential(exclude_interactive_browser_credential=True)
    return AzureSession(subscription_id=sub, credential=credential)


def emulator_session(
    emulator: Emulator, subscription: str = DRY_RUN_SUBSCRIPTION, poll_scale: float = 1.0
) -> AzureSession:
    from orchestrator.emulator.transport import EmulatorCredential, EmulatorTransport

    return AzureSession(
        subscription_id=subscription,
        credential=EmulatorCredential(),
        clock=emulator.clock,
        transport=EmulatorTransport(emulator),
        poll_scale=poll_scale,
        backend="emulator",
        emulator=emulator,
    )


@contextmanager
def local_session(state: Path) -> Iterator[AzureSession]:
    """--target local: the emulator, its store a file in the state directory that every process shares.

    ORCH_EMULATOR_PROFILE (instant or azure-like) and ORCH_EMULATOR_SPEED (emulated seconds per real
    second) make it slow like Azure, for trying interruptions by hand; keep the speed at 1 across
    separate commands, since each process starts its clock at the wall time.
    """
    from orchestrator.clock import ScaledClock, SystemClock
    from orchestrator.emulator import Emulator
    from orchestrator.emulator.persist import StoreFile
    from orchestrator.emulator.sshhost import SshHosts

    profile = os.environ.get("ORCH_EMULATOR_PROFILE", "instant")
    speed = float(os.environ.get("ORCH_EMULATOR_SPEED", "1"))
    clock = SystemClock() if speed == 1 else ScaledClock(speed)
    emulator = Emulator(profile, clock=clock, backing=StoreFile(state / "emulator" / "store.json"))
    # Each emulated VM's SSH server lives as long as this process; its sandbox (and any job running
    # there) stays on disk, so the next command serves the same VM again.
    hosts = SshHosts(state / "emulator" / "vms", emulator.clock, emulator.profile.boot_seconds)
    emulator.attach_hosts(hosts)
    try:
        # Operations on the instant profile finish at once: poll without waiting.
        yield emulator_session(
            emulator, subscription=LOCAL_SUBSCRIPTION, poll_scale=0.0 if profile == "instant" else 1.0
        )
    finally:
        hosts.close(kill=False)


def dry_run_session(start: float) -> AzureSession:
    """--dry-run: a throwaway emulator on a virtual clock; nothing leaves the process."""
    from orchestrator.clock import VirtualClock
    from orchestrator.emulator import Emulator

    return emulator_session(Emulator("instant", clock=VirtualClock(start)))
