"""The VM-side autostop agent: a kept or detached VM that nobody uses deallocates itself.

Uploaded to each node and started detached (`setsid nohup python3 agent.py ...`) by
lifecycle/autostop.py; it needs nothing but Python's standard library (the image's python3 serves).

Every few seconds it asks: does a job phase run (a `~/orch/<run>/phases/<phase>/pid` whose process
lives and whose `exit_code` is not written yet), and is an SSH session open (an ESTABLISHED TCP socket on
the SSH port, from /proc/net/tcp and tcp6)? When neither has been true for the idle time (a
detached run: from its job's end), it

1. moves the runs under ~/orch from the temporary disk (where cloud-init linked ~/orch) to the OS
   disk: a deallocation wipes the temporary disk, the OS disk stays;
2. gets a token for ARM from the metadata service's identity endpoint
   ($ORCH_IMDS_ENDPOINT, on Azure http://169.254.169.254) with the VM's system-assigned identity;
3. POSTs .../virtualMachines/<vm>/deallocate to ARM ($ORCH_ARM_ENDPOINT, on Azure
   https://management.azure.com): the compute bill stops, the disks stay.

Its log is ~/.orch-autostop/log. With ORCH_EMULATOR_SPEED (the local target's emulated time) the
idle time passes that much faster.
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import socket
import sys
import time
import urllib.error
import urllib.request
from pathlib import Path

IMDS_DEFAULT = "http://169.254.169.254"
ARM_DEFAULT = "https://management.azure.com"
IDENTITY_API = "2018-02-01"
COMPUTE_API = "2026-04-01"
RESOURCE = "https://management.azure.com/"
STATE_DIR = ".orch-autostop"
ESTABLISHED = "01"


def log(message: str) -> None:
    stamp = time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime())
    print(f"{stamp} {message}", flush=True)


def job_running(orch: Path) -> bool:
    for pid_file in orch.glob("*/phases/*/pid"):
        if (pid_file.parent / "exit_code").exists():
            continue
        try:
            os.kill(int(pid_file.read_text().strip()), 0)
        except (ValueError, OSError):
            continue
        return True
    return False


def _hex_address(address: str) -> set[str]:
    """/proc/net/tcp's spelling of an address (little-endian hex), IPv4 and IPv4-mapped IPv6."""
    packed = socket.inet_aton(address)
    v4 = packed[::-1].hex().upper()
    mapped = socket.inet_pton(socket.AF_INET6, "::ffff:" + address)
    v6 = "".join(mapped[i : i + 4][::-1].hex().upper() for i in range(0, 16, 4))
    return {v4, v6}


def ssh_sessions(port: int, address: str | None) -> int:
    """Established connections to the SSH server (on `address` when given: a local VM shares this
    machine's network stack with others)."""
    wanted = _hex_address(address) if address else None
    count = 0
    for table in ("/proc/net/tcp", "/proc/net/tcp6"):
        try:
            lines = Path(table).read_text().splitlines()[1:]
        except OSError:
            continue
        for line in lines:
            fields = line.split()
            if len(fields) < 4 or fields[3] != ESTABLISHED:
                continue
            local_addr, _, local_port = fields[1].partition(":")
            if int(local_port, 16) != port or (wanted is not None and local_addr not in wanted):
                continue
            count += 1
    return count


def keep_outputs(home: Path) -> None:
    """~/orch on the temporary disk (a link): copy it to the OS disk and put the copy in its place."""
    orch = home / "orch"
    if not orch.is_symlink():
        return
    target = orch.resolve()
    saving = home / "orch.saving"
    shutil.rmtree(saving, ignore_errors=True)
    shutil.copytree(target, saving, symlinks=True)
    orch.unlink()
    saving.rename(orch)
    log(f"moved {target} to the OS disk ({orch})")


def request(
    method: str, url: str, headers: dict[str, str], timeout: float = 30.0, *, direct: bool = False
) -> tuple[int, bytes]:
    """`direct`: never through an http(s)_proxy (the metadata service refuses proxied requests; ARM
    may need the proxy)."""
    req = urllib.request.Request(url, method=method, headers=headers, data=b"" if method == "POST" else None)
    opener = urllib.request.build_opener(urllib.request.ProxyHandler({})) if direct else urllib.request.build_opener()
    try:
        with opener.open(req, timeout=timeout) as response:
            return int(response.status), bytes(response.read())
    except urllib.error.HTTPError as e:
        return int(e.code), bytes(e.read())


def deallocate(resource_id: str) -> bool:
    imds = os.environ.get("ORCH_IMDS_ENDPOINT", IMDS_DEFAULT).rstrip("/")
    arm = os.environ.get("ORCH_ARM_ENDPOINT", ARM_DEFAULT).rstrip("/")
    status, body = request(
        "GET",
        f"{imds}/metadata/identity/oauth2/token?api-version={IDENTITY_API}&resource={RESOURCE}",
        {"Metadata": "true"},
        direct=True,
    )
    if status != 200:
        log(f"no token from the metadata service ({status}): {body.decode(errors='replace')}")
        return False
    token = json.loads(body)["access_token"]
    status, body = request(
        "POST",
        f"{arm}{resource_id}/deallocate?api-version={COMPUTE_API}",
        {"Authorization": f"Bearer {token}", "Content-Length": "0"},
    )
    if status not in (200, 202):
        log(f"ARM refused the deallocation ({status}): {body.decode(errors='replace')}")
        return False
    log(f"deallocating {resource_id} ({status})")
    return True


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n", 1)[0])
    parser.add_argument("--resource-id", required=True, help="this VM's ARM id")
    parser.add_argument("--idle", type=float, required=True, help="seconds without a job or SSH session")
    parser.add_argument("--ssh-port", type=int, default=22)
    parser.add_argument("--ssh-address", default=None)
    args = parser.parse_args(argv)
    home = Path.home()
    speed = float(os.environ.get("ORCH_EMULATOR_SPEED", "1") or 1)
    idle = max(0.0, args.idle / speed)
    poll = min(30.0, max(0.2, idle / 10))
    orch = home / "orch"
    log(f"watching: deallocate after {idle:.1f} s with no job and no SSH session")
    idle_since = time.monotonic()
    while True:
        busy = job_running(orch) or ssh_sessions(args.ssh_port, args.ssh_address) > 0
        now = time.monotonic()
        if busy:
            idle_since = now
        elif now - idle_since >= idle:
            log(f"idle for {now - idle_since:.1f} s")
            try:
                keep_outputs(home)
            except OSError as e:  # a full OS disk: stopping the bill comes first (DESIGN.md's order)
                shutil.rmtree(home / "orch.saving", ignore_errors=True)
                log(f"could not move ~/orch to the OS disk ({e}); what is only on the temporary disk is lost")
            try:
                if deallocate(args.resource_id):
                    return 0
            except (OSError, ValueError, KeyError) as e:  # the metadata service or ARM unreachable: try again
                log(f"could not ask for the deallocation: {e}")
            idle_since = now  # try again after another idle period (the auto-shutdown still stands)
        time.sleep(poll)


if __name__ == "__main__":
    sys.exit(main())
