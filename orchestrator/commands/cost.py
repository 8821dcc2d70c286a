"""`orchestrator cost`: what runs cost, from the phases the store recorded.

A run is billed from the start of its `provision` phase to the end of its `teardown` (or the moment
`down`/`gc` confirmed its group gone), or until now while it still holds resources; times the VMs it
had. The price per node is the one the run's estimate uses (VM, Premium SSD OS disk, Standard public
IP: `catalog.node_usd_per_hour`) for the candidate the run provisioned on, as recorded when its VMs
were made (the winning attempt's size, region and spot choice, whatever the command line said).
Runs recorded before prices were (store schema < 4) fall back to the job file's first candidate at
today's list price (refreshed prices where `gpus --refresh` fetched them, else the catalog's
snapshot), and say so. Runs on the local target are emulated: nothing is billed, and their figures
say what the same run would cost on Azure.
"""

from __future__ import annotations

import json
import re
import time
from dataclasses import dataclass
from datetime import UTC, datetime
from typing import TYPE_CHECKING, Any

import click

if TYPE_CHECKING:
    from orchestrator.cli import Ctx
    from orchestrator.state import Phase, RunRecord, RunStore

VM_TYPE = "microsoft.compute/virtualmachines"


@dataclass(frozen=True)
class Price:
    """Per node per hour, and what it is for."""

    usd_per_hour: float | None
    size: str | None = None
    region: str | None = None
    spot: bool | None = None
    planned_nodes: int | None = None
    problem: str = ""  # why there is no price
    recorded: bool = False  # the price recorded when the run's VMs were made, not today's


@dataclass(frozen=True)
class RunCost:
    run_id: str
    job: str
    target: str
    state: str
    created: float
    started: float | None  # the start of `provision`; None: it never provisioned
    ended: float | None  # None while it holds resources (billed until now)
    nodes: int
    hours: float  # wall-clock hours billed
    price: Price

    @property
    def vm_hours(self) -> float:
        return self.hours * self.nodes

    @property
    def usd(self) -> float | None:
        return None if self.price.usd_per_hour is None else self.vm_hours * self.price.usd_per_hour

    @property
    def holding(self) -> bool:
        return self.started is not None and self.ended is None

    @property
    def usd_per_hour_now(self) -> float:
        """What it costs per hour now (0 once its resources are gone)."""
        if not self.holding or self.price.usd_per_hour is None:
            return 0.0
        return self.nodes * self.price.usd_per_hour

    @property
    def billed(self) -> bool:
        return self.target != "local"

    def to_json(self) -> dict[str, Any]:
        return {
            "run_id": self.run_id,
            "job": self.job,
            "target": self.target,
            "state": self.state,
            "billed": self.billed,
            "size": self.price.size,
            "region": self.price.region,
            "spot": self.price.spot,
            "nodes": self.nodes,
            "started": self.started,
            "ended": self.ended,
            "holds_resources": self.holding,
            "hours": round(self.hours, 6),
            "vm_hours": round(self.vm_hours, 6),
            "node_usd_per_hour": None if self.price.usd_per_hour is None else round(self.price.usd_per_hour, 6),
            "usd": None if self.usd is None else round(self.usd, 6),
            "usd_per_hour_now": round(self.usd_per_hour_now, 6),
            "price_problem": self.price.problem or None,
            "price_recorded": self.price.recorded,
        }


# ----------------------------------------------------------------------------------- computing


def billed_interval(
    record: RunRecord, phases: list[Phase], gone_at: float | None, now: float
) -> tuple[float | None, float | None, float]:
    """(start, end or None while holding resources, hours): from the start of `provision` to the end
    of `teardown` or the confirmed deletion, or to now while the run holds resources."""
    starts = [p.started for p in phases if p.phase == "provision"]
    if not starts:
        return None, None, 0.0
    start = min(starts)
    if record.state == "stopped":  # deallocated (autostop): compute ended when its VMs deallocated
        from orchestrator.lifecycle.autostop import stopped_at

        end = max(start, stopped_at(record))
        return start, end, (end - start) / 3600
    if record.holds_resources:
        return start, None, max(0.0, now - start) / 3600
    ends = [p.ended for p in phases if p.phase == "teardown" and p.ended is not None]
    if gone_at is not None:
        ends.append(gone_at)
    if not ends:  # gone, but neither a teardown nor the moment it went was recorded
        ends = [max([p.ended for p in phases if p.ended is not None] + [record.updated])]
    end = max(ends)
    return start, end, max(0.0, end - start) / 3600


