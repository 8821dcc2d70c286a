"""`run` and `provision`: the steps composed, one verdict at the end, teardown always.

Interrupts follow DESIGN.md's run model: the first Ctrl-C stops the job and brings home what it
wrote (bounded by the collection deadline), then tears down; a second one abandons the collection;
SIGTERM tears down at once without collecting.
"""

from __future__ import annotations

import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from orchestrator.azure.preflight import preflight
from orchestrator.errors import Terminated
from orchestrator.gates import evaluate
from orchestrator.lifecycle import install, recovery, steps
from orchestrator.lifecycle.context import RunContext
from orchestrator.lifecycle.interrupts import GroupWatch, Limits, ScheduleEnabler
from orchestrator.lifecycle.outcome import RunOutcome, verdict_of
from orchestrator.lifecycle.reporter import Reporter
from orchestrator.plan import new_run_id
from orchestrator.spec import JobSpec
from orchestrator.targets import Target
from orchestrator.verdict import Verdict

DEFAULT_COLLECT_DEADLINE_S = 30.0


def artifacts_destination(dest: Path | None, ctx_files: Any) -> Path:
    """Where the outputs land: the run folder's artifacts/, or --artifacts DIR (never wiped: a
    non-empty folder the tool did not fill gets the run's files in a subfolder)."""
    from orchestrator.remote.artifacts import resolve_destination

    if dest is None:
        return Path(ctx_files.artifacts)
    return resolve_destination(dest, ctx_files.run_id)


@dataclass(frozen=True)
class Detached:
    """`run --detach` returned once training started; `attach` picks the run up again."""

    run_id: str
    seconds: float


def run(
    spec: JobSpec,
    target: Target,
    report: Reporter,
    *,
    keep: bool = False,
    detach: bool = False,
    run_id: str | None = None,
    upload_limit: int = 2 << 30,
    artifacts_dir: Path | None = None,
    collect_deadline: float = DEFAULT_COLLECT_DEADLINE_S,
    autostop: float | None = None,
) -> RunOutcome | Detached:
    """Provision, sync, set up, train, collect, and always tear down (unless keep). With detach, return
    once training has started: the job goes on on the VMs, `attach` finishes the run. `autostop`
    (seconds; a detached run gets autostop.DETACHED_DEFAULT_S): the VMs left behind deallocate
    themselves once idle that long (lifecycle/autostop.py)."""
    from orchestrator.azure.teardown import group_exists
    from orchestrator.lifecycle import autostop as selfstop

    t0 = time.monotonic()
    spec, secrets, run_id = _checked(spec, target, report, run_id)
    with target.session() as session:
        session.prefetch("resource", "compute", "network")  # imported while the preflight waits on ARM
        checked = preflight(spec, session, target, report)  # Azure would refuse it: stop before anything exists
        ctx = RunContext(spec, target, session, run_id, report)
        dest = artifacts_destination(artifacts_dir, ctx.files)
        nodes: list[Any] = []
        runner: Any = None

        def stop_nodes() -> None:
            for n in nodes:
                n.cancel()

        limits = Limits(spec, stop_nodes, report.say)
        watch: GroupWatch | None = None
        enabler: ScheduleEnabler | None = None
        error: BaseException | None = None
        phases: list[Any] = []
        in_job = False
        idle = autostop if autostop is not None else (selfstop.DETACHED_DEFAULT_S if detach else None)
        try:
            result, records, keys = steps.provision(ctx, checked.candidates, identity=idle is not None)
            report.say(f"provisioned {len(result.nodes)} node(s) in {result.seconds:.1f} s")
            if ctx.spec.hourly_usd() != spec.hourly_usd():  # another candidate than the first: its price
                limits.cancel()
                limits = Limits(_remaining(ctx.spec, time.monotonic() - t0), stop_nodes, report.say)
            spec = ctx.spec  # pinned to the candidate that provisioned
            enabler = ScheduleEnabler(session, result.plan, report.say)
            nodes.extend(steps.ssh_nodes(target, records, keys.client_key))
            limits.check()  # a limit that passed while provisioning had no node to stop yet
            runner = steps.runner_for(spec, target, records, nodes, ctx.files, report, secrets, upload_limit)
            watch = GroupWatch(lambda: group_exists(session, ctx.group), target.watch_interval_s, stop_nodes)
            early = (
                recovery.EvictionWatch(
                    lambda: recovery.evictions(session, ctx.group, records), target.watch_interval_s, stop_nodes
                )
                if spec.resources.spot
                else None
            )
            try:
                steps.connect(ctx, runner)
                if spec.resources.size.is_gpu and target.has_gpus:
                    with ctx.phase("connect"):
                        steps.gpu_check(nodes, spec.resources.size.gpus)
                steps.sync(ctx, runner)
                install.wait_for_install(ctx, runner, report)
                in_job = True
                limits.check()
                if spec.setup:
                    phases.append(steps.job_phase(ctx, runner, "setup", spec.setup, report))
            except Exception:
                # A spot VM evicted before the job started: replaced and set up again, not a failure
                found = []
                if early is not None:
                    early.cancel()
                    found = early.found or recovery.evictions(session, ctx.group, records)
                if not found:
                    raise
                in_job = True
                failed = recovery.recover_early(ctx, runner, records, found, report, keys.client_key)
                phases = [failed] if failed is not None else []
            finally:
                if early is not None:
                    early.cancel()
            if detach and all(p.exit_code == 0 for p in phases):
                if result.plan.schedule_enable_at is not None:
                    report.say(
                        "warning: nothing watches a detached run: its auto-shutdown stays disabled until "
                        f"`orchestrator attach {run_id}` (the VM-side watchdog still stops the job at max_duration)"
                    )
                steps.start_detached(ctx, runner, spec.run)
                if idle is not None:
                    selfstop.arm(ctx, records, nodes, idle)
                report.say(f"training started; detached. Follow it with `orchestrator attach {run_id}`")
                ctx.state("detached")
                ctx.close()
                return Detached(run_id, time.monotonic() - t0)
            if all(p.exit_code == 0 for p in phases):
                limits.check()
                phases.append(recovery.train(ctx, runner, records, report, client_key=keys.client_key))
            limits.check()
        except BaseException as e:  # decided into a verdict below; the CLI maps it to an exit code
            error = limits.error or (watch.error if watch else None) or e
        finally:
            limits.cancel()
            if watch is not None:
                watch.cancel()
            if enabler is not None:
                enabler.cancel()
        group_gone = watch is not None and watch.error is not None

        def arm_kept(outcome: RunOutcome) -> None:
            if outcome.kept and idle is not None:
                selfstop.arm(ctx, records, steps.ssh_nodes(target, records, keys.client_key), idle)

        return finish(
            ctx,
            runner if in_job and not group_gone else None,
            nodes,
            phases,
            error,
            dest,
            keep=keep,
            collect_deadline=collect_deadline,
            t0=t0,
            before_result=arm_kept,
        )


