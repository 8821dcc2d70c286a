"""Microsoft.Compute: virtual machines, with inline NICs and public IPs (networkInterfaceConfigurations)
or attached ones, their OS disk, deleteOption cascades, vCPU quota per family and region, and the
cloud-init check of customData. Whoever serves the emulated VMs subscribes with `add_vm_listener`."""

from __future__ import annotations

import copy
import secrets
import uuid
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

from orchestrator import catalog
from orchestrator.emulator import validation as v
from orchestrator.emulator.cloudinit import CloudInitError, parse_cloud_init
from orchestrator.emulator.faults import DEFAULT_EVICT_AFTER_S, DEFAULT_MESSAGES, EVICTION_NOTICE_S
from orchestrator.emulator.network import NetworkRP
from orchestrator.emulator.store import (
    T_DISK,
    T_NIC,
    T_PIP,
    T_VM,
    EmuResponse,
    LoggedRequest,
    Store,
    base,
    now_iso,
    public,
    rid,
)
from orchestrator.emulator.typed import Write, Written
from orchestrator.emulator.validation import ArmFault


@dataclass(frozen=True)
class VmEvent:
    """A VM became running (its create or update succeeded) or was deleted."""

    kind: str  # "running" | "deallocated" (its OS is shut down, its disks stay) | "deleted"
    name: str  # VM name
    resource_group: str
    vm_id: str  # ARM id
    location: str
    vm_size: str
    admin_user: str
    authorized_keys: tuple[str, ...]  # osProfile.linuxConfiguration.ssh.publicKeys[].keyData
    custom_data: str | None  # base64 customData as sent (never returned on GET)
    public_ip: str | None
    private_ip: str | None  # the NIC's privateIPAddress (e.g. 10.42.0.4)
    # Wall seconds the VM has already been running when the event is sent: an operation's end is
    # seen on the next poll, but the VM boots from its end, whoever polls when.
    running_for_s: float = 0.0


VmListener = Callable[[VmEvent], None]

EMULATOR_TENANT = "22222222-2222-2222-2222-222222222222"
# A power action's state while under way, and once done (instanceView's PowerState/<state>).
_POWER = {
    "deallocate": ("deallocating", "deallocated"),
    "start": ("starting", "running"),
    "poweroff": ("stopping", "stopped"),
}
OFF = frozenset({"deallocating", "deallocated", "stopping", "stopped"})  # power states with no host


def power_state(vm: dict[str, Any]) -> str:
    """The VM's power state as instanceView reports it (a VM whose create succeeded runs)."""
    created = vm["properties"].get("provisioningState") == "Succeeded"
    return str(vm.get("_power") or ("running" if created else "starting"))


