"""Warm start (ORCH_WARM=1): commands run in a fork of a process that has already imported the tool.

Every command otherwise spends ~1 s of CPU importing the Azure SDK, pydantic and paramiko before it
does anything; fifty runs started at once on a 2-core machine spend half a minute on that alone.
With ORCH_WARM=1 the `orchestrator` command is a thin client: it hands its arguments, environment,
working directory and its stdin/stdout/stderr (the descriptors themselves, over a Unix socket) to a
server that forks; the fork becomes the command. The client relays the signals it gets (Ctrl-C,
SIGTERM, SIGHUP) and exits with the fork's exit status. If the client is killed outright (SIGKILL),
the fork kills itself the same way, so what a killed command leaves behind is unchanged.

The first warm command starts the server (one per user, Python and installed code) and waits for it;
the server exits after IDLE_S seconds with no command running, or as soon as the code it imported
changes on disk. Anything going wrong on the way falls back to running the command in-process.
`ssh` and `exec` always run in-process (they hand the terminal to the ssh client).
"""

from __future__ import annotations

import contextlib
import fcntl
import hashlib
import io
import json
import os
import select
import signal
import socket
import struct
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

IDLE_S = 60.0
START_TIMEOUT_S = 20.0
COLD_VERBS = {"ssh", "exec"}
RELAYED = (signal.SIGINT, signal.SIGTERM, signal.SIGHUP, signal.SIGQUIT, signal.SIGUSR1, signal.SIGUSR2)
PACKAGE = Path(__file__).resolve().parent
_STATUS = struct.Struct("!i")


def enabled(argv: list[str]) -> bool:
    return os.environ.get("ORCH_WARM") == "1" and not COLD_VERBS & set(argv)


# ------------------------------------------------------------------ the client


def run(argv: list[str]) -> int | None:
    """Run the command in a fork of the warm server: its exit status, or None to run it here."""
    path = socket_path()
    if path is None:
        return None
    sock = _connect(path) or _start_and_connect(path)
    if sock is None:
        return None
    with sock:
        try:
            cwd = os.getcwd()
        except OSError:  # a folder deleted under the shell: let the command say so itself
            return None
        ignored = [int(sig) for sig in RELAYED if signal.getsignal(sig) == signal.SIG_IGN]  # nohup's SIGHUP
        fds = [fd for fd in (0, 1, 2) if _is_open(fd)]
        request = {"argv": argv, "env": dict(os.environ), "cwd": cwd, "umask": _umask(), "fds": fds, "ignored": ignored}
        header = json.dumps(request).encode()
        try:
            socket.send_fds(sock, [_STATUS.pack(len(header)) + header], fds)
            accepted = _read_exactly(sock, 1)
        except OSError:
            accepted = b""
        if not accepted:  # the server was leaving as this command arrived: it never started
            return None

        def relay(signum: int, frame: Any) -> None:
            with contextlib.suppress(OSError):
                sock.send(bytes([signum]))

        for sig in RELAYED:
            if int(sig) not in ignored:
                signal.signal(sig, relay)
        try:
            got = _read_exactly(sock, _STATUS.size)
        except OSError:
            got = b""
        if len(got) < _STATUS.size:
            print("error: the warm-start server stopped during the command (ORCH_WARM=0 runs it here)", file=sys.stderr)
            return 1
        (code,) = _STATUS.unpack(got)
        if code < 0:  # the command died of a signal: so does this process, as a caller expects
            signal.signal(-code, signal.SIG_DFL)
            os.kill(os.getpid(), -code)
            return 128 - int(code)
        return int(code)


def _read_exactly(sock: socket.socket, size: int) -> bytes:
    got = b""
    while len(got) < size:
        try:
            chunk = sock.recv(size - len(got))
        except InterruptedError:
            continue
        if not chunk:
            break
        got += chunk
    return got


def spawn(module: str, args: list[str], *, cwd: Path, log: Path) -> bool:
    """Start `python -m module args...` (its main()) as a daemon forked from the warm server, if one serves this
    command (its own session, stdin /dev/null, stdout and stderr to `log`): whether it did."""
    if os.environ.get("ORCH_WARM") != "1" or (path := socket_path()) is None or (sock := _connect(path)) is None:
        return False
    with sock, open(log, "ab") as out, open(os.devnull, "rb") as null:
        request = {"detached": module, "argv": [module, *args], "env": dict(os.environ), "cwd": str(cwd)}
        header = json.dumps({**request, "umask": _umask(), "fds": [0, 1, 2], "ignored": []}).encode()
        try:
            socket.send_fds(sock, [_STATUS.pack(len(header)) + header], [null.fileno(), out.fileno(), out.fileno()])
            got = _read_exactly(sock, 1 + _STATUS.size)  # accepted, then its pid once in its own session
        except OSError:
            return False
    return len(got) == 1 + _STATUS.size


