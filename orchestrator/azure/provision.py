"""Execute a ResourcePlan: each resource starts the moment its dependencies are done.

The group is created first (a synchronous ARM call); every other resource runs in its own thread
and waits only on the futures of what it depends on, so the VNet and NSG go side by side and all
VMs start together. When anything fails, the group is deleted at once (forcing VM deletion) without
waiting for in-flight siblings: a failed run must not keep paying for a GPU while it waits.
"""

from __future__ import annotations

import threading
from collections.abc import Callable
from concurrent.futures import Future, ThreadPoolExecutor
from dataclasses import dataclass, field
from typing import Any

from orchestrator.azure.errors import classify
from orchestrator.azure.session import AzureSession
from orchestrator.azure.teardown import delete_group
from orchestrator.errors import CloudError
from orchestrator.plan import (
    SCHEDULE_API_VERSION,
    T_NSG,
    T_RG,
    T_SCHEDULE,
    T_VM,
    T_VNET,
    NodePlan,
    PlannedResource,
    ResourcePlan,
)


@dataclass(frozen=True)
class ResourceEvent:
    resource: PlannedResource
    status: str  # "creating", "created", "failed", "skipped"
    elapsed: float  # Azure seconds since provisioning started
    error: str = ""


@dataclass(frozen=True)
class NodeAddress:
    rank: int
    vm_name: str
    public_ip: str
    private_ip: str


@dataclass
class ProvisionResult:
    plan: ResourcePlan
    nodes: list[NodeAddress]
    seconds: float
    timings: dict[str, tuple[float, float]] = field(default_factory=dict)  # id -> (start, end)


class ProvisionFailed(CloudError):
    """The typed cloud error, and what became of the resources created before it."""

    def __init__(self, cause: CloudError, run_id: str, cleanup: str, cleanup_error: str = "") -> None:
        message = str(cause)
        if cleanup == "deleted":
            message += "\nEverything created for this run has been deleted."
        elif cleanup == "nothing":
            message += "\nNothing was created."
        else:
            message += (
                f"\nDeleting what was created failed too ({cleanup_error}); run `orchestrator down {run_id}` "
                "(or `orchestrator gc`) to remove it."
            )
        super().__init__(message, code=cause.code, resource=cause.resource)
        self.cause = cause
        self.cleanup = cleanup

    @property
    def cleaned(self) -> bool:
        return self.cleanup != "failed"


EventSink = Callable[[ResourceEvent], None]


