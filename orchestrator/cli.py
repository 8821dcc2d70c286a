"""The click commands: parse, call lifecycle, render. No Azure or SSH code here.

Heavy imports (pydantic, rich, the Azure SDK) happen inside the commands so that `--help` stays fast.
"""

from __future__ import annotations

import functools
import json
import os
import sys
import traceback
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any, ClassVar

import click

from orchestrator import __version__
from orchestrator.errors import EXIT_BAD_INPUT, EXIT_INTERRUPTED, OrchestratorError

if TYPE_CHECKING:
    from orchestrator.lifecycle import RunOutcome
    from orchestrator.lifecycle.run import Detached
    from orchestrator.spec import JobSpec
    from orchestrator.targets import Target


@dataclass
class Ctx:
    json_mode: ClassVar[bool] = False  # set once per process, for helpers that print outside a command
    target: str
    subscription: str | None
    state_dir: str | None
    as_json: bool
    debug: bool
    dry_run: bool

    def target_obj(self) -> Target:
        from orchestrator.paths import state_dir
        from orchestrator.targets import open_target

        return open_target(self.target, state_dir(self.state_dir), self.subscription)


def _job_command(f: Any) -> Any:
    """JOB plus the override flags and --dry-run; the command receives the validated spec.

    With --dry-run every job command shows the plan instead of acting.
    """

    @functools.wraps(f)
    def command(
        obj: Ctx,
        job: str,
        dry_run_here: bool,
        region: tuple[str, ...],
        vm_size: tuple[str, ...],
        spot: bool | None,
        spot_prefer: bool,
        nodes: int | None,
        ssh_cidrs: tuple[str, ...],
        env: tuple[str, ...],
        expect: tuple[str, ...],
        **extra: Any,
    ) -> None:
        from orchestrator.spec import Overrides, load_spec

        if spot_prefer and spot is not None:
            raise click.UsageError("--spot-prefer cannot be combined with --spot or --no-spot.")
        overrides = Overrides(
            region=region or None,
            vm_size=vm_size or None,
            spot="prefer" if spot_prefer else spot,
            nodes=nodes,
            ssh_cidrs=ssh_cidrs,
            env=env,
            expect=expect,
        )
        spec = load_spec(job, overrides)
        if obj.dry_run or dry_run_here:
            from orchestrator import lifecycle
            from orchestrator.ui import print_plan

            print_plan(lifecycle.dry_run(spec, of=obj.target), as_json=obj.as_json)
            return
        f(obj, spec, **extra)

    options = [
        click.argument("job", type=click.Path(dir_okay=True)),
        click.option("--dry-run", "dry_run_here", is_flag=True, help="Show the plan; create nothing."),
        click.option(
            "--region",
            multiple=True,
            help="Azure region, e.g. eastus, or any (repeatable: candidate regions; overrides resources.region).",
        ),
        click.option(
            "--vm-size",
            multiple=True,
            help="VM size, e.g. Standard_NC4as_T4_v3 (repeatable: candidate sizes; overrides resources.vm_size "
            "and accelerators).",
        ),
        click.option("--spot/--no-spot", default=None, help="Use spot VMs, or not (overrides resources.spot)."),
        click.option("--spot-prefer", is_flag=True, help="Try spot first, then on-demand (resources.spot: prefer)."),
        click.option("--nodes", type=click.IntRange(1, 16), help="Number of VMs (overrides `nodes`)."),
        click.option(
            "--expect",
            "expect",
            multiple=True,
            metavar="METRIC<op>N",
            help="A metric gate, e.g. 'test_accuracy>=0.97' (repeatable; overrides that metric's `expect`).",
        ),
        click.option(
            "--env",
            "env",
            multiple=True,
            metavar="KEY=VALUE",
            help="Set an environment variable for the job (repeatable; overrides `env`).",
        ),
        click.option(
            "--ssh-cidr",
            "ssh_cidrs",
            multiple=True,
            help="Allow SSH only from this address or CIDR (repeatable; overrides ssh.allowed_cidrs).",
        ),
    ]
    wrapped: Any = click.pass_obj(command)
    for option in reversed(options):
        wrapped = option(wrapped)
    return wrapped


