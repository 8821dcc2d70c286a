"""The emulator held to Microsoft's contract (orchestrator/emulator/specs, openapi.py) and to the Azure
facts a preflight relies on: subscription profiles, quota rows, provider registration, SKU
restrictions, deny policies, retired sizes, the image's OS disk minimum."""

from __future__ import annotations

import copy
import json
import re
from pathlib import Path
from typing import Any

import pytest

from orchestrator import catalog
from orchestrator.azure.errors import PolicyDeniedError
from orchestrator.azure.provision import Provisioner, ProvisionFailed
from orchestrator.azure.teardown import delete_group
from orchestrator.clock import VirtualClock
from orchestrator.emulator import Emulator
from orchestrator.emulator.openapi import SPEC_ROOT
from orchestrator.emulator.store import HOST
from orchestrator.emulator.subscription import allowed_sizes_policy, family_display_name, no_public_ip_policy
from orchestrator.targets.emulated import emulator_session
from tests.conftest import SUB, make_plan, make_spec
from tests.test_emulator import AUTH, NET, RG, VM_URL, call, put_network


def vm_body(**spec: Any) -> tuple[str, dict[str, Any]]:
    vm = make_plan(make_spec(**spec)).resources[3]
    return vm.name, copy.deepcopy(vm.body)


def error(r: Any) -> tuple[int, str]:
    return r.status, r.json()["error"]["code"]


# ---------------------------------------------------------------------- our own requests


def test_our_provision_and_teardown_are_accepted_and_send_no_read_only_member(
    emu: Emulator, record_property: Any
) -> None:
    session = emulator_session(emu, subscription=SUB)
    plan = make_plan(make_spec(nodes=2))
    Provisioner(session).provision(plan)
    delete_group(session, plan.resource_group, wait=True)
    refused = [(r.method, r.path, r.status, r.error_code) for r in emu.requests() if r.status >= 400]
    assert refused == []
    assert emu.read_only_sent == []
    assert emu.unvalidated_requests == []  # every request matched a vendored operation
    # RG, VNet, NSG, 2 VMs, 2 auto-shutdown schedules: every body checked against its schema.
    assert emu.validated_bodies == 7
    record_property("validated_bodies", emu.validated_bodies)
    print(f"request bodies validated against Microsoft's specs: {emu.validated_bodies}")


# ---------------------------------------------------------------------- the validator


@pytest.mark.parametrize(
    ("mutate", "code", "text"),
    [
        (
            lambda b: b["properties"].update(foo=1),
            "InvalidRequestContent",
            "Could not find member 'foo' on object of type 'VirtualMachineProperties'. Path 'properties.foo'",
        ),
        (
            lambda b: b["properties"]["storageProfile"]["osDisk"].update(caching="Sometimes"),
            "InvalidRequestContent",
            "Error converting value \"Sometimes\" to type 'CachingTypes'",
        ),
        (
            lambda b: b["properties"]["storageProfile"]["osDisk"].update(diskSizeGB="64"),
            "InvalidRequestContent",
            "Path 'properties.storageProfile.osDisk.diskSizeGB'",
        ),
        (lambda b: b.pop("location"), "InvalidParameter", "Required parameter 'location' is missing (null)."),
        (
            lambda b: b["properties"]["securityProfile"].update(foo=1),
            "InvalidRequestContent",
            "Could not find member 'foo' on object of type 'SecurityProfile'. Path 'properties.securityProfile.foo'",
        ),
        (
            lambda b: b["properties"]["securityProfile"]["uefiSettings"].update(secureBoot=False),
            "InvalidRequestContent",
            "Could not find member 'secureBoot' on object of type 'UefiSettings'. "
            "Path 'properties.securityProfile.uefiSettings.secureBoot'",
        ),
        (
            lambda b: b["properties"]["securityProfile"]["uefiSettings"].update(vTpmEnabled="yes"),
            "InvalidRequestContent",
            "Path 'properties.securityProfile.uefiSettings.vTpmEnabled'",
        ),
    ],
)
def test_vm_bodies_are_held_to_the_spec(emu: Emulator, mutate: Any, code: str, text: str) -> None:
    put_network(emu)
    name, body = vm_body()
    mutate(body)
    r = call(emu, "PUT", f"{VM_URL}/{name}", body)
    assert error(r) == (400, code)
    assert text in r.json()["error"]["message"]
    assert (
        r.json()["error"]["message"].startswith("The request content was invalid and could not be deserialized: '")
        or code != "InvalidRequestContent"
    )


