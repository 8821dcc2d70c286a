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
@click.option(
    "--region", multiple=True, help="Azure region, or any (repeatable: candidate regions; overrides resources.region)."
)
@click.option("--vm-size", multiple=True, help="VM size (repeatable: candidate sizes; overrides resources.vm_size).")
@click.option("--spot/--no-spot", default=None, help="Spot VMs, or not (overrides resources.spot).")
@click.option("--spot-prefer", is_flag=True, help="Spot first, then on-demand (resources.spot: prefer).")
@click.option("--nodes", type=click.IntRange(1, 16), help="Number of VMs (overrides `nodes`).")
@click.pass_obj
def check(
    obj: Ctx,
    job: str | None,
    region: tuple[str, ...],
    vm_size: tuple[str, ...],
    spot: bool | None,
    spot_prefer: bool,
    nodes: int | None,
) -> None:
    """Ask Azure whether JOB can run now: providers, quota, size, image, rights, policy.

    Nothing is created (an unregistered resource provider is registered when your role may). With
    several candidates (sizes, regions, zones, spot), quota and availability are checked for each,
    as `run` does.

    Exit 0: it can run (warnings allowed); 3: Azure would refuse it; 2: bad input."""
    from orchestrator.azure.preflight import preflight_job, run_preflight

    if spot_prefer and spot is not None:
        raise click.UsageError("--spot-prefer cannot be combined with --spot or --no-spot.")
    spec = None
    if job is not None:
        from orchestrator.spec import Overrides, load_spec

        overrides = Overrides(
            region=region or None, vm_size=vm_size or None, spot="prefer" if spot_prefer else spot, nodes=nodes
        )
        spec = load_spec(job, overrides)
    elif region or vm_size or spot is not None or spot_prefer or nodes is not None:
        raise click.UsageError("--region, --vm-size, --spot, --spot-prefer and --nodes need a JOB to override.")
    target = _target(obj)
    say = (lambda _text: None) if obj.as_json else (lambda text: click.echo(text, err=True))
    with target.session() as session:
        if spec is None:
            report = run_preflight(session, None, say=say, job=job)
        else:
            report = preflight_job(session, spec, say)
            report.job = job
    if obj.as_json:
        click.echo(json.dumps(report.to_json()))
    else:
        _print(report, spec)
    if report.exit_code != 0:
        raise click.exceptions.Exit(report.exit_code)


def _target(obj: Ctx) -> Any:
    if obj.dry_run:
        from orchestrator.paths import state_dir
        from orchestrator.targets.dryrun import DryRunTarget

        return DryRunTarget(state_dir(obj.state_dir), of=obj.target)
    return obj.target_obj()


def _print(report: Any, spec: Any) -> None:
    found = list(spec.resources.candidates.ordered) if spec is not None else []
    if len(found) > 1:
        what = f"{len(found)} candidates, first {found[0].label()}"
    elif report.vm_size:
        what = f"{report.vm_size} in {report.region}"
    else:
        what = "no job given: job-independent checks only"
    click.echo(f"Preflight for subscription {report.subscription} ({what})")
    for c in report.checks:
        head = f"  {_MARK.get(c.status, c.status)}  {c.name:<12}"
        if c.status == "ok":
            click.echo(f"{head} {c.message}")
        else:
            body = "\n".join(f"      {line}" if line else "" for line in c.message.split("\n"))
            click.echo(f"{head.rstrip()}\n{body}")
    if len(found) > 1 and (report.candidates or report.dropped):
        nodes = spec.nodes
        disk = spec.resources.disk_gb
        click.echo(f"  candidates ({len(report.candidates)} of {len(found)} left, in the order a run tries them):")
        for i, c in enumerate(report.candidates, 1):
            click.echo(f"    {i}. {c.label()}  ${c.usd_per_hour(nodes, disk):.3f}/h")
        for c, why in report.dropped:
            click.echo(f"    -  {c.label()}: dropped, {why}")
    took = f"{report.seconds:.1f} s, {report.requests} requests"
    if not report.problems:
        warned = f" ({len(report.warnings)} warning(s))" if report.warnings else ""
        click.echo(f"The job can run{warned}. [{took}]" if report.vm_size else f"Ready{warned}. [{took}]")
    elif report.exit_code == 2:
        click.echo(f"The job file needs a change: {len(report.problems)} problem(s) above. [{took}]")
    else:
        click.echo(f"Azure would refuse this job: {len(report.problems)} problem(s) above. [{took}]")