def _autostop_option(help_text: str) -> Callable[[Any], Any]:
    def parse(ctx: click.Context, param: click.Parameter, value: str | None) -> int | None:
        from orchestrator.spec import parse_autostop

        if value is None:
            return None
        try:
            return parse_autostop(value)
        except ValueError as e:
            raise click.BadParameter(str(e)) from None

    return click.option("--autostop", metavar="DURATION", callback=parse, help=help_text)


@click.group(context_settings={"help_option_names": ["-h", "--help"], "max_content_width": 100})
@click.version_option(__version__, prog_name="orchestrator")
@click.option(
    "--target",
    type=click.Choice(["azure", "local"]),
    default="azure",
    show_default=True,
    envvar="ORCH_TARGET",
    help="Real Azure, or the built-in emulator on this machine.",
)
@click.option("--dry-run", is_flag=True, help="Show what would be created, create nothing (no credentials needed).")
@click.option("--subscription", envvar="AZURE_SUBSCRIPTION_ID", help="Azure subscription id (default: az CLI's).")
@click.option(
    "--state-dir",
    type=click.Path(file_okay=False),
    envvar="ORCH_STATE_DIR",
    help="Where runs, keys and the local emulator live (default: $XDG_STATE_HOME/orchestrator).",
)
@click.option("--json", "as_json", is_flag=True, help="Machine-readable output (one JSON document or JSON lines).")
@click.option("--debug", is_flag=True, help="Show tracebacks.")
@click.pass_context
def cli(
    ctx: click.Context,
    target: str,
    dry_run: bool,
    subscription: str | None,
    state_dir: str | None,
    as_json: bool,
    debug: bool,
) -> None:
    """Run training jobs on Azure GPU VMs from one command, and leave nothing behind.

    \b
    Exit codes: 0 success, 1 the job or a metric gate failed, 2 bad input,
                3 Azure refused (quota, capacity, auth), 130 interrupted.
    """
    ctx.obj = Ctx(target, subscription, state_dir, as_json, debug, dry_run)
    Ctx.json_mode = as_json


@cli.command()
@click.option(
    "--artifacts",
    "artifacts_dir",
    type=click.Path(file_okay=False),
    help="Where the outputs land (default: <state dir>/runs/<run id>/artifacts).",
)
@click.option(
    "--max-upload-mb",
    type=click.IntRange(1),
    default=2048,
    show_default=True,
    help="Refuse to upload a job folder larger than this.",
)
@click.option("--keep", is_flag=True, help="Leave the resources up afterwards (their expiry tag still stands).")
@click.option(
    "--detach", is_flag=True, help="Return once training has started; `orchestrator attach RUN` finishes the run."
)
@click.option(
    "--collect-deadline",
    type=click.FloatRange(0),
    default=30.0,
    show_default=True,
    help="After Ctrl-C, how long to spend bringing the outputs home before tearing down (seconds).",
)
@_autostop_option("With --keep or --detach: the VMs deallocate themselves after this long with no job and no SSH "
                  "session (e.g. 30m; --detach alone: 10m after the job ends).")  # fmt: skip
@_job_command
def run(
    obj: Ctx,
    spec: JobSpec,
    artifacts_dir: str | None,
    max_upload_mb: int,
    keep: bool,
    detach: bool,
    collect_deadline: float,
    autostop: int | None,
) -> None:
    """Provision, sync the code, set up, train with live logs, collect artifacts, tear down.

    Teardown always runs, also when training fails or you press Ctrl-C (unless --keep).
    """
    from orchestrator import lifecycle

    if autostop is not None and not (keep or detach):
        raise click.UsageError("--autostop needs --keep or --detach: without them the run tears everything down.")
    printer, report = _reporters(obj)
    try:
        outcome = lifecycle.run(
            spec,
            obj.target_obj(),
            report,
            keep=keep,
            detach=detach,
            upload_limit=max_upload_mb << 20,
            artifacts_dir=Path(artifacts_dir).resolve() if artifacts_dir else None,
            collect_deadline=collect_deadline,
            autostop=autostop,
        )
    finally:
        printer.stop()
    _exit_with(outcome)


