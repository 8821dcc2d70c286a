"""Microsoft.Authorization: role definitions and role assignments, and the managed identities of VMs.

A VM created with `identity: {type: SystemAssigned}` gets a principal (compute.py). Its metadata
service (the local VM host) hands it a token made by `identity_token`; a request carrying such a
token is allowed only what the principal's role assignments grant at a scope that contains the
request's path, as ARM decides it: anything else is 403 AuthorizationFailed. The tool's own
credential stays the subscription's Owner (its rights are what `set_permissions` lists).

Role definitions live at a subscription or group scope and are found by `roleName` with
`$filter=roleName eq '...'`; a custom role's `assignableScopes` must contain the scope it is
assigned at. Assignments at a group's scope go with the group.
"""

from __future__ import annotations

import hashlib
import hmac
import re
import uuid
from typing import Any

from orchestrator.emulator.core import ArmCore
from orchestrator.emulator.store import T_VM, EmuResponse, LoggedRequest
from orchestrator.emulator.validation import ArmFault

T_ROLE_DEF = "Microsoft.Authorization/roleDefinitions"
T_ROLE_ASSIGNMENT = "Microsoft.Authorization/roleAssignments"
TOKEN_PREFIX = "orch-mi."
_ACTION_PATH = re.compile(
    r"^(?P<scope>/subscriptions/[^/]+/resourcegroups/[^/]+/providers/(?P<ns>[^/]+)/(?P<type>[^/]+)/[^/]+)"
    r"(?:/(?P<action>[^/]+))?/?$",
    re.I,
)
_GROUP_PATH = re.compile(r"^(?P<scope>/subscriptions/[^/]+/resourcegroups/[^/]+)/?$", re.I)
_POLL_PATH = re.compile(
    r"^/subscriptions/[^/]+/providers/(?P<ns>[^/]+)/locations/[^/]+/(operations|operationresults)/", re.I
)


def _scope_of(g: dict[str, str]) -> str:
    scope = f"/subscriptions/{g['sub']}"
    return scope + (f"/resourceGroups/{g['rg']}" if g.get("rg") else "")


def _matches(pattern: str, action: str) -> bool:
    regex = "^" + ".*".join(re.escape(p) for p in pattern.split("*")) + "$"
    return re.match(regex, action, re.I) is not None


def request_action(method: str, path: str) -> tuple[str, str]:
    """(the RBAC action a request needs, the scope it acts on), for what a VM's identity may ask."""
    method = method.upper()
    verb = {"PUT": "write", "PATCH": "write", "DELETE": "delete"}.get(method, "read")
    if m := _POLL_PATH.match(path):
        return f"{m['ns']}/locations/operations/read", path
    if m := _GROUP_PATH.match(path):
        return f"Microsoft.Resources/subscriptions/resourceGroups/{verb}", m["scope"]
    if m := _ACTION_PATH.match(path):
        rtype = f"{m['ns']}/{m['type']}"
        if m["action"]:
            if m["action"].lower() == "instanceview":
                return f"{rtype}/read", m["scope"]
            return f"{rtype}/{m['action']}/action", m["scope"]
        return f"{rtype}/{verb}", m["scope"]
    return f"unknown/{verb}", path