def price_of(source: str, cache: dict[str, Price]) -> Price:
    """Per-node USD/hour for the job file's size, region and spot choice, at today's list price."""
    if source in cache:
        return cache[source]
    from orchestrator import catalog
    from orchestrator.errors import OrchestratorError

    try:
        from orchestrator.spec import load_spec

        spec = load_spec(source)
    except OrchestratorError as e:
        price = Price(None, problem=f"job file {source} cannot be read now: {str(e).splitlines()[0]}")
    else:
        res = spec.resources
        price = Price(
            catalog.node_usd_per_hour(res.size, res.region, res.spot, res.disk_gb),
            res.vm_size,
            res.region,
            res.spot,
            spec.nodes,
        )
    cache[source] = price
    return price


def _nodes(store: RunStore, record: RunRecord, phases: list[Phase], price: Price) -> int:
    """How many VMs the run had: its VM resources, else its nodes file, else the job's count if it
    got as far as connecting to them."""
    vms = {name for type_, name, _ in store.resources(record.run_id) if type_.lower() == VM_TYPE}
    if vms:
        return len(vms)
    nodes = _nodes_file(store, record)
    if nodes:
        return len(nodes)
    if any(p.phase in {"boot", "connect"} for p in phases):
        return price.planned_nodes or 1
    return 0


def _gone_at(store: RunStore, run_id: str) -> float | None:
    gone = [at for at, kind, data in store.events(run_id) if kind == "state" and data.get("state") == "gone"]
    return max(gone) if gone else None


def recorded_price(store: RunStore, record: RunRecord) -> Price | None:
    """The price recorded when the run's VMs were made, per node, with the winning candidate."""
    if record.price_per_hour is None:
        return None
    won = [a for a in store.attempts(record.run_id) if a.ok]
    if not won:
        return None
    a = won[-1]
    vms = {name for type_, name, _ in store.resources(record.run_id) if type_.lower() == VM_TYPE}
    nodes = len(vms) or len(_nodes_file(store, record)) or 1
    return Price(record.price_per_hour / nodes, a.vm_size, a.region, a.spot, nodes, recorded=True)


def _nodes_file(store: RunStore, record: RunRecord) -> list[Any]:
    from orchestrator.runfiles import RunFiles

    return list(RunFiles(store.path.parent, record.run_id).read_nodes() or [])


def cost_of(store: RunStore, record: RunRecord, now: float, cache: dict[str, Price] | None = None) -> RunCost:
    phases = store.phases(record.run_id)
    price = recorded_price(store, record) or price_of(record.source, {} if cache is None else cache)
    start, end, hours = billed_interval(record, phases, _gone_at(store, record.run_id), now)
    return RunCost(
        record.run_id,
        record.job,
        record.target,
        record.shown_state,
        record.created,
        start,
        end,
        _nodes(store, record, phases, price) if start is not None else 0,
        hours,
        price,
    )


def parse_since(text: str, now: float) -> float | None:
    """'7d', '12h', '90m', '2w', an ISO date ('2026-03-01'), or 'all' (None)."""
    text = text.strip().lower()
    if text == "all":
        return None
    m = re.fullmatch(r"(\d+)\s*([mhdw])", text)
    if m:
        return now - int(m.group(1)) * {"m": 60, "h": 3600, "d": 86400, "w": 604800}[m.group(2)]
    try:
        when = datetime.fromisoformat(text)
    except ValueError:
        from orchestrator.errors import UserInputError

        raise UserInputError(
            f"--since '{text}' is not a period; write e.g. 7d, 12h, 90m, 2w, a date (2026-03-01) or all."
        ) from None
    return (when if when.tzinfo else when.replace(tzinfo=UTC)).timestamp()


def _money(usd: float | None) -> str:
    return "?" if usd is None else f"${usd:,.2f}" if usd >= 0.01 or usd == 0 else f"${usd:.4f}"


def running_cost_line(store: RunStore, live: list[RunRecord], now: float | None = None) -> str:
    """`status`: the running cost of the runs that are active or hold resources, in one line."""
    now = time.time() if now is None else now
    cache: dict[str, Price] = {}
    costs = [cost_of(store, r, now, cache) for r in live]
    so_far = sum(c.usd or 0.0 for c in costs)
    per_hour = sum(c.usd_per_hour_now for c in costs)
    unknown = sum(1 for c in costs if c.usd is None and c.started is not None)
    local = all(not c.billed for c in costs)
    notes = [
        "prices recorded when each run's VMs were made"
        if all(c.price.recorded for c in costs if c.started)
        else "recorded prices, today's list prices for older runs"
    ]
    if unknown:
        notes.append(f"{unknown} run(s) without a price: `orchestrator cost` says why")
    if local:
        notes.append("local runs are emulated: nothing is billed")
    return f"Running cost: {_money(so_far)} so far, {_money(per_hour)}/h now ({'; '.join(notes)})."


def _utc(ts: float | None) -> str:
    return "-" if ts is None else datetime.fromtimestamp(ts, UTC).strftime("%Y-%m-%d %H:%M")


