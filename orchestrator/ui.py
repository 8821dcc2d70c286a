"""What the user sees: the dry-run plan, provisioning progress, results. rich is imported lazily."""

from __future__ import annotations

import json
import sys
import threading
import time
from typing import TYPE_CHECKING, Any

from orchestrator import catalog
from orchestrator.lifecycle.reporter import Quiet
from orchestrator.verdict import Verdict

if TYPE_CHECKING:
    from orchestrator.azure.provision import ProvisionResult, ResourceEvent
    from orchestrator.lifecycle import DryRunReport, RunOutcome
    from orchestrator.plan import PlannedResource


def _console(stderr: bool = False) -> Any:
    from rich.console import Console

    stream = sys.stderr if stderr else sys.stdout
    # Off a terminal rich would wrap at 80 columns; logs and CI pages are wider than that.
    width = None if stream.isatty() else 140
    return Console(file=stream, highlight=False, soft_wrap=False, width=width)


def describe(r: PlannedResource, labels: dict[str, str] | None = None) -> str:
    """The properties a person checks before paying for a resource."""
    labels = labels or {}
    props = r.body.get("properties", {})
    if r.short_type == "resourceGroups":
        return f"location {r.body['location']}"
    if r.short_type == "virtualNetworks":
        subnets = ", ".join(f"{s['name']} {s['properties']['addressPrefix']}" for s in props.get("subnets", []))
        return f"address space {', '.join(props['addressSpace']['addressPrefixes'])}; subnet {subnets}"
    if r.short_type == "networkSecurityGroups":
        parts = []
        rules = props.get("securityRules", [])
        if not any(_allows_ssh_from_outside(rule["properties"]) for rule in rules):
            parts.append("no SSH (port 22) rule: ssh.allowed_cidrs is empty, so SSH is denied")
        for rule in rules:
            p = rule["properties"]
            src = ", ".join(
                labels.get(a, labels.get(a.removesuffix("/32"), a))
                for a in (p.get("sourceAddressPrefixes") or [p.get("sourceAddressPrefix", "")])
            )
            port = p.get("destinationPortRange", "*")
            proto = p["protocol"].replace("*", "any")
            parts.append(f"{p['priority']} {p['access'].lower()} {proto} port {port} from {src}")
        return "inbound:\n" + "\n".join(parts)
    if r.short_type == "schedules":
        t = props["dailyRecurrence"]["time"]
        vm = props["targetResourceId"].rsplit("/", 1)[-1]
        zone = props.get("timeZoneId", "UTC")
        if props.get("status", "Enabled") == "Enabled":
            return (
                f"auto-shutdown of {vm} at {t[:2]}:{t[2:]} {zone} (deallocates: billing stops even if this tool dies)"
            )
        return (
            f"auto-shutdown of {vm} at {t[:2]}:{t[2:]} {zone}, created DISABLED (a daily schedule enabled now would "
            f"fire before max_duration ends); enabled{_enable_time(r)} by the process watching the run"
        )
    if r.short_type == "virtualMachines":
        size_name = props["hardwareProfile"]["vmSize"]
        size = catalog.VM_SIZES.get(size_name)
        gpu = f"{size.gpus}x {size.gpu_model}, " if size and size.gpus else ""
        spec = f"{size.vcpus} vCPU, {size.memory_gib:g} GiB" if size else ""
        img = props["storageProfile"]["imageReference"]
        disk = props["storageProfile"]["osDisk"]
        nic = props["networkProfile"]["networkInterfaceConfigurations"][0]
        pip = nic["properties"]["ipConfigurations"][0]["properties"]["publicIPAddressConfiguration"]
        extra = []
        if r.body.get("zones"):
            extra.append(f"zone {r.body['zones'][0]}")
        if props.get("priority") == "Spot":
            extra.append("spot (evict: delete)")
        lines = [
            f"{size_name} ({gpu}{spec})" + (", " + ", ".join(extra) if extra else ""),
            f"image {img['publisher']}:{img['offer']}:{img['sku']}:{img['version']}",
            f"OS disk {disk.get('diskSizeGB')} GB {disk['managedDisk']['storageAccountType']}, deleted with the VM",
            f"NIC {nic['name']} + public IP {pip['name']}, created inline, deleted with the VM",
            f"SSH key only (no password), user {props['osProfile']['adminUsername']}",
            _security_line(props, size, img),
        ]
        return "\n".join(lines)
    return ""


