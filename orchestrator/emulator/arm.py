"""A stateful Azure Resource Manager: the resource groups, network and compute APIs this tool uses.

The real SDK talks to it through `transport.EmulatorTransport`. It speaks ARM's wire protocol:
PUT answers 201/200 with provisioningState Creating/Updating and an Azure-AsyncOperation header,
the operation's status moves InProgress -> Succeeded/Failed as the clock passes its end time,
resource-group DELETE is 202 + Location polled until 200, errors carry ARM's {"error": {...}} body,
429 carries Retry-After, every response carries request ids.

Time is lazy: nothing runs in the background. Each request first settles every operation whose end
time has passed on the clock, so a VirtualClock can jump hours without a thread. All state lives in
`self.store` (plain JSON-able dicts) so a daemon can persist and share it.
"""

from __future__ import annotations

import copy
import ipaddress
import json
import re
import threading
import uuid
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass, field
from datetime import UTC, datetime
from typing import Any, NamedTuple
from urllib.parse import parse_qs, urlsplit

from orchestrator import catalog
from orchestrator.clock import Clock, VirtualClock
from orchestrator.emulator import validation as v
from orchestrator.emulator.faults import DEFAULT_MESSAGES, Fault, FaultInjector
from orchestrator.emulator.latency import LatencyProfile, get_profile
from orchestrator.emulator.sshhost import CloudInitError, parse_cloud_init
from orchestrator.emulator.validation import ArmFault

HOST = "https://management.azure.com"
T_RG = "Microsoft.Resources/resourceGroups"
T_VNET = "Microsoft.Network/virtualNetworks"
T_SUBNET = "Microsoft.Network/virtualNetworks/subnets"
T_NSG = "Microsoft.Network/networkSecurityGroups"
T_PIP = "Microsoft.Network/publicIPAddresses"
T_NIC = "Microsoft.Network/networkInterfaces"
T_VM = "Microsoft.Compute/virtualMachines"
T_DISK = "Microsoft.Compute/disks"
T_SCHEDULE = "Microsoft.DevTestLab/schedules"
SUPPORTED_TYPES = {T_VNET, T_NSG, T_PIP, T_NIC, T_VM, T_DISK, T_SCHEDULE}
DEFAULT_QUOTA_VCPUS = 96  # per family and region; real new subscriptions often have 0 for GPUs

_SUB = r"/subscriptions/(?P<sub>[^/]+)"
_RG = _SUB + r"/resourcegroups/(?P<rg>[^/]+)"
_LOC = _SUB + r"/providers/(?P<ns>[^/]+)/locations/(?P<loc>[^/]+)"
_VNET = _RG + r"/providers/microsoft\.network/virtualnetworks/(?P<vnet>[^/]+)"
_ROUTES: list[tuple[str, re.Pattern[str]]] = [
    ("rg_list", re.compile(_SUB + r"/resourcegroups/?$", re.I)),
    ("rg", re.compile(_RG + r"/?$", re.I)),
    ("rg_resources", re.compile(_RG + r"/resources/?$", re.I)),
    ("subnet", re.compile(_VNET + r"/subnets/(?P<name>[^/]+)$", re.I)),
    ("typed_list", re.compile(_RG + r"/providers/(?P<ns>[^/]+)/(?P<type>[^/]+)/?$", re.I)),
    ("typed", re.compile(_RG + r"/providers/(?P<ns>[^/]+)/(?P<type>[^/]+)/(?P<name>[^/]+)$", re.I)),
    ("async_op", re.compile(_LOC + r"/operations/(?P<op>[^/]+)$", re.I)),
    ("op_result", re.compile(_LOC + r"/operationresults/(?P<op>[^/]+)$", re.I)),
    ("rg_op_result", re.compile(_SUB + r"/operationresults/(?P<op>[^/]+)$", re.I)),
]  # fmt: skip


@dataclass
class EmuResponse:
    status: int
    headers: dict[str, str]
    body: bytes = b""

    def json(self) -> Any:
        return json.loads(self.body) if self.body else None


@dataclass
class LoggedRequest:
    seq: int
    time: float
    method: str
    path: str
    api_version: str | None
    status: int
    kind: str  # create, update, read, list, delete, poll, poll-final
    resource_type: str | None
    resource_id: str | None
    request_id: str
    body: Any = None
    error_code: str | None = None
    query: dict[str, str] = field(default_factory=dict)


@dataclass
class Store:
    """Everything the emulator knows, as JSON-able dicts keyed by lower-cased resource id."""

    groups: dict[str, dict[str, Any]] = field(default_factory=dict)
    resources: dict[str, dict[str, Any]] = field(default_factory=dict)
    operations: dict[str, dict[str, Any]] = field(default_factory=dict)
    quotas: dict[str, int] = field(default_factory=dict)  # "<region>/<family>" -> vCPUs
    ip_counter: int = 0

    def to_json(self) -> str:
        return json.dumps(self.__dict__, sort_keys=True)

    @classmethod
    def from_json(cls, text: str) -> Store:
        return cls(**json.loads(text))


def _now_iso(t: float) -> str:
    return datetime.fromtimestamp(t, UTC).strftime("%Y-%m-%dT%H:%M:%S.%f0Z")


