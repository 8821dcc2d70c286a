"""templates/azure-role.json grants exactly the actions a preflight's and a full run's ARM requests need."""

from __future__ import annotations

import json
from pathlib import Path

from orchestrator.azure import selfstop
from orchestrator.azure.permissions import PREFLIGHT_ACTIONS, actions_for, required_actions
from orchestrator.azure.preflight import PROVIDERS, run_preflight
from orchestrator.azure.provision import Provisioner
from orchestrator.azure.session import AzureSession
from orchestrator.azure.teardown import delete_group, group_exists, list_run_groups
from orchestrator.emulator import Emulator, Fault
from tests.conftest import make_plan, make_spec

ROLE = Path(__file__).resolve().parents[1] / "templates" / "azure-role.json"


def test_the_role_covers_a_preflight_and_a_full_run_and_grants_nothing_more(
    emu: Emulator, session: AzureSession
) -> None:
    emu.inject(Fault("TooManyRequests", status=429, count=2, retry_after=1))  # retries change nothing
    spec = make_spec(nodes=2, resources={"spot": True})
    for ns in PROVIDERS:  # as on a new subscription: the preflight registers them
        emu.set_provider(ns, registered=False)
    report = run_preflight(session, spec)  # providers, permissions, quota, SKUs, image, policy
    assert report.exit_code == 0 and not report.warnings, report.checks
    plan = make_plan(spec)
    Provisioner(session).provision(plan)  # group, network, VMs (inline NIC, IP, disk), schedules, addresses
    vms = [n.vm_name for n in plan.nodes]
    selfstop.power_states(session, plan.resource_group, vms)  # status: has autostop stopped them?
    selfstop.start(session, plan.resource_group, vms)  # collect/attach of a stopped run
    list_run_groups(session)  # gc
    delete_group(session, plan.resource_group)  # down / teardown
    group_exists(session, plan.resource_group)  # down's check
    needed = required_actions(emu.requests())
    role = json.loads(ROLE.read_text())
    granted = set(role["Actions"])
    assert granted == needed, f"missing: {sorted(needed - granted)}; not needed: {sorted(granted - needed)}"
    assert needed >= PREFLIGHT_ACTIONS  # every action only the preflight uses is one it really sent
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
    # The preflight's requests, at subscription scope (the run's group does not exist yet).
    sub = "/subscriptions/s/providers"
    image = f"{sub}/Microsoft.Compute/locations/eastus/publishers/p/artifacttypes/vmimage/offers/o/skus/s/versions"
    assert {
        (method, path): actions_for(method, path)
        for method, path in [
            ("POST", f"{sub}/microsoft.devtestlab/register"),
            ("GET", f"{sub}/Microsoft.Compute"),
            ("GET", f"{sub}/Microsoft.Compute/locations/eastus/usages"),
            ("GET", f"{sub}/Microsoft.Compute/skus"),
            ("GET", image),
            ("GET", f"{image}/1.0.0"),
            ("GET", f"{sub}/Microsoft.Authorization/permissions"),
            ("POST", f"{sub}/Microsoft.PolicyInsights/checkPolicyRestrictions"),
        ]
    } == {
        ("POST", f"{sub}/microsoft.devtestlab/register"): {"Microsoft.DevTestLab/register/action"},
        ("GET", f"{sub}/Microsoft.Compute"): {"Microsoft.Resources/subscriptions/providers/read"},
        ("GET", f"{sub}/Microsoft.Compute/locations/eastus/usages"): {"Microsoft.Compute/locations/usages/read"},
        ("GET", f"{sub}/Microsoft.Compute/skus"): {"Microsoft.Compute/skus/read"},
        ("GET", image): {"Microsoft.Compute/locations/publishers/artifacttypes/offers/skus/versions/read"},
        ("GET", f"{image}/1.0.0"): {"Microsoft.Compute/locations/publishers/artifacttypes/offers/skus/versions/read"},
        ("GET", f"{sub}/Microsoft.Authorization/permissions"): {"Microsoft.Authorization/permissions/read"},
        ("POST", f"{sub}/Microsoft.PolicyInsights/checkPolicyRestrictions"): {
            "Microsoft.PolicyInsights/checkPolicyRestrictions/read"
        },
    }
