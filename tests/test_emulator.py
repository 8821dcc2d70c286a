"""The emulator speaks ARM's wire protocol: LROs, errors, validation, ids, persistence, threads."""

from __future__ import annotations

import base64
import json
import threading
from typing import Any
from urllib.parse import urlsplit

import pytest

from orchestrator.clock import VirtualClock
from orchestrator.emulator import Emulator, Fault, Store, VmEvent
from orchestrator.emulator.core import FINISHED_OPERATION_TTL, MAX_FINISHED_OPERATIONS
from orchestrator.emulator.openapi import request_namespace
from orchestrator.emulator.store import HOST
from orchestrator.targets.emulated import emulator_session
from tests.conftest import NOW, SUB, make_plan, make_spec

AUTH = {"Authorization": "Bearer t"}
RG = f"{HOST}/subscriptions/{SUB}/resourcegroups/orch-demo-abc123"
NET = f"{HOST}/subscriptions/{SUB}/resourceGroups/orch-demo-abc123/providers/Microsoft.Network"
VM_URL = f"{HOST}/subscriptions/{SUB}/resourceGroups/orch-demo-abc123/providers/Microsoft.Compute/virtualMachines"


# The api-versions the pinned SDKs send (azure-mgmt-resource 26.0.0, -compute 39.0.0, -network 33.1.0)
# and the DevTestLab one the provisioner names: the emulator refuses any other (NoRegisteredProviderFound).
API_VERSIONS = {
    "Microsoft.Resources": "2025-04-01",
    "Microsoft.Compute": "2026-04-01",
    "Microsoft.Network": "2026-03-01",
    "Microsoft.DevTestLab": "2018-09-15",
}


def call(
    emu: Emulator,
    method: str,
    url: str,
    body: Any = None,
    api: str | None = "auto",
    headers: dict[str, str] | None = None,
) -> Any:
    if api == "auto":
        api = API_VERSIONS[request_namespace(urlsplit(url).path)]
    if api:
        url += ("&" if "?" in url else "?") + f"api-version={api}"
    data = json.dumps(body).encode() if body is not None else None
    return emu.handle(method, url, headers if headers is not None else AUTH, data)


def put_network(emu: Emulator) -> None:
    plan = make_plan()
    assert call(emu, "PUT", RG, {"location": "eastus", "tags": plan.tags}).status == 201
    _, vnet, nsg = plan.resources[:3]
    assert call(emu, "PUT", f"{NET}/virtualNetworks/{vnet.name}", vnet.body).status == 201
    assert call(emu, "PUT", f"{NET}/networkSecurityGroups/{nsg.name}", nsg.body).status == 201


@pytest.fixture
def slow() -> tuple[Emulator, VirtualClock]:
    clock = VirtualClock(NOW.timestamp())
    return Emulator("azure-like", clock=clock), clock


def test_vm_put_is_an_lro_with_azure_asyncoperation(slow: tuple[Emulator, VirtualClock]) -> None:
    emu, clock = slow
    put_network(emu)
    clock.advance(10)
    vm = make_plan().resources[3]
    r = call(emu, "PUT", f"{VM_URL}/{vm.name}", vm.body)
    assert r.status == 201
    assert r.json()["properties"]["provisioningState"] == "Creating"
    op_url = r.headers["Azure-AsyncOperation"]
    assert op_url.startswith(f"{HOST}/subscriptions/{SUB}/providers/Microsoft.Compute/locations/eastus/operations/")
    status = emu.handle("GET", op_url, AUTH, None).json()
    assert status["status"] == "InProgress"
    clock.advance(119)
    assert emu.handle("GET", op_url, AUTH, None).json()["status"] == "InProgress"
    clock.advance(2)
    done = emu.handle("GET", op_url, AUTH, None).json()
    assert done["status"] == "Succeeded" and "endTime" in done
    got = call(emu, "GET", f"{VM_URL}/{vm.name}").json()
    assert got["properties"]["provisioningState"] == "Succeeded"
    assert "customData" not in got["properties"]["osProfile"]
    nic_ref = got["properties"]["networkProfile"]["networkInterfaces"][0]
    assert nic_ref["properties"]["deleteOption"] == "Delete"


