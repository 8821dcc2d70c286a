"""Execute a ResourcePlan: each resource starts the moment its dependencies are done.

The group is created first (a synchronous ARM call); every other resource runs in its own thread
and waits only on the futures of what it depends on, so the VNet and NSG go side by side and all
VMs start together. When anything fails, the group is deleted at once (forcing VM deletion) without
waiting for in-flight siblings: a failed run must not keep paying for a GPU while it waits.

With several candidates (`provision_candidates`), a candidate Azure refuses for quota, SKU
availability or capacity is cleaned away (its VMs, and its network when the next candidate is in
another region; the group stays) and the next one is tried; every attempt is reported.
"""

from __future__ import annotations

import threading
from collections.abc import Callable, Sequence
from concurrent.futures import Future, ThreadPoolExecutor
from dataclasses import dataclass, field
from typing import Any

from orchestrator.azure.errors import CapacityError, QuotaExceededError, SkuNotAvailableError, classify
from orchestrator.azure.session import AzureSession
from orchestrator.azure.teardown import delete_group
from orchestrator.candidates import Candidate
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
    candidate: Candidate | None = None  # where the nodes are: the candidate that provisioned
    attempts: list[Attempt] = field(default_factory=list)  # every candidate tried, in order


@dataclass(frozen=True)
class Attempt:
    """One candidate tried: what Azure answered (code "" when it provisioned) and how long it took,
    the deletion of what it made included (Azure seconds)."""

    n: int  # 1-based, in the order tried
    candidate: Candidate
    code: str  # ARM's error code; "" when it provisioned
    message: str  # the classified error's first line; "" when it provisioned
    seconds: float

    @property
    def ok(self) -> bool:
        return not self.code

    def line(self) -> str:
        """`2. Standard_NC4as_T4_v3 in eastus zone 1: AllocationFailed after 131.0 s`."""
        what = "provisioned" if self.ok else self.code
        return f"{self.n}. {self.candidate.label()}: {what} after {self.seconds:.1f} s"

    def to_json(self) -> dict[str, Any]:
        return {
            "n": self.n,
            **self.candidate.to_json(),
            "code": self.code or None,
            "message": self.message or None,
            "seconds": round(self.seconds, 2),
        }


class CandidatesExhausted(CloudError):
    """Azure refused every candidate (quota, SKU availability or capacity, each)."""

    def __init__(self, attempts: list[Attempt]) -> None:
        lines = [f"Azure refused every candidate ({len(attempts)} tried):", *(f"  {a.line()}" for a in attempts)]
        lines.append(
            "Try again later, or allow more places: more regions (`region: [..]` or `any`), zones (`zone: any`), "
            "sizes (`vm_size: [..]` or `accelerators`), or spot (`spot: prefer`)."
        )
        super().__init__("\n".join(lines), code=attempts[-1].code if attempts else "", resource="")
        self.attempts = attempts


# Errors that say "not here, not now" about one candidate: the next one may well succeed. Quota
# (409 OperationNotAllowed), SkuNotAvailable (409), and the capacity codes, which arrive late as a
# failed operation (AllocationFailed, ZonalAllocationFailed, OverconstrainedAllocationRequest, ...).
FAILOVER_ERRORS: tuple[type[CloudError], ...] = (QuotaExceededError, SkuNotAvailableError, CapacityError)


class ProvisionFailed(CloudError):
    """The typed cloud error, and what became of the resources created before it."""

    def __init__(
        self,
        cause: CloudError,
        run_id: str,
        cleanup: str,
        cleanup_error: str = "",
        attempts: list[Attempt] | None = None,
    ) -> None:
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
        self.attempts = list(attempts or [])

    @property
    def cleaned(self) -> bool:
        return self.cleanup != "failed"


EventSink = Callable[[ResourceEvent], None]
AttemptSink = Callable[[Attempt], None]
PlanFor = Callable[[Candidate, "str | None"], ResourcePlan]


@dataclass
class _Outcome:
    """How one plan's execution ended."""

    error: CloudError | None = None
    raw: BaseException | None = None
    resource: PlannedResource | None = None
    timings: dict[str, tuple[float, float]] = field(default_factory=dict)