def _allows_ssh_from_outside(p: dict[str, Any]) -> bool:
    if p.get("direction") != "Inbound" or p.get("access") != "Allow" or p.get("protocol") not in {"Tcp", "*"}:
        return False
    if p.get("destinationPortRange") not in {"22", "*"}:
        return False
    return p.get("sourceAddressPrefix") != "VirtualNetwork"


def _enable_time(r: PlannedResource) -> str:
    """' at <time>' from the run's expiry tag (the schedule is enabled SCHEDULE_ENABLE_LEAD before it)."""
    from datetime import datetime

    from orchestrator.plan import SCHEDULE_ENABLE_LEAD, TAG_EXPIRES

    expires = (r.body.get("tags") or {}).get(TAG_EXPIRES)
    if not expires:
        return " on the run's last day"
    at = datetime.strptime(expires, "%Y-%m-%dT%H:%M:%SZ").replace(second=0) - SCHEDULE_ENABLE_LEAD
    return f" at {at:%Y-%m-%d %H:%M} UTC"


def _security_line(props: dict[str, Any], size: catalog.VmSize | None, img: dict[str, str]) -> str:
    profile = props.get("securityProfile")
    if profile and profile.get("securityType") == "TrustedLaunch":
        uefi = profile.get("uefiSettings") or {}
        boot = "on" if uefi.get("secureBootEnabled") else "off"
        tpm = "on" if uefi.get("vTpmEnabled") else "off"
        why = " (the NVIDIA kernel module is not signed)" if boot == "off" and size and size.is_gpu else ""
        return f"security: Trusted Launch, Secure Boot {boot}{why}, vTPM {tpm}"
    if profile:
        return f"security: {profile.get('securityType', 'Standard')}"
    reason = ""
    if size is not None:
        try:
            image = catalog.resolve_image(f"{img['publisher']}:{img['offer']}:{img['sku']}:{img['version']}", False)
            reason = f": {catalog.security_choice(size, image).reason}"
        except ValueError:
            pass
    return f"security: Standard, no Secure Boot (securityProfile left out{reason})"


def print_plan(report: DryRunReport, as_json: bool = False) -> None:
    if as_json:
        print(json.dumps(report.to_json(), indent=2))
        return
    from rich.table import Table

    con = _console()
    plan = report.plan
    con.print(
        f"[bold]Dry run[/bold]: nothing is created. Run [bold]{plan.run_id}[/bold] would create "
        f"resource group [bold]{plan.resource_group}[/bold] in {plan.region}."
    )
    table = Table(show_lines=True, pad_edge=False, expand=False)
    table.add_column("stage", justify="right")
    table.add_column("resource")
    table.add_column("name")
    table.add_column("what", overflow="fold")
    for i, stage in enumerate(plan.stages):
        for r in stage:
            table.add_row(str(i), r.short_type, r.name, describe(r, report.source_labels))
    con.print(table)
    con.print("Resources in one stage are created in parallel; each stage waits only for what it uses.")
    con.print("Tags on every resource: " + ", ".join(f"{k}={v}" for k, v in plan.tags.items()))
    con.print(
        f"\n[bold]ARM requests[/bold] under /subscriptions/{plan.subscription_id} (in order; plus "
        f"{report.polls} status polls):"
    )
    prefix = f"/subscriptions/{plan.subscription_id}"
    for line in report.requests:
        path = line.path.removeprefix(prefix)
        con.print(
            f"  {line.phase:9} {line.method:6} {path}  [dim]{line.api_version} -> {line.status}[/dim]",
            soft_wrap=True,
        )
    con.print(
        f"\n[bold]Estimate[/bold]: VMs ready in about {report.estimate_seconds:.0f} s (critical path), "
        f"SSH about {report.boot_seconds:.0f} s later."
    )
    budget = f"; budget ${report.budget_usd:,.2f}" if report.budget_usd else ""
    con.print(
        f"Cost: ${report.hourly_usd:,.3f}/hour for {len(plan.nodes)} node(s); at most "
        f"${report.max_cost_usd:,.2f} if it runs the full max_duration{budget} "
        f"[dim](prices of {catalog.PRICE_SNAPSHOT_DATE})[/dim]."
    )
    _print_candidates(con, report)
    for w in report.warnings:
        con.print(f"[yellow]warning:[/yellow] {w}")


