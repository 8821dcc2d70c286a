"""Emulated VMs you can SSH into: one asyncssh server per running VM, on loopback.

When the emulator reports a VM as provisioned, a server starts for it that
- presents the host key the VM's cloud-init carries (the one the orchestrator pinned),
- accepts only the public key from the VM's osProfile, for the VM's admin user,
- drops connections until the profile's boot delay has passed (as sshd is not up yet),
- runs each exec request with bash in the VM's sandbox directory (its $HOME), as the current user,
and stops, killing what the VM was running, when the VM is deleted.

Only this backend knows the loopback port: the runner asks the session for the endpoint of a
public IP, and on Azure that is always (public IP, 22).
"""

from __future__ import annotations

import asyncio
import base64
import contextlib
import logging
import os
import shutil
import signal
import sys
import threading
from collections.abc import Callable
from concurrent.futures import Future
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import yaml

from orchestrator.clock import Clock

logging.getLogger("asyncssh").addHandler(logging.NullHandler())


class CloudInitError(ValueError):
    pass


def parse_cloud_init(custom_data: str) -> dict[str, Any]:
    """Decode a VM's custom data the way cloud-init would; malformed documents raise CloudInitError."""
    try:
        text = base64.b64decode(custom_data, validate=True).decode("utf-8")
    except (ValueError, UnicodeDecodeError):
        raise CloudInitError("custom data is not base64 of UTF-8 text") from None
    if not text.startswith("#cloud-config"):
        raise CloudInitError("custom data does not start with #cloud-config")
    try:
        doc = yaml.safe_load(text)
    except yaml.YAMLError as e:
        raise CloudInitError(f"cloud-config is not valid YAML: {e}") from None
    if not isinstance(doc, dict):
        raise CloudInitError("cloud-config must be a mapping")
    keys = doc.get("ssh_keys")
    if keys is not None and (not isinstance(keys, dict) or not all(isinstance(v, str) for v in keys.values())):
        raise CloudInitError("ssh_keys must map key names to PEM or public key text")
    return doc


@dataclass
class _Host:
    name: str
    public_ip: str
    user: str
    authorized_key: str  # "ssh-ed25519 AAAA..." as in osProfile
    home: Path
    boot_at: float
    port: int = 0
    server: Any = None
    sessions: set[Any] = field(default_factory=set)


