"""`orchestrator check [JOB]`: the preflight on its own (orchestrator/azure/preflight.py).

Without JOB: credential, subscription, resource providers and the caller's rights. With JOB (and the
same overrides as `run`): also quota, the size in the region and zone, the image and its OS disk,
and Azure Policy. Exit 0 when the job can run (warnings allowed), 3 when Azure would refuse it, 2 for
bad input. `run` and `provision` run the same checks before creating anything.
"""

from __future__ import annotations

import json
from typing import TYPE_CHECKING, Any

import click

if TYPE_CHECKING:
    from orchestrator.cli import Ctx

_MARK = {"ok": "ok     ", "warning": "warning", "problem": "PROBLEM"}


@click.command()
@click.argument("job", type=click.Path(dir_okay=True), required=False)
@click.option("--region", help="Azure region, e.g. eastus (overrides resources.region).")
@click.option("--vm-size", help="VM size, e.g. Standard_NC4as_T4_v3 (overrides resources.vm_size).")
@click.option("--spot/--no-spot", default=None, help="Spot VMs (overrides resources.spot).")
@click.option("--nodes", type=click.IntRange(1, 16), help="Number of VMs (overrides `nodes`).")
@click.pass_obj
def check(
    obj: Ctx, job: str | None, region: str | None, vm_size: str | None, spot: bool | None, nodes: int | None
) -> None:
    """Ask Azure whether JOB can run now: providers, quota, size, image, rights, policy.

    Nothing is created (an unregistered resource provider is registered when your role may).
    Exit 0: it can run (warnings allowed); 3: Azure would refuse it; 2: bad input."""
    from orchestrator.azure.preflight import run_preflight

    spec = None
    if job is not None:
        from orchestrator.spec import Overrides, load_spec

        spec = load_spec(job, Overrides(region=region, vm_size=vm_size, spot=spot, nodes=nodes))
    elif any(v is not None for v in (region, vm_size, spot, nodes)):
        raise click.UsageError("--region, --vm-size, --spot and --nodes need a JOB to override.")
    target = _target(obj)
    say = (lambda _text: None) if obj.as_json else (lambda text: click.echo(text, err=True))
    with target.session() as session:
        report = run_preflight(session, spec, say=say, job=job)
    if obj.as_json:
        click.echo(json.dumps(report.to_json()))
    else:
        _print(report)
    if report.exit_code != 0:
        raise click.exceptions.Exit(report.exit_code)


def _target(obj: Ctx) -> Any:
    if obj.dry_run:
        from orchestrator.paths import state_dir
        from orchestrator.targets.dryrun import DryRunTarget

        return DryRunTarget(state_dir(obj.state_dir), of=obj.target)
    return obj.target_obj()


def _print(report: Any) -> None:
    what = f"{report.vm_size} in {report.region}" if report.vm_size else "no job given: job-independent checks only"
    click.echo(f"Preflight for subscription {report.subscription} ({what})")
    for c in report.checks:
        head = f"  {_MARK.get(c.status, c.status)}  {c.name:<12}"
        if c.status == "ok":
            click.echo(f"{head} {c.message}")
        else:
            body = "\n".join(f"      {line}" if line else "" for line in c.message.split("\n"))
            click.echo(f"{head.rstrip()}\n{body}")
    took = f"{report.seconds:.1f} s, {report.requests} requests"
    if not report.problems:
        warned = f" ({len(report.warnings)} warning(s))" if report.warnings else ""
        click.echo(f"The job can run{warned}. [{took}]" if report.vm_size else f"Ready{warned}. [{took}]")
    elif report.exit_code == 2:
        click.echo(f"The job file needs a change: {len(report.problems)} problem(s) above. [{took}]")
    else:
        click.echo(f"Azure would refuse this job: {len(report.problems)} problem(s) above. [{took}]")