def _remaining(spec: JobSpec, elapsed: float) -> JobSpec:
    """The limits still left after `elapsed` seconds, at this spec's price (the candidate that won)."""
    update: dict[str, Any] = {"max_duration": max(1, int(spec.max_duration - elapsed))}
    if spec.budget_usd is not None:
        update["budget_usd"] = max(1e-9, spec.budget_usd - spec.hourly_usd() * elapsed / 3600)
    return spec.model_copy(update=update)


def _checked(spec: JobSpec, target: Target, report: Reporter, run_id: str | None) -> tuple[JobSpec, Any, str]:
    """The check step (secrets, SSH sources) said out loud, and the run's id."""
    from orchestrator.sshkeys import prefetch_rsa_host_keys

    prefetch_rsa_host_keys(spec.nodes)  # made while the preflight asks Azure
    spec, secrets, warnings = steps.check(spec, target, report.say)
    for w in warnings:
        report.say(f"warning: {w}")
    return spec, secrets, run_id or new_run_id(spec.name)


def finish(
    ctx: RunContext,
    runner: Any,
    nodes: list[Any],
    phases: list[Any],
    error: BaseException | None,
    dest: Path,
    *,
    keep: bool,
    collect_deadline: float,
    t0: float,
    cancelled: bool = False,
    teardown: bool = True,
    before_result: Callable[[RunOutcome], None] | None = None,
) -> RunOutcome:
    """The end of every run (`run`, `attach`, `cancel`): collect what exists, apply the gates, decide
    the one verdict, tear down unless kept, record, report. `runner` None: nothing to collect.
    teardown=False (`train` on a kept run): the VMs stay whatever the verdict."""
    spec, report, run_id = ctx.spec, ctx.report, ctx.run_id
    sigterm = isinstance(error, Terminated)
    cancelled = cancelled or ctx.store.cancel_requested(run_id)
    collected = steps.Collected()
    if runner is not None and runner.nodes and not sigterm:
        try:
            collected = _collect(ctx, runner, nodes, dest, error, collect_deadline, run_id)
        except KeyboardInterrupt as e:
            first = error is None and not isinstance(e, Terminated)
            error = error or e
            collected = steps.Collected(error="collection abandoned (interrupt)")
            if first:  # the job had finished: a first Ctrl-C must not cost its outputs, only a second
                try:
                    collected = _collect(ctx, runner, nodes, dest, error, collect_deadline, run_id)
                except KeyboardInterrupt:
                    collected = steps.Collected(error="collection abandoned (second interrupt)")
    job_code = next((p.exit_code for p in phases if p.exit_code != 0), 0 if phases else None)
    failed_phase = next((p.name for p in phases if p.exit_code != 0), None)
    gate_results = evaluate(spec.expect, collected.metrics or {}) if job_code == 0 and spec.expect else []
    for g in gate_results:
        report.say(f"gate {g.describe()}")
    skipped = list(getattr(collected.report, "skipped", []) or [])
    verdict, message = verdict_of(
        error=error,
        job_exit_code=job_code,
        gates=gate_results,
        artifacts_error=collected.error,
        skipped=skipped,
    )
    if cancelled:
        verdict = Verdict.CANCELLED
        message = "Cancelled with `orchestrator cancel`." + (
            f" The outputs written so far are in {collected.report.destination}." if collected.report else ""
        )
    if verdict is Verdict.JOB_FAILED and not message:
        message = f"The job failed in {failed_phase} with exit code {job_code}. Its log is in {ctx.files.logs}"
        message += f" and what it wrote is in {dest}." if collected.report is not None else "."
    if verdict is Verdict.INTERRUPTED and collected.report is not None and not sigterm:
        message = f"Interrupted; the outputs written so far are in {collected.report.destination}."
    for node in nodes:
        node.cancel()
    kept = not teardown or (keep and verdict is Verdict.SUCCEEDED)
    torn_down, teardown_error = (False, "") if kept else ctx.teardown()
    if teardown_error and f"orchestrator down {run_id}" not in message:  # said once, not twice
        message = "\n".join(
            m
            for m in (
                message,
                f"Teardown did not finish: {teardown_error.rstrip('.')}. `orchestrator down {run_id}` removes "
                "what is left.",
            )
            if m
        )
    outcome = RunOutcome(
        run_id,
        verdict,
        job_exit_code=job_code,
        failed_phase=failed_phase,
        artifacts=Path(collected.report.destination) if collected.report is not None else None,
        skipped=skipped,
        metrics=collected.metrics or {},
        seconds=time.monotonic() - t0,
        torn_down=torn_down,
        kept=kept,
        message=message,
        gates=gate_results,
        cost_usd=spec.hourly_usd() * (time.monotonic() - t0) / 3600,
        sigterm=sigterm,
    )
    _record(ctx, outcome)
    if before_result is not None:  # e.g. arming a kept run's autostop: said before the result, the last event
        before_result(outcome)
    ctx.close()
    report.result(outcome)
    return outcome