class ComputeRP(NetworkRP):
    _vm_listeners: list[VmListener]
    _vm_events: list[VmEvent]
    _ended_at: float | None = None  # the end of the operation being finished, while it is

    def _finish(self, op_id: str, op: dict[str, Any]) -> None:
        self._ended_at = float(op["end"])
        try:
            super()._finish(op_id, op)
        finally:
            self._ended_at = None

    def add_vm_listener(self, listener: VmListener, *, replay: bool = True) -> None:
        """Called on every VM that becomes running or is deleted; replay=True also calls it now
        (kind "running") for every VM that is already running.

        "running" comes again after each successful update of a VM, so a listener must treat a VM it
        already knows as a no-op. Listeners run in the request's thread once the store's lock is let
        go, so another process may have changed the VM since: a listener that acts on the VM checks
        the store first. They must not call the emulator."""
        with self._locked():
            self._vm_listeners.append(listener)
            if replay:
                for res in list(self.store.resources.values()):
                    if res["type"] != T_VM or res["properties"].get("provisioningState") != "Succeeded":
                        continue
                    if power_state(res) not in OFF:  # a deallocated VM has no host until started
                        self._vm_events.append(self._vm_event("running", res))

    def _on_provisioned(self, res: dict[str, Any]) -> None:
        super()._on_provisioned(res)
        if res["type"] == T_VM and power_state(res) not in OFF:
            self._notify("running", res)

    # ------------------------------------------------------------------ power: deallocate, start, powerOff

    def _vm_or_404(self, g: dict[str, str]) -> dict[str, Any]:
        vm = self.store.resources.get(rid(g["sub"], g["rg"], T_VM, g["name"]).lower())
        if vm is None:
            self._group(g["sub"], g["rg"])
            raise ArmFault(
                404,
                "ResourceNotFound",
                f"The Resource 'Microsoft.Compute/virtualMachines/{g['name']}' under resource group '{g['rg']}' "
                "was not found.",
            )
        return vm

    def _h_vm_action(
        self, method: str, g: dict[str, str], query: dict[str, str], body: Any, rec: LoggedRequest
    ) -> EmuResponse:
        """POST .../deallocate|start|powerOff: an LRO (202, Azure-AsyncOperation and Location). A
        deallocated VM keeps its OS disk, NIC and addresses and stops being billed for compute; its
        host process stops now (the OS shuts down when the operation begins)."""
        if method != "POST":
            raise ArmFault(405, "MethodNotAllowed", "The requested method is not allowed.")
        vm = self._vm_or_404(g)
        action = g["action"].lower()
        rec.kind, rec.resource_type, rec.resource_id = "update", T_VM, vm["id"]
        self._fault("POST", T_VM, rec)
        if vm["properties"].get("provisioningState") != "Succeeded" or power_state(vm) in {
            "deallocating",
            "starting",
            "stopping",
        }:
            raise ArmFault(
                409,
                "OperationNotAllowed",
                f"Operation '{g['action']}' is not allowed on VM '{vm['name']}' since the VM is "
                f"{power_state(vm)} or another operation is in progress.",
            )
        during, after = _POWER[action]
        vm["_power"] = during
        seconds = {"deallocate": self.profile.vm_deallocate, "start": self.profile.vm_start}.get(action, 0.0)
        if during in OFF:
            self._notify("deallocated", vm)
        vm["_powerTime"] = now_iso(self.clock.now())
        op_id = self._new_op("vm-power", vm["id"].lower(), seconds * self.profile.scale, power=after)
        return EmuResponse(202, self._op_headers(g["sub"], T_VM, vm["location"], op_id, query, result=True))

    def _power_settled(self, res_id: str, power: str) -> None:
        vm = self.store.resources.get(res_id)
        if vm is None:
            return
        vm["_power"] = power
        if power == "running":
            self._notify("running", vm)

    def _h_vm_instance_view(
        self, method: str, g: dict[str, str], query: dict[str, str], body: Any, rec: LoggedRequest
    ) -> EmuResponse:
        if method != "GET":
            raise ArmFault(405, "MethodNotAllowed", "The requested method is not allowed.")
        vm = self._vm_or_404(g)
        rec.kind, rec.resource_type, rec.resource_id = "read", T_VM, vm["id"]
        return self._ok(200, self.instance_view(vm))

    def instance_view(self, vm: dict[str, Any]) -> dict[str, Any]:
        """Provisioning and power state, as Compute words them (PowerState/deallocated, ...)."""
        state = str(vm["properties"].get("provisioningState", "Succeeded"))
        power = power_state(vm)
        return {
            "computerName": vm["name"],
            "osName": "ubuntu",
            "statuses": [
                {
                    "code": f"ProvisioningState/{state.lower()}",
                    "level": "Info",
                    "displayStatus": f"Provisioning {state.lower()}",
                    "time": vm.get("_powerTime") or vm["properties"].get("timeCreated"),
                },
                {"code": f"PowerState/{power}", "level": "Info", "displayStatus": f"VM {power}"},
            ],
        }

    def vm_public(self, vm: dict[str, Any], query: dict[str, str]) -> dict[str, Any]:
        """GET of a VM; `$expand=instanceView` adds properties.instanceView, as Compute does."""
        out = public(vm)
        if query.get("$expand", "").lower() == "instanceview":
            out["properties"]["instanceView"] = self.instance_view(vm)
        return out

    def _on_removed(self, res: dict[str, Any]) -> None:
        super()._on_removed(res)
        if res["type"] != T_VM:
            return
        self._notify("deleted", res)  # before the cascade: the event still finds the VM's addresses
        for child, option in res.get("_cascade", {}).items():
            if option == "Delete":
                self._remove_resource(child)
            elif child in self.store.resources:
                self.store.resources[child]["properties"].pop("virtualMachine", None)

    def _notify(self, kind: str, vm: dict[str, Any]) -> None:
        if self._vm_listeners:
            self._vm_events.append(self._vm_event(kind, vm))  # read now, while the store is at hand

    def _after_unlock(self) -> None:
        # Outside the store's lock: stopping a VM's host waits for it to end its processes, and
        # other runs' requests must not wait for that. A listener that gets events out of order
        # across processes re-checks the store (localvm/manager.py).
        super()._after_unlock()
        while self._vm_events:
            event = self._vm_events.pop(0)
            for listener in list(self._vm_listeners):
                listener(event)

    def _vm_event(self, kind: str, vm: dict[str, Any]) -> VmEvent:
        props = vm["properties"]
        os_profile = props.get("osProfile") or {}
        keys = ((os_profile.get("linuxConfiguration") or {}).get("ssh") or {}).get("publicKeys") or []
        public_ip, private_ip = self._vm_addresses(vm)
        speed = float(getattr(self.clock, "speed", 1.0))
        late = 0.0 if self._ended_at is None else max(0.0, (self.clock.now() - self._ended_at) / speed)
        return VmEvent(
            kind=kind,
            name=vm["name"],
            resource_group=vm["id"].split("/")[4],
            vm_id=vm["id"],
            location=vm["location"],
            vm_size=props.get("hardwareProfile", {}).get("vmSize", ""),
            admin_user=os_profile.get("adminUsername", ""),
            authorized_keys=tuple(str(k["keyData"]) for k in keys if k.get("keyData")),
            custom_data=vm.get("_customData"),
            public_ip=public_ip,
            private_ip=private_ip,
            running_for_s=late if kind == "running" else 0.0,
        )

    def _vm_addresses(self, vm: dict[str, Any]) -> tuple[str | None, str | None]:
        """(public, private) address of a VM, found as Azure documents it: networkProfile's
        networkInterfaces[].id -> the NIC -> its ipConfigurations -> publicIPAddress.id -> the
        public IP. Primary NICs and IP configurations first."""
        public_ip: str | None = None
        private_ip: str | None = None
        refs = vm["properties"].get("networkProfile", {}).get("networkInterfaces", [])
        for ref in sorted(refs, key=lambda r: not (r.get("properties") or {}).get("primary", False)):
            nic = self.store.resources.get(str(ref.get("id", "")).lower())
            ipcs = (nic or {}).get("properties", {}).get("ipConfigurations", [])
            for ipc in sorted(ipcs, key=lambda c: not c["properties"].get("primary", True)):
                private_ip = private_ip or ipc["properties"].get("privateIPAddress")
                pip_ref = (ipc["properties"].get("publicIPAddress") or {}).get("id", "")
                pip = self.store.resources.get(pip_ref.lower())
                if public_ip is None and pip is not None:
                    public_ip = str(pip["properties"]["ipAddress"])
        return public_ip, private_ip

    # ------------------------------------------------------------------ spot eviction

    def evict(self, vm_id: str) -> str | None:
        """Evict a spot VM now, following its evictionPolicy (see `evict`); the policy applied."""
        with self._locked():
            vm = self.store.resources.get(vm_id.lower())
            policy = evict(self.store, vm_id)
            if vm is not None and policy is not None:
                self._notify("deleted" if policy == "Delete" else "deallocated", vm)
            return policy

    def _read_view(self, res: dict[str, Any], query: dict[str, str]) -> dict[str, Any]:
        return self.vm_public(res, query) if res["type"] == T_VM else super()._read_view(res, query)

    # ------------------------------------------------------------------ the writer

    def _quota_check(self, size: catalog.VmSize, location: str, spot: bool, exclude: str) -> None:
        """Spot VMs draw on the regional lowPriorityCores row only; others on their family's row and
        on the regional `cores` row, which caps all families together."""
        rows = ["lowPriorityCores"] if spot else [size.family, "cores"]
        for row in rows:
            limit = self.quota_limit(location, row)
            usage = 0
            for key, r in self.store.resources.items():
                if r["type"] != T_VM or key == exclude or r["location"] != location:
                    continue
                if r["properties"].get("provisioningState") in {"Failed", "Deleting"}:
                    continue
                other = catalog.VM_SIZES[r["properties"]["hardwareProfile"]["vmSize"]]
                other_spot = r["properties"].get("priority") == "Spot"
                if other_spot != spot:
                    continue
                if row in {"lowPriorityCores", "cores"} or other.family == row:
                    usage += other.vcpus
            if usage + size.vcpus > limit:
                message = DEFAULT_MESSAGES["OperationNotAllowed"].format(
                    family="Total Regional" if row == "cores" else row,
                    location=location,
                    limit=limit,
                    usage=usage,
                    required=size.vcpus,
                    new_limit=usage + size.vcpus,
                )
                raise ArmFault(409, "OperationNotAllowed", message)

    def _late_error(self, kind: str, res_id: str) -> dict[str, str] | None:
        error = super()._late_error(kind, res_id)
        res = self.store.resources.get(res_id)
        if error is not None or res is None or res["type"] != T_VM or kind != "create":
            return error
        return self._capacity_error(res)

    def _capacity_error(self, vm: dict[str, Any]) -> dict[str, str] | None:
        """AllocationFailed (zoneless) or ZonalAllocationFailed (zoned) when a capacity limit that
        covers this VM's size, region and zone is already taken up by the VMs that exist."""
        size = vm["properties"]["hardwareProfile"]["vmSize"]
        region = vm["location"]
        zone = (vm.get("zones") or [""])[0]
        for limit in self.faults.capacity_limits(size, region, zone):
            used = 0
            for key, r in self.store.resources.items():
                if r["type"] != T_VM or key == vm["id"].lower():
                    continue
                if r["properties"].get("provisioningState") in {"Failed", "Deleting"}:
                    continue
                other_zone = (r.get("zones") or [""])[0]
                if limit.covers(r["properties"]["hardwareProfile"]["vmSize"], r["location"], other_zone) and (
                    limit.zone != "*" or other_zone == zone
                ):
                    used += 1
            if used + 1 > limit.vms:
                code = "ZonalAllocationFailed" if zone else "AllocationFailed"
                return {"code": code, "message": DEFAULT_MESSAGES[code]}
        return None

    def _put_vm(self, w: Write) -> Written:
        sub, rg, vm_id, name, location, body, existing, rec = w
        size = v.check_vm(body, location)
        props = body["properties"]
        if props["networkProfile"].get("networkInterfaceConfigurations"):
            self._check_registered(["Microsoft.Network"])  # the VM creates its NICs and IPs there
        if location not in size.regions:
            raise ArmFault(
                409,
                "SkuNotAvailable",
                DEFAULT_MESSAGES["SkuNotAvailable"].format(size=size.name, location=location),
            )
        self._check_sku_restrictions(size.name, location, body.get("zones"))
        _check_os_disk(props["storageProfile"])
        if existing is not None and existing["properties"].get("osProfile") != _strip_secrets(props.get("osProfile")):
            raise ArmFault(409, "PropertyChangeNotAllowed", "Changing property 'osProfile' is not allowed.")
        self._fault("PUT", T_VM, rec, size=size.name, location=location, zone=(body.get("zones") or [""])[0])
        self._quota_check(size, location, props.get("priority") == "Spot", vm_id.lower())
        res = base(vm_id, name, T_VM, location, body)
        if body.get("zones"):
            res["zones"] = list(body["zones"])
        self._identity(res, body, existing)
        if existing is not None and existing.get("_power"):
            res["_power"] = existing["_power"]
        out = copy.deepcopy(props)
        custom = props["osProfile"].get("customData")
        if custom is not None:
            try:
                parse_cloud_init(custom)
            except CloudInitError as e:
                raise v.invalid(f"The custom data of VM {name} is not a valid cloud-init document: {e}.") from None
            res["_customData"] = custom  # kept for the VM's boot, never returned (as ARM does)
        elif existing is not None and existing.get("_customData"):
            res["_customData"] = existing["_customData"]
        out["osProfile"] = _strip_secrets(out["osProfile"])
        out["vmId"] = existing["properties"]["vmId"] if existing else str(uuid.uuid4())
        out["timeCreated"] = existing["properties"]["timeCreated"] if existing else now_iso(self.clock.now())
        children: list[dict[str, Any]] = []
        cascade: dict[str, str] = {}
        nic_refs = []
        for cfg in props["networkProfile"].get("networkInterfaceConfigurations") or []:
            nic, pips = self._nic(rid(sub, rg, T_NIC, cfg["name"]), cfg["name"], location, cfg.get("properties", {}),
                                  body, vm_id)  # fmt: skip
            nic["properties"]["virtualMachine"] = {"id": vm_id}
            children.append(nic)
            children.extend(pips)
            option = cfg.get("properties", {}).get("deleteOption", "Detach")
            cascade[nic["id"].lower()] = option
            for pip in pips:
                cascade[pip["id"].lower()] = pip.pop("_deleteOption")
            primary = cfg["properties"].get("primary", True)
            nic_refs.append({"id": nic["id"], "properties": {"primary": primary, "deleteOption": option}})
        for ref in props["networkProfile"].get("networkInterfaces") or []:
            attached = self._referenced(str(ref.get("id", "")), vm_id, location)
            attached["properties"]["virtualMachine"] = {"id": vm_id}
            nic_refs.append(ref)
            cascade[attached["id"].lower()] = (ref.get("properties") or {}).get("deleteOption", "Detach")
        out["networkProfile"]["networkInterfaces"] = nic_refs
        os_disk = out["storageProfile"]["osDisk"]
        disk_name = os_disk.get("name") or f"{name}_OsDisk_1_{uuid.uuid4().hex}"
        disk_id = rid(sub, rg, T_DISK, disk_name)
        os_disk["name"] = disk_name
        os_disk.setdefault("managedDisk", {})["id"] = disk_id
        if existing is None:
            disk = base(disk_id, disk_name, T_DISK, location, body)
            disk["properties"] = {
                "diskSizeGB": os_disk.get("diskSizeGB", 30),
                "osType": "Linux",
                "diskState": "Attached",
            }
            disk["managedBy"] = vm_id
            children.append(disk)
        cascade[disk_id.lower()] = os_disk.get("deleteOption", "Detach")
        out["provisioningState"] = "Creating"
        res["properties"] = out
        res["_cascade"] = cascade
        if existing is not None and existing.get("_eviction"):
            res["_eviction"] = existing["_eviction"]
        elif existing is None and props.get("priority") == "Spot":
            evict = self.faults.take_eviction(name)
            if evict is not None:  # the VM's host process carries it out, in wall seconds
                speed = float(getattr(self.clock, "speed", 1.0))
                after = evict.after if evict.after is not None else DEFAULT_EVICT_AFTER_S
                res["_eviction"] = {"after_s": after / speed, "notice_s": EVICTION_NOTICE_S / speed}
        seconds = self.profile.create_seconds(T_VM) if existing is None else 2.0 * self.profile.scale
        return Written(res, children, seconds)

    @staticmethod
    def _identity(res: dict[str, Any], body: dict[str, Any], existing: dict[str, Any] | None) -> None:
        """identity {type: SystemAssigned}: Azure makes a service principal for the VM and returns its
        principalId and tenantId (kept across updates). The key the VM's metadata service signs its
        tokens with is the emulator's own (never returned)."""
        kind = str((body.get("identity") or {}).get("type") or "None")
        if kind.lower() == "none":
            return
        if "systemassigned" not in kind.replace(" ", "").lower().split(","):
            raise v.invalid(f"The identity type '{kind}' is not supported by the emulator.", "InvalidParameter")
        old = (existing or {}).get("identity") or {}
        res["identity"] = {
            "type": "SystemAssigned",
            "principalId": old.get("principalId") or str(uuid.uuid4()),
            "tenantId": EMULATOR_TENANT,
        }
        res["_identityKey"] = (existing or {}).get("_identityKey") or secrets.token_hex(16)


