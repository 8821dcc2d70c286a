"""Autostop: the VM role's actions, the emulator's managed identities, role assignments and power
actions (a VM's token may deallocate a VM of its own group only)."""

from __future__ import annotations

import json
from typing import Any

from orchestrator.azure import selfstop
from orchestrator.emulator import Emulator, VmEvent
from orchestrator.emulator.store import HOST
from tests.conftest import SUB, make_plan
from tests.test_emulator import call

AUTHZ = "2022-04-01"


def vm_role() -> dict[str, Any]:
    return dict(json.loads(selfstop.VM_ROLE_FILE.read_text()))


def test_the_vm_role_allows_only_reading_deallocating_and_deleting_vms_and_deleting_the_group() -> None:
    role = vm_role()
    assert sorted(role["Actions"]) == sorted(
        [
            "Microsoft.Compute/virtualMachines/read",
            "Microsoft.Compute/virtualMachines/deallocate/action",
            "Microsoft.Compute/virtualMachines/delete",
            "Microsoft.Resources/subscriptions/resourceGroups/delete",
        ]
    )
    assert role["NotActions"] == role["DataActions"] == role["NotDataActions"] == []
    assert role["Name"] == selfstop.VM_ROLE_NAME
    # The assigner may assign roles only under its condition: that one role, to service principals.
    assigner = json.loads(selfstop.ASSIGNER_ROLE_FILE.read_text())
    assert "Microsoft.Authorization/roleAssignments/write" in assigner["Actions"]
    assert not [a for a in assigner["Actions"] if not a.startswith("Microsoft.Authorization/")]
    condition = selfstop.assigner_condition("5e467623-bb1f-42f4-a55d-6e525e11384b")
    assert "GuidEquals {5e467623-bb1f-42f4-a55d-6e525e11384b}" in condition
    assert "{'ServicePrincipal'}" in condition and "{vmRoleId}" not in condition


def make_group(emu: Emulator, run_id: str) -> str:
    """A run's group with its network and one VM with a system-assigned identity; the VM's URL."""
    plan = make_plan(run_id=run_id, identity=True)
    rg = f"{HOST}/subscriptions/{SUB}/resourcegroups/{plan.resource_group}"
    net = f"{HOST}/subscriptions/{SUB}/resourceGroups/{plan.resource_group}/providers/Microsoft.Network"
    assert call(emu, "PUT", rg, {"location": "eastus", "tags": plan.tags}).status == 201
    _, vnet, nsg, vm = plan.resources[:4]
    assert call(emu, "PUT", f"{net}/virtualNetworks/{vnet.name}", vnet.body).status == 201
    assert call(emu, "PUT", f"{net}/networkSecurityGroups/{nsg.name}", nsg.body).status == 201
    assert vm.body["identity"] == {"type": "SystemAssigned"}
    url = f"{net.replace('Microsoft.Network', 'Microsoft.Compute')}/virtualMachines/{vm.name}"
    assert call(emu, "PUT", url, vm.body).status == 201
    return url


def assign(emu: Emulator, vm_url: str, role_id: str) -> Any:
    vm = call(emu, "GET", vm_url).json()
    scope = vm_url.split("/providers/")[0]
    name = "0b6f1b53-8b2e-4d2a-9c1e-5a0f0c1d2e3f" if "first" in vm_url else "1c7f2c64-9c3f-4e3b-8d2f-6b1f1d2e3f40"
    body = {"properties": {"roleDefinitionId": role_id, "principalId": vm["identity"]["principalId"],
                           "principalType": "ServicePrincipal"}}  # fmt: skip
    return call(emu, "PUT", f"{scope}/providers/Microsoft.Authorization/roleAssignments/{name}", body, api=AUTHZ)


def test_a_vms_identity_deallocates_its_own_vm_and_nothing_in_another_group(emu: Emulator) -> None:
    role_id = emu.define_role(vm_role(), SUB)
    first, second = make_group(emu, "first-aaa111"), make_group(emu, "second-bbb222")
    got = call(emu, "GET", first).json()
    assert (
        got["identity"]["type"] == "SystemAssigned" and got["identity"]["principalId"] and got["identity"]["tenantId"]
    )
    listed = call(emu, "GET", f"{HOST}/subscriptions/{SUB}/providers/Microsoft.Authorization/roleDefinitions"
                  f"?$filter=roleName eq '{selfstop.VM_ROLE_NAME}'", api=AUTHZ).json()  # fmt: skip
    assert [r["id"] for r in listed["value"]] == [role_id]
    assert assign(emu, first, role_id).status == 201
    assert assign(emu, second, role_id).status == 201
    token, principal = emu.identity_token(got["id"]) or ("", "")
    assert principal == got["identity"]["principalId"]
    mine = {"Authorization": f"Bearer {token}"}
    # Another group's VM: 403, as ARM words it, and that VM keeps running.
    refused = call(emu, "POST", f"{second}/deallocate", headers=mine)
    assert refused.status == 403 and refused.json()["error"]["code"] == "AuthorizationFailed"
    assert "Microsoft.Compute/virtualMachines/deallocate/action" in refused.json()["error"]["message"]
    assert power(emu, second) == "PowerState/running"
    # Nor anything its role does not grant in its own group (writing a VM).
    vm = call(emu, "GET", first).json()
    assert call(emu, "PUT", first, {"location": "eastus", "properties": vm["properties"]}, headers=mine).status == 403
    forged = {"Authorization": f"Bearer {token[:-4]}0000"}
    assert call(emu, "POST", f"{first}/deallocate", headers=forged).status == 401
    heard: list[VmEvent] = []
    emu.add_vm_listener(heard.append, replay=False)
    accepted = call(emu, "POST", f"{first}/deallocate", headers=mine)
    assert accepted.status == 202 and "Azure-AsyncOperation" in accepted.headers
    assert power(emu, first) == "PowerState/deallocated"
    assert [(e.kind, e.name) for e in heard] == [("deallocated", got["name"])]
    replayed: list[VmEvent] = []
    emu.add_vm_listener(replayed.append)  # a deallocated VM has no host to start
    assert [e.name for e in replayed] == [call(emu, "GET", second).json()["name"]]
    # The tool (its own credential) starts it again: the host hears "running".
    assert call(emu, "POST", f"{first}/start").status == 202
    assert power(emu, first) == "PowerState/running"
    assert heard[-1].kind == "running" and heard[-1].name == got["name"]


def test_a_group_delete_takes_its_role_assignments_with_it(emu: Emulator) -> None:
    role_id = emu.define_role(vm_role(), SUB)
    first = make_group(emu, "first-aaa111")
    assert assign(emu, first, role_id).status == 201
    assert [r for r in emu.store.roles.values() if r["type"].endswith("roleAssignments")]
    assert call(emu, "DELETE", first.split("/providers/")[0]).status == 202
    emu.live_resources()
    assert not [r for r in emu.store.roles.values() if r["type"].endswith("roleAssignments")]


def power(emu: Emulator, vm_url: str) -> str:
    view = call(emu, "GET", f"{vm_url}/instanceView").json()
    return str(next(s["code"] for s in view["statuses"] if s["code"].startswith("PowerState/")))
