"""Fault injection and capacity: make the emulator refuse or fail requests the way Azure does.

A fault matches by method, resource type and phase ("sync": the request itself is answered with an
error; "lro": the request is accepted and the long-running operation later ends Failed, as
AllocationFailed really arrives), and optionally by the resource's `location` and `zone` (a VM's
`zones[0]`; "" matches a zoneless request only). It fires `count` times (None: forever) with
`probability`.

Capacity: how many VMs of a size a region's zoneless pool or one of its zones can still hold
(`Emulator.set_capacity`). A VM create that finds none fails late, as Azure's do: AllocationFailed
for a zoneless request, ZonalAllocationFailed for one pinned to a zone. The zoneless pool and each
zone are separate (DESIGN: a zoneless request can fail where a pinned zone has room); zone "*" means
every one of them, size "*" every size. Like faults, capacity belongs to this emulator object (one
command, on the local target), not to the shared store; what counts against it is the VMs the store
holds.

Eviction (phase "evict"): a spot VM created while such a fault is armed is evicted `after` emulated
seconds once it runs (default 60), as Azure evicts spot VMs: its host process announces a Preempt
scheduled event EVICTION_NOTICE_S ahead on the VM's metadata endpoint, then applies the VM's
`evictionPolicy` (compute.evict). `vm` picks the VM by name, or by node index ("1": the VM whose
name ends in "-1"); left out, the next spot VM created. Each fault evicts `count` VMs (default 1),
so two faults, or one with count 2, evict a run twice (its replacement VM included).
"""

from __future__ import annotations

import random
import threading
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Literal

EVICTION_NOTICE_S = 30.0  # Azure's Preempt scheduled event comes about 30 s before the eviction
DEFAULT_EVICT_AFTER_S = 60.0

# Messages as Azure words them, so the classifier is tested on the real shapes.
DEFAULT_MESSAGES: dict[str, str] = {
    "SkuNotAvailable": (
        "The requested VM size for resource 'Following SKUs have failed for Capacity Restrictions: "
        "{size}' is currently not available in location '{location}'. Please try another size or "
        "deploy to a different location or different zone. See https://aka.ms/azureskunotavailable "
        "for details."
    ),
    "OperationNotAllowed": (
        "Operation could not be completed as it results in exceeding approved {family} Cores quota. "
        "Additional details - Deployment Model: Resource Manager, Location: {location}, Current Limit: "
        "{limit}, Current Usage: {usage}, Additional Required: {required}, (Minimum) New Limit "
        "Required: {new_limit}. Setup Alerts when Quota reaches threshold. Learn more at "
        "https://aka.ms/quotamonitoringalerting . Submit a request for Quota increase at "
        "https://aka.ms/ProdportalCRP/#blade/Microsoft_Azure_Capacity/UsageAndQuota.ReactView"
    ),
    "AllocationFailed": (
        "Allocation failed. We do not have sufficient capacity for the requested VM size in this "
        "region. Read more about improving likelihood of allocation success at "
        "http://aka.ms/allocation-guidance"
    ),
    "ZonalAllocationFailed": (
        "Allocation failed. We do not have sufficient capacity for the requested VM size in this "
        "zone. Read more about improving likelihood of allocation success at "
        "http://aka.ms/allocation-guidance"
    ),
    "OverconstrainedAllocationRequest": (
        "Allocation failed. VM(s) with the following constraints cannot be allocated, because the "
        "condition is too restrictive. Please remove some constraints and try again. Constraints "
        "applied are: - Networking Constraints (such as Accelerated Networking or IPv6) - VM Size"
    ),
    "InvalidParameter": "The value of parameter {parameter} is invalid.",
    "ResourceGroupBeingDeleted": (
        "The resource group '{group}' is in deprovisioning state and cannot perform this operation."
    ),
    "TooManyRequests": (
        "The request is being throttled as the limit has been reached for operation type - Write. "
        "For more information, see - https://aka.ms/srpthrottlinglimits"
    ),
    "Evicted": "The Spot VM has been evicted because Azure needed the capacity back.",
    "InternalServerError": "An unexpected error occured while processing the request.",
    "AuthorizationFailed": (
        "The client '{client}' does not have authorization to perform action '{action}' over scope "
        "'{scope}' or the scope is invalid."
    ),
}


