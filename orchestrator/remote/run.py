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
from orchestrator.remote.masking import StreamMasker

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
            "preempt-watch.py": ((TEMPLATES / "preempt-watch.py").read_bytes(), 0o600),
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
    """Turns a node's raw log bytes into masked, optionally prefixed lines for the user.

    Masking works on the byte stream (remote/masking.py), so a multi-line secret or one cut across
    two reads is masked too; the local log file (`raw`) and `emit` only ever see masked bytes. Bytes
    that could begin a secret are held back at most `hold_s`: a timer releases them, and a progress
    bar redrawn with `\\r` is emitted frame by frame (the latest frame at each tick) so it stays live.
    """

    def __init__(
        self,
        emit: Callable[[str], None],
        *,
        secrets: Sequence[str] = (),
        prefix: str = "",
        raw: Path | None = None,
        hold_s: float = 0.1,
    ) -> None:
        self.emit = emit
        self.secrets = [s for s in secrets if s]
        self.prefix = prefix
        self.raw = open(raw, "ab") if raw else None  # noqa: SIM115 - closed in close()
        self.hold_s = hold_s
        self._masker = StreamMasker(self.secrets, hold_s=hold_s)
        self._file_buf = b""  # masked, not yet in the file: the rest of a line
        self._line_buf = b""  # masked, not yet emitted: the rest of a line
        self._lock = threading.Lock()
        self._timer: threading.Timer | None = None
        self._closed = False
        self._frames_shown = False  # frames of the current line were emitted by the timer

    def mask(self, text: str) -> str:
        """Mask a complete piece of text (not a stream)."""
        masker = StreamMasker(self.secrets)
        return (masker.feed(text.encode()) + masker.flush()).decode("utf-8", errors="replace")

    def write(self, data: bytes) -> None:
        with self._lock:
            self._out(self._masker.feed(data))
            self._arm()

    def _out(self, masked: bytes, *, final: bool = False) -> None:
        if not masked and not final:
            return
        if self.raw:
            self._file_buf += masked
            cut = max(self._file_buf.rfind(b"\n"), self._file_buf.rfind(b"\r")) + 1
            if final or len(self._file_buf) > 1 << 16:
                cut = len(self._file_buf)
            if cut:
                self.raw.write(self._file_buf[:cut])
                self.raw.flush()
                self._file_buf = self._file_buf[cut:]
        self._line_buf += masked
        while b"\n" in self._line_buf:
            line, self._line_buf = self._line_buf.split(b"\n", 1)
            self._line(line, end=True)
        if (final and self._line_buf) or len(self._line_buf) > 1 << 16:
            self._line(self._line_buf, end=True)  # a progress bar without newlines: show it anyway
            self._line_buf = b""

    def _line(self, line: bytes, *, end: bool) -> None:
        # A line redrawn with \r shows as its last frame, as a terminal would show it.
        frames = [f for f in line.split(b"\r") if f]
        if not frames and self._frames_shown:
            self._frames_shown = not end  # the line's frames were shown by the timer already
            return
        self._frames_shown = not end
        text = frames[-1] if frames else b""
        self.emit(self.prefix + text.decode("utf-8", errors="replace"))

    def _tick(self) -> None:
        with self._lock:
            self._timer = None
            if self._closed:
                return
            self._out(self._masker.poll())
            # A progress bar: emit its latest complete frame, keep the frame being drawn.
            cut = self._line_buf.rfind(b"\r")
            if cut > 0:
                self._line(self._line_buf[:cut], end=False)
                self._line_buf = self._line_buf[cut + 1 :]
            self._arm()

    def _arm(self) -> None:
        if self._timer is not None or self._closed:
            return
        if not self._masker.holding and self._line_buf.rfind(b"\r") <= 0:
            return
        self._timer = threading.Timer(self.hold_s, self._tick)
        self._timer.daemon = True
        self._timer.start()

    def close(self) -> None:
        with self._lock:
            self._closed = True
            if self._timer is not None:
                self._timer.cancel()
                self._timer = None
            self._out(self._masker.flush(), final=True)
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
