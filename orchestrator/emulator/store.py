"""What the emulator holds and answers: the resource types it knows, its JSON-able store, the
responses it gives and the log of requests it received, and the small helpers every provider uses."""

from __future__ import annotations

import copy
import json
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from datetime import UTC, datetime
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    from _collections_abc import dict_items, dict_keys, dict_values

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


def group_of(key: str) -> str | None:
    """The store key of the resource group a lower-cased id lies in (a group's own id: itself), or
    None for what lies outside any group (the subscription's role definitions, say)."""
    parts = key.split("/", 5)  # "", "subscriptions", sub, "resourcegroups", rg, the rest
    if len(parts) >= 5 and parts[1] == "subscriptions" and parts[3] == "resourcegroups" and parts[4]:
        return "/".join(parts[:5])
    return None


# Loads what a store holds under one resource group (its key), or under every group (None).
Loader = Callable[[str | None], None]


class ShardedDict(dict[str, dict[str, Any]]):
    """A store section keyed by lower-cased ARM id whose entries under a resource group may live on
    disk until first touched (persist.py): a key reads in its group, iterating reads in every group.

    Each run on the local target works in its own group, so a request reads and writes that group's
    few resources, not the whole subscription's (fifty runs at once made that the bottleneck)."""

    def __init__(self, data: dict[str, dict[str, Any]] | None = None, loader: Loader | None = None) -> None:
        super().__init__(data or {})
        self.loader = loader

    def _need(self, key: str) -> None:
        if self.loader is not None and (group := group_of(key)) is not None:
            self.loader(group)

    def _need_all(self) -> None:
        if self.loader is not None:
            self.loader(None)

    def under(self, prefix: str) -> list[tuple[str, dict[str, Any]]]:
        """The entries whose key starts with `prefix` (a group's key and "/", say), sorted by key,
        reading in only that group."""
        self._need(prefix)
        return sorted((k, val) for k, val in super().items() if k.startswith(prefix))

    def loaded(self) -> dict[str, dict[str, Any]]:
        """What is in memory now, reading nothing in."""
        return dict(super().items())

    def __getitem__(self, key: str) -> dict[str, Any]:
        self._need(key)
        return super().__getitem__(key)

    def __setitem__(self, key: str, value: dict[str, Any]) -> None:
        self._need(key)
        super().__setitem__(key, value)

    def __delitem__(self, key: str) -> None:
        self._need(key)
        super().__delitem__(key)

    def __contains__(self, key: object) -> bool:
        if isinstance(key, str):
            self._need(key)
        return super().__contains__(key)

    def get(self, key: str, default: dict[str, Any] | None = None) -> dict[str, Any] | None:  # type: ignore[override]
        self._need(key)
        return super().get(key, default)

    def pop(self, key: str, *default: Any) -> Any:
        self._need(key)
        return super().pop(key, *default)

    def setdefault(self, key: str, default: Any = None) -> Any:
        self._need(key)
        return super().setdefault(key, default)

    def __iter__(self) -> Iterator[str]:
        self._need_all()
        return super().__iter__()

    def __len__(self) -> int:
        self._need_all()
        return super().__len__()

    def keys(self) -> dict_keys[str, dict[str, Any]]:
        self._need_all()
        return super().keys()

    def values(self) -> dict_values[str, dict[str, Any]]:
        self._need_all()
        return super().values()

    def items(self) -> dict_items[str, dict[str, Any]]:
        self._need_all()
        return super().items()


def _sharded(data: dict[str, Any] | None = None) -> ShardedDict:
    return ShardedDict(data)


# The sections whose entries belong to resource groups (persist.py stores each group's apart).
SHARDED = ("groups", "resources", "roles")


@dataclass
class Store:
    """Everything the emulator knows, as JSON-able dicts keyed by lower-cased resource id."""

    groups: ShardedDict = field(default_factory=_sharded)
    resources: ShardedDict = field(default_factory=_sharded)
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
    roles: ShardedDict = field(default_factory=_sharded)

    def __post_init__(self) -> None:
        for name in SHARDED:
            section = getattr(self, name)
            if not isinstance(section, ShardedDict):
                setattr(self, name, ShardedDict(section))

    def to_json(self) -> str:
        plain = {k: dict(v) if isinstance(v, ShardedDict) else v for k, v in self.__dict__.items()}
        return json.dumps(plain, sort_keys=True)

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