def _collect(
    ctx: RunContext,
    runner: Any,
    nodes: list[Any],
    dest: Path,
    error: BaseException | None,
    deadline: float,
    run_id: str,
) -> steps.Collected:
    interrupted = isinstance(error, KeyboardInterrupt) or error is not None
    with ctx.phase("collect"):
        if not interrupted:
            return steps.collect(runner, dest)
        ctx.report.say(f"stopping the job and collecting what it wrote (up to {deadline:.0f} s; Ctrl-C again skips)")
        try:
            steps.stop_job(nodes, run_id)
        except Exception as e:  # a node that cannot be told still has its outputs
            ctx.report.say(f"could not stop the job everywhere: {e}")
        except KeyboardInterrupt:
            return steps.Collected(error="collection abandoned (second interrupt)")
        return steps.collect(runner, dest, deadline=deadline)


def _record(ctx: RunContext, outcome: RunOutcome) -> None:
    ctx.store.end_open_phases(ctx.run_id)
    ctx.store.decide(
        ctx.run_id,
        outcome.verdict,
        outcome.detail(),
        exit_code=outcome.job_exit_code,
        error=outcome.message or None,
        artifacts=str(outcome.artifacts) if outcome.artifacts else None,
        metrics=outcome.metrics,
        torn_down=outcome.torn_down,
    )
    ctx.state("kept" if outcome.kept else ("gone" if outcome.torn_down else "tearing-down"))


def provision(
    spec: JobSpec, target: Target, report: Reporter, *, run_id: str | None = None, autostop: float | None = None
) -> Any:
    """Create the run's resources and keep them (state `kept`); on any failure or interrupt, delete them.
    `autostop` (seconds): the VMs deallocate themselves once idle that long (this waits for SSH to
    start the agent on them)."""
    from orchestrator.lifecycle import autostop as selfstop

    spec, _, run_id = _checked(spec, target, report, run_id)
    with target.session() as session:
        session.prefetch("resource", "compute", "network")  # imported while the preflight waits on ARM
        checked = preflight(spec, session, target, report)  # Azure would refuse it: stop before anything exists
        ctx = RunContext(spec, target, session, run_id, report)
        try:
            result, records, keys = steps.provision(ctx, checked.candidates, identity=autostop is not None)
        except BaseException as e:
            verdict, message = verdict_of(error=e, job_exit_code=None, gates=[], artifacts_error="", skipped=[])
            torn, teardown_error = ctx.teardown()
            if teardown_error and f"orchestrator down {run_id}" not in message:
                message += f"\nTeardown did not finish: {teardown_error}. `orchestrator down {run_id}` removes it."
            ctx.store.end_open_phases(run_id)
            ctx.store.decide(run_id, verdict, {"message": message}, error=message, torn_down=torn)
            ctx.state("gone" if torn else "tearing-down")
            ctx.close()
            raise
        ctx.state("kept")
        if autostop is not None:
            nodes = steps.ssh_nodes(target, records, keys.client_key)
            try:
                selfstop.arm(ctx, records, nodes, autostop)
            finally:
                for n in nodes:
                    n.cancel()
        ctx.close()
        for r in records:  # the address a user (and `ssh`) dials, on this target
            report.say(f"node {r.rank}: {r.vm_name} reachable at {':'.join(map(str, target.endpoint(r)))}")
        return result
