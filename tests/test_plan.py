from __future__ import annotations

import re

import pytest

from orchestrator import catalog
from orchestrator.emulator.validation import check_name
from orchestrator.plan import (
    T_NSG,
    T_RG,
    T_SCHEDULE,
    T_VM,
    T_VNET,
    TAG_EXPIRES,
    TAG_OWNER,
    TAG_RUN,
    new_run_id,
)
from orchestrator.ui import describe
from tests.conftest import KEY, SUB, make_plan, make_spec


def test_stages_follow_the_dependency_chain() -> None:
    plan = make_plan(make_spec(nodes=3))
    stages = plan.stages
    assert [[r.type for r in s] for s in stages] == [[T_RG], [T_VNET, T_NSG], [T_VM] * 3, [T_SCHEDULE] * 3]
    vnet, nsg = stages[1]
    for vm in stages[2]:
        assert set(vm.depends_on) == {vnet.id, nsg.id}
    assert vnet.depends_on == nsg.depends_on == (stages[0][0].id,)


def test_every_resource_is_tagged_with_run_owner_and_expiry() -> None:
    plan = make_plan(make_spec(max_duration="2h"))
    for r in plan.resources:
        assert r.body["tags"][TAG_RUN] == "demo-abc123"
        assert r.body["tags"][TAG_OWNER] == "tester"
        # 12:00 + 2 h + 30 min grace
        assert r.body["tags"][TAG_EXPIRES] == "2026-03-01T14:30:00Z"


def test_vm_carries_nic_and_public_ip_inline_and_deletes_them_with_itself() -> None:
    vm = make_plan().stages[2][0]
    props = vm.body["properties"]
    assert props["storageProfile"]["osDisk"]["deleteOption"] == "Delete"
    nic = props["networkProfile"]["networkInterfaceConfigurations"][0]
    assert nic["properties"]["deleteOption"] == "Delete"
    assert nic["properties"]["networkSecurityGroup"]["id"].endswith("/networkSecurityGroups/demo-abc123-nsg")
    ipc = nic["properties"]["ipConfigurations"][0]["properties"]
    assert ipc["subnet"]["id"].endswith("/virtualNetworks/demo-abc123-vnet/subnets/nodes")
    assert ipc["publicIPAddressConfiguration"]["properties"]["deleteOption"] == "Delete"
    assert props["networkProfile"]["networkApiVersion"]
    linux = props["osProfile"]["linuxConfiguration"]
    assert linux["disablePasswordAuthentication"] is True
    assert linux["ssh"]["publicKeys"][0]["keyData"] == KEY
    assert "adminPassword" not in props["osProfile"]


def test_gpu_sizes_get_the_driver_image_and_cpu_sizes_plain_ubuntu() -> None:
    gpu = make_plan(make_spec(resources={"vm_size": "Standard_NC4as_T4_v3"})).stages[2][0]
    cpu = make_plan(make_spec(resources={"vm_size": "Standard_D4s_v5"})).stages[2][0]
    assert gpu.body["properties"]["storageProfile"]["imageReference"]["offer"] == "ubuntu-hpc"
    assert cpu.body["properties"]["storageProfile"]["imageReference"]["offer"] == "ubuntu-24_04-lts"


def test_zone_and_spot_reach_the_vm_body() -> None:
    spec = make_spec(resources={"zone": 3, "spot": True})
    vm = make_plan(spec).stages[2][0]
    assert vm.body["zones"] == ["3"]
    assert vm.body["properties"]["priority"] == "Spot"
    assert vm.body["properties"]["evictionPolicy"] == "Delete"
    assert any("spot" in w for w in make_plan(spec).warnings)


def test_nsg_opens_ssh_only_to_the_given_cidrs_and_the_vnet() -> None:
    nsg = make_plan(make_spec(ssh={"allowed_cidrs": ["203.0.113.7"]})).stages[1][1]
    rules = {r["name"]: r["properties"] for r in nsg.body["properties"]["securityRules"]}
    assert rules["ssh-in"]["sourceAddressPrefixes"] == ["203.0.113.7/32"]
    assert rules["ssh-in"]["destinationPortRange"] == "22"
    assert rules["intra-vnet-in"]["sourceAddressPrefix"] == "VirtualNetwork"
    assert rules["deny-all-in"]["access"] == "Deny"
    assert not make_plan(make_spec(ssh={"allowed_cidrs": ["203.0.113.7"]})).warnings


