"""templates/azure-role.json grants exactly the actions a full run's ARM requests need."""

from __future__ import annotations

import json
from pathlib import Path

from orchestrator.azure.permissions import actions_for, required_actions
from orchestrator.azure.provision import Provisioner
from orchestrator.azure.session import AzureSession
from orchestrator.azure.teardown import delete_group, group_exists, list_run_groups
from orchestrator.emulator import Emulator, Fault
from tests.conftest import make_plan, make_spec

ROLE = Path(__file__).resolve().parents[1] / "templates" / "azure-role.json"

# Granted for the preflight (issue 12) before the code that sends these requests exists: a full run
# does not make them yet, so the comparison below adds them. Each is an action Azure documents:
# registering the providers a run uses (a new subscription has them unregistered:
# MissingSubscriptionRegistration), reading registration state, quota (Compute usages), offered sizes
# (Resource SKUs), the image (VirtualMachineImages GET/list versions) and the auto-shutdown schedules.
# When the preflight lands, its requests appear in `needed` and this set may only shrink.
RESERVED_FOR_PREFLIGHT = {
    "Microsoft.Compute/register/action",
    "Microsoft.Network/register/action",
    "Microsoft.DevTestLab/register/action",
    "Microsoft.Resources/subscriptions/providers/read",
    "Microsoft.Compute/locations/usages/read",
    "Microsoft.Compute/skus/read",
    "Microsoft.Compute/locations/publishers/artifacttypes/offers/skus/versions/read",
    "Microsoft.DevTestLab/schedules/read",
}


def test_the_role_covers_a_full_run_and_grants_nothing_more(emu: Emulator, session: AzureSession) -> None:
    emu.inject(Fault("TooManyRequests", status=429, count=2, retry_after=1))  # retries change nothing
    plan = make_plan(make_spec(nodes=2, resources={"spot": True}))
    Provisioner(session).provision(plan)  # group, network, VMs (inline NIC, IP, disk), schedules, addresses
    list_run_groups(session)  # gc
    delete_group(session, plan.resource_group)  # down / teardown
    group_exists(session, plan.resource_group)  # down's check
    needed = required_actions(emu.requests())
    role = json.loads(ROLE.read_text())
    granted, expected = set(role["Actions"]), needed | RESERVED_FOR_PREFLIGHT
    assert granted == expected, f"missing: {sorted(expected - granted)}; not needed: {sorted(granted - expected)}"
    assert (
        role["IsCustom"]
        and role["NotActions"] == []
        and role["AssignableScopes"] == ["/subscriptions/{subscriptionId}"]
    )


def test_actions_for_single_requests() -> None:
    base = "/subscriptions/s/resourceGroups/rg/providers"
    assert actions_for("GET", f"{base}/Microsoft.Network/virtualNetworks/v") == {
        "Microsoft.Network/virtualNetworks/read"
    }
    assert actions_for("DELETE", "/subscriptions/s/resourcegroups/rg") >= {
        "Microsoft.Resources/subscriptions/resourceGroups/delete",
        "Microsoft.Compute/virtualMachines/delete",
    }
    assert actions_for("GET", "/subscriptions/s/providers/Microsoft.Compute/locations/eastus/operations/x") == {
        "Microsoft.Compute/locations/operations/read"
    }
