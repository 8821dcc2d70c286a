"""--target local: the whole cycle for real on this machine, against the built-in emulator.

The emulator's state is a file in the state directory that every process shares; each emulated VM
is a host process (localvm/host.py) on its own loopback addresses with its own Python environment,
started and ended as the emulator reports the VM running or deleted, whichever process sees it.
Nothing here sends a packet outside 127.0.0.0/8.
"""

from __future__ import annotations

import os
import socket
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any, ClassVar

from orchestrator.targets.base import Say, SshSources, Target

if TYPE_CHECKING:
    from orchestrator.azure.session import AzureSession
    from orchestrator.runfiles import NodeRecord
    from orchestrator.targets.localvm.manager import VmHosts

LOCAL_SUBSCRIPTION = "11111111-1111-1111-1111-111111111111"
LOOPBACK_ONLY = "127.0.0.1/32"


@dataclass(frozen=True)
class LocalVm:
    name: str
    state: str
    address: str | None
    folder: Path


@dataclass(frozen=True)
class LocalInventory:
    """What the local emulator holds: `emulator status`."""

    root: Path
    groups: list[tuple[str, str, str]] = field(default_factory=list)  # name, state, location
    vms: list[LocalVm] = field(default_factory=list)


class LocalTarget(Target):
    kind: ClassVar[str] = "local"
    emulated: ClassVar[bool] = True
    watch_interval_s: ClassVar[float] = 1.0
    has_gpus: ClassVar[bool] = False  # emulated VMs have none: a GPU size runs on this machine's CPU
    connect_backoff_max_s: ClassVar[float] = 0.1

    def __init__(self, state: Path, subscription: str | None = None) -> None:
        super().__init__(state, subscription)
        self._hosts: VmHosts | None = None

    @property
    def emulator_dir(self) -> Path:
        return self.state / "emulator"

    @property
    def vms_dir(self) -> Path:
        return self.state / "vms"

    def hosts(self) -> VmHosts:
        from orchestrator.emulator import get_profile
        from orchestrator.targets.localvm.manager import VmHosts

        if self._hosts is None:
            profile = get_profile(os.environ.get("ORCH_EMULATOR_PROFILE", "instant"))
            speed = float(os.environ.get("ORCH_EMULATOR_SPEED", "1"))
            self._hosts = VmHosts(
                self.vms_dir,
                self.emulator_dir / "store.json",
                boot_delay_s=profile.boot_seconds() / speed,
                keepalive_s=float(os.environ.get("ORCH_SSH_KEEPALIVE", "15")),
            )
        return self._hosts

    @contextmanager
    def session(self) -> Iterator[AzureSession]:
        """ORCH_EMULATOR_PROFILE (instant or azure-like) and ORCH_EMULATOR_SPEED (emulated seconds per
        real second) make it slow like Azure, for trying interruptions by hand; keep the speed at 1
        across separate commands, since each process starts its clock at the wall time."""
        from orchestrator.clock import ScaledClock, SystemClock
        from orchestrator.emulator import Emulator
        from orchestrator.emulator.persist import StoreFile
        from orchestrator.targets.emulated import emulator_session

        profile = os.environ.get("ORCH_EMULATOR_PROFILE", "instant")
        speed = float(os.environ.get("ORCH_EMULATOR_SPEED", "1"))
        clock = SystemClock() if speed == 1 else ScaledClock(speed)
        from orchestrator.emulator.faults import FaultInjector

        # Each command draws its own faults (a storm hits concurrent runs differently, as Azure's
        # throttling does); ORCH_EMULATOR_SEED repeats one draw.
        seed = int(os.environ.get("ORCH_EMULATOR_SEED") or os.getpid())
        emulator = Emulator(
            profile,
            clock=clock,
            faults=FaultInjector(seed=seed),
            backing=StoreFile(self.emulator_dir / "store.json"),
            subscription=os.environ.get("ORCH_EMULATOR_SUBSCRIPTION"),
        )
        for fault in injected_faults():
            emulator.inject(fault)
        emulator.set_capacity_json(os.environ.get("ORCH_EMULATOR_CAPACITY", ""))  # "Azure is short of GPUs"
        if os.environ.get("ORCH_EMULATOR_VM_ROLE", "1") != "0":
            # The administrator's one-time step (README, 'Autostop'), done: the VM role is defined.
            from orchestrator.azure.selfstop import vm_role

            emulator.define_role(vm_role(), LOCAL_SUBSCRIPTION)
        emulator.add_vm_listener(self.hosts().on_event, replay=True)
        # Operations on the instant profile finish at once: poll without waiting.
        yield emulator_session(emulator, LOCAL_SUBSCRIPTION, poll_scale=0.0 if profile == "instant" else 1.0)

    def endpoint(self, node: NodeRecord) -> tuple[str, int]:
        return self.hosts().endpoint(node.vm_name)

    def node_address(self, node: NodeRecord) -> str:
        address = self.hosts().address(node.vm_name)
        if address is None:
            raise LookupError(f"the local VM {node.vm_name} has no address (is it running?)")
        return address

    def job_network_env(self, nodes: list[NodeRecord]) -> dict[str, str]:
        # Every local VM shares this machine's network stack: torch.distributed must stay on `lo`,
        # and each run gets its own rendezvous port (a port is per machine, not per address).
        return {
            "ORCH_MASTER_ADDR": self.node_address(nodes[0]),
            "ORCH_MASTER_PORT": str(_free_port()),
            "GLOO_SOCKET_IFNAME": "lo",
            "NCCL_SOCKET_IFNAME": "lo",
        }

    def ssh_sources(self, cidrs: list[str], source: str, say: Say) -> SshSources:
        return SshSources([LOOPBACK_ONLY], [], {LOOPBACK_ONLY: "loopback (the local target)"})

    def describe(self) -> str:
        return f"the local emulator in {self.emulator_dir}"

    def inventory(self) -> LocalInventory:
        from orchestrator.emulator.persist import StoreFile

        backing = StoreFile(self.emulator_dir / "store.json")
        with backing.locked():
            store = backing.load()
        groups = [
            (g["name"], g["properties"].get("provisioningState", ""), g.get("location", ""))
            for g in store.groups.values()
        ]
        vms = [
            LocalVm(
                r["name"],
                r["properties"].get("provisioningState", ""),
                self.hosts().address(r["name"]),
                self.vms_dir / r["name"],
            )
            for r in store.resources.values()
            if r["type"] == "Microsoft.Compute/virtualMachines"
        ]
        return LocalInventory(self.emulator_dir, groups, vms)