def socket_path() -> Path | None:
    """Where this command's server listens: in a folder only this user can enter (None: no such
    folder, or a path too long for a Unix socket, at most 107 bytes)."""
    chosen = os.environ.get("ORCH_WARM_DIR")
    base = Path(chosen or f"/tmp/orchestrator-{os.getuid()}/warm")
    path = base / f"{fingerprint()}.sock"
    if len(str(path)) >= 100:
        return None
    try:
        base.mkdir(parents=True, exist_ok=True, mode=0o700)
        # The folder and the one above it (in /tmp, anyone may make it first): ours, private, and
        # no symbolic link in between.
        for folder in (base,) if chosen else (base.parent, base):
            info = folder.lstat()
            if info.st_uid != os.getuid() or not os.path.isdir(folder) or os.path.islink(folder):
                return None
        if info.st_mode & 0o077:
            return None
    except OSError:
        return None
    return path


def fingerprint() -> str:
    """Which server may run this command: the same Python, the same installed code, unchanged."""
    h = hashlib.sha256(f"{sys.executable}\0{PACKAGE}\0{os.environ.get('PYTHONPATH', '')}\0".encode())
    h.update(str(_code_stamp()).encode())
    return h.hexdigest()[:16]


def _code_stamp() -> int:
    newest = 0
    for folder, _, files in os.walk(PACKAGE):
        for name in files:
            if name.endswith(".py"):
                with contextlib.suppress(OSError):
                    newest = max(newest, os.stat(os.path.join(folder, name)).st_mtime_ns)
    return newest


def _connect(path: Path) -> socket.socket | None:
    sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    try:
        sock.connect(str(path))
        if _peer_uid(sock) == os.getuid():  # it gets this command's environment: secrets included
            return sock
    except OSError:
        pass
    sock.close()
    return None


def _peer_uid(sock: socket.socket) -> int:
    pid_uid_gid = sock.getsockopt(socket.SOL_SOCKET, socket.SO_PEERCRED, struct.calcsize("3i"))
    return int(struct.unpack("3i", pid_uid_gid)[1])


def _start_and_connect(path: Path) -> socket.socket | None:
    """Start the server (one starter at a time; the others wait for it) and connect to it."""
    with open(path.with_suffix(".lock"), "a+") as lock:
        fcntl.flock(lock, fcntl.LOCK_EX)
        sock = _connect(path)
        if sock is not None:
            return sock
        with contextlib.suppress(FileNotFoundError):
            path.unlink()  # a server that died without cleaning up
        log = open(path.with_suffix(".log"), "ab")  # noqa: SIM115 (the server's, not ours)
        with log:
            # The same package as this command's, wherever the server starts (a checkout run with
            # `python -m orchestrator` without an install included).
            search = os.pathsep.join(p for p in (str(PACKAGE.parent), os.environ.get("PYTHONPATH", "")) if p)
            server = subprocess.Popen(
                [sys.executable, "-m", "orchestrator.warm", str(path)],
                stdin=subprocess.DEVNULL,
                stdout=log,
                stderr=log,
                start_new_session=True,
                close_fds=True,
                cwd="/",
                env={**os.environ, "PYTHONPATH": search},
            )
        deadline = time.monotonic() + START_TIMEOUT_S
        while time.monotonic() < deadline and server.poll() is None:
            if path.exists() and (sock := _connect(path)) is not None:
                return sock
            time.sleep(0.01)
        return None


def _is_open(fd: int) -> bool:
    try:
        os.fstat(fd)
    except OSError:
        return False
    return True


def _umask() -> int:
    mask = os.umask(0)
    os.umask(mask)
    return mask


# ------------------------------------------------------------------ the server


