"""Setup and training as detached processes on the VMs, with live logs that survive reconnects.

Each phase (setup, run) is started through the job wrapper from templates/ under `setsid nohup`, so
losing SSH never kills it. Its output goes to a log file on the VM; `follow` streams that file
from a byte offset with `tail -F --pid`, which ends when the wrapper does, and returns the exit code
the wrapper recorded. After a dropped connection it reconnects and resumes from the offset already
shown: no line is lost and none is printed twice.
"""

from __future__ import annotations

import io
import shlex
import tarfile
import threading
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path

from orchestrator.bootstrap import TEMPLATES, render
from orchestrator.remote.connect import ConnectionLost, Node, SshError
from orchestrator.remote.layout import RemoteLayout, rq

EXIT_NO_STATUS = 254  # the wrapper died without recording an exit code (VM killed, OOM...)


def _env_value(value: str) -> str:
    return rq(value) if value.startswith("~/") else shlex.quote(value)


def env_file(env: Mapping[str, str]) -> bytes:
    return "".join(f"{k}={_env_value(v)}\n" for k, v in env.items()).encode()


def job_env(
    *,
    run_id: str,
    layout: RemoteLayout,
    rank: int,
    num_nodes: int,
    master_addr: str,
    user_env: Mapping[str, str],
    secrets: Mapping[str, str],
) -> dict[str, str]:
    env = dict(user_env)
    env.update(secrets)
    env.update(
        {
            "ORCH_RUN_ID": run_id,
            "ORCH_OUTPUT_DIR": layout.outputs,
            "ORCH_CHECKPOINT_DIR": layout.checkpoints,
            "ORCH_NODE_RANK": str(rank),
            "ORCH_NUM_NODES": str(num_nodes),
            "ORCH_MASTER_ADDR": master_addr,
        }
    )
    return env


def _bundle(files: Mapping[str, tuple[bytes, int]]) -> bytes:
    buf = io.BytesIO()
    with tarfile.open(fileobj=buf, mode="w") as tar:
        for name, (data, mode) in files.items():
            info = tarfile.TarInfo(name)
            info.size, info.mode = len(data), mode
            tar.addfile(info, io.BytesIO(data))
    return buf.getvalue()


def start_phase(node: Node, layout: RemoteLayout, phase: str, commands: list[str], env: Mapping[str, str]) -> bool:
    """Start a phase unless it was already started (then it is left alone); True if started now."""
    pdir = layout.phase(phase)
    wrapper = render(
        "job-wrapper.sh.j2", run_id=layout.run_id, phase=phase, phase_dir=rq(pdir), workdir=rq(layout.job_dir)
    )
    script = "set -e\n" + "\n".join(commands) + "\n"
    follower = (TEMPLATES / "log-follower.py").read_bytes()
    bundle = _bundle(
        {
            "command.sh": (script.encode(), 0o600),
            "env": (env_file(env), 0o600),
            "wrapper.sh": (wrapper.encode(), 0o700),
            "log-follower.py": (follower, 0o600),
        }
    )
    cmd = (
        f"umask 077 && mkdir -p {rq(pdir)} && cd {rq(pdir)} && "
        "if [ -e pid ]; then echo existing; else tar -x -f - && "
        "{ setsid nohup /bin/bash ./wrapper.sh </dev/null >/dev/null 2>&1 & echo $! > pid; } && echo started; fi"
    )
    result = node.run(cmd, f"starting {phase} on {node.ep.name}", stdin=bundle)
    return result.text.strip().endswith("started")


class LogSink:
    """Turns a node's raw log bytes into masked, optionally prefixed lines for the user."""

    def __init__(
        self,
        emit: Callable[[str], None],
        *,
        secrets: Sequence[str] = (),
        prefix: str = "",  # type: ignore[assignment]
        raw: Path | None = None,
    ) -> None:
        self.emit = emit
        self.secrets = sorted((s for s in secrets if s), key=len, reverse=True)
        self.prefix = prefix
        self.raw = open(raw, "ab") if raw else None  # noqa: SIM115 - closed in close()
        self._buf = b""
        self._lock = threading.Lock()

    def mask(self, text: str) -> str:
        for s in self.secrets:
            text = text.replace(s, "****")
        return text

    def write(self, data: bytes) -> None:
        with self._lock:
            self._buf += data
            while b"\n" in self._buf:
                line, self._buf = self._buf.split(b"\n", 1)
                self._line(line)
            if len(self._buf) > 1 << 16:  # a progress bar without newlines: show it anyway
                self._line(self._buf)
                self._buf = b""

    def _line(self, line: bytes) -> None:
        text = self.mask(line.decode("utf-8", errors="replace").rstrip("\r"))
        if self.raw:
            self.raw.write(text.encode() + b"\n")
            self.raw.flush()
        self.emit(self.prefix + text)

    def close(self) -> None:
        with self._lock:
            if self._buf:
                self._line(self._buf)
                self._buf = b""
            if self.raw:
                self.raw.close()
                self.raw = None


@dataclass
class FollowResult:
    exit_code: int
    bytes: int
    reconnects: int


def follow(
    node: Node,
    layout: RemoteLayout,
    phase: str,
    sink: LogSink,
    *,
    offset: int = 0,
    max_reconnects: int = 20,
    idle_check_s: float = 30.0,
) -> FollowResult:
    """Stream the phase's log from `offset` until it ends; returns its exit code."""
    pdir = rq(layout.phase(phase))
    reconnects = 0
    while True:
        # A phase whose pid file is missing never started (or the VM was replaced): 254, not a hang.
        cmd = f"cd {pdir} 2>/dev/null && exec python3 log-follower.py {offset} || exit {EXIT_NO_STATUS}"
        try:
            chan = node.channel(cmd)
            chan.settimeout(idle_check_s)
            while True:
                try:
                    data = chan.recv(65536)
                except TimeoutError:
                    # A quiet job is normal; a dead link is not. send_ignore fails on a broken link.
                    transport = chan.get_transport()
                    if transport is None or not transport.is_active():
                        raise ConnectionLost(f"{node.ep.name}: connection lost") from None
                    transport.send_ignore()
                    continue
                if not data:
                    break
                offset += len(data)
                sink.write(data)
            code = chan.recv_exit_status()
            if code != -1:
                return FollowResult(code, offset, reconnects)
        except (ConnectionLost, OSError, EOFError):
            pass
        reconnects += 1
        if reconnects > max_reconnects:
            raise SshError(
                f"Lost the connection to {node.ep.name} {max_reconnects} times while following "
                f"{phase}; it keeps running there. Reattach later with `orchestrator logs`."
            )
        node.reconnect()


def phase_exit_code(node: Node, layout: RemoteLayout, phase: str) -> int | None:
    """The recorded exit code, or None while the phase runs (or never started)."""
    pdir = rq(layout.phase(phase))
    out = node.run(f"cat {pdir}/exit_code 2>/dev/null || true", "reading the exit code").text.strip()
    return int(out) if out.lstrip("-").isdigit() else None