def _prices_said() -> str:
    from orchestrator.commands.gpus import price_origin

    return price_origin()


@click.command()
@click.argument("run_id", metavar="[RUN]", required=False)
@click.option(
    "--since",
    default="7d",
    show_default=True,
    help="Runs started in this period (7d, 12h, 2w, a date, or all); runs holding resources always count.",
)
@click.pass_obj
def cost(obj: Ctx, run_id: str | None, since: str) -> None:
    """What runs cost: VM-hours from the recorded phases, at the recorded price, and the total.

    A run is billed from the start of provisioning to the end of teardown (or now, while it holds
    resources), for each of its VMs. Also what kept runs cost per hour now."""
    from orchestrator.lifecycle.kept import record_of
    from orchestrator.paths import state_dir
    from orchestrator.state import open_store

    now = time.time()
    store = open_store(state_dir(obj.state_dir))
    cache: dict[str, Price] = {}
    start: float | None
    if run_id is not None:
        records = [record_of(run_id.removeprefix("orch-"), obj.target_obj())]
        start = None
    else:
        start = parse_since(since, now)
        records = [r for r in store.runs(100_000) if start is None or r.created >= start or r.holds_resources]
    from orchestrator.lifecycle.autostop import refresh

    records = refresh(store, obj.target_obj(), records)  # autostopped runs are billed no compute
    costs = [cost_of(store, r, now, cache) for r in records]
    total = sum(c.usd or 0.0 for c in costs)
    billed = sum(c.usd or 0.0 for c in costs if c.billed)
    holding = [c for c in costs if c.holding]
    per_hour = sum(c.usd_per_hour_now for c in holding)
    if obj.as_json:
        click.echo(
            json.dumps(
                {
                    "schema": 1,
                    "since": start,
                    "now": now,
                    "runs": [c.to_json() for c in costs],
                    "total_usd": round(total, 6),
                    "billed_usd": round(billed, 6),
                    "vm_hours": round(sum(c.vm_hours for c in costs), 6),
                    "holding": {"runs": [c.run_id for c in holding], "usd_per_hour": round(per_hour, 6)},
                    "prices": _prices_said(),
                }
            )
        )
        return
    if run_id is None:
        period = "all runs" if start is None else f"runs started since {_utc(start)} UTC ({since})"
        click.echo(f"Cost of {period}, and of every run still holding resources:")
    if not costs:
        click.echo("No runs in this period.")
    else:
        click.echo(
            f"{'RUN':<28} {'TARGET':<6} {'SIZE':<26} {'NODES':>5} {'REGION':<14} {'STATE':<22} "
            f"{'VM-HOURS':>9} {'$/H/NODE':>8} {'COST':>9}"
        )
        for c in costs:
            size = (c.price.size or "?") + (" spot" if c.price.spot else "")
            per_node = "?" if c.price.usd_per_hour is None else f"{c.price.usd_per_hour:.3f}"
            state = c.state + (" *" if c.holding else "")
            click.echo(
                f"{c.run_id:<28} {c.target:<6} {size:<26} {c.nodes:>5} {c.price.region or '?':<14} {state:<22} "
                f"{c.vm_hours:>9.3f} {per_node:>8} {_money(c.usd):>9}"
            )
        for c in costs:
            if c.price.problem and c.started is not None:
                click.echo(f"  {c.run_id}: no price: {c.price.problem}")
    vm_hours = sum(c.vm_hours for c in costs)
    local = total - billed
    parts = [f"Total: {_money(total)} for {vm_hours:.3f} VM-hours"]
    if local > 0:
        parts.append(f"of which {_money(local)} on the local target (emulated: nothing billed)")
    click.echo("; ".join(parts) + ".")
    stopped = [c.run_id for c in costs if c.state == "stopped"]
    if stopped:
        click.echo(
            f"Stopped (deallocated by autostop): {', '.join(stopped)}: no compute is billed, only their OS disks "
            "(not counted here) until `orchestrator collect RUN` or gc deletes them."
        )
    if holding:
        names = ", ".join(f"{c.run_id} ({_money(c.usd_per_hour_now)}/h)" for c in holding)
        click.echo(f"Holding resources now (* above): {names}; {_money(per_hour)}/h in all. `orchestrator down RUN`")
    elif not stopped:
        click.echo("Nothing holds resources now.")
    older = [c.run_id for c in costs if c.started is not None and not c.price.recorded]
    click.echo(
        "Per node: VM, OS disk and public IP for the size and region each run provisioned on, at the price "
        "recorded when its VMs were made (Linux pay-as-you-go, USD)."
    )
    if older:
        click.echo(
            f"Recorded before prices were ({', '.join(older)}): the job file's first candidate at today's list "
            f"price, from {_prices_said()}."
        )