def _reporters(obj: Ctx, summary: bool = True) -> tuple[Any, Any]:
    """The progress printer (terminal panel, plain lines or JSON events) and, on GitHub Actions, the
    step summary: one Reporter for the lifecycle."""
    from orchestrator.lifecycle import Fanout
    from orchestrator.ui import StepSummary, progress

    printer = progress(obj.as_json, _lazy_store(obj))
    reporters: list[Any] = [printer]
    path = os.environ.get("GITHUB_STEP_SUMMARY")
    if path and summary:
        reporters.append(StepSummary(path, _store(obj)))
    return printer, Fanout(reporters)


def _exit_with(outcome: RunOutcome | Detached) -> None:
    """The one place a run's verdict becomes the command's exit code."""
    from orchestrator.lifecycle import RunOutcome

    if not isinstance(outcome, RunOutcome):  # detached: the run goes on, nothing decided yet
        message = (
            f"Run {outcome.run_id} is training on its VMs. `orchestrator attach {outcome.run_id}` follows it, "
            f"then collects and tears down; `orchestrator cancel {outcome.run_id}` ends it."
        )
        if Ctx.json_mode:
            click.echo(json.dumps({"schema": 1, "event": "detached", "run_id": outcome.run_id, "message": message}))
        else:
            click.echo(message)
        return
    if outcome.exit_code != 0:
        raise click.exceptions.Exit(outcome.exit_code)


class JobFailed(OrchestratorError):
    def __init__(self, message: str, code: int) -> None:
        super().__init__(message)
        self.exit_code = code


@cli.command()
@_autostop_option("The VMs deallocate themselves after this long with no job and no SSH session (e.g. 30m).")
@_job_command
def provision(obj: Ctx, spec: JobSpec, autostop: int | None) -> None:
    """Create the run's resource group, network and VM(s), and print how to reach them."""
    from orchestrator import lifecycle

    printer, report = _reporters(obj, summary=False)
    try:
        result = lifecycle.provision(spec, obj.target_obj(), report, autostop=autostop)
    finally:
        printer.stop()
    printer.provisioned(result)


def _stopped_refreshed(obj: Ctx, store: Any, records: list[Any]) -> list[Any]:
    """Kept and detached runs whose VMs deallocated themselves (autostop) are now `stopped`."""
    from orchestrator.lifecycle.autostop import refresh

    return refresh(store, obj.target_obj(), records)


def _stopped_note(record: Any) -> str:
    import datetime as dt

    until = dt.datetime.fromtimestamp(record.expires, dt.UTC).strftime("%Y-%m-%d %H:%M UTC") if record.expires else "?"
    return (
        f"its VMs deallocated themselves (no compute billed; its disks are, until deleted): `orchestrator collect "
        f"{record.run_id}` or `attach` starts them, brings the outputs home and tears down; gc deletes it after {until}"
    )


@cli.command()
@click.argument("run_id", metavar="RUN")
@click.pass_obj
def down(obj: Ctx, run_id: str) -> None:
    """Delete everything a run created (its resource group) and confirm it is gone."""
    from orchestrator import lifecycle

    existed = lifecycle.down(run_id, obj.target_obj())
    _say(
        obj,
        {"schema": 1, "event": "down", "run": run_id, "deleted": existed},
        f"Deleted {run_id}: nothing of it is left." if existed else f"Nothing to delete: {run_id} has no resources.",
    )


