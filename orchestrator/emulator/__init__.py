"""A local Azure Resource Manager the real SDK can talk to (see arm.py)."""

from orchestrator.emulator.arm import Emulator, EmuResponse, LoggedRequest, Store
from orchestrator.emulator.faults import Fault, FaultInjector
from orchestrator.emulator.latency import LatencyProfile, get_profile

__all__ = [
    "EmuResponse",
    "Emulator",
    "Fault",
    "FaultInjector",
    "LatencyProfile",
    "LoggedRequest",
    "Store",
    "get_profile",
]
