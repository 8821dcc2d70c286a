"""Microsoft.Resources: resource groups (create is synchronous, delete is 202 + Location polled until
200), listing groups by tag, and listing a group's resources."""

from __future__ import annotations

import re
from typing import Any

from orchestrator.emulator import validation as v
from orchestrator.emulator.core import ArmCore
from orchestrator.emulator.faults import DEFAULT_MESSAGES
from orchestrator.emulator.store import HOST, T_RG, T_VM, EmuResponse, LoggedRequest, gid, query_string
from orchestrator.emulator.validation import ArmFault

_FORCE_DELETABLE = {"microsoft.compute/virtualmachines", "microsoft.compute/virtualmachinescalesets"}
_TAG_FILTER = re.compile(r"^\s*tagName\s+eq\s+'([^']*)'(?:\s+and\s+tagValue\s+eq\s+'([^']*)')?\s*$", re.I)


class ResourcesRP(ArmCore):
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
        for key, group in sorted(self.store.groups.items()):
            if not key.startswith(prefix):
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
        key = gid(sub, rg)
        rec.resource_type, rec.resource_id = T_RG, key
        existing = self.store.groups.get(key)
        if method in {"GET", "HEAD"}:
            rec.kind = "read"
            self._fault(method, T_RG, rec)
            if existing is None:
                if method == "HEAD":
                    return EmuResponse(404, {})
                raise ArmFault(404, "ResourceGroupNotFound", f"Resource group '{rg}' could not be found.")
            return EmuResponse(204, {}) if method == "HEAD" else self._ok(200, existing)
        if method == "PUT":
            return self._put_group(sub, rg, body, existing, rec)
        if method == "PATCH":
            rec.kind = "update"
            if existing is None:
                raise ArmFault(404, "ResourceGroupNotFound", f"Resource group '{rg}' could not be found.")
            if isinstance(body, dict) and isinstance(body.get("tags"), dict):
                existing["tags"] = dict(body["tags"])
            return self._ok(200, existing)
        if method == "DELETE":
            return self._delete_group(sub, rg, query, existing, rec)
        raise ArmFault(405, "MethodNotAllowed", "The requested method is not allowed.")

    def _put_group(
        self, sub: str, rg: str, body: Any, existing: dict[str, Any] | None, rec: LoggedRequest
    ) -> EmuResponse:
        rec.kind = "update" if existing else "create"
        v.check_name(T_RG, rg)
        location = v.check_common(body, T_RG)
        if existing is not None and existing["properties"]["provisioningState"] == "Deleting":
            raise ArmFault(
                409,
                "ResourceGroupBeingDeleted",
                DEFAULT_MESSAGES["ResourceGroupBeingDeleted"].format(group=rg),
            )
        self._fault("PUT", T_RG, rec, group=rg, location=location)
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
        self.store.groups[gid(sub, rg)] = group
        # Resource group writes are synchronous in ARM, but they still take about a second.
        seconds = self.profile.create_seconds(T_RG)
        if seconds:
            self._lock.release()
            try:
                self.clock.sleep(seconds)
            finally:
                self._lock.acquire()
        return self._ok(200 if existing else 201, group)

    def _delete_group(
        self, sub: str, rg: str, query: dict[str, str], existing: dict[str, Any] | None, rec: LoggedRequest
    ) -> EmuResponse:
        rec.kind = "delete"
        self._fault("DELETE", T_RG, rec, group=rg)
        if existing is None:
            raise ArmFault(404, "ResourceGroupNotFound", f"Resource group '{rg}' could not be found.")
        forced = {t.strip().lower() for t in query.get("forceDeletionTypes", "").split(",") if t.strip()}
        if forced - _FORCE_DELETABLE:
            raise ArmFault(
                400,
                "InvalidForceDeletionTypes",
                "forceDeletionTypes may only name "
                "Microsoft.Compute/virtualMachines and Microsoft.Compute/virtualMachineScaleSets.",
            )
        key = gid(sub, rg)
        has_vms = any(r["type"] == T_VM for _, r in self.store.resources.under(key + "/"))
        op_id = existing.get("_delete_op")
        if existing["properties"]["provisioningState"] != "Deleting" or op_id is None:
            existing["properties"]["provisioningState"] = "Deleting"
            seconds = self.profile.group_delete_seconds(forced=bool(forced) or not has_vms)
            op_id = self._new_op("group-delete", key, seconds)
            if key in self.store.groups:
                existing["_delete_op"] = op_id
        api = query.get("api-version", "")
        location = f"{HOST}/subscriptions/{sub}/operationresults/{op_id}?api-version={api}"
        return EmuResponse(202, {"Location": location, "Retry-After": "15"})

    def _h_rg_op_result(
        self, method: str, g: dict[str, str], query: dict[str, str], body: Any, rec: LoggedRequest
    ) -> EmuResponse:
        op = self._operation(g["op"], rec)
        rec.resource_type = T_RG
        if op["status"] == "InProgress":
            return EmuResponse(202, {"Location": f"{HOST}{rec.path}?{query_string(query)}", "Retry-After": "15"})
        return EmuResponse(200, {})

    def _h_rg_resources(
        self, method: str, g: dict[str, str], query: dict[str, str], body: Any, rec: LoggedRequest
    ) -> EmuResponse:
        rec.kind, rec.resource_type = "list", "Microsoft.Resources/resources"
        self._group(g["sub"], g["rg"])
        prefix = gid(g["sub"], g["rg"]) + "/"
        out = [
            {k: r[k] for k in ("id", "name", "type", "location", "tags") if k in r}
            for _, r in self.store.resources.under(prefix)
        ]
        return self._ok(200, {"value": out})


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