def test_any_opens_ssh_to_the_internet_with_a_warning() -> None:
    plan = make_plan(make_spec(ssh={"allowed_cidrs": ["any"]}))
    rules = {r["name"]: r["properties"] for r in plan.stages[1][1].body["properties"]["securityRules"]}
    assert rules["ssh-in"]["sourceAddressPrefix"] == "Internet"
    assert "sourceAddressPrefixes" not in rules["ssh-in"]
    assert plan.ssh_sources == ("any",)
    assert any("open to the whole Internet" in w for w in plan.warnings)


def test_an_empty_cidr_list_creates_no_ssh_rule_so_the_nsg_denies_ssh() -> None:
    """The dry-run target passes [] where a real run would refuse: the plan must not open SSH to anyone."""
    plan = make_plan(make_spec(ssh={"allowed_cidrs": []}))
    rules = [r["properties"] for r in plan.stages[1][1].body["properties"]["securityRules"]]
    assert [r["priority"] for r in rules] == [110, 4000]  # intra-VNet allow, then deny-all
    allows_22 = [r for r in rules if r["access"] == "Allow" and r["destinationPortRange"] in {"22", "*"}]
    assert all(r["sourceAddressPrefix"] == "VirtualNetwork" for r in allows_22)
    assert not any(r.get("sourceAddressPrefix") == "Internet" for r in rules)
    assert plan.ssh_sources == ()
    assert not any("open to the whole Internet" in w for w in plan.warnings)
    assert any("denies SSH" in w for w in plan.warnings)


@pytest.mark.parametrize("name", ["a" * 40, "x1", "mnist-cnn", "ab-" + "c" * 37])
def test_names_are_valid_for_every_resource_type(name: str) -> None:
    run_id = new_run_id(name)
    assert re.fullmatch(r"[a-z][a-z0-9-]+-[0-9a-f]{6}", run_id)
    plan = make_plan(make_spec(name=name, nodes=16), run_id=run_id)
    for r in plan.resources:
        check_name(r.type, r.name)  # raises as ARM would
    for node in plan.nodes:
        check_name("Microsoft.Network/networkInterfaces", node.nic_name)
        check_name("Microsoft.Network/publicIPAddresses", node.public_ip_name)
        check_name("Microsoft.Compute/disks", node.os_disk_name)


def test_ids_use_the_subscription_and_group() -> None:
    plan = make_plan()
    assert plan.resources[0].id == f"/subscriptions/{SUB}/resourceGroups/orch-demo-abc123"
    assert all(r.id.startswith(plan.resources[0].id) for r in plan.resources)


def test_bad_run_id_is_refused() -> None:
    with pytest.raises(ValueError, match="'Bad_Run' is not valid in Azure resource names"):
        make_plan(run_id="Bad_Run")


def test_critical_path_and_cost() -> None:
    plan = make_plan(make_spec(nodes=2))
    assert plan.critical_path_seconds() == pytest.approx(1 + 7 + 120)
    # per node: the VM, its 128 GB Premium SSD OS disk (billed as P10, 19.71 USD a month of 730 h), its IP
    assert plan.hourly_usd == pytest.approx(2 * (0.526 + 19.71 / 730 + 0.005))


def test_the_estimate_includes_the_os_disk_tier_and_the_public_ip() -> None:
    small = make_plan(make_spec(resources={"disk_gb": 64})).hourly_usd
    large = make_plan(make_spec(resources={"disk_gb": 1000})).hourly_usd
    assert small == pytest.approx(0.526 + 10.21 / 730 + 0.005)  # P6
    assert large == pytest.approx(0.526 + 135.17 / 730 + 0.005)  # P30
    assert make_plan(make_spec(nodes=3, resources={"disk_gb": 64})).hourly_usd == pytest.approx(3 * small)


