"""The provider-independent half of the emulator: the HTTP entry point, the store's lock, routing,
authentication, ARM's error shape, fault injection, and the long-running operations every provider's
writes go through (created, settled as the clock passes their end, polled, pruned).

`ArmCore` is a mixin: `arm.Emulator` sets the attributes declared here and combines it with one
class per resource provider (resources.py, network.py, compute.py, devtestlab.py).
"""

from __future__ import annotations

import copy
import json
import re
import threading
import uuid
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from typing import Any
from urllib.parse import parse_qs, urlsplit

from orchestrator.clock import Clock
from orchestrator.emulator import openapi
from orchestrator.emulator import validation as v
from orchestrator.emulator.faults import DEFAULT_MESSAGES, Fault, FaultInjector
from orchestrator.emulator.latency import LatencyProfile
from orchestrator.emulator.store import (
    HOST,
    EmuResponse,
    FormatDefault,
    LoggedRequest,
    Store,
    gid,
    now_iso,
    query_string,
)
from orchestrator.emulator.validation import ArmFault

# A finished operation stays pollable this long (emulated seconds after it finished), and at most
# this many finished operations are kept; then it is forgotten and a poll answers 404, as ARM does.
FINISHED_OPERATION_TTL = 600.0
MAX_FINISHED_OPERATIONS = 200
DEFAULT_REGIONAL_VCPUS = 350  # a pay-as-you-go subscription's usual "Total Regional vCPUs"