class Provisioner:
    def __init__(self, session: AzureSession, on_event: EventSink | None = None) -> None:
        self.session = session
        self.on_event = on_event or (lambda e: None)
        self._cancel = threading.Event()
        self._vms: dict[str, Any] = {}  # VM id -> the VM as its create LRO returned it

    def provision(self, plan: ResourcePlan) -> ProvisionResult:
        clock = self.session.clock
        t0 = clock.now()
        timings: dict[str, tuple[float, float]] = {}
        self._cancel.clear()
        self._vms.clear()

        def run_one(r: PlannedResource, deps: list[Future[None]]) -> None:
            for d in deps:
                if d.exception() is not None:  # waits; a failed dependency means this never starts
                    raise _Cancelled()
            if self._cancel.is_set():
                self.on_event(ResourceEvent(r, "skipped", clock.now() - t0))
                raise _Cancelled()
            start = clock.now()
            self.on_event(ResourceEvent(r, "creating", start - t0))
            try:
                self._create(plan, r)
            except BaseException as e:
                if not self._cancel.is_set():
                    self.on_event(ResourceEvent(r, "failed", clock.now() - t0, str(e)))
                raise
            end = clock.now()
            timings[r.id] = (start - t0, end - t0)
            self.on_event(ResourceEvent(r, "created", end - t0))

        first_error: BaseException | None = None
        first_resource: PlannedResource | None = None
        pool = ThreadPoolExecutor(max_workers=max(1, len(plan.resources)), thread_name_prefix="provision")
        try:
            futures: dict[str, Future[None]] = {}
            for r in plan.resources:  # in dependency order, so every dependency already has a future
                futures[r.id] = pool.submit(run_one, r, [futures[d] for d in r.depends_on])
            order = list(futures.items())
            pending = {f: rid for rid, f in order}
            while pending and first_error is None:
                done = next(iter(_wait_first(list(pending))))
                rid = pending.pop(done)
                exc = done.exception()
                if exc is not None and not isinstance(exc, _Cancelled):
                    first_error, first_resource = exc, plan.by_id(rid)
                    self._cancel.set()
        except BaseException:
            # Ctrl-C or SIGTERM in the main thread: stop starting resources and hand over at once;
            # the caller (lifecycle) deletes the group, shielded from a second interrupt.
            self._cancel.set()
            pool.shutdown(wait=False, cancel_futures=True)
            raise
        finally:
            pool.shutdown(wait=first_error is None, cancel_futures=True)

        if first_error is not None:
            cloud = first_error if isinstance(first_error, CloudError) else None
            if cloud is None:
                cloud = _classify(first_error, first_resource, plan.region)
            if first_resource is not None and first_resource.type == T_RG:
                # The group write itself failed: this call created nothing, so there is nothing to undo.
                raise ProvisionFailed(cloud, plan.run_id, "nothing") from first_error
            cleaned, why = self._cleanup(plan)
            raise ProvisionFailed(cloud, plan.run_id, "deleted" if cleaned else "failed", why) from first_error

        nodes = self._addresses(plan)
        return ProvisionResult(plan, nodes, clock.now() - t0, timings)

    def _cleanup(self, plan: ResourcePlan) -> tuple[bool, str]:
        try:
            delete_group(self.session, plan.resource_group, wait=True)
            return True, ""
        except Exception as e:  # reported to the user with what to run next
            return False, str(e)

    def _create(self, plan: ResourcePlan, r: PlannedResource) -> None:
        s, rg = self.session, plan.resource_group
        if r.type == T_RG:
            s.resources.resource_groups.create_or_update(r.name, r.body)
        elif r.type == T_VNET:
            s.network.virtual_networks.begin_create_or_update(rg, r.name, r.body, polling=s.polling(r.type)).result()
        elif r.type == T_NSG:
            s.network.network_security_groups.begin_create_or_update(
                rg, r.name, r.body, polling=s.polling(r.type)
            ).result()
        elif r.type == T_VM:
            poller = s.compute.virtual_machines.begin_create_or_update(rg, r.name, r.body, polling=s.polling(r.type))
            self._vms[r.id] = poller.result()  # carries networkProfile.networkInterfaces: no GET needed
        elif r.type == T_SCHEDULE:
            s.resources.resources.begin_create_or_update_by_id(
                r.id, r.body, api_version=SCHEDULE_API_VERSION, polling=s.polling(r.type)
            ).result()
        else:
            raise ValueError(f"the provisioner cannot create {r.type}")

    def _addresses(self, plan: ResourcePlan) -> list[NodeAddress]:
        """Each node's addresses the way Azure documents them: the VM's
        networkProfile.networkInterfaces[].id -> GET the NIC -> its ipConfigurations' privateIPAddress
        and publicIPAddress.id -> GET the public IP; primary NIC and IP configuration first. Two GETs
        per node (the VM comes from its create LRO), the nodes side by side."""
        if not plan.nodes:
            return []
        with ThreadPoolExecutor(max_workers=min(len(plan.nodes), 16), thread_name_prefix="addresses") as pool:
            return list(pool.map(lambda node: self._node_address(plan, node), plan.nodes))

    def _node_address(self, plan: ResourcePlan, node: NodePlan) -> NodeAddress:
        s = self.session
        vm_id = next(r.id for r in plan.resources if r.type == T_VM and r.name == node.vm_name)
        what = f"reading the addresses of {node.vm_name}"
        try:
            vm = self._vms.get(vm_id)
            if not _get(vm, "properties", "networkProfile", "networkInterfaces") and not _get(
                vm, "network_profile", "network_interfaces"
            ):
                vm = s.compute.virtual_machines.get(plan.resource_group, node.vm_name)
            nic_refs = _get(vm, "properties", "networkProfile", "networkInterfaces")
            nic_refs = nic_refs or _get(vm, "network_profile", "network_interfaces") or []
            public = private = ""
            for ref in _primary_first(nic_refs):
                rg, name = _group_and_name(str(_get(ref, "id")))
                nic = s.network.network_interfaces.get(rg, name)
                configs = _get(nic, "properties", "ipConfigurations") or _get(nic, "ip_configurations") or []
                for ipc in _primary_first(configs):
                    private = private or str(_prop(ipc, "privateIPAddress", "private_ip_address") or "")
                    pip_ref = _prop(ipc, "publicIPAddress", "public_ip_address")
                    pip_id = _get(pip_ref, "id")
                    if not public and pip_id:
                        prg, pname = _group_and_name(str(pip_id))
                        pip = s.network.public_ip_addresses.get(prg, pname)
                        public = str(_prop(pip, "ipAddress", "ip_address") or "")
                if public and private:
                    break
        except Exception as e:
            raise classify(e, resource=what) from e
        return NodeAddress(node.rank, node.vm_name, public, private)


def _classify(exc: BaseException, r: PlannedResource | None, region: str) -> CloudError:
    size = r.body["properties"]["hardwareProfile"]["vmSize"] if r is not None and r.type == T_VM else ""
    return classify(exc, resource=f"creating {r.short_type} {r.name}" if r else "", size=size, region=region)


class _Cancelled(Exception):
    pass


def _prop(obj: Any, wire: str, attr: str) -> Any:
    """A sub-resource's property: under `properties` on the wire (new-style models), or an attribute."""
    value = _get(obj, "properties", wire)
    return value if value is not None else _get(obj, attr)


def _primary_first(items: list[Any]) -> list[Any]:
    """NIC references or IP configurations, primary first (explicitly primary, then unmarked, then not)."""

    def rank(item: Any) -> int:
        primary = _prop(item, "primary", "primary")
        return 0 if primary is True else (2 if primary is False else 1)

    return sorted(items, key=rank)


def _group_and_name(resource_id: str) -> tuple[str, str]:
    """The resource group and name of a resource id: /subscriptions/s/resourceGroups/{rg}/providers/.../{name}."""
    parts = resource_id.strip("/").split("/")
    lowered = [p.lower() for p in parts]
    if "resourcegroups" not in lowered or len(parts) < 8:
        raise ValueError(f"not a resource id: {resource_id!r}")
    return parts[lowered.index("resourcegroups") + 1], parts[-1]


def _get(obj: Any, *path: str) -> Any:
    """Read a field from a new-style SDK model (a MutableMapping) or an old-style one (attributes)."""
    cur = obj
    for key in path:
        if cur is None:
            return None
        try:
            cur = cur[key]
        except (KeyError, TypeError, IndexError):
            cur = getattr(cur, key, None)
    return cur


def _wait_first(futures: list[Future[None]]) -> set[Future[None]]:
    from concurrent.futures import FIRST_COMPLETED, wait

    done, _ = wait(futures, return_when=FIRST_COMPLETED)
    return done
