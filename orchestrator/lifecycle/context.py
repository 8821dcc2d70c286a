"""One run in progress: its record, its files, its target and session, and how it reports.

The record (and so the resource group's name) is written before anything is created, so a process
killed at any point leaves something `down`, `status` and `gc` can act on. Phases are stored as
intervals (per node where they run on nodes); a heartbeat says the watching process is alive.
"""

from __future__ import annotations

import contextlib
import os
import threading
from collections.abc import Iterator
from pathlib import Path
from typing import Any

from orchestrator.lifecycle.interrupts import held_interrupts
from orchestrator.lifecycle.reporter import Reporter
from orchestrator.plan import resource_group_name
from orchestrator.runfiles import RunFiles
from orchestrator.spec import JobSpec
from orchestrator.state import RunStore, open_store
from orchestrator.targets import Target

HEARTBEAT_S = 10.0


class RunContext:
    def __init__(
        self, spec: JobSpec, target: Target, session: Any, run_id: str, report: Reporter, *, resume: bool = False
    ) -> None:
        """A new run (its record written now), or with resume an existing one this process takes over
        (`attach`, `cancel`): it becomes the run's owner."""
        self.spec, self.target, self.session, self.run_id = spec, target, session, run_id
        # Every candidate the job allows, in order: `spec` is pinned to the one provisioned later, and
        # a replacement for an evicted node may fall back to another in the same region and zone.
        self.candidates = list(spec.resources.candidates.ordered)
        self.report = report
        session.on_retry = report.say
        self.files = RunFiles(target.state, run_id).ensure()
        self.store: RunStore = open_store(target.state)
        self.group = resource_group_name(run_id)
        if resume:
            self.store.claim(run_id, os.getpid())
        else:
            self.store.create_run(
                run_id=run_id,
                job=spec.name,
                source=str(Path(spec.source).resolve()),  # `train`/`cost` from another folder read it too
                target=target.kind,
                subscription=session.subscription_id,
                resource_group=self.group,
                pid=os.getpid(),
                env=dict(spec.env),
            )
        self._beating = threading.Event()
        self._beat = threading.Thread(target=self._heartbeat, name="heartbeat", daemon=True)
        self._beat.start()

    def _heartbeat(self) -> None:
        while not self._beating.wait(HEARTBEAT_S):
            with contextlib.suppress(Exception):  # a busy store must not stop the run
                self.store.heartbeat(self.run_id)

    def close(self) -> None:
        self._beating.set()

    def state(self, state: str, **fields: Any) -> None:
        self.store.transition(self.run_id, state, **fields)
        if state == "gone":
            from orchestrator import sshconfig

            sshconfig.remove_entries(self.run_id)  # no `Host orch-<run>` entry outlives the VMs

    @contextlib.contextmanager
    def phase(self, name: str, node: int | None = None) -> Iterator[None]:
        import time

        pid = self.store.phase_start(self.run_id, name, node)
        self.report.phase(name, node, True, None)
        t0 = time.monotonic()
        try:
            yield
        finally:
            self.store.phase_end(pid)
            self.report.phase(name, node, False, time.monotonic() - t0)

    def resource_event(self, event: Any) -> None:
        r = event.resource
        self.store.resource(self.run_id, r.id, r.type, r.name, event.status)
        self.report.resource(event)

    def teardown(self) -> tuple[bool, str]:
        """Delete the run's group: (confirmed gone, error). Interrupts are held back until the DELETE
        is sent (from then on Azure finishes it regardless); after that a second one stops only the
        waiting, and the run is left `tearing-down` for `status` to show."""
        from orchestrator.azure.teardown import start_group_delete, wait_deleted

        group = self.group
        self.state("tearing-down")
        self.report.say(f"tearing down {group}")
        sending = f"still deleting {group}: the request must reach Azure first; then Ctrl-C stops the waiting"
        with self.phase("teardown"):
            try:
                with held_interrupts(lambda: self.report.say(sending), second_stops=False):
                    poller = start_group_delete(self.session, group)
                if poller is None:
                    self.store.mark_resources(self.run_id, "deleted")
                    return True, ""
                waiting = f"Azure is deleting {group}; press Ctrl-C again to stop waiting (the deletion goes on)"
                with held_interrupts(lambda: self.report.say(waiting), second_stops=True):
                    wait_deleted(poller, group)
            except KeyboardInterrupt:
                self.report.say(
                    f"stopped waiting; Azure goes on deleting {group} (`orchestrator status {self.run_id}`)"
                )
                self.store.mark_resources(self.run_id, "deleting")
                return False, "stopped waiting for the deletion"
            except Exception as e:  # recorded and shown: a failed teardown must be seen
                return False, f"deleting resource group {group} failed: {e}"
        self.store.mark_resources(self.run_id, "deleted")
        return True, ""
