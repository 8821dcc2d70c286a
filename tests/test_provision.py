"""The provisioner, teardown and gc with the real Azure SDK against the emulator."""

from __future__ import annotations

from datetime import timedelta

import pytest

from orchestrator import catalog
from orchestrator.azure.errors import (
    AuthError,
    CapacityError,
    GroupBeingDeletedError,
    InvalidRequestError,
    QuotaExceededError,
    SkuNotAvailableError,
    ThrottledError,
)
from orchestrator.azure.provision import Provisioner, ProvisionFailed, ResourceEvent
from orchestrator.azure.session import AzureSession
from orchestrator.azure.teardown import delete_group, gc, group_exists, list_run_groups
from orchestrator.clock import ScaledClock, VirtualClock
from orchestrator.emulator import Emulator, Fault
from orchestrator.errors import EXIT_AZURE_REFUSED
from orchestrator.plan import T_VM
from orchestrator.targets.emulated import emulator_session
from tests.conftest import NOW, SUB, make_plan, make_spec


def provision(session: AzureSession, **spec_fields: object):  # type: ignore[no-untyped-def]
    plan = make_plan(make_spec(**spec_fields))
    return plan, Provisioner(session).provision(plan)


@pytest.mark.parametrize("nodes", [1, 3])
def test_happy_path_creates_everything_and_reports_addresses(emu: Emulator, session: AzureSession, nodes: int) -> None:
    _, result = provision(session, nodes=nodes)
    live = {(r["type"], r["name"]) for r in emu.live_resources()}
    assert ("Microsoft.Resources/resourceGroups", "orch-demo-abc123") in live
    assert ("Microsoft.Network/virtualNetworks", "demo-abc123-vnet") in live
    assert ("Microsoft.Network/networkSecurityGroups", "demo-abc123-nsg") in live
    for n in range(nodes):
        for rtype, name in [
            ("virtualMachines", f"demo-abc123-{n}"),
            ("networkInterfaces", f"demo-abc123-{n}-nic"),
            ("publicIPAddresses", f"demo-abc123-{n}-pip"),
            ("disks", f"demo-abc123-{n}-osdisk"),
        ]:
            assert any(t.endswith(rtype) and nm == name for t, nm in live)
    assert len(live) == 3 + 5 * nodes  # + NIC, public IP, OS disk and auto-shutdown schedule per VM
    assert [n.rank for n in result.nodes] == list(range(nodes))
    assert len({n.public_ip for n in result.nodes}) == nodes
    assert all(n.private_ip.startswith("10.42.0.") for n in result.nodes)
    states = {r["properties"].get("provisioningState") for r in emu.live_resources()}
    assert states == {"Succeeded"}
    # Only the VM PUTs carry bodies for NICs and IPs: the provisioner never creates them itself.
    writes = [r for r in emu.requests() if r.method == "PUT"]
    assert sorted(r.resource_type or "" for r in writes) == sorted(
        [
            "Microsoft.Resources/resourceGroups",
            "Microsoft.Network/virtualNetworks",
            "Microsoft.Network/networkSecurityGroups",
        ]
        + ["Microsoft.Compute/virtualMachines", "Microsoft.DevTestLab/schedules"] * nodes
    )


def test_resources_wait_only_for_their_dependencies() -> None:
    """On the azure-like profile (50x faster than Azure), VNet and NSG overlap and VMs run side by side.
    The assertions are about order, not speed: a loaded machine stretches the scaled clock."""
    emu = Emulator("azure-like", clock=ScaledClock(50.0))
    plan, result = provision(emulator_session(emu, subscription=SUB), nodes=3)
    t = {plan.by_id(rid).name: span for rid, span in result.timings.items()}
    vnet, nsg = t["demo-abc123-vnet"], t["demo-abc123-nsg"]
    assert nsg[0] < vnet[1] and vnet[0] < nsg[1]  # overlapping
    vms = [t[f"demo-abc123-{n}"] for n in range(3)]
    assert max(start for start, _ in vms) < min(end for _, end in vms), "every VM started before any finished"
    assert min(start for start, _ in vms) >= max(vnet[1], nsg[1]) - 0.01
    # Below even two VMs one after the other (1 + 7 + 3 + 2 x 120 = 251 s), let alone three (371 s).
    assert result.seconds < 251


def test_events_report_each_resource(session: AzureSession) -> None:
    events: list[ResourceEvent] = []
    Provisioner(session, on_event=events.append).provision(make_plan())
    assert [e.status for e in events].count("created") == 5
    assert [e.status for e in events].count("creating") == 5


