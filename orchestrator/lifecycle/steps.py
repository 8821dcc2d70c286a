"""The named steps of a run, each a small function: check, provision, connect, sync, setup, train,
collect (teardown is RunContext.teardown). run.py composes them."""

from __future__ import annotations

import getpass
import os
import socket
import threading
from collections.abc import Iterable, Sequence
from dataclasses import dataclass, field
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

from orchestrator.candidates import Candidate
from orchestrator.errors import OrchestratorError
from orchestrator.lifecycle.context import RunContext
from orchestrator.plan import build_plan
from orchestrator.runfiles import NodeRecord, RunFiles
from orchestrator.spec import JobSpec
from orchestrator.targets import Target


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


def connect_options(target: Target) -> Any:
    from orchestrator.remote.connect import ConnectOptions

    return ConnectOptions(
        keepalive_s=int(float(os.environ.get("ORCH_SSH_KEEPALIVE", "15"))),
        max_backoff_s=target.connect_backoff_max_s,
    )


# ---------------------------------------------------------------------------------------- check


def check(spec: JobSpec, target: Target, say: Any) -> tuple[JobSpec, dict[str, str], list[str]]:
    """Before anything is created: forwarded secrets exist, SSH sources resolve. A problem here costs
    nothing. Returns the spec with its SSH sources resolved, the secrets, and warnings."""
    from orchestrator.remote.job import forwarded_secrets

    secrets = forwarded_secrets(spec)
    sources = target.ssh_sources(list(spec.ssh.allowed_cidrs), spec.source, say)
    spec = spec.model_copy(update={"ssh": spec.ssh.model_copy(update={"allowed_cidrs": sources.cidrs})})
    return spec, secrets, sources.warnings


# ------------------------------------------------------------------------------------ provision


@dataclass
class RunKeys:
    client_key: Path  # private key the runner logs in with
    client_public: str
    host_keys: dict[int, str]  # rank -> pinned public host key
    custom_data: dict[int, str]  # rank -> base64 cloud-init carrying that host key
    # The same, per GPU-ness of the size (the cloud-init of a GPU size differs): candidates may mix.
    custom_data_by_gpu: dict[bool, dict[int, str]] = field(default_factory=dict)

    def custom_data_for(self, gpu: bool) -> dict[int, str]:
        return self.custom_data_by_gpu.get(gpu, self.custom_data)


def make_keys(spec: JobSpec, run_id: str, files: RunFiles, gpu_flags: Iterable[bool] = ()) -> RunKeys:
    """The run's login key pair and one host key per VM, all made here and kept in the run folder."""
    from orchestrator.bootstrap import as_custom_data, cloud_init
    from orchestrator.sshkeys import generate_host_key, generate_keypair, generate_rsa_host_key, public_key_of

    if spec.ssh.private_key:
        key = Path(spec.ssh.private_key).expanduser()
        key = key if key.is_absolute() else Path(spec.base_dir) / key
        public = public_key_of(key)
    else:
        key, public = generate_keypair(files.root, files.client_key.name)
    files.hostkeys.mkdir(mode=0o700, exist_ok=True)
    host_keys: dict[int, str] = {}
    primary = spec.resources.size.is_gpu
    by_gpu: dict[bool, dict[int, str]] = {flag: {} for flag in {primary, *gpu_flags}}
    for rank in range(spec.nodes):
        vm = f"{run_id}-{rank}"
        hk = generate_host_key(files.hostkey(vm))
        rsa = generate_rsa_host_key()  # one per VM, whichever candidate's document carries it
        host_keys[rank] = hk.public
        for gpu, custom in by_gpu.items():
            custom[rank] = as_custom_data(
                cloud_init(
                    run_id=run_id,
                    vm_name=vm,
                    rank=rank,
                    host_private_key=hk.private_openssh,
                    host_public_key=hk.public,
                    user=spec.ssh.user,
                    max_duration=spec.max_duration,
                    gpu=gpu,
                    job=spec,
                    rsa_host_key=(rsa.private_openssh, rsa.public),
                )
            )
    return RunKeys(key, public, host_keys, by_gpu[primary], by_gpu)