def test_group_delete_is_202_with_location_polled_until_200(slow: tuple[Emulator, VirtualClock]) -> None:
    emu, clock = slow
    put_network(emu)
    r = call(emu, "DELETE", RG + "?forceDeletionTypes=Microsoft.Compute/virtualMachines")
    assert r.status == 202 and "Location" in r.headers and r.headers["Retry-After"]
    assert emu.handle("GET", r.headers["Location"], AUTH, None).status == 202
    # Creating into a group that is being deleted is refused the way ARM refuses it.
    again = call(emu, "PUT", RG, {"location": "eastus"})
    assert (again.status, again.json()["error"]["code"]) == (409, "ResourceGroupBeingDeleted")
    clock.advance(91)
    assert emu.handle("GET", r.headers["Location"], AUTH, None).status == 200
    assert emu.live_resources() == []


def test_errors_have_arm_shape_request_ids_and_retry_after(emu: Emulator) -> None:
    emu.inject(Fault("TooManyRequests", status=429, retry_after=3))
    r = call(emu, "PUT", RG, {"location": "eastus"}, headers={**AUTH, "x-ms-client-request-id": "abc"})
    assert r.status == 429
    assert r.headers["Retry-After"] == "3"
    assert r.json()["error"]["code"] == "TooManyRequests"
    assert r.headers["x-ms-request-id"] and r.headers["x-ms-correlation-request-id"] == "abc"


def test_a_throttling_storm_reaches_operation_polls_and_preflight_reads(emu: Emulator) -> None:
    """Azure throttles every request, not only resource writes: a fault with no resource type hits
    an operation poll and a usages read too (the SDK's retry policy must carry both)."""
    r = call(emu, "PUT", RG, {"location": "eastus"})
    assert r.status in (200, 201)
    deleting = call(emu, "DELETE", RG)
    assert deleting.status == 202
    emu.inject(Fault("TooManyRequests", status=429, method="GET", count=2, retry_after=1))
    poll = emu.handle("GET", deleting.headers["Location"], AUTH, None)
    assert (poll.status, poll.json()["error"]["code"], poll.headers["Retry-After"]) == (429, "TooManyRequests", "1")
    usages = call(emu, "GET", f"{HOST}/subscriptions/{SUB}/providers/Microsoft.Compute/locations/eastus/usages")
    assert usages.status == 429
    assert (
        call(emu, "GET", f"{HOST}/subscriptions/{SUB}/providers/Microsoft.Compute/locations/eastus/usages").status
        == 200
    )