def fail_and_check_clean(emu: Emulator, session: AzureSession, fault: Fault, **spec_fields: object) -> ProvisionFailed:
    emu.inject(fault)
    with pytest.raises(ProvisionFailed) as info:
        provision(session, **spec_fields)
    assert info.value.cleaned
    assert emu.live_resources() == [], "a failed provision must leave nothing behind"
    assert info.value.exit_code == EXIT_AZURE_REFUSED
    assert "Everything created for this run has been deleted" in str(info.value)
    return info.value


def test_sku_not_available(emu: Emulator, session: AzureSession) -> None:
    err = fail_and_check_clean(
        emu, session, Fault("SkuNotAvailable", resource_type="Microsoft.Compute/virtualMachines")
    )
    assert isinstance(err.cause, SkuNotAvailableError)
    assert "Standard_NC4as_T4_v3 is not available in eastus" in str(err)
    assert "--region" in str(err)


def test_quota_message_names_family_and_numbers(emu: Emulator, session: AzureSession) -> None:
    emu.set_quota("eastus", "standardNCASv3_T4Family", 8)
    err = fail_and_check_clean(emu, session, Fault("none", count=0), nodes=3)
    cause = err.cause
    assert isinstance(cause, QuotaExceededError)
    assert (cause.family, cause.region, cause.limit, cause.usage, cause.required) == (
        "standardNCASv3_T4Family",
        "eastus",
        8,
        8,
        4,
    )
    assert "limit 8, in use 8, this run needs 4 more" in str(err)


def test_spot_quota_is_its_own_family(emu: Emulator, session: AzureSession) -> None:
    emu.set_quota("eastus", "lowPriorityCores", 0)
    err = fail_and_check_clean(emu, session, Fault("none", count=0), resources={"spot": True})
    assert isinstance(err.cause, QuotaExceededError) and err.cause.family == "lowPriorityCores"


@pytest.mark.parametrize("code", ["AllocationFailed", "ZonalAllocationFailed", "OverconstrainedAllocationRequest"])
def test_capacity_failures_arrive_as_failed_lros_and_clean_up(emu: Emulator, session: AzureSession, code: str) -> None:
    err = fail_and_check_clean(
        emu, session, Fault(code, phase="lro", resource_type="Microsoft.Compute/virtualMachines")
    )
    assert isinstance(err.cause, CapacityError)
    assert code in str(err)
    if code == "ZonalAllocationFailed":
        assert "zone" in str(err)


def test_quota_exceeded_code_is_a_quota_error(emu: Emulator, session: AzureSession) -> None:
    err = fail_and_check_clean(
        emu,
        session,
        Fault(
            "QuotaExceeded",
            message="Public IP quota exceeded.",
            resource_type="Microsoft.Compute/virtualMachines",
        ),
    )
    assert isinstance(err.cause, QuotaExceededError)
    assert "Public IP quota exceeded" in str(err)


def test_cleanup_failure_says_what_to_run(emu: Emulator, session: AzureSession) -> None:
    emu.inject(Fault("AllocationFailed", phase="lro", resource_type="Microsoft.Compute/virtualMachines"))
    emu.inject(Fault("InternalServerError", status=500, method="DELETE", count=None))
    with pytest.raises(ProvisionFailed) as info:
        provision(session)
    assert not info.value.cleaned
    assert "orchestrator down demo-abc123" in str(info.value)
    assert isinstance(info.value.cause, CapacityError)


def test_invalid_parameter(emu: Emulator, session: AzureSession) -> None:
    err = fail_and_check_clean(
        emu,
        session,
        Fault(
            "InvalidParameter",
            status=400,
            resource_type="Microsoft.Network/virtualNetworks",
            message="The value of parameter addressPrefix is invalid.",
        ),
    )
    assert isinstance(err.cause, InvalidRequestError)
    assert "addressPrefix is invalid" in str(err)


def test_group_being_deleted_is_explained(emu: Emulator, session: AzureSession) -> None:
    slow = Emulator("azure-like", clock=VirtualClock(NOW.timestamp()))
    s = emulator_session(slow, subscription=SUB)
    plan = make_plan()
    s.resources.resource_groups.create_or_update(plan.resource_group, {"location": "eastus"})
    delete_group(s, plan.resource_group, wait=False)
    with pytest.raises(ProvisionFailed) as info:
        Provisioner(s).provision(plan)
    assert isinstance(info.value.cause, GroupBeingDeletedError)
    assert "still being deleted" in str(info.value)


