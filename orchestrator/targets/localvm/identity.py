"""A local VM's managed identity and the ARM endpoint it can reach, both served by its host process.

On Azure the VM-side autostop agent (remote/autostop.py) gets a token from the metadata service's
identity endpoint and POSTs the deallocation to https://management.azure.com. Here the VM host
serves both on the VM's own loopback address:

    GET  $ORCH_IMDS_ENDPOINT/metadata/identity/oauth2/token?api-version=2018-02-01&resource=...
         (header Metadata: true) -> {"access_token", "expires_on", "resource", "token_type", ...}
    ANY  $ORCH_ARM_ENDPOINT/subscriptions/...  -> the emulator, over the shared store file

The token is the emulator's for the VM's system-assigned identity (emulator/authorization.py): ARM
allows it exactly what the identity's role assignments grant, so a VM can deallocate itself but
nothing in another group. A VM without an identity gets IMDS's 400 "Identity not found".
"""

from __future__ import annotations

import asyncio
import os
import threading
import time
from pathlib import Path
from typing import Any
from urllib.parse import urlencode

from orchestrator.targets.localvm.imds import ImdsRequest, ImdsResponse, read_request, write_response

TOKEN_PATH = "/metadata/identity/oauth2/token"
ARM_ENV_VAR = "ORCH_ARM_ENDPOINT"
TOKEN_LIFETIME_S = 24 * 3600


class VmArm:
    """The emulator as this VM sees it: the shared store, made on first use (loading the specs
    takes a moment; most VMs never ask)."""

    def __init__(self, store: Path, vm_id: str) -> None:
        self.store = store
        self.vm_id = vm_id
        self._emulator: Any = None
        self._lock = threading.Lock()

    def emulator(self) -> Any:
        from orchestrator.clock import ScaledClock, SystemClock
        from orchestrator.emulator import Emulator
        from orchestrator.emulator.persist import StoreFile

        with self._lock:
            if self._emulator is None:
                speed = float(os.environ.get("ORCH_EMULATOR_SPEED", "1"))
                self._emulator = Emulator(
                    os.environ.get("ORCH_EMULATOR_PROFILE", "instant"),
                    clock=SystemClock() if speed == 1 else ScaledClock(speed),
                    backing=StoreFile(self.store),
                )
            return self._emulator

    def token_response(self, request: ImdsRequest) -> ImdsResponse:
        resource = request.query.get("resource", "")
        if not resource:
            return _invalid("Required query variable 'resource' is missing")
        if resource.rstrip("/") not in {"https://management.azure.com", "https://management.core.windows.net"}:
            return _invalid(f"Invalid resource {resource}")
        found = self.emulator().identity_token(self.vm_id)
        if found is None:
            return _invalid("Identity not found")
        token, principal = found
        now = int(time.time())
        return ImdsResponse(
            200,
            {
                "access_token": token,
                "client_id": principal,
                "expires_in": str(TOKEN_LIFETIME_S),
                "expires_on": str(now + TOKEN_LIFETIME_S),
                "ext_expires_in": str(TOKEN_LIFETIME_S),
                "not_before": str(now),
                "resource": resource,
                "token_type": "Bearer",
            },
        )

    async def token(self, request: ImdsRequest) -> ImdsResponse:
        return await asyncio.to_thread(self.token_response, request)

    # ------------------------------------------------------------------ the ARM endpoint

    async def serve(self, address: str) -> tuple[asyncio.Server, int]:
        server = await asyncio.start_server(self._connection, address, 0)
        return server, int(server.sockets[0].getsockname()[1])

    async def _connection(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        status, headers, body = 400, {"Content-Type": "application/json"}, b'{"error": {"code": "BadRequest"}}'
        try:
            request = await asyncio.wait_for(read_request(reader), timeout=10)
            if request is not None and request.path.startswith("/subscriptions/"):
                query = f"?{urlencode(request.query)}" if request.query else ""
                url = "https://management.azure.com" + request.path + query
                handle = self.emulator().handle
                response = await asyncio.to_thread(handle, request.method, url, request.headers, request.body or None)
                status, headers, body = response.status, dict(response.headers), response.body
        except (TimeoutError, ConnectionError, asyncio.IncompleteReadError, ValueError):
            pass
        await write_response(writer, status, headers, body)


def install(imds: Any, arm: VmArm) -> None:
    """Register the identity endpoint on the VM's metadata service (imds.Imds.add_route)."""
    imds.add_route(TOKEN_PATH, arm.token, methods=("GET",))


def _invalid(description: str) -> ImdsResponse:
    return ImdsResponse(400, {"error": "invalid_request", "error_description": description})


def arm_env(address: str, port: int) -> dict[str, str]:
    return {ARM_ENV_VAR: f"http://{address}:{port}"}