@pytest.mark.parametrize(
    ("mutate", "status", "code"),
    [
        (lambda b: b.pop("location"), 400, "InvalidParameter"),
        (lambda b: b.update(location="atlantis"), 400, "LocationNotAvailableForResourceType"),
        (lambda b: b["properties"]["hardwareProfile"].pop("vmSize"), 400, "InvalidParameter"),
        (
            lambda b: b["properties"]["hardwareProfile"].update(vmSize="Standard_Nope"),
            400,
            "InvalidParameter",
        ),
        (
            lambda b: (
                b["properties"]["hardwareProfile"].update(vmSize="Standard_ND96isr_H100_v5")
                or b.update(location="westeurope")
            ),
            409,
            "SkuNotAvailable",
        ),
        (
            lambda b: b["properties"]["osProfile"]["linuxConfiguration"]["ssh"].update(publicKeys=[]),
            400,
            "InvalidParameter",
        ),
        (
            lambda b: b["properties"]["osProfile"]["linuxConfiguration"]["ssh"]["publicKeys"][0].update(
                keyData="not a key"
            ),
            400,
            "InvalidParameter",
        ),
        (lambda b: b["properties"]["osProfile"].update(adminUsername="admin"), 400, "InvalidParameter"),
        (
            lambda b: b["properties"]["osProfile"].update(customData="***not base64***"),
            400,
            "InvalidParameter",
        ),
        (lambda b: b["properties"]["networkProfile"].pop("networkApiVersion"), 400, "InvalidParameter"),
        (
            lambda b: b["properties"]["networkProfile"]["networkInterfaceConfigurations"][0]["properties"][
                "ipConfigurations"
            ][0]["properties"]["subnet"].update(id="/subscriptions/x/nope/subnets/y"),
            400,
            "InvalidResourceReference",
        ),
        (lambda b: b["properties"]["storageProfile"]["osDisk"].update(diskSizeGB=5), 400, "InvalidParameter"),
        (lambda b: b.update(zones=["7"]), 400, "InvalidParameter"),
        (lambda b: b["properties"].update(priority="Spot"), 400, "InvalidParameter"),
        (lambda b: b.update(tags={"a/b": "x"}), 400, "InvalidTagNameCharacters"),
    ],
)
def test_vm_bodies_are_validated_as_arm_would(emu: Emulator, mutate: Any, status: int, code: str) -> None:
    put_network(emu)
    vm = make_plan().resources[3]
    body = json.loads(json.dumps(vm.body))
    mutate(body)
    r = call(emu, "PUT", f"{VM_URL}/{vm.name}", body)
    assert (r.status, r.json()["error"]["code"]) == (status, code)
    assert not any(x["type"].endswith("virtualMachines") for x in emu.live_resources())


def test_network_bodies_are_validated(emu: Emulator) -> None:
    call(emu, "PUT", RG, {"location": "eastus"})
    bad_subnet = {
        "location": "eastus",
        "properties": {
            "addressSpace": {"addressPrefixes": ["10.0.0.0/16"]},
            "subnets": [{"name": "s", "properties": {"addressPrefix": "192.168.0.0/24"}}],
        },
    }
    r = call(emu, "PUT", f"{NET}/virtualNetworks/v1", bad_subnet)
    assert r.json()["error"]["code"] == "NetcfgSubnetRangeOutsideVnet"
    rule = {
        "name": "r",
        "properties": {
            "priority": 5,
            "direction": "Inbound",
            "access": "Allow",
            "protocol": "Tcp",
            "sourceAddressPrefix": "*",
            "destinationAddressPrefix": "*",
            "sourcePortRange": "*",
            "destinationPortRange": "22",
        },
    }
    r = call(
        emu,
        "PUT",
        f"{NET}/networkSecurityGroups/n1",
        {"location": "eastus", "properties": {"securityRules": [rule]}},
    )
    assert r.json()["error"]["code"] == "SecurityRuleInvalidPriority"
    r = call(emu, "PUT", f"{NET}/virtualNetworks/-bad-", bad_subnet)
    assert r.json()["error"]["code"] == "InvalidResourceName"
    r = call(emu, "PUT", f"{NET}/virtualNetworks/v2", {"location": "eastus"})
    assert (r.status, r.json()["error"]["code"]) == (400, "InvalidParameter")


def test_protocol_errors(emu: Emulator) -> None:
    assert (
        call(emu, "PUT", RG, {"location": "eastus"}, api=None).json()["error"]["code"] == "MissingApiVersionParameter"
    )
    r = call(emu, "PUT", RG, {"location": "eastus"}, headers={})
    assert (r.status, r.json()["error"]["code"]) == (401, "AuthenticationFailed")
    r = emu.handle("PUT", RG + "?api-version=1", AUTH, b"{not json")
    assert r.json()["error"]["code"] == "InvalidRequestContent"
    assert (
        call(emu, "PUT", f"{NET}/virtualNetworks/v", {"location": "eastus"}).json()["error"]["code"]
        == "ResourceGroupNotFound"
    )
    assert emu.live_resources() == []


