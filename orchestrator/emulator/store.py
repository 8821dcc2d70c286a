"""What the emulator holds and answers: the resource types it knows, its JSON-able store, the
responses it gives and the log of requests it received, and the small helpers every provider uses."""

from __future__ import annotations

import copy
import json
from dataclasses import dataclass, field
from datetime import UTC, datetime
from typing import Any

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
    # The subscription (see subscription.py): its profile's name, quota limits that apply in every
    # region ("<family>" -> vCPUs; "cores" is the regional total, "lowPriorityCores" spot), resource
    # providers' registration ("<namespace lower>" -> {"namespace", "state", "until"}), SKU
    # restrictions and deny policy assignments.
    profile: str = "ready"
    family_quotas: dict[str, int] = field(default_factory=dict)
    providers: dict[str, dict[str, Any]] = field(default_factory=dict)
    restrictions: list[dict[str, Any]] = field(default_factory=list)
    policies: list[dict[str, Any]] = field(default_factory=list)
    permissions: list[dict[str, Any]] = field(default_factory=list)  # the caller's; empty: Owner (*)
    # Microsoft.Authorization role definitions and assignments, keyed by lower-cased id (a group's
    # go with it).
    roles: dict[str, dict[str, Any]] = field(default_factory=dict)

    def to_json(self) -> str:
        return json.dumps(self.__dict__, sort_keys=True)

    @classmethod
    def from_json(cls, text: str) -> Store:
        return cls(**json.loads(text))


def now_iso(t: float) -> str:
    return datetime.fromtimestamp(t, UTC).strftime("%Y-%m-%dT%H:%M:%S.%f0Z")


def gid(sub: str, rg: str) -> str:
    """A resource group's store key."""
    return f"/subscriptions/{sub}/resourcegroups/{rg}".lower()


def rid(sub: str, rg: str, rtype: str, name: str) -> str:
    """A typed resource's ARM id, as ARM spells it (the store key is its lower-cased form)."""
    return f"/subscriptions/{sub}/resourceGroups/{rg}/providers/{rtype}/{name}"


def base(res_id: str, name: str, rtype: str, location: str, body: dict[str, Any]) -> dict[str, Any]:
    """A new resource record: what every type shares, with empty properties."""
    return {
        "id": res_id,
        "name": name,
        "type": rtype,
        "location": location,
        "tags": dict(body.get("tags") or {}),
        "properties": {},
    }


def public(res: dict[str, Any]) -> dict[str, Any]:
    """A resource as ARM returns it: without the emulator's private `_` keys."""
    return {k: copy.deepcopy(val) for k, val in res.items() if not k.startswith("_")}


def query_string(query: dict[str, str]) -> str:
    return "&".join(f"{k}={val}" for k, val in query.items())


class FormatDefault(dict[str, Any]):
    """format_map arguments that leave unknown {fields} as they are."""

    def __missing__(self, key: str) -> str:
        return "{" + key + "}"
