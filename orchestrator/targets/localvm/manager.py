"""Starts and ends local VM host processes as the emulator reports VMs running or deleted.

Any orchestrator process may be the one that sees a VM become running (the one whose poll settles
the create) or deleted (a `down` from another terminal, `gc`, `emulator reset`): each starts or ends
the host process the same way, under a per-VM lock, so exactly one host serves a VM.
"""

from __future__ import annotations

import contextlib
import fcntl
import json
import os
import shutil
import signal
import subprocess
import sys
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

from orchestrator.errors import OrchestratorError
from orchestrator.targets.localvm.addresses import AddressBook, groups_under, loopback_for
from orchestrator.targets.localvm.image import VmPaths

HOST_MODULE = "orchestrator.targets.localvm.host"
FOLDER_GRACE_S = 5.0


class LocalVmError(OrchestratorError):
    pass


class VmHosts:
    def __init__(self, root: Path, store: Path, *, boot_delay_s: float = 0.0, keepalive_s: float = 15.0) -> None:
        self.root = root
        self.store = store
        self.boot_delay_s = boot_delay_s
        self.keepalive_s = keepalive_s
        self.addresses = AddressBook(root)

    def vm(self, name: str) -> VmPaths:
        return VmPaths(self.root / name)

    # ------------------------------------------------------------------ the emulator's VM events

    def on_event(self, event: Any) -> None:
        if event.kind == "running":
            self.ensure(event)
        elif event.kind == "deallocated":
            self.stop(event.name)
        elif event.kind == "deleted":
            self.destroy(event.name)

    def ensure(self, event: Any) -> None:
        """The VM's host process is running (started now if it is not)."""
        vm = self.vm(event.name)
        with self._locked(event.name):
            # No vm.json: the folder went with the VM (a Delete eviction), so a host still found is
            # one on its way out, never the new VM's.
            if vm.spec.exists() and self._settled_host(vm) is not None:
                return
            if not self._still_running(event.vm_id):
                return  # deleted or deallocated by another command since this event was read
            vm.root.mkdir(parents=True, exist_ok=True, mode=0o700)
            key_file = vm.root / "ssh_host_ed25519_key"
            if not key_file.exists():
                fd = os.open(key_file, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
                with os.fdopen(fd, "w") as f:
                    f.write(_host_key(event.custom_data))
            address = loopback_for(self.addresses.block_of(event.resource_group, self._live_groups()), event.private_ip)
            spec = {
                "name": event.name,
                "vm_id": event.vm_id,
                "resource_group": event.resource_group,
                "address": address,
                "private_ip": event.private_ip,
                "user": event.admin_user,
                "authorized_keys": list(event.authorized_keys),
                "host_key_file": str(key_file),
                "boot_after": time.time() + max(0.0, self.boot_delay_s - event.running_for_s),
                "store": str(self.store),
                "keepalive_s": self.keepalive_s,
            }
            if vm.spec.exists():  # a host that died (a reboot of this machine): same VM, same boot
                old = json.loads(vm.spec.read_text())
                spec["boot_after"] = old.get("boot_after", spec["boot_after"])
            tmp = vm.spec.with_suffix(".tmp")
            tmp.write_text(json.dumps(spec))
            tmp.replace(vm.spec)
            vm.host.unlink(missing_ok=True)
            from orchestrator import warm

            if warm.spawn(HOST_MODULE, [str(vm.root)], cwd=vm.root, log=vm.log):
                return  # forked from the warm-start server, already past its imports
            with open(vm.log, "ab") as log:
                subprocess.Popen(
                    [sys.executable, "-m", HOST_MODULE, str(vm.root)],
                    stdin=subprocess.DEVNULL,
                    stdout=log,
                    stderr=log,
                    start_new_session=True,  # a Ctrl-C in the user's terminal is not for the VM
                    close_fds=True,
                    cwd="/",
                )

    def _settled_host(self, vm: VmPaths, wait_s: float = 10.0) -> int | None:
        """The VM's host, once it is known whether a host found without its host.json is starting
        (it writes it) or on its way out after a deallocation (it exits): None for the latter."""
        pid = self._host_pid(vm)
        deadline = time.monotonic() + wait_s
        while pid is not None and not vm.host.exists() and _running(pid) and time.monotonic() < deadline:
            time.sleep(0.02)
        return self._host_pid(vm)

    def _still_running(self, vm_id: str) -> bool:
        from orchestrator.emulator.compute import OFF, power_state
        from orchestrator.emulator.persist import StoreFile

        record = StoreFile(self.store).resource(vm_id.lower())
        return record is not None and power_state(record) not in OFF

    def destroy(self, name: str) -> None:
        """The VM was deleted: its host ends everything it ran, then its folder goes."""
        vm = self.vm(name)
        with self._locked(name):
            self._end_host(vm)
            shutil.rmtree(vm.root, ignore_errors=True)
        (self.root / f"{name}.lock").unlink(missing_ok=True)

    def stop(self, name: str) -> None:
        """The VM was deallocated: its host ends everything it ran and goes, its folder (the OS disk,
        with the host key and the address record) stays for a later start; its temporary disk is
        wiped, as Azure's is."""
        from orchestrator.targets.localvm.image import wipe_temp_disk

        vm = self.vm(name)
        with self._locked(name):
            self._end_host(vm)
            wipe_temp_disk(vm)
            vm.host.unlink(missing_ok=True)

    def _end_host(self, vm: VmPaths) -> None:
        pid = self._host_pid(vm)
        if pid is not None:
            with contextlib.suppress(ProcessLookupError):
                os.kill(pid, signal.SIGTERM)
            deadline = time.monotonic() + 10
            while _running(pid) and time.monotonic() < deadline:
                time.sleep(0.02)
            with contextlib.suppress(ProcessLookupError):
                os.kill(pid, signal.SIGKILL)
        _kill_recorded_jobs(vm.home)  # a host killed earlier could not end its jobs itself

    # ------------------------------------------------------------------ reaching a VM

    def endpoint(self, name: str, timeout: float = 30.0) -> tuple[str, int]:
        vm = self.vm(name)
        deadline = time.monotonic() + timeout
        # The command that saw the VM start makes its folder just after letting go of the store's
        # lock: a folder missing for a moment is a VM on its way up, missing for longer a VM gone.
        gone_after = time.monotonic() + FOLDER_GRACE_S
        while True:
            try:
                info = json.loads(vm.host.read_text())
                if _running(int(info["pid"])):
                    return str(info["address"]), int(info["port"])
            except (OSError, ValueError, KeyError):
                pass
            if not vm.root.exists() and time.monotonic() > gone_after:
                raise LocalVmError(
                    f"the local VM {name} does not exist any more (deleted, or a spot VM evicted); "
                    "`orchestrator status` shows its run"
                )
            if time.monotonic() > deadline:
                detail = vm.log.read_text(errors="replace")[-1500:] if vm.log.exists() else "no log"
                raise LocalVmError(f"the local VM {name} did not start within {timeout:.0f} s; its log:\n{detail}")
            time.sleep(0.02)

    def address(self, name: str) -> str | None:
        try:
            return str(json.loads(self.vm(name).spec.read_text())["address"])
        except (OSError, ValueError, KeyError):
            return None

    def drop_connections(self, name: str) -> None:
        """Cut every SSH connection to a VM, as a network failure would."""
        pid = self._host_pid(self.vm(name))
        if pid is not None:
            os.kill(pid, signal.SIGUSR1)

    def host_pid(self, name: str) -> int | None:
        return self._host_pid(self.vm(name))

    # ------------------------------------------------------------------ internals

    @contextlib.contextmanager
    def _locked(self, name: str) -> Iterator[None]:
        self.root.mkdir(parents=True, exist_ok=True, mode=0o700)
        with open(self.root / f"{name}.lock", "a+") as lock:
            fcntl.flock(lock, fcntl.LOCK_EX)
            yield

    def _host_pid(self, vm: VmPaths) -> int | None:
        try:
            pid = int(json.loads(vm.host.read_text())["pid"])
        except (OSError, ValueError, KeyError):
            return _starting_host(vm)
        return pid if _is_host(pid, vm) else None

    def _live_groups(self) -> set[str]:
        return groups_under(self.root)


def _running(pid: int) -> bool:
    try:
        with open(f"/proc/{pid}/stat", "rb") as f:
            stat = f.read()
    except OSError:
        return False
    return stat[stat.rindex(b")") + 2 :][:1] != b"Z"


def _is_host(pid: int, vm: VmPaths) -> bool:
    try:
        cmdline = Path(f"/proc/{pid}/cmdline").read_bytes().split(b"\0")
        if HOST_MODULE.encode() in cmdline and str(vm.root).encode() in cmdline:
            return _running(pid)
        # Forked from the warm-start server (warm.spawn): the server's command line, a session of
        # its own (a command's fork has none), the VM's folder as its working directory (set before
        # the spawn returns; /proc gives it resolved, so compare it resolved).
        return (
            b"orchestrator.warm" in cmdline
            and os.getsid(pid) == pid
            and os.readlink(f"/proc/{pid}/cwd") == os.path.realpath(vm.root)
            and _running(pid)
        )
    except OSError:
        return False


def _starting_host(vm: VmPaths) -> int | None:
    """A host started but not yet listening has no host.json: find it by its command line."""
    for entry in os.listdir("/proc"):
        if entry.isdigit() and _is_host(int(entry), vm):
            return int(entry)
    return None


def processes_in(folder: Path) -> list[tuple[int, str, str]]:
    """(pid, command line, working directory) of every live process whose command line or working
    directory is inside `folder`: a state directory's VM hosts, jobs and installs (for checks that
    nothing outlived its VM)."""
    found = []
    mark = str(folder)
    for entry in os.listdir("/proc"):
        if not entry.isdigit() or int(entry) == os.getpid():
            continue
        try:
            cmdline = Path(f"/proc/{entry}/cmdline").read_bytes().replace(b"\0", b" ").decode(errors="replace")
            cwd = os.readlink(f"/proc/{entry}/cwd")
            stat = Path(f"/proc/{entry}/stat").read_text()
        except OSError:
            continue
        if stat[stat.rindex(")") + 2] != "Z" and (mark in cmdline or cwd.startswith(mark)):
            found.append((int(entry), cmdline.strip(), cwd))
    return found


def _host_key(custom_data: str | None) -> str:
    from orchestrator.emulator.cloudinit import parse_cloud_init

    if custom_data:
        pem = (parse_cloud_init(custom_data).get("ssh_keys") or {}).get("ed25519_private")
        if pem:
            return str(pem)
    import asyncssh  # no cloud-init host key: the VM makes its own, as sshd would

    return str(asyncssh.generate_private_key("ssh-ed25519").export_private_key().decode())


def _kill_recorded_jobs(home: Path) -> None:
    for pid_file in home.glob("orch/*/phases/*/pid"):
        with contextlib.suppress(ValueError, OSError):
            os.killpg(int(pid_file.read_text().strip()), signal.SIGKILL)
