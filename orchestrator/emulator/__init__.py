"""A local Azure Resource Manager the real SDK can talk to (see arm.py)."""

from orchestrator.emulator.arm import Emulator
from orchestrator.emulator.compute import VmEvent
from orchestrator.emulator.faults import Fault, FaultInjector
from orchestrator.emulator.latency import LatencyProfile, get_profile
from orchestrator.emulator.store import EmuResponse, LoggedRequest, Store

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
