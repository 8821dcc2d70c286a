"""The steps of a run, composed from azure/, plan and spec: dry-run, provision, down, gc.

The CLI calls these; they own the guarantees: a run's record (and so its resource group name) is
written before anything is created, and a failed provision leaves nothing behind.
"""

from __future__ import annotations

import getpass
import json
import os
import socket
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass, field
from datetime import UTC, datetime
from pathlib import Path
from typing import Any, Literal

from orchestrator import catalog
from orchestrator.errors import CloudError, OrchestratorError, UserInputError
from orchestrator.gates import evaluate
from orchestrator.paths import run_dir
from orchestrator.plan import RUN_ID_RE, ResourcePlan, build_plan, new_run_id, resource_group_name
from orchestrator.spec import JobSpec

# A syntactically valid key for the dry-run's plan; a real run generates a key pair per run.
PLACEHOLDER_PUBLIC_KEY = (
    "ssh-ed25519 AAAAC3NzaC1lZDI1NTE5AAAAIPlaceholderKeyGeneratedPerRunAtProvisionTime0 generated-per-run"
)


@dataclass(frozen=True)
class Target:
    kind: Literal["azure", "local"]
    state: Path
    subscription: str | None = None


def owner_name() -> str:
    """Who the resources belong to: the CI actor, or user@host."""
    for var in ("ORCH_OWNER", "GITHUB_ACTOR"):
        if os.environ.get(var):
            return os.environ[var]
    try:
        user = getpass.getuser()
    except (KeyError, OSError):
        user = "unknown"
    return f"{user}@{socket.gethostname()}"


@contextmanager
def open_session(target: Target) -> Iterator[Any]:
    from orchestrator.azure.session import azure_session, local_session

    if target.kind == "local":
        with local_session(target.state) as session:
            yield session
    else:
        yield azure_session(target.subscription)


# ------------------------------------------------------------------------------------------ dry-run


@dataclass
class RequestLine:
    method: str
    path: str
    api_version: str
    status: int
    phase: str  # provision or teardown


@dataclass
class DryRunReport:
    plan: ResourcePlan
    requests: list[RequestLine]
    polls: int
    estimate_seconds: float
    boot_seconds: float
    hourly_usd: float
    max_cost_usd: float
    budget_usd: float | None
    warnings: list[str] = field(default_factory=list)

    def to_json(self) -> dict[str, Any]:
        plan = self.plan
        return {
            "run_id": plan.run_id,
            "resource_group": plan.resource_group,
            "region": plan.region,
            "tags": plan.tags,
            "stages": [
                [
                    {
                        "type": r.type,
                        "name": r.name,
                        "id": r.id,
                        "depends_on": list(r.depends_on),
                        "body": r.body,
                    }
                    for r in stage
                ]
                for stage in plan.stages
            ],
            "requests": [r.__dict__ for r in self.requests],
            "polls": self.polls,
            "estimate": {
                "provision_seconds": round(self.estimate_seconds, 1),
                "boot_to_ssh_seconds": self.boot_seconds,
                "usd_per_hour": round(self.hourly_usd, 4),
                "max_cost_usd": round(self.max_cost_usd, 2),
                "budget_usd": self.budget_usd,
                "price_snapshot": catalog.PRICE_SNAPSHOT_DATE,
            },
            "warnings": self.warnings,
        }


def dry_run(spec: JobSpec, *, now: datetime | None = None, run_id: str | None = None) -> DryRunReport:
    """Run the real provisioner and teardown against a throwaway emulator and report what they sent."""
    from orchestrator.azure.provision import Provisioner
    from orchestrator.azure.session import DRY_RUN_SUBSCRIPTION, dry_run_session
    from orchestrator.azure.teardown import delete_group

    now = now or datetime.now(UTC)
    run_id = run_id or new_run_id(spec.name)
    plan = build_plan(
        spec,
        run_id,
        subscription_id=DRY_RUN_SUBSCRIPTION,
        owner=owner_name(),
        now=now,
        ssh_public_key=PLACEHOLDER_PUBLIC_KEY,
    )
    session = dry_run_session(now.timestamp())
    Provisioner(session).provision(plan)
    emulator = session.emulator
    assert emulator is not None
    provision_count = len(emulator.requests())
    delete_group(session, plan.resource_group, wait=True)
    lines, polls = [], 0
    for i, r in enumerate(emulator.requests()):
        if r.kind == "poll":
            polls += 1
            continue
        phase = "provision" if i < provision_count else "teardown"
        lines.append(RequestLine(r.method, r.path, r.api_version or "", r.status, phase))
    hours = spec.max_duration / 3600
    return DryRunReport(
        plan=plan,
        requests=lines,
        polls=polls,
        estimate_seconds=plan.critical_path_seconds(),
        boot_seconds=catalog.TYPICAL_BOOT_TO_SSH_SECONDS,
        hourly_usd=plan.hourly_usd,
        max_cost_usd=plan.hourly_usd * hours,
        budget_usd=spec.budget_usd,
        warnings=list(plan.warnings),
    )


