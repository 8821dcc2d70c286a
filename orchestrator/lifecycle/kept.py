"""Working on a provisioned (kept) run from a separate process: train, exec, collect."""

from __future__ import annotations

import difflib
import os
import time
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any

from orchestrator.errors import UserInputError
from orchestrator.lifecycle import install, recovery, steps
from orchestrator.lifecycle.outcome import RunOutcome
from orchestrator.lifecycle.reporter import Reporter
from orchestrator.runfiles import NodeRecord, RunFiles
from orchestrator.state import RunRecord, open_store
from orchestrator.targets import Target, target_for


def unknown_run(run_id: str, known: list[str]) -> UserInputError:
    close = difflib.get_close_matches(run_id, known, n=3, cutoff=0.6)
    hint = f" Did you mean {', '.join(close)}?" if close else ""
    return UserInputError(f"no run {run_id}; `orchestrator ls` lists runs.{hint}")


def record_of(run_id: str, target: Target) -> RunRecord:
    store = open_store(target.state)
    record = store.get(run_id)
    if record is None:
        raise unknown_run(run_id, store.run_ids())
    return record


def running_record(run_id: str, target: Target) -> RunRecord:
    """The record of a run whose VMs should be up; a run whose VMs deallocated themselves
    (autostop), noticed now or earlier, is refused with what to do instead of dialling a VM that is off."""
    from orchestrator.lifecycle import autostop

    record = autostop.refresh(open_store(target.state), target, [record_of(run_id, target)])[0]
    if record.state == "stopped":
        raise UserInputError(
            f"run {run_id} is stopped: its VMs deallocated themselves (autostop). `orchestrator collect {run_id}` "
            f"brings its outputs home and tears it down; `orchestrator train {run_id}` starts it and trains again."
        )
    return record


@contextmanager
def attached(run_id: str, target: Target) -> Iterator[tuple[RunRecord, list[NodeRecord], list[Any], Target]]:
    """(record, node records, SSH nodes, target) of a provisioned run, reachable with its own keys."""
    record = record_of(run_id, target)
    files = RunFiles(target.state, run_id)
    records = files.read_nodes()
    if records is None:
        raise UserInputError(
            f"run {run_id} has no provisioned nodes; `orchestrator provision JOB` (or `run --keep`) makes "
            "one you can work on."
        )
    if record.torn_down:
        raise UserInputError(f"run {run_id} has been torn down; provision a new one.")
    record = running_record(run_id, target)
    where = target_for(record, target)
    with where.session():  # the local target serves its VMs while this session is open
        nodes = steps.ssh_nodes(where, records, files.client_key)
        try:
            yield record, records, nodes, where
        finally:
            for node in nodes:
                node.cancel()


def job_env_secrets(spec: Any) -> dict[str, str]:
    """Secrets are re-read from the local environment each time, never stored."""
    from orchestrator.remote.job import forwarded_secrets

    return forwarded_secrets(spec)


def _spec_of(record: RunRecord) -> Any:
    from orchestrator.spec import load_spec

    spec = load_spec(record.source)
    if record.env:  # --env given at provision time
        spec = spec.model_copy(update={"env": {**spec.env, **record.env}})
    return spec


def exec_command(run_id: str, target: Target, command: str, *, emit: Any, node_rank: int | None = None) -> int:
    """Run a command in the job folder on the run's VMs (all, or one), with the job's environment;
    the first non-zero exit code."""
    from orchestrator.remote.job import on_all
    from orchestrator.remote.layout import RemoteLayout, rq
    from orchestrator.remote.masking import StreamMasker
    from orchestrator.remote.run import env_file

    layout = RemoteLayout(run_id)
    with attached(run_id, target) as (record, records, nodes, where):
        spec = _spec_of(record)
        secrets = job_env_secrets(spec)
        chosen = [n for n in nodes if node_rank is None or n.ep.rank == node_rank]
        if not chosen:
            raise UserInputError(f"run {run_id} has no node {node_rank}; it has {len(nodes)}.")
        multi = len(chosen) > 1
        network = where.job_network_env(records)

        def one(node: Any) -> int:
            from orchestrator.remote.run import job_env

            env = (
                job_env(
                    run_id=run_id,
                    layout=layout,
                    rank=node.ep.rank,
                    num_nodes=len(nodes),
                    master_addr=network["ORCH_MASTER_ADDR"],
                    user_env=spec.env,
                    secrets=secrets,
                )
                | network
            )
            script = (
                f"set -a; . /dev/stdin; set +a; mkdir -p {rq(layout.job_dir)} && cd {rq(layout.job_dir)} && {command}"
            )
            result = node.exec(f"bash -c {_q(script)}", stdin=env_file(env))
            masker = StreamMasker(list(secrets.values()))
            text = (masker.feed(result.stdout + result.stderr) + masker.flush()).decode(errors="replace")
            for line in text.splitlines():
                emit((f"[{node.label}] " if multi else "") + line)
            return int(result.exit_code)

        codes = on_all(chosen, one)
        return next((c for c in codes if c != 0), 0)