MAX_CANDIDATE_ROWS = 30


def _print_candidates(con: Any, report: DryRunReport) -> None:
    """The candidates in the order a run tries them, their price, and the dropped ones with why."""
    from rich.table import Table

    if not report.candidates:
        return
    order = "cheapest first" if report.order == "cheapest" else "in the order written"
    con.print(
        f"\n[bold]Candidates[/bold] ({len(report.candidates)}, {order}): the run takes the first that Azure "
        "provisions; the plan above is the first. Quota and the size's availability to your subscription are "
        "not checked by a dry run (a run's preflight drops the doomed ones)."
    )
    table = Table(pad_edge=False, expand=False)
    for name, justify in (("#", "right"), ("size", "left"), ("region", "left"), ("zone", "left"),
                          ("spot", "left"), ("$/hour (run)", "right"), ("quota / offered", "left")):  # fmt: skip
        table.add_column(name, justify=justify)  # type: ignore[arg-type]
    for i, (c, usd) in enumerate(report.candidates[:MAX_CANDIDATE_ROWS]):
        table.add_row(
            str(i + 1), c.size, c.region, c.zone or "- (Azure picks)", "spot" if c.spot else "on-demand",
            f"{usd:,.3f}", "not checked",
        )  # fmt: skip
    con.print(table)
    if len(report.candidates) > MAX_CANDIDATE_ROWS:
        con.print(f"... and {len(report.candidates) - MAX_CANDIDATE_ROWS} more (--json lists them all).")
    if report.dropped:
        con.print(f"Dropped ({len(report.dropped)}):")
        for d in report.dropped:
            con.print(f"  {d.label()}: {d.reason} [dim](resources.{d.field})[/dim]", soft_wrap=True)