class Emulator:
    """Thread-safe: the SDK's pollers call in from several threads at once."""

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
    ) -> None:
        self.profile = get_profile(profile) if isinstance(profile, str) else profile
        self.clock: Clock = clock or VirtualClock()
        self.faults = faults or FaultInjector()
        self.store = store or Store()
        self.default_quota = quota_vcpus
        self.accept_token = accept_token
        self.log: list[LoggedRequest] = []
        # Told "running" / "deleted" with the VM and its public IP; the SSH hosts subscribe here.
        self.backing = backing  # a persist.StoreFile shared with other processes, or None
        self.vm_listeners: list[Callable[[str, dict[str, Any], str | None], None]] = []
        self.ssh_resolver: Callable[[str], tuple[str, int]] | None = None
        self._lock = threading.RLock()

    # ------------------------------------------------------------------ public helpers for tests

    def inject(self, fault: Fault) -> Fault:
        return self.faults.add(fault)

    def set_quota(self, region: str, family: str, vcpus: int) -> None:
        with self._locked():
            self.store.quotas[f"{region}/{family}"] = vcpus

    def live_resources(self) -> list[dict[str, Any]]:
        """Every group and resource that exists now (after settling due operations)."""
        with self._locked():
            self._settle()
            return [copy.deepcopy(x) for x in (*self.store.groups.values(), *self.store.resources.values())]

    def requests(self, *, include_polls: bool = True) -> list[LoggedRequest]:
        with self._lock:
            return [r for r in self.log if include_polls or r.kind not in {"poll"}]

    @contextmanager
    def _locked(self) -> Iterator[None]:
        """The store, current and exclusive: across threads always, across processes when backed
        by a file (read before, written after if anything changed)."""
        with self._lock:
            if self.backing is None:
                yield
                return
            with self.backing.locked():
                self.store = self.backing.load()
                before = self.store.to_json()
                try:
                    yield
                finally:
                    if self.store.to_json() != before:
                        self.backing.save(self.store)

    # ------------------------------------------------------------------ the HTTP entry point

    def handle(self, method: str, url: str, headers: dict[str, str], body: bytes | None) -> EmuResponse:
        method = method.upper()
        delay = self.profile.request_seconds()
        if delay:
            self.clock.sleep(delay)  # outside the lock: a slow front door must not serialise threads
        parts = urlsplit(url)
        query = {k: vals[-1] for k, vals in parse_qs(parts.query).items()}
        lower_headers = {k.lower(): val for k, val in headers.items()}
        request_id = str(uuid.uuid4())
        with self._locked():
            self._settle()
            rec = LoggedRequest(
                len(self.log) + 1,
                self.clock.now(),
                method,
                parts.path,
                query.get("api-version"),
                0,
                "read",
                None,
                None,
                request_id,
                query=query,
            )
            try:
                parsed = self._parse_body(body) if method in {"PUT", "PATCH", "POST"} else None
                rec.body = parsed
                self._authenticate(lower_headers)
                resp = self._route(method, parts.path, query, parsed, rec)
            except ArmFault as f:
                resp = self._error(f.status, f.code, f.message, f.retry_after)
                rec.error_code = f.code
            rec.status = resp.status
            self.log.append(rec)
        resp.headers.setdefault("x-ms-request-id", request_id)
        resp.headers["x-ms-correlation-request-id"] = lower_headers.get("x-ms-client-request-id", request_id)
        resp.headers.setdefault("Content-Type", "application/json; charset=utf-8")
        return resp

    # ------------------------------------------------------------------ plumbing

    @staticmethod
    def _parse_body(body: bytes | None) -> Any:
        if not body:
            return None
        try:
            return json.loads(body)
        except (ValueError, UnicodeDecodeError):
            raise v.invalid(
                "The request content was invalid and could not be deserialized.", "InvalidRequestContent"
            ) from None

    def _authenticate(self, headers: dict[str, str]) -> None:
        auth = headers.get("authorization", "")
        if not auth.startswith("Bearer ") or not auth[7:].strip():
            raise ArmFault(401, "AuthenticationFailed", "Authentication failed. The 'Authorization' header is missing.")
        if self.accept_token is not None and not self.accept_token(auth[7:].strip()):
            raise ArmFault(401, "InvalidAuthenticationToken", "The access token is invalid.")

    @staticmethod
    def _error(status: int, code: str, message: str, retry_after: float | None = None) -> EmuResponse:
        headers = {}
        if retry_after is not None:
            headers["Retry-After"] = str(max(0, round(retry_after, 3))).removesuffix(".0")
        body = json.dumps({"error": {"code": code, "message": message}}).encode()
        return EmuResponse(status, headers, body)

    @staticmethod
    def _ok(status: int, payload: Any, headers: dict[str, str] | None = None) -> EmuResponse:
        return EmuResponse(status, headers or {}, json.dumps(payload).encode() if payload is not None else b"")

    def _fault(self, method: str, rtype: str | None, rec: LoggedRequest, **fmt: Any) -> None:
        f = self.faults.take(method, rtype, "sync")
        if f is None:
            return
        message = f.message or DEFAULT_MESSAGES.get(f.code, f.code).format_map(_Default(fmt))
        raise ArmFault(
            f.status,
            f.code,
            message,
            f.retry_after if f.retry_after is not None else (1.0 if f.status == 429 else None),
        )

    def _route(self, method: str, path: str, query: dict[str, str], body: Any, rec: LoggedRequest) -> EmuResponse:
        route, m = "", None
        for route, pattern in _ROUTES:  # noqa: B007 - the matching route is used after the loop
            m = pattern.match(path)
            if m:
                break
        else:
            raise ArmFault(404, "InvalidResourceType", f"The resource type could not be found for path {path}.")
        if route not in {"async_op", "op_result", "rg_op_result"} and "api-version" not in query:
            raise ArmFault(
                400,
                "MissingApiVersionParameter",
                "The api-version query parameter (?api-version=) is required for all requests.",
            )
        g = m.groupdict()
        handler = getattr(self, f"_h_{route}")
        result: EmuResponse = handler(method, g, query, body, rec)
        return result

    def _settle(self) -> None:
        now = self.clock.now()
        for op_id, op in list(self.store.operations.items()):
            if op["status"] == "InProgress" and op["end"] <= now:
                self._finish(op_id, op)

    def _finish(self, op_id: str, op: dict[str, Any]) -> None:
        op["status"] = "Failed" if op.get("error") else "Succeeded"
        kind, rid = op["kind"], op["resource"]
        if kind in {"create", "update"}:
            state = "Failed" if op.get("error") else "Succeeded"
            for child in [rid, *op.get("children", [])]:
                res = self.store.resources.get(child)
                if res is not None:
                    res["properties"]["provisioningState"] = state
            res = self.store.resources.get(rid)
            if res is not None and res["type"] == T_VM and state == "Succeeded":
                ip = self._public_ip_of(res)
                for listener in self.vm_listeners:
                    listener("running", copy.deepcopy(res), ip)
        elif kind == "delete":
            self._remove_resource(rid)
        elif kind == "group-delete":
            group = self.store.groups.get(rid)
            prefix = rid + "/"
            for res_id in [r for r in self.store.resources if r.startswith(prefix)]:
                self._remove_resource(res_id)
            if group is not None:
                del self.store.groups[rid]

    def _remove_resource(self, rid: str) -> None:
        res = self.store.resources.pop(rid, None)
        if res is None:
            return
        if res["type"] == T_VM:
            ip = self._public_ip_of(res)
            for listener in self.vm_listeners:
                listener("deleted", copy.deepcopy(res), ip)
            for child, option in res.get("_cascade", {}).items():
                if option == "Delete":
                    self._remove_resource(child)
                elif child in self.store.resources:
                    self.store.resources[child]["properties"].pop("virtualMachine", None)

    def _new_op(
        self,
        kind: str,
        rid: str,
        seconds: float,
        error: dict[str, str] | None = None,
        children: list[str] | None = None,
    ) -> str:
        op_id = str(uuid.uuid4())
        now = self.clock.now()
        self.store.operations[op_id] = {
            "kind": kind, "resource": rid, "start": now, "end": now + seconds, "status": "InProgress",
            "error": error, "children": children or [],
        }  # fmt: skip
        if seconds <= 0:
            self._finish(op_id, self.store.operations[op_id])
        return op_id

    def _group(self, sub: str, rg: str) -> dict[str, Any]:
        group = self.store.groups.get(self._gid(sub, rg))
        if group is None:
            raise ArmFault(404, "ResourceGroupNotFound", f"Resource group '{rg}' could not be found.")
        return group

    @staticmethod
    def _gid(sub: str, rg: str) -> str:
        return f"/subscriptions/{sub}/resourcegroups/{rg}".lower()

    # ------------------------------------------------------------------ resource groups

    def _h_rg_list(
        self, method: str, g: dict[str, str], query: dict[str, str], body: Any, rec: LoggedRequest
    ) -> EmuResponse:
        rec.kind, rec.resource_type = "list", T_RG
        if method != "GET":
            raise ArmFault(405, "MethodNotAllowed", "The requested method is not allowed.")
        self._fault(method, T_RG, rec)
        tag_name, tag_value = _parse_tag_filter(query.get("$filter"))
        prefix = f"/subscriptions/{g['sub']}/".lower()
        out = []
        for gid, group in sorted(self.store.groups.items()):
            if not gid.startswith(prefix):
                continue
            tags = group.get("tags") or {}
            lowered = {k.lower(): val for k, val in tags.items()}
            if tag_name is not None and tag_name.lower() not in lowered:
                continue
            if tag_value is not None and lowered.get(tag_name.lower() if tag_name else "") != tag_value:
                continue
            out.append(group)
        return self._ok(200, {"value": out})

    def _h_rg(
        self, method: str, g: dict[str, str], query: dict[str, str], body: Any, rec: LoggedRequest
    ) -> EmuResponse:
        sub, rg = g["sub"], g["rg"]
        gid = self._gid(sub, rg)
        rec.resource_type, rec.resource_id = T_RG, gid
        existing = self.store.groups.get(gid)
        if method in {"GET", "HEAD"}:
            rec.kind = "read"
            self._fault(method, T_RG, rec)
            if existing is None:
                if method == "HEAD":
                    return EmuResponse(404, {})
                raise ArmFault(404, "ResourceGroupNotFound", f"Resource group '{rg}' could not be found.")
            return EmuResponse(204, {}) if method == "HEAD" else self._ok(200, existing)
        if method == "PUT":
            rec.kind = "update" if existing else "create"
            v.check_name(T_RG, rg)
            location = v.check_common(body, T_RG)
            if existing is not None and existing["properties"]["provisioningState"] == "Deleting":
                raise ArmFault(
                    409,
                    "ResourceGroupBeingDeleted",
                    DEFAULT_MESSAGES["ResourceGroupBeingDeleted"].format(group=rg),
                )
            self._fault(method, T_RG, rec, group=rg, location=location)
            if existing is not None and existing["location"] != location:
                raise ArmFault(
                    409,
                    "InvalidResourceGroupLocation",
                    f"Invalid resource group location "
                    f"'{location}'. The Resource group already exists in location "
                    f"'{existing['location']}'.",
                )
            group = {
                "id": f"/subscriptions/{sub}/resourceGroups/{existing['name'] if existing else rg}",
                "name": existing["name"] if existing else rg,
                "type": T_RG,
                "location": location,
                "tags": dict(body.get("tags") or {}),
                "properties": {"provisioningState": "Succeeded"},
            }
            self.store.groups[gid] = group
            # Resource group writes are synchronous in ARM, but they still take about a second.
            seconds = self.profile.create_seconds(T_RG)
            if seconds:
                self._lock.release()
                try:
                    self.clock.sleep(seconds)
                finally:
                    self._lock.acquire()
            return self._ok(200 if existing else 201, group)
        if method == "PATCH":
            rec.kind = "update"
            if existing is None:
                raise ArmFault(404, "ResourceGroupNotFound", f"Resource group '{rg}' could not be found.")
            if isinstance(body, dict) and isinstance(body.get("tags"), dict):
                existing["tags"] = dict(body["tags"])
            return self._ok(200, existing)
        if method == "DELETE":
            rec.kind = "delete"
            self._fault(method, T_RG, rec, group=rg)
            if existing is None:
                raise ArmFault(404, "ResourceGroupNotFound", f"Resource group '{rg}' could not be found.")
            forced = {t.strip().lower() for t in query.get("forceDeletionTypes", "").split(",") if t.strip()}
            if forced - {"microsoft.compute/virtualmachines", "microsoft.compute/virtualmachinescalesets"}:
                raise ArmFault(
                    400,
                    "InvalidForceDeletionTypes",
                    "forceDeletionTypes may only name "
                    "Microsoft.Compute/virtualMachines and Microsoft.Compute/virtualMachineScaleSets.",
                )
            has_vms = any(r["type"] == T_VM for rid, r in self.store.resources.items() if rid.startswith(gid + "/"))
            op_id = existing.get("_delete_op")
            if existing["properties"]["provisioningState"] != "Deleting" or op_id is None:
                existing["properties"]["provisioningState"] = "Deleting"
                seconds = self.profile.group_delete_seconds(forced=bool(forced) or not has_vms)
                op_id = self._new_op("group-delete", gid, seconds)
                if gid in self.store.groups:
                    existing["_delete_op"] = op_id
            api = query.get("api-version", "")
            location = f"{HOST}/subscriptions/{sub}/operationresults/{op_id}?api-version={api}"
            return EmuResponse(202, {"Location": location, "Retry-After": "15"})
        raise ArmFault(405, "MethodNotAllowed", "The requested method is not allowed.")

    def _h_rg_op_result(
        self, method: str, g: dict[str, str], query: dict[str, str], body: Any, rec: LoggedRequest
    ) -> EmuResponse:
        op = self._operation(g["op"], rec)
        rec.resource_type = T_RG
        if op["status"] == "InProgress":
            return EmuResponse(202, {"Location": f"{HOST}{rec.path}?{_q(query)}", "Retry-After": "15"})
        return EmuResponse(200, {})

    def _h_rg_resources(
        self, method: str, g: dict[str, str], query: dict[str, str], body: Any, rec: LoggedRequest
    ) -> EmuResponse:
        rec.kind, rec.resource_type = "list", "Microsoft.Resources/resources"
        gid = self._gid(g["sub"], g["rg"])
        self._group(g["sub"], g["rg"])
        out = [
            {k: r[k] for k in ("id", "name", "type", "location", "tags") if k in r}
            for rid, r in sorted(self.store.resources.items())
            if rid.startswith(gid + "/")
        ]
        return self._ok(200, {"value": out})

    # ------------------------------------------------------------------ typed resources

    def _resolve_type(self, ns: str, type_: str) -> str:
        for t in SUPPORTED_TYPES:
            if t.lower() == f"{ns}/{type_}".lower():
                return t
        raise ArmFault(
            404,
            "InvalidResourceType",
            f"The resource type '{type_}' could not be found in the namespace '{ns}'.",
        )

    def _rid(self, sub: str, rg: str, rtype: str, name: str) -> str:
        return f"/subscriptions/{sub}/resourceGroups/{rg}/providers/{rtype}/{name}"

    def _h_typed_list(
        self, method: str, g: dict[str, str], query: dict[str, str], body: Any, rec: LoggedRequest
    ) -> EmuResponse:
        rtype = self._resolve_type(g["ns"], g["type"])
        rec.kind, rec.resource_type = "list", rtype
        self._group(g["sub"], g["rg"])
        self._fault(method, rtype, rec)
        gid = self._gid(g["sub"], g["rg"])
        out = [
            self._public(r)
            for rid, r in sorted(self.store.resources.items())
            if rid.startswith(gid + "/") and r["type"] == rtype
        ]
        return self._ok(200, {"value": out})

    def _h_subnet(
        self, method: str, g: dict[str, str], query: dict[str, str], body: Any, rec: LoggedRequest
    ) -> EmuResponse:
        rec.kind, rec.resource_type = "read", T_SUBNET
        if method != "GET":
            raise ArmFault(405, "MethodNotAllowed", "This emulator manages subnets through their VNet.")
        vnet = self.store.resources.get(self._rid(g["sub"], g["rg"], T_VNET, g["vnet"]).lower())
        subnet = self._find_subnet(vnet, g["name"]) if vnet else None
        if subnet is None:
            raise ArmFault(404, "NotFound", f"Resource {rec.path} not found.")
        return self._ok(200, subnet)

    @staticmethod
    def _find_subnet(vnet: dict[str, Any] | None, name: str) -> dict[str, Any] | None:
        for s in (vnet or {}).get("properties", {}).get("subnets", []):
            if s["name"].lower() == name.lower():
                return dict(s)
        return None

    @staticmethod
    def _public(res: dict[str, Any]) -> dict[str, Any]:
        return {k: copy.deepcopy(val) for k, val in res.items() if not k.startswith("_")}

    def _h_typed(
        self, method: str, g: dict[str, str], query: dict[str, str], body: Any, rec: LoggedRequest
    ) -> EmuResponse:
        rtype = self._resolve_type(g["ns"], g["type"])
        sub, rg, name = g["sub"], g["rg"], g["name"]
        rid = self._rid(sub, rg, rtype, name)
        key = rid.lower()
        rec.resource_type, rec.resource_id = rtype, rid
        existing = self.store.resources.get(key)
        if method == "GET":
            rec.kind = "read"
            self._fault(method, rtype, rec)
            if existing is None:
                raise ArmFault(
                    404,
                    "ResourceNotFound",
                    f"The Resource '{rtype}/{name}' under resource group '{rg}' was not found.",
                )
            return self._ok(200, self._public(existing))
        if method == "DELETE":
            rec.kind = "delete"
            self._fault(method, rtype, rec)
            if existing is None:
                return EmuResponse(204, {})
            self._check_not_in_use(existing)
            existing["properties"]["provisioningState"] = "Deleting"
            op_id = self._new_op("delete", key, self.profile.delete_seconds(rtype))
            return EmuResponse(202, self._op_headers(sub, rtype, existing["location"], op_id, query, result=True))
        if method == "PUT":
            group = self._group(sub, rg)
            if group["properties"]["provisioningState"] == "Deleting":
                raise ArmFault(
                    409,
                    "ResourceGroupBeingDeleted",
                    DEFAULT_MESSAGES["ResourceGroupBeingDeleted"].format(group=rg),
                )
            v.check_name(rtype, name)
            location = v.check_common(body, rtype)
            rec.kind = "update" if existing else "create"
            if existing is not None and existing["properties"].get("provisioningState") in {
                "Creating",
                "Updating",
                "Deleting",
            }:
                raise ArmFault(
                    409,
                    "AnotherOperationInProgress",
                    f"Operation on '{name}' is not allowed: another operation is in progress.",
                )
            writer = {
                T_VNET: self._put_vnet,
                T_NSG: self._put_nsg,
                T_VM: self._put_vm,
                T_PIP: self._put_pip,
                T_NIC: self._put_nic,
                T_SCHEDULE: self._put_schedule,
            }.get(rtype)
            if writer is None:
                raise ArmFault(405, "MethodNotAllowed", f"Creating {rtype} directly is not supported by the emulator.")
            resource, children, seconds = writer(_Write(sub, rg, rid, name, location, body, existing, rec))
            if rtype == T_SCHEDULE:  # a synchronous write in the DevTestLab RP: no operation to poll
                resource["properties"]["provisioningState"] = "Succeeded"
                self.store.resources[key] = resource
                return self._ok(200 if existing else 201, self._public(resource))
            lro = self.faults.take("PUT", rtype, "lro")
            error = None
            if lro is not None:
                fmt = {
                    "size": body.get("properties", {}).get("hardwareProfile", {}).get("vmSize", ""),
                    "location": location,
                }
                error = {
                    "code": lro.code,
                    "message": lro.message or DEFAULT_MESSAGES.get(lro.code, lro.code).format_map(_Default(fmt)),
                }
            state = "Updating" if existing or rtype.startswith("Microsoft.Network") else "Creating"
            resource["properties"]["provisioningState"] = state
            self.store.resources[key] = resource
            for child in children:
                self.store.resources[child["id"].lower()] = child
            op_id = self._new_op(
                "update" if existing else "create", key, seconds, error, [c["id"].lower() for c in children]
            )
            headers = self._op_headers(sub, rtype, location, op_id, query, result=False)
            # The PUT answers with the resource as it is now (Creating), before the operation's end.
            snapshot = self._public(resource)
            snapshot["properties"]["provisioningState"] = state
            return self._ok(200 if existing else 201, snapshot, headers)
        raise ArmFault(405, "MethodNotAllowed", "The requested method is not allowed.")

    def _op_headers(
        self, sub: str, rtype: str, location: str, op_id: str, query: dict[str, str], *, result: bool
    ) -> dict[str, str]:
        ns = rtype.split("/")[0]
        api = query.get("api-version", "")
        base = f"{HOST}/subscriptions/{sub}/providers/{ns}/locations/{location}"
        headers = {"Azure-AsyncOperation": f"{base}/operations/{op_id}?api-version={api}"}
        if result:
            headers["Location"] = f"{base}/operationresults/{op_id}?api-version={api}"
        return headers

    def _operation(self, op_id: str, rec: LoggedRequest) -> dict[str, Any]:
        rec.kind = "poll"
        op = self.store.operations.get(op_id)
        if op is None:
            raise ArmFault(404, "NotFound", "The operation was not found.")
        return op

    def _h_async_op(
        self, method: str, g: dict[str, str], query: dict[str, str], body: Any, rec: LoggedRequest
    ) -> EmuResponse:
        op = self._operation(g["op"], rec)
        rec.resource_id = op["resource"]
        payload: dict[str, Any] = {
            "name": g["op"],
            "status": op["status"],
            "startTime": _now_iso(op["start"]),
        }
        if op["status"] != "InProgress":
            payload["endTime"] = _now_iso(op["end"])
        if op["status"] == "Failed" and op.get("error"):
            payload["error"] = op["error"]
        return self._ok(200, payload)

    def _h_op_result(
        self, method: str, g: dict[str, str], query: dict[str, str], body: Any, rec: LoggedRequest
    ) -> EmuResponse:
        op = self._operation(g["op"], rec)
        if op["status"] == "InProgress":
            return EmuResponse(202, {"Location": f"{HOST}{rec.path}?{_q(query)}"})
        return EmuResponse(204, {})

    def _check_not_in_use(self, res: dict[str, Any]) -> None:
        rid = res["id"].lower()
        for other in self.store.resources.values():
            if other["type"] != T_NIC or other["properties"].get("provisioningState") == "Deleting":
                continue
            props = other["properties"]
            if (props.get("networkSecurityGroup") or {}).get("id", "").lower() == rid:
                raise ArmFault(
                    400,
                    "InUseNetworkSecurityGroupCannotBeDeleted",
                    f"Network security group {rid} cannot be deleted because it is in use by {other['id']}.",
                )
            for ipc in props.get("ipConfigurations", []):
                if ipc["properties"]["subnet"]["id"].lower().startswith(rid + "/"):
                    raise ArmFault(400, "InUseSubnetCannotBeDeleted", f"Subnet is in use by {other['id']}.")
                if (ipc["properties"].get("publicIPAddress") or {}).get("id", "").lower() == rid:
                    raise ArmFault(400, "PublicIPAddressCannotBeDeleted", f"Public IP {rid} is in use.")
        if res["type"] == T_NIC and res["properties"].get("virtualMachine"):
            raise ArmFault(400, "NicInUse", f"Network interface {rid} is attached to a virtual machine.")

    # ------------------------------------------------------------------ writers

    def _base(self, rid: str, name: str, rtype: str, location: str, body: dict[str, Any]) -> dict[str, Any]:
        return {
            "id": rid,
            "name": name,
            "type": rtype,
            "location": location,
            "tags": dict(body.get("tags") or {}),
            "properties": {},
        }

    def _put_vnet(self, w: _Write) -> tuple[dict[str, Any], list[Any], float]:
        rid, name, location, body, rec = w.rid, w.name, w.location, w.body, w.rec
        v.check_vnet(body)
        self._fault("PUT", T_VNET, rec, location=location)
        res = self._base(rid, name, T_VNET, location, body)
        props = copy.deepcopy(body["properties"])
        props["subnets"] = [
            {
                "name": s["name"],
                "id": f"{rid}/subnets/{s['name']}",
                "type": T_SUBNET,
                "properties": {**s["properties"], "provisioningState": "Succeeded"},
            }
            for s in props.get("subnets") or []
        ]
        res["properties"] = props
        res["etag"] = f'W/"{uuid.uuid4()}"'
        return res, [], self.profile.create_seconds(T_VNET)

    def _put_nsg(self, w: _Write) -> tuple[dict[str, Any], list[Any], float]:
        rid, name, location, body, rec = w.rid, w.name, w.location, w.body, w.rec
        v.check_nsg(body)
        self._fault("PUT", T_NSG, rec, location=location)
        res = self._base(rid, name, T_NSG, location, body)
        props = copy.deepcopy(body.get("properties") or {})
        props["securityRules"] = [
            {**r, "id": f"{rid}/securityRules/{r['name']}"} for r in props.get("securityRules") or []
        ]
        res["properties"] = props
        return res, [], self.profile.create_seconds(T_NSG)

    def _quota_check(self, size: catalog.VmSize, location: str, spot: bool, exclude: str) -> None:
        family = "lowPriorityCores" if spot else size.family
        limit = self.store.quotas.get(f"{location}/{family}", self.default_quota)
        usage = 0
        for rid, r in self.store.resources.items():
            if r["type"] != T_VM or rid == exclude or r["location"] != location:
                continue
            if r["properties"].get("provisioningState") in {"Failed", "Deleting"}:
                continue
            other = catalog.VM_SIZES[r["properties"]["hardwareProfile"]["vmSize"]]
            other_spot = r["properties"].get("priority") == "Spot"
            if ("lowPriorityCores" if other_spot else other.family) == family:
                usage += other.vcpus
        if usage + size.vcpus > limit:
            message = DEFAULT_MESSAGES["OperationNotAllowed"].format(
                family=family,
                location=location,
                limit=limit,
                usage=usage,
                required=size.vcpus,
                new_limit=usage + size.vcpus,
            )
            raise ArmFault(409, "OperationNotAllowed", message)

    def _put_vm(self, w: _Write) -> tuple[dict[str, Any], list[Any], float]:
        sub, rg, rid, name, location, body, existing, rec = w
        size = v.check_vm(body, location)
        props = body["properties"]
        if location not in size.regions:
            raise ArmFault(
                409,
                "SkuNotAvailable",
                DEFAULT_MESSAGES["SkuNotAvailable"].format(size=size.name, location=location),
            )
        if existing is not None and existing["properties"].get("osProfile") != _strip_secrets(props.get("osProfile")):
            raise ArmFault(409, "PropertyChangeNotAllowed", "Changing property 'osProfile' is not allowed.")
        self._fault("PUT", T_VM, rec, size=size.name, location=location)
        self._quota_check(size, location, props.get("priority") == "Spot", rid.lower())
        res = self._base(rid, name, T_VM, location, body)
        if body.get("zones"):
            res["zones"] = list(body["zones"])
        out = copy.deepcopy(props)
        custom = props["osProfile"].get("customData")
        if custom is not None:
            try:
                parse_cloud_init(custom)
            except CloudInitError as e:
                raise v.invalid(f"The custom data of VM {name} is not a valid cloud-init document: {e}.") from None
            res["_customData"] = custom  # kept for the VM's boot, never returned (as ARM does)
        elif existing is not None and existing.get("_customData"):
            res["_customData"] = existing["_customData"]
        out["osProfile"] = _strip_secrets(out["osProfile"])
        out["vmId"] = existing["properties"]["vmId"] if existing else str(uuid.uuid4())
        out["timeCreated"] = existing["properties"]["timeCreated"] if existing else _now_iso(self.clock.now())
        children: list[dict[str, Any]] = []
        cascade: dict[str, str] = {}
        nic_refs = []
        for cfg in props["networkProfile"].get("networkInterfaceConfigurations") or []:
            nic_id = self._rid(sub, rg, T_NIC, cfg["name"])
            nic, pips = self._nic(nic_id, cfg["name"], location, cfg.get("properties", {}), body, rid)
            nic["properties"]["virtualMachine"] = {"id": rid}
            children.append(nic)
            children.extend(pips)
            option = cfg.get("properties", {}).get("deleteOption", "Detach")
            cascade[nic["id"].lower()] = option
            for pip in pips:
                cascade[pip["id"].lower()] = pip.pop("_deleteOption")
            nic_refs.append(
                {
                    "id": nic["id"],
                    "properties": {"primary": cfg["properties"].get("primary", True), "deleteOption": option},
                }
            )
        for ref in props["networkProfile"].get("networkInterfaces") or []:
            attached = self._referenced(str(ref.get("id", "")), rid, location)
            attached["properties"]["virtualMachine"] = {"id": rid}
            nic_refs.append(ref)
            cascade[attached["id"].lower()] = (ref.get("properties") or {}).get("deleteOption", "Detach")
        out["networkProfile"]["networkInterfaces"] = nic_refs
        os_disk = out["storageProfile"]["osDisk"]
        disk_name = os_disk.get("name") or f"{name}_OsDisk_1_{uuid.uuid4().hex}"
        disk_id = self._rid(sub, rg, T_DISK, disk_name)
        os_disk["name"] = disk_name
        os_disk.setdefault("managedDisk", {})["id"] = disk_id
        if existing is None:
            disk = self._base(disk_id, disk_name, T_DISK, location, body)
            disk["properties"] = {
                "diskSizeGB": os_disk.get("diskSizeGB", 30),
                "osType": "Linux",
                "diskState": "Attached",
            }
            disk["managedBy"] = rid
            children.append(disk)
        cascade[disk_id.lower()] = os_disk.get("deleteOption", "Detach")
        out["provisioningState"] = "Creating"
        res["properties"] = out
        res["_cascade"] = cascade
        seconds = self.profile.create_seconds(T_VM) if existing is None else 2.0 * self.profile.scale
        return res, children, seconds

    def _referenced(self, ref_id: str, by: str, location: str) -> dict[str, Any]:
        """A resource another one points at: it must exist, be provisioned, and share the region."""
        target = self.store.resources.get(ref_id.lower())
        state = (target or {}).get("properties", {}).get("provisioningState")
        if target is not None and state != "Succeeded":
            # The network RP refuses references to resources that are still being written: this is
            # why the VMs must wait for the VNet and NSG operations to finish.
            raise ArmFault(
                400,
                "ReferencedResourceNotProvisioned",
                f"Cannot proceed with operation because resource {ref_id} used by resource {by} is not in "
                f"Succeeded state. Resource is in {state} state.",
            )
        if target is None:
            raise ArmFault(
                400,
                "InvalidResourceReference",
                f"Resource {ref_id} referenced by resource {by} was not found. Please make sure that the "
                "referenced resource exists, and that both resources are in the same region.",
            )
        if target["location"] != location:
            raise ArmFault(
                400,
                "InvalidResourceReference",
                f"Resource {ref_id} is in {target['location']}, not {location}; referenced resources must "
                "be in the same region.",
            )
        return target

    def _nic(
        self,
        nic_id: str,
        nic_name: str,
        location: str,
        props: dict[str, Any],
        body: dict[str, Any],
        owner: str,
    ) -> tuple[dict[str, Any], list[dict[str, Any]]]:
        """A NIC record (and, for inline VM configurations, its new public IPs) from NIC properties."""
        nic = self._base(nic_id, nic_name, T_NIC, location, body)
        nsg_ref = (props.get("networkSecurityGroup") or {}).get("id")
        if nsg_ref:
            self._referenced(nsg_ref, owner, location)
        pips = []
        ipconfigs = []
        existing_nic = self.store.resources.get(nic_id.lower())
        old = {c["name"]: c for c in (existing_nic or {}).get("properties", {}).get("ipConfigurations", [])}
        for ipc in props["ipConfigurations"]:
            iprops = ipc["properties"]
            subnet_id = iprops["subnet"]["id"]
            vnet_id, _, subnet_name = subnet_id.rpartition("/subnets/")
            vnet = self._referenced(vnet_id, owner, location)
            if self._find_subnet(vnet, subnet_name) is None:
                raise ArmFault(400, "InvalidResourceReference", f"Subnet {subnet_id} referenced by {owner} "
                               "was not found.")  # fmt: skip
            private = old.get(ipc["name"], {}).get("properties", {}).get("privateIPAddress")
            entry: dict[str, Any] = {
                "name": ipc["name"],
                "id": f"{nic_id}/ipConfigurations/{ipc['name']}",
                "properties": {
                    "subnet": {"id": subnet_id},
                    "privateIPAllocationMethod": "Dynamic",
                    "privateIPAddress": private or self._private_ip(vnet),
                    "primary": iprops.get("primary", True),
                },
            }
            pcfg = iprops.get("publicIPAddressConfiguration")
            pref = (iprops.get("publicIPAddress") or {}).get("id")
            if pcfg:
                rg_prefix = nic_id.rsplit("/providers/", 1)[0]
                pip_id = f"{rg_prefix}/providers/{T_PIP}/{pcfg['name']}"
                pip = self._pip(pip_id, pcfg["name"], location, pcfg, body)
                pip["properties"]["ipConfiguration"] = {"id": entry["id"]}
                pip["_deleteOption"] = (pcfg.get("properties") or {}).get("deleteOption", "Detach")
                pips.append(pip)
                entry["properties"]["publicIPAddress"] = {"id": pip_id}
            elif pref:
                target = self._referenced(pref, owner, location)
                target["properties"]["ipConfiguration"] = {"id": entry["id"]}
                entry["properties"]["publicIPAddress"] = {"id": pref}
            ipconfigs.append(entry)
        nic["properties"] = {
            "ipConfigurations": ipconfigs,
            "enableAcceleratedNetworking": bool(props.get("enableAcceleratedNetworking")),
            "primary": props.get("primary", True),
        }
        if nsg_ref:
            nic["properties"]["networkSecurityGroup"] = {"id": nsg_ref}
        return nic, pips

    def _pip(self, pip_id: str, name: str, location: str, cfg: dict[str, Any], body: dict[str, Any]) -> dict[str, Any]:
        old = self.store.resources.get(pip_id.lower())
        pip = self._base(pip_id, name, T_PIP, location, body)
        pip["sku"] = cfg.get("sku") or {"name": "Standard", "tier": "Regional"}
        method = (cfg.get("properties") or {}).get("publicIPAllocationMethod", "Static")
        if method not in {"Static", "Dynamic"}:
            raise v.invalid("publicIPAllocationMethod must be Static or Dynamic.")
        if pip["sku"].get("name") == "Standard" and method != "Static":
            raise v.invalid("Standard sku publicIp must have AllocationMethod set to Static.",
                            "StandardSkuPublicIPAddressesMustBeStatic")  # fmt: skip
        pip["properties"] = {
            "publicIPAllocationMethod": method,
            "ipAddress": old["properties"]["ipAddress"] if old else self._public_ip(),
        }
        return pip

    def _put_pip(self, w: _Write) -> tuple[dict[str, Any], list[Any], float]:
        rid, name, location, body, rec = w.rid, w.name, w.location, w.body, w.rec
        self._fault("PUT", T_PIP, rec, location=location)
        return self._pip(rid, name, location, body, body), [], self.profile.create_seconds(T_PIP)

    def _put_schedule(self, w: _Write) -> tuple[dict[str, Any], list[Any], float]:
        """A VM auto-shutdown schedule, validated as the DevTestLab RP does."""
        rid, name, location, body, rec = w.rid, w.name, w.location, w.body, w.rec
        props = v.require(body, "properties", dict)
        if props.get("taskType") != "ComputeVmShutdownTask":
            raise v.invalid("The schedule's taskType must be ComputeVmShutdownTask.")
        if props.get("status", "Enabled") not in {"Enabled", "Disabled"}:
            raise v.invalid("The schedule's status must be Enabled or Disabled.")
        hhmm = str(v.require(props, "dailyRecurrence.time", str))
        if not re.fullmatch(r"([01]\d|2[0-3])[0-5]\d", hhmm):
            raise v.invalid(f"The value {hhmm} for dailyRecurrence.time is invalid; use HHmm.")
        v.require(props, "timeZoneId", str)
        target = str(v.require(props, "targetResourceId", str))
        vm = self.store.resources.get(target.lower())
        if vm is None or vm["type"] != T_VM:
            raise ArmFault(400, "InvalidResourceReference", f"Resource {target} referenced by {rid} was not found.")
        if name.lower() != f"shutdown-computevm-{vm['name']}".lower():
            raise v.invalid(f"A VM's auto-shutdown schedule must be named shutdown-computevm-{vm['name']}.")
        self._fault("PUT", T_SCHEDULE, rec, location=location)
        res = self._base(rid, name, T_SCHEDULE, location, body)
        res["properties"] = copy.deepcopy(props)
        return res, [], 0.0

    def _put_nic(self, w: _Write) -> tuple[dict[str, Any], list[Any], float]:
        rid, name, location, body, existing, rec = w.rid, w.name, w.location, w.body, w.existing, w.rec
        ipcs = v.require(body, "properties.ipConfigurations", list)
        if not ipcs:
            raise v.invalid("A network interface needs at least one ipConfiguration.")
        for ipc in ipcs:
            v.require(ipc, "name", str)
            v.require(ipc, "properties.subnet.id", str)
        self._fault("PUT", T_NIC, rec, location=location)
        nic, _ = self._nic(rid, name, location, body["properties"], body, rid)
        if existing is not None and existing["properties"].get("virtualMachine"):
            nic["properties"]["virtualMachine"] = existing["properties"]["virtualMachine"]
        return nic, [], self.profile.create_seconds(T_NIC)

    def _public_ip_of(self, vm: dict[str, Any]) -> str | None:
        for ref in vm["properties"].get("networkProfile", {}).get("networkInterfaces", []):
            nic = self.store.resources.get(ref["id"].lower())
            for ipc in (nic or {}).get("properties", {}).get("ipConfigurations", []):
                pip_ref = (ipc["properties"].get("publicIPAddress") or {}).get("id", "")
                pip = self.store.resources.get(pip_ref.lower())
                if pip is not None:
                    return str(pip["properties"]["ipAddress"])
        return None

    def attach_hosts(self, hosts: Any) -> None:
        """Serve SSH for every VM that becomes running (see sshhost.SshHosts)."""
        self.vm_listeners.append(hosts.on_vm)
        self.ssh_resolver = hosts.resolve
        with self._locked():
            for res in self.store.resources.values():  # VMs that were already running
                if res["type"] == T_VM and res["properties"].get("provisioningState") == "Succeeded":
                    hosts.on_vm("running", copy.deepcopy(res), self._public_ip_of(res))

    def _private_ip(self, vnet: dict[str, Any]) -> str:
        subnet = vnet["properties"]["subnets"][0]["properties"]["addressPrefix"]
        net = ipaddress.ip_network(subnet)
        used = {
            ipc["properties"].get("privateIPAddress")
            for r in self.store.resources.values()
            if r["type"] == T_NIC
            for ipc in r["properties"].get("ipConfigurations", [])
        }
        for host in list(net.hosts())[3:]:  # Azure reserves the first addresses of every subnet
            if str(host) not in used:
                return str(host)
        raise ArmFault(400, "SubnetIsFull", "Subnet does not have enough capacity for the IP configurations.")

    def _public_ip(self) -> str:
        self.store.ip_counter += 1
        n = self.store.ip_counter
        return f"20.{(n >> 16) & 255}.{(n >> 8) & 255}.{n & 255}"  # looks like Azure; never dialled


