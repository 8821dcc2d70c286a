"""One local VM: a host process that lives exactly as long as the VM.

    python -m orchestrator.targets.localvm.host <vm folder>

It reads `vm.json` (written by manager.py when the emulator reports the VM running), makes the VM's
Python environment if it has none, serves SSH on the VM's own loopback address with the host key
from the VM's cloud-init (accepting only the osProfile key, for the admin user), and records where
it listens in `host.json`. Every command runs with the VM's environment (image.vm_environ), in its
home, never with the tool's. It is the child subreaper of everything it starts, so the detached job
wrappers stay its descendants: when the VM is deleted (SIGTERM from the manager), its folder or its
record in the emulator's store disappears, it ends them all, then itself. SIGUSR1 cuts every SSH
connection, as a network failure would (tests use it). Its own errors go to `host.log`, never to
the user's terminal.

A job with `python.requirements` has them in the VM's cloud-init custom data, as on Azure: once the
VM has booted (its SSH answering), the host installs them into the VM's environment with uv from the
wheelhouse, offline, writing `~/.orch-install/log` and `exit` as the Azure VM's cloud-init does. SSH
is served meanwhile; the tool waits for the exit file (lifecycle/install.py).
"""

from __future__ import annotations

import asyncio
import contextlib
import ctypes
import fcntl
import json
import logging
import os
import shutil
import signal
import sys
import time
from pathlib import Path
from typing import Any

from orchestrator.targets.localvm.identity import ARM_ENV_VAR
from orchestrator.targets.localvm.image import (
    VmPaths,
    install_requirements,
    make_environment,
    mount_temp_disk,
    vm_environ,
    wipe_temp_disk,
)
from orchestrator.targets.localvm.imds import ENV_VAR as IMDS_ENV_VAR

PR_SET_CHILD_SUBREAPER = 36
NOWHERE = "http://127.0.0.1:9"  # the discard port: nothing listens there
FALLBACK_PORT = 2222


