"""Spot eviction recovery, done by the process watching a run (`run`, or `attach` for a detached one).

While a spot run's job trains:
- each node's `$ORCH_CHECKPOINT_DIR` is copied home (`<run folder>/checkpoints/<rank>/`) every
  `ORCH_CHECKPOINT_SYNC_S` seconds (60 by default), and at once when the VM-side watcher
  (templates/preempt-watch.py, started by the job wrapper) has seen Azure's Preempt scheduled event
  and left its marker: Azure gives about 30 s;
- ARM is asked, every `watch_interval_s`, whether each node's VM still exists and runs. A VM that is
  gone (evictionPolicy Delete) or deallocated (Deallocate) is an eviction: the watching stops at once.

Then, within `recovery.max_restarts`: the survivors' job is stopped (a DDP job cannot lose one rank);
the evicted VM is replaced (started again when deallocated, else created again for the candidate the
run holds, with a new pinned host key; each replacement is recorded as an attempt); the latest
checkpoint home is restored to every node; setup runs again and the job restarts on every node,
appending to the same logs. Beyond max_restarts the verdict is `restarts-exhausted`. max_duration
and the budget keep counting the whole run.
"""

from __future__ import annotations

import os
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass, replace
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

from orchestrator.errors import CloudError, OrchestratorError
from orchestrator.lifecycle.context import RunContext
from orchestrator.remote.checkpoints import CheckpointShipper, has_files, latest_step, pull, restore
from orchestrator.runfiles import NodeRecord

SYNC_ENV = "ORCH_CHECKPOINT_SYNC_S"
DEFAULT_SYNC_S = 60.0


class RestartsExhausted(OrchestratorError):
    """More evictions than recovery.max_restarts allows."""


@dataclass(frozen=True)
class Eviction:
    rank: int
    vm_name: str
    policy: str  # "Delete": the VM is gone; "Deallocate": it is stopped, its disk kept
    at: datetime


def sync_interval() -> float:
    try:
        return max(0.5, float(os.environ.get(SYNC_ENV, DEFAULT_SYNC_S)))
    except ValueError:
        return DEFAULT_SYNC_S


# ------------------------------------------------------------------------------------ evictions


def evictions(session: Any, group: str, records: list[NodeRecord]) -> list[Eviction]:
    """The nodes whose VM ARM reports gone (404 ResourceNotFound while the group exists) or, for a
    spot VM whose evictionPolicy is Deallocate, deallocated. A group that is gone is not an eviction
    (the group watch reports it), nor a VM someone stopped (autostop, the auto-shutdown schedule, a
    person): starting it again would undo a deliberate stop."""
    from azure.core.exceptions import ResourceNotFoundError

    found = []
    for r in records:
        try:
            vm = session.compute.virtual_machines.get(group, r.vm_name, expand="instanceView")
        except ResourceNotFoundError as e:
            code = getattr(e.error, "code", "") or ""
            if code != "ResourceGroupNotFound":
                found.append(Eviction(r.rank, r.vm_name, "Delete", datetime.now(UTC)))
            continue
        view = getattr(vm, "instance_view", None)
        codes = {str(getattr(s, "code", "")) for s in (getattr(view, "statuses", None) or [])}
        # The SDK's enums are str subclasses: compare them, never their str() (the member's name)
        evictable = getattr(vm, "priority", None) == "Spot" and getattr(vm, "eviction_policy", None) == "Deallocate"
        if evictable and codes & {"PowerState/deallocated", "PowerState/deallocating"}:
            found.append(Eviction(r.rank, r.vm_name, "Deallocate", datetime.now(UTC)))
    return found


class EvictionWatch:
    """Asks ARM every `interval` s whether a node was evicted; on the first eviction it records them
    and calls `on_evicted` (which cancels the nodes, so every SSH wait ends at once)."""

    def __init__(self, check: Callable[[], list[Eviction]], interval: float, on_evicted: Callable[[], None]) -> None:
        self.found: list[Eviction] = []
        self._check, self._interval, self._on_evicted = check, interval, on_evicted
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._loop, name="eviction-watch", daemon=True)
        self._thread.start()

    def _loop(self) -> None:
        while not self._stop.wait(self._interval):
            try:
                found = self._check()
            except Exception:  # throttled or a blip: ask again next time
                continue
            if found and not self._stop.is_set():
                self.found = found
                self._on_evicted()
                return

    def cancel(self) -> None:
        self._stop.set()