# ---------------------------------------------------------------------------------------- provision


@dataclass
class RunKeys:
    client_key: Path  # private key the runner logs in with
    client_public: str
    host_keys: dict[int, str]  # rank -> pinned public host key
    custom_data: dict[int, str]  # rank -> base64 cloud-init carrying that host key


def _keys(spec: JobSpec, run_id: str, folder: Path) -> RunKeys:
    """The run's login key pair and one host key per VM, all made here and kept in the run folder."""
    from orchestrator.bootstrap import as_custom_data, cloud_init
    from orchestrator.sshkeys import generate_host_key, generate_keypair, public_key_of

    if spec.ssh.private_key:
        key = Path(spec.ssh.private_key).expanduser()
        key = key if key.is_absolute() else Path(spec.base_dir) / key
        public = public_key_of(key)
    else:
        key, public = generate_keypair(folder)
    (folder / "hostkeys").mkdir(mode=0o700, exist_ok=True)
    host_keys, custom = {}, {}
    for rank in range(spec.nodes):
        vm = f"{run_id}-{rank}"
        hk = generate_host_key(folder / "hostkeys" / vm)
        host_keys[rank] = hk.public
        custom[rank] = as_custom_data(
            cloud_init(
                run_id=run_id,
                vm_name=vm,
                rank=rank,
                host_private_key=hk.private_openssh,
                host_public_key=hk.public,
                user=spec.ssh.user,
                max_duration=spec.max_duration,
                gpu=spec.resources.size.is_gpu,
            )
        )
    return RunKeys(key, public, host_keys, custom)


class RunContext:
    """One run's record in the store, its folder, and how it tells the user what happens."""

    def __init__(self, spec: JobSpec, target: Target, session: Any, run_id: str, say: Any, on_event: Any) -> None:
        from orchestrator.state import open_store

        self.spec, self.target, self.session, self.run_id = spec, target, session, run_id
        self.say = say
        self.on_event = on_event
        self.folder = run_dir(target.state, run_id)
        self.store = open_store(target.state)
        # Before anything exists in Azure: a process killed from here on leaves a findable record.
        self.store.create_run(
            run_id=run_id,
            job=spec.name,
            source=spec.source,
            target=target.kind,
            subscription=session.subscription_id,
            resource_group=resource_group_name(run_id),
            pid=os.getpid(),
        )

    def phase(self, state: str) -> None:
        self.store.transition(self.run_id, state)

    def resource_event(self, event: Any) -> None:
        self.store.resource(self.run_id, event.resource.id, event.resource.type, event.resource.name, event.status)
        if self.on_event is not None:
            self.on_event(event)

    def provision(self) -> tuple[Any, RunKeys]:
        from orchestrator.azure.provision import Provisioner

        self.phase("provisioning")
        self.say(f"provisioning {resource_group_name(self.run_id)} in {self.spec.resources.region}")
        keys = _keys(self.spec, self.run_id, self.folder)
        plan = build_plan(
            self.spec,
            self.run_id,
            subscription_id=self.session.subscription_id,
            owner=owner_name(),
            now=datetime.now(UTC),
            ssh_public_key=keys.client_public,
            custom_data=keys.custom_data,
        )
        result = Provisioner(self.session, on_event=self.resource_event).provision(plan)
        nodes = [{**n.__dict__, "host_key": keys.host_keys[n.rank], "user": self.spec.ssh.user} for n in result.nodes]
        (self.folder / "nodes.json").write_text(json.dumps(nodes, indent=2))
        return result, keys

    def teardown(self) -> bool:
        """Delete the run's group. Interrupts are held back until the DELETE is sent (from then on
        Azure finishes it regardless); after that a second interrupt stops only the waiting."""
        from orchestrator.azure.teardown import start_group_delete, wait_deleted

        group = resource_group_name(self.run_id)
        self.phase("tearing down")
        self.say(f"tearing down {group}")
        sending = f"still deleting {group}: the request must reach Azure first; then Ctrl-C stops the waiting"
        with _interrupts(lambda: self.say(sending), second_stops=False):
            poller = start_group_delete(self.session, group)
        if poller is None:
            self.store.mark_resources(self.run_id, "deleted")
            return True
        try:
            waiting = f"Azure is deleting {group}; press Ctrl-C again to stop waiting (the deletion goes on)"
            with _interrupts(lambda: self.say(waiting), second_stops=True):
                wait_deleted(poller, group)
        except KeyboardInterrupt:
            self.say(f"stopped waiting; Azure goes on deleting {group} (`orchestrator status {self.run_id}`)")
            self.store.mark_resources(self.run_id, "deleting")
            return False
        self.store.mark_resources(self.run_id, "deleted")
        return True


