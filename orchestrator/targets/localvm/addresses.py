"""Loopback addresses for local VMs: each run gets its own block, so runs never share an address.

A node's private address in the VNet (10.42.0.4) maps into its run's block (127.B.C.4). All of
127.0.0.0/8 reaches this machine's `lo`, so nothing is configured and no packet leaves loopback.
Blocks are handed out per resource group under a lock, in `<state>/vms/addresses.json`, and taken
back when the group has no VM folder left.
"""

from __future__ import annotations

import fcntl
import ipaddress
import json
from pathlib import Path

FIRST_BLOCK = 16 * 256  # 127.16.0.0/24: clear of 127.0.0.x, which other local services use
BLOCKS = 200 * 256


class AddressBook:
    def __init__(self, root: Path) -> None:
        self.root = root
        self.path = root / "addresses.json"

    def block_of(self, resource_group: str, live_groups: set[str]) -> int:
        """This group's block number, allocating one; blocks of groups not in live_groups are freed."""
        self.root.mkdir(parents=True, exist_ok=True)
        with open(self.root / "addresses.lock", "a+") as lock:
            fcntl.flock(lock, fcntl.LOCK_EX)
            try:
                table: dict[str, int] = json.loads(self.path.read_text()) if self.path.exists() else {}
            except ValueError:
                table = {}
            table = {g: b for g, b in table.items() if g in live_groups or g == resource_group}
            if resource_group not in table:
                used = set(table.values())
                table[resource_group] = next(b for b in range(FIRST_BLOCK, FIRST_BLOCK + BLOCKS) if b not in used)
                tmp = self.path.with_suffix(".tmp")
                tmp.write_text(json.dumps(table))
                tmp.replace(self.path)
            return table[resource_group]


def loopback_for(block: int, private_ip: str) -> str:
    """10.42.0.4 in block b -> 127.(b >> 8).(b & 255).4: the host part survives, so addresses read alike."""
    host = int(ipaddress.ip_address(private_ip)) & 0xFF
    address = f"127.{(block >> 8) & 0xFF}.{block & 0xFF}.{host}"
    if not ipaddress.ip_address(address).is_loopback:  # never any other address (this machine's rule)
        raise ValueError(f"{address} is not a loopback address")
    return address