# ----------------------------------------------------------------------------------- replacement


def _candidate_of(ctx: RunContext) -> Any:
    from orchestrator.candidates import Candidate

    res = ctx.spec.resources
    first = res.candidates.ordered[0] if res.candidates.ordered else None
    if first is not None:
        return first
    return Candidate(res.size.name, res.region, res.zone, bool(res.spot))


def replacements(ctx: RunContext) -> list[Any]:
    """Where an evicted node may be replaced, in order: the candidate the run holds, then the job's
    other candidates in the same region and zone (its network stays where it is), e.g. on-demand
    after spot under `spot: prefer`; a multi-node run only with the same size (its ranks alike)."""
    held = _candidate_of(ctx)
    others = [
        c
        for c in ctx.candidates
        if c != held
        and c.region == held.region
        and c.zone == held.zone
        and (ctx.spec.nodes == 1 or c.size == held.size)
    ]
    return [held, *others]


def replace_node(ctx: RunContext, record: NodeRecord, eviction: Eviction, client_key: Path) -> NodeRecord:
    """A running VM for an evicted node: a deallocated one is started again (same disk, same host
    key); a deleted one is created again, with a new host key (pinned in nodes.json by the caller),
    for the candidate the run holds or, when Azure has no room for it (quota, size, capacity), the
    next of `replacements`. Each try is recorded as an attempt; raises CloudError when Azure refuses
    every one. A replacement on another candidate pins the run to it (spec, price)."""
    from orchestrator.azure.errors import classify
    from orchestrator.azure.provision import FAILOVER_ERRORS

    if eviction.policy == "Deallocate":
        return _try_replacement(ctx, record, eviction, client_key, _candidate_of(ctx))
    tried = replacements(ctx)
    for i, candidate in enumerate(tried):
        try:
            new = _try_replacement(ctx, record, eviction, client_key, candidate)
        except Exception as e:
            cloud = e if isinstance(e, CloudError) else classify(e, resource=f"replacing {record.vm_name}")
            if not isinstance(cloud, FAILOVER_ERRORS) or i == len(tried) - 1:
                raise
            ctx.report.say(
                f"replacing {record.vm_name} on {candidate.label()}: {cloud.code}; trying {tried[i + 1].label()}"
            )
            _delete_quietly(ctx, record.vm_name)  # a VM whose create failed late still exists, Failed
            continue
        if candidate != tried[0]:
            _repin(ctx, tried[0], candidate)
        return new
    raise AssertionError("unreachable: the last try raises")


def _delete_quietly(ctx: RunContext, vm_name: str) -> None:
    try:
        ctx.session.compute.virtual_machines.begin_delete(ctx.group, vm_name).result()
    except Exception as e:  # gone already, or Azure is slow: the next create says what matters
        ctx.report.say(f"could not delete the failed {vm_name} before the next try: {e}")


def _repin(ctx: RunContext, old: Any, new: Any) -> None:
    """The run now holds `new` for one node: its spec and recorded price follow."""
    ctx.spec = ctx.spec.pinned(new)
    disk = ctx.spec.resources.disk_gb
    run = ctx.store.get(ctx.run_id)
    if run is not None and run.price_per_hour is not None:
        price = run.price_per_hour - old.usd_per_hour(1, disk) + new.usd_per_hour(1, disk)
        ctx.store.update(ctx.run_id, price_per_hour=price)
    ctx.report.say(f"the run now holds {new.label()} (the replacement for the evicted node)")