class SshHosts:
    """The SSH side of every emulated VM, served from one background event loop."""

    def __init__(self, root: Path, clock: Clock, boot_seconds: Callable[[], float] = lambda: 0.0) -> None:
        self.root = root
        self.clock = clock
        self.boot_seconds = boot_seconds
        self._hosts: dict[str, _Host] = {}
        self._by_ip: dict[str, _Host] = {}
        self._lock = threading.Lock()
        self._loop = asyncio.new_event_loop()
        self._thread = threading.Thread(target=self._loop.run_forever, name="emulated-vm-ssh", daemon=True)
        self._thread.start()

    # -------------------------------------------------------------------- wiring to the emulator

    def on_vm(self, event: str, vm: dict[str, Any], public_ip: str | None) -> None:
        if event == "running" and public_ip:
            self.start(vm, public_ip)
        elif event == "deleted":
            self.stop(vm["name"])

    def resolve(self, public_ip: str) -> tuple[str, int]:
        with self._lock:
            host = self._by_ip.get(public_ip)
        if host is None:
            raise LookupError(f"no emulated VM has public IP {public_ip}")
        return "127.0.0.1", host.port

    def home_of(self, vm_name: str) -> Path:
        return self._hosts[vm_name].home

    # -------------------------------------------------------------------- lifecycle

    def start(self, vm: dict[str, Any], public_ip: str) -> int:
        name = vm["name"]
        with self._lock:
            if name in self._hosts:
                return self._hosts[name].port
        os_profile = vm["properties"]["osProfile"]
        keys = os_profile["linuxConfiguration"]["ssh"]["publicKeys"]
        doc = parse_cloud_init(vm["_customData"]) if vm.get("_customData") else {}
        host_key_pem = (doc.get("ssh_keys") or {}).get("ed25519_private")
        home = self.root / name
        home.mkdir(parents=True, exist_ok=True)
        host = _Host(
            name,
            public_ip,
            os_profile["adminUsername"],
            keys[0]["keyData"],
            home,
            self.clock.now() + self.boot_seconds(),
        )
        future = asyncio.run_coroutine_threadsafe(self._serve(host, host_key_pem), self._loop)
        host.port = future.result(timeout=30)
        with self._lock:
            self._hosts[name] = host
            self._by_ip[public_ip] = host
        return host.port

    def stop(self, name: str, kill: bool = True) -> None:
        """Stop serving a VM; with kill (the VM was deleted) also end what it was running."""
        with self._lock:
            host = self._hosts.pop(name, None)
            if host is not None:
                self._by_ip.pop(host.public_ip, None)
        if host is None:
            return
        asyncio.run_coroutine_threadsafe(self._close(host), self._loop).result(timeout=30)
        if kill:
            _kill_detached(host.home)
            shutil.rmtree(host.home, ignore_errors=True)

    def close(self, kill: bool = True) -> None:
        """Stop all servers; kill=False leaves the VMs' jobs running for a later process to serve."""
        for name in list(self._hosts):
            self.stop(name, kill=kill)
        self._loop.call_soon_threadsafe(self._loop.stop)
        self._thread.join(timeout=10)

    def drop_connections(self, name: str) -> None:
        """Cut every SSH connection to a VM, as a network failure would (tests use this)."""
        host = self._hosts[name]
        fut: Future[None] = asyncio.run_coroutine_threadsafe(self._drop(host), self._loop)
        fut.result(timeout=10)

    async def _drop(self, host: _Host) -> None:
        for conn in list(host.sessions):
            conn.abort()

    async def _close(self, host: _Host) -> None:
        await self._drop(host)
        if host.server is not None:
            host.server.close()
            await host.server.wait_closed()

    async def _serve(self, host: _Host, host_key_pem: str | None) -> int:
        import asyncssh

        key = (
            asyncssh.import_private_key(host_key_pem) if host_key_pem else asyncssh.generate_private_key("ssh-ed25519")
        )
        authorized = asyncssh.import_public_key(host.authorized_key)
        manager = self

        class Server(asyncssh.SSHServer):  # type: ignore[misc]
            def connection_made(self, conn: Any) -> None:
                self._conn = conn
                if manager.clock.now() < host.boot_at:
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
                return bool(username == host.user and key.public_data == authorized.public_data)

        server = await asyncssh.create_server(
            Server,
            "127.0.0.1",
            0,
            server_host_keys=[key],
            process_factory=lambda p: self._run(host, p),
            encoding=None,
            allow_scp=False,
            keepalive_interval=0,
        )
        host.server = server
        return int(server.sockets[0].getsockname()[1])

    async def _run(self, host: _Host, process: Any) -> None:
        command = process.command
        if command is None:
            process.stderr.write(b"this emulated VM runs commands only (no interactive shell)\n")
            process.exit(1)
            return
        env = {
            "HOME": str(host.home),
            "USER": host.user,
            "LOGNAME": host.user,
            "SHELL": "/bin/bash",
            # This machine's tools, the orchestrator's own Python first: an emulated VM is "an image
            # with Python and the job's packages", so setup's pip finds them already satisfied.
            "PATH": os.path.dirname(sys.executable) + ":" + os.environ.get("PATH", "/usr/local/bin:/usr/bin:/bin"),
            "LANG": "C.UTF-8",
        }
        proc = await asyncio.create_subprocess_exec(
            "/bin/bash",
            "-c",
            command,
            cwd=str(host.home),
            env=env,
            stdin=asyncio.subprocess.PIPE,
            stdout=asyncio.subprocess.PIPE,
            stderr=asyncio.subprocess.PIPE,
            start_new_session=True,
        )

        async def feed() -> None:
            assert proc.stdin is not None
            try:
                while data := await process.stdin.read(1 << 16):
                    proc.stdin.write(data)
                    await proc.stdin.drain()
            except (OSError, asyncio.CancelledError):
                pass
            finally:
                with contextlib.suppress(Exception):
                    proc.stdin.close()

        async def pump(src: Any, dst: Any) -> None:
            while data := await src.read(1 << 16):
                dst.write(data)
                await dst.drain()

        feeder = asyncio.ensure_future(feed())
        outputs = asyncio.ensure_future(
            asyncio.gather(pump(proc.stdout, process.stdout), pump(proc.stderr, process.stderr))
        )
        closed = asyncio.ensure_future(process.channel.wait_closed())
        await asyncio.wait({outputs, closed}, return_when=asyncio.FIRST_COMPLETED)
        if not outputs.done() or outputs.exception() is not None:
            # The client went away: what it ran must not linger (a VM's sshd hangs up the same way).
            with contextlib.suppress(ProcessLookupError):
                os.killpg(proc.pid, signal.SIGKILL)
            outputs.cancel()
            feeder.cancel()
            await proc.wait()
            return
        code = await proc.wait()
        feeder.cancel()
        closed.cancel()
        process.exit(code)


def _kill_detached(home: Path) -> None:
    """A deleted VM takes its processes with it: kill the detached job wrappers (their own sessions)."""
    for pid_file in home.glob("orch/*/phases/*/pid"):
        try:
            pid = int(pid_file.read_text().strip())
            os.killpg(pid, signal.SIGKILL)
        except (ValueError, OSError):
            continue