def _q(text: str) -> str:
    import shlex

    return shlex.quote(text)


def _woken(run_id: str, target: Target, report: Reporter) -> tuple[RunRecord, list[str]]:
    """The run's record, and the VMs started for this command: a run whose VMs deallocated
    themselves (autostop) is `stopped`, and its VMs are started again (same disks, addresses and
    host keys); a kept or detached one with autostop gets any VM that stopped alone started too."""
    from orchestrator.lifecycle import autostop

    record = autostop.refresh(open_store(target.state), target, [record_of(run_id, target)])[0]
    started: list[str] = []
    if record.state == "stopped" or (record.autostop and not record.torn_down and record.state in {"kept", "detached"}):
        started = autostop.start_stopped(record, target, report.say)
    return record, started


def rearm(run_id: str, target: Target, started: list[str]) -> None:
    """The autostop agents of VMs started again for a command that leaves them up (`train`,
    `attach --keep`): their agents ended when they deallocated."""
    from orchestrator.lifecycle import autostop

    record = record_of(run_id, target)
    seconds = record.autostop
    if not started or not seconds or record.torn_down or record.state not in {"kept", "detached"}:
        return
    with attached(run_id, target) as (record, records, nodes, where):
        again = [n for n in nodes if any(r.rank == n.ep.rank and r.vm_name in started for r in records)]
        autostop.start_agents(where, record.subscription, record.resource_group, records, again, seconds)


def collect(run_id: str, target: Target, report: Reporter, dest: Path | None = None) -> Any:
    """Bring a kept run's outputs home; a stopped run's VMs are started for it and torn down after
    (deallocated again if the collection fails: nothing else would stop them)."""
    from orchestrator.lifecycle import autostop
    from orchestrator.lifecycle.run import artifacts_destination

    record, started = _woken(run_id, target, report)
    stopped = record.state == "stopped"
    try:
        out = _collect(run_id, target, report, dest, artifacts_destination)
    except BaseException:
        autostop.stop_again(record, target, started, report.say)
        raise
    if stopped:
        from orchestrator.lifecycle.cleanup import down

        report.say(f"tearing down {run_id}: its outputs are in {out.destination}")
        down(run_id, target)
    return out


def _collect(run_id: str, target: Target, report: Reporter, dest: Path | None, artifacts_destination: Any) -> Any:
    with attached(run_id, target) as (record, records, nodes, where):
        spec = _spec_of(record)
        files = RunFiles(target.state, run_id)
        runner = steps.runner_for(spec, where, records, nodes, files, report, {})
        out = steps.collect(runner, artifacts_destination(dest, files))
        if out.error:
            raise UserInputError(f"collecting {run_id}'s outputs failed: {out.error}")
        open_store(target.state).update(run_id, artifacts=str(out.report.destination))
        return out.report


def train(run_id: str, target: Target, report: Reporter, *, artifacts_dir: Path | None = None) -> RunOutcome:
    """sync + setup + run + collect on a kept run's VMs, gates applied, verdict recorded; the VMs stay."""

    _, started = _woken(run_id, target, report)
    try:
        return _train(run_id, target, report, artifacts_dir)
    finally:
        rearm(run_id, target, started)  # the VMs stay: whatever stopped them before may again


