"""The click commands: parse, call lifecycle, render. No Azure or SSH code here.

Heavy imports (pydantic, rich, the Azure SDK) happen inside the commands so that `--help` stays fast.
"""

from __future__ import annotations

import functools
import json
import os
import sys
import traceback
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any

import click

from orchestrator import __version__
from orchestrator.errors import EXIT_BAD_INPUT, EXIT_INTERRUPTED, OrchestratorError

if TYPE_CHECKING:
    from orchestrator.lifecycle import Target
    from orchestrator.spec import JobSpec


@dataclass
class Ctx:
    target: str
    subscription: str | None
    state_dir: str | None
    as_json: bool
    debug: bool
    dry_run: bool

    def target_obj(self) -> Target:
        from orchestrator.lifecycle import Target
        from orchestrator.paths import state_dir

        return Target(
            kind="local" if self.target == "local" else "azure",
            state=state_dir(self.state_dir),
            subscription=self.subscription,
        )


def _job_command(f: Any) -> Any:
    """JOB plus the override flags and --dry-run; the command receives the validated spec.

    With --dry-run every job command shows the plan instead of acting.
    """

    @functools.wraps(f)
    def command(
        obj: Ctx,
        job: str,
        dry_run_here: bool,
        region: str | None,
        vm_size: str | None,
        spot: bool | None,
        nodes: int | None,
        ssh_cidrs: tuple[str, ...],
        env: tuple[str, ...],
        expect: tuple[str, ...],
        **extra: Any,
    ) -> None:
        from orchestrator.spec import Overrides, load_spec

        overrides = Overrides(
            region=region, vm_size=vm_size, spot=spot, nodes=nodes, ssh_cidrs=ssh_cidrs, env=env, expect=expect
        )
        spec = load_spec(job, overrides)
        if obj.dry_run or dry_run_here:
            from orchestrator import lifecycle
            from orchestrator.ui import print_plan

            print_plan(lifecycle.dry_run(spec), as_json=obj.as_json)
            return
        f(obj, spec, **extra)

    options = [
        click.argument("job", type=click.Path(dir_okay=True)),
        click.option("--dry-run", "dry_run_here", is_flag=True, help="Show the plan; create nothing."),
        click.option("--region", help="Azure region, e.g. eastus (overrides resources.region)."),
        click.option("--vm-size", help="VM size, e.g. Standard_NC4as_T4_v3 (overrides resources.vm_size)."),
        click.option("--spot/--no-spot", default=None, help="Use spot VMs (overrides resources.spot)."),
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
@_job_command
def run(obj: Ctx, spec: JobSpec, artifacts_dir: str | None, max_upload_mb: int, keep: bool) -> None:
    """Provision, sync the code, set up, train with live logs, collect artifacts, tear down.

    Teardown always runs, also when training fails or you press Ctrl-C (unless --keep).
    """
    from orchestrator import lifecycle
    from orchestrator.ui import progress

    printer = progress(obj.as_json)
    try:
        outcome = lifecycle.run(
            spec,
            obj.target_obj(),
            on_event=printer.event,
            emit=printer.log,
            say=printer.say,
            keep=keep,
            upload_limit=max_upload_mb << 20,
            artifacts_dir=Path(artifacts_dir).resolve() if artifacts_dir else None,
        )
    finally:
        printer.stop()
    printer.finished(outcome)
    _write_step_summary(obj, outcome)
    _fail_if_job_failed(outcome)


def _write_step_summary(obj: Ctx, outcome: Any) -> None:
    """On GitHub Actions, the run's phases, resources, cost, metrics and gates on the job's page."""
    path = os.environ.get("GITHUB_STEP_SUMMARY")
    if not path:
        return
    from orchestrator.ui import step_summary

    store = _store(obj)
    with open(path, "a", encoding="utf-8") as f:
        f.write(step_summary(outcome, store.events(outcome.run_id), store.resources(outcome.run_id)))


def _fail_if_job_failed(outcome: Any) -> None:
    """Exit 1 with one paragraph when the job (or bringing its outputs home, or a gate) failed."""
    from orchestrator.errors import EXIT_JOB_FAILED

    if outcome.error:
        raise JobFailed(outcome.error, EXIT_JOB_FAILED)
    failed = [g for g in getattr(outcome, "gates", []) if not g.passed]
    if outcome.exit_code == 0 and failed:
        raise JobFailed(
            "The job ran, but its metrics missed the gates in `expect`: "
            + "; ".join(g.describe() for g in failed)
            + ".",
            EXIT_JOB_FAILED,
        )
    if outcome.exit_code != 0:
        found = getattr(outcome.artifacts, "destination", outcome.artifacts)  # a path, or a collect report
        where = found.parent if found else "the run folder"
        raise JobFailed(
            f"The job failed in {outcome.failed_phase} with exit code {outcome.exit_code}. "
            f"Its log and artifacts are in {where}.",
            EXIT_JOB_FAILED,
        )


class JobFailed(OrchestratorError):
    def __init__(self, message: str, code: int) -> None:
        super().__init__(message)
        self.exit_code = code


@cli.command()
@_job_command
def provision(obj: Ctx, spec: JobSpec) -> None:
    """Create the run's resource group, network and VM(s), and print how to reach them."""
    from orchestrator import lifecycle
    from orchestrator.ui import progress

    printer = progress(obj.as_json)
    try:
        result = lifecycle.provision(spec, obj.target_obj(), on_event=printer.event, say=printer.say)
    finally:
        printer.stop()
    printer.provisioned(result)


@cli.command()
@click.argument("run_id", metavar="RUN")
@click.pass_obj
def down(obj: Ctx, run_id: str) -> None:
    """Delete everything a run created (its resource group) and confirm it is gone."""
    from orchestrator import lifecycle

    existed = lifecycle.down(run_id, obj.target_obj())
    _say(
        obj,
        {"event": "down", "run": run_id, "deleted": existed},
        f"Deleted {run_id}: nothing of it is left." if existed else f"Nothing to delete: {run_id} has no resources.",
    )


@cli.command()
@click.option("--run", "run_id", help="Only this run's resources.")
@click.option("--all", "include_unexpired", is_flag=True, help="Also runs whose expiry has not passed yet.")
@click.option("--owner", help="Only groups whose orchestrator-owner tag is this (e.g. one CI run's).")
@click.option("--dry-run", "dry_run_here", is_flag=True, help="List what would be deleted.")
@click.pass_obj
def gc(obj: Ctx, run_id: str | None, include_unexpired: bool, owner: str | None, dry_run_here: bool) -> None:
    """Delete resources that crashed or abandoned runs left behind (found by their tags)."""
    from orchestrator import lifecycle

    dry = obj.dry_run or dry_run_here
    groups = lifecycle.gc(
        obj.target_obj(), run_id=run_id, include_unexpired=include_unexpired, dry_run=dry, owner=owner
    )
    if obj.as_json:
        _say(
            obj,
            {
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
)


def _record_json(r: Any) -> dict[str, Any]:
    return {**{k: getattr(r, k) for k in _RECORD_FIELDS}, "orphaned": r.orphaned}


@cli.command()
@click.argument("run_id", metavar="RUN")
@click.option("--artifacts", "artifacts_dir", type=click.Path(file_okay=False), help="Where the outputs land.")
@click.pass_obj
def train(obj: Ctx, run_id: str, artifacts_dir: str | None) -> None:
    """Sync the code, set up and train again on a provisioned run's VMs (they stay up)."""
    from orchestrator import lifecycle
    from orchestrator.ui import ProgressPrinter

    printer = ProgressPrinter(obj.as_json)
    outcome = lifecycle.train(
        run_id,
        obj.target_obj(),
        emit=printer.log,
        say=printer.say,
        artifacts_dir=Path(artifacts_dir).resolve() if artifacts_dir else None,
    )
    if outcome.metrics:
        printer.say("metrics: " + ", ".join(f"{k}={v}" for k, v in outcome.metrics.items()))
    _fail_if_job_failed(outcome)


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

    code = lifecycle.exec_command(
        run_id,
        obj.target_obj(),
        " ".join(shlex.quote(c) for c in command) if len(command) > 1 else command[0],
        emit=click.echo,
        node_rank=node,
    )
    if code != 0:
        raise JobFailed(f"the command exited with {code}", EXIT_JOB_FAILED)


@cli.command()
@click.argument("run_id", metavar="RUN")
@click.option("--artifacts", "artifacts_dir", type=click.Path(file_okay=False), help="Where the outputs land.")
@click.pass_obj
def collect(obj: Ctx, run_id: str, artifacts_dir: str | None) -> None:
    """Bring a provisioned run's outputs home now (verified against the VM's manifest)."""
    from orchestrator import lifecycle

    report = lifecycle.collect(run_id, obj.target_obj(), Path(artifacts_dir).resolve() if artifacts_dir else None)
    _say(
        obj,
        {"event": "collected", "files": report.files, "bytes": report.bytes, "path": str(report.destination)},
        f"collected {report.files} files ({report.bytes / (1 << 20):.1f} MB) into {report.destination}",
    )


@cli.command(name="ls")
@click.option("--limit", type=click.IntRange(1), default=20, show_default=True)
@click.pass_obj
def ls_(obj: Ctx, limit: int) -> None:
    """List recent runs, newest first."""
    import time

    runs = _store(obj).runs(limit)
    if obj.as_json:
        click.echo(json.dumps([_record_json(r) for r in runs]))
        return
    if not runs:
        click.echo("No runs yet. Try: orchestrator --target local run jobs/smoke/job.yaml")
        return
    now = time.time()
    click.echo(f"{'RUN':<28} {'JOB':<16} {'TARGET':<7} {'STATE':<13} {'AGE':>5}  EXIT")
    for r in runs:
        code = "" if r.exit_code is None else str(r.exit_code)
        click.echo(f"{r.run_id:<28} {r.job:<16} {r.target:<7} {r.shown_state:<13} {_age(now - r.created):>5}  {code}")


@cli.command()
@click.argument("run_id", metavar="[RUN]", required=False)
@click.pass_obj
def status(obj: Ctx, run_id: str | None) -> None:
    """What is running or still holds resources; with RUN, that run's phases and resources."""
    import time

    store = _store(obj)
    if run_id is None:
        live = [r for r in store.runs(500) if r.active or r.state == "kept"]
        if obj.as_json:
            click.echo(json.dumps({"running": [_record_json(r) for r in live]}))
            return
        if not live:
            click.echo("Nothing running; no run holds resources.")
            return
        now = time.time()
        for r in live:
            click.echo(
                f"{r.run_id:<28} {r.shown_state:<13} {r.target:<7} {r.resource_group}  since {_age(now - r.updated)}"
            )
        if any(r.orphaned for r in live):
            click.echo("A run whose process is gone may still hold resources: `orchestrator down RUN` removes them.")
        return
    record = store.get(run_id)
    if record is None:
        raise click.ClickException(f"no run {run_id} in {store.path}; `orchestrator ls` lists runs")
    events = store.events(run_id)
    resources = store.resources(run_id)
    if obj.as_json:
        click.echo(
            json.dumps(
                {
                    **_record_json(record),
                    "resources": [{"type": t, "name": n, "status": st} for t, n, st in resources],
                    "events": [{"at": at, "kind": k, **d} for at, k, d in events],
                }
            )
        )
        return
    click.echo(f"run {record.run_id} ({record.job}, {record.target}): {record.shown_state}")
    states = [(at, d["state"]) for at, k, d in events if k == "state"]
    for (at, st), nxt in zip(states, [*states[1:], (None, None)], strict=True):
        took = f"{nxt[0] - at:6.1f} s" if nxt[0] is not None else "   ..."
        click.echo(f"  {st:<13} {took}")
    for t, n, st in resources:
        click.echo(f"  {t.rsplit('/', 1)[-1]:<22} {n:<32} {st}")
    if record.exit_code is not None:
        click.echo(f"  exit code {record.exit_code}")
    if record.metrics:
        click.echo("  metrics: " + ", ".join(f"{k}={v}" for k, v in record.metrics.items()))
    if record.artifacts:
        click.echo(f"  artifacts: {record.artifacts}")
    if record.error:
        click.echo(f"  error: {record.error}")


@cli.command()
@click.argument("run_id", metavar="RUN")
@click.option("-f", "--follow", is_flag=True, help="Keep printing while the run is active.")
@click.option("--phase", type=click.Choice(["setup", "run"]), default="run", show_default=True)
@click.pass_obj
def logs(obj: Ctx, run_id: str, follow: bool, phase: str) -> None:
    """Print a run's job output (masked), as the process running it recorded it."""
    import time

    from orchestrator.paths import state_dir

    store = _store(obj)
    if store.get(run_id) is None:
        raise click.ClickException(f"no run {run_id}; `orchestrator ls` lists runs")
    folder = state_dir(obj.state_dir) / "runs" / run_id / "logs"
    offsets: dict[Path, int] = {}
    while True:
        files = sorted(folder.glob(f"{phase}-node*.log")) if folder.exists() else []
        prefix = len(files) > 1
        for path in files:
            with open(path, "rb") as f:
                f.seek(offsets.get(path, 0))
                data = f.read()
                offsets[path] = f.tell()
            for line in data.decode(errors="replace").splitlines():
                click.echo((f"[{path.stem.split('-')[-1]}] " if prefix else "") + line)
        record = store.get(run_id)
        if not follow or record is None or not record.active:
            return
        time.sleep(0.2)


@cli.group()
def emulator() -> None:
    """The built-in emulator behind --target local: what it holds, and a reset.

    There is no daemon to start or stop: its Azure is a file in the state directory that every
    command reads and writes under a lock, and each command serves the emulated VMs' SSH itself."""


@emulator.command(name="status")
@click.pass_obj
def emulator_status(obj: Ctx) -> None:
    """Resource groups and VMs the local emulator holds, with each VM's sandbox folder."""
    from orchestrator.emulator.persist import StoreFile
    from orchestrator.paths import state_dir

    root = state_dir(obj.state_dir) / "emulator"
    store = StoreFile(root / "store.json").load()
    vms = [r for r in store.resources.values() if r["type"] == "Microsoft.Compute/virtualMachines"]
    if obj.as_json:
        click.echo(
            json.dumps(
                {
                    "groups": [g["name"] for g in store.groups.values()],
                    "vms": [
                        {
                            "name": v["name"],
                            "state": v["properties"].get("provisioningState"),
                            "sandbox": str(root / "vms" / v["name"]),
                        }
                        for v in vms
                    ],
                }
            )
        )
        return
    if not store.groups:
        click.echo(f"The local emulator holds nothing ({root}).")
        return
    for g in store.groups.values():
        click.echo(f"{g['name']}  ({g['properties']['provisioningState']}, {g['location']})")
    for v in vms:
        click.echo(f"  VM {v['name']}: {v['properties'].get('provisioningState')}, sandbox {root / 'vms' / v['name']}")


@emulator.command(name="reset")
@click.confirmation_option(prompt="Delete everything the local emulator holds (VMs, their jobs and files)?")
@click.pass_obj
def emulator_reset(obj: Ctx) -> None:
    """Delete every resource group orchestrator made in the local emulator (killing what its VMs run)."""
    from orchestrator import lifecycle

    groups = lifecycle.gc(lifecycle.Target(kind="local", state=obj.target_obj().state), include_unexpired=True)
    click.echo(f"Reset: deleted {len(groups)} resource group(s).")


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

    def handler(signum: int, frame: Any) -> None:
        raise KeyboardInterrupt

    signal.signal(signal.SIGTERM, handler)
    signal.signal(signal.SIGINT, signal.default_int_handler)


def main(argv: list[str] | None = None) -> int:
    argv = hoist_global_options(list(sys.argv[1:] if argv is None else argv))
    debug = "--debug" in argv
    _sigterm_as_interrupt()
    try:
        cli.main(args=argv, prog_name="orchestrator", standalone_mode=False)
        return 0
    except click.exceptions.Abort:
        click.echo("Interrupted.", err=True)
        return EXIT_INTERRUPTED
    except click.ClickException as e:
        e.show()
        return EXIT_BAD_INPUT if e.exit_code == 2 else e.exit_code
    except click.exceptions.Exit as e:
        return int(e.exit_code or 0)
    except OrchestratorError as e:
        if debug:
            traceback.print_exc()
        click.echo(f"error: {e}", err=True)
        return e.exit_code
    except KeyboardInterrupt:
        click.echo("Interrupted.", err=True)
        return EXIT_INTERRUPTED
    except Exception as e:  # a bug of ours: say so plainly, and how to see more
        if debug:
            traceback.print_exc()
        else:
            click.echo(
                f"internal error: {type(e).__name__}: {e}\nRe-run with --debug for the traceback, and "
                "please report it.",
                err=True,
            )
        return 1


def entry() -> None:
    """The console script: main(), then leave without the interpreter's teardown.

    Everything this tool writes is flushed and closed before main() returns; what remains at exit
    is garbage-collecting the Azure SDK's thousands of model classes, ~0.3 s on every command."""
    code = main()
    sys.stdout.flush()
    sys.stderr.flush()
    os._exit(code)
