"""SSH to the VMs: wait until sshd answers, verify the pinned host key, keep alive, reconnect.

Connections are Fabric `Connection`s (paramiko underneath) built so that nothing from the user's
~/.ssh leaks in: no ssh_config, no agent, no known_hosts; the only host key accepted is the one
this tool generated for the VM and handed to it through cloud-init. Bulk data does not go through
invoke's runners (its in_stream reads one byte at a time): `Node.exec` opens a channel and writes
to it directly.
"""

from __future__ import annotations

import contextlib
import logging
import threading
import time
from collections.abc import Callable, Iterable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from orchestrator.errors import OrchestratorError

# paramiko logs each failed attempt (with a traceback) while a VM boots; those attempts are expected
# and retried here, and a final failure is reported in one paragraph. Keep its logger quiet unless
# the user configures logging (--debug).
logging.getLogger("paramiko").addHandler(logging.NullHandler())


class SshError(OrchestratorError):
    pass


class HostKeyMismatch(SshError):
    pass


class ConnectTimeout(SshError):
    pass


class ConnectionLost(SshError):
    """The connection dropped while a command was running; callers reconnect and resume."""


class Cancelled(SshError):
    """The node was cancelled (the run is being stopped): no more connections."""


@dataclass(frozen=True)
class Endpoint:
    name: str  # the VM, for messages
    host: str
    port: int
    user: str
    host_key: str  # "ssh-ed25519 AAAA...": the only key accepted
    key_file: Path  # the client's private key
    rank: int = 0


@dataclass(frozen=True)
class ConnectOptions:
    deadline_s: float = 600.0  # how long a booting VM may take to answer
    connect_timeout_s: float = 10.0
    keepalive_s: int = 15
    # paramiko's default 2 MB receive window caps downloads at 2 MB per round trip; 8 MB was
    # 2.3-3.6x faster at 50 ms (DESIGN.md). Larger was slower on loopback, so it is a setting.
    window_bytes: int = 8 << 20
    # The largest SSH packet we accept. OpenSSH sends up to what we advertise; fewer, larger packets
    # mean less per-packet work in paramiko's (Python) receive path.
    max_packet_bytes: int = 32 << 10
    first_backoff_s: float = 0.1
    max_backoff_s: float = 5.0


@dataclass
class CommandResult:
    exit_code: int
    stdout: bytes
    stderr: bytes

    @property
    def text(self) -> str:
        return self.stdout.decode(errors="replace")

    def check(self, what: str) -> CommandResult:
        if self.exit_code != 0:
            detail = self.stderr.decode(errors="replace").strip() or self.text.strip()
            raise SshError(f"{what} failed on the VM (exit {self.exit_code}): {detail[-2000:]}")
        return self


def _known_host_name(host: str, port: int) -> str:
    return host if port == 22 else f"[{host}]:{port}"


def load_client() -> None:
    """Import the SSH client (Fabric, paramiko: ~0.15 s) now, while the caller waits anyway (a local
    VM's host process starting on another core), not on the way to the first connection."""
    import fabric  # noqa: F401
    import paramiko  # noqa: F401


def open_connection(ep: Endpoint, opts: ConnectOptions) -> Any:
    """One attempt: a connected fabric.Connection, or the paramiko/socket error as it came."""
    import paramiko
    from fabric import Config, Connection

    conn = Connection(
        ep.host,
        user=ep.user,
        port=ep.port,
        config=Config(lazy=True),  # no ~/.ssh/config, no fabric.yaml: this tool decides
        connect_timeout=int(opts.connect_timeout_s),
        connect_kwargs={
            "key_filename": str(ep.key_file),
            "look_for_keys": False,
            "allow_agent": False,
            "banner_timeout": opts.connect_timeout_s,
            "auth_timeout": opts.connect_timeout_s,
            "transport_factory": lambda sock, **kw: paramiko.Transport(
                _no_delay(sock),
                default_window_size=opts.window_bytes,
                default_max_packet_size=opts.max_packet_bytes,
                **kw,
            ),
        },
    )
    client = conn.client
    client.set_missing_host_key_policy(paramiko.RejectPolicy())
    key_type, key_data = ep.host_key.split()[:2]
    client.get_host_keys().add(
        _known_host_name(ep.host, ep.port), key_type, paramiko.PKey.from_type_string(key_type, _b64(key_data))
    )
    try:
        conn.open()
    except paramiko.AuthenticationException:
        transport = client.get_transport()
        if transport is None or not transport.is_active():
            # The link died during authentication (a flaky network, a VM rebooting): retryable,
            # unlike a server that really refused the key.
            raise EOFError("connection lost during authentication") from None
        raise
    conn.transport.set_keepalive(opts.keepalive_s)
    return conn


def _no_delay(sock: Any) -> Any:
    """The socket with Nagle's algorithm off: each SSH request (a channel, an exec, its stdin's end)
    is a small packet, and Nagle would hold it for the peer's delayed ACK (40 ms on Linux) whenever
    an earlier one is still unacknowledged: ~40 ms on every command, measured on loopback."""
    import socket

    with contextlib.suppress(OSError, AttributeError):  # not a TCP socket (a proxy command's pipe)
        sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
    return sock


def _b64(data: str) -> bytes:
    import base64

    return base64.b64decode(data)