IP_ECHO_URL = "https://api.ipify.org"


def detect_public_ip(url: str | None = None, timeout: float = 5.0) -> str:
    """This machine's public address as the Internet sees it (what the NSG must let in)."""
    import ipaddress
    import urllib.request

    url = url or os.environ.get("ORCH_IP_ECHO_URL", IP_ECHO_URL)
    try:
        with urllib.request.urlopen(url, timeout=timeout) as response:
            text = response.read(64).decode().strip()
        return str(ipaddress.ip_address(text))
    except (OSError, ValueError) as e:
        raise UserInputError(
            f"Could not detect your public address from {url} ({e}). Pass it yourself with --ssh-cidr "
            "203.0.113.7/32 (or set ssh.allowed_cidrs)."
        ) from None


def with_ssh_sources(spec: JobSpec, target_kind: str, say: Any = print) -> JobSpec:
    """Resolve ssh.allowed_cidrs for a real run: `auto` becomes this machine's address; an empty list
    is refused on Azure (SSH open to the Internet must be asked for, with `any`)."""
    cidrs = list(spec.ssh.allowed_cidrs)
    if target_kind == "local":
        cidrs = [c for c in cidrs if c not in {"auto", "any"}] or ["127.0.0.1/32"]  # emulated VMs: loopback
    elif "auto" in cidrs:
        ip = detect_public_ip()
        say(f"SSH allowed from your address {ip} (detected)")
        cidrs = [c for c in cidrs if c != "auto"] + [f"{ip}/32" if ":" not in ip else f"{ip}/128"]
    elif not cidrs:
        raise UserInputError(
            f"{spec.source}: ssh.allowed_cidrs is empty, so nobody could be let in safely. Set it to your "
            "address, pass --ssh-cidr auto to detect it, or --ssh-cidr any to open SSH to the whole Internet "
            "(not recommended: the VM is a paying GPU with your code on it)."
        )
    elif "any" in cidrs:
        say("warning: SSH (port 22) is open to the whole Internet (--ssh-cidr any)")
    return spec.model_copy(update={"ssh": spec.ssh.model_copy(update={"allowed_cidrs": cidrs})})


@contextmanager
def _interrupts(tell: Any, *, second_stops: bool) -> Iterator[None]:
    """While the block runs, SIGINT/SIGTERM print `tell`; with second_stops the second one raises
    KeyboardInterrupt. Only the main thread can own signals; elsewhere this changes nothing."""
    import signal
    import threading

    if threading.current_thread() is not threading.main_thread():
        yield
        return
    previous = {sig: signal.getsignal(sig) for sig in (signal.SIGINT, signal.SIGTERM)}
    count = [0]

    def handler(signum: int, frame: Any) -> None:
        count[0] += 1
        if second_stops and count[0] > 1:
            raise KeyboardInterrupt
        tell()

    for sig in previous:
        signal.signal(sig, handler)
    try:
        yield
    finally:
        for sig, old in previous.items():
            signal.signal(sig, old)


def provision(
    spec: JobSpec, target: Target, *, on_event: Any = None, run_id: str | None = None, say: Any = print
) -> Any:
    """Create the run's resources and keep them (state `kept`); on any failure or interrupt, delete them."""
    run_id = run_id or new_run_id(spec.name)
    spec = with_ssh_sources(spec, target.kind, say)
    with open_session(target) as session:
        ctx = RunContext(spec, target, session, run_id, say, on_event)
        try:
            result, _ = ctx.provision()
        except BaseException as e:
            torn = ctx.teardown()
            ctx.store.transition(run_id, "failed", error=_describe(e), torn_down=torn)
            raise
        ctx.store.transition(run_id, "kept")
        return result


