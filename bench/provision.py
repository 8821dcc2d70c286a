"""Provisioning speed on the emulator's azure-like profile, time-scaled to run in seconds.

Compares, in emulated Azure seconds and ARM requests (polls included):
  ours        the Provisioner: dependency-driven parallelism, NIC + public IP inline, scheduled polls
  sequential  a seed-style script: each resource created and awaited in turn (RG, VNet, NSG, public IP,
              NIC, VM), NIC and public IP as separate resources, the SDK's default polling
  seq-5s      the same script with a hand-tuned 5 s polling interval (a fairer, faster baseline)
  bound       the critical-path lower bound: the profile's durations along the longest dependency
              chain (RG -> max(VNet, NSG) -> VM), with zero request latency and zero polling delay

Failover (`--failover`, on by default): three candidates, the first two failing late (AllocationFailed
as a failed VM operation, injected by region), the third succeeding:
  ours        Provisioner.provision_candidates: the group is kept, a failed candidate's VMs are
              deleted (with their NICs, IPs, disks), and its VNet/NSG when the next is in another region
  group-del   the simple alternative: each candidate a plain provision, the group deleted (forced)
              and awaited after each failure, then made again
  bound       the winning candidate's critical path plus, for each failed one, its VM create and the
              deletion before the next attempt (VM delete; VNet delete and re-create on a region change)

    python bench/provision.py [--speed 50] [--repeat 3] [--nodes 1 3] [--no-failover]
"""

from __future__ import annotations

import argparse
import statistics
import time
from collections.abc import Callable
from dataclasses import dataclass
from datetime import UTC, datetime
from typing import Any

from orchestrator.azure.provision import Provisioner, ProvisionFailed
from orchestrator.azure.session import AzureSession
from orchestrator.candidates import Candidate
from orchestrator.clock import ScaledClock
from orchestrator.emulator import Emulator, Fault, get_profile
from orchestrator.plan import T_NSG, T_RG, T_VM, T_VNET, ResourcePlan, build_plan
from orchestrator.spec import JobSpec
from orchestrator.targets.emulated import emulator_session

SUB = "33333333-3333-3333-3333-333333333333"
KEY = "ssh-ed25519 AAAAC3NzaC1lZDI1NTE5AAAAIBenchmarkKeyBenchmarkKeyBenchmarkKey00000000 bench"


@dataclass
class Sample:
    seconds: float  # emulated
    requests: int
    polls: int


def make_plan(nodes: int) -> ResourcePlan:
    spec = JobSpec.model_validate({"name": "bench", "run": "true", "nodes": nodes})
    return build_plan(
        spec, "bench-000000", subscription_id=SUB, owner="bench", now=datetime.now(UTC), ssh_public_key=KEY
    )


def fresh(speed: float) -> tuple[Emulator, AzureSession]:
    emu = Emulator("azure-like", clock=ScaledClock(speed))
    return emu, emulator_session(emu, subscription=SUB)


def measure(speed: float, run: Callable[[AzureSession, ResourcePlan], Any], plan: ResourcePlan) -> Sample:
    emu, session = fresh(speed)
    t0 = emu.clock.now()
    run(session, plan)
    seconds = emu.clock.now() - t0
    log = emu.requests()
    return Sample(seconds, len(log), sum(1 for r in log if r.kind == "poll"))


def ours(session: AzureSession, plan: ResourcePlan) -> None:
    Provisioner(session).provision(plan)