@cli.command()
@click.option("--run", "run_id", help="Only this run's resources.")
@click.option("--all", "include_unexpired", is_flag=True, help="Also runs whose expiry has not passed yet.")
@click.option("--force", is_flag=True, help="With --all: also runs whose watching process is alive.")
@click.option("--owner", help="Only groups whose orchestrator-owner tag is this (e.g. one CI run's).")
@click.option("--dry-run", "dry_run_here", is_flag=True, help="List what would be deleted.")
@click.pass_obj
def gc(
    obj: Ctx, run_id: str | None, include_unexpired: bool, force: bool, owner: str | None, dry_run_here: bool
) -> None:
    """Delete resources that crashed or abandoned runs left behind (found by their tags).

    Plain gc: expired runs, and runs whose watching process on this machine is gone. --all: every run
    without a live watching process. --all --force: every run."""
    from orchestrator import lifecycle

    dry = obj.dry_run or dry_run_here
    groups = lifecycle.gc(
        obj.target_obj(),
        run_id=run_id,
        include_unexpired=include_unexpired,
        force=force,
        dry_run=dry,
        owner=owner,
    )
    if obj.as_json:
        _say(
            obj,
            {
                "schema": 1,
                "event": "gc",
                "dry_run": dry,
                "groups": [
                    {
                        "name": g.name,
                        "run_id": g.run_id,
                        "owner": g.owner,
                        "expires": g.expires.isoformat() if g.expires else None,
                    }
                    for g in groups
                ],
            },
            "",
        )
        return
    if not groups:
        which = "matching " if run_id else "" if include_unexpired else "expired "
        click.echo(f"Nothing to collect: no {which}orchestrator resources.")
        return
    verb = "Would delete" if dry else "Deleted"
    for g in groups:
        expires = g.expires.strftime("%Y-%m-%d %H:%M UTC") if g.expires else "no expiry tag"
        click.echo(f"{verb} {g.name}  (run {g.run_id}, owner {g.owner}, expires {expires})")


class _LazyStore:
    """The run store, opened when first asked (a run's result names its attempts)."""

    def __init__(self, obj: Ctx) -> None:
        self.obj = obj

    def attempts(self, run_id: str) -> Any:
        return _store(self.obj).attempts(run_id)

    def get(self, run_id: str) -> Any:
        return _store(self.obj).get(run_id)


def _lazy_store(obj: Ctx) -> Any:
    return _LazyStore(obj)


def _store(obj: Ctx) -> Any:
    from orchestrator.paths import state_dir
    from orchestrator.state import open_store

    return open_store(state_dir(obj.state_dir))


def _age(seconds: float) -> str:
    for unit, size in (("d", 86400), ("h", 3600), ("m", 60)):
        if seconds >= size:
            return f"{seconds / size:.0f}{unit}"
    return f"{seconds:.0f}s"


_RECORD_FIELDS = (
    "run_id",
    "job",
    "target",
    "state",
    "resource_group",
    "exit_code",
    "error",
    "artifacts",
    "metrics",
    "torn_down",
    "created",
    "updated",
    "restarts",
    "autostop",
    "expires",
)


def _record_json(r: Any) -> dict[str, Any]:
    from orchestrator.verdict import Verdict, exit_code

    verdict = r.verdict
    return {
        "schema": 1,
        **{k: getattr(r, k) for k in _RECORD_FIELDS},
        "verdict": verdict,
        "verdict_exit_code": exit_code(Verdict(verdict)) if verdict else None,
        "detail": r.detail,
        "holds_resources": r.holds_resources,
        "orphaned": r.orphaned,
    }


@cli.command()
@click.argument("run_id", metavar="RUN")
@click.option("--artifacts", "artifacts_dir", type=click.Path(file_okay=False), help="Where the outputs land.")
@click.pass_obj
def train(obj: Ctx, run_id: str, artifacts_dir: str | None) -> None:
    """Sync the code, set up and train again on a provisioned run's VMs (they stay up)."""
    from orchestrator import lifecycle

    printer, report = _reporters(obj)
    try:
        outcome = lifecycle.train(
            run_id,
            obj.target_obj(),
            report,
            artifacts_dir=Path(artifacts_dir).resolve() if artifacts_dir else None,
        )
    finally:
        printer.stop()
    _exit_with(outcome)


@cli.command()
@click.argument("run_id", metavar="RUN")
@click.option("--keep", is_flag=True, help="Leave the VMs up after the job (their expiry tag still stands).")
@click.option("--artifacts", "artifacts_dir", type=click.Path(file_okay=False), help="Where the outputs land.")
@click.option("--collect-deadline", type=click.FloatRange(0), default=30.0, show_default=True)
@click.pass_obj
def attach(obj: Ctx, run_id: str, keep: bool, artifacts_dir: str | None, collect_deadline: float) -> None:
    """Follow a detached run's output, then collect and tear down as `run` would (Ctrl-C detaches again)."""
    from orchestrator.lifecycle.kept import AttachInterrupted, attach

    printer, report = _reporters(obj)
    try:
        outcome = attach(
            run_id,
            obj.target_obj(),
            report,
            keep=keep,
            artifacts_dir=Path(artifacts_dir).resolve() if artifacts_dir else None,
            collect_deadline=collect_deadline,
        )
    except AttachInterrupted:
        raise click.exceptions.Exit(EXIT_INTERRUPTED) from None
    finally:
        printer.stop()
    _exit_with(outcome)


