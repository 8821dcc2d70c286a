"""The local VM's metadata service (Azure's IMDS), served by the VM host process on the VM's own
loopback address.

On Azure the VM-side code asks http://169.254.169.254; that address must never be contacted here,
so the host exports `ORCH_IMDS_ENDPOINT=http://<address>:<port>` to every command it runs and the
VM-side code reads it from there (falling back to the real address only on Azure).

As Azure's does, it answers only requests that carry `Metadata: true` (400 otherwise) and an
`api-version`. Routes:

    GET       /metadata/instance          compute: name, vmId, resource group, location, zone, size,
                                          priority, evictionPolicy (from the emulator's record)
    GET/POST  /metadata/scheduledevents   DocumentIncarnation + Events (Preempt before an eviction);
                                          POST {"StartRequests": [{"EventId": ...}]} approves early

The route table is open: `Imds.add_route(path, handler)` registers another path (the managed
identity's token endpoint lives in its own module). A handler takes an `ImdsRequest` and returns an
`ImdsResponse`, or an awaitable of one.

Stdlib only (asyncio streams): HTTP/1.1, one request per connection, `Connection: close`.
"""

from __future__ import annotations

import asyncio
import contextlib
import inspect
import json
import time
import uuid
from collections.abc import Awaitable, Callable
from dataclasses import dataclass, field
from email.utils import formatdate
from typing import Any
from urllib.parse import parse_qsl, urlsplit

AZURE_IMDS = "http://169.254.169.254"
ENV_VAR = "ORCH_IMDS_ENDPOINT"
SCHEDULED_EVENTS_API = "2020-07-01"
MAX_BODY = 1 << 16


@dataclass(frozen=True)
class ImdsRequest:
    method: str
    path: str
    query: dict[str, str]
    headers: dict[str, str]  # lower-cased names
    body: bytes = b""

    def json(self) -> Any:
        return json.loads(self.body or b"null")


@dataclass(frozen=True)
class ImdsResponse:
    status: int
    body: Any  # JSON-able
    headers: dict[str, str] = field(default_factory=dict)

    def encoded(self) -> bytes:
        return json.dumps(self.body).encode()


Handler = Callable[[ImdsRequest], "ImdsResponse | Awaitable[ImdsResponse]"]
Route = dict[str, Handler]  # method -> handler


def error(status: int, message: str) -> ImdsResponse:
    """IMDS's error shape: {"error": "..."} (with error_description on the identity endpoint)."""
    return ImdsResponse(status, {"error": message})


REASONS = {200: "OK", 400: "Bad Request", 404: "Not Found", 405: "Method Not Allowed", 500: "Internal Server Error"}


# ------------------------------------------------------------------------------ scheduled events


@dataclass
class ScheduledEvent:
    event_id: str
    event_type: str  # Preempt, Reboot, Redeploy, Freeze, Terminate
    resources: list[str]
    not_before: float  # epoch seconds
    duration_s: int = -1
    source: str = "Platform"
    resource_type: str = "VirtualMachine"
    description: str = ""
    approved: bool = False

    def document(self) -> dict[str, Any]:
        return {
            "EventId": self.event_id,
            "EventType": self.event_type,
            "ResourceType": self.resource_type,
            "Resources": list(self.resources),
            "EventStatus": "Scheduled",
            "NotBefore": formatdate(self.not_before, usegmt=True),  # RFC 1123, as Azure writes it
            "Description": self.description,
            "EventSource": self.source,
            "DurationInSeconds": self.duration_s,
        }


class ScheduledEvents:
    """The VM's scheduled events document; DocumentIncarnation goes up on every change."""

    def __init__(self) -> None:
        self.incarnation = 1
        self.events: list[ScheduledEvent] = []
        self._changed = asyncio.Event()

    def schedule(self, event_type: str, resource: str, not_before: float, *, duration_s: int = -1) -> ScheduledEvent:
        event = ScheduledEvent(str(uuid.uuid4()).upper(), event_type, [resource], not_before, duration_s)
        self.events.append(event)
        self._bump()
        return event

    def approve(self, event_id: str) -> bool:
        for e in self.events:
            if e.event_id.lower() == event_id.lower():
                e.approved = True
                self._bump()
                return True
        return False

    def remove(self, event: ScheduledEvent) -> None:
        if event in self.events:
            self.events.remove(event)
            self._bump()

    def document(self) -> dict[str, Any]:
        return {"DocumentIncarnation": self.incarnation, "Events": [e.document() for e in self.events]}

    async def due(self, event: ScheduledEvent, stopping: asyncio.Event | None = None) -> None:
        """Returns at the event's NotBefore, or as soon as it is approved (StartRequests), or when
        `stopping` is set."""
        while not event.approved and time.time() < event.not_before:
            if stopping is not None and stopping.is_set():
                return
            self._changed.clear()
            with contextlib.suppress(TimeoutError):
                await asyncio.wait_for(self._changed.wait(), timeout=min(1.0, max(0.0, event.not_before - time.time())))

    def _bump(self) -> None:
        self.incarnation += 1
        self._changed.set()


# --------------------------------------------------------------------------------------- server