_SUB = r"/subscriptions/(?P<sub>[^/]+)"
_RG = _SUB + r"/resourcegroups/(?P<rg>[^/]+)"
_LOC = _SUB + r"/providers/(?P<ns>[^/]+)/locations/(?P<loc>[^/]+)"
_VNET = _RG + r"/providers/microsoft\.network/virtualnetworks/(?P<vnet>[^/]+)"
_CRP = _SUB + r"/providers/microsoft\.compute"
_IMAGE = (
    _CRP + r"/locations/(?P<loc>[^/]+)/publishers/(?P<pub>[^/]+)/artifacttypes/vmimage/offers/(?P<offer>[^/]+)"
    r"/skus/(?P<sku>[^/]+)/versions"
)
# Each route is served by the method `_h_<route>`.
_ROUTES: list[tuple[str, re.Pattern[str]]] = [
    ("provider", re.compile(_SUB + r"/providers/(?P<ns>[^/]+)/?$", re.I)),
    ("provider_register", re.compile(_SUB + r"/providers/(?P<ns>[^/]+)/register/?$", re.I)),
    ("usages", re.compile(_CRP + r"/locations/(?P<loc>[^/]+)/usages/?$", re.I)),
    ("skus", re.compile(_CRP + r"/skus/?$", re.I)),
    ("image_versions", re.compile(_IMAGE + r"/?$", re.I)),
    ("image_version", re.compile(_IMAGE + r"/(?P<version>[^/]+)$", re.I)),
    ("permissions", re.compile(_SUB + r"(?:/resourcegroups/(?P<rg>[^/]+))?/providers/microsoft\.authorization"
                               r"/permissions/?$", re.I)),
    ("policy_check", re.compile(_SUB + r"(?:/resourcegroups/(?P<rg>[^/]+))?/providers/microsoft\.policyinsights"
                                r"/checkpolicyrestrictions/?$", re.I)),
    ("role_definitions", re.compile(_SUB + r"(?:/resourcegroups/(?P<rg>[^/]+))?/providers/microsoft\.authorization"
                                    r"/roledefinitions/?$", re.I)),
    ("role_definition", re.compile(_SUB + r"(?:/resourcegroups/(?P<rg>[^/]+))?/providers/microsoft\.authorization"
                                   r"/roledefinitions/(?P<name>[^/]+)$", re.I)),
    ("role_assignments", re.compile(_SUB + r"(?:/resourcegroups/(?P<rg>[^/]+))?/providers/microsoft\.authorization"
                                    r"/roleassignments/?$", re.I)),
    ("role_assignment", re.compile(_SUB + r"(?:/resourcegroups/(?P<rg>[^/]+))?/providers/microsoft\.authorization"
                                   r"/roleassignments/(?P<name>[^/]+)$", re.I)),
    ("vm_action", re.compile(_RG + r"/providers/microsoft\.compute/virtualmachines/(?P<name>[^/]+)"
                             r"/(?P<action>deallocate|start|poweroff)/?$", re.I)),
    ("vm_instance_view", re.compile(_RG + r"/providers/microsoft\.compute/virtualmachines/(?P<name>[^/]+)"
                                    r"/instanceview/?$", re.I)),
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
_POLLS = {"async_op", "op_result", "rg_op_result"}
# Routes whose handlers take no injected fault themselves: operation polls and the reads and actions
# of the preflight. A fault with no resource_type (a 429 storm, a 5xx) hits them too, as Azure's
# throttling does every request.
_UNTYPED_FAULTS = _POLLS | {
    "provider", "provider_register", "usages", "skus", "image_versions", "image_version", "permissions",
    "policy_check", "role_definitions", "role_definition", "vm_instance_view", "rg_list", "rg_resources",
}  # fmt: skip


class ArmCore:
    """Thread-safe: the SDK's pollers call in from several threads at once."""

    profile: LatencyProfile
    clock: Clock
    faults: FaultInjector
    store: Store
    default_quota: int
    accept_token: Callable[[str], bool] | None
    backing: Any  # a persist.StoreFile shared with other processes, or None
    log: list[LoggedRequest]
    _lock: threading.RLock
    _depth: int
    # Held to Microsoft's contract (openapi.py): request bodies checked against the vendored specs,
    # requests matched to a vendored operation, requests whose path is not in the extracts, and the
    # read-only members clients sent (ignored, as Azure ignores them).
    validated_bodies: int
    validated_requests: int
    unvalidated_requests: list[tuple[str, str, str]]
    read_only_sent: list[str]

    # ------------------------------------------------------------------ public helpers for tests

    def inject(self, fault: Fault) -> Fault:
        return self.faults.add(fault)

    def set_capacity(self, size: str, region: str, zone: str | None = None, vms: int = 0) -> None:
        """Room for `vms` more VMs of `size` ("*": any size) in `region`'s zoneless pool (zone None),
        one zone ("1"), or each of them ("*"), counting the VMs that exist; a create beyond it fails
        late with AllocationFailed (zoneless) or ZonalAllocationFailed (zoned). See faults.py."""
        self.faults.set_capacity(size, region, zone, vms)

    def set_capacity_json(self, text: str) -> None:
        """ORCH_EMULATOR_CAPACITY: a JSON list of limits, each {"size", "region", "zone" (optional:
        left out the zoneless pool, "*" every pool), "vms" (default 0)}; "" sets none."""
        from orchestrator.errors import UserInputError

        if not text.strip():
            return
        example = '[{"size": "Standard_NC4as_T4_v3", "region": "eastus", "zone": "1", "vms": 0}]'
        try:
            items = json.loads(text)
            for item in items if isinstance(items, list) else [items]:
                zone = item.get("zone")
                self.set_capacity(
                    str(item["size"]), str(item["region"]), None if zone is None else str(zone), int(item.get("vms", 0))
                )
        except (ValueError, TypeError, KeyError, AttributeError) as e:
            raise UserInputError(
                f'ORCH_EMULATOR_CAPACITY is not a JSON list of capacity limits ({e}); each needs "size" and '
                f'"region", e.g. {example}.'
            ) from None

    def set_quota(self, region: str, family: str, vcpus: int) -> None:
        with self._locked():
            self.store.quotas[f"{region}/{family}"] = vcpus

    def quota_limit(self, location: str, family: str) -> int:
        explicit = self.store.quotas.get(f"{location}/{family}")
        if explicit is None:
            explicit = self.store.quotas.get(f"*/{family}")
        if explicit is not None:
            return explicit
        if family in self.store.family_quotas:
            return self.store.family_quotas[family]
        return DEFAULT_REGIONAL_VCPUS if family == "cores" else self.default_quota

    def _check_sku_restrictions(self, size: str, location: str, zones: list[str] | None) -> None:
        for r in self.store.restrictions:
            if r["size"].lower() != size.lower() or r["location"] != location:
                continue
            if r["zones"] is None or (zones and set(zones) & set(r["zones"])):
                raise ArmFault(
                    409, "SkuNotAvailable", DEFAULT_MESSAGES["SkuNotAvailable"].format(size=size, location=location)
                )

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
        by a file (read before, written after if anything changed). What happened to VMs is told
        to the listeners after the file's lock is let go (_after_unlock)."""
        with self._lock:
            outermost = not self._depth
            self._depth += 1
            try:
                if self.backing is None or not outermost:
                    yield
                else:
                    with self.backing.locked():
                        # Read lazily, a resource group at a time (persist.py): every request of
                        # every process on the local target pays this under the one lock.
                        self.store = self.backing.open()
                        try:
                            yield
                        finally:
                            self.backing.commit(self.store)
            finally:
                self._depth -= 1
                if outermost:
                    self._after_unlock()  # also after a request that failed: its events still happened

    def _after_unlock(self) -> None:
        """Work queued during a request that must not hold the store's lock (compute.py: the VM
        listeners, which start and stop local VMs' host processes)."""

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
        throttled = self._throttled(method, parts.path, query, lower_headers, request_id)
        if throttled is not None:
            return throttled
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
                token = self._authenticate(lower_headers)
                self._authorize(method, parts.path, token)
                resp = self._route(method, parts.path, query, parsed, rec, body)
            except ArmFault as f:
                resp = self._error(f.status, f.code, f.message, f.retry_after, body=f.body())
                rec.error_code = f.code
            rec.status = resp.status
            self.log.append(rec)
        return self._stamped(resp, lower_headers, request_id)

    @staticmethod
    def _stamped(resp: EmuResponse, headers: dict[str, str], request_id: str) -> EmuResponse:
        """ARM's headers on every answer: its request id, the caller's correlation id, JSON."""
        resp.headers.setdefault("x-ms-request-id", request_id)
        resp.headers["x-ms-correlation-request-id"] = headers.get("x-ms-client-request-id", request_id)
        resp.headers.setdefault("Content-Type", "application/json; charset=utf-8")
        return resp

    def _throttled(
        self, method: str, path: str, query: dict[str, str], headers: dict[str, str], request_id: str
    ) -> EmuResponse | None:
        """ARM's throttling, injected (Fault.throttling): a 429 from the front door for a caller that
        presented a token, before any provider or the store is involved (nor its lock taken)."""
        if not headers.get("authorization", "").startswith("Bearer "):
            return None
        f = self.faults.take_throttling(method)
        if f is None:
            return None
        message = f.message or DEFAULT_MESSAGES.get(f.code, f.code)
        resp = self._error(f.status, f.code, message, f.retry_after if f.retry_after is not None else 1.0)
        with self._lock:
            n, now, api = len(self.log) + 1, self.clock.now(), query.get("api-version")
            rec = LoggedRequest(n, now, method, path, api, resp.status, "read", None, None, request_id, query=query)
            rec.error_code = f.code
            self.log.append(rec)
        return self._stamped(resp, headers, request_id)

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

    def _authenticate(self, headers: dict[str, str]) -> str:
        auth = headers.get("authorization", "")
        if not auth.startswith("Bearer ") or not auth[7:].strip():
            raise ArmFault(401, "AuthenticationFailed", "Authentication failed. The 'Authorization' header is missing.")
        token = auth[7:].strip()
        if self._managed_identity(token):
            return token  # checked against its role assignments by _authorize
        if self.accept_token is not None and not self.accept_token(token):
            raise ArmFault(401, "InvalidAuthenticationToken", "The access token is invalid.")
        return token

    def _managed_identity(self, token: str) -> bool:
        """Whether `token` is one a VM's managed identity got from its metadata service (authorization.py)."""
        return False

    def _authorize(self, method: str, path: str, token: str) -> None:
        """Raise 403 AuthorizationFailed when the token's role assignments do not allow the request
        (authorization.py; the tool's own credential is the subscription's Owner)."""

    @staticmethod
    def _error(
        status: int, code: str, message: str, retry_after: float | None = None, body: dict[str, Any] | None = None
    ) -> EmuResponse:
        headers = {}
        if retry_after is not None:
            headers["Retry-After"] = str(max(0, round(retry_after, 3))).removesuffix(".0")
        payload = body if body is not None else {"error": {"code": code, "message": message}}
        return EmuResponse(status, headers, json.dumps(payload).encode())

    @staticmethod
    def _ok(status: int, payload: Any, headers: dict[str, str] | None = None) -> EmuResponse:
        return EmuResponse(status, headers or {}, json.dumps(payload).encode() if payload is not None else b"")

    def _fault(self, method: str, rtype: str | None, rec: LoggedRequest, **fmt: Any) -> None:
        """Raise the injected synchronous fault that matches this request, if any."""
        where_known = "location" in fmt
        f = self.faults.take(method, rtype, "sync", fmt.get("location"), fmt.get("zone"), where_known=where_known)
        if f is None:
            return
        message = f.message or DEFAULT_MESSAGES.get(f.code, f.code).format_map(FormatDefault(fmt))
        raise ArmFault(
            f.status,
            f.code,
            message,
            f.retry_after if f.retry_after is not None else (1.0 if f.status == 429 else None),
        )

    def _route(
        self, method: str, path: str, query: dict[str, str], body: Any, rec: LoggedRequest, raw: bytes | None = None
    ) -> EmuResponse:
        route, m = "", None
        for route, pattern in _ROUTES:  # noqa: B007 - the matching route is used after the loop
            m = pattern.match(path)
            if m:
                break
        else:
            raise ArmFault(404, "InvalidResourceType", f"The resource type could not be found for path {path}.")
        if route not in _POLLS and "api-version" not in query:
            raise ArmFault(
                400,
                "MissingApiVersionParameter",
                "The api-version query parameter (?api-version=) is required for all requests.",
            )
        if route not in _POLLS:
            self._hold_to_contract(method, path, query["api-version"], body, raw)
        if route in _UNTYPED_FAULTS:
            self._fault(method, None, rec)
        handler = getattr(self, f"_h_{route}")
        result: EmuResponse = handler(method, m.groupdict(), query, body, rec)
        return result

    def _hold_to_contract(self, method: str, path: str, api_version: str, body: Any, raw: bytes | None) -> None:
        """Azure's front door and the provider's deserializer: the api-version must exist for the
        path, the provider must be registered, the body must fit the operation's schema."""
        location = body.get("location", "") if isinstance(body, dict) else ""
        found = openapi.SPECS.lookup(method, path, api_version, str(location))
        self._check_registered([found.namespace])
        if found.operation is None:
            self.unvalidated_requests.append((method, path, api_version))
            return
        self.validated_requests += 1
        report = openapi.check_body(found.operation, body, raw)
        if found.operation.body is not None and body is not None:
            self.validated_bodies += 1
        self.read_only_sent.extend(f"{method} {path}: {p}" for p in report.read_only)

    def _check_registered(self, namespaces: list[str]) -> None:
        """Raise MissingSubscriptionRegistration for an unregistered namespace (subscription.py)."""

    def _check_policies(self, rtype: str, name: str, body: dict[str, Any], sub: str) -> None:
        """Raise RequestDisallowedByPolicy when a deny assignment refuses this write (subscription.py)."""

    def _group(self, sub: str, rg: str) -> dict[str, Any]:
        group = self.store.groups.get(gid(sub, rg))
        if group is None:
            raise ArmFault(404, "ResourceGroupNotFound", f"Resource group '{rg}' could not be found.")
        return group

    # ------------------------------------------------------------------ resource life cycle hooks

    def _on_provisioned(self, res: dict[str, Any]) -> None:
        """A create or update of `res` has just succeeded (providers override)."""

    def _on_removed(self, res: dict[str, Any]) -> None:
        """`res` has just left the store (providers override, e.g. to cascade)."""

    def _power_settled(self, res_id: str, power: str) -> None:
        """A VM's deallocate/start/powerOff operation ended (compute.py)."""

    def _remove_resource(self, res_id: str) -> None:
        res = self.store.resources.pop(res_id, None)
        if res is not None:
            self._on_removed(res)

    # ------------------------------------------------------------------ long-running operations

    def _new_op(
        self,
        kind: str,
        res_id: str,
        seconds: float,
        error: dict[str, str] | None = None,
        children: list[str] | None = None,
        **extra: Any,
    ) -> str:
        if error is None and kind in {"create", "update"}:
            error = self._late_error(kind, res_id)
        op_id = str(uuid.uuid4())
        now = self.clock.now()
        # The store's JSON sorts keys, so the order operations were made in is kept as a number.
        seq = 1 + max((op.get("seq", 0) for op in self.store.operations.values()), default=0)
        self.store.operations[op_id] = {
            "kind": kind, "resource": res_id, "start": now, "end": now + seconds, "status": "InProgress",
            "error": error, "children": children or [], "seq": seq, **extra,
        }  # fmt: skip
        if seconds <= 0:
            self._finish(op_id, self.store.operations[op_id])
        return op_id

    def _late_error(self, kind: str, res_id: str) -> dict[str, str] | None:
        """The error a write's operation ends with, decided once it is accepted: an injected "lro"
        fault that matches by location or zone (the resource's; plain ones are taken where the
        write is served). Providers extend it (compute: capacity)."""
        res = self.store.resources.get(res_id)
        if res is None:
            return None
        zone = (res.get("zones") or [None])[0]
        f = self.faults.take("PUT", res["type"], "lro", res["location"], zone, where_known=True, located_only=True)
        if f is None:
            return None
        fmt = {"size": res["properties"].get("hardwareProfile", {}).get("vmSize", ""), "location": res["location"]}
        return {
            "code": f.code,
            "message": f.message or DEFAULT_MESSAGES.get(f.code, f.code).format_map(FormatDefault(fmt)),
        }

    def _settle(self) -> None:
        """Finish every operation whose end time has passed, then forget old finished ones."""
        now = self.clock.now()
        for op_id, op in list(self.store.operations.items()):
            if op["status"] == "InProgress" and op["end"] <= now:
                self._finish(op_id, op)
        self._prune(now)

    def _prune(self, now: float) -> None:
        finished = sorted(
            (op["end"], op.get("seq", 0), op_id)
            for op_id, op in self.store.operations.items()
            if op["status"] != "InProgress"
        )
        excess = len(finished) - MAX_FINISHED_OPERATIONS
        for i, (end, _, op_id) in enumerate(finished):
            if i < excess or now - end >= FINISHED_OPERATION_TTL:
                del self.store.operations[op_id]

    def _finish(self, op_id: str, op: dict[str, Any]) -> None:
        op["status"] = "Failed" if op.get("error") else "Succeeded"
        kind, res_id = op["kind"], op["resource"]
        if kind in {"create", "update"}:
            state = "Failed" if op.get("error") else "Succeeded"
            for child in [res_id, *op.get("children", [])]:
                res = self.store.resources.get(child)
                if res is not None:
                    res["properties"]["provisioningState"] = state
            res = self.store.resources.get(res_id)
            if res is not None and state == "Succeeded":
                self._on_provisioned(res)
        elif kind == "delete":
            self._remove_resource(res_id)
        elif kind == "group-delete":
            prefix = res_id + "/"
            for child, _ in self.store.resources.under(prefix):
                self._remove_resource(child)
            for role, _ in self.store.roles.under(prefix):  # assignments at its scope
                del self.store.roles[role]
            self.store.groups.pop(res_id, None)
        elif kind == "vm-power":
            self._power_settled(res_id, str(op["power"]))

    def _op_headers(
        self, sub: str, rtype: str, location: str, op_id: str, query: dict[str, str], *, result: bool
    ) -> dict[str, str]:
        ns = rtype.split("/")[0]
        api = query.get("api-version", "")
        base_url = f"{HOST}/subscriptions/{sub}/providers/{ns}/locations/{location}"
        headers = {"Azure-AsyncOperation": f"{base_url}/operations/{op_id}?api-version={api}"}
        if result:
            headers["Location"] = f"{base_url}/operationresults/{op_id}?api-version={api}"
        return headers

    def _operation(self, op_id: str, rec: LoggedRequest) -> dict[str, Any]:
        rec.kind = "poll"
        op = self.store.operations.get(op_id)
        if op is None:  # never existed, or finished long enough ago to be forgotten
            raise ArmFault(404, "NotFound", "The operation was not found.")
        return op

    def _h_async_op(
        self, method: str, g: dict[str, str], query: dict[str, str], body: Any, rec: LoggedRequest
    ) -> EmuResponse:
        op = self._operation(g["op"], rec)
        rec.resource_id = op["resource"]
        payload: dict[str, Any] = {"name": g["op"], "status": op["status"], "startTime": now_iso(op["start"])}
        if op["status"] != "InProgress":
            payload["endTime"] = now_iso(op["end"])
        if op["status"] == "Failed" and op.get("error"):
            payload["error"] = op["error"]
        return self._ok(200, payload)

    def _h_op_result(
        self, method: str, g: dict[str, str], query: dict[str, str], body: Any, rec: LoggedRequest
    ) -> EmuResponse:
        op = self._operation(g["op"], rec)
        if op["status"] == "InProgress":
            return EmuResponse(202, {"Location": f"{HOST}{rec.path}?{query_string(query)}"})
        return EmuResponse(204, {})