class VmHost:
    def __init__(self, vm: VmPaths) -> None:
        self.vm = vm
        self.spec: dict[str, Any] = json.loads(vm.spec.read_text())
        self.sessions: set[Any] = set()
        self.server: Any = None
        self.stopping = asyncio.Event()
        self.environment: asyncio.Future[str] | None = None  # making the VM's Python, if under way
        self.spawned: set[int] = set()  # asyncio waits for these itself
        self.cloud_config: dict[str, Any] | None = None
        self.imds: Any = None  # imds.Imds, on the VM's address
        self.imds_endpoint = ""
        self.evicted: Any = None  # the VM's lock, held from its eviction until this process exits
        self.arm: Any = None  # identity.VmArm: the VM's token and the ARM endpoint it reaches
        self.arm_server: Any = None
        self.arm_endpoint = ""
        self.deallocated = False  # the emulator says its OS is shut down: stop, keep the OS disk

    # ------------------------------------------------------------------ liveness

    def alive(self) -> bool:
        """The VM exists while its folder does and the emulator's store still holds it."""
        if not self.vm.spec.exists():
            return False
        store = self.spec.get("store")
        if not store:
            return True
        from orchestrator.emulator.persist import StoreFile

        key = str(self.spec["vm_id"]).lower()
        path = StoreFile(Path(store)).file_of(key)  # its resource group's: the others' runs never touch it
        try:
            stat = path.stat()
        except FileNotFoundError:
            return False
        if stat.st_mtime_ns == getattr(self, "_store_seen", None):
            return True
        self._store_seen = stat.st_mtime_ns
        try:
            data = json.loads(path.read_text() or "{}")
        except (OSError, ValueError):
            return True  # being replaced right now: ask again next time
        record = data.get("resources", {}).get(key)
        if isinstance(record, dict) and record.get("_power") in {"deallocating", "deallocated", "stopping", "stopped"}:
            self.deallocated = True  # its own agent's deallocation, or the tool's: the host lets go of it
            return False
        return record is not None

    async def watch(self) -> None:
        while not self.stopping.is_set():
            if not self.alive():
                self.stopping.set()
                return
            self.reap_orphans()
            with contextlib.suppress(TimeoutError):
                await asyncio.wait_for(self.stopping.wait(), timeout=1.0)

    def reap_orphans(self) -> None:
        """Detached job processes that ended were re-parented to us (subreaper): reap them, but never
        a process asyncio is waiting for."""
        me = os.getpid()
        for pid in children_of(me):
            if pid in self.spawned:
                continue
            with contextlib.suppress(ChildProcessError, OSError):
                os.waitpid(pid, os.WNOHANG)

    # ------------------------------------------------------------------ cloud-init

    def record(self) -> dict[str, Any] | None:
        """The VM's record in the emulator's store (None: not there, or no store)."""
        store = self.spec.get("store")
        if not store:
            return None
        from orchestrator.emulator.persist import StoreFile

        try:
            return StoreFile(Path(store)).resource(str(self.spec["vm_id"]).lower())
        except OSError:
            return None

    def custom_data(self) -> dict[str, Any] | None:
        """The VM's cloud-config, from the emulator's store (custom data is never returned by ARM)."""
        from orchestrator.emulator.cloudinit import CloudInitError, parse_cloud_init

        resource = self.record() or {}
        custom = resource.get("_customData")
        if not custom:
            return None
        try:
            return parse_cloud_init(str(custom))
        except CloudInitError:
            logging.getLogger(__name__).exception("the VM's custom data does not parse")
            return None

    async def install(self, requirements: str, note: str) -> None:
        """python.requirements, once the VM has booted; SSH is served all the while."""
        from orchestrator.bootstrap import INSTALL_DIR

        if (self.vm.home / INSTALL_DIR / "exit").exists():
            return  # installed at the VM's first boot (cloud-init runs it once per VM)
        delay = float(self.spec.get("boot_after", 0.0)) - time.time()
        if delay > 0:
            with contextlib.suppress(TimeoutError):
                await asyncio.wait_for(self.stopping.wait(), timeout=delay)
        if self.stopping.is_set():
            return
        await asyncio.to_thread(install_requirements, self.vm, requirements, note=note)

    # ------------------------------------------------------------------ SSH

    async def serve(self) -> int:
        import asyncssh

        key = asyncssh.import_private_key(Path(self.spec["host_key_file"]).read_text())
        keys = [key]
        rsa = ((self.cloud_config or {}).get("ssh_keys") or {}).get("rsa_private")
        if rsa:  # offered too, as the Azure VM's sshd does; the runner pins the ed25519 key
            # This tool made the key (it came in the VM's custom data): OpenSSL 3's RSA check would
            # cost ~0.15 s of every VM's start, before SSH answers.
            keys.append(asyncssh.import_private_key(str(rsa), unsafe_skip_rsa_key_validation=True))
        authorized = [asyncssh.import_public_key(k) for k in self.spec["authorized_keys"]]
        user = self.spec["user"]
        boot_after = float(self.spec.get("boot_after", 0.0))
        host = self

        class Server(asyncssh.SSHServer):  # type: ignore[misc]
            def connection_made(self, conn: Any) -> None:
                self._conn = conn
                if time.time() < boot_after:
                    conn.abort()  # sshd is not up yet: the client sees the connection drop
                    return
                host.sessions.add(conn)

            def connection_lost(self, exc: Exception | None) -> None:
                host.sessions.discard(getattr(self, "_conn", None))

            def begin_auth(self, username: str) -> bool:
                return True

            def password_auth_supported(self) -> bool:
                return False

            def public_key_auth_supported(self) -> bool:
                return True

            def validate_public_key(self, username: str, key: Any) -> bool:
                return username == user and any(key.public_data == a.public_data for a in authorized)

        address = self.spec["address"]
        last: OSError | None = None
        for port in (22, FALLBACK_PORT, 0):
            try:
                self.server = await asyncssh.create_server(
                    Server,
                    address,
                    port,
                    server_host_keys=keys,
                    process_factory=self.run_command,
                    encoding=None,
                    allow_scp=False,
                    keepalive_interval=float(self.spec.get("keepalive_s", 15)),
                    keepalive_count_max=4,
                )
                break
            except OSError as e:  # 22 needs root, and either may be taken on this machine
                last = e
        if self.server is None:
            raise OSError(f"cannot listen on {address}: {last}")
        return int(self.server.sockets[0].getsockname()[1])

    def drop(self) -> None:
        for conn in list(self.sessions):
            conn.abort()

    async def run_command(self, process: Any) -> None:
        try:
            await self._run(process)
        except Exception:  # a broken channel ends that command only; the VM goes on
            logging.getLogger(__name__).exception("command failed")
            with contextlib.suppress(Exception):
                process.exit(255)

    async def _run(self, process: Any) -> None:
        if self.environment is not None:
            await asyncio.shield(self.environment)  # python3 on PATH must be the VM's, never the system's
        command = process.command
        if command is None:
            command = "exec /bin/bash -i"
        if process.term_type:  # the client asked for a terminal (`ssh -t`, an interactive session)
            from orchestrator.targets.localvm.terminal import run_in_pty

            await run_in_pty(
                process,
                command,
                cwd=str(self.vm.home),
                env=self.environ(),
                spawned=self.spawned.add,
                ended=self.spawned.discard,
            )
            return
        proc = await asyncio.create_subprocess_exec(
            "/bin/bash",
            "-c",
            command,
            cwd=str(self.vm.home),
            env=self.environ(),
            stdin=asyncio.subprocess.PIPE,
            stdout=asyncio.subprocess.PIPE,
            stderr=asyncio.subprocess.PIPE,
            start_new_session=True,
        )
        self.spawned.add(proc.pid)

        async def feed() -> None:
            assert proc.stdin is not None
            with contextlib.suppress(Exception):
                while data := await process.stdin.read(1 << 16):
                    proc.stdin.write(data)
                    await proc.stdin.drain()
            with contextlib.suppress(Exception):
                proc.stdin.close()

        async def pump(src: Any, dst: Any) -> None:
            while data := await src.read(1 << 16):
                dst.write(data)
                await dst.drain()

        async def outputs() -> None:
            await asyncio.gather(pump(proc.stdout, process.stdout), pump(proc.stderr, process.stderr))

        feeder = asyncio.ensure_future(feed())
        pumping = asyncio.ensure_future(outputs())
        closed = asyncio.ensure_future(process.channel.wait_closed())
        await asyncio.wait({pumping, closed}, return_when=asyncio.FIRST_COMPLETED)
        broken = not pumping.done() or pumping.exception() is not None
        if broken:
            # The client went away: what it ran must not linger (a VM's sshd hangs up the same way).
            with contextlib.suppress(ProcessLookupError):
                os.killpg(proc.pid, signal.SIGKILL)
        for task in (pumping, feeder, closed):
            task.cancel()
        await asyncio.gather(pumping, feeder, closed, return_exceptions=True)
        code = await proc.wait()
        self.spawned.discard(proc.pid)
        if not broken:
            process.exit(code)

    def environ(self) -> dict[str, str]:
        env = vm_environ(self.vm, self.spec["user"])
        # The VM-side code's metadata service and ARM: never 169.254.169.254 or management.azure.com
        # here. Not served (yet): a loopback port nothing listens on, so a request fails, never leaves.
        env[IMDS_ENV_VAR] = self.imds_endpoint or NOWHERE
        env[ARM_ENV_VAR] = self.arm_endpoint or NOWHERE
        return env

    async def serve_imds(self) -> int:
        from orchestrator.targets.localvm.imds import Imds

        self.imds = Imds(self.record)
        port: int = await self.imds.start(str(self.spec["address"]))
        self.imds_endpoint = f"http://{self.spec['address']}:{port}"
        return port

    async def serve_arm(self) -> None:
        """The VM's managed identity on its metadata service, and the ARM endpoint its token works
        with (identity.py); after serve_imds."""
        from orchestrator.targets.localvm import identity

        if not self.spec.get("store"):
            return
        self.arm = identity.VmArm(Path(self.spec["store"]), str(self.spec["vm_id"]))
        identity.install(self.imds, self.arm)
        self.arm_server, port = await self.arm.serve(str(self.spec["address"]))
        self.arm_endpoint = f"http://{self.spec['address']}:{port}"

    # ------------------------------------------------------------------ spot eviction

    async def evict_when_due(self, after_s: float, notice_s: float) -> None:
        """An armed eviction (emulator/faults.py, phase evict): the Preempt scheduled event is posted
        `notice_s` ahead on the metadata service, then at its NotBefore (or once a StartRequest
        approves it) the VM is evicted as Azure would: the store first (ARM shows it at once), then
        the network (SSH cut) and every process the VM ran; with Delete its folder (the OS disk) goes."""
        start = time.time()
        evict_at = start + after_s
        with contextlib.suppress(TimeoutError):
            await asyncio.wait_for(self.stopping.wait(), timeout=max(0.0, evict_at - notice_s - time.time()))
        if self.stopping.is_set():
            return
        event = self.imds.events.schedule("Preempt", self.spec["name"], evict_at)
        await self.imds.events.due(event, self.stopping)
        if self.stopping.is_set():
            return
        # The manager's per-VM lock, held until this process exits: a replacement VM of the same name
        # waits for this host to be gone before its own host starts.
        self.evicted = open(self.vm.root.parent / f"{self.spec['name']}.lock", "a+")  # noqa: SIM115
        await asyncio.to_thread(fcntl.flock, self.evicted, fcntl.LOCK_EX)
        policy = await asyncio.to_thread(self._evict_in_store)
        logging.getLogger(__name__).warning("evicted (%s)", policy)
        self.drop()
        self.server.close()
        self.imds.close()
        self.end_processes()
        if policy != "Deallocate":
            shutil.rmtree(self.vm.root, ignore_errors=True)
        else:
            wipe_temp_disk(self.vm)  # as a deallocation does; the OS disk (the folder) stays
        self.vm.host.unlink(missing_ok=True)
        # Gone now, still holding the lock: interpreter shutdown would release it while this
        # process still looks alive to the next host's start (manager.ensure).
        os._exit(0)

    def _evict_in_store(self) -> str | None:
        from orchestrator.emulator.compute import evict
        from orchestrator.emulator.persist import StoreFile

        store = StoreFile(Path(self.spec["store"]))
        with store.locked():
            data = store.open()
            try:
                policy = evict(data, str(self.spec["vm_id"]))
            finally:
                store.commit(data)
        return policy

    # ------------------------------------------------------------------ the VM's processes

    def end_processes(self) -> None:
        """SIGKILL every descendant (the subreaper keeps detached job wrappers among them)."""
        me = os.getpid()
        for _ in range(3):
            victims = descendants(me)
            if not victims:
                return
            for pid in victims:
                with contextlib.suppress(OSError):
                    os.kill(pid, signal.SIGKILL)
            with contextlib.suppress(ChildProcessError):
                while os.waitpid(-1, os.WNOHANG)[0]:
                    pass
            time.sleep(0.05)


