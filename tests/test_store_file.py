"""The local target's emulator store on disk: one file per resource group, so a run's requests read
and write its own group, whatever the other runs hold (issue 13: fifty runs in one state directory)."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from orchestrator.clock import SystemClock
from orchestrator.emulator import Emulator
from orchestrator.emulator.persist import StoreFile
from orchestrator.emulator.store import HOST
from tests.conftest import SUB, emulator_store, make_plan
from tests.test_emulator import call


def _emulator(state: Path) -> Emulator:
    return Emulator("instant", clock=SystemClock(), backing=StoreFile(state / "emulator" / "store.json"))


def _put_network(emu: Emulator, run_id: str) -> str:
    """A run's group, VNet and NSG, as the provisioner makes them; the group's URL."""
    plan = make_plan(run_id=run_id)
    group = f"{HOST}/subscriptions/{SUB}/resourcegroups/{plan.resource_group}"
    assert call(emu, "PUT", group, {"location": "eastus", "tags": plan.tags}).status == 201
    net = f"{HOST}/subscriptions/{SUB}/resourceGroups/{plan.resource_group}/providers/Microsoft.Network"
    _, vnet, nsg = plan.resources[:3]
    assert call(emu, "PUT", f"{net}/virtualNetworks/{vnet.name}", vnet.body).status == 201
    assert call(emu, "PUT", f"{net}/networkSecurityGroups/{nsg.name}", nsg.body).status == 201
    return group


def _group_files(state: Path) -> dict[str, Path]:
    return {p.stem: p for p in (state / "emulator" / "store" / "groups").glob("*/*.json")}


def test_each_group_is_its_own_file_and_a_request_touches_only_its_own(tmp_path: Path) -> None:
    emu = _emulator(tmp_path)
    first = _put_network(emu, "one-aaaaaa")
    _put_network(emu, "two-bbbbbb")
    files = _group_files(tmp_path)
    assert sorted(files) == ["orch-one-aaaaaa", "orch-two-bbbbbb"]
    other = files["orch-two-bbbbbb"]
    kept = other.read_text()
    other.write_text("not JSON")  # a request for the first group that read the second would fail
    got = call(emu, "GET", f"{first}/resources")
    assert got.status == 200
    assert sorted(r["name"] for r in got.json()["value"]) == ["one-aaaaaa-nsg", "one-aaaaaa-vnet"]
    tag = {"location": "eastus", "tags": {**make_plan(run_id="one-aaaaaa").tags, "note": "x"}}
    assert call(emu, "PUT", first, tag).status == 200
    assert other.read_text() == "not JSON", "the other run's group was written"
    other.write_text(kept)

    # Another process (a second emulator on the same files) sees both groups, and a list of the
    # subscription's groups reads every file.
    again = _emulator(tmp_path)
    listed = call(again, "GET", f"{HOST}/subscriptions/{SUB}/resourcegroups").json()["value"]
    assert sorted(g["name"] for g in listed) == ["orch-one-aaaaaa", "orch-two-bbbbbb"]


def test_a_deleted_group_takes_its_file_with_it(tmp_path: Path) -> None:
    emu = _emulator(tmp_path)
    first = _put_network(emu, "one-aaaaaa")
    _put_network(emu, "two-bbbbbb")
    assert call(emu, "DELETE", first).status == 202
    call(emu, "GET", f"{HOST}/subscriptions/{SUB}/resourcegroups")  # the instant profile: settled now
    assert sorted(_group_files(tmp_path)) == ["orch-two-bbbbbb"]
    store = emulator_store(tmp_path)
    assert [g["name"] for g in store["groups"].values()] == ["orch-two-bbbbbb"]
    assert all("/resourcegroups/orch-two-bbbbbb/" in key for key in store["resources"])


def test_a_store_kept_in_one_file_by_an_older_version_is_split_and_kept(tmp_path: Path) -> None:
    emu = _emulator(tmp_path / "new")
    _put_network(emu, "one-aaaaaa")
    _put_network(emu, "two-bbbbbb")
    whole = emulator_store(tmp_path / "new")
    legacy = tmp_path / "old" / "emulator" / "store.json"
    legacy.parent.mkdir(parents=True)
    legacy.write_text(json.dumps(whole))

    assert emulator_store(tmp_path / "old") == whole
    assert not legacy.exists()
    assert sorted(_group_files(tmp_path / "old")) == ["orch-one-aaaaaa", "orch-two-bbbbbb"]
    upgraded = _emulator(tmp_path / "old")
    assert sorted(r["name"] for r in upgraded.live_resources()) == [
        "one-aaaaaa-nsg",
        "one-aaaaaa-vnet",
        "orch-one-aaaaaa",
        "orch-two-bbbbbb",
        "two-bbbbbb-nsg",
        "two-bbbbbb-vnet",
    ]


def test_every_vnet_gives_its_first_nic_the_subnets_first_address(tmp_path: Path) -> None:
    """As on Azure, a private address is taken per subnet: two runs' VNets each start at .4."""
    emu = _emulator(tmp_path)
    addresses = []
    for run_id in ("one-aaaaaa", "two-bbbbbb"):
        _put_network(emu, run_id)
        plan = make_plan(run_id=run_id)
        vm = next(r for r in plan.resources if r.type == "Microsoft.Compute/virtualMachines")
        base = f"{HOST}/subscriptions/{SUB}/resourceGroups/{plan.resource_group}/providers"
        assert call(emu, "PUT", f"{base}/Microsoft.Compute/virtualMachines/{vm.name}", vm.body).status == 201
        nic = call(emu, "GET", f"{base}/Microsoft.Network/networkInterfaces/{vm.name}-nic").json()
        addresses.append(nic["properties"]["ipConfigurations"][0]["properties"]["privateIPAddress"])
    assert addresses[0] == addresses[1] and addresses[0].endswith(".4"), addresses


def test_a_group_file_that_does_not_parse_fails_requests_and_is_kept(tmp_path: Path) -> None:
    emu = _emulator(tmp_path)
    first = _put_network(emu, "one-aaaaaa")
    broken = _group_files(tmp_path)["orch-one-aaaaaa"]
    broken.write_text('{"groups": ')  # a disk that filled up, a hand edit
    with pytest.raises(ValueError):
        call(emu, "GET", f"{first}/resources")
    assert broken.read_text() == '{"groups": ', "what could not be read is never taken for an emptied group"