class Provisioner:
    def __init__(
        self, session: AzureSession, on_event: EventSink | None = None, on_attempt: AttemptSink | None = None
    ) -> None:
        self.session = session
        self.on_event = on_event or (lambda e: None)
        self.on_attempt = on_attempt or (lambda a: None)
        self._cancel = threading.Event()
        self._vms: dict[str, Any] = {}  # VM id -> the VM as its create LRO returned it
        self._pool: ThreadPoolExecutor | None = None  # the last plan's, drained before its VMs are reused

    def provision(self, plan: ResourcePlan) -> ProvisionResult:
        """One plan, one candidate: on any failure everything is deleted."""
        candidate = plan.candidate or Candidate("", plan.region, None, False)
        return self.provision_candidates([candidate], lambda _c, _loc: plan)

    def provision_candidates(self, candidates: Sequence[Candidate], plan_for: PlanFor) -> ProvisionResult:
        """Try each candidate in turn until one provisions; `plan_for(candidate, group_location)`
        makes its plan (every node in that candidate's region and zone).

        A candidate Azure refuses with a FAILOVER_ERRORS error (quota, SkuNotAvailable, no capacity,
        also when it arrives late as a failed operation) is cleaned away and the next one tried:
        its VMs (with their NICs, public IPs and disks, `deleteOption: Delete`) and auto-shutdown
        schedules are deleted, and when the next candidate is in another region its VNet and NSG
        too. The run's resource group stays: a group's location cannot change, but the resources in
        it may be in any region, and deleting a group takes minutes (forced: ~90 s) against ~30 s
        for a VM. Any other error, or the last candidate failing, deletes the group as before."""
        if not candidates:
            raise ValueError("no candidate to provision")
        clock = self.session.clock
        t0 = clock.now()
        attempts: list[Attempt] = []
        done: set[str] = set()  # ids of what exists from earlier attempts and is kept
        group_location: str | None = None
        plan: ResourcePlan | None = None
        for i, candidate in enumerate(candidates):
            plan = plan_for(candidate, group_location)
            started = clock.now()
            outcome = self._execute(plan, done, t0)
            if outcome.error is None:
                attempt = Attempt(i + 1, candidate, "", "", clock.now() - started)
                attempts.append(attempt)
                self.on_attempt(attempt)
                nodes = self._addresses(plan)
                return ProvisionResult(plan, nodes, clock.now() - t0, outcome.timings, candidate, attempts)
            cloud = outcome.error
            if outcome.resource is not None and outcome.resource.type == T_RG:
                # The group write itself failed: this call created nothing, so there is nothing to undo.
                attempts.append(self._attempt(i + 1, candidate, cloud, started))
                raise ProvisionFailed(cloud, plan.run_id, "nothing", attempts=attempts) from outcome.raw
            group_location = group_location or plan.resources[0].body["location"]
            following = candidates[i + 1] if i + 1 < len(candidates) else None
            if isinstance(cloud, FAILOVER_ERRORS) and following is not None:
                keep_network = following.region == candidate.region
                cleared, why = self._clear(plan, keep_network, t0)
                attempts.append(self._attempt(i + 1, candidate, cloud, started))
                if cleared:
                    done = {plan.resources[0].id}
                    if keep_network:
                        done |= {r.id for r in plan.resources if r.type in {T_VNET, T_NSG}}
                    continue
                cleaned, why2 = self._cleanup(plan)
                cause = CloudError(f"{cloud}\nRemoving this attempt to try the next candidate failed: {why}")
                cause.code = cloud.code
                raise ProvisionFailed(
                    cause, plan.run_id, "deleted" if cleaned else "failed", why2, attempts=attempts
                ) from outcome.raw
            cleaned, why = self._cleanup(plan)
            attempts.append(self._attempt(i + 1, candidate, cloud, started))
            if isinstance(cloud, FAILOVER_ERRORS) and len(attempts) > 1:
                cloud = CandidatesExhausted(attempts)
            raise ProvisionFailed(
                cloud, plan.run_id, "deleted" if cleaned else "failed", why, attempts=attempts
            ) from outcome.raw
        raise AssertionError("unreachable")  # the loop returns or raises

    def _attempt(self, n: int, candidate: Candidate, cloud: CloudError, started: float) -> Attempt:
        first = str(cloud).split("\n", 1)[0]
        attempt = Attempt(n, candidate, cloud.code or type(cloud).__name__, first, self.session.clock.now() - started)
        self.on_attempt(attempt)
        return attempt

    def _execute(self, plan: ResourcePlan, done: set[str], t0: float) -> _Outcome:
        """Create the plan's resources (those in `done` exist already); the first error, classified."""
        clock = self.session.clock
        timings: dict[str, tuple[float, float]] = {}
        self._cancel.clear()
        self._vms.clear()

        def run_one(r: PlannedResource, deps: list[Future[None]]) -> None:
            for d in deps:
                if d.exception() is not None:  # waits; a failed dependency means this never starts
                    raise _Cancelled()
            if r.id in done:
                return
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
                done_f = next(iter(_wait_first(list(pending))))
                rid = pending.pop(done_f)
                exc = done_f.exception()
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
        self._pool = pool
        if first_error is None:
            return _Outcome(timings=timings)
        cloud = first_error if isinstance(first_error, CloudError) else None
        if cloud is None:
            cloud = _classify(first_error, first_resource, plan.region)
        return _Outcome(cloud, first_error, first_resource, timings)

    def _clear(self, plan: ResourcePlan, keep_network: bool, t0: float) -> tuple[bool, str]:
        """Delete what this attempt made, keeping the group (and the VNet and NSG with keep_network):
        the VMs (NIC, public IP and disk go with them) and schedules at once, then, once the NICs are
        gone, the network. Waits for it all: the next attempt reuses the names. (ok, error)."""
        rg, clock = plan.resource_group, self.session.clock
        vms = [r for r in plan.resources if r.type in {T_VM, T_SCHEDULE}]
        network = [] if keep_network else [r for r in plan.resources if r.type in {T_VNET, T_NSG}]
        try:
            pollers = [self._delete(r, rg) for r in vms]  # sent before waiting on siblings still creating
            if self._pool is not None:
                self._pool.shutdown(wait=True)
            for p in pollers:
                p.result()
            for r in network:
                self._delete(r, rg).result()
        except Exception as e:  # the caller falls back to deleting the group
            return False, str(classify(e, resource=f"deleting {plan.run_id}'s failed attempt"))
        for r in [*vms, *network]:
            self.on_event(ResourceEvent(r, "deleted", clock.now() - t0))
        return True, ""

    def _delete(self, r: PlannedResource, rg: str) -> Any:
        s = self.session
        if r.type == T_VM:
            return s.compute.virtual_machines.begin_delete(rg, r.name, polling=s.polling(r.type))
        if r.type == T_VNET:
            return s.network.virtual_networks.begin_delete(rg, r.name, polling=s.polling(r.type))
        if r.type == T_NSG:
            return s.network.network_security_groups.begin_delete(rg, r.name, polling=s.polling(r.type))
        return s.resources.resources.begin_delete_by_id(
            r.id, api_version=SCHEDULE_API_VERSION, polling=s.polling(r.type)
        )

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
