"""Typed resources (`.../providers/<namespace>/<type>/<name>`), whatever their provider: list, GET,
DELETE as an LRO, and PUT handed to the provider's writer and then run as an LRO (or synchronously,
where the provider writes synchronously). References between resources are checked here too.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any, NamedTuple

from orchestrator.emulator import validation as v
from orchestrator.emulator.core import ArmCore
from orchestrator.emulator.faults import DEFAULT_MESSAGES
from orchestrator.emulator.store import (
    SUPPORTED_TYPES,
    EmuResponse,
    FormatDefault,
    LoggedRequest,
    gid,
    public,
    rid,
)
from orchestrator.emulator.validation import ArmFault


class Write(NamedTuple):
    """One PUT of a typed resource, as the writers receive it."""

    sub: str
    rg: str
    rid: str
    name: str
    location: str
    body: dict[str, Any]
    existing: dict[str, Any] | None
    rec: LoggedRequest


class Written(NamedTuple):
    """What a writer made: the resource, the children it creates with it (inline NICs, public IPs,
    disks), and how long the operation takes; None for a write the provider does synchronously."""

    resource: dict[str, Any]
    children: list[dict[str, Any]]
    seconds: float | None


Writer = Callable[[Write], Written]


class TypedResources(ArmCore):
    def _writers(self) -> dict[str, Writer]:
        """The PUT handler of each type that can be written directly (see arm.Emulator)."""
        raise NotImplementedError

    def _check_deletable(self, res: dict[str, Any]) -> None:
        """Raise the provider's error when `res` may not be deleted now (providers override)."""

    def _resolve_type(self, ns: str, type_: str) -> str:
        for t in SUPPORTED_TYPES:
            if t.lower() == f"{ns}/{type_}".lower():
                return t
        raise ArmFault(
            404,
            "InvalidResourceType",
            f"The resource type '{type_}' could not be found in the namespace '{ns}'.",
        )

    def _h_typed_list(
        self, method: str, g: dict[str, str], query: dict[str, str], body: Any, rec: LoggedRequest
    ) -> EmuResponse:
        rtype = self._resolve_type(g["ns"], g["type"])
        rec.kind, rec.resource_type = "list", rtype
        self._group(g["sub"], g["rg"])
        self._fault(method, rtype, rec)
        prefix = gid(g["sub"], g["rg"]) + "/"
        out = [public(r) for _, r in self.store.resources.under(prefix) if r["type"] == rtype]
        return self._ok(200, {"value": out})

    def _read_view(self, res: dict[str, Any], query: dict[str, str]) -> dict[str, Any]:
        """A resource as a GET returns it (providers add expansions, such as a VM's instanceView)."""
        return public(res)

    def _h_typed(
        self, method: str, g: dict[str, str], query: dict[str, str], body: Any, rec: LoggedRequest
    ) -> EmuResponse:
        rtype = self._resolve_type(g["ns"], g["type"])
        sub, rg, name = g["sub"], g["rg"], g["name"]
        res_id = rid(sub, rg, rtype, name)
        key = res_id.lower()
        rec.resource_type, rec.resource_id = rtype, res_id
        existing = self.store.resources.get(key)
        if method == "GET":
            rec.kind = "read"
            self._fault(method, rtype, rec)
            if existing is None:
                self._group(sub, rg)  # no group: 404 ResourceGroupNotFound, as ARM answers first
                raise ArmFault(
                    404,
                    "ResourceNotFound",
                    f"The Resource '{rtype}/{name}' under resource group '{rg}' was not found.",
                )
            return self._ok(200, self._read_view(existing, query))
        if method == "DELETE":
            rec.kind = "delete"
            self._fault(method, rtype, rec)
            if existing is None:
                return EmuResponse(204, {})
            self._check_deletable(existing)
            existing["properties"]["provisioningState"] = "Deleting"
            op_id = self._new_op("delete", key, self.profile.delete_seconds(rtype))
            return EmuResponse(202, self._op_headers(sub, rtype, existing["location"], op_id, query, result=True))
        if method == "PUT":
            return self._put(Write(sub, rg, res_id, name, "", body, existing, rec), rtype, query)
        raise ArmFault(405, "MethodNotAllowed", "The requested method is not allowed.")

    def _put(self, w: Write, rtype: str, query: dict[str, str]) -> EmuResponse:
        sub, rg, res_id, name, _, body, existing, rec = w
        group = self._group(sub, rg)
        if group["properties"]["provisioningState"] == "Deleting":
            raise ArmFault(
                409,
                "ResourceGroupBeingDeleted",
                DEFAULT_MESSAGES["ResourceGroupBeingDeleted"].format(group=rg),
            )
        v.check_name(rtype, name)
        location = v.check_common(body, rtype)
        self._check_policies(rtype, name, body, sub)
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
        writer = self._writers().get(rtype)
        if writer is None:
            raise ArmFault(405, "MethodNotAllowed", f"Creating {rtype} directly is not supported by the emulator.")
        resource, children, seconds = writer(w._replace(location=location))
        key = res_id.lower()
        if seconds is None:  # a synchronous write: no operation to poll
            resource["properties"]["provisioningState"] = "Succeeded"
            self.store.resources[key] = resource
            return self._ok(200 if existing else 201, public(resource))
        lro = self.faults.take("PUT", rtype, "lro")
        error = None
        if lro is not None:
            fmt = {
                "size": body.get("properties", {}).get("hardwareProfile", {}).get("vmSize", ""),
                "location": location,
            }
            error = {
                "code": lro.code,
                "message": lro.message or DEFAULT_MESSAGES.get(lro.code, lro.code).format_map(FormatDefault(fmt)),
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
        snapshot = public(resource)
        snapshot["properties"]["provisioningState"] = state
        return self._ok(200 if existing else 201, snapshot, headers)

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