def _parents() -> dict[int, list[int]]:
    children: dict[int, list[int]] = {}
    for entry in os.listdir("/proc"):
        if not entry.isdigit():
            continue
        try:
            with open(f"/proc/{entry}/stat", "rb") as f:
                stat = f.read()
        except OSError:
            continue
        ppid = int(stat[stat.rindex(b")") + 2 :].split()[1])
        children.setdefault(ppid, []).append(int(entry))
    return children


def children_of(pid: int) -> list[int]:
    return _parents().get(pid, [])


def descendants(root: int) -> list[int]:
    children = _parents()
    found, todo = [], [root]
    while todo:
        for child in children.get(todo.pop(), []):
            found.append(child)
            todo.append(child)
    return found


async def amain(vm: VmPaths) -> None:
    host = VmHost(vm)
    loop = asyncio.get_running_loop()
    loop.add_signal_handler(signal.SIGTERM, host.stopping.set)
    loop.add_signal_handler(signal.SIGINT, lambda: None)  # a Ctrl-C in the user's terminal is not for the VM
    loop.add_signal_handler(signal.SIGUSR1, host.drop)
    from orchestrator.bootstrap import python_setup_of

    host.cloud_config = host.custom_data()
    python = python_setup_of(host.cloud_config) if host.cloud_config else None
    # The environment is made while SSH starts listening (uv runs in its own process): a command
    # waits for it (host.environment) rather than the whole VM waiting before it answers.
    if not (vm.python / "bin" / "python").exists():
        host.environment = asyncio.ensure_future(
            asyncio.to_thread(make_environment, vm, python.version if python else None)
        )
    mount_temp_disk(vm)
    imds_port = await host.serve_imds()  # before SSH: every command gets ORCH_IMDS_ENDPOINT
    await host.serve_arm()
    port = await host.serve()
    tmp = vm.host.with_suffix(".tmp")
    info = {"pid": os.getpid(), "address": host.spec["address"], "port": port, "imds_port": imds_port}
    tmp.write_text(json.dumps(info))
    tmp.replace(vm.host)
    note = await host.environment if host.environment is not None else ""
    installing = asyncio.ensure_future(host.install(python.requirements, note)) if python else None
    eviction = (host.record() or {}).get("_eviction") if host.spec.get("store") else None
    evicting = (
        asyncio.ensure_future(host.evict_when_due(float(eviction["after_s"]), float(eviction["notice_s"])))
        if eviction
        else None
    )
    try:
        await host.watch()
    finally:
        # Serving no more from here: a command that starts the VM again waits for this process to
        # end (manager._settled_host) instead of taking it for the VM's host.
        with contextlib.suppress(OSError):
            vm.host.unlink()
        if evicting is not None and not evicting.done():
            evicting.cancel()
        if installing is not None and not installing.done():
            host.end_processes()  # uv, if still installing: its thread then returns
            with contextlib.suppress(Exception):
                await asyncio.wait_for(installing, timeout=10)
        host.drop()
        host.server.close()
        host.imds.close()
        if host.arm_server is not None:
            host.arm_server.close()
        host.end_processes()
        if host.deallocated:  # the temporary disk does not survive a deallocation; the OS disk does
            wipe_temp_disk(vm)


def main() -> None:
    vm = VmPaths(Path(sys.argv[1]))
    logging.basicConfig(filename=vm.log, level=logging.WARNING, format="%(asctime)s %(name)s %(message)s")
    logging.getLogger("asyncssh").setLevel(logging.ERROR)
    with contextlib.suppress(OSError, AttributeError):
        ctypes.CDLL(None, use_errno=True).prctl(PR_SET_CHILD_SUBREAPER, 1, 0, 0, 0)
    try:
        asyncio.run(amain(vm))
    except Exception:
        logging.getLogger(__name__).exception("the VM host stopped")
        raise SystemExit(1) from None
    finally:
        with contextlib.suppress(OSError):
            vm.host.unlink()


if __name__ == "__main__":
    main()
