"""A command on a local VM under a pseudo-terminal, when the SSH client asked for one (`ssh -t`,
`orchestrator ssh RUN` without a command): line editing, job control, full-screen programs and the
window size, as the Azure VM's sshd gives them.

The command gets the PTY's slave as its controlling terminal in a session of its own; the client's
bytes go to the master and the master's to the client (a PTY merges stdout and stderr, as sshd's
does). A window-size change from the client reaches the command as SIGWINCH.
"""

from __future__ import annotations

import asyncio
import contextlib
import fcntl
import os
import pty
import signal
import struct
import termios
from collections.abc import Callable
from typing import Any


def _set_size(fd: int, width: int, height: int, pixwidth: int = 0, pixheight: int = 0) -> None:
    with contextlib.suppress(OSError):
        fcntl.ioctl(fd, termios.TIOCSWINSZ, struct.pack("HHHH", height, width, pixwidth, pixheight))


def _controlling_terminal() -> None:  # in the child, before exec
    os.setsid()
    fcntl.ioctl(0, termios.TIOCSCTTY, 0)


async def run_in_pty(
    process: Any,
    command: str,
    *,
    cwd: str,
    env: dict[str, str],
    spawned: Callable[[int], None],
    ended: Callable[[int], None],
) -> None:
    """Run `command` with bash under a new PTY for this SSH channel; exit the channel with its code.
    If the client goes away first, the command's whole session is killed (sshd hangs up alike)."""
    import asyncssh

    master, slave = pty.openpty()
    width, height, pixwidth, pixheight = process.term_size
    if width and height:
        _set_size(master, width, height, pixwidth, pixheight)
    env = {**env, "TERM": process.term_type or "xterm"}
    try:
        proc = await asyncio.create_subprocess_exec(
            "/bin/bash",
            "-c",
            command,
            cwd=cwd,
            env=env,
            stdin=slave,
            stdout=slave,
            stderr=slave,
            preexec_fn=_controlling_terminal,
        )
    finally:
        os.close(slave)
    spawned(proc.pid)
    os.set_blocking(master, False)
    loop = asyncio.get_running_loop()
    output_done = loop.create_future()

    def readable() -> None:
        try:
            data = os.read(master, 1 << 16)
        except BlockingIOError:
            return
        except OSError:  # EIO: every holder of the slave side is gone
            data = b""
        if not data:
            loop.remove_reader(master)
            if not output_done.done():
                output_done.set_result(None)
            return
        process.stdout.write(data)

    loop.add_reader(master, readable)

    async def feed() -> None:
        while True:
            try:
                data = await process.stdin.read(1 << 16)
            except asyncssh.TerminalSizeChanged as change:
                _set_size(master, change.width, change.height, change.pixwidth, change.pixheight)
                with contextlib.suppress(ProcessLookupError):
                    os.killpg(proc.pid, signal.SIGWINCH)
                continue
            if not data:
                return
            view = memoryview(data)
            while view:
                try:
                    view = view[os.write(master, view) :]
                except BlockingIOError:
                    await asyncio.sleep(0.01)

    feeder = asyncio.ensure_future(feed())
    closed = asyncio.ensure_future(process.channel.wait_closed())
    exited = asyncio.ensure_future(proc.wait())
    await asyncio.wait({exited, closed}, return_when=asyncio.FIRST_COMPLETED)
    broken = not exited.done()
    if broken:
        with contextlib.suppress(ProcessLookupError):
            os.killpg(proc.pid, signal.SIGKILL)
    else:  # what the command wrote last is still in the PTY: let it drain
        with contextlib.suppress(TimeoutError):
            await asyncio.wait_for(asyncio.shield(output_done), timeout=2.0)
    loop.remove_reader(master)
    os.close(master)
    for task in (feeder, closed):
        task.cancel()
    await asyncio.gather(feeder, closed, return_exceptions=True)
    code = await exited
    ended(proc.pid)
    if not broken:
        process.exit(code if code >= 0 else 128 - code)