def connect(
    ep: Endpoint,
    opts: ConnectOptions | None = None,
    *,
    sleep: Callable[[float], None] = time.sleep,
    monotonic: Callable[[], float] = time.monotonic,
    stopped: Callable[[], bool] = lambda: False,
) -> Any:
    """Connect, retrying what a booting VM does (refused, reset, no banner) until the deadline, or
    until `stopped` says the run is stopping."""
    import paramiko

    opts = opts or ConnectOptions()
    deadline = monotonic() + opts.deadline_s
    backoff = opts.first_backoff_s
    attempts = 0
    while True:
        attempts += 1
        try:
            return open_connection(ep, opts)
        except paramiko.BadHostKeyException as e:
            raise HostKeyMismatch(
                f"{ep.name} ({ep.host}:{ep.port}) presented host key {e.key.get_name()} "
                f"{e.key.get_base64()[:24]}..., not the key generated for it. Refusing to connect: this "
                "may be someone else's machine. Run `orchestrator down` for this run and start again."
            ) from None
        except paramiko.AuthenticationException as e:
            raise SshError(f"{ep.name} refused the run's SSH key for user {ep.user}: {e}") from None
        except (OSError, EOFError, paramiko.SSHException) as e:
            if isinstance(e, paramiko.SSHException) and "not found in known_hosts" in str(e):
                raise HostKeyMismatch(
                    f"{ep.name} ({ep.host}:{ep.port}) offered no host key of the pinned type; refusing to connect."
                ) from None
            if stopped():
                raise Cancelled(f"{ep.name}: the run is stopping") from None
            if monotonic() + backoff > deadline:
                raise ConnectTimeout(
                    f"{ep.name} ({ep.host}:{ep.port}) did not answer SSH within {opts.deadline_s:.0f} s "
                    f"({attempts} attempts; last: {type(e).__name__}: {e}). Check the NSG allows your "
                    "address (ssh.allowed_cidrs) and the VM's boot diagnostics in the portal."
                ) from None
            sleep(backoff)
            backoff = min(backoff * 2, opts.max_backoff_s)


class Node:
    """One VM's SSH connection, re-established on demand."""

    def __init__(self, ep: Endpoint, opts: ConnectOptions | None = None) -> None:
        self.ep = ep
        self.opts = opts or ConnectOptions()
        self._conn: Any = None
        self._cancelled = False
        self._lock = threading.Lock()

    @property
    def label(self) -> str:
        return f"node{self.ep.rank}"

    def connection(self) -> Any:
        with self._lock:
            if self._cancelled:
                raise Cancelled(f"{self.ep.name}: the run is stopping")
            if self._conn is None or not self._alive():
                self._close()
                self._conn = connect(self.ep, self.opts, stopped=lambda: self._cancelled)
            return self._conn

    def _alive(self) -> bool:
        t = self._conn.transport if self._conn is not None else None
        return bool(t is not None and t.is_active())

    def reconnect(self) -> Any:
        with self._lock:
            self._close()
        return self.connection()

    def _close(self) -> None:
        if self._conn is not None:
            with contextlib.suppress(Exception):  # closing a dead connection may raise anything
                self._conn.close()
            self._conn = None

    def close(self) -> None:
        with self._lock:
            self._close()

    def cancel(self) -> None:
        """Close for good: threads blocked on this node fail fast instead of reconnecting. The flag is
        set before taking the lock, so a connect retrying inside it sees the flag and gives up."""
        self._cancelled = True
        with self._lock:
            self._close()

    def resume(self) -> None:
        """Allow connections again after cancel (an interrupted run still collects its outputs)."""
        with self._lock:
            self._cancelled = False

    def transport(self) -> Any:
        return self.connection().transport

    def channel(self, command: str) -> Any:
        """A new exec channel running `command`; the caller reads and writes it."""
        try:
            chan = self.transport().open_session(timeout=self.opts.connect_timeout_s)
            chan.exec_command(command)
        except (OSError, EOFError) as e:
            raise ConnectionLost(f"{self.ep.name}: {e}") from e
        except Exception as e:
            import paramiko

            if isinstance(e, paramiko.SSHException):
                raise ConnectionLost(f"{self.ep.name}: {e}") from e
            raise
        return chan

    def exec(
        self, command: str, stdin: bytes | Iterable[bytes] | None = None, timeout: float | None = None
    ) -> CommandResult:
        """Run a command, optionally feeding it bytes, and collect its output and exit code."""
        chan = self.channel(command)
        if timeout is not None:
            chan.settimeout(timeout)
        err_chunks: list[bytes] = []

        def drain_stderr() -> None:
            while True:
                data = chan.recv_stderr(65536)
                if not data:
                    return
                err_chunks.append(data)

        reader = threading.Thread(target=drain_stderr, daemon=True)
        reader.start()
        out_chunks: list[bytes] = []
        try:
            if stdin is not None:
                for chunk in [stdin] if isinstance(stdin, bytes) else stdin:
                    chan.sendall(chunk)
                chan.shutdown_write()
            while True:
                data = chan.recv(65536)
                if not data:
                    break
                out_chunks.append(data)
            code = chan.recv_exit_status()
        except (TimeoutError, OSError, EOFError) as e:
            raise ConnectionLost(f"{self.ep.name}: {e}") from e
        finally:
            reader.join(timeout=5)
            chan.close()
        if code == -1:
            raise ConnectionLost(f"{self.ep.name}: the connection closed before the command finished")
        return CommandResult(code, b"".join(out_chunks), b"".join(err_chunks))

    def run(self, command: str, what: str, stdin: bytes | None = None) -> CommandResult:
        """exec, retried once over a new connection if the old one died; non-zero exit raises."""
        try:
            return self.exec(command, stdin).check(what)
        except ConnectionLost:
            self.reconnect()
            return self.exec(command, stdin).check(what)
