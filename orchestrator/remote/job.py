"""A job on a set of connected VMs: sync the code, run setup, run training, bring the outputs home.

Every step runs on all nodes at once. Output streams live, prefixed by node when there are several.
Artifacts are collected whether training succeeded or not: a failed run's logs and checkpoints
are what the user needs most.
"""

from __future__ import annotations

import json
import os
from collections.abc import Callable, Mapping
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, TypeVar

from orchestrator.errors import UserInputError
from orchestrator.remote import artifacts, run, sync
from orchestrator.remote.connect import Node, SshError
from orchestrator.remote.layout import RemoteLayout
from orchestrator.runfiles import RunFiles
from orchestrator.spec import JobSpec

T = TypeVar("T")
Say = Callable[[str], None]


@dataclass
class PhaseResult:
    name: str
    exit_codes: dict[int, int]  # rank -> exit code

    @property
    def exit_code(self) -> int:
        """The first non-zero code by rank, or 0."""
        return next((c for _, c in sorted(self.exit_codes.items()) if c != 0), 0)


@dataclass
class JobOutcome:
    phases: list[PhaseResult] = field(default_factory=list)
    sync: list[sync.SyncReport] = field(default_factory=list)
    artifacts: artifacts.CollectReport | None = None
    metrics: dict[str, Any] = field(default_factory=dict)
    error: str = ""

    @property
    def exit_code(self) -> int:
        return next((p.exit_code for p in self.phases if p.exit_code != 0), 0)

    @property
    def failed_phase(self) -> str | None:
        return next((p.name for p in self.phases if p.exit_code != 0), None)


def forwarded_secrets(spec: JobSpec, environ: Mapping[str, str] | None = None) -> dict[str, str]:
    environ = os.environ if environ is None else environ
    missing = [s for s in spec.secrets if s not in environ]
    if missing:
        raise UserInputError(
            f"{spec.source}: secrets: {', '.join(missing)} not set in your environment; export "
            f"{'it' if len(missing) == 1 else 'them'} (the values are forwarded to the VM, never logged) or "
            "remove them from `secrets`."
        )
    return {s: environ[s] for s in spec.secrets}


def on_all(nodes: list[Node], fn: Callable[[Node], T]) -> list[T]:
    """fn on every node at once. If one fails, or the user interrupts, the others are cancelled
    rather than waited for (a follow would otherwise run until training ends)."""
    pool = ThreadPoolExecutor(max_workers=max(1, len(nodes)))
    try:
        return list(pool.map(fn, nodes))
    except BaseException:
        for node in nodes:
            node.cancel()
        raise
    finally:
        pool.shutdown(wait=False, cancel_futures=True)