def test_vm_delete_cascades_by_delete_option_and_in_use_nsg_is_protected(emu: Emulator) -> None:
    session = emulator_session(emu, subscription=SUB)
    from orchestrator.azure.provision import Provisioner

    plan = make_plan(make_spec(nodes=2))
    Provisioner(session).provision(plan)
    nsg = plan.resources[2]
    r = call(emu, "DELETE", f"{NET}/networkSecurityGroups/{nsg.name}")
    assert r.json()["error"]["code"] == "InUseNetworkSecurityGroupCannotBeDeleted"
    session.compute.virtual_machines.begin_delete(plan.resource_group, "demo-abc123-0").result()
    names = {x["name"] for x in emu.live_resources()}
    assert not names & {"demo-abc123-0", "demo-abc123-0-nic", "demo-abc123-0-pip", "demo-abc123-0-osdisk"}
    assert {"demo-abc123-1", "demo-abc123-1-nic", "demo-abc123-1-pip", "demo-abc123-nsg"} <= names


def test_list_by_tag_filter(emu: Emulator) -> None:
    call(emu, "PUT", RG, {"location": "eastus", "tags": {"orchestrator-run": "demo-abc123"}})
    call(emu, "PUT", RG.replace("orch-demo-abc123", "other"), {"location": "eastus", "tags": {"team": "x"}})
    url = (
        f"{HOST}/subscriptions/{SUB}/resourcegroups?$filter=tagName eq 'orchestrator-run' and tagValue eq 'demo-abc123'"
    )
    assert [g["name"] for g in call(emu, "GET", url).json()["value"]] == ["orch-demo-abc123"]
    bad = call(emu, "GET", f"{HOST}/subscriptions/{SUB}/resourcegroups?$filter=name eq 'x'")
    assert bad.json()["error"]["code"] == "InvalidFilterInQueryString"


def test_store_round_trips_through_json(slow: tuple[Emulator, VirtualClock]) -> None:
    emu, clock = slow
    put_network(emu)
    restored = Emulator("azure-like", clock=clock, store=Store.from_json(emu.store.to_json()))
    clock.advance(30)
    states = {r["name"]: r["properties"].get("provisioningState") for r in restored.live_resources()}
    assert states == {
        "orch-demo-abc123": "Succeeded",
        "demo-abc123-vnet": "Succeeded",
        "demo-abc123-nsg": "Succeeded",
    }


