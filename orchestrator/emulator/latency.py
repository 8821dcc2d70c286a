"""How long things take in the emulator: `instant` for tests and dry-run, `azure-like` for realism.

Durations are in Azure seconds; `scale` multiplies all of them (0.5 = twice as fast as Azure).
To run a realistic profile in less wall time, keep scale at 1 and give the emulator a ScaledClock
instead: then the SDK's own sleeps shrink by the same factor and every ratio stays true.
"""

from __future__ import annotations

from dataclasses import dataclass, field, replace

from orchestrator import catalog

# Creation times are the catalog's typical Azure figures (one source for the dry-run estimate and
# the emulator); deletion times from the same public reports: VM delete ~30 s, group delete minutes.
_AZURE_CREATE = {**catalog.TYPICAL_SECONDS, "Microsoft.Compute/disks": 5.0}
_AZURE_DELETE = {
    "Microsoft.Network/virtualNetworks": 10.0,
    "Microsoft.Network/networkSecurityGroups": 5.0,
    "Microsoft.Network/publicIPAddresses": 10.0,
    "Microsoft.Network/networkInterfaces": 5.0,
    "Microsoft.Compute/virtualMachines": 30.0,
    "Microsoft.Compute/disks": 5.0,
}


@dataclass(frozen=True)
class LatencyProfile:
    name: str
    create: dict[str, float] = field(default_factory=dict)
    delete: dict[str, float] = field(default_factory=dict)
    group_delete: float = 0.0
    group_delete_forced: float = 0.0  # force_deletion_types skips the VMs' graceful shutdown
    boot_to_ssh: float = 0.0
    request: float = 0.0  # ARM front-door round trip, charged on every request
    provider_registration: float = 0.0  # POST .../register: Registering for this long, then Registered
    vm_deallocate: float = 0.0  # POST .../deallocate: the OS shuts down, the host lets go of the VM
    vm_start: float = 0.0  # POST .../start: allocated again and booted
    scale: float = 1.0

    def create_seconds(self, resource_type: str) -> float:
        return self.create.get(resource_type, 0.0) * self.scale

    def delete_seconds(self, resource_type: str) -> float:
        return self.delete.get(resource_type, 0.0) * self.scale

    def group_delete_seconds(self, forced: bool) -> float:
        return (self.group_delete_forced if forced else self.group_delete) * self.scale

    def request_seconds(self) -> float:
        return self.request * self.scale

    def boot_seconds(self) -> float:
        return self.boot_to_ssh * self.scale


PROFILES: dict[str, LatencyProfile] = {
    "instant": LatencyProfile("instant"),
    "azure-like": LatencyProfile(
        "azure-like",
        create=_AZURE_CREATE,
        delete=_AZURE_DELETE,
        group_delete=240.0,
        group_delete_forced=90.0,
        boot_to_ssh=catalog.TYPICAL_BOOT_TO_SSH_SECONDS,
        request=0.15,
        provider_registration=60.0,
        vm_deallocate=60.0,
        vm_start=45.0,
    ),
}


def get_profile(name: str, scale: float = 1.0) -> LatencyProfile:
    try:
        base = PROFILES[name]
    except KeyError:
        raise ValueError(f"unknown latency profile {name!r}; choose one of {', '.join(PROFILES)}") from None
    return replace(base, scale=scale)
