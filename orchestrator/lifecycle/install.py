"""The install phase: the job's Python (`python:` in job.yaml), which each VM installs itself while it
boots, is waited for after the code is synced and before `setup`.

On Azure, cloud-init installs uv (pinned by hash), makes the environment and runs `uv pip install -r`
(templates/cloud-init.yaml.j2); on the local target the VM host does the same offline
(targets/localvm/host.py). Both write `~/.orch-install/log` and, last, `~/.orch-install/exit`; this
module follows the log over SSH (masked, through the reporter, saved as `logs/install-node<N>.log`)
until the exit file appears, recording an `install` phase per node. A failed install is the job
failing (verdict job-failed), with the end of its log in the message.
"""

from __future__ import annotations

import os
import time
from typing import Any

from orchestrator.bootstrap import INSTALL_DIR
from orchestrator.errors import OrchestratorError

POLL_S = 0.3
START_TIMEOUT_S = 15 * 60.0  # apt (python3-pip) runs before the install starts on Azure
MAX_RECONNECTS = 20
TAIL_LINES = 20


class InstallFailed(OrchestratorError):
    """The job's Python could not be installed (or the install never started)."""


def _poll_command(offset: int) -> str:
    # The exit code is read before the log, so once it is there the log read after it is complete.
    return (
        f'd="$HOME"/{INSTALL_DIR}; code=$(cat "$d/exit" 2>/dev/null); '
        f'if [ -e "$d/log" ]; then tail -c +{offset + 1} "$d/log"; seen=1; else seen=0; fi; '
        'printf "%s %s" "$seen" "$code" >&2'
    )


def follow_install(
    node: Any,
    sink: Any,
    *,
    offset: int = 0,
    start_timeout_s: float | None = None,
    poll_s: float = POLL_S,
    monotonic: Any = time.monotonic,
    sleep: Any = time.sleep,
) -> int:
    """Stream a node's install log from `offset` into `sink` until its exit code is written."""
    from orchestrator.remote.connect import ConnectionLost, SshError

    if start_timeout_s is None:
        start_timeout_s = float(os.environ.get("ORCH_INSTALL_START_TIMEOUT", START_TIMEOUT_S))
    started = monotonic()
    reconnects = 0
    while True:
        try:
            result = node.exec(_poll_command(offset), timeout=60)
        except (ConnectionLost, OSError, EOFError):
            reconnects += 1
            if reconnects > MAX_RECONNECTS:
                raise SshError(
                    f"Lost the connection to {node.ep.name} {MAX_RECONNECTS} times while waiting for its install."
                ) from None
            node.reconnect()
            continue
        if result.stdout:
            sink.write(result.stdout)
            offset += len(result.stdout)
        seen, _, code = result.stderr.decode(errors="replace").strip().partition(" ")
        if code.strip():
            try:
                return int(code.strip())
            except ValueError:
                return 254
        if seen != "1" and monotonic() - started > start_timeout_s:
            raise InstallFailed(
                f"The install of the job's Python never started on {node.ep.name} (no ~/{INSTALL_DIR}/log after "
                f"{start_timeout_s:.0f} s): cloud-init did not run it. Its own log is /var/log/cloud-init-output.log "
                "on the VM (`orchestrator exec RUN -- sudo tail /var/log/cloud-init-output.log` on a kept run)."
            )
        sleep(poll_s)


def _tail(path: Any, lines: int = TAIL_LINES) -> str:
    try:
        text = path.read_text(errors="replace")
    except OSError:
        return ""
    return "\n".join(text.rstrip("\n").splitlines()[-lines:])


def wait_for_install(ctx_or_none: Any, runner: Any, report: Any) -> None:
    """Wait on every node for the job's Python, streaming its install log; raises InstallFailed when
    a node's install failed. Nothing to do for a job without `python:`."""
    from orchestrator.remote.job import on_all
    from orchestrator.remote.run import LogSink

    spec = runner.spec
    python = getattr(spec, "python", None)
    if python is None:
        return
    nodes = runner.nodes
    multi = len(nodes) > 1
    files = runner.files
    files.logs.mkdir(parents=True, exist_ok=True)
    what = f"Python {python.version}" + (f" + {python.requirements}" if python.requirements else "")
    report.say(f"install: {what} (installing on the VM since it booted)")
    t0 = time.monotonic()

    def one(node: Any) -> tuple[int, int]:
        log = files.log("install", node.label)
        offset = log.stat().st_size if log.exists() else 0  # a kept run's install was shown already
        sink = LogSink(
            report.log,
            secrets=list(getattr(runner, "secrets", {}).values()),
            prefix=f"[{node.label}] " if multi else "",
            raw=log,
        )
        try:
            if ctx_or_none is None:
                return node.ep.rank, follow_install(node, sink, offset=offset)
            with ctx_or_none.phase("install", node.ep.rank):
                return node.ep.rank, follow_install(node, sink, offset=offset)
        finally:
            sink.close()

    codes = dict(on_all(nodes, one))
    failed = [(rank, code) for rank, code in sorted(codes.items()) if code != 0]
    if not failed:
        report.say(f"install: done in {time.monotonic() - t0:.1f} s")
        return
    rank, code = failed[0]
    label = next(n.label for n in nodes if n.ep.rank == rank)
    log = files.log("install", label)
    where = f" on {len(failed)} nodes" if len(failed) > 1 else f" on {label}"
    raise InstallFailed(
        f"The job's Python could not be installed{where} (exit code {code}), so the job did not start. The end of "
        f"its install log ({log}):\n{_tail(log)}\nFix python.requirements in {spec.source}; `orchestrator logs "
        f"{files.run_id} --phase install` shows the whole log."
    )
