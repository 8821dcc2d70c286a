"""The Target interface: what differs between real Azure, the dry-run and the local emulator.

The lifecycle talks to a Target only. A target builds the ARM clients (an AzureSession), says how a
node is reached (address, port), what the job's environment says about the network, how the job's
SSH sources are resolved, and what `status` and `emulator` show. Provisioning, SSH, sync and
teardown code run unchanged on all three.
"""

from __future__ import annotations

import ipaddress
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, ClassVar

from orchestrator.errors import UserInputError

if TYPE_CHECKING:
    from orchestrator.azure.session import AzureSession
    from orchestrator.runfiles import NodeRecord

Say = Callable[[str], None]

DEFAULT_MASTER_PORT = 29500  # torch.distributed's customary port; the VNet keeps it private


@dataclass(frozen=True)
class SshSources:
    """Who may reach port 22, as the NSG will say it, and what to tell the user about it."""

    cidrs: list[str]
    warnings: list[str] = field(default_factory=list)
    labels: dict[str, str] = field(default_factory=dict)  # cidr -> how the plan table shows it


def opens_to_internet(cidrs: list[str]) -> bool:
    """True when the prefixes, together, cover every IPv4 or every IPv6 address (0.0.0.0/0, ::/0,
    two /1 halves, `*`, `Internet`, `any`): SSH open to the whole Internet, however it is written."""
    v4: list[ipaddress.IPv4Network] = []
    v6: list[ipaddress.IPv6Network] = []
    for c in cidrs:
        if c.strip().lower() in {"*", "internet", "any", "0.0.0.0/0", "::/0"}:
            return True
        try:
            net = ipaddress.ip_network(c.strip(), strict=False)
        except ValueError:
            continue
        (v4 if net.version == 4 else v6).append(net)  # type: ignore[arg-type]
    covered4 = sum(n.num_addresses for n in ipaddress.collapse_addresses(v4))
    covered6 = sum(n.num_addresses for n in ipaddress.collapse_addresses(v6))
    return covered4 >= 1 << 32 or covered6 >= 1 << 128


OPEN_WARNING = "SSH (port 22) is open to the whole Internet: the VM is a paying GPU with your code on it"


def refuse_empty(source: str) -> UserInputError:
    return UserInputError(
        f"{source}: ssh.allowed_cidrs is empty, so nobody could be let in safely. Set it to your address, "
        "pass --ssh-cidr auto to detect it, or --ssh-cidr any to open SSH to the whole Internet (not "
        "recommended: the VM is a paying GPU with your code on it)."
    )


def refuse_open(source: str) -> UserInputError:
    return UserInputError(
        f"{source}: ssh.allowed_cidrs opens port 22 to the whole Internet. If that is really meant, write "
        "`any` (--ssh-cidr any); otherwise use your address (--ssh-cidr auto detects it)."
    )


class Target:
    """Real Azure by default; local and dryrun override what differs."""

    kind: ClassVar[str] = "azure"
    emulated: ClassVar[bool] = False
    watch_interval_s: ClassVar[float] = 15.0  # how often a running job's resource group is checked
    has_gpus: ClassVar[bool] = True  # a GPU size's VMs have their GPUs (the local target's do not)
    # How long the SSH retries may wait between attempts while a VM boots: the wait after sshd starts
    # is up to this long, on the way to the first training step; ~25 refused attempts over a 45 s
    # boot cost nothing. A local VM answers within a second, so it retries more often still.
    connect_backoff_max_s: ClassVar[float] = 2.0

    def __init__(self, state: Path, subscription: str | None = None) -> None:
        self.state = state
        self.subscription = subscription

    @contextmanager
    def session(self) -> Iterator[AzureSession]:
        from orchestrator.azure.session import azure_session

        yield azure_session(self.subscription)

    # ------------------------------------------------------------------ reaching the nodes

    def endpoint(self, node: NodeRecord) -> tuple[str, int]:
        """Where to dial a node's SSH: on Azure its public IP, port 22."""
        return node.public_ip, 22

    def node_address(self, node: NodeRecord) -> str:
        """The address other nodes of the run use for this node (its private address in the VNet)."""
        return node.private_ip

    def job_network_env(self, nodes: list[NodeRecord]) -> dict[str, str]:
        """What the job's environment says about the network, the same on every node."""
        return {"ORCH_MASTER_ADDR": self.node_address(nodes[0]), "ORCH_MASTER_PORT": str(DEFAULT_MASTER_PORT)}

    def ssh_sources(self, cidrs: list[str], source: str, say: Say) -> SshSources:
        """Resolve ssh.allowed_cidrs for a real run on Azure: `auto` becomes this machine's public
        address; an empty list, or one that opens port 22 to the Internet without `any`, is refused."""
        if not cidrs:
            raise refuse_empty(source)
        explicit_any = "any" in cidrs
        rest = [c for c in cidrs if c not in {"auto", "any"}]
        if not explicit_any and opens_to_internet(rest):
            raise refuse_open(source)
        warnings = []
        if explicit_any or opens_to_internet(rest):
            say("warning: " + OPEN_WARNING)
            warnings.append(OPEN_WARNING)
            return SshSources(["any"], warnings, {"any": "the whole Internet"})
        labels: dict[str, str] = {}
        if "auto" in cidrs:
            ip = detect_public_ip()
            cidr = f"{ip}/32" if ":" not in ip else f"{ip}/128"
            say(f"SSH allowed from your address {ip} (detected)")
            rest.append(cidr)
            labels[cidr] = f"your address {ip} (detected)"
        return SshSources(rest, warnings, labels)

    # ------------------------------------------------------------------ what status shows

    def describe(self) -> str:
        return f"Azure subscription {self.subscription or '(az default)'}"


IP_ECHO_URL = "https://api.ipify.org"


def detect_public_ip(url: str | None = None, timeout: float = 5.0) -> str:
    """This machine's public address as the Internet sees it (what the NSG must let in)."""
    import os
    import urllib.request

    url = url or os.environ.get("ORCH_IP_ECHO_URL", IP_ECHO_URL)
    try:
        with urllib.request.urlopen(url, timeout=timeout) as response:
            text = response.read(64).decode().strip()
        return str(ipaddress.ip_address(text))
    except (OSError, ValueError) as e:
        raise UserInputError(
            f"Could not detect your public address from {url} ({e}). Pass it yourself with --ssh-cidr "
            "203.0.113.7/32 (or set ssh.allowed_cidrs)."
        ) from None
