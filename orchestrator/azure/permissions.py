"""Which Azure RBAC actions each ARM request needs: the source of templates/azure-role.json.

Besides the action a request names (write, read, delete on its resource type), some requests need
others implicitly: a VM that creates its NIC and public IP inline writes those and joins the subnet,
the NSG and the IP; it writes its OS disk; deleting a group deletes everything in it.
"""

from __future__ import annotations

import json
import re
from collections.abc import Iterable
from pathlib import Path
from typing import Any

RG = "Microsoft.Resources/subscriptions/resourceGroups"
# What this tool ever puts in a group; a group delete needs delete on each.
CREATED_TYPES = (
    "Microsoft.Network/virtualNetworks",
    "Microsoft.Network/networkSecurityGroups",
    "Microsoft.Network/networkInterfaces",
    "Microsoft.Network/publicIPAddresses",
    "Microsoft.Compute/virtualMachines",
    "Microsoft.Compute/disks",
    "Microsoft.DevTestLab/schedules",
)
_CANONICAL = {t.lower(): t for t in (*CREATED_TYPES, "Microsoft.Network/virtualNetworks/subnets")}
_TYPED = re.compile(r"/resourcegroups/[^/]+/providers/([^/]+)/([^/]+)(?:/([^/]+))?(?:/(subnets)/[^/]+)?$", re.I)
# A VM's actions (POST .../virtualMachines/{vm}/start) and its instance view (a read of the VM).
_VM_ACTION = re.compile(r"/resourcegroups/[^/]+/providers/microsoft\.compute/virtualmachines/[^/]+/([^/]+)/?$", re.I)
_VM_ACTIONS = {"start": "start", "deallocate": "deallocate", "poweroff": "powerOff", "restart": "restart"}
_ROLE_DEFINITIONS = re.compile(r"/providers/microsoft\.authorization/roledefinitions(/[^/]+)?/?$", re.I)
_OPERATION = re.compile(r"/providers/([^/]+)/locations/[^/]+/(operations|operationresults)/", re.I)
# The preflight's requests (orchestrator/azure/preflight.py), all at subscription scope: the run's group
# does not exist yet. Actions as Microsoft's resource provider operations list names them.
_SUB = r"^/subscriptions/[^/]+"
_PREFLIGHT: tuple[tuple[str, re.Pattern[str], str], ...] = (
    ("POST", re.compile(_SUB + r"/providers/([^/]+)/register/?$", re.I), "{0}/register/action"),
    ("GET", re.compile(_SUB + r"/providers/[^/]+/?$", re.I), "Microsoft.Resources/subscriptions/providers/read"),
    (
        "GET",
        re.compile(_SUB + r"/providers/microsoft\.compute/locations/[^/]+/usages/?$", re.I),
        "Microsoft.Compute/locations/usages/read",
    ),
    ("GET", re.compile(_SUB + r"/providers/microsoft\.compute/skus/?$", re.I), "Microsoft.Compute/skus/read"),
    (
        "GET",
        re.compile(
            _SUB + r"/providers/microsoft\.compute/locations/[^/]+/publishers/[^/]+/artifacttypes/vmimage/offers/[^/]+"
            r"/skus/[^/]+/versions(/[^/]+)?/?$",
            re.I,
        ),
        "Microsoft.Compute/locations/publishers/artifacttypes/offers/skus/versions/read",
    ),
    (
        "GET",
        re.compile(_SUB + r"(/resourcegroups/[^/]+)?/providers/microsoft\.authorization/permissions/?$", re.I),
        "Microsoft.Authorization/permissions/read",
    ),
    (
        "POST",  # a POST, but Azure names it a read: it only evaluates the body against policy
        re.compile(
            _SUB + r"(/resourcegroups/[^/]+)?/providers/microsoft\.policyinsights/checkpolicyrestrictions/?$", re.I
        ),
        "Microsoft.PolicyInsights/checkPolicyRestrictions/read",
    ),
)
_NAMESPACES = {ns.lower(): ns for ns in ("Microsoft.Compute", "Microsoft.Network", "Microsoft.DevTestLab")}
# What only the preflight sends (its reads, and registering the providers a new subscription lacks): a
# run can do without them, so a role that lacks one gets a warning, not a refusal.
PREFLIGHT_ACTIONS = frozenset(
    {a for _, _, a in _PREFLIGHT if "{0}" not in a} | {f"{ns}/register/action" for ns in _NAMESPACES.values()}
)