@cli.command()
@click.argument("run_id", metavar="RUN")
@click.pass_obj
def cancel(obj: Ctx, run_id: str) -> None:
    """Stop a run's job on every node, bring home what it wrote, tear down (verdict `cancelled`)."""
    from orchestrator.lifecycle.kept import cancel

    printer, report = _reporters(obj, summary=False)
    try:
        cancel(run_id, obj.target_obj(), report)
    finally:
        printer.stop()


@cli.command(name="exec", context_settings={"ignore_unknown_options": True})
@click.argument("run_id", metavar="RUN")
@click.argument("command", nargs=-1, required=True, type=click.UNPROCESSED)
@click.option("--node", type=int, help="Only this node (rank); default: all.")
@click.pass_obj
def exec_(obj: Ctx, run_id: str, command: tuple[str, ...], node: int | None) -> None:
    """Run a command in the job folder on a provisioned run's VMs: orchestrator exec RUN -- nvidia-smi"""
    import shlex

    from orchestrator import lifecycle
    from orchestrator.errors import EXIT_JOB_FAILED

    lines: list[str] = []
    code = lifecycle.exec_command(
        run_id,
        obj.target_obj(),
        " ".join(shlex.quote(c) for c in command) if len(command) > 1 else command[0],
        emit=lines.append if obj.as_json else click.echo,
        node_rank=node,
    )
    if obj.as_json:
        click.echo(json.dumps({"schema": 1, "event": "exec", "run": run_id, "exit_code": code, "output": lines}))
    if code != 0:
        raise JobFailed(f"the command exited with {code}", EXIT_JOB_FAILED)


@cli.command()
@click.argument("run_id", metavar="RUN")
@click.option("--artifacts", "artifacts_dir", type=click.Path(file_okay=False), help="Where the outputs land.")
@click.pass_obj
def collect(obj: Ctx, run_id: str, artifacts_dir: str | None) -> None:
    """Bring a provisioned run's outputs home now (verified against the VM's manifest)."""
    from orchestrator import lifecycle
    from orchestrator.lifecycle import Quiet

    report = lifecycle.collect(
        run_id, obj.target_obj(), Quiet(), Path(artifacts_dir).resolve() if artifacts_dir else None
    )
    _say(
        obj,
        {
            "schema": 1,
            "event": "collected",
            "files": report.files,
            "bytes": report.bytes,
            "path": str(report.destination),
            "skipped": [{"path": p, "reason": r} for p, r in getattr(report, "skipped", [])],
        },
        f"collected {report.files} files ({report.bytes / (1 << 20):.1f} MB) into {report.destination}",
    )


@cli.command(name="ls")
@click.option("--limit", type=click.IntRange(1), default=20, show_default=True)
@click.pass_obj
def ls_(obj: Ctx, limit: int) -> None:
    """List recent runs, newest first, with their verdicts."""
    import time

    store = _store(obj)
    runs = store.runs(limit)
    if obj.as_json:
        rows = [{**_record_json(r), "attempts": [a.to_json() for a in store.attempts(r.run_id)]} for r in runs]
        click.echo(json.dumps({"schema": 1, "runs": rows}))
        return
    if not runs:
        click.echo("No runs yet. Try: orchestrator --target local run jobs/smoke/job.yaml")
        return
    now = time.time()
    click.echo(f"{'RUN':<28} {'JOB':<16} {'TARGET':<7} {'STATE':<22} {'AGE':>5}  EXIT")
    for r in runs:
        code = "" if r.exit_code is None else str(r.exit_code)
        click.echo(f"{r.run_id:<28} {r.job:<16} {r.target:<7} {r.shown_state:<22} {_age(now - r.created):>5}  {code}")