def test_our_trusted_launch_security_profile_is_validated_against_compute_rp(emu: Emulator) -> None:
    """SecurityProfile, SecurityTypes and UefiSettings are vendored (ComputeRP.json 2026-04-01): the
    provisioner's securityProfile is walked member by member, and an unknown member inside it is refused."""
    put_network(emu)
    name, body = vm_body()
    assert body["properties"]["securityProfile"] == {
        "securityType": "TrustedLaunch",
        "uefiSettings": {"secureBootEnabled": False, "vTpmEnabled": True},
    }
    before = emu.validated_bodies
    assert call(emu, "PUT", f"{VM_URL}/{name}", body).status == 201
    assert emu.validated_bodies == before + 1
    assert emu.unvalidated_requests == []

    refused = copy.deepcopy(body)
    refused["properties"]["securityProfile"]["bootMode"] = "Secure"
    r = call(emu, "PUT", f"{VM_URL}/{name}-2", refused)
    assert error(r) == (400, "InvalidRequestContent")
    assert (
        "Could not find member 'bootMode' on object of type 'SecurityProfile'. "
        "Path 'properties.securityProfile.bootMode'" in r.json()["error"]["message"]
    )


def test_read_only_members_are_ignored_as_azure_ignores_them(emu: Emulator) -> None:
    put_network(emu)
    name, body = vm_body()
    body["properties"]["provisioningState"] = "Succeeded"
    body["id"] = "/made/up"
    assert call(emu, "PUT", f"{VM_URL}/{name}", body).status == 201
    assert sorted(x.rsplit(": ", 1)[1] for x in emu.read_only_sent) == ["id", "properties.provisioningState"]


def test_an_api_version_the_spec_does_not_have_is_refused(emu: Emulator) -> None:
    r = call(emu, "PUT", RG, {"location": "eastus"}, api="2019-01-01")
    assert error(r) == (400, "InvalidApiVersionParameter")
    assert "'2019-01-01' is invalid. The supported versions are '2025-04-01'" in r.json()["error"]["message"]
    put_network(emu)
    name, body = vm_body()
    r = call(emu, "PUT", f"{VM_URL}/{name}", body, api="2025-01-01")
    assert error(r) == (400, "NoRegisteredProviderFound")
    assert r.json()["error"]["message"].startswith(
        "No registered resource provider found for location 'eastus' and API version '2025-01-01' for type "
        "'virtualMachines'. The supported api-versions are '2026-04-01'."
    )
    # The public IP GET by name is vendored (virtualNetwork.json 2026-03-01): matched, not let through.
    assert call(emu, "GET", f"{NET}/publicIPAddresses/nope").status == 404
    assert emu.unvalidated_requests == []
    # A path the extracts do not hold is let through at an api-version its provider has.
    assert call(emu, "GET", f"{NET}/routeTables/nope").status == 404
    assert emu.unvalidated_requests[-1][0] == "GET"


# ---------------------------------------------------------------------- Microsoft's examples

# Examples whose request needs what the emulator does not implement.
SKIPPED_EXAMPLES = {
    "GlobalSchedules_CreateOrUpdate.json": "a LabVmsStartupTask with weeklyRecurrence and no targetResourceId: the "
    "emulator implements only a VM's daily auto-shutdown (ComputeVmShutdownTask)",
}


def _examples() -> list[tuple[Path, str, str, dict[str, Any]]]:
    """(example file, method, path template, operation) for every x-ms-examples file that is stored."""
    out = []
    for spec in sorted(SPEC_ROOT.rglob("*.json")):
        if "examples" in spec.parts or "common-types" in spec.parts:
            continue
        doc = json.loads(spec.read_text())
        for template, item in (doc.get("paths") or {}).items():
            for method, op in item.items():
                for ref in (op.get("x-ms-examples") or {}).values():
                    example = (spec.parent / ref["$ref"]).resolve()
                    if example.is_file():
                        out.append((example, method.upper(), template, op))
    return out


EXAMPLES = _examples()


def test_every_stored_example_is_replayed_or_skipped_with_a_reason() -> None:
    stored = {p.name for p in SPEC_ROOT.rglob("examples/**/*.json")}
    assert stored == {e[0].name for e in EXAMPLES}
    assert len(EXAMPLES) >= 5


