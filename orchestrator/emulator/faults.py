"""Fault injection: make the emulator refuse or fail requests the way Azure does.

A fault matches by method, resource type and phase ("sync": the request itself is answered with an
error; "lro": the request is accepted and the long-running operation later ends Failed, as
AllocationFailed really arrives). It fires `count` times (None: forever) with `probability`.
"""

from __future__ import annotations

import random
import threading
from dataclasses import dataclass, field
from typing import Literal

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
    phase: Literal["sync", "lro"] = "sync"
    count: int | None = 1
    probability: float = 1.0
    retry_after: float | None = None
    fired: int = field(default=0, init=False)

    def matches(self, method: str, resource_type: str | None, phase: str) -> bool:
        if self.count is not None and self.fired >= self.count:
            return False
        if self.phase != phase:
            return False
        if self.method and self.method.upper() != method.upper():
            return False
        return not self.resource_type or (resource_type or "").lower() == self.resource_type.lower()


class FaultInjector:
    def __init__(self, faults: list[Fault] | None = None, seed: int = 0) -> None:
        self.faults = list(faults or [])
        self._rng = random.Random(seed)
        self._lock = threading.Lock()

    def add(self, fault: Fault) -> Fault:
        with self._lock:
            self.faults.append(fault)
        return fault

    def clear(self) -> None:
        with self._lock:
            self.faults.clear()

    def take(self, method: str, resource_type: str | None, phase: str) -> Fault | None:
        with self._lock:
            for f in self.faults:
                if f.matches(method, resource_type, phase) and self._rng.random() < f.probability:
                    f.fired += 1
                    return f
        return None