def evict(store: Store, vm_id: str) -> str | None:
    """Apply a spot VM's eviction to the store, as Azure does (None: no such VM). Delete: the VM and
    its OS disk go; its NIC and public IP stay, detached (a user's cleanup, or the group's delete,
    removes them). Deallocate: the VM stays, deallocated (instance view PowerState/deallocated), its
    disk with it. Whoever holds the store's lock calls this; the VM's host process ends its processes."""
    vm = store.resources.get(vm_id.lower())
    if vm is None or vm["type"] != T_VM:
        return None
    policy = str(vm["properties"].get("evictionPolicy") or "Delete")
    vm.pop("_eviction", None)
    if policy == "Deallocate":
        vm["_power"] = "deallocated"
        return policy
    store.resources.pop(vm_id.lower())
    for child in vm.get("_cascade", {}):
        res = store.resources.get(child)
        if res is None:
            continue
        if res["type"] == T_DISK:
            store.resources.pop(child)
        elif res["type"] in {T_NIC, T_PIP}:
            res["properties"].pop("virtualMachine", None)
    return policy


def _check_os_disk(storage: dict[str, Any]) -> None:
    """An explicit OS disk smaller than the image's is refused (409), as Compute refuses it."""
    requested = storage["osDisk"].get("diskSizeGB")
    ref = storage["imageReference"]
    try:
        image = catalog.resolve_image(f"{ref['publisher']}:{ref['offer']}:{ref['sku']}:{ref['version']}", gpu=False)
    except ValueError:
        return
    if requested is None or image.os_disk_gb is None or requested >= image.os_disk_gb:
        return
    raise ArmFault(
        409,
        "OperationNotAllowed",
        f"The specified disk size {requested} GB is smaller than the size of the corresponding disk in the VM "
        f"image: {image.os_disk_gb} GB. This is not allowed. Please choose equal or greater size or do not "
        "specify an explicit size.",
        target="osDisk.diskSizeGB",
    )


def _strip_secrets(os_profile: Any) -> Any:
    """ARM never returns adminPassword or customData on GET; neither does the emulator."""
    if not isinstance(os_profile, dict):
        return os_profile
    return {k: val for k, val in os_profile.items() if k not in {"adminPassword", "customData"}}