@dataclass
class Fault:
    code: str
    status: int = 409
    message: str | None = None
    method: str | None = None
    resource_type: str | None = None
    phase: Literal["sync", "lro", "evict"] = "sync"
    count: int | None = 1
    probability: float = 1.0
    retry_after: float | None = None
    location: str | None = None  # only requests for resources in this region
    zone: str | None = None  # only requests pinned to this zone ("": only zoneless ones)
    after: float | None = None  # phase "evict": emulated seconds from running to the eviction
    vm: str | None = None  # phase "evict": the VM's name, or a node index ("0": the name ends in "-0")
    skip: int = 0  # let this many matching requests through first ("the replacement VM fails")
    fired: int = field(default=0, init=False)
    skipped: int = field(default=0, init=False)

    @property
    def located(self) -> bool:
        return self.location is not None or self.zone is not None

    @property
    def throttling(self) -> bool:
        """ARM's own throttling (429 for any resource type, anywhere): answered at its front door,
        before the request reaches a resource provider or any state."""
        return self.status == 429 and self.phase == "sync" and not self.resource_type and not self.located

    def matches(
        self,
        method: str,
        resource_type: str | None,
        phase: str,
        location: str | None = None,
        zone: str | None = None,
        *,
        where_known: bool = False,
    ) -> bool:
        """`where_known`: the caller knows the resource's location and zone (a located fault matches
        only such calls)."""
        if self.count is not None and self.fired >= self.count:
            return False
        if self.phase != phase:
            return False
        if self.method and self.method.upper() != method.upper():
            return False
        if self.located:
            if not where_known:
                return False
            if self.location is not None and self.location.lower() != (location or "").lower():
                return False
            if self.zone is not None and self.zone != (zone or ""):
                return False
        return not self.resource_type or (resource_type or "").lower() == self.resource_type.lower()


@dataclass(frozen=True)
class CapacityLimit:
    """At most `vms` VMs of `size` ("*": any) in `region`'s zone `zone` ("": the zoneless pool,
    "*": the zoneless pool and every zone, each)."""

    size: str
    region: str
    zone: str
    vms: int

    def covers(self, size: str, region: str, zone: str) -> bool:
        return (
            self.size in {"*", size}
            and self.region.lower() == region.lower()
            and (self.zone == "*" or self.zone == zone)
        )


class FaultInjector:
    def __init__(self, faults: list[Fault] | None = None, seed: int = 0) -> None:
        self.faults = list(faults or [])
        self.capacity: list[CapacityLimit] = []
        self._rng = random.Random(seed)
        self._lock = threading.Lock()

    def set_capacity(self, size: str, region: str, zone: str | None, vms: int) -> None:
        """Replace the limit for (size, region, zone); zone None is the zoneless pool."""
        if vms < 0:
            raise ValueError(f"capacity must be 0 or more VMs, not {vms}")
        limit = CapacityLimit(size, region, "" if zone is None else str(zone), vms)
        with self._lock:
            self.capacity = [
                c for c in self.capacity if (c.size, c.region, c.zone) != (limit.size, limit.region, limit.zone)
            ]
            self.capacity.append(limit)

    def capacity_limits(self, size: str, region: str, zone: str | None) -> list[CapacityLimit]:
        with self._lock:
            return [c for c in self.capacity if c.covers(size, region, zone or "")]

    def add(self, fault: Fault) -> Fault:
        with self._lock:
            self.faults.append(fault)
        return fault

    def take_eviction(self, vm_name: str) -> Fault | None:
        """The first armed eviction fault for this (spot) VM, counted as fired."""
        with self._lock:
            for f in self.faults:
                if f.phase != "evict" or (f.count is not None and f.fired >= f.count):
                    continue
                which = None if f.vm is None else str(f.vm)  # JSON may give the node index as a number
                if which is not None and which != vm_name and not (which.isdigit() and vm_name.endswith(f"-{which}")):
                    continue
                if self._rng.random() < f.probability:
                    f.fired += 1
                    return f
        return None

    def take_throttling(self, method: str) -> Fault | None:
        """The first throttling fault (Fault.throttling) that fires for this request, counted."""
        return self._fire(lambda f: f.throttling and f.matches(method, None, "sync"))

    def _fire(self, matches: Callable[[Fault], bool]) -> Fault | None:
        """The first fault that matches and draws its probability, past its `skip`, counted as fired."""
        with self._lock:
            for f in self.faults:
                if matches(f) and self._rng.random() < f.probability:
                    if f.skipped < f.skip:
                        f.skipped += 1
                        continue
                    f.fired += 1
                    return f
        return None

    def clear(self) -> None:
        with self._lock:
            self.faults.clear()

    def take(
        self,
        method: str,
        resource_type: str | None,
        phase: str,
        location: str | None = None,
        zone: str | None = None,
        *,
        where_known: bool = False,
        located_only: bool = False,
    ) -> Fault | None:
        """The first matching fault, counted as fired. `located_only`: consider only faults that
        match by location or zone (the late check that knows where the resource is)."""
        return self._fire(
            lambda f: (
                not f.throttling
                and (f.located or not located_only)
                and f.matches(method, resource_type, phase, location, zone, where_known=where_known)
            )
        )