class ProgressPrinter:
    """Plain, timestamped lines (or JSON lines): what each resource is doing and for how long."""

    def __init__(self, as_json: bool = False, store: Any = None) -> None:
        self.as_json = as_json
        self.store = store  # the run store: the result names the candidates a run tried
        self.t0 = time.monotonic()
        self._lock = threading.Lock()  # events arrive from the provisioner's threads

    def resource(self, e: ResourceEvent) -> None:
        with self._lock:
            self._event(e)

    def phase(self, name: str, node: int | None, started: bool, seconds: float | None) -> None:
        if self.as_json:
            self._json(
                {
                    "event": "phase.started" if started else "phase.ended",
                    "phase": name,
                    "node": node,
                    "seconds": None if seconds is None else round(seconds, 2),
                }
            )

    def _json(self, payload: dict[str, Any]) -> None:
        print(json.dumps({"schema": 1, **payload}), flush=True)

    def _event(self, e: ResourceEvent) -> None:
        if self.as_json:
            self._json(
                {
                    "event": f"resource.{e.status}",
                    "type": e.resource.type,
                    "name": e.resource.name,
                    "elapsed": round(e.elapsed, 2),
                    "error": e.error or None,
                }
            )
            return
        if e.status == "failed":
            return  # the error paragraph says it once, at the end
        wall = time.monotonic() - self.t0
        print(
            f"[{wall:7.1f}s] {e.status:9} {e.resource.short_type:22} {e.resource.name}",
            file=sys.stderr,
            flush=True,
        )

    def stop(self) -> None:
        """Nothing to stop for plain lines; the live panel clears itself here."""

    def say(self, text: str) -> None:
        """The orchestrator's own progress, between the job's lines."""
        with self._lock:
            if self.as_json:
                self._json({"event": "progress", "message": text})
            else:
                print(f"[{time.monotonic() - self.t0:7.1f}s] {text}", file=sys.stderr, flush=True)

    def log(self, line: str) -> None:
        """One line of the job's output (already masked and prefixed)."""
        if self.as_json:
            self._json({"event": "log", "line": line})
        else:
            print(line, flush=True)

    def _attempts(self, run_id: str) -> list[Any]:
        if self.store is None:
            return []
        try:
            return list(self.store.attempts(run_id))
        except Exception:  # an unreadable store must not hide the verdict
            return []

    def _restarts(self, run_id: str) -> int:
        try:
            record = self.store.get(run_id) if self.store is not None else None
        except Exception:  # an unreadable store must not hide the verdict
            return 0
        return int(getattr(record, "restarts", 0) or 0)

    def result(self, outcome: RunOutcome) -> None:
        attempts = self._attempts(outcome.run_id)
        restarts = self._restarts(outcome.run_id)
        if self.as_json:
            self._json(
                {
                    "event": "result",
                    **outcome.to_json(),
                    "attempts": [a.to_json() for a in attempts],
                    "restarts": restarts,
                }
            )
            return
        if len(attempts) > 1 and outcome.verdict.ok:
            self.say("candidates tried: " + "; ".join(a.line() for a in attempts))
        if restarts:
            self.say(f"restarted {restarts} time(s) after spot evictions, from the latest checkpoint")
        took = f"in {outcome.seconds:.1f} s, about ${outcome.cost_usd:,.4f} of compute at list price"
        verdict = str(outcome.verdict)
        if outcome.job_exit_code not in (None, 0):
            verdict += f" ({outcome.failed_phase}, exit {outcome.job_exit_code})"
        self.say(f"run {outcome.run_id} {verdict} {took}")
        if outcome.metrics:
            self.say("metrics: " + ", ".join(f"{k}={v}" for k, v in outcome.metrics.items()))
        if outcome.artifacts:
            self.say(f"artifacts: {outcome.artifacts}")
        for path, reason in outcome.skipped:
            self.say(f"left out: {path} ({reason})")
        if outcome.torn_down:
            self.say("all resources deleted")
        elif outcome.kept:
            self.say(f"kept: the VMs stay up; `orchestrator down {outcome.run_id}` deletes them")
        if outcome.message:
            failed = not outcome.verdict.ok and outcome.verdict != Verdict.CANCELLED  # a cancel was asked for
            print(("error: " if failed else "") + outcome.message, file=sys.stderr, flush=True)

    def provisioned(self, result: ProvisionResult) -> None:
        plan = result.plan
        if self.as_json:
            print(
                json.dumps(
                    {
                        "event": "provisioned",
                        "run_id": plan.run_id,
                        "resource_group": plan.resource_group,
                        "seconds": round(result.seconds, 2),
                        "nodes": [n.__dict__ for n in result.nodes],
                    }
                ),
                flush=True,
            )
            return
        con = _console()
        con.print(
            f"[bold green]Provisioned[/bold green] run [bold]{plan.run_id}[/bold] "
            f"({plan.resource_group}) in {result.seconds:.1f} s:"
        )
        for n in result.nodes:
            # `orchestrator ssh` dials what the target says (a loopback address on --target local) with the
            # run's key and pinned host key; a bare `ssh user@public-ip` would do neither.
            con.print(
                f"  node {n.rank}: {n.vm_name}  public {n.public_ip}, private {n.private_ip}  "
                f"-> orchestrator ssh {plan.run_id} --node {n.rank}"
            )
        con.print(f"Delete everything with: orchestrator down {plan.run_id}")


class LiveProgress(ProgressPrinter):
    """On a terminal: a live panel (the current step, each resource with a spinner or a mark and
    its time) that stays at the bottom, with the job's output scrolling above it."""

    MARKS = {
        "created": "[green]✓[/green]",
        "failed": "[red]✗[/red]",
        "skipped": "[dim]-[/dim]",
        "deleted": "[dim]✗[/dim]",  # a failed candidate's, removed before the next is tried
    }

    def __init__(self, console: Any = None, store: Any = None) -> None:
        super().__init__(as_json=False, store=store)
        from rich.console import Console
        from rich.live import Live

        self.console = console or Console(stderr=True, highlight=False)
        self.resources: dict[str, list[Any]] = {}  # name -> [short type, status, started, ended]
        self.step = "starting"
        self.step_started = time.monotonic()
        self.live = Live(
            self,
            console=self.console,
            refresh_per_second=8,
            transient=True,
            redirect_stdout=False,
            redirect_stderr=False,
        )
        self.live.start()

    def __rich__(self) -> Any:
        from rich.spinner import Spinner
        from rich.table import Table

        now = time.monotonic()
        table = Table.grid(padding=(0, 1))
        table.add_row(Spinner("dots", style="cyan"), f"[bold]{self.step}[/bold]", f"{now - self.step_started:5.1f}s")
        for name, (kind, status, started, ended) in list(self.resources.items()):
            mark = self.MARKS.get(status) or Spinner("dots")
            table.add_row(mark, f"{kind:22} {name}", f"{(ended or now) - started:5.1f}s")
        return table

    def _event(self, e: ResourceEvent) -> None:
        now = time.monotonic()
        entry = self.resources.setdefault(e.resource.name, [e.resource.short_type, e.status, now, None])
        entry[1] = e.status
        if e.status in self.MARKS:
            entry[3] = now

    def say(self, text: str) -> None:
        with self._lock:
            self.step, self.step_started = text, time.monotonic()
            self.console.print(f"[dim][{time.monotonic() - self.t0:7.1f}s][/dim] {text}")

    def log(self, line: str) -> None:
        from rich.text import Text

        self.console.print(Text(line))  # the job's bytes, never read as markup

    def stop(self) -> None:
        self.live.stop()

    def result(self, outcome: RunOutcome) -> None:
        self.stop()
        super().result(outcome)