def test_concurrent_sdk_calls_are_safe(emu: Emulator) -> None:
    session = emulator_session(emu, subscription=SUB)
    errors: list[BaseException] = []

    def create(i: int) -> None:
        try:
            session.resources.resource_groups.create_or_update(f"g{i}", {"location": "eastus"})
        except BaseException as e:  # collected for the assertion below
            errors.append(e)

    threads = [threading.Thread(target=create, args=(i,)) for i in range(24)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert not errors
    assert len(emu.live_resources()) == 24
    assert sorted(r.seq for r in emu.requests()) == list(range(1, 25))


def test_a_vm_cannot_reference_a_vnet_that_is_still_being_written(
    slow: tuple[Emulator, VirtualClock],
) -> None:
    emu, clock = slow
    put_network(emu)  # the VNet takes 7 s on this profile
    vm = make_plan().resources[3]
    r = call(emu, "PUT", f"{VM_URL}/{vm.name}", vm.body)
    assert (r.status, r.json()["error"]["code"]) == (400, "ReferencedResourceNotProvisioned")
    clock.advance(8)
    assert call(emu, "PUT", f"{VM_URL}/{vm.name}", vm.body).status == 201


def test_vm_listeners_hear_running_and_deleted_with_the_vms_addresses(emu: Emulator) -> None:
    heard: list[VmEvent] = []
    emu.add_vm_listener(heard.append)
    put_network(emu)
    vm = make_plan().resources[3]
    body = json.loads(json.dumps(vm.body))
    os_profile = body["properties"]["osProfile"]
    os_profile["customData"] = base64.b64encode(b"#cloud-config\nruncmd: []\n").decode()
    assert call(emu, "PUT", f"{VM_URL}/{vm.name}", body).status == 201
    (running,) = heard
    assert running.kind == "running"
    assert (running.name, running.resource_group, running.location) == (vm.name, "orch-demo-abc123", "eastus")
    assert running.vm_id.lower() == f"{VM_URL}/{vm.name}".removeprefix(HOST).lower()
    assert running.vm_size == vm.body["properties"]["hardwareProfile"]["vmSize"]
    assert running.admin_user == os_profile["adminUsername"]
    assert running.authorized_keys == tuple(k["keyData"] for k in os_profile["linuxConfiguration"]["ssh"]["publicKeys"])
    assert running.custom_data == os_profile["customData"]  # as sent, though GET never returns it
    # The addresses are the ones ARM shows: VM -> NIC -> ipConfiguration -> public IP.
    got = call(emu, "GET", f"{VM_URL}/{vm.name}").json()
    nic = call(emu, "GET", HOST + got["properties"]["networkProfile"]["networkInterfaces"][0]["id"]).json()
    ipc = nic["properties"]["ipConfigurations"][0]["properties"]
    pip = call(emu, "GET", HOST + ipc["publicIPAddress"]["id"]).json()
    assert running.private_ip == ipc["privateIPAddress"] and running.private_ip
    assert running.public_ip == pip["properties"]["ipAddress"] and running.public_ip
    late: list[VmEvent] = []
    emu.add_vm_listener(late.append)  # replays the VMs already running
    quiet: list[VmEvent] = []
    emu.add_vm_listener(quiet.append, replay=False)
    assert late == [running] and quiet == []
    assert call(emu, "DELETE", f"{VM_URL}/{vm.name}").status == 202
    deleted = heard[-1]
    assert late[-1] == quiet[-1] == deleted
    assert deleted.kind == "deleted" and deleted.name == vm.name
    assert (deleted.public_ip, deleted.private_ip) == (running.public_ip, running.private_ip)


def test_finished_operations_are_forgotten_and_then_polls_answer_404(
    slow: tuple[Emulator, VirtualClock],
) -> None:
    emu, clock = slow
    put_network(emu)
    nsg = make_plan().resources[2]
    op_url = call(emu, "PUT", f"{NET}/networkSecurityGroups/n2", nsg.body).headers["Azure-AsyncOperation"]
    clock.advance(30)
    assert emu.handle("GET", op_url, AUTH, None).json()["status"] == "Succeeded"
    finished = emu.store.operations[op_url.split("?")[0].rsplit("/", 1)[1]]["end"]
    clock.advance(finished + FINISHED_OPERATION_TTL - 5 - clock.now())  # still readable before the deadline
    assert emu.handle("GET", op_url, AUTH, None).json()["status"] == "Succeeded"
    clock.advance(5)
    gone = emu.handle("GET", op_url, AUTH, None)
    assert (gone.status, gone.json()["error"]["code"]) == (404, "NotFound")
    clock.advance(FINISHED_OPERATION_TTL)
    call(emu, "GET", RG)
    assert emu.store.operations == {}  # put_network's operations are gone too


def test_at_most_so_many_finished_operations_are_kept(emu: Emulator) -> None:
    put_network(emu)  # the instant profile: operations finish at once and the clock stands still
    nsg = make_plan().resources[2]
    urls = [
        call(emu, "PUT", f"{NET}/networkSecurityGroups/n{i}", nsg.body).headers["Azure-AsyncOperation"]
        for i in range(MAX_FINISHED_OPERATIONS + 10)
    ]
    assert emu.handle("GET", urls[-1], AUTH, None).json()["status"] == "Succeeded"
    assert len(emu.store.operations) == MAX_FINISHED_OPERATIONS
    assert emu.handle("GET", urls[0], AUTH, None).status == 404
