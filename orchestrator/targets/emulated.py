"""An AzureSession whose SDK clients talk to the built-in emulator (dry-run and local targets only)."""

from __future__ import annotations

from typing import TYPE_CHECKING

from orchestrator.azure.session import AzureSession

if TYPE_CHECKING:
    from orchestrator.emulator import Emulator


def emulator_session(emulator: Emulator, subscription: str, poll_scale: float = 1.0) -> AzureSession:
    from orchestrator.emulator.transport import EmulatorCredential, EmulatorTransport

    return AzureSession(
        subscription_id=subscription,
        credential=EmulatorCredential(),
        clock=emulator.clock,
        transport=EmulatorTransport(emulator),
        poll_scale=poll_scale,
    )
