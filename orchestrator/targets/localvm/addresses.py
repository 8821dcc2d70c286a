"""Loopback addresses for local VMs: each run gets its own block, so runs never share an address.

A node's private address in the VNet (10.42.0.4) maps into its run's block (127.B.C.4). All of
127.0.0.0/8 reaches this machine's `lo`, so nothing is configured and no packet leaves loopback.
Blocks are handed out per resource group under a lock, in one table for the whole machine (per
user: `$ORCH_LOCAL_ADDRESSES` or `/tmp/orchestrator-<uid>/addresses.json`), so two state
directories (two users' checkouts, parallel test workers) never hand out the same block. A block is
taken back when its group has no VM folder left in the state directory that took it.
"""

from __future__ import annotations

import contextlib
import fcntl
import ipaddress
import json
import os
from dataclasses import dataclass
from pathlib import Path

FIRST_BLOCK = 16 * 256  # 127.16.0.0/24: clear of 127.0.0.x, which other local services use
BLOCKS = 200 * 256


def table_path() -> Path:
    override = os.environ.get("ORCH_LOCAL_ADDRESSES")
    return Path(override) if override else Path(f"/tmp/orchestrator-{os.getuid()}") / "addresses.json"


@dataclass(frozen=True)
class _Entry:
    root: str  # the state directory's VM folder (`<state>/vms`) that took the block
    group: str
    block: int


class AddressBook:
    def __init__(self, root: Path) -> None:
        self.root = root.resolve()
        self.path = table_path()

    def block_of(self, resource_group: str, live_groups: set[str]) -> int:
        """This group's block number, allocating one. `live_groups` are the groups with a VM folder
        under this root; other roots' entries are checked against their own folders."""
        self.path.parent.mkdir(parents=True, exist_ok=True, mode=0o700)
        me = str(self.root)
        with open(self.path.with_suffix(".lock"), "a+") as lock:
            fcntl.flock(lock, fcntl.LOCK_EX)
            entries = [e for e in self._read() if _live(e, me, resource_group, live_groups)]
            mine = next((e for e in entries if e.root == me and e.group == resource_group), None)
            if mine is None:
                used = {e.block for e in entries}
                block = next(b for b in range(FIRST_BLOCK, FIRST_BLOCK + BLOCKS) if b not in used)
                mine = _Entry(me, resource_group, block)
                entries.append(mine)
            self._write(entries)
            return mine.block

    def _read(self) -> list[_Entry]:
        try:
            raw = json.loads(self.path.read_text())
            return [_Entry(str(e["root"]), str(e["group"]), int(e["block"])) for e in raw]
        except (OSError, ValueError, KeyError, TypeError):
            return []

    def _write(self, entries: list[_Entry]) -> None:
        tmp = self.path.with_suffix(".tmp")
        tmp.write_text(json.dumps([e.__dict__ for e in entries]))
        tmp.replace(self.path)


def _live(entry: _Entry, me: str, group: str, live_groups: set[str]) -> bool:
    if entry.root == me:
        return entry.group in live_groups or entry.group == group
    return entry.group in groups_under(Path(entry.root))


def groups_under(root: Path) -> set[str]:
    """The resource groups with a VM folder under a state directory's `vms` folder."""
    groups = set()
    for spec in root.glob("*/vm.json"):
        with contextlib.suppress(OSError, ValueError, KeyError):
            groups.add(str(json.loads(spec.read_text())["resource_group"]))
    return groups


def loopback_for(block: int, private_ip: str) -> str:
    """10.42.0.4 in block b -> 127.(b >> 8).(b & 255).4: the host part survives, so addresses read alike."""
    host = int(ipaddress.ip_address(private_ip)) & 0xFF
    address = f"127.{(block >> 8) & 0xFF}.{block & 0xFF}.{host}"
    if not ipaddress.ip_address(address).is_loopback:  # never any other address (this machine's rule)
        raise ValueError(f"{address} is not a loopback address")
    return address