def provision(
    ctx: RunContext, candidates: Sequence[Candidate] | None = None, *, identity: bool = False
) -> tuple[Any, list[NodeRecord], RunKeys]:
    """Create the run's resources on the first candidate Azure provisions (default: every
    candidate of the job, in order; the preflight passes those it did not drop). Each attempt is
    recorded in the store and said; afterwards `ctx.spec` is pinned to the candidate that won.
    `identity`: the VMs get a system-assigned managed identity (autostop)."""
    from orchestrator.azure.provision import Attempt, Provisioner

    tried = list(candidates if candidates is not None else ctx.spec.resources.candidates.ordered)
    ctx.state("provisioning")
    first = tried[0]
    more = f" (then {len(tried) - 1} more candidate(s) if Azure refuses it)" if len(tried) > 1 else ""
    ctx.report.say(f"provisioning {ctx.group}: {first.label()}{more}")
    now = datetime.now(UTC)
    warned: set[str] = set()

    def on_attempt(a: Attempt) -> None:
        ctx.store.attempt(ctx.run_id, a.n, a.candidate.to_json(), a.code or None, a.message or None, a.seconds)
        if not a.ok:
            following = tried[a.n] if a.n < len(tried) else None
            nxt = f"; trying {following.label()}" if following is not None else ""
            ctx.report.say(f"attempt {a.line()}{nxt}")

    with ctx.phase("provision"):
        keys = make_keys(ctx.spec, ctx.run_id, ctx.files, {c.vm.is_gpu for c in tried})

        def plan_for(c: Candidate, group_location: str | None) -> Any:
            plan = build_plan(
                ctx.spec,
                ctx.run_id,
                subscription_id=ctx.session.subscription_id,
                owner=owner_name(),
                now=now,
                ssh_public_key=keys.client_public,
                custom_data=keys.custom_data_for(c.vm.is_gpu),
                candidate=c,
                group_location=group_location,
                identity=identity,
            )
            for warning in plan.warnings:
                if warning not in warned:
                    warned.add(warning)
                    ctx.report.say(f"warning: {warning}")
            return plan

        provisioner = Provisioner(ctx.session, on_event=ctx.resource_event, on_attempt=on_attempt)
        result = provisioner.provision_candidates(tried, plan_for)
    ctx.spec = ctx.spec.pinned(result.candidate)
    # The price the run is billed at from now on (`cost`): today's list price may change later.
    if result.candidate is not None:
        price = result.candidate.usd_per_hour(ctx.spec.nodes, ctx.spec.resources.disk_gb)
        ctx.store.update(ctx.run_id, price_per_hour=price)
    if len(result.attempts) > 1:
        ctx.report.say(f"provisioned on candidate {result.attempts[-1].line()}")
    nodes = [
        NodeRecord(n.rank, n.vm_name, n.public_ip, n.private_ip, ctx.spec.ssh.user, keys.host_keys[n.rank])
        for n in result.nodes
    ]
    ctx.files.write_nodes(nodes)
    ctx.files.forget_host_private_keys()  # pinned in nodes.json; the VMs have theirs
    return result, nodes, keys


# ------------------------------------------------------------------------------ on the nodes


def ssh_nodes(target: Target, nodes: list[NodeRecord], key: Path) -> list[Any]:
    from orchestrator.remote.connect import Endpoint, Node, load_client

    opts = connect_options(target)
    load_client()  # before the endpoints: a local VM's host may still be starting
    out = []
    for n in nodes:
        host, port = target.endpoint(n)
        out.append(Node(Endpoint(n.vm_name, host, port, n.user, n.host_key, key, n.rank), opts))
    return out


def runner_for(
    ctx_spec: JobSpec,
    target: Target,
    records: list[NodeRecord],
    nodes: list[Any],
    files: RunFiles,
    report: Any,
    secrets: dict[str, str],
    upload_limit: int | None = None,
    network_env: dict[str, str] | None = None,
) -> Any:
    """`network_env`: instead of the target's (a run whose node 0 was evicted has no master address
    until it is replaced; recovery sets it then)."""
    from orchestrator.remote.job import JobRunner
    from orchestrator.remote.layout import RemoteLayout
    from orchestrator.remote.sync import DEFAULT_LIMIT_BYTES

    return JobRunner(
        ctx_spec,
        nodes,
        RemoteLayout(files.run_id),
        files,
        network_env=target.job_network_env(records) if network_env is None else network_env,
        emit=report.log,
        say=report.say,
        secrets=secrets,
        upload_limit=upload_limit or DEFAULT_LIMIT_BYTES,
    )


def connect(ctx: RunContext, runner: Any) -> None:
    ctx.state("running")
    with ctx.phase("connect"):
        runner.connect()
    ctx.report.say("connected")


class GpuNotVisible(OrchestratorError):
    """A GPU size whose driver does not see its GPUs: nothing can train there."""