def serve(path: Path) -> None:
    """Import what commands use, listen, fork one child per command; leave when idle or stale."""
    _preload()
    stamp = fingerprint()
    idle_s = float(os.environ.get("ORCH_WARM_IDLE_S") or IDLE_S)
    listener = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    tmp = path.with_name(f".{path.name}.{os.getpid()}")
    listener.bind(str(tmp))
    listener.listen(128)
    os.replace(tmp, path)  # connectable the moment it appears
    mine = os.stat(path).st_ino
    wake_r, wake_w = os.pipe()
    os.set_blocking(wake_w, False)
    signal.set_wakeup_fd(wake_w)
    signal.signal(signal.SIGCHLD, lambda *_: None)
    stopping: list[int] = []
    signal.signal(signal.SIGTERM, lambda signum, _: stopping.append(signum))  # leave once no command runs
    children: dict[int, socket.socket] = {}  # commands running, each with its client's connection
    daemons: set[int] = set()  # started for a command (VM hosts): reaped, never waited for
    idle_since = time.monotonic()
    try:
        while True:
            ready, _, _ = select.select([listener.fileno(), wake_r], [], [], 1.0)
            if wake_r in ready:
                with contextlib.suppress(BlockingIOError):
                    os.read(wake_r, 512)
            _reap(children, daemons)
            if listener.fileno() in ready:
                with contextlib.suppress(BlockingIOError, InterruptedError):
                    conn, _ = listener.accept()
                    if _peer_uid(conn) != os.getuid():  # only its own user's commands run as that user
                        conn.close()
                        continue
                    sys.stdout.flush()
                    sys.stderr.flush()  # else a fork would write the server's buffered log lines again
                    pid = os.fork()
                    if pid == 0:
                        listener.close()
                        os.close(wake_r)
                        os.close(wake_w)
                        _child(conn, children)
                    children[pid] = conn  # until it says it is a daemon (_child), or ends
            if children:
                idle_since = time.monotonic()
                continue
            if stopping or time.monotonic() - idle_since > idle_s or fingerprint() != stamp:
                break
            if not _still_mine(path, mine):  # another server took the path: leave it the work
                break
    finally:
        with contextlib.suppress(OSError):
            if _still_mine(path, mine):
                path.unlink()


def _still_mine(path: Path, inode: int) -> bool:
    try:
        return os.stat(path).st_ino == inode
    except OSError:
        return False


def _reap(children: dict[int, socket.socket], daemons: set[int]) -> None:
    """Tell each finished command's client its exit status, as a shell would compute it; a daemon's
    client was answered when it started (the fork closed its copy of the connection then)."""
    for pid, answered in list(children.items()):
        if _client_gone(answered):
            daemons.add(pid)
            del children[pid]
            answered.close()
    while children or daemons:
        try:
            pid, status = os.waitpid(-1, os.WNOHANG)
        except ChildProcessError:
            return
        if pid == 0:
            return
        daemons.discard(pid)
        conn = children.pop(pid) if pid in children else None
        if conn is None:
            continue
        code = os.waitstatus_to_exitcode(status)  # -N: killed by signal N (the client dies of it too)
        with contextlib.suppress(OSError):
            conn.sendall(_STATUS.pack(code))
        conn.close()


def _client_gone(conn: socket.socket) -> bool:
    """Whether the client closed its end: a daemon's, once told it started; a killed command's."""
    try:
        return conn.recv(1, socket.MSG_PEEK | socket.MSG_DONTWAIT) == b""
    except (BlockingIOError, InterruptedError):
        return False
    except OSError:
        return True


def _child(conn: socket.socket, siblings: dict[int, socket.socket]) -> None:
    """In the fork: become the client's command, then exit with its status."""
    code = 1
    try:
        for other in siblings.values():
            other.close()
        signal.set_wakeup_fd(-1)
        for sig in (signal.SIGCHLD, signal.SIGTERM, signal.SIGHUP, signal.SIGQUIT, signal.SIGUSR1, signal.SIGUSR2):
            signal.signal(sig, signal.SIG_DFL)
        signal.signal(signal.SIGINT, signal.default_int_handler)
        request = _receive(conn)
        conn.sendall(b"\1")  # accepted: from here the command runs here, whatever happens
        import random
        import tempfile

        random.seed()  # else every fork draws the server's numbers
        tempfile.tempdir = None  # found again from this command's TMPDIR
        time.tzset()  # this command's TZ
        for sig in request.get("ignored", []):
            signal.signal(sig, signal.SIG_IGN)  # as its client had them (nohup: SIGHUP)
        sys.argv = list(request["argv"])
        if request.get("detached"):
            import importlib

            os.setsid()  # as start_new_session: a Ctrl-C in the user's terminal is not for it
            conn.sendall(_STATUS.pack(os.getpid()))  # after the accepted byte: in its own session now
            conn.close()
            importlib.import_module(str(request["detached"])).main()  # preloaded: run, not imported again
            code = 0
        else:
            _watch_client(conn)
            from orchestrator import cli

            code = cli.main()
    except SystemExit as e:
        code = e.code if isinstance(e.code, int) else 1
    except BaseException:  # a failure to take over the command: the client says so
        import traceback

        traceback.print_exc()
    finally:
        with contextlib.suppress(Exception):
            sys.stdout.flush()
            sys.stderr.flush()
        os._exit(code)


