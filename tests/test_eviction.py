"""Spot eviction in the emulator, seen through the real SDK as Azure shows it: Delete takes the VM and
its OS disk (GET 404 ResourceNotFound) and leaves the NIC and public IP detached; Deallocate keeps
the VM, deallocated in its instance view. Eviction faults arm only spot VMs, by name or node index."""

from __future__ import annotations

import copy
from typing import Any

import pytest
from azure.core.exceptions import ResourceNotFoundError

from orchestrator.azure.provision import Provisioner
from orchestrator.azure.session import AzureSession
from orchestrator.emulator import Emulator, Fault
from tests.conftest import make_plan, make_spec

VM = "Microsoft.Compute/virtualMachines"


def _provision(session: AzureSession, *, spot: bool = True, policy: str = "Delete", nodes: int = 1) -> Any:
    plan = make_plan(make_spec(nodes=nodes, resources={"spot": spot}))
    if policy != "Delete":
        plan = copy.deepcopy(plan)
        for r in plan.resources:
            if r.type == VM:
                r.body["properties"]["evictionPolicy"] = policy
    return Provisioner(session).provision(plan)


def _types(emu: Emulator) -> list[str]:
    return sorted(r["type"].rsplit("/", 1)[1] for r in emu.live_resources() if "resourceGroups" not in r["type"])


def _vm_record(emu: Emulator, name: str) -> dict[str, Any]:
    return next(r for r in emu.live_resources() if r["type"] == VM and r["name"] == name)


def test_delete_eviction_takes_the_vm_and_its_disk_and_leaves_the_nic(emu: Emulator, session: AzureSession) -> None:
    emu.inject(Fault("Evicted", phase="evict", after=20))
    result = _provision(session)
    (node,) = result.nodes
    record = _vm_record(emu, node.vm_name)
    assert record["_eviction"] == {"after_s": 20.0, "notice_s": 30.0}
    before = _types(emu)
    assert emu.evict(record["id"]) == "Delete"
    rg = result.plan.resource_group
    with pytest.raises(ResourceNotFoundError) as e:
        session.compute.virtual_machines.get(rg, node.vm_name)
    assert e.value.error is not None and e.value.error.code == "ResourceNotFound"
    assert _types(emu) == sorted(t for t in before if t not in {"virtualMachines", "disks"})
    nics = list(session.network.network_interfaces.list(rg))
    assert len(nics) == 1 and nics[0].virtual_machine is None, "the NIC stays, detached"
    assert len(list(session.network.public_ip_addresses.list(rg))) == 1


def test_deallocate_eviction_keeps_the_vm_deallocated(emu: Emulator, session: AzureSession) -> None:
    emu.inject(Fault("Evicted", phase="evict", after=5))
    result = _provision(session, policy="Deallocate")
    (node,) = result.nodes
    rg = result.plan.resource_group
    before = _types(emu)
    assert emu.evict(_vm_record(emu, node.vm_name)["id"]) == "Deallocate"
    vm = session.compute.virtual_machines.get(rg, node.vm_name, expand="instanceView")
    assert vm.eviction_policy == "Deallocate" and vm.priority == "Spot"
    codes = [s.code for s in vm.instance_view.statuses]
    assert "PowerState/deallocated" in codes and "ProvisioningState/succeeded" in codes
    assert _types(emu) == before, "nothing goes: the disk keeps what the VM wrote"


def test_eviction_faults_arm_spot_vms_only_and_pick_by_node_index(emu: Emulator, session: AzureSession) -> None:
    emu.inject(Fault("Evicted", phase="evict", after=10, vm="1"))
    _provision(session, spot=False, nodes=2)
    assert not [r for r in emu.live_resources() if r.get("_eviction")], "an on-demand VM is never evicted"
    emu2 = Emulator("instant", clock=emu.clock)
    emu2.inject(Fault("Evicted", phase="evict", after=10, vm="1", count=1))
    from orchestrator.targets.emulated import emulator_session

    result = _provision(emulator_session(emu2, subscription=session.subscription_id), nodes=2)
    armed = sorted(r["name"] for r in emu2.live_resources() if r.get("_eviction"))
    assert armed == [next(n.vm_name for n in result.nodes if n.rank == 1)]


def test_the_watcher_sees_an_eviction_as_arm_shows_it(emu: Emulator, session: AzureSession) -> None:
    from orchestrator.lifecycle.recovery import evictions
    from orchestrator.runfiles import NodeRecord

    emu.inject(Fault("Evicted", phase="evict", after=5, vm="0"))
    result = _provision(session, nodes=2)
    rg = result.plan.resource_group
    records = [NodeRecord(n.rank, n.vm_name, n.public_ip, n.private_ip, "azureuser", "") for n in result.nodes]
    assert evictions(session, rg, records) == [], "running VMs are not evicted"
    emu.evict(_vm_record(emu, records[0].vm_name)["id"])
    (found,) = evictions(session, rg, records)
    assert (found.rank, found.vm_name, found.policy) == (0, records[0].vm_name, "Delete")
    # A VM someone deallocated (autostop, the shutdown schedule, a person) is not evicted: evictionPolicy
    # Delete means Azure never deallocates it for capacity, and starting it again would undo the stop.
    session.compute.virtual_machines.begin_deallocate(rg, records[1].vm_name).result()
    assert [e.rank for e in evictions(session, rg, records)] == [0]
    session.resources.resource_groups.begin_delete(rg).result()
    assert evictions(session, rg, records) == [], "a deleted group is the group watch's news, not an eviction"


def test_a_deallocate_policy_spot_vm_deallocated_is_an_eviction(emu: Emulator, session: AzureSession) -> None:
    from orchestrator.lifecycle.recovery import evictions
    from orchestrator.runfiles import NodeRecord

    emu.inject(Fault("Evicted", phase="evict", after=5))
    result = _provision(session, policy="Deallocate")
    (node,) = result.nodes
    records = [NodeRecord(0, node.vm_name, node.public_ip, node.private_ip, "azureuser", "")]
    emu.evict(_vm_record(emu, node.vm_name)["id"])
    (found,) = evictions(session, result.plan.resource_group, records)
    assert (found.rank, found.policy) == (0, "Deallocate")