@pytest.mark.parametrize(("example", "method", "template", "op"), EXAMPLES, ids=[e[0].name for e in EXAMPLES])
def test_microsofts_example_request_is_accepted(
    emu: Emulator, example: Path, method: str, template: str, op: dict[str, Any]
) -> None:
    if example.name in SKIPPED_EXAMPLES:
        pytest.skip(SKIPPED_EXAMPLES[example.name])
    params = json.loads(example.read_text())["parameters"]
    values = {**params, "subscriptionId": SUB}  # adapted: our subscription
    path = re.sub(r"\{(\w+)\}", lambda m: str(values[m.group(1)]), template)
    query = {"api-version": params["api-version"]}
    body = None
    for p in op["parameters"]:
        if p.get("in") == "query" and p["name"] in params:
            query[p["name"]] = params[p["name"]]
        if p.get("in") == "body":
            body = params.get(p["name"])
    if "{resourceGroupName}" in template:  # adapted: the group the example assumes exists
        group = f"{HOST}/subscriptions/{SUB}/resourcegroups/{params['resourceGroupName']}"
        assert call(emu, "PUT", group, {"location": "eastus"}).status in {200, 201}
    url = f"{HOST}{path}?" + "&".join(f"{k}={v}" for k, v in query.items())
    r = emu.handle(method, url, AUTH, json.dumps(body).encode() if body is not None else None)
    assert r.status in {200, 201, 202, 204}, r.body
    assert emu.validated_requests >= 1


# ---------------------------------------------------------------------- Azure facts


def test_retired_sizes_are_refused_like_any_size_the_region_does_not_offer(emu: Emulator) -> None:
    put_network(emu)
    name, body = vm_body()
    for retired in ("Standard_NC6s_v3", "Standard_NC24s_v3", "Standard_NV6"):
        assert retired in catalog.RETIRED_SIZES
        body["properties"]["hardwareProfile"]["vmSize"] = retired
        r = call(emu, "PUT", f"{VM_URL}/{name}", body)
        assert error(r) == (400, "InvalidParameter")
        err = r.json()["error"]
        assert err["target"] == "vmSize"
        assert err["message"].startswith(f"The value {retired} provided for the VM size is not valid.")
        offered = err["message"].split("are: ", 1)[1]
        assert not any(s in offered for s in catalog.RETIRED_SIZES)


def test_an_os_disk_smaller_than_the_images_is_refused_with_azures_body(emu: Emulator) -> None:
    put_network(emu)
    name, body = vm_body(resources={"image": "ubuntu-hpc-22.04"})
    assert catalog.resolve_image("ubuntu-hpc-22.04", gpu=True).os_disk_gb == 64
    body["properties"]["storageProfile"]["osDisk"]["diskSizeGB"] = 50
    r = call(emu, "PUT", f"{VM_URL}/{name}", body)
    assert r.status == 409
    assert r.json() == {
        "error": {
            "code": "OperationNotAllowed",
            "message": "The specified disk size 50 GB is smaller than the size of the corresponding disk in the VM "
            "image: 64 GB. This is not allowed. Please choose equal or greater size or do not specify an explicit "
            "size.",
            "target": "osDisk.diskSizeGB",
        }
    }
    body["properties"]["storageProfile"]["osDisk"]["diskSizeGB"] = 64
    assert call(emu, "PUT", f"{VM_URL}/{name}", body).status == 201


def _registration_body(ns: str) -> dict[str, Any]:
    message = (
        f"The subscription is not registered to use namespace '{ns}'. See https://aka.ms/rps-not-found for how "
        "to register subscriptions."
    )
    return {
        "error": {
            "code": "MissingSubscriptionRegistration",
            "message": message,
            "details": [{"code": "MissingSubscriptionRegistration", "target": ns, "message": message}],
        }
    }