def _receive(conn: socket.socket) -> dict[str, Any]:
    """The request, read to its last byte and no further (what follows are relayed signals), and
    the client's descriptors put in place as 0, 1 and 2."""
    prefix, fds, _, _ = socket.recv_fds(conn, _STATUS.size, 3)  # the descriptors come with the first bytes
    prefix += _read_exactly(conn, _STATUS.size - len(prefix))
    (size,) = _STATUS.unpack(prefix)
    body = _read_exactly(conn, size)
    if len(body) < size:
        raise EOFError("the client went away")
    request: dict[str, Any] = json.loads(body)
    wanted = [int(fd) for fd in request["fds"]]
    null = os.open(os.devnull, os.O_RDWR)
    for target in (0, 1, 2):
        source = fds[wanted.index(target)] if target in wanted and wanted.index(target) < len(fds) else null
        os.dup2(source, target)
    for fd in [*fds, null]:
        if fd > 2:
            os.close(fd)
    os.chdir(request["cwd"])
    os.umask(int(request["umask"]))
    os.environ.clear()
    os.environ.update(request["env"])
    _reopen_stdio()
    return request


def _reopen_stdio() -> None:
    """sys.stdin/stdout/stderr as this interpreter would have made them for these descriptors."""
    unbuffered = bool(os.environ.get("PYTHONUNBUFFERED"))
    encoding = os.environ.get("PYTHONIOENCODING", "").split(":")[0] or "utf-8"

    def text(fd: int, mode: str, line: bool) -> io.TextIOWrapper:
        raw = open(fd, mode + "b", buffering=0 if unbuffered and mode == "w" else -1, closefd=False)  # noqa: SIM115
        return io.TextIOWrapper(raw, encoding=encoding, errors="strict" if fd == 0 else "backslashreplace",
                                line_buffering=line, write_through=unbuffered)  # fmt: skip

    sys.stdin = text(0, "r", False)
    sys.stdout = text(1, "w", os.isatty(1))
    sys.stderr = text(2, "w", True)


def _watch_client(conn: socket.socket) -> None:
    """Signals the client relays are raised here; the client gone without a word: die as it did."""
    import threading

    def watch() -> None:
        while True:
            try:
                data = conn.recv(64)
            except InterruptedError:
                continue
            except OSError:
                data = b""
            if not data:
                os.kill(os.getpid(), signal.SIGKILL)
                return
            for signum in data:
                os.kill(os.getpid(), signum)

    threading.Thread(target=watch, name="warm-client", daemon=True).start()


def _preload() -> None:
    """What `run` imports, so that forks start with it (each command imports the rest itself)."""
    import importlib

    for name in (
        "orchestrator.cli",
        "orchestrator.spec",
        "orchestrator.lifecycle.run",
        "orchestrator.azure.session",
        "orchestrator.azure.provision",
        "orchestrator.azure.preflight",
        "orchestrator.azure.teardown",
        "orchestrator.targets.local",
        "orchestrator.targets.emulated",
        "orchestrator.emulator",
        "orchestrator.emulator.transport",
        "orchestrator.emulator.compute",
        "orchestrator.remote.connect",
        "orchestrator.remote.job",
        "orchestrator.bootstrap",
        "orchestrator.state",
        "orchestrator.ui",
        "orchestrator.sshkeys",
        "orchestrator.azure.selfstop",
        "orchestrator.lifecycle.autostop",
        "orchestrator.emulator.persist",
        "orchestrator.emulator.openapi",
        "orchestrator.targets.localvm.manager",
        "orchestrator.targets.localvm.image",
        "orchestrator.targets.localvm.host",
        "asyncssh",
        "azure.mgmt.network",
        "azure.mgmt.compute",
        "azure.mgmt.resource",
        "azure.mgmt.resource.resources",
        "azure.core.rest._requests_basic",
        "azure.identity",
        "fabric",
        "paramiko",
        "jinja2",
        "rich.console",
        "zstandard",
        "netrc",
        "encodings.utf_8_sig",
        "encodings.unicode_escape",
    ):
        with contextlib.suppress(ImportError):
            importlib.import_module(name)
    from orchestrator.emulator import openapi

    openapi.SPECS.operations()  # the vendored REST specs, read and compiled once for every fork
    import gc

    gc.collect()
    gc.freeze()  # the imported objects stay out of every fork's collections (fewer pages copied)


if __name__ == "__main__":
    serve(Path(sys.argv[1]))