@cli.command()
@click.argument("run_id", metavar="[RUN]", required=False)
@click.pass_obj
def status(obj: Ctx, run_id: str | None) -> None:
    """What is running or still holds resources; with RUN, that run's verdict, phases and resources."""
    import time

    store = _store(obj)
    if run_id is None:
        live = [r for r in store.runs(500) if r.active or r.holds_resources]
        live = _stopped_refreshed(obj, store, live)
        if obj.as_json:
            click.echo(json.dumps({"schema": 1, "runs": [_record_json(r) for r in live]}))
            return
        if not live:
            click.echo("Nothing running; no run holds resources.")
            return
        now = time.time()
        for r in live:
            click.echo(
                f"{r.run_id:<28} {r.shown_state:<22} {r.target:<7} {r.resource_group}  since {_age(now - r.updated)}"
            )
            if r.state == "stopped":
                click.echo(f"    {_stopped_note(r)}")
            elif r.holds_resources and not r.active and r.state not in {"kept", "detached"}:
                cause = (r.error or "teardown was not confirmed").replace("\n", " ")
                click.echo(f"    holds resources: {cause}")
                click.echo(f"    remove them with: orchestrator down {r.run_id}")
        click.echo(cost_cmd.running_cost_line(store, live))
        if any(r.orphaned for r in live):
            click.echo("A run whose process is gone may still hold resources: `orchestrator down RUN` removes them.")
        return
    from orchestrator.lifecycle import record_of

    record = _stopped_refreshed(obj, store, [record_of(run_id, obj.target_obj())])[0]
    phases = store.phases(run_id)
    resources = store.resources(run_id)
    attempts = store.attempts(run_id)
    if obj.as_json:
        click.echo(
            json.dumps(
                {
                    **_record_json(record),
                    "phases": [
                        {"phase": p.phase, "node": p.node, "started": p.started, "ended": p.ended, "seconds": p.seconds}
                        for p in phases
                    ],
                    "resources": [{"type": t, "name": n, "status": st} for t, n, st in resources],
                    "attempts": [a.to_json() for a in attempts],
                }
            )
        )
        return
    click.echo(f"run {record.run_id} ({record.job}, {record.target}): {record.shown_state}")
    for p in phases:
        where = "" if p.node is None else f" node{p.node}"
        took = f"{p.seconds:7.1f} s" if p.seconds is not None else "    ..."
        click.echo(f"  {p.phase + where:<16} {took}")
    if attempts:
        click.echo("  attempts:")
        for a in attempts:
            click.echo(f"    {a.line()}")
    if record.restarts:
        click.echo(f"  restarts: {record.restarts} (spot evictions recovered from checkpoints)")
    for t, n, st in resources:
        click.echo(f"  {t.rsplit('/', 1)[-1]:<22} {n:<32} {st}")
    if record.exit_code is not None:
        click.echo(f"  job exit code {record.exit_code}")
    if record.metrics:
        click.echo("  metrics: " + ", ".join(f"{k}={v}" for k, v in record.metrics.items()))
    if record.artifacts:
        click.echo(f"  artifacts: {record.artifacts}")
    if record.error:
        click.echo(f"  {record.verdict or 'error'}: {record.error}")
    if record.holds_resources and record.state not in {"kept", "running", "provisioning"}:
        click.echo(f"  holds resources: remove them with `orchestrator down {record.run_id}`")