def _train(run_id: str, target: Target, report: Reporter, artifacts_dir: Path | None) -> RunOutcome:
    from orchestrator.lifecycle.run import artifacts_destination, finish

    _, where, spec, records, files = _take_over(run_id, target, report)
    t0 = time.monotonic()
    with where.session() as session:
        ctx, nodes, runner = _resumed(where, session, spec, run_id, records, files, report)
        phases: list[Any] = []
        error: BaseException | None = None
        try:
            runner.connect()
            runner.restart_phases()
            runner.upload()
            install.wait_for_install(None, runner, report)
            if spec.setup:
                phases.append(steps.job_phase(ctx, runner, "setup", spec.setup, report))
            if all(p.exit_code == 0 for p in phases):
                phases.append(steps.job_phase(ctx, runner, "run", [spec.run], report))
        except BaseException as e:  # decided into the verdict by finish()
            error = e
        dest = artifacts_destination(artifacts_dir, files)
        return finish(ctx, runner, nodes, phases, error, dest, keep=True, teardown=False, collect_deadline=30.0, t0=t0)


def follow_logs(run_id: str, target: Target, emit: Any, phases: list[str]) -> None:
    """Follow a run's job on its VMs directly, from where the local logs stop: for a run whose
    watching process died (or a kept run) the job goes on, and so does its output. Ends when the
    job ends on every node, or at once when the VMs are gone."""
    from orchestrator.remote.job import on_all
    from orchestrator.remote.layout import RemoteLayout
    from orchestrator.remote.run import LogSink, follow

    layout = RemoteLayout(run_id)
    with attached(run_id, target) as (record, _records, nodes, _where):
        spec = _spec_of(record)
        secrets = [os.environ[s] for s in spec.secrets if s in os.environ]  # never stored: re-read here
        files = RunFiles(target.state, run_id)
        multi = len(nodes) > 1
        for phase in [p for p in phases if p != "install"]:  # the install ended before the job began

            def one(node: Any, phase: str = phase) -> int:
                log = files.log(phase, node.label)
                offset = log.stat().st_size if log.exists() else 0
                sink = LogSink(emit, secrets=secrets, prefix=f"[{node.label}] " if multi else "", raw=log)
                try:
                    return follow(node, layout, phase, sink, offset=offset).exit_code
                finally:
                    sink.close()

            on_all(nodes, one)


class AttachInterrupted(KeyboardInterrupt):
    """Ctrl-C while attached: the run goes on, detached again."""


def _take_over(
    run_id: str, target: Target, report: Reporter
) -> tuple[RunRecord, Target, Any, list[NodeRecord], RunFiles]:
    record = record_of(run_id, target)
    if record.torn_down or (record.verdict is not None and record.state in {"gone", "tearing-down"}):
        raise UserInputError(f"run {run_id} has ended ({record.shown_state}); `orchestrator status {run_id}` shows it.")
    files = RunFiles(target.state, run_id)
    records = files.read_nodes()
    if records is None:
        raise UserInputError(f"run {run_id} has no nodes to attach to ({record.shown_state}).")
    return record, target_for(record, target), _spec_of(record), records, files


def _resumed(
    where: Target,
    session: Any,
    spec: Any,
    run_id: str,
    records: list[NodeRecord],
    files: RunFiles,
    report: Reporter,
    evicted: list[Any] | None = None,
) -> tuple[Any, list[Any], Any]:
    """This process now owns the run (state running): its context, SSH nodes and job runner."""
    from orchestrator.lifecycle.context import RunContext

    ctx = RunContext(spec, where, session, run_id, report, resume=True)
    ctx.state("running")
    nodes = recovery.ssh_nodes(where, records, files.client_key, evicted or [])
    network: dict[str, str] | None = {} if evicted else None
    runner = steps.runner_for(spec, where, records, nodes, files, report, job_env_secrets(spec), network_env=network)
    return ctx, nodes, runner


def attach(
    run_id: str,
    target: Target,
    report: Reporter,
    *,
    keep: bool = False,
    artifacts_dir: Path | None = None,
    collect_deadline: float = 30.0,
) -> RunOutcome:
    """Stream a detached run's output from where it is, then collect and tear down as `run` would.
    Ctrl-C only detaches again (AttachInterrupted)."""

    woken, started = _woken(run_id, target, report)
    was_stopped = woken.state == "stopped"
    try:
        return _attach(run_id, target, report, keep, artifacts_dir, collect_deadline, was_stopped)
    except BaseException:
        if not keep:  # what it started the VMs for did not happen: they must not run unwatched
            from orchestrator.lifecycle import autostop

            record = record_of(run_id, target)
            if not record.torn_down and record.state in {"kept", "stopped"}:
                autostop.stop_again(woken, target, started, report.say)
        raise
    finally:
        if keep:
            rearm(run_id, target, started)