def _describe(e: BaseException) -> str:
    if isinstance(e, KeyboardInterrupt):
        return "interrupted"
    return str(e) or type(e).__name__


# ---------------------------------------------------------------------------------------------- run


@dataclass
class RunOutcome:
    run_id: str
    exit_code: int  # the job's (0 when it succeeded)
    failed_phase: str | None
    artifacts: Path | None
    metrics: dict[str, Any]
    seconds: float
    torn_down: bool
    error: str = ""  # collecting artifacts failed (the job's own result is in exit_code)
    gates: list[Any] = field(default_factory=list)  # gates.GateResult for each `expect` metric
    cost_usd: float = 0.0  # the VMs' price from creation to deletion (public IPs included)


def run(
    spec: JobSpec,
    target: Target,
    *,
    on_event: Any = None,
    emit: Any = print,
    say: Any = print,
    keep: bool = False,
    run_id: str | None = None,
    layout_base: str = "~/orch",
    upload_limit: int = 2 << 30,
    artifacts_dir: Path | None = None,
) -> RunOutcome:
    """Provision, sync, set up, train, collect, and always tear down (unless keep)."""
    import time

    from orchestrator.remote.connect import Endpoint, Node
    from orchestrator.remote.job import JobOutcome, JobRunner, forwarded_secrets
    from orchestrator.remote.layout import RemoteLayout

    t0 = time.monotonic()
    secrets = forwarded_secrets(spec)  # before anything is created: a missing secret costs nothing
    spec = with_ssh_sources(spec, target.kind, say)
    run_id = run_id or new_run_id(spec.name)
    with open_session(target) as session:
        ctx = RunContext(spec, target, session, run_id, say, on_event)
        nodes: list[Any] = []
        outcome = JobOutcome()
        gate_results: list[Any] = []
        guard = _Limits(spec, nodes, say)
        error = ""
        torn_down = False
        try:
            result, keys = ctx.provision()
            say(f"provisioned {len(result.nodes)} node(s) in {result.seconds:.1f} s")
            for n in result.nodes:
                host, port = session.ssh_endpoint(n.public_ip)
                nodes.append(
                    Node(
                        Endpoint(n.vm_name, host, port, spec.ssh.user, keys.host_keys[n.rank], keys.client_key, n.rank)
                    )
                )
            runner = JobRunner(
                spec,
                nodes,
                RemoteLayout(run_id, layout_base),
                ctx.folder,
                master_addr=result.nodes[0].private_ip,
                emit=emit,
                say=say,
                secrets=secrets,
                upload_limit=upload_limit,
                on_phase=ctx.phase,
            )
            ctx.phase("connecting")
            runner.connect()
            say("connected")
            outcome = runner.execute(artifacts_dir or ctx.folder / "artifacts")
            guard.check()
            error = outcome.error
            if outcome.exit_code == 0 and spec.expect:
                gate_results = evaluate(spec.expect, outcome.metrics)
                for g in gate_results:
                    say(f"gate {g.describe()}")
        except BaseException as e:
            error = guard.reason or _describe(e)
            if guard.reason:
                raise LimitReached(guard.reason) from e
            raise
        finally:
            guard.cancel()
            for node in nodes:
                node.cancel()
            if not (keep and not error):
                try:
                    torn_down = ctx.teardown()
                except Exception as e:  # recorded, then reported: a failed teardown must be seen
                    error = error or f"teardown failed: {e}"
                    ctx.store.transition(run_id, "failed", error=error, torn_down=False)
                    raise
            failed = bool(error) or outcome.exit_code != 0
            ctx.store.transition(
                run_id,
                "kept" if keep and not error else ("failed" if failed else "done"),
                exit_code=outcome.exit_code if outcome.phases else None,
                error=error or None,
                artifacts=str(outcome.artifacts.destination) if outcome.artifacts else None,
                metrics=outcome.metrics,
                torn_down=torn_down,
            )
        if gate_results and not all(g.passed for g in gate_results):
            ctx.store.update(
                run_id, error="metric gate failed: " + "; ".join(g.describe() for g in gate_results if not g.passed)
            )
        return RunOutcome(
            run_id,
            outcome.exit_code,
            outcome.failed_phase,
            outcome.artifacts.destination if outcome.artifacts else None,
            outcome.metrics,
            time.monotonic() - t0,
            torn_down,
            outcome.error,
            gate_results,
            spec.hourly_usd() * (time.monotonic() - t0) / 3600,
        )