@pytest.mark.parametrize(
    ("code", "advice"),
    [("AuthorizationFailed", "templates/azure-role.json"), ("InvalidAuthenticationToken", "Run `az login`")],
)
def test_auth_errors(emu: Emulator, session: AzureSession, code: str, advice: str) -> None:
    status = 403 if code == "AuthorizationFailed" else 401
    emu.inject(Fault(code, status=status, method="PUT", resource_type="Microsoft.Resources/resourceGroups"))
    with pytest.raises(ProvisionFailed) as info:
        provision(session)
    assert isinstance(info.value.cause, AuthError)
    assert advice in str(info.value) and f"({code})" in str(info.value)
    assert "while creating resourceGroups orch-" in str(info.value), "the message names the operation"
    assert "Nothing was created" in str(info.value)
    assert [r.method for r in emu.requests()] == ["PUT"]  # no pointless cleanup call


def test_a_rejected_token_reads_as_a_login_problem(clock: VirtualClock) -> None:
    emu = Emulator("instant", clock=clock, accept_token=lambda token: False)
    with pytest.raises(ProvisionFailed) as info:
        provision(emulator_session(emu, subscription=SUB))
    assert isinstance(info.value.cause, AuthError)
    assert "az login" in str(info.value)


def test_429_storms_are_retried_with_retry_after(emu: Emulator, session: AzureSession, clock: VirtualClock) -> None:
    emu.inject(Fault("TooManyRequests", status=429, count=5, retry_after=7))
    start = clock.now()
    provision(session)
    throttled = [r for r in emu.requests() if r.status == 429]
    assert len(throttled) == 5
    assert clock.now() - start >= 5 * 7  # every Retry-After was waited out (in emulated time)


def test_endless_throttling_ends_in_a_clear_error(emu: Emulator, session: AzureSession) -> None:
    emu.inject(
        Fault(
            "TooManyRequests",
            status=429,
            count=None,
            retry_after=1,
            resource_type="Microsoft.Network/virtualNetworks",
        )
    )
    with pytest.raises(ProvisionFailed) as info:
        provision(session)
    assert isinstance(info.value.cause, ThrottledError)
    assert emu.live_resources() == []


def test_a_failed_vm_lro_in_a_three_node_run_removes_the_other_nodes_too(emu: Emulator, session: AzureSession) -> None:
    emu.inject(Fault("AllocationFailed", phase="lro", resource_type="Microsoft.Compute/virtualMachines"))
    with pytest.raises(ProvisionFailed):
        provision(session, nodes=3)
    assert emu.live_resources() == []
    deletes = [r for r in emu.requests() if r.method == "DELETE"]
    assert len(deletes) == 1  # one group delete removes all three nodes...
    assert deletes[0].query["forceDeletionTypes"] == "Microsoft.Compute/virtualMachines"  # ...without waiting


def test_group_delete_forces_vm_deletion(emu: Emulator, session: AzureSession) -> None:
    plan, _ = provision(session)
    assert delete_group(session, plan.resource_group)
    assert not group_exists(session, plan.resource_group)
    assert emu.live_resources() == []
    assert not delete_group(session, plan.resource_group)  # already gone: no error


def test_reprovisioning_the_same_run_is_idempotent(emu: Emulator, session: AzureSession) -> None:
    _, first = provision(session, nodes=2)
    before = sorted(r["id"] for r in emu.live_resources())
    _, second = provision(session, nodes=2)
    assert sorted(r["id"] for r in emu.live_resources()) == before
    assert [(n.public_ip, n.private_ip) for n in second.nodes] == [(n.public_ip, n.private_ip) for n in first.nodes]


def test_gc_by_run_id_and_by_expiry(clock: VirtualClock) -> None:
    emu = Emulator("instant", clock=clock)
    s = emulator_session(emu, subscription=SUB)
    Provisioner(s).provision(make_plan(make_spec(max_duration="1h"), run_id="short-aaaaaa"))
    Provisioner(s).provision(make_plan(make_spec(max_duration="10h"), run_id="long-bbbbbb"))
    s.resources.resource_groups.create_or_update("not-ours", {"location": "eastus", "tags": {"team": "x"}})
    assert {g.run_id for g in list_run_groups(s)} == {"short-aaaaaa", "long-bbbbbb"}

    now = NOW + timedelta(hours=2)  # past the short run's 1 h + 30 min grace, not the long one's
    assert [g.name for g in gc(s, now, dry_run=True)] == ["orch-short-aaaaaa"]
    assert group_exists(s, "orch-short-aaaaaa")  # dry run deleted nothing
    assert [g.name for g in gc(s, now)] == ["orch-short-aaaaaa"]
    assert not group_exists(s, "orch-short-aaaaaa") and group_exists(s, "orch-long-bbbbbb")

    assert [g.name for g in gc(s, now, run_id="long-bbbbbb")] == ["orch-long-bbbbbb"]
    names = {r["name"] for r in emu.live_resources()}
    assert names == {"not-ours"}, "gc never touches groups it did not tag"