def progress(as_json: bool, store: Any = None) -> ProgressPrinter:
    """The live panel on a terminal; plain timestamped lines (or JSON lines) everywhere else."""
    if not as_json and sys.stderr.isatty():
        return LiveProgress(store=store)
    return ProgressPrinter(as_json, store=store)


class StepSummary(Quiet):
    """On GitHub Actions: the run's verdict, phases, resources, cost, metrics and gates as Markdown
    on the job's summary page (GITHUB_STEP_SUMMARY), written when the run ends."""

    def __init__(self, path: str, store: Any) -> None:
        self.path, self.store = path, store

    def result(self, outcome: RunOutcome) -> None:
        with open(self.path, "a", encoding="utf-8") as f:
            f.write(
                step_summary(
                    outcome,
                    self.store.phases(outcome.run_id),
                    self.store.resources(outcome.run_id),
                    self.store.attempts(outcome.run_id),
                    restarts=getattr(self.store.get(outcome.run_id), "restarts", 0) or 0,
                )
            )


def step_summary(
    outcome: RunOutcome,
    phases: list[Any],
    resources: list[tuple[str, str, str]],
    attempts: list[Any] | None = None,
    *,
    restarts: int = 0,
) -> str:
    """A run as Markdown for a CI job's summary page."""
    lines = [f"## orchestrator run `{outcome.run_id}`: {outcome.verdict}", ""]
    lines += [
        f"{outcome.seconds:.1f} s, about ${outcome.cost_usd:,.4f} of compute; "
        + ("all resources deleted" if outcome.torn_down else "**resources kept**")
        + (f"; restarted {restarts} time(s) after spot evictions" if restarts else ""),
        "",
    ]
    if phases:
        lines += ["| phase | node | seconds |", "|---|---|---:|"]
        for p in phases:
            took = "" if p.seconds is None else f"{p.seconds:.1f}"
            lines.append(f"| {p.phase} | {'' if p.node is None else p.node} | {took} |")
    if attempts:
        lines += ["", "| attempt | size | region | zone | spot | result | seconds |", "|---:|---|---|---|---|---|---:|"]
        lines += [
            f"| {a.n} | `{a.vm_size}` | {a.region} | {a.zone or '-'} | {'spot' if a.spot else 'on-demand'} | "
            f"{'provisioned' if a.ok else a.code} | {a.seconds:.1f} |"
            for a in attempts
        ]
    if resources:
        lines += ["", "| resource | name | status |", "|---|---|---|"]
        lines += [f"| {t.rsplit('/', 1)[-1]} | `{n}` | {s} |" for t, n, s in resources]
    if outcome.metrics:
        lines += ["", "| metric | value |", "|---|---:|"]
        lines += [f"| {k} | {v} |" for k, v in outcome.metrics.items()]
    if outcome.gates:
        lines += ["", "| gate | value | needs | result |", "|---|---:|---|---|"]
        lines += [
            f"| {g.metric} | {'' if g.value is None else f'{g.value:g}'} | {g.condition} | "
            f"{'pass' if g.passed else '**FAIL**'} |"
            for g in outcome.gates
        ]
    if outcome.message:
        lines += ["", f"**{outcome.verdict}:** {outcome.message}"]
    return "\n".join(lines) + "\n"
