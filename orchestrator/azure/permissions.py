"""Which Azure RBAC actions each ARM request needs: the source of templates/azure-role.json.

Besides the action a request names (write, read, delete on its resource type), some requests need
others implicitly: a VM that creates its NIC and public IP inline writes those and joins the subnet,
the NSG and the IP; it writes its OS disk; deleting a group deletes everything in it.
"""

from __future__ import annotations

import re
from collections.abc import Iterable
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
_OPERATION = re.compile(r"/providers/([^/]+)/locations/[^/]+/(operations|operationresults)/", re.I)


def actions_for(method: str, path: str, body: Any = None) -> set[str]:
    method = method.upper()
    verb = {"PUT": "write", "PATCH": "write", "DELETE": "delete"}.get(method, "read")
    if m := _OPERATION.search(path):
        return {f"{m.group(1)}/locations/{m.group(2)}/read"}
    if re.search(r"/subscriptions/[^/]+/operationresults/", path, re.I):
        return {"Microsoft.Resources/subscriptions/operationresults/read"}
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