def test_a_5xx_storm_is_retried_out_loud(emu: Emulator, session: AzureSession) -> None:
    said: list[str] = []
    session.on_retry = said.append
    vm = "Microsoft.Compute/virtualMachines"
    emu.inject(Fault("InternalServerError", status=500, method="PUT", resource_type=vm, count=3))
    provision(session)
    assert said[:3] == [
        f"Azure answered 500 to PUT virtualMachines/demo-abc123-0; retry {n} of 10" for n in (1, 2, 3)
    ], said


def test_addresses_follow_the_vms_network_interface_ids(emu: Emulator, session: AzureSession) -> None:
    """VM networkProfile.networkInterfaces[].id -> NIC GET -> publicIPAddress.id -> public IP GET; the
    plan's NIC and IP names play no part (the lookup would work for NICs named anything)."""
    import dataclasses

    plan = make_plan(make_spec(nodes=3))
    renamed = dataclasses.replace(
        plan, nodes=tuple(dataclasses.replace(n, nic_name="x-nic", public_ip_name="x-pip") for n in plan.nodes)
    )
    result = Provisioner(session).provision(renamed)
    assert len({n.private_ip for n in result.nodes}) == 3 and len({n.public_ip for n in result.nodes}) == 3
    live = {r["id"].lower(): r for r in emu.live_resources()}
    for node in result.nodes:
        vm = live[plan.by_id(next(r.id for r in plan.resources if r.name == node.vm_name)).id.lower()]
        nic = live[vm["properties"]["networkProfile"]["networkInterfaces"][0]["id"].lower()]
        ipc = nic["properties"]["ipConfigurations"][0]["properties"]
        assert node.private_ip == ipc["privateIPAddress"]
        assert node.public_ip == live[ipc["publicIPAddress"]["id"].lower()]["properties"]["ipAddress"]
    gets = [r for r in emu.requests() if r.method == "GET" and r.kind != "poll"]
    addressing = {"Microsoft.Network/networkInterfaces", "Microsoft.Network/publicIPAddresses"}
    network = sorted(r.path.rsplit("/", 2)[-2] for r in gets if r.resource_type in addressing)
    # two GETs by id per node and no list; the VMs are read only by their create LROs' final GETs
    assert network == ["networkInterfaces"] * 3 + ["publicIPAddresses"] * 3, network
    assert sum(1 for r in gets if r.resource_type == T_VM) == 3
    paths = [r.path for r in gets]
    for node in plan.nodes:
        assert any(p.endswith(f"/networkInterfaces/{node.nic_name}") for p in paths)
        assert any(p.endswith(f"/publicIPAddresses/{node.public_ip_name}") for p in paths)


def test_primary_nic_and_ip_configuration_come_first() -> None:
    from orchestrator.azure.provision import _group_and_name, _primary_first

    refs = [
        {"id": "a", "properties": {"primary": False}},
        {"id": "b"},
        {"id": "c", "properties": {"primary": True}},
    ]
    assert [r["id"] for r in _primary_first(refs)] == ["c", "b", "a"]
    assert _group_and_name(
        f"/subscriptions/{SUB}/resourceGroups/RG-1/providers/Microsoft.Network/networkInterfaces/n"
    ) == (
        "RG-1",
        "n",
    )
    with pytest.raises(ValueError):
        _group_and_name("/subscriptions/x")


@pytest.mark.parametrize(
    "size", sorted(n for n, s in catalog.VM_SIZES.items() if s.is_gpu and catalog.unsupported_reason(s) is None)
)
def test_every_gpu_size_boots_with_secure_boot_off_and_its_body_is_accepted(
    emu: Emulator, session: AzureSession, size: str
) -> None:
    """Secure Boot blocks the unsigned NVIDIA module (catalog.SECURITY_SOURCES): no GPU body may turn it on."""
    region = sorted(catalog.VM_SIZES[size].regions)[0]
    emu.set_quota(region, catalog.VM_SIZES[size].family, 1000)
    emu.set_quota(region, "cores", 1000)
    plan, result = provision(session, resources={"vm_size": size, "region": region, "disk_gb": 128})
    vm = next(r for r in plan.resources if r.type == T_VM)
    profile = vm.body["properties"].get("securityProfile")
    if catalog.VM_SIZES[size].trusted_launch:
        assert profile == {
            "securityType": "TrustedLaunch",
            "uefiSettings": {"secureBootEnabled": False, "vTpmEnabled": True},
        }
    else:  # no Trusted Launch on this size: no securityProfile, so Azure makes a Standard VM (no Secure Boot)
        assert profile is None
    live = next(r for r in emu.live_resources() if r["type"] == T_VM)
    assert live["properties"].get("securityProfile") == profile
    assert result.nodes[0].public_ip