def test_the_estimate_uses_regional_and_spot_prices() -> None:
    south = make_plan(make_spec(resources={"region": "southcentralus", "disk_gb": 64})).hourly_usd
    # southcentralus has its own NC4as_T4_v3 figure; its disk uses the region's factor
    assert south == pytest.approx(0.631 + 10.21 * 1.2 / 730 + 0.005)
    spot = make_plan(make_spec(resources={"spot": True, "disk_gb": 64})).hourly_usd
    # no published spot figure in the snapshot: 0.3 of pay-as-you-go, never the old 0.2
    assert spot == pytest.approx(0.526 * 0.3 + 10.21 / 730 + 0.005)


def test_each_vm_gets_an_auto_shutdown_schedule_at_its_expiry() -> None:
    plan = make_plan(make_spec(max_duration="2h", nodes=2))
    schedules = plan.stages[3]
    assert [s.name for s in schedules] == ["shutdown-computevm-demo-abc123-0", "shutdown-computevm-demo-abc123-1"]
    props = schedules[0].body["properties"]
    assert props["taskType"] == "ComputeVmShutdownTask" and props["timeZoneId"] == "UTC"
    assert props["dailyRecurrence"]["time"] == "1430"  # 12:00 + 2 h + 30 min grace
    assert props["status"] == "Enabled"
    assert plan.schedule_enable_at is None
    assert props["targetResourceId"] == plan.stages[2][0].id
    assert schedules[0].depends_on == (plan.stages[2][0].id,)


def test_cloud_init_carries_the_host_key_the_watchdog_and_the_gpu_check() -> None:
    import base64

    import yaml

    from orchestrator.bootstrap import as_custom_data, cloud_init
    from orchestrator.emulator.cloudinit import parse_cloud_init
    from orchestrator.sshkeys import generate_host_key

    key = generate_host_key()
    doc = cloud_init(
        run_id="r-000001",
        vm_name="r-000001-0",
        rank=0,
        host_private_key=key.private_openssh,
        host_public_key=key.public,
        user="trainer",
        max_duration=5400,
        gpu=True,
    )
    parsed = parse_cloud_init(as_custom_data(doc))
    assert parsed["ssh_keys"]["ed25519_private"].strip() == key.private_openssh.strip()
    assert parsed["ssh_keys"]["ed25519_public"] == key.public
    assert parsed["ssh_pwauth"] is False
    files = {f["path"]: f["content"] for f in parsed["write_files"]}
    assert "OnBootSec=5400s" in files["/etc/systemd/system/orchestrator-watchdog.timer"]
    assert "systemctl poweroff" in files["/etc/systemd/system/orchestrator-watchdog.service"]
    commands = " ".join(" ".join(c) for c in parsed["runcmd"])
    assert "orchestrator-watchdog.timer" in commands and "nvidia-smi" in commands
    assert "/home/trainer/orch" in commands
    cpu = yaml.safe_load(
        cloud_init(
            run_id="r-000001",
            vm_name="r-000001-0",
            rank=0,
            host_private_key=key.private_openssh,
            host_public_key=key.public,
        )
    )
    assert "nvidia-smi" not in str(cpu["runcmd"])
    assert base64.b64decode(as_custom_data(doc)).decode().startswith("#cloud-config")


# Compute ComputeRP.json 2026-04-01, Azure/azure-rest-api-specs at 030174c776bbc013251bc13957bbff81f0a21bd4
# (now vendored, so the emulator validates securityProfile too): SecurityProfile's
# members, SecurityTypes' enum and UefiSettings' members, copied from the definitions.
SECURITY_PROFILE_MEMBERS = {
    "uefiSettings",
    "encryptionAtHost",
    "securityType",
    "encryptionIdentity",
    "proxyAgentSettings",
}
SECURITY_TYPES = {"Standard", "TrustedLaunch", "ConfidentialVM"}
UEFI_SETTINGS_MEMBERS = {"secureBootEnabled": bool, "vTpmEnabled": bool}


