"""A stateful Azure Resource Manager: the resource groups, network and compute APIs this tool uses.

The real SDK talks to it through `transport.EmulatorTransport`. It speaks ARM's wire protocol:
PUT answers 201/200 with provisioningState Creating/Updating and an Azure-AsyncOperation header,
the operation's status moves InProgress -> Succeeded/Failed as the clock passes its end time,
resource-group DELETE is 202 + Location polled until 200, errors carry ARM's {"error": {...}} body,
429 carries Retry-After, every response carries request ids.

Time is lazy: nothing runs in the background. Each request first settles every operation whose end
time has passed on the clock, so a VirtualClock can jump hours without a thread. All state lives in
`self.store` (plain JSON-able dicts) so a daemon can persist and share it.

Where things are: core.py (entry point, routing, operations), typed.py (typed resources), one module
per resource provider (resources.py, network.py, compute.py, devtestlab.py), store.py (the data).
"""

from __future__ import annotations

import threading
from collections.abc import Callable
from typing import Any

from orchestrator.clock import Clock, VirtualClock
from orchestrator.emulator import openapi
from orchestrator.emulator.authorization import AuthorizationRP
from orchestrator.emulator.compute import ComputeRP, VmEvent
from orchestrator.emulator.devtestlab import DevTestLabRP
from orchestrator.emulator.faults import FaultInjector
from orchestrator.emulator.latency import LatencyProfile, get_profile
from orchestrator.emulator.resources import ResourcesRP
from orchestrator.emulator.store import (
    HOST,
    T_NIC,
    T_NSG,
    T_PIP,
    T_SCHEDULE,
    T_VM,
    T_VNET,
    EmuResponse,
    LoggedRequest,
    Store,
)
from orchestrator.emulator.subscription import SubscriptionRP
from orchestrator.emulator.typed import Writer

DEFAULT_QUOTA_VCPUS = 96  # per family and region; real new subscriptions often have 0 for GPUs

__all__ = ["DEFAULT_QUOTA_VCPUS", "HOST", "EmuResponse", "Emulator", "LoggedRequest", "Store", "VmEvent"]


class Emulator(ResourcesRP, ComputeRP, DevTestLabRP, SubscriptionRP, AuthorizationRP):
    """Thread-safe: the SDK's pollers call in from several threads at once.

    `subscription` names the subscription profile (subscription.PROFILES): "ready" (the default) or
    "new-subscription" (0 GPU quota, Compute/Network/DevTestLab unregistered). A store that already
    holds that profile (a daemon's shared file) keeps its state."""

    def __init__(
        self,
        profile: str | LatencyProfile = "instant",
        *,
        clock: Clock | None = None,
        faults: FaultInjector | None = None,
        store: Store | None = None,
        quota_vcpus: int = DEFAULT_QUOTA_VCPUS,
        accept_token: Callable[[str], bool] | None = None,
        backing: Any = None,
        subscription: str | None = None,
    ) -> None:
        self.profile = get_profile(profile) if isinstance(profile, str) else profile
        self.clock = clock or VirtualClock()
        self.faults = faults or FaultInjector()
        self.store = store or Store()
        self.default_quota = quota_vcpus
        self.accept_token = accept_token
        self.backing = backing  # a persist.StoreFile shared with other processes, or None
        self.log = []
        self._vm_listeners = []  # see add_vm_listener
        self._vm_events = []  # told to the listeners once the store's lock is let go
        self._depth = 0  # nesting of _locked in this thread
        self._lock = threading.RLock()
        openapi.SPECS.operations()  # load and compile the specs now, not inside the first request
        self.validated_bodies = 0
        self.validated_requests = 0
        self.unvalidated_requests = []
        self.read_only_sent = []
        with self._locked():
            fresh = not self.store.providers
            wanted = subscription or ("ready" if fresh else self.store.profile)
        if fresh or wanted != self.store.profile:
            self.use_subscription_profile(wanted)

    def _writers(self) -> dict[str, Writer]:
        return {
            T_VNET: self._put_vnet,
            T_NSG: self._put_nsg,
            T_PIP: self._put_pip,
            T_NIC: self._put_nic,
            T_VM: self._put_vm,
            T_SCHEDULE: self._put_schedule,
        }