def test_a_new_subscription_has_no_gpu_quota_and_unregistered_providers(clock: VirtualClock) -> None:
    emu = Emulator("instant", clock=clock, subscription="new-subscription")
    session = emulator_session(emu, subscription=SUB)
    for ns in ("Microsoft.Compute", "Microsoft.Network", "Microsoft.DevTestLab"):
        assert session.resources.providers.get(ns).registration_state == "NotRegistered"
    call(emu, "PUT", RG, {"location": "eastus"})
    name, body = vm_body()
    r = call(emu, "PUT", f"{VM_URL}/{name}", body)
    assert r.status == 409 and r.json() == _registration_body("Microsoft.Compute")
    usages_url = f"{HOST}/subscriptions/{SUB}/providers/Microsoft.Compute/locations/eastus/usages"
    assert call(emu, "GET", usages_url).json() == _registration_body("Microsoft.Compute")
    # (The SDK would register it by itself: azure-mgmt-core's policy POSTs .../register, then polls.)
    register = f"{HOST}/subscriptions/{SUB}/providers/Microsoft.Compute/register"
    assert call(emu, "POST", register, api="2016-02-01").json()["registrationState"] == "Registering"
    usages = {u.name.value: u for u in session.compute.usage.list("eastus")}
    assert usages["standardNCASv3_T4Family"].limit == 0
    assert usages["standardNCASv3_T4Family"].name.localized_value == "Standard NCASv3_T4 Family"
    assert usages["cores"].name.localized_value == "Total Regional vCPUs"
    assert usages["lowPriorityCores"].limit == 0
    assert all(usages[f].limit == 0 for f in usages if f not in {"cores", "lowPriorityCores"} and "N" in f[8:10])
    r = call(emu, "PUT", f"{VM_URL}/{name}", body)  # Compute registered; the inline NIC needs Network
    assert r.status == 409 and r.json() == _registration_body("Microsoft.Network")


def test_registering_a_provider_goes_registering_then_registered(clock: VirtualClock) -> None:
    emu = Emulator("azure-like", clock=clock, subscription="new-subscription")
    session = emulator_session(emu, subscription=SUB)
    assert session.resources.providers.register("Microsoft.Network").registration_state == "Registering"
    assert session.resources.providers.get("Microsoft.Network").registration_state == "Registering"
    call(emu, "PUT", RG, {"location": "eastus"})
    assert call(emu, "PUT", f"{NET}/networkSecurityGroups/n", {"location": "eastus"}).json() == _registration_body(
        "Microsoft.Network"
    )
    clock.advance(61)
    assert session.resources.providers.get("Microsoft.Network").registration_state == "Registered"
    assert call(emu, "PUT", f"{NET}/networkSecurityGroups/n", {"location": "eastus"}).status == 201


def test_the_default_subscription_is_ready(emu: Emulator) -> None:
    session = emulator_session(emu, subscription=SUB)
    assert session.resources.providers.get("Microsoft.Compute").registration_state == "Registered"
    usages = {u.name.value: u.limit for u in session.compute.usage.list("eastus")}
    assert usages["standardNCASv3_T4Family"] > 0 and usages["cores"] >= usages["standardNCASv3_T4Family"]


def test_the_regional_cores_row_caps_all_families_and_spot_draws_on_low_priority(emu: Emulator) -> None:
    session = emulator_session(emu, subscription=SUB)
    emu.set_quota("eastus", "cores", 6)
    with pytest.raises(ProvisionFailed) as info:
        Provisioner(session).provision(make_plan(make_spec(nodes=2)))
    assert "Total Regional Cores quota" in str(info.value.__cause__)
    emu.set_quota("eastus", "lowPriorityCores", 8)
    Provisioner(session).provision(make_plan(make_spec(nodes=2, resources={"spot": True})))  # cores row untouched
    rows = {u["name"]["value"]: u for u in emu.usages("eastus")}
    assert (rows["lowPriorityCores"]["currentValue"], rows["cores"]["currentValue"]) == (8, 0)


def test_sku_restrictions_are_scoped_to_the_location_and_zone(emu: Emulator) -> None:
    session = emulator_session(emu, subscription=SUB)
    emu.restrict_sku("Standard_NC4as_T4_v3", "eastus", zones=["2"])
    emu.restrict_sku("Standard_NC8as_T4_v3", "westus2")
    skus = {s.name: s for s in session.compute.resource_skus.list(filter="location eq 'eastus'")}
    t4 = skus["Standard_NC4as_T4_v3"]
    assert t4.family == "standardNCASv3_T4Family" and t4.location_info[0].zones == ["1", "2", "3"]
    (restriction,) = t4.restrictions
    assert (restriction.type, restriction.reason_code) == ("Zone", "NotAvailableForSubscription")
    assert restriction.restriction_info.zones == ["2"] and restriction["values"] == ["eastus"]
    assert skus["Standard_NC8as_T4_v3"].restrictions == []  # restricted in westus2 only
    put_network(emu)
    name, body = vm_body()
    body["zones"] = ["2"]
    assert error(call(emu, "PUT", f"{VM_URL}/{name}", body)) == (409, "SkuNotAvailable")
    body["zones"] = ["1"]
    assert call(emu, "PUT", f"{VM_URL}/{name}", body).status == 201