@cli.command()
@click.argument("run_id", metavar="RUN")
@click.option("-f", "--follow", is_flag=True, help="Keep printing while the run is active.")
@click.option(
    "--phase",
    type=click.Choice(["install", "setup", "run", "all"]),
    default="all",
    show_default=True,
    help="Which output.",
)
@click.pass_obj
def logs(obj: Ctx, run_id: str, follow: bool, phase: str) -> None:
    """Print a run's job output (masked), as the process running it recorded it."""
    import time

    from orchestrator.lifecycle import record_of
    from orchestrator.runfiles import RunFiles

    store = _store(obj)
    record_of(run_id, obj.target_obj())
    folder = RunFiles(store.path.parent, run_id).logs
    phases = ["install", "setup", "run"] if phase == "all" else [phase]
    offsets: dict[Path, int] = {}
    while True:
        files = [f for ph in phases for f in (sorted(folder.glob(f"{ph}-node*.log")) if folder.exists() else [])]
        prefix = len({f.stem.split("-")[-1] for f in files}) > 1
        for path in files:
            with open(path, "rb") as f:
                f.seek(offsets.get(path, 0))
                data = f.read()
                offsets[path] = f.tell()
            for line in data.decode(errors="replace").splitlines():
                text = (f"[{path.stem.split('-')[-1]}] " if prefix else "") + line
                if obj.as_json:
                    click.echo(
                        json.dumps({"schema": 1, "event": "log", "phase": path.stem.split("-")[0], "line": text})
                    )
                else:
                    click.echo(text)
        record = store.get(run_id)
        if not follow or record is None:
            return
        if record.orphaned or record.state in {"kept", "detached"}:
            # Nobody records the output here any more: follow the job on the VMs while they exist.
            from orchestrator.lifecycle.kept import follow_logs

            try:
                follow_logs(run_id, obj.target_obj(), _log_line(obj), phases)
            except OrchestratorError as e:
                click.echo(f"stopped following: {e}", err=True)
            return
        if not record.active:
            return
        time.sleep(0.2)


def _log_line(obj: Ctx) -> Any:
    def emit(line: str) -> None:
        if obj.as_json:
            click.echo(json.dumps({"schema": 1, "event": "log", "line": line}))
        else:
            click.echo(line)

    return emit


@cli.group()
def emulator() -> None:
    """The built-in emulator behind --target local: what it holds, and a reset.

    There is no daemon to start or stop: its Azure is a file in the state directory that every
    command reads and writes under a lock, and each emulated VM is a host process that lives as long
    as the VM."""


def _local(obj: Ctx) -> Any:
    from orchestrator.paths import state_dir
    from orchestrator.targets.local import LocalTarget

    return LocalTarget(state_dir(obj.state_dir))


@emulator.command(name="status")
@click.pass_obj
def emulator_status(obj: Ctx) -> None:
    """Resource groups and VMs the local emulator holds, with each VM's address and folder."""
    inventory = _local(obj).inventory()
    if obj.as_json:
        click.echo(
            json.dumps(
                {
                    "schema": 1,
                    "groups": [g for g, _, _ in inventory.groups],
                    "vms": [
                        {"name": v.name, "state": v.state, "address": v.address, "folder": str(v.folder)}
                        for v in inventory.vms
                    ],
                }
            )
        )
        return
    if not inventory.groups:
        click.echo(f"The local emulator holds nothing ({inventory.root}).")
        return
    for name, state, location in inventory.groups:
        click.echo(f"{name}  ({state}, {location})")
    for v in inventory.vms:
        click.echo(f"  VM {v.name}: {v.state}, address {v.address or '-'}, folder {v.folder}")


@emulator.command(name="reset")
@click.confirmation_option(prompt="Delete everything the local emulator holds (VMs, their jobs and files)?")
@click.pass_obj
def emulator_reset(obj: Ctx) -> None:
    """Delete every resource group orchestrator made in the local emulator (ending what its VMs run)."""
    from orchestrator import lifecycle

    groups = lifecycle.gc(_local(obj), include_unexpired=True, force=True)
    _say(
        obj,
        {"schema": 1, "event": "reset", "groups": [g.name for g in groups]},
        f"Reset: deleted {len(groups)} resource group(s).",
    )


def _say(obj: Ctx, payload: dict[str, Any], text: str) -> None:
    if obj.as_json:
        click.echo(json.dumps(payload))
    elif text:
        click.echo(text)


_GLOBAL_FLAGS = {"--json", "--debug"}
_GLOBAL_OPTIONS = {"--target", "--subscription", "--state-dir"}