def injected_faults() -> list[Any]:
    """ORCH_EMULATOR_FAULTS: a JSON list of faults this command's emulator injects, to rehearse what a
    run does when Azure refuses, throttles or runs out of GPUs, e.g.
    [{"code": "AllocationFailed", "method": "PUT", "resource_type": "Microsoft.Compute/virtualMachines",
      "phase": "lro"}]. Fields as orchestrator.emulator.Fault; counts are per command."""
    import json

    from orchestrator.emulator import Fault
    from orchestrator.errors import UserInputError

    text = os.environ.get("ORCH_EMULATOR_FAULTS", "").strip()
    if not text:
        return []
    try:
        items = json.loads(text)
        return [Fault(**item) for item in (items if isinstance(items, list) else [items])]
    except (ValueError, TypeError) as e:
        raise UserInputError(
            f'ORCH_EMULATOR_FAULTS is not a JSON list of faults ({e}); each needs at least "code", e.g. '
            '[{"code": "AllocationFailed", "method": "PUT", "resource_type": '
            '"Microsoft.Compute/virtualMachines", "phase": "lro"}].'
        ) from None


def _free_port() -> int:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def drop_connections(target: Any, vm_name: str) -> None:
    """Tests: cut a local VM's SSH connections as a network failure would."""
    target.hosts().drop_connections(vm_name)