def _check_security_profile(profile: dict[str, object]) -> None:
    assert set(profile) <= SECURITY_PROFILE_MEMBERS
    assert profile["securityType"] in SECURITY_TYPES
    uefi = profile["uefiSettings"]
    assert isinstance(uefi, dict) and set(uefi) <= set(UEFI_SETTINGS_MEMBERS)
    assert all(isinstance(v, UEFI_SETTINGS_MEMBERS[k]) for k, v in uefi.items())


@pytest.mark.parametrize(
    "size", sorted(n for n, s in catalog.VM_SIZES.items() if catalog.unsupported_reason(s) is None)
)
def test_every_size_states_its_security_type_and_gpu_sizes_boot_without_secure_boot(size: str) -> None:
    s = catalog.VM_SIZES[size]
    vm = make_plan(make_spec(resources={"vm_size": size, "region": sorted(s.regions)[0]})).stages[2][0]
    profile = vm.body["properties"].get("securityProfile")
    if not s.trusted_launch:
        # Trusted Launch is not offered on this size: nothing is sent, so Azure creates a Standard VM
        # (no UEFI Secure Boot); "Standard" itself needs the UseStandardSecurityType feature flag.
        assert profile is None and s.is_gpu
        assert "security: Standard" in describe(vm) and "does not support Trusted Launch" in describe(vm)
        return
    _check_security_profile(profile)
    assert profile["securityType"] == "TrustedLaunch" and profile["uefiSettings"]["vTpmEnabled"] is True
    # an unsigned NVIDIA module cannot load under Secure Boot; CPU sizes keep it on
    assert profile["uefiSettings"]["secureBootEnabled"] is (not s.is_gpu)
    line = describe(vm).splitlines()[-1]
    assert line.startswith("security: Trusted Launch, Secure Boot " + ("off" if s.is_gpu else "on"))


def test_an_image_outside_the_catalog_leaves_the_security_type_to_azure_with_a_warning() -> None:
    plan = make_plan(make_spec(resources={"image": "Someone:custom:gpu-image:1.0.0", "disk_gb": 128}))
    assert "securityProfile" not in plan.stages[2][0].body["properties"]
    assert any("unsigned NVIDIA kernel module" in w for w in plan.warnings)
    known_urn = make_plan(make_spec(resources={"image": "microsoft-dsvm:ubuntu-hpc:2204:latest"}))
    assert known_urn.stages[2][0].body["properties"]["securityProfile"]["uefiSettings"]["secureBootEnabled"] is False


def test_the_plan_table_names_a_missing_ssh_rule() -> None:
    nsg = make_plan(make_spec(ssh={"allowed_cidrs": []})).stages[1][1]
    assert describe(nsg).splitlines()[1].startswith("no SSH (port 22) rule")
    open_nsg = make_plan(make_spec(ssh={"allowed_cidrs": ["any"]})).stages[1][1]
    assert "allow Tcp port 22 from Internet" in describe(open_nsg)
    assert "no SSH" not in describe(open_nsg)


def test_the_dry_run_of_an_empty_cidr_list_shows_no_ssh_rule_and_says_so_once() -> None:
    from orchestrator.lifecycle.dryrun import dry_run

    report = dry_run(make_spec(ssh={"allowed_cidrs": []}))
    (nsg,) = [r for r in report.plan.resources if r.type == T_NSG]
    assert "ssh-in" not in {r["name"] for r in nsg.body["properties"]["securityRules"]}
    ssh_warnings = [w for w in report.warnings if "allowed_cidrs" in w]
    assert len(ssh_warnings) == 1 and "a real run would refuse" in ssh_warnings[0]
    assert not any("whole Internet" in w for w in report.warnings)
    open_report = dry_run(make_spec(ssh={"allowed_cidrs": ["any"]}))
    (open_nsg,) = [r for r in open_report.plan.resources if r.type == T_NSG]
    rules = {r["name"]: r["properties"] for r in open_nsg.body["properties"]["securityRules"]}
    assert rules["ssh-in"]["sourceAddressPrefix"] == "Internet"