def actions_for(method: str, path: str, body: Any = None) -> set[str]:
    method = method.upper()
    verb = {"PUT": "write", "PATCH": "write", "DELETE": "delete"}.get(method, "read")
    if m := _OPERATION.search(path):
        return {f"{m.group(1)}/locations/{m.group(2)}/read"}
    if re.search(r"/subscriptions/[^/]+/operationresults/", path, re.I):
        return {"Microsoft.Resources/subscriptions/operationresults/read"}
    for wanted, pattern, action in _PREFLIGHT:
        if method == wanted and (m := pattern.search(path)):
            namespace = m.group(1) if "{0}" in action else ""
            return {action.format(_NAMESPACES.get(namespace.lower(), namespace))}
    if m := _VM_ACTION.search(path):
        action = m.group(1).lower()
        if action == "instanceview":
            return {"Microsoft.Compute/virtualMachines/read"}
        return {f"Microsoft.Compute/virtualMachines/{_VM_ACTIONS.get(action, action)}/action"}
    if _ROLE_DEFINITIONS.search(path):
        return {f"Microsoft.Authorization/roleDefinitions/{verb}"}
    if re.search(r"/resourcegroups/[^/]+/resources$", path, re.I):
        return {f"{RG}/resources/read"}
    if m := _TYPED.search(path):
        rtype = _CANONICAL.get(f"{m.group(1)}/{m.group(2)}".lower(), f"{m.group(1)}/{m.group(2)}")
        if m.group(4):
            rtype = f"{rtype}/subnets"
        actions = {f"{rtype}/{verb}"}
        if rtype == "Microsoft.Compute/virtualMachines" and method == "PUT":
            actions |= _vm_implied(body)
        return actions
    if re.search(r"/resourcegroups(/[^/]+)?/?$", path, re.I):
        actions = {f"{RG}/{verb}"}
        if method == "DELETE":
            actions |= {f"{t}/delete" for t in CREATED_TYPES}
        return actions
    return set()


def _vm_implied(body: Any) -> set[str]:
    props = (body or {}).get("properties", {})
    implied = {"Microsoft.Compute/disks/write"}
    for cfg in props.get("networkProfile", {}).get("networkInterfaceConfigurations", []):
        implied |= {"Microsoft.Network/networkInterfaces/write", "Microsoft.Network/networkInterfaces/join/action"}
        if cfg.get("properties", {}).get("networkSecurityGroup"):
            implied.add("Microsoft.Network/networkSecurityGroups/join/action")
        for ipc in cfg.get("properties", {}).get("ipConfigurations", []):
            implied.add("Microsoft.Network/virtualNetworks/subnets/join/action")
            if ipc.get("properties", {}).get("publicIPAddressConfiguration"):
                implied |= {
                    "Microsoft.Network/publicIPAddresses/write",
                    "Microsoft.Network/publicIPAddresses/join/action",
                }
    return implied


def required_actions(requests: Iterable[Any]) -> set[str]:
    """All actions a sequence of logged requests needed (objects with method, path and body)."""
    out: set[str] = set()
    for r in requests:
        out |= actions_for(r.method, r.path, r.body)
    return out


# ------------------------------------------------------------------ the role and the caller's rights

ROLE_FILE = Path(__file__).resolve().parents[2] / "templates" / "azure-role.json"


def role_actions(path: Path = ROLE_FILE) -> list[str]:
    """The actions templates/azure-role.json grants: what a run (and its preflight) needs."""
    return [str(a) for a in json.loads(path.read_text())["Actions"]]


def _pattern(action: str) -> re.Pattern[str]:
    return re.compile("^" + ".*".join(re.escape(part) for part in action.split("*")) + "$", re.I)


def allowed(action: str, permissions: Iterable[dict[str, Any]]) -> bool:
    """Whether Azure RBAC allows `action` given the caller's permissions (Permissions API entries).

    Each entry is one role's {actions, notActions}: an action is allowed when some entry's actions
    match it and that same entry's notActions do not (notActions subtract from their own role only; a
    deny needs a deny assignment). Matching is case-insensitive and `*` matches any run of characters
    (`*`, `*/read`, `Microsoft.Compute/*`, `Microsoft.Network/*/join/action`).
    """
    for entry in permissions:
        grants = entry.get("actions") or []
        denies = entry.get("notActions") or []
        if any(_pattern(a).match(action) for a in grants) and not any(_pattern(n).match(action) for n in denies):
            return True
    return False