def _try_replacement(
    ctx: RunContext, record: NodeRecord, eviction: Eviction, client_key: Path, candidate: Any
) -> NodeRecord:
    from orchestrator.azure.errors import classify
    from orchestrator.bootstrap import as_custom_data, cloud_init
    from orchestrator.lifecycle.steps import owner_name
    from orchestrator.plan import build_plan
    from orchestrator.sshkeys import generate_host_key, generate_rsa_host_key, public_key_of

    session, group = ctx.session, ctx.group
    attempt_n = len(ctx.store.attempts(ctx.run_id)) + 1
    t0 = time.monotonic()
    try:
        if eviction.policy == "Deallocate":
            session.compute.virtual_machines.begin_start(group, record.vm_name).result()
            new = record
        else:
            hk = generate_host_key()
            rsa = generate_rsa_host_key()
            custom = as_custom_data(
                cloud_init(
                    run_id=ctx.run_id,
                    vm_name=record.vm_name,
                    rank=record.rank,
                    host_private_key=hk.private_openssh,
                    host_public_key=hk.public,
                    user=ctx.spec.ssh.user,
                    max_duration=ctx.spec.max_duration,
                    gpu=ctx.spec.resources.size.is_gpu,
                    job=ctx.spec,
                    rsa_host_key=(rsa.private_openssh, rsa.public),
                )
            )
            run = ctx.store.get(ctx.run_id)
            created = datetime.fromtimestamp(run.created, UTC) if run is not None else datetime.now(UTC)
            plan = build_plan(
                ctx.spec,
                ctx.run_id,
                subscription_id=session.subscription_id,
                owner=owner_name(),
                now=created,  # the run's expiry tags, not a later one
                ssh_public_key=public_key_of(client_key),
                custom_data=dict.fromkeys(range(ctx.spec.nodes), custom),
                candidate=candidate,
            )
            vm = next(
                r for r in plan.resources if r.type == "Microsoft.Compute/virtualMachines" and r.name == record.vm_name
            )
            poller = session.compute.virtual_machines.begin_create_or_update(
                group, vm.name, vm.body, polling=session.polling(vm.type)
            )
            poller.result()
            new = replace(record, host_key=hk.public)
    except Exception as e:
        cloud = classify(e, resource=f"replacing {record.vm_name}")
        ctx.store.attempt(
            ctx.run_id,
            attempt_n,
            candidate.to_json(),
            cloud.code or type(cloud).__name__,
            str(cloud).split("\n", 1)[0],
            time.monotonic() - t0,
        )
        raise cloud from e
    ctx.store.attempt(ctx.run_id, attempt_n, candidate.to_json(), None, None, time.monotonic() - t0)
    return new


def ssh_nodes(target: Any, records: list[NodeRecord], key: Path, evicted: list[Eviction]) -> list[Any]:
    """The run's SSH nodes; an evicted node's is a stand-in that refuses every use (it is replaced
    before anything needs it), since its address may answer as another machine, or not at all."""
    from orchestrator.lifecycle import steps
    from orchestrator.remote.connect import Endpoint, Node

    gone = {e.rank for e in evicted}
    live = iter(steps.ssh_nodes(target, [r for r in records if r.rank not in gone], key))
    out = []
    for r in records:
        if r.rank in gone:
            node = Node(Endpoint(r.vm_name, "127.0.0.1", 0, r.user, r.host_key, key, r.rank))
            node.cancel()
            out.append(node)
        else:
            out.append(next(live))
    return out


# -------------------------------------------------------------------------------- the run phase


def held_spec_of(spec: Any, store: Any, run_id: str) -> Any:
    """The job pinned to the candidate the run holds (its last successful attempt): `attach` reads
    the job file again, which may list several."""
    from orchestrator.candidates import Candidate

    held = [a for a in store.attempts(run_id) if a.code is None]
    if not held or len(spec.resources.candidates.ordered) == 1:
        return spec
    a = held[-1]
    return spec.pinned(Candidate(a.vm_size, a.region, a.zone, a.spot))


def held_spec(ctx: RunContext) -> Any:
    return held_spec_of(ctx.spec, ctx.store, ctx.run_id)