def hoist_global_options(argv: list[str]) -> list[str]:
    """Let global options follow the command too (`orchestrator run job.yaml --json`)."""
    commands = set(cli.commands)
    head: list[str] = []
    rest: list[str] = []
    seen_command = False
    i = 0
    while i < len(argv):
        arg = argv[i]
        if arg == "--":
            rest.extend(argv[i:])
            break
        name = arg.split("=", 1)[0]
        if seen_command and name in _GLOBAL_FLAGS:
            head.append(arg)
        elif seen_command and name in _GLOBAL_OPTIONS:
            head.append(arg)
            if "=" not in arg and i + 1 < len(argv):
                head.append(argv[i + 1])
                i += 1
        else:
            if arg in commands:
                seen_command = True
            rest.append(arg)
        i += 1
    return head + rest


def _sigterm_as_interrupt() -> None:
    """SIGTERM (a CI job cancelled, a container stopped) takes the same path as Ctrl-C: teardown.

    SIGINT is set explicitly too: a process started in the background by a non-interactive shell
    inherits SIGINT ignored, and then Ctrl-C (or a CI runner's interrupt) could never stop a run."""
    import signal

    from orchestrator.errors import Terminated

    def handler(signum: int, frame: Any) -> None:
        raise Terminated

    signal.signal(signal.SIGTERM, handler)
    signal.signal(signal.SIGINT, signal.default_int_handler)


def main(argv: list[str] | None = None) -> int:
    argv = hoist_global_options(list(sys.argv[1:] if argv is None else argv))
    debug = "--debug" in argv
    as_json = "--json" in argv[: argv.index("--")] if "--" in argv else "--json" in argv
    _sigterm_as_interrupt()

    def fail(kind: str, message: str, code: int) -> int:
        """Errors are one paragraph on stderr, or one JSON object on stdout under --json."""
        if as_json:
            text = message.removeprefix("error: ")  # the prefix is for a terminal; JSON says it in "event"
            click.echo(json.dumps({"schema": 1, "event": "error", "kind": kind, "message": text, "exit_code": code}))
        else:
            click.echo(message, err=True)
        return code

    try:
        # click returns (not raises) an Exit's code when standalone_mode is off: a run's verdict.
        code = cli.main(args=argv, prog_name="orchestrator", standalone_mode=False)
        return code if isinstance(code, int) else 0
    except click.exceptions.Abort:
        return fail("interrupted", "Interrupted.", EXIT_INTERRUPTED)
    except click.ClickException as e:
        if as_json:
            return fail("bad-input", e.format_message(), EXIT_BAD_INPUT if e.exit_code == 2 else e.exit_code)
        e.show()
        return EXIT_BAD_INPUT if e.exit_code == 2 else e.exit_code
    except click.exceptions.Exit as e:
        return int(e.exit_code or 0)
    except OrchestratorError as e:
        if debug:
            traceback.print_exc()
        return fail(type(e).__name__, f"error: {e}", e.exit_code)
    except KeyboardInterrupt as e:
        from orchestrator.errors import Terminated

        return fail("interrupted", "Interrupted.", 143 if isinstance(e, Terminated) else EXIT_INTERRUPTED)
    except Exception as e:  # a bug of ours: say so plainly, and how to see more
        if debug:
            traceback.print_exc()
            return 1
        return fail(
            "internal",
            f"internal error: {type(e).__name__}: {e}\nRe-run with --debug for the traceback, and please report it.",
            1,
        )


def entry() -> None:
    """The console script: main(), then leave without the interpreter's teardown.

    Everything this tool writes is flushed and closed before main() returns; what remains at exit
    is garbage-collecting the Azure SDK's thousands of model classes, ~0.3 s on every command."""
    code = main()
    sys.stdout.flush()
    sys.stderr.flush()
    os._exit(code)


# Commands in their own modules (orchestrator/commands/): they import only click at import time.
from orchestrator.commands import cost as cost_cmd  # noqa: E402
from orchestrator.commands import gpus as gpus_cmd  # noqa: E402
from orchestrator.commands import ssh as ssh_cmd  # noqa: E402

cli.add_command(ssh_cmd.ssh)
cli.add_command(ssh_cmd.ssh_config)
cli.add_command(gpus_cmd.gpus)
cli.add_command(cost_cmd.cost)
from orchestrator.commands.check import check  # noqa: E402

cli.add_command(check)