class LimitReached(OrchestratorError):
    """max_duration or budget_usd stopped the run (it was torn down)."""


class _Limits:
    """Stops a run when max_duration passes or the projected cost would pass budget_usd: the nodes
    are cancelled, so the run unwinds into its teardown. The clock starts before provisioning."""

    def __init__(self, spec: JobSpec, nodes: list[Any], say: Any) -> None:
        import threading

        self.reason = ""
        hourly = spec.hourly_usd()
        limit, why = float(spec.max_duration), f"max_duration ({spec.max_duration} s) passed"
        if spec.budget_usd is not None and hourly > 0:
            by_budget = spec.budget_usd / hourly * 3600
            if by_budget < limit:
                limit = by_budget
                why = (
                    f"the projected cost would pass budget_usd ${spec.budget_usd:,.2f} "
                    f"(${hourly:,.3f}/hour for {spec.nodes} node(s), stopped after {by_budget:,.0f} s)"
                )
        self._why, self._nodes, self._say = why, nodes, say
        self._timer = threading.Timer(limit, self._fire)
        self._timer.daemon = True
        self._timer.start()

    def _fire(self) -> None:
        self.reason = f"Stopped and torn down: {self._why}."
        self._say(self.reason)
        for node in list(self._nodes):
            node.cancel()

    def check(self) -> None:
        if self.reason:
            raise LimitReached(self.reason)

    def cancel(self) -> None:
        self._timer.cancel()


# ------------------------------------------------------------------------ working on a kept run


@contextmanager
def attached(run_id: str, target: Target) -> Iterator[tuple[Any, list[Any], Any]]:
    """(record, nodes, session) of a provisioned run, its VMs reachable with the run's own keys."""
    from orchestrator.remote.connect import Endpoint, Node
    from orchestrator.state import open_store

    record = open_store(target.state).get(run_id)
    folder = target.state / "runs" / run_id
    nodes_file = folder / "nodes.json"
    if record is None or not nodes_file.exists():
        raise UserInputError(
            f"no provisioned run {run_id}; `orchestrator ls` lists runs, and `orchestrator "
            "provision JOB` (or `run --keep`) makes one you can work on."
        )
    if record.torn_down:
        raise UserInputError(f"run {run_id} has been torn down; provision a new one.")
    key = folder / "id_ed25519"
    with open_session(target_of(run_id, target)) as session:
        nodes = []
        for n in json.loads(nodes_file.read_text()):
            host, port = session.ssh_endpoint(n["public_ip"])
            nodes.append(Node(Endpoint(n["vm_name"], host, port, n["user"], n["host_key"], key, n["rank"])))
        try:
            yield record, nodes, session
        finally:
            for node in nodes:
                node.cancel()


def exec_command(
    run_id: str,
    target: Target,
    command: str,
    *,
    emit: Any = print,
    node_rank: int | None = None,
    layout_base: str = "~/orch",
) -> int:
    """Run a command in the job folder on the run's VMs (all, or one); the first non-zero exit code."""
    from orchestrator.remote.job import on_all
    from orchestrator.remote.layout import RemoteLayout, rq

    layout = RemoteLayout(run_id, layout_base)
    with attached(run_id, target) as (_, nodes, _session):
        chosen = [n for n in nodes if node_rank is None or n.ep.rank == node_rank]
        if not chosen:
            raise UserInputError(f"run {run_id} has no node {node_rank}")
        multi = len(chosen) > 1

        def one(node: Any) -> int:
            result = node.exec(f"mkdir -p {rq(layout.job_dir)} && cd {rq(layout.job_dir)} && {command}")
            for line in (result.stdout + result.stderr).decode(errors="replace").splitlines():
                emit((f"[{node.label}] " if multi else "") + line)
            return int(result.exit_code)

        codes = on_all(chosen, one)
        return next((c for c in codes if c != 0), 0)