def sequential(polling_interval: float | None) -> Callable[[AzureSession, ResourcePlan], None]:
    """What a first script does: one resource at a time, each awaited, NIC and IP as their own resources."""

    def run(s: AzureSession, plan: ResourcePlan) -> None:
        kw: dict[str, Any] = {} if polling_interval is None else {"polling_interval": polling_interval}
        rg = plan.resource_group
        by_type = {r.type: r for r in plan.resources}
        s.resources.resource_groups.create_or_update(rg, by_type[T_RG].body)
        vnet, nsg = by_type[T_VNET], by_type[T_NSG]
        s.network.virtual_networks.begin_create_or_update(rg, vnet.name, vnet.body, **kw).result()
        s.network.network_security_groups.begin_create_or_update(rg, nsg.name, nsg.body, **kw).result()
        for r in plan.resources:
            if r.type != T_VM:
                continue
            body = r.body
            cfg = body["properties"]["networkProfile"]["networkInterfaceConfigurations"][0]
            ipc = cfg["properties"]["ipConfigurations"][0]["properties"]
            pip_name = ipc["publicIPAddressConfiguration"]["name"]
            pip = s.network.public_ip_addresses.begin_create_or_update(
                rg,
                pip_name,
                {
                    "location": body["location"],
                    "tags": body["tags"],
                    "sku": {"name": "Standard"},
                    "properties": {"publicIPAllocationMethod": "Static"},
                },
                **kw,
            ).result()
            nic = s.network.network_interfaces.begin_create_or_update(
                rg,
                cfg["name"],
                {
                    "location": body["location"],
                    "tags": body["tags"],
                    "properties": {
                        "networkSecurityGroup": cfg["properties"]["networkSecurityGroup"],
                        "ipConfigurations": [
                            {
                                "name": "ipconfig1",
                                "properties": {"subnet": ipc["subnet"], "publicIPAddress": {"id": pip["id"]}},
                            }
                        ],
                    },
                },
                **kw,
            ).result()
            vm_body = {
                **body,
                "properties": {
                    **body["properties"],
                    "networkProfile": {"networkInterfaces": [{"id": nic["id"], "properties": {"primary": True}}]},
                },
            }
            s.compute.virtual_machines.begin_create_or_update(rg, r.name, vm_body, **kw).result()

    return run


def lower_bound(plan: ResourcePlan) -> float:
    profile = get_profile("azure-like")
    return plan.critical_path_seconds(profile.create)


FAILOVER = (
    Candidate("Standard_NC4as_T4_v3", "eastus", "1", False),  # fails late (AllocationFailed)
    Candidate("Standard_NC4as_T4_v3", "eastus", "2", False),  # fails late: same region, network kept
    Candidate("Standard_NC4as_T4_v3", "westus2", "1", False),  # succeeds: another region
)


def failover_plan_for(nodes: int) -> Callable[[Candidate, str | None], ResourcePlan]:
    spec = JobSpec.model_validate(
        {"name": "bench", "run": "true", "nodes": nodes, "resources": {"region": ["eastus", "westus2"], "zone": "any"}}
    )
    now = datetime.now(UTC)

    def plan_for(c: Candidate, group_location: str | None) -> ResourcePlan:
        return build_plan(
            spec,
            "bench-000000",
            subscription_id=SUB,
            owner="bench",
            now=now,
            ssh_public_key=KEY,
            candidate=c,
            group_location=group_location,
        )

    return plan_for


def failing_emulator(speed: float) -> tuple[Emulator, AzureSession]:
    emu, session = fresh(speed)
    for zone in ("1", "2"):  # candidates 1 and 2: the VM operation ends Failed, as Azure's do
        emu.inject(
            Fault(
                "AllocationFailed",
                status=200,
                method="PUT",
                resource_type=T_VM,
                phase="lro",
                location="eastus",
                zone=zone,
                count=None,
            )
        )
    return emu, session


def failover_ours(speed: float, nodes: int) -> Sample:
    emu, session = failing_emulator(speed)
    t0 = emu.clock.now()
    result = Provisioner(session).provision_candidates(FAILOVER, failover_plan_for(nodes))
    assert [a.ok for a in result.attempts] == [False, False, True], result.attempts
    log = emu.requests()
    return Sample(emu.clock.now() - t0, len(log), sum(1 for r in log if r.kind == "poll"))


def failover_group_delete(speed: float, nodes: int) -> Sample:
    emu, session = failing_emulator(speed)
    plan_for = failover_plan_for(nodes)
    t0 = emu.clock.now()
    for c in FAILOVER:
        try:
            Provisioner(session).provision(plan_for(c, None))  # deletes the group and waits on failure
            break
        except ProvisionFailed:
            continue
    log = emu.requests()
    return Sample(emu.clock.now() - t0, len(log), sum(1 for r in log if r.kind == "poll"))


def failover_bound(nodes: int) -> float:
    """The winning candidate's critical path + per failed attempt its VM create and VM delete, the
    VNet delete on a region change, and the first region's network when the winner is elsewhere."""
    profile = get_profile("azure-like")
    plan_for = failover_plan_for(nodes)
    win = plan_for(FAILOVER[-1], "eastus").critical_path_seconds(profile.create)
    vm_create, vm_delete = profile.create[T_VM], profile.delete[T_VM]
    net_delete = max(profile.delete[T_VNET], profile.delete[T_NSG])
    failed = 0.0
    for i, c in enumerate(FAILOVER[:-1]):
        failed += vm_create + vm_delete + (net_delete if FAILOVER[i + 1].region != c.region else 0.0)
    first_network = max(profile.create[T_VNET], profile.create[T_NSG])  # made once, for the first candidate
    return win + failed + (first_network if FAILOVER[-1].region != FAILOVER[0].region else 0.0)