class AuthorizationRP(ArmCore):
    # ------------------------------------------------------------------ helpers for targets and tests

    def define_role(self, role: dict[str, Any], sub: str, role_id: str | None = None) -> str:
        """An administrator's `az role definition create --role-definition FILE` (the az JSON shape:
        Name, Actions, NotActions, AssignableScopes with {subscriptionId}); returns its id."""
        name = role_id or str(uuid.uuid5(uuid.NAMESPACE_URL, f"{sub}/{role['Name']}"))
        rid = f"/subscriptions/{sub}/providers/Microsoft.Authorization/roleDefinitions/{name}"
        scopes = [str(s).replace("{subscriptionId}", sub) for s in role.get("AssignableScopes") or []]
        with self._locked():
            self.store.roles[rid.lower()] = {
                "id": rid,
                "name": name,
                "type": T_ROLE_DEF,
                "properties": {
                    "roleName": role["Name"],
                    "description": role.get("Description", ""),
                    "type": "CustomRole",
                    "permissions": [
                        {
                            "actions": list(role.get("Actions") or []),
                            "notActions": list(role.get("NotActions") or []),
                            "dataActions": [],
                            "notDataActions": [],
                        }
                    ],
                    "assignableScopes": scopes or [f"/subscriptions/{sub}"],
                },
            }
        return rid

    def identity_token(self, vm_id: str) -> tuple[str, str] | None:
        """(token, principalId) for the VM's system-assigned identity; None when it has none."""
        with self._locked():
            vm = self.store.resources.get(vm_id.lower())
            if vm is None or not (vm.get("identity") or {}).get("principalId"):
                return None
            principal = str(vm["identity"]["principalId"])
            return TOKEN_PREFIX + principal + "." + _sign(str(vm["_identityKey"]), principal), principal

    # ------------------------------------------------------------------ the managed identity's requests

    def _principal_of(self, token: str) -> str | None:
        if not token.startswith(TOKEN_PREFIX):
            return None
        principal, _, signature = token[len(TOKEN_PREFIX) :].partition(".")
        for res in self.store.resources.values():
            identity = res.get("identity") or {}
            if res["type"] == T_VM and identity.get("principalId") == principal:
                return principal if hmac.compare_digest(_sign(str(res["_identityKey"]), principal), signature) else None
        return None  # its VM was deleted: the principal went with it

    def _managed_identity(self, token: str) -> bool:
        if not token.startswith(TOKEN_PREFIX):
            return False
        if self._principal_of(token) is None:
            raise ArmFault(401, "InvalidAuthenticationToken", "The access token is invalid.")
        return True

    def _authorize(self, method: str, path: str, token: str) -> None:
        principal = self._principal_of(token)
        if principal is None:
            return  # the tool's own credential
        action, scope = request_action(method, path)
        if not self._granted(principal, action, scope):
            raise ArmFault(
                403,
                "AuthorizationFailed",
                f"The client '{principal}' with object id '{principal}' does not have authorization to perform "
                f"action '{action}' over scope '{scope}' or the scope is invalid. If access was recently granted, "
                "please refresh your credentials.",
            )

    def _granted(self, principal: str, action: str, scope: str) -> bool:
        for assignment in self.store.roles.values():
            props = assignment.get("properties") or {}
            if assignment["type"] != T_ROLE_ASSIGNMENT or props.get("principalId") != principal:
                continue
            at = str(props.get("scope", "")).lower().rstrip("/")
            if not (scope.lower() == at or scope.lower().startswith(at + "/")):
                continue
            role = self.store.roles.get(str(props.get("roleDefinitionId", "")).lower())
            for perm in ((role or {}).get("properties") or {}).get("permissions") or []:
                if any(_matches(a, action) for a in perm.get("actions") or []) and not any(
                    _matches(n, action) for n in perm.get("notActions") or []
                ):
                    return True
        return False

    def _caller_may(self, action: str) -> bool:
        """The tool's own credential: what `set_permissions` lists (nothing listed: Owner)."""
        if not self.store.permissions:
            return True
        return any(
            any(_matches(a, action) for a in p.get("actions") or [])
            and not any(_matches(n, action) for n in p.get("notActions") or [])
            for p in self.store.permissions
        )

    def _get_or_delete(
        self, method: str, rid: str, existing: dict[str, Any] | None, missing: ArmFault, rec: LoggedRequest
    ) -> EmuResponse | None:
        """GET (404 `missing` when absent) and DELETE (204 when absent, as Authorization answers) of a
        role definition or assignment; None for other methods."""
        if method == "GET":
            if existing is None:
                raise missing
            return self._ok(200, existing)
        if method == "DELETE":
            rec.kind = "delete"
            if existing is None:
                return EmuResponse(204, {})
            del self.store.roles[rid.lower()]
            return self._ok(200, existing)
        return None

    # ------------------------------------------------------------------ role definitions

    def _h_role_definitions(
        self, method: str, g: dict[str, str], query: dict[str, str], body: Any, rec: LoggedRequest
    ) -> EmuResponse:
        rec.kind, rec.resource_type = "list", T_ROLE_DEF
        wanted = None
        if m := re.match(r"^\s*roleName\s+eq\s+'(?P<n>[^']*)'\s*$", query.get("$filter", ""), re.I):
            wanted = m["n"]
        elif query.get("$filter"):
            raise ArmFault(400, "InvalidFilterInQueryString", f"The filter '{query['$filter']}' is not supported.")
        scope = _scope_of(g).lower()
        out = []
        for role in self.store.roles.values():
            props = role["properties"]
            if role["type"] != T_ROLE_DEF or (wanted is not None and props["roleName"] != wanted):
                continue
            assignable = [s.lower() for s in props.get("assignableScopes") or []]
            if any(scope == s or scope.startswith(s + "/") for s in assignable):
                out.append(role)
        return self._ok(200, {"value": out})

    def _h_role_definition(
        self, method: str, g: dict[str, str], query: dict[str, str], body: Any, rec: LoggedRequest
    ) -> EmuResponse:
        rid = f"/subscriptions/{g['sub']}/providers/Microsoft.Authorization/roleDefinitions/{g['name']}"
        rec.resource_type, rec.resource_id = T_ROLE_DEF, rid
        existing = self.store.roles.get(rid.lower())
        missing = ArmFault(404, "RoleDefinitionDoesNotExist", f"The specified role definition with ID '{g['name']}' "
                           "does not exist.")  # fmt: skip
        done = self._get_or_delete(method, rid, existing, missing, rec)
        if done is not None:
            return done
        if method == "PUT":
            rec.kind = "update" if existing else "create"
            props = (body or {}).get("properties") or {}
            if not props.get("roleName") or not props.get("permissions"):
                raise ArmFault(400, "InvalidRoleDefinition", "A role definition needs roleName and permissions.")
            role = {"id": rid, "name": g["name"], "type": T_ROLE_DEF, "properties": {"type": "CustomRole", **props}}
            self.store.roles[rid.lower()] = role
            return self._ok(201 if existing is None else 200, role)
        raise ArmFault(405, "MethodNotAllowed", "The requested method is not allowed.")

    # ------------------------------------------------------------------ role assignments

    def _h_role_assignments(
        self, method: str, g: dict[str, str], query: dict[str, str], body: Any, rec: LoggedRequest
    ) -> EmuResponse:
        rec.kind, rec.resource_type = "list", T_ROLE_ASSIGNMENT
        scope = _scope_of(g).lower()
        out = [
            r
            for r in self.store.roles.values()
            if r["type"] == T_ROLE_ASSIGNMENT and str(r["properties"]["scope"]).lower().startswith(scope)
        ]
        return self._ok(200, {"value": out})

    def _h_role_assignment(
        self, method: str, g: dict[str, str], query: dict[str, str], body: Any, rec: LoggedRequest
    ) -> EmuResponse:
        scope = _scope_of(g)
        rid = f"{scope}/providers/Microsoft.Authorization/roleAssignments/{g['name']}"
        rec.resource_type, rec.resource_id = T_ROLE_ASSIGNMENT, rid
        existing = self.store.roles.get(rid.lower())
        if g.get("rg"):
            self._group(g["sub"], g["rg"])
        missing = ArmFault(404, "RoleAssignmentNotFound", f"The role assignment '{g['name']}' is not found.")
        done = self._get_or_delete(method, rid, existing, missing, rec)
        if done is not None:
            return done
        if method != "PUT":
            raise ArmFault(405, "MethodNotAllowed", "The requested method is not allowed.")
        rec.kind = "create"
        self._fault("PUT", T_ROLE_ASSIGNMENT, rec)
        if not self._caller_may("Microsoft.Authorization/roleAssignments/write"):
            raise ArmFault(
                403,
                "AuthorizationFailed",
                "The client does not have authorization to perform action "
                f"'Microsoft.Authorization/roleAssignments/write' over scope '{rid}' or the scope is invalid. "
                "If access was recently granted, please refresh your credentials.",
            )
        props = (body or {}).get("properties") or {}
        role_id, principal = str(props.get("roleDefinitionId", "")), str(props.get("principalId", ""))
        if not role_id or not principal:
            raise ArmFault(400, "InvalidRoleAssignmentRequest", "roleDefinitionId and principalId are required.")
        try:
            uuid.UUID(g["name"])
        except ValueError:
            raise ArmFault(400, "InvalidRoleAssignmentId", f"The role assignment ID '{g['name']}' is not valid. "
                           "The role assignment ID must be a GUID.") from None  # fmt: skip
        role = self.store.roles.get(role_id.lower())
        if role is None:
            raise ArmFault(400, "RoleDefinitionDoesNotExist", f"The specified role definition with ID "
                           f"'{role_id.rsplit('/', 1)[-1]}' does not exist.")  # fmt: skip
        assignable = [s.lower() for s in role["properties"].get("assignableScopes") or []]
        if not any(scope.lower() == s or scope.lower().startswith(s + "/") for s in assignable):
            raise ArmFault(403, "AuthorizationFailed", f"The role definition '{role['properties']['roleName']}' "
                           f"is not assignable at scope '{scope}'.")  # fmt: skip
        if not any((r.get("identity") or {}).get("principalId") == principal for r in self.store.resources.values()):
            raise ArmFault(400, "PrincipalNotFound", f"Principal {principal.replace('-', '')} does not exist in the "
                           "directory.")  # fmt: skip
        for other in self.store.roles.values():
            p = other.get("properties") or {}
            if (
                other["type"] == T_ROLE_ASSIGNMENT
                and other["id"].lower() != rid.lower()
                and p.get("principalId") == principal
                and str(p.get("roleDefinitionId", "")).lower() == role_id.lower()
                and str(p.get("scope", "")).lower() == scope.lower()
            ):
                raise ArmFault(409, "RoleAssignmentExists", "The role assignment already exists.")
        assignment = {
            "id": rid,
            "name": g["name"],
            "type": T_ROLE_ASSIGNMENT,
            "properties": {
                "roleDefinitionId": role["id"],
                "principalId": principal,
                "principalType": props.get("principalType", "ServicePrincipal"),
                "scope": scope,
            },
        }
        self.store.roles[rid.lower()] = assignment
        return self._ok(201, assignment)


def _sign(key: str, principal: str) -> str:
    return hmac.new(key.encode(), principal.encode(), hashlib.sha256).hexdigest()
