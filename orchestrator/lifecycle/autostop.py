"""Autostop from the tool's side: arm a kept or detached run's VMs to deallocate themselves, notice
that they did (`stopped`), and start them again for `attach`/`collect`.

`--autostop DURATION` on `provision`, `run --keep` and `run --detach`: each VM gets a
system-assigned identity (in its create body), the run's group gives it the VM role
(azure/selfstop.py), and the agent (remote/autostop.py) is started on it. A detached run without
--autostop gets DETACHED_DEFAULT_S: its VMs stop once the job has ended and nobody has been attached
for that long. Without the right to assign the role the run says so and relies on the VMs'
auto-shutdown schedule.

A run whose VMs have all deallocated is `stopped` (it costs only its disks); gc deletes it
STOPPED_EXPIRY_S after it stopped (`expires`).
"""

from __future__ import annotations

import shlex
import time
from pathlib import Path
from typing import Any

from orchestrator.runfiles import NodeRecord
from orchestrator.state import RunRecord, RunStore
from orchestrator.targets import Target

DETACHED_DEFAULT_S = 600.0
STOPPED_EXPIRY_S = 7 * 24 * 3600.0
AGENT_DIR = ".orch-autostop"
WATCHED_STATES = frozenset({"kept", "detached"})


def describe(seconds: float) -> str:
    if seconds >= 3600 and seconds % 3600 == 0:
        return f"{seconds / 3600:g} h"
    if seconds >= 60 and seconds % 60 == 0:
        return f"{seconds / 60:g} min"
    return f"{seconds:g} s"


def vm_id(subscription: str, resource_group: str, vm_name: str) -> str:
    group = f"/subscriptions/{subscription}/resourceGroups/{resource_group}"
    return f"{group}/providers/Microsoft.Compute/virtualMachines/{vm_name}"


def arm(ctx: Any, records: list[NodeRecord], nodes: list[Any], seconds: float) -> bool:
    """Give the run's VMs the role and start the agent on each; False (said) when it cannot."""
    from orchestrator.azure import selfstop

    grant = selfstop.grant(ctx.session, ctx.group, [r.vm_name for r in records])
    if not grant.granted:
        ctx.report.say(
            f"warning: autostop is off: {grant.reason}. The VMs stop only at their auto-shutdown (the run's "
            "expiry) or with `orchestrator down`; an administrator's one-time grant (README, 'Autostop') "
            "lets them stop themselves."
        )
        return False
    try:
        start_agents(ctx.target, ctx.session.subscription_id, ctx.group, records, nodes, seconds)
    except Exception as e:  # the VMs stay up as before: say so rather than lose the run's result
        ctx.report.say(f"warning: autostop is off: the agent did not start on the VMs ({e})")
        return False
    ctx.store.update(ctx.run_id, autostop=seconds)
    ctx.report.say(
        f"autostop: each VM deallocates itself after {describe(seconds)} with no job and no SSH session "
        "(outputs kept on its OS disk); `orchestrator status` then shows the run stopped"
    )
    return True


def start_agents(
    target: Target, subscription: str, group: str, records: list[NodeRecord], nodes: list[Any], seconds: float
) -> None:
    from orchestrator.remote import autostop as agent
    from orchestrator.remote.job import on_all

    source = Path(agent.__file__).read_bytes()

    def one(node: Any) -> None:
        record = next(r for r in records if r.rank == node.ep.rank)
        address, port = target.endpoint(record)
        args = ["--resource-id", vm_id(subscription, group, record.vm_name), "--idle", f"{seconds:g}"]
        args += ["--ssh-port", str(port)]
        if target.emulated:  # a local VM shares this machine's network stack: its own address only
            args += ["--ssh-address", address]
        script = (
            f'mkdir -p "$HOME/{AGENT_DIR}" && cat > "$HOME/{AGENT_DIR}/agent.py" || exit 1; cd "$HOME" || exit 1; '
            f'setsid nohup python3 "$HOME/{AGENT_DIR}/agent.py" {shlex.join(args)} '
            f'>> "$HOME/{AGENT_DIR}/log" 2>&1 < /dev/null & echo started'
        )
        node.run(f"bash -c {shlex.quote(script)}", "starting the autostop agent", stdin=source)

    on_all(nodes, one)