def train(
    ctx: RunContext,
    runner: Any,
    records: list[NodeRecord],
    report: Any,
    *,
    client_key: Path,
    offsets: dict[int, int] | None = None,
    start: bool = True,
    evicted: list[Eviction] | None = None,
) -> Any:
    """The job's run phase on every node, started (start) or followed from `offsets` (attach); for
    a spot run, recovered from evictions within recovery.max_restarts. Returns its PhaseResult."""
    from orchestrator.lifecycle import steps

    ctx.spec = held_spec(ctx)
    spot = bool(ctx.spec.resources.spot)
    record = ctx.store.get(ctx.run_id)
    restarts = record.restarts if record is not None else 0
    found = list(evicted or [])  # a detached run evicted while nobody watched (attach found them)
    while True:
        if found:
            restarts += 1
            ctx.store.update(ctx.run_id, restarts=restarts)
            if restarts > ctx.spec.max_restarts:
                gone = {e.rank for e in found}
                for n in runner.nodes:
                    if n.ep.rank in gone:
                        n.cancel()
                # Collection reaches the survivors only: an evicted VM's address may answer as
                # another machine now (its pinned host key refuses it, after a wait).
                runner.nodes[:] = [n for n in runner.nodes if n.ep.rank not in gone]
                raise RestartsExhausted(
                    f"Spot VM(s) of run {ctx.run_id} were evicted {restarts} times; recovery.max_restarts allows "
                    f"{ctx.spec.max_restarts}. " + _evicted_line(found) + ". The outputs and checkpoints that reached "
                    "home are kept. Raise recovery.max_restarts, or run on-demand (`--no-spot`) where spot "
                    "capacity is scarce."
                )
            try:
                failed = recover(ctx, runner, records, found, report, client_key, restarts)
            except Exception as e:
                # A replacement evicted before its job restarted (or a survivor evicted meanwhile)
                # is one more restart; Azure refusing the replacement, or anything else, ends the run.
                if isinstance(e, CloudError):
                    raise
                found = evictions(ctx.session, ctx.group, records)
                if found:
                    continue
                raise
            if failed is not None:
                return failed
            start = True
        watch: EvictionWatch | None = None
        shipper: CheckpointShipper | None = None
        if spot:

            def stop_all() -> None:
                for n in list(runner.nodes):
                    n.cancel()

            watch = EvictionWatch(
                lambda: evictions(ctx.session, ctx.group, records), ctx.target.watch_interval_s, stop_all
            )
            shipper = CheckpointShipper(
                list(runner.nodes), runner.layout, ctx.files.checkpoints, sync_interval(), report.say
            )
        error: BaseException | None = None
        result: Any = None
        try:
            if start:
                result = steps.job_phase(ctx, runner, "run", [ctx.spec.run], report)
            else:
                with ctx.phase("train"):
                    result = runner.follow("run", offsets)
        except BaseException as e:
            error = e
        finally:
            if watch is not None:
                watch.cancel()
            if shipper is not None:
                shipper.cancel()
        found = watch.found if watch is not None else []
        interrupted = isinstance(error, KeyboardInterrupt)
        if spot and not found and not interrupted and (error is not None or result.exit_code != 0):
            found = evictions(ctx.session, ctx.group, records)  # the VM went just as the phase ended
        if not found or interrupted:
            if error is not None:
                raise error
            return result


def recover_early(
    ctx: RunContext, runner: Any, records: list[NodeRecord], found: list[Eviction], report: Any, client_key: Path
) -> Any:
    """A spot VM evicted before the job started (while connecting, syncing, installing or setting
    up): one restart like any other, within recovery.max_restarts; the evicted nodes are replaced and
    connected, synced, installed and set up again. Returns setup's PhaseResult if it failed, else
    None (the caller goes on to start the job)."""
    ctx.spec = held_spec(ctx)
    while True:
        record = ctx.store.get(ctx.run_id)
        restarts = (record.restarts if record is not None else 0) + 1
        ctx.store.update(ctx.run_id, restarts=restarts)
        if restarts > ctx.spec.max_restarts:
            raise RestartsExhausted(
                f"Spot VM(s) of run {ctx.run_id} were evicted {restarts} times; recovery.max_restarts allows "
                f"{ctx.spec.max_restarts}. " + _evicted_line(found) + ". Raise recovery.max_restarts, or run "
                "on-demand (`--no-spot`) where spot capacity is scarce."
            )
        try:
            return recover(ctx, runner, records, found, report, client_key, restarts)
        except Exception as e:
            if isinstance(e, CloudError):
                raise
            found = evictions(ctx.session, ctx.group, records)  # the replacement went too: once more
            if not found:
                raise