def collect(run_id: str, target: Target, dest: Path | None = None) -> Any:
    from orchestrator.remote.job import JobRunner
    from orchestrator.remote.layout import RemoteLayout
    from orchestrator.spec import load_spec

    with attached(run_id, target) as (record, nodes, _session):
        spec = load_spec(record.source)
        runner = JobRunner(
            spec,
            nodes,
            RemoteLayout(run_id),
            target.state / "runs" / run_id,
            master_addr="",
            emit=print,
            say=print,
            secrets={},
        )
        return runner.collect(dest or target.state / "runs" / run_id / "artifacts")


def train(
    run_id: str, target: Target, *, emit: Any = print, say: Any = print, artifacts_dir: Path | None = None
) -> Any:
    """sync + setup + run (+ collect) on a kept run's VMs; the VMs stay up afterwards."""
    from orchestrator.remote.job import JobRunner, forwarded_secrets
    from orchestrator.remote.layout import RemoteLayout
    from orchestrator.state import open_store

    store = open_store(target.state)
    with attached(run_id, target) as (record, nodes, _session):
        from orchestrator.spec import load_spec

        spec = load_spec(record.source)
        master = json.loads((target.state / "runs" / run_id / "nodes.json").read_text())[0]["private_ip"]
        runner = JobRunner(
            spec,
            nodes,
            RemoteLayout(run_id),
            target.state / "runs" / run_id,
            master_addr=master,
            emit=emit,
            say=say,
            secrets=forwarded_secrets(spec),
            on_phase=lambda st: store.transition(run_id, st),
        )
        runner.connect()
        runner.restart_phases()
        try:
            outcome = runner.execute(artifacts_dir or target.state / "runs" / run_id / "artifacts")
        finally:
            store.transition(run_id, "kept")
        store.update(
            run_id,
            exit_code=outcome.exit_code,
            metrics=outcome.metrics,
            artifacts=str(outcome.artifacts.destination) if outcome.artifacts else None,
        )
        return outcome


# --------------------------------------------------------------------------------------- down / gc


def _group_for(run: str) -> str:
    if run.startswith("orch-"):
        return run
    if not RUN_ID_RE.match(run):
        raise UserInputError(f"'{run}' is not a run id (like mnist-cnn-1a2b3c); `orchestrator ls` lists runs.")
    return resource_group_name(run)


def target_of(run: str, target: Target) -> Target:
    """A recorded run is acted on where it was created (its target and subscription)."""
    from orchestrator.state import open_store

    record = open_store(target.state).get(run.removeprefix("orch-"))
    if record is None:
        return target
    return Target(
        kind="local" if record.target == "local" else "azure",
        state=target.state,
        subscription=record.subscription if record.target == "azure" else target.subscription,
    )


def down(run: str, target: Target) -> bool:
    """Delete a run's resource group and confirm it is gone; False if there was nothing to delete."""
    from orchestrator.azure.teardown import delete_group, group_exists
    from orchestrator.state import open_store

    group = _group_for(run)
    target = target_of(run, target)
    with open_session(target) as session:
        existed = delete_group(session, group, wait=True)
        if group_exists(session, group):
            raise CloudError(
                f"Resource group {group} still exists after deletion; run `orchestrator down {run}` "
                "again or check the Azure portal."
            )
    store = open_store(target.state)
    run_id = group.removeprefix("orch-")
    if store.get(run_id) is not None:
        store.mark_resources(run_id, "deleted")
        record = store.get(run_id)
        store.transition(run_id, "done" if record and record.state in {"kept", "done"} else "failed", torn_down=True)
    return existed


def gc(
    target: Target,
    *,
    run_id: str | None = None,
    include_unexpired: bool = False,
    dry_run: bool = False,
    owner: str | None = None,
) -> list[Any]:
    from orchestrator.azure.teardown import gc as azure_gc
    from orchestrator.state import open_store

    with open_session(target) as session:
        groups = azure_gc(
            session, datetime.now(UTC), run_id=run_id, include_unexpired=include_unexpired, dry_run=dry_run, owner=owner
        )
    if not dry_run:  # the records of runs whose groups gc removed stop looking alive
        store = open_store(target.state)
        for g in groups:
            record = store.get(g.run_id)
            if record is not None and not record.torn_down:
                store.mark_resources(g.run_id, "deleted")
                ended = "failed" if record.active or record.state == "failed" else "done"
                store.transition(
                    g.run_id, ended, torn_down=True, error=record.error or ("removed by gc" if record.active else None)
                )
    return groups