# ------------------------------------------------------------------------------ stopped runs


def refresh(store: RunStore, target: Target, records: list[RunRecord]) -> list[RunRecord]:
    """Kept and detached runs armed with autostop whose VMs have all deallocated become `stopped`
    (expiring STOPPED_EXPIRY_S later); returns the records as they are now."""
    from orchestrator.runfiles import RunFiles

    watched = [r for r in records if r.state in WATCHED_STATES and r.autostop and not r.torn_down]
    if not watched:
        return records
    changed: dict[str, RunRecord] = {}
    for record in watched:
        nodes = RunFiles(target.state, record.run_id).read_nodes() or []
        if not nodes:
            continue
        try:
            names = [n.vm_name for n in nodes]
            states, when = power_states(record, target, names)
        except Exception:  # status must still answer when Azure does not: the state is refreshed next time
            continue
        if states and all(s in {"deallocated", "deallocating"} for s in states.values()):
            stopped = min(when or time.time(), time.time())
            store.transition(record.run_id, "stopped", expires=stopped + STOPPED_EXPIRY_S)
            store.end_open_phases(record.run_id)
            now = store.get(record.run_id)
            if now is not None:
                changed[record.run_id] = now
    return [changed.get(r.run_id, r) for r in records]


def power_states(record: RunRecord, target: Target, vm_names: list[str]) -> tuple[dict[str, str], float | None]:
    """Each VM's power state, and when they stopped if they all have."""
    from orchestrator.azure import selfstop
    from orchestrator.targets import target_for

    where = target_for(record, target)
    with where.session() as session:
        states = selfstop.power_states(session, record.resource_group, vm_names)
        off = states and all(s in {"deallocated", "deallocating"} for s in states.values())
        return states, selfstop.stopped_at(session, record.resource_group, vm_names) if off else None


def stopped_at(record: RunRecord) -> float:
    """When a stopped run's VMs deallocated themselves (its compute bill ended)."""
    return record.expires - STOPPED_EXPIRY_S if record.expires else record.phase_started


def start_stopped(record: RunRecord, target: Target, say: Any) -> list[str]:
    """The run's VMs that are off started again (same disks, addresses and host keys), before
    attach/collect/train: all of a stopped run's, or the ones of a kept or detached run that stopped
    while another did not (each node's agent counts its own idle time). Returns their names; their
    agents are gone with them (`rearm` starts them again where the VMs stay up)."""
    from orchestrator.azure import selfstop
    from orchestrator.runfiles import RunFiles
    from orchestrator.targets import target_for

    nodes = RunFiles(target.state, record.run_id).read_nodes() or []
    names = [n.vm_name for n in nodes]
    where = target_for(record, target)
    with where.session() as session:
        states = selfstop.power_states(session, record.resource_group, names)
        off = [n for n in names if states.get(n) in {"deallocated", "deallocating", "stopped"}]
        if off:
            say(f"starting {len(off)} stopped VM(s) of {record.run_id}")
            selfstop.start(session, record.resource_group, off)
    if record.state == "stopped":  # running (and billed) again: `kept` until the caller tears it down
        RunStore(target.state / "runs.db").transition(record.run_id, "kept")
    return off


def stop_again(record: RunRecord, target: Target, vm_names: list[str], say: Any) -> None:
    """VMs this command started (`start_stopped`) deallocated again, when what it started them for
    failed: they must not run, and bill, with no agent to stop them."""
    from orchestrator.azure import selfstop
    from orchestrator.targets import target_for

    if not vm_names:
        return
    say(f"deallocating {len(vm_names)} VM(s) of {record.run_id} again")
    where = target_for(record, target)
    with where.session() as session:
        selfstop.deallocate(session, record.resource_group, vm_names)
    if record.state == "stopped":
        RunStore(target.state / "runs.db").transition(record.run_id, "stopped", expires=record.expires)