class JobRunner:
    def __init__(
        self,
        spec: JobSpec,
        nodes: list[Node],
        layout: RemoteLayout,
        files: RunFiles,
        *,
        network_env: Mapping[str, str],
        emit: Say,
        say: Say,
        secrets: Mapping[str, str],
        upload_limit: int = sync.DEFAULT_LIMIT_BYTES,
        on_phase: Callable[[str], None] = lambda phase: None,
    ) -> None:
        self.spec = spec
        self.nodes = nodes
        self.layout = layout
        self.files = files
        self.network_env = dict(network_env)  # ORCH_MASTER_ADDR/PORT and the target's pins
        self.emit = emit  # job output lines
        self.say = say  # orchestrator's own progress lines
        self.secrets = dict(secrets)
        self.upload_limit = upload_limit
        self.on_phase = on_phase  # run states for the store: syncing, setup, training, collecting

    def env(self, node: Node) -> dict[str, str]:
        return (
            run.job_env(
                run_id=self.layout.run_id,
                layout=self.layout,
                rank=node.ep.rank,
                num_nodes=len(self.nodes),
                master_addr=self.network_env.get("ORCH_MASTER_ADDR", ""),
                user_env=self.spec.env,
                secrets=self.secrets,
            )
            | self.network_env
            | ({"ORCH_SPOT": "1"} if self.spec.resources.spot else {})  # the wrapper watches for Preempt
        )

    def connect(self) -> None:
        on_all(self.nodes, lambda n: n.connection())

    def upload(self) -> list[sync.SyncReport]:
        # The last sync's state, so a re-sync to a kept VM is one guarded command (see sync.upload).
        state_file = self.files.sync_state
        previous = _load_state(state_file)

        def one(node: Node) -> sync.SyncReport:
            report, state = sync.upload(
                node, self.spec.workdir_path, self.layout, limit=self.upload_limit, previous=previous
            )
            if node.ep.rank == 0:
                state_file.write_text(
                    json.dumps({"zstd": state.zstd, "entries": {k: v.__dict__ for k, v in state.entries.items()}})
                )
            return report

        reports = on_all(self.nodes, one)
        self.say(f"synced {reports[0].summary()}" + (f" to {len(reports)} nodes" if len(reports) > 1 else ""))
        return reports

    def restart_phases(self) -> None:
        """Clear finished phases so they can run again; refuse while one is still running."""
        from orchestrator.remote.layout import rq

        phases = rq(f"{self.layout.root}/phases")

        def one(node: Node) -> None:
            result = node.exec(
                f'cd {phases} 2>/dev/null || exit 0; for p in *; do [ -d "$p" ] || continue; '
                f'if [ -e "$p/exit_code" ]; then rm -rf "$p"; else echo "$p"; fi; done'
            )
            busy = result.text.split()
            if busy:
                raise SshError(
                    f"{node.ep.name} is still running {', '.join(busy)}; follow it with `orchestrator "
                    f"logs {self.layout.run_id} -f` or wait for it to end."
                )

        on_all(self.nodes, one)

    def phase(self, name: str, commands: list[str]) -> PhaseResult:
        for node in self.nodes:
            run.start_phase(node, self.layout, name, commands, self.env(node))
        return self.follow(name)

    def follow(self, name: str, offsets: Mapping[int, int] | None = None) -> PhaseResult:
        multi = len(self.nodes) > 1
        self.files.logs.mkdir(parents=True, exist_ok=True)

        def one(node: Node) -> tuple[int, int]:
            sink = run.LogSink(
                self.emit,
                secrets=list(self.secrets.values()),
                prefix=f"[{node.label}] " if multi else "",
                raw=self.files.log(name, node.label),
            )
            try:
                result = run.follow(node, self.layout, name, sink, offset=(offsets or {}).get(node.ep.rank, 0))
            finally:
                sink.close()
            return node.ep.rank, result.exit_code

        return PhaseResult(name, dict(on_all(self.nodes, one)))

    def collect(self, dest: Path) -> artifacts.CollectReport:
        """Rank 0's outputs into dest, the other ranks' into dest/nodes/<rank>; dest is resolved once
        (artifacts.resolve_destination: `<dest>/<run id>` when dest holds files the tool did not
        put there), so every rank lands under the same folder. The order does not matter: replacing
        rank 0's folder carries the other ranks' folders of the same run over. The report is rank
        0's, with every rank's skipped members (prefixed nodes/<rank>/ for the others)."""
        base = artifacts.resolve_destination(dest, self.layout.run_id)
        first, others = self.nodes[0], self.nodes[1:]
        report = artifacts.collect(first, self.layout, base, self.spec.artifacts, rank=first.ep.rank)
        if others:
            reports = on_all(
                others,
                lambda n: artifacts.collect(
                    n, self.layout, base / "nodes" / str(n.ep.rank), self.spec.artifacts, rank=n.ep.rank
                ),
            )
            for node, other in zip(others, reports, strict=True):
                report.skipped += [(f"nodes/{node.ep.rank}/{path}", why) for path, why in other.skipped]
        return report

    def execute(self, artifacts_dir: Path) -> JobOutcome:
        outcome = JobOutcome()
        self.on_phase("syncing")
        outcome.sync = self.upload()
        try:
            if self.spec.setup:
                self.on_phase("setup")
                self.say("setup: " + " && ".join(self.spec.setup))
                outcome.phases.append(self.phase("setup", self.spec.setup))
            if outcome.exit_code == 0:
                self.on_phase("training")
                self.say(f"run: {self.spec.run}")
                outcome.phases.append(self.phase("run", [self.spec.run]))
        finally:
            self.on_phase("collecting")
            try:
                outcome.artifacts = self.collect(artifacts_dir)
            except (artifacts.ArtifactError, SshError) as e:
                # Reported beside the job's own result, which must not be hidden by it.
                outcome.error = str(e)
            metrics = artifacts_dir / "metrics.json"
            if metrics.is_file():
                try:
                    outcome.metrics = json.loads(metrics.read_text())
                except ValueError:
                    outcome.error = "metrics.json is not valid JSON"
        return outcome


def _load_state(path: Path) -> sync.SyncState | None:
    try:
        raw = json.loads(path.read_text())
        return sync.SyncState({k: sync.FileEntry(**v) for k, v in raw["entries"].items()}, bool(raw["zstd"]))
    except (OSError, ValueError, TypeError, KeyError):
        return None