class Imds:
    """One VM's metadata service. `instance` returns the VM's record in the emulator's store (None:
    not known), read afresh on every request."""

    def __init__(self, instance: Callable[[], dict[str, Any] | None]) -> None:
        self.instance = instance
        self.events = ScheduledEvents()
        self.routes: dict[str, Route] = {}
        self.server: asyncio.Server | None = None
        self.add_route("/metadata/instance", self._instance, methods=("GET",))
        self.add_route("/metadata/scheduledevents", self._scheduled_events, methods=("GET", "POST"))

    def add_route(self, path: str, handler: Handler, *, methods: tuple[str, ...] = ("GET",)) -> None:
        """Serve `path` (exact, without the query) with `handler` for these methods."""
        route = self.routes.setdefault(path.rstrip("/"), {})
        for m in methods:
            route[m.upper()] = handler

    async def start(self, address: str, port: int = 0) -> int:
        self.server = await asyncio.start_server(self._connection, address, port)
        return int(self.server.sockets[0].getsockname()[1])

    def close(self) -> None:
        if self.server is not None:
            self.server.close()

    # ------------------------------------------------------------------ dispatch

    async def handle(self, request: ImdsRequest) -> ImdsResponse:
        # IMDS refuses anything that might have come through a proxy, and anything without the header.
        if "x-forwarded-for" in request.headers:
            return error(400, "Bad request. X-Forwarded-For header is not allowed.")
        if request.headers.get("metadata", "").lower() != "true":
            return error(400, "Bad request. Required metadata header not specified")
        route = self.routes.get(request.path.rstrip("/"))
        if route is None:
            return error(404, "Not found")
        handler = route.get(request.method)
        if handler is None:
            return error(405, "Method not allowed")
        if "api-version" not in request.query:
            return error(400, "Bad request. api-version was not specified in the request.")
        response = handler(request)
        if inspect.isawaitable(response):
            response = await response
        return response

    async def _connection(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        try:
            request = await asyncio.wait_for(read_request(reader), timeout=10)
            response = error(400, "Bad request.") if request is None else await self.handle(request)
        except (TimeoutError, ConnectionError, asyncio.IncompleteReadError, ValueError):
            response = error(400, "Bad request.")
        except Exception:  # a handler's bug answers 500; the VM goes on
            response = error(500, "Internal server error")
        headers = {"Content-Type": "application/json; charset=utf-8", "Server": "Microsoft-IIS/10.0"}
        await write_response(writer, response.status, {**headers, **response.headers}, response.encoded())

    # ------------------------------------------------------------------ the built-in routes

    def _instance(self, request: ImdsRequest) -> ImdsResponse:
        record = self.instance()
        if record is None:
            return error(404, "Not found")
        return ImdsResponse(200, instance_document(record))

    def _scheduled_events(self, request: ImdsRequest) -> ImdsResponse:
        if request.method == "POST":
            try:
                starts = request.json().get("StartRequests") or []
                ids = [str(s["EventId"]) for s in starts]
            except (ValueError, AttributeError, KeyError, TypeError):
                return error(400, "Bad request. The body is not a StartRequests document.")
            for event_id in ids:
                self.events.approve(event_id)
            return ImdsResponse(200, {})
        return ImdsResponse(200, self.events.document())


def instance_document(record: dict[str, Any]) -> dict[str, Any]:
    """/metadata/instance from the VM's ARM record: the compute section and the NIC addresses the
    record names (as Azure's, with names in camelCase)."""
    props = record.get("properties") or {}
    parts = str(record.get("id", "")).split("/")
    tags = record.get("tags") or {}
    compute = {
        "azEnvironment": "AzurePublicCloud",
        "location": record.get("location", ""),
        "name": record.get("name", ""),
        "osType": "Linux",
        "priority": props.get("priority", "Regular") if props.get("priority") != "Low" else "Spot",
        "evictionPolicy": props.get("evictionPolicy", "") if props.get("priority") in {"Spot", "Low"} else "",
        "resourceGroupName": parts[4] if len(parts) > 4 else "",
        "resourceId": record.get("id", ""),
        "subscriptionId": parts[2] if len(parts) > 2 else "",
        "tags": ";".join(f"{k}:{val}" for k, val in tags.items()),
        "tagsList": [{"name": k, "value": val} for k, val in tags.items()],
        "vmId": props.get("vmId", ""),
        "vmSize": (props.get("hardwareProfile") or {}).get("vmSize", ""),
        "zone": (record.get("zones") or [""])[0],
    }
    return {"compute": compute, "network": {"interface": []}}


async def read_request(reader: asyncio.StreamReader) -> ImdsRequest | None:
    """One HTTP/1.1 request off the connection (header names lower-cased); None when malformed."""
    head = await reader.readuntil(b"\r\n\r\n")
    lines = head.decode("latin-1").split("\r\n")
    try:
        method, target, _version = lines[0].split(" ", 2)
    except ValueError:
        return None
    headers: dict[str, str] = {}
    for line in lines[1:]:
        if ":" in line:
            name, value = line.split(":", 1)
            headers[name.strip().lower()] = value.strip()
    length = int(headers.get("content-length", "0") or 0)
    if length > MAX_BODY:
        return None
    body = await reader.readexactly(length) if length else b""
    url = urlsplit(target)
    return ImdsRequest(method.upper(), url.path, dict(parse_qsl(url.query)), headers, body)


async def write_response(writer: asyncio.StreamWriter, status: int, headers: dict[str, str], body: bytes) -> None:
    """The answer, then the connection closed (one request per connection)."""
    head = [
        f"HTTP/1.1 {status} {REASONS.get(status, 'Error')}",
        f"Content-Length: {len(body)}",
        "Connection: close",
        *(f"{k}: {v}" for k, v in headers.items() if k.lower() != "content-length"),
    ]
    with contextlib.suppress(ConnectionError):
        writer.write(("\r\n".join(head) + "\r\n\r\n").encode() + body)
        await writer.drain()
    writer.close()
    with contextlib.suppress(Exception):
        await writer.wait_closed()