def test_a_deny_policy_answers_403_with_the_policy_violation(emu: Emulator) -> None:
    session = emulator_session(emu, subscription=SUB)
    emu.add_policy(allowed_sizes_policy(["Standard_D2s_v5", "Standard_D4s_v5"], "Allowed VM sizes (prod)"))
    put_network(emu)
    name, body = vm_body()
    r = call(emu, "PUT", f"{VM_URL}/{name}", body)
    assert error(r) == (403, "RequestDisallowedByPolicy")
    err = r.json()["error"]
    assert err["target"] == name and err["message"].startswith(f"Resource '{name}' was disallowed by policy.")
    (violation,) = err["additionalInfo"]
    info = violation["info"]
    assert violation["type"] == "PolicyViolation"
    assert info["policyDefinitionDisplayName"] == "Allowed virtual machine size SKUs"
    assert info["policyDefinitionName"] == "cccc23c7-8427-4f53-ad12-b6a63eb452b3"
    assert info["policyAssignmentDisplayName"] == "Allowed VM sizes (prod)" and info["policyAssignmentName"]
    assert info["policyAssignmentScope"] == f"/subscriptions/{SUB}"
    assert info["evaluationDetails"]["evaluatedExpressions"][0]["expressionValue"] == "Standard_NC4as_T4_v3"
    with pytest.raises(ProvisionFailed) as failed:
        Provisioner(session).provision(make_plan(make_spec(nodes=1), run_id="demo-def456"))
    assert isinstance(failed.value.cause, PolicyDeniedError)
    check = f"{RG}/providers/Microsoft.PolicyInsights/checkPolicyRestrictions"
    content = {"resourceDetails": {"resourceContent": body | {"type": "Microsoft.Compute/virtualMachines"}}}
    result = call(emu, "POST", check, content, api="2024-10-01").json()
    assert result["fieldRestrictions"][0]["restrictions"][0]["values"] == ["Standard_D2s_v5", "Standard_D4s_v5"]
    assert result["contentEvaluationResult"]["policyEvaluations"][0]["evaluationResult"] == "NonCompliant"


def test_a_no_public_ip_policy_denies_a_vm_that_would_create_one(emu: Emulator) -> None:
    emu.add_policy(no_public_ip_policy())
    put_network(emu)
    name, body = vm_body()
    r = call(emu, "PUT", f"{VM_URL}/{name}", body)
    assert error(r) == (403, "RequestDisallowedByPolicy")
    assert r.json()["error"]["additionalInfo"][0]["info"]["policyDefinitionDisplayName"] == "Not allowed resource types"
    del body["properties"]["networkProfile"]["networkInterfaceConfigurations"][0]["properties"]["ipConfigurations"][0][
        "properties"
    ]["publicIPAddressConfiguration"]
    assert call(emu, "PUT", f"{VM_URL}/{name}", body).status == 201


def test_image_and_permission_reads(emu: Emulator) -> None:
    session = emulator_session(emu, subscription=SUB)
    image = catalog.resolve_image("ubuntu-hpc-22.04", gpu=True)
    versions = session.compute.virtual_machine_images.list("eastus", image.publisher, image.offer, image.sku)
    (version,) = versions
    got = session.compute.virtual_machine_images.get("eastus", image.publisher, image.offer, image.sku, version.name)
    assert got.os_disk_image.operating_system == "Linux"
    assert session.compute.virtual_machine_images.list("eastus", "nobody", "nothing", "none") == []
    call(emu, "PUT", RG, {"location": "eastus"})
    perms = call(emu, "GET", f"{RG}/providers/Microsoft.Authorization/permissions", api="2022-04-01").json()
    assert perms["value"][0]["actions"] == ["*"]
    emu.set_permissions(["*/read"])
    perms = call(emu, "GET", f"{RG}/providers/Microsoft.Authorization/permissions", api="2022-04-01").json()
    assert perms["value"][0]["actions"] == ["*/read"]


def test_family_display_names() -> None:
    assert family_display_name("standardNCASv3_T4Family") == "Standard NCASv3_T4 Family"
    assert family_display_name("StandardNCADSA100v4Family") == "Standard NCADSA100v4 Family"