def gpu_check(nodes: list[Any], expected: int) -> None:
    """Before anything trains: every node's NVIDIA driver sees the size's GPUs. A driver that does not
    match the size (or Secure Boot refusing its module) fails the run here, not an hour into a
    CPU-speed 'GPU' job."""
    from orchestrator.remote.job import on_all

    def one(node: Any) -> str | None:
        result = node.exec("nvidia-smi -L 2>&1", timeout=60)
        seen = [line for line in result.text.splitlines() if line.startswith("GPU ")]
        if result.exit_code == 0 and len(seen) >= expected:
            return None
        detail = result.text.strip().splitlines()[-1:] or ["no output"]
        return f"{node.ep.name} sees {len(seen)} of {expected} GPU(s) (nvidia-smi exit {result.exit_code}: {detail[0]})"

    problems = [p for p in on_all(nodes, one) if p]
    if problems:
        raise GpuNotVisible(
            "The NVIDIA driver does not see this size's GPUs: " + "; ".join(problems) + ". Nothing was trained. "
            "The image's driver does not match the size, or Secure Boot refused its module; `orchestrator "
            "exec RUN -- dmesg` on a kept run (`--keep`) shows why."
        )


def sync(ctx: RunContext, runner: Any) -> None:
    with ctx.phase("sync"):
        runner.upload()


def job_phase(ctx: RunContext | None, runner: Any, name: str, commands: list[str], report: Any) -> Any:
    """setup or run (phase names `setup` and `train`) on every node, following its output."""
    report.say(f"{name}: " + " && ".join(commands))
    if ctx is None:
        return runner.phase(name, commands)
    with ctx.phase("setup" if name == "setup" else "train"):
        return runner.phase(name, commands)


def start_detached(ctx: RunContext, runner: Any, command: str) -> None:
    """Start the job's run phase on every node and leave it running (run --detach): the wrapper is
    detached on the VM, so nothing here needs to stay connected. Its `train` phase stays open."""
    from orchestrator.remote import run as remote_run
    from orchestrator.remote.job import on_all

    ctx.report.say(f"run: {command}")
    on_all(runner.nodes, lambda n: remote_run.start_phase(n, runner.layout, "run", [command], runner.env(n)))
    ctx.store.phase_start(ctx.run_id, "train")


def stop_job(nodes: list[Any], run_id: str) -> None:
    """End whatever phase is running on each node (the wrapper's whole process group)."""
    from orchestrator.remote.job import on_all
    from orchestrator.remote.layout import RemoteLayout, rq

    phases = rq(f"{RemoteLayout(run_id).root}/phases")

    # TERM the phase's whole process group, give it 10 s to write its last checkpoint, then KILL;
    # a wrapper killed this way records no exit code, so record 143 (TERM) for whoever follows it.
    script = (
        f'for p in {phases}/*/pid; do [ -f "$p" ] || continue; d=$(dirname "$p"); [ -e "$d/exit_code" ] && continue; '
        'g=$(cat "$p"); kill -TERM -- -"$g" 2>/dev/null; '
        'for i in $(seq 100); do kill -0 -- -"$g" 2>/dev/null || break; sleep 0.1; done; '
        'kill -KILL -- -"$g" 2>/dev/null; [ -e "$d/exit_code" ] || echo 143 > "$d/exit_code"; done; true'
    )

    def one(node: Any) -> None:
        node.resume()
        node.exec(script, timeout=30)

    on_all(nodes, one)


@dataclass
class Collected:
    report: Any = None  # artifacts.CollectReport (rank 0's)
    error: str = ""
    metrics: dict[str, Any] | None = None


def collect(runner: Any, dest: Path, *, deadline: float | None = None) -> Collected:
    """Bring the outputs home. With a deadline (after an interrupt) the collection runs in a thread
    and is abandoned when the deadline passes or a second Ctrl-C arrives."""
    import json

    from orchestrator.remote.artifacts import ArtifactError
    from orchestrator.remote.connect import SshError

    out = Collected()

    def work() -> None:
        try:
            out.report = runner.collect(dest)
        except (ArtifactError, SshError) as e:
            out.error = str(e)

    if deadline is None:
        work()
    else:
        for node in runner.nodes:
            node.resume()
        thread = threading.Thread(target=work, name="collect", daemon=True)
        thread.start()
        try:
            thread.join(deadline)
        except KeyboardInterrupt:
            out.error = "collection abandoned (second interrupt)"
        if thread.is_alive():
            out.error = out.error or f"collection did not finish within {deadline:.0f} s"
            for node in runner.nodes:
                node.cancel()
            thread.join(5)
    where = getattr(out.report, "destination", None)
    metrics_file = Path(where) / "metrics.json" if where else None
    if metrics_file is not None and metrics_file.is_file():
        try:
            out.metrics = json.loads(metrics_file.read_text())
        except ValueError:
            out.error = out.error or "metrics.json is not valid JSON"
    return out