def _evicted_line(found: list[Eviction]) -> str:
    return "; ".join(
        f"node {e.rank} ({e.vm_name}) evicted at {e.at:%H:%M:%S} UTC"
        + (" (deallocated)" if e.policy == "Deallocate" else "")
        for e in found
    )


def recover(
    ctx: RunContext,
    runner: Any,
    records: list[NodeRecord],
    found: list[Eviction],
    report: Any,
    client_key: Path,
    restarts: int,
) -> Any:
    """Stop the survivors' job, replace the evicted nodes, restore the latest checkpoint everywhere,
    run setup again. Returns setup's PhaseResult if it failed, else None (the caller restarts the job)."""
    from orchestrator.lifecycle import install, steps

    layout, home = runner.layout, ctx.files.checkpoints
    evicted = {e.rank for e in found}
    survivors = [n for n in runner.nodes if n.ep.rank not in evicted]
    for n in survivors:
        n.resume()
    for n in survivors:  # a surviving node's checkpoint may be newer than the copy home
        try:
            pull(n, layout, home, {})
        except Exception as e:  # the copy home stands
            report.say(f"could not copy node {n.ep.rank}'s checkpoint home: {e}")
    try:
        steps.stop_job(survivors, ctx.run_id)
    except Exception as e:  # a node that cannot be told is replaced below only if evicted; said
        report.say(f"could not stop the job everywhere: {e}")
    saved = next((home / str(r) for r in (0, *sorted(evicted)) if has_files(home / str(r))), None)
    step = latest_step(saved)
    # a checkpoint whose file names carry no step number is still restored: never "the beginning"
    since = "the beginning (no checkpoint yet)" if saved is None else "its checkpoint"
    line = (
        f"{_evicted_line(found)}; restarting from "
        + (f"checkpoint step {step}" if step is not None else since)
        + f" (restart {restarts} of {ctx.spec.max_restarts})"
    )
    report.say(line)
    for n in runner.nodes:  # the logs read as one run
        log = ctx.files.log("run", n.label)
        if log.exists():
            with open(log, "a") as f:
                f.write(f"orchestrator: {line}\n")
    ctx.state("provisioning")
    with ctx.phase("provision"):
        for ev in found:
            i = next(i for i, r in enumerate(records) if r.rank == ev.rank)
            records[i] = replace_node(ctx, records[i], ev, client_key)
            report.say(f"node {ev.rank}: {records[i].vm_name} replaced")
    ctx.files.write_nodes(records)
    for ev in found:
        i = next(i for i, n in enumerate(runner.nodes) if n.ep.rank == ev.rank)
        runner.nodes[i] = steps.ssh_nodes(ctx.target, [records[i]], client_key)[0]
    runner.network_env = dict(ctx.target.job_network_env(records))
    steps.connect(ctx, runner)
    for ev in found:  # a deallocated VM kept its disk: its checkpoint may be newer than the copy home
        if ev.policy == "Deallocate":
            try:
                pull(next(n for n in runner.nodes if n.ep.rank == ev.rank), layout, home, {})
            except Exception as e:
                report.say(f"could not copy node {ev.rank}'s checkpoint home: {e}")
    steps.sync(ctx, runner)
    install.wait_for_install(ctx, runner, report)
    runner.restart_phases()
    for n in runner.nodes:
        restore(n, layout, home)
    if ctx.spec.setup:
        setup = steps.job_phase(ctx, runner, "setup", ctx.spec.setup, report)
        if setup.exit_code != 0:
            return setup
    return None