def _attach(
    run_id: str,
    target: Target,
    report: Reporter,
    keep: bool,
    artifacts_dir: Path | None,
    collect_deadline: float,
    was_stopped: bool,
) -> RunOutcome:
    from orchestrator.lifecycle.run import artifacts_destination, finish

    record, where, spec, records, files = _take_over(run_id, target, report)
    trained = any(p.phase == "train" for p in open_store(target.state).phases(run_id))
    if record.state not in {"detached", "kept", "stopped"} and not record.orphaned:
        raise UserInputError(
            f"run {run_id} is {record.shown_state} and watched by process {record.pid}; "
            f"`orchestrator logs {run_id} -f` follows it from here."
        )
    t0 = time.monotonic()
    with where.session() as session:
        # A spot run evicted while nobody watched: recovered here, before anything dials its VMs.
        spot = bool(recovery.held_spec_of(spec, open_store(where.state), run_id).resources.spot)
        evicted = recovery.evictions(session, record.resource_group, records) if spot else []
        ctx, nodes, runner = _resumed(where, session, spec, run_id, records, files, report, evicted)
        phases: list[Any] = []
        error: BaseException | None = None
        try:
            if not evicted:
                runner.connect()
            offsets = {}
            for n in nodes:
                log = files.log("run", n.label)
                offsets[n.ep.rank] = log.stat().st_size if log.exists() else 0
            report.say(f"attached to {run_id}; Ctrl-C detaches again (the job goes on)")
            if trained or not was_stopped:  # a stopped `provision` never ran a job: nothing to follow
                phases.append(
                    recovery.train(
                        ctx,
                        runner,
                        records,
                        report,
                        client_key=files.client_key,
                        offsets=offsets,
                        start=False,
                        evicted=evicted,
                    )
                )
        except KeyboardInterrupt:
            for n in nodes:
                n.cancel()
            ctx.state("detached")
            ctx.close()
            report.say(f"detached; the job goes on. `orchestrator attach {run_id}` picks it up again")
            raise AttachInterrupted from None
        except BaseException as e:
            error = e
        dest = artifacts_destination(artifacts_dir, files)
        return finish(ctx, runner, nodes, phases, error, dest, keep=keep, collect_deadline=collect_deadline, t0=t0)


def cancel(run_id: str, target: Target, report: Reporter, *, wait_s: float = 300.0) -> RunOutcome | None:
    """Stop the job on every node, bring home what exists, tear down; the verdict is `cancelled`.
    A run another process watches is ended by that process (this waits for its verdict, returns None);
    otherwise this process takes it over."""
    from orchestrator.lifecycle.context import RunContext
    from orchestrator.lifecycle.run import artifacts_destination, finish

    record, where, spec, records, files = _take_over(run_id, target, report)
    store = open_store(target.state)
    store.event(run_id, "cancel", {"pid": os.getpid()})
    watched = record.active and record.owner_alive and record.pid != os.getpid()
    if watched:
        with attached(run_id, target) as (_, _records, nodes, _where):
            steps.stop_job(nodes, run_id)
        report.say(f"asked process {record.pid}, which watches {run_id}, to end it; waiting for its verdict")
        deadline = time.monotonic() + wait_s
        while time.monotonic() < deadline:
            now = store.get(run_id)
            if now is not None and now.verdict is not None and not now.active:
                report.say(f"{run_id}: {now.shown_state}")
                return None
            time.sleep(0.2)
        raise UserInputError(f"process {record.pid} did not end {run_id} within {wait_s:.0f} s; try again.")
    t0 = time.monotonic()
    with where.session() as session:
        ctx = RunContext(spec, where, session, run_id, report, resume=True)
        nodes = steps.ssh_nodes(where, records, files.client_key)
        runner = steps.runner_for(spec, where, records, nodes, files, report, {})
        steps.stop_job(nodes, run_id)
        return finish(
            ctx,
            runner,
            nodes,
            [],
            None,
            artifacts_destination(None, files),
            keep=False,
            collect_deadline=30.0,
            t0=t0,
            cancelled=True,
        )