def bench_failover(speed: float, repeat: int, node_counts: list[int]) -> None:
    print(
        "\nfailover: candidates eastus z1 and eastus z2 fail late (AllocationFailed), westus2 z1 succeeds; "
        "Azure seconds"
    )
    print(f"{'nodes':>5} {'method':<12} {'seconds':>8} {'x bound':>8} {'requests':>9} {'polls':>6}")
    for nodes in node_counts:
        bound = failover_bound(nodes)
        rows: dict[str, Sample] = {}
        for name, fn in (("ours", failover_ours), ("group-del", failover_group_delete)):
            samples = [fn(speed, nodes) for _ in range(repeat)]
            rows[name] = Sample(
                statistics.median(s.seconds for s in samples),
                int(statistics.median(s.requests for s in samples)),
                int(statistics.median(s.polls for s in samples)),
            )
        for name, s in rows.items():
            print(f"{nodes:>5} {name:<12} {s.seconds:>8.1f} {s.seconds / bound:>8.2f} {s.requests:>9} {s.polls:>6}")
        print(f"{nodes:>5} {'bound':<12} {bound:>8.1f} {1.0:>8.2f}")
        print(
            f"      keeping the group saves {rows['group-del'].seconds - rows['ours'].seconds:.1f} s over deleting it "
            f"between attempts ({rows['group-del'].seconds / rows['ours'].seconds:.2f}x)"
        )


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--speed", type=float, default=50.0, help="emulated seconds per wall second")
    ap.add_argument("--repeat", type=int, default=3)
    ap.add_argument("--nodes", type=int, nargs="+", default=[1, 3])
    ap.add_argument("--no-failover", dest="failover", action="store_false", help="skip the failover case")
    args = ap.parse_args()

    print(f"azure-like profile, {args.speed:g}x time scale, median of {args.repeat}; seconds are Azure seconds")
    print(f"{'nodes':>5} {'method':<12} {'seconds':>8} {'x bound':>8} {'speedup':>8} {'requests':>9} {'polls':>6}")
    wall0 = time.perf_counter()
    # One untimed round first: importing the SDK's clients takes ~0.5 s of real time, which the
    # time scale would inflate to ~25 emulated seconds on the first measurement.
    for fn in (ours, sequential(None)):
        measure(args.speed * 10, fn, make_plan(1))
    for nodes in args.nodes:
        plan = make_plan(nodes)
        bound = lower_bound(plan)
        rows: dict[str, Sample] = {}
        for name, fn in (("ours", ours), ("sequential", sequential(None)), ("seq-5s", sequential(5.0))):
            samples = [measure(args.speed, fn, plan) for _ in range(args.repeat)]
            rows[name] = Sample(
                statistics.median(s.seconds for s in samples),
                int(statistics.median(s.requests for s in samples)),
                int(statistics.median(s.polls for s in samples)),
            )
        for name, s in rows.items():
            speedup = rows["sequential"].seconds / s.seconds
            print(
                f"{nodes:>5} {name:<12} {s.seconds:>8.1f} {s.seconds / bound:>8.2f} {speedup:>7.2f}x "
                f"{s.requests:>9} {s.polls:>6}"
            )
        print(f"{nodes:>5} {'bound':<12} {bound:>8.1f} {1.0:>8.2f}")
        o = rows["ours"]
        requests = f"; <= 40 requests for 1 node: {o.requests}" if nodes == 1 else ""
        print(
            f"      targets: ours <= 1.10 x bound: {o.seconds / bound:.3f}; >= 2x faster than sequential: "
            f"{rows['sequential'].seconds / o.seconds:.2f}x (the bound itself is "
            f"{rows['sequential'].seconds / bound:.2f}x){requests}"
        )
    if args.failover:
        bench_failover(args.speed, args.repeat, args.nodes)
    print(f"(bench wall time {time.perf_counter() - wall0:.1f} s)")


if __name__ == "__main__":
    main()
