"""A local Azure Resource Manager the real SDK can talk to (see arm.py).

The names below load on first use: a local VM's host process imports emulator.cloudinit alone,
without the whole ARM (its providers and specs) on its way to answering SSH.
"""

from __future__ import annotations

from importlib import import_module
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    from orchestrator.emulator.arm import Emulator
    from orchestrator.emulator.compute import VmEvent
    from orchestrator.emulator.faults import Fault, FaultInjector
    from orchestrator.emulator.latency import LatencyProfile, get_profile
    from orchestrator.emulator.store import EmuResponse, LoggedRequest, Store

_WHERE = {
    "EmuResponse": "store",
    "Emulator": "arm",
    "Fault": "faults",
    "FaultInjector": "faults",
    "LatencyProfile": "latency",
    "LoggedRequest": "store",
    "Store": "store",
    "VmEvent": "compute",
    "get_profile": "latency",
}

__all__ = [
    "EmuResponse",
    "Emulator",
    "Fault",
    "FaultInjector",
    "LatencyProfile",
    "LoggedRequest",
    "Store",
    "VmEvent",
    "get_profile",
]


def __getattr__(name: str) -> Any:
    if name not in _WHERE:
        raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
    return getattr(import_module(f"{__name__}.{_WHERE[name]}"), name)
