"""Autostop on the Azure side: the VM's role, giving it to a run's VMs, and their power state.

A kept or detached run's VMs stop costing compute without the laptop by deallocating themselves
(remote/autostop.py runs on each VM): each VM has a system-assigned managed identity, and the run's
resource group gives that identity `templates/azure-vm-role.json` (read, deallocate and delete VMs,
delete the group; nothing else, in that group only). Assigning it needs
Microsoft.Authorization/roleAssignments/write, which an administrator grants once through
`templates/azure-vm-role-assigner.json` under the condition in `azure-vm-role-assigner.condition`
(that one role, to service principals). Without it, a run says so and relies on the auto-shutdown
schedule (azure/schedules.py).

Microsoft.Authorization has no pinned SDK client: its requests go through the resource client's
pipeline at api-version 2022-04-01.
"""

from __future__ import annotations

import json
import uuid
from collections.abc import Iterable
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from orchestrator.azure.session import AzureSession

TEMPLATES = Path(__file__).resolve().parents[2] / "templates"
VM_ROLE_FILE = TEMPLATES / "azure-vm-role.json"
ASSIGNER_ROLE_FILE = TEMPLATES / "azure-vm-role-assigner.json"
CONDITION_FILE = TEMPLATES / "azure-vm-role-assigner.condition"
VM_ROLE_NAME = "orchestrator vm self-stop"
AUTHORIZATION_API = "2022-04-01"
ASSIGN_ACTION = "Microsoft.Authorization/roleAssignments/write"
# How to read the power state a VM's instance view reports.
OFF_STATES = frozenset({"deallocating", "deallocated"})


def vm_role() -> dict[str, Any]:
    return dict(json.loads(VM_ROLE_FILE.read_text()))


def assigner_condition(vm_role_guid: str) -> str:
    """The ABAC condition an administrator puts on the assigner role's assignment (condition version
    2.0): assigning and removing only the VM role, and only to service principals."""
    return CONDITION_FILE.read_text().replace("{vmRoleId}", vm_role_guid).strip()


@dataclass(frozen=True)
class Grant:
    """Whether a run's VMs may deallocate themselves, and if not, why (said to the user)."""

    granted: bool
    reason: str = ""
    assignments: tuple[str, ...] = ()  # role assignment ids made


def _send(session: AzureSession, method: str, path: str, body: Any = None, **params: str) -> Any:
    from azure.core.exceptions import HttpResponseError, map_error
    from azure.core.rest import HttpRequest
    from azure.mgmt.core.exceptions import ARMErrorFormat

    request = HttpRequest(method, path, params={"api-version": AUTHORIZATION_API, **params}, json=body)
    response = session.resources.send_request(request)
    if response.status_code >= 400:
        map_error(status_code=response.status_code, response=response, error_map={})
        raise HttpResponseError(response=response, error_format=ARMErrorFormat)
    return response.json() if response.content else None


def find_vm_role(session: AzureSession) -> str | None:
    """The VM role's id in this subscription (an administrator defined it once), or None."""
    path = f"/subscriptions/{session.subscription_id}/providers/Microsoft.Authorization/roleDefinitions"
    listed = _send(session, "GET", path, **{"$filter": f"roleName eq '{VM_ROLE_NAME}'"})
    found = [
        r for r in (listed or {}).get("value") or [] if (r.get("properties") or {}).get("roleName") == VM_ROLE_NAME
    ]
    return str(found[0]["id"]) if found else None


def grant(session: AzureSession, resource_group: str, vm_names: Iterable[str]) -> Grant:
    """Give each VM's identity the VM role at the scope of its run's group. Never raises for
    Azure's refusal: the run goes on, relying on the auto-shutdown schedule."""
    from orchestrator.azure.errors import error_code_and_message

    sub = session.subscription_id
    try:
        role_id = find_vm_role(session)
        if role_id is None:
            return Grant(False, f"the role '{VM_ROLE_NAME}' is not defined in subscription {sub}")
        made = []
        scope = f"/subscriptions/{sub}/resourceGroups/{resource_group}"
        for name in vm_names:
            vm = session.compute.virtual_machines.get(resource_group, name)
            principal = getattr(getattr(vm, "identity", None), "principal_id", None)
            if not principal:
                return Grant(False, f"the VM {name} has no managed identity")
            rid = f"{scope}/providers/Microsoft.Authorization/roleAssignments/{uuid.uuid4()}"
            body = {"properties": {"roleDefinitionId": role_id, "principalId": principal,
                                   "principalType": "ServicePrincipal"}}  # fmt: skip
            _send(session, "PUT", rid, body)
            made.append(rid)
        return Grant(True, assignments=tuple(made))
    except Exception as e:  # the run goes on without self-deallocation; say why
        code, message = error_code_and_message(e)
        if code == "AuthorizationFailed":
            return Grant(False, f"your identity may not assign roles in {resource_group} ({ASSIGN_ACTION})")
        return Grant(False, f"{code or type(e).__name__}: {message or e}")


def power_states(session: AzureSession, resource_group: str, vm_names: list[str]) -> dict[str, str]:
    """Each VM's power state (`running`, `deallocated`, ...; `gone` when it does not exist)."""
    from azure.core.exceptions import ResourceNotFoundError

    def one(name: str) -> str:
        try:
            view = session.compute.virtual_machines.instance_view(resource_group, name)
        except ResourceNotFoundError:
            return "gone"
        codes = [str(getattr(s, "code", "") or "") for s in getattr(view, "statuses", None) or []]
        return next((c.split("/", 1)[1] for c in codes if c.startswith("PowerState/")), "unknown")

    with ThreadPoolExecutor(max_workers=max(1, min(8, len(vm_names)))) as pool:
        return dict(zip(vm_names, pool.map(one, vm_names), strict=True))


def stopped_at(session: AzureSession, resource_group: str, vm_names: list[str]) -> float | None:
    """When the VMs' last operation (their deallocation, for stopped ones) happened: the latest
    ProvisioningState time of their instance views (epoch seconds; None when Azure gives none)."""
    times = []
    for name in vm_names:
        view = session.compute.virtual_machines.instance_view(resource_group, name)
        for status in getattr(view, "statuses", None) or []:
            when = getattr(status, "time", None)
            if str(getattr(status, "code", "")).startswith("ProvisioningState/") and when is not None:
                times.append(when.timestamp())
    return max(times) if times else None


def start(session: AzureSession, resource_group: str, vm_names: list[str]) -> None:
    """Start deallocated VMs (side by side) and wait until they run."""
    pollers = [
        session.compute.virtual_machines.begin_start(resource_group, n, polling=session.polling(T_VM)) for n in vm_names
    ]
    for p in pollers:
        p.result()


def deallocate(session: AzureSession, resource_group: str, vm_names: list[str]) -> None:
    pollers = [
        session.compute.virtual_machines.begin_deallocate(resource_group, n, polling=session.polling(T_VM))
        for n in vm_names
    ]
    for p in pollers:
        p.result()


T_VM = "Microsoft.Compute/virtualMachines"