class _Write(NamedTuple):
    """One PUT of a typed resource, as the writers receive it."""

    sub: str
    rg: str
    rid: str
    name: str
    location: str
    body: dict[str, Any]
    existing: dict[str, Any] | None
    rec: LoggedRequest


class _Default(dict[str, Any]):
    def __missing__(self, key: str) -> str:
        return "{" + key + "}"


def _strip_secrets(os_profile: Any) -> Any:
    """ARM never returns adminPassword or customData on GET; neither does the emulator."""
    if not isinstance(os_profile, dict):
        return os_profile
    return {k: val for k, val in os_profile.items() if k not in {"adminPassword", "customData"}}


def _q(query: dict[str, str]) -> str:
    return "&".join(f"{k}={val}" for k, val in query.items())


_TAG_FILTER = re.compile(r"^\s*tagName\s+eq\s+'([^']*)'(?:\s+and\s+tagValue\s+eq\s+'([^']*)')?\s*$", re.I)


def _parse_tag_filter(expr: str | None) -> tuple[str | None, str | None]:
    if not expr:
        return None, None
    m = _TAG_FILTER.match(expr)
    if not m:
        raise ArmFault(
            400,
            "InvalidFilterInQueryString",
            f"Invalid $filter '{expr}': use tagName eq 'x' [and tagValue eq 'y'].",
        )
    return m.group(1), m.group(2)
