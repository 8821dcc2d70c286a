"""Failover: candidates tried in order through the real SDK against the emulator (quota, late
AllocationFailed, capacity per zone), every attempt recorded, nothing left of the failed ones; the
preflight dropping doomed candidates; the all-fail verdict; and a CLI run on the local target that
fails over because ORCH_EMULATOR_CAPACITY says a zone is out of GPUs."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import pytest

from orchestrator.azure.preflight import CandidatesRefused, check_candidates
from orchestrator.azure.provision import Attempt, CandidatesExhausted, Provisioner, ProvisionFailed
from orchestrator.azure.session import AzureSession
from orchestrator.candidates import Candidate
from orchestrator.emulator import Emulator, Fault
from orchestrator.errors import EXIT_AZURE_REFUSED
from orchestrator.plan import ResourcePlan
from tests.conftest import emulator_store, make_plan, make_spec
from tests.test_cli import cli

T4 = "Standard_NC4as_T4_v3"
FAMILY = "standardNCASv3_T4Family"
VM = "Microsoft.Compute/virtualMachines"


def plans_for(nodes: int = 2) -> Any:
    spec = make_spec(nodes=nodes, resources={"region": ["eastus", "westus2", "westus3"], "zone": "any"})

    def plan_for(c: Candidate, group_location: str | None) -> ResourcePlan:
        return make_plan(spec, candidate=c, group_location=group_location)

    return plan_for


def live(emu: Emulator) -> list[dict[str, Any]]:
    return emu.live_resources()


def test_quota_then_late_allocation_failure_then_success(emu: Emulator, session: AzureSession) -> None:
    emu.set_quota("eastus", FAMILY, 0)  # candidate 1: 409 OperationNotAllowed (quota) on the VM PUT
    emu.inject(Fault("AllocationFailed", status=200, method="PUT", resource_type=VM, phase="lro", location="westus2"))
    candidates = [Candidate(T4, r, z, False) for r, z in (("eastus", "1"), ("westus2", "2"), ("westus3", "3"))]
    seen: list[Attempt] = []
    result = Provisioner(session, on_attempt=seen.append).provision_candidates(candidates, plans_for())
    assert [(a.candidate.region, a.code) for a in seen] == [
        ("eastus", "OperationNotAllowed"),
        ("westus2", "AllocationFailed"),
        ("westus3", ""),
    ]
    assert result.attempts == seen and result.candidate == candidates[2]
    vms = [r for r in live(emu) if r["type"] == VM]
    assert len(vms) == 2 and all(r["location"] == "westus3" and r["zones"] == ["3"] for r in vms)
    others = [r for r in live(emu) if r["type"] != "Microsoft.Resources/resourceGroups"]
    assert {r["location"] for r in others} == {"westus3"}, "nothing of the failed attempts is left"
    (group,) = [r for r in live(emu) if r["type"] == "Microsoft.Resources/resourceGroups"]
    assert group["location"] == "eastus"  # kept across attempts: a group's location is fixed
    assert len(result.nodes) == 2 and all(n.public_ip for n in result.nodes)


def test_a_zone_out_of_capacity_fails_late_and_the_next_zone_is_used(emu: Emulator, session: AzureSession) -> None:
    emu.set_capacity(T4, "eastus", "1", vms=0)
    candidates = [Candidate(T4, "eastus", z, False) for z in ("1", "2")]
    result = Provisioner(session).provision_candidates(candidates, plans_for(nodes=1))
    assert [a.code for a in result.attempts] == ["ZonalAllocationFailed", ""]
    (vm,) = [r for r in live(emu) if r["type"] == VM]
    assert vm["zones"] == ["2"]
    # Same region: the VNet and NSG were kept, not made again.
    puts = [r.resource_type for r in emu.requests() if r.method == "PUT"]
    assert puts.count("Microsoft.Network/virtualNetworks") == 1 and puts.count(VM) == 2


def test_capacity_counts_what_exists_and_zoneless_fails_with_allocation_failed(
    emu: Emulator, session: AzureSession
) -> None:
    emu.set_capacity(T4, "eastus", None, vms=1)  # the zoneless pool holds one more
    ok = Provisioner(session).provision(make_plan(make_spec(), run_id="one-aaaaaa"))
    assert ok.attempts[0].ok
    with pytest.raises(ProvisionFailed) as info:
        Provisioner(session).provision(make_plan(make_spec(), run_id="two-bbbbbb"))
    assert info.value.code == "AllocationFailed" and "no capacity" in str(info.value)
    pinned = make_plan(make_spec(resources={"zone": 1}), run_id="three-cccccc")
    assert Provisioner(session).provision(pinned).attempts[0].ok  # zone 1 is a pool of its own


def test_every_candidate_refused_is_azure_refused_with_the_list_and_nothing_left(
    emu: Emulator, session: AzureSession
) -> None:
    emu.set_capacity("*", "eastus", "*", vms=0)
    emu.set_quota("westus2", FAMILY, 0)
    candidates = [Candidate(T4, "eastus", z, False) for z in ("1", "2")] + [Candidate(T4, "westus2", None, False)]
    with pytest.raises(ProvisionFailed) as info:
        Provisioner(session).provision_candidates(candidates, plans_for())
    err = info.value
    assert isinstance(err.cause, CandidatesExhausted) and err.exit_code == EXIT_AZURE_REFUSED
    lines = str(err).splitlines()
    assert lines[0] == "Azure refused every candidate (3 tried):"
    assert lines[1].startswith(f"  1. {T4} in eastus zone 1: ZonalAllocationFailed after")
    assert lines[3].startswith(f"  3. {T4} in westus2: OperationNotAllowed after")
    assert "Everything created for this run has been deleted." in str(err)
    assert live(emu) == []
    assert [a.code for a in err.attempts] == ["ZonalAllocationFailed", "ZonalAllocationFailed", "OperationNotAllowed"]


def test_an_error_that_is_not_about_capacity_stops_at_once(emu: Emulator, session: AzureSession) -> None:
    emu.inject(Fault("InvalidParameter", status=400, method="PUT", resource_type=VM))
    candidates = [Candidate(T4, "eastus", None, False), Candidate(T4, "westus2", None, False)]
    with pytest.raises(ProvisionFailed) as info:
        Provisioner(session).provision_candidates(candidates, plans_for())
    assert len(info.value.attempts) == 1 and live(emu) == []


def test_a_located_fault_fires_only_there(emu: Emulator, session: AzureSession) -> None:
    fault = emu.inject(Fault("SkuNotAvailable", method="PUT", resource_type=VM, location="westus2", count=None))
    Provisioner(session).provision(make_plan(make_spec(), run_id="east-aaaaaa"))
    assert fault.fired == 0
    with pytest.raises(ProvisionFailed, match="SkuNotAvailable"):
        Provisioner(session).provision(make_plan(make_spec(resources={"region": "westus2"}), run_id="west-bbbbbb"))
    assert fault.fired == 1


def test_the_preflight_drops_candidates_it_can_tell_are_doomed(emu: Emulator, session: AzureSession) -> None:
    emu.set_quota("eastus", FAMILY, 0)
    emu.restrict_sku(T4, "westus2", zones=["1"])
    spec = make_spec(resources={"region": ["eastus", "westus2"], "zone": [1, 2]})
    kept, dropped, requests = check_candidates(session, spec, list(spec.resources.candidates.ordered))
    assert [(c.region, c.zone) for c in kept] == [("westus2", "2")]
    reasons = {(c.region, c.zone): why for c, why in dropped}
    assert "QuotaExceeded" in reasons[("eastus", "1")]
    assert (
        "SkuNotAvailable: restricted for this subscription (NotAvailableForSubscription) in zone 1"
        in reasons[("westus2", "1")]
    )
    assert requests == 4  # one usages and one SKUs request per region


def test_check_reports_every_candidate_and_passes_while_one_is_left(emu: Emulator) -> None:
    """`orchestrator check` on a job with candidates asks what `run` asks: the first candidate's
    quota problem is a warning while another candidate is left, and the report lists both."""
    from orchestrator.azure.preflight import preflight_job
    from orchestrator.targets.emulated import emulator_session

    emu.set_quota("eastus", FAMILY, 0)
    spec = make_spec(resources={"region": ["eastus", "westus2"]})
    report = preflight_job(emulator_session(emu, subscription="22222222-2222-2222-2222-222222222222"), spec, print)
    assert report.exit_code == 0 and not report.problems
    (quota,) = [c for c in report.checks if c.name == "quota"]
    assert quota.status == "warning"
    assert quota.message.startswith(f"The first candidate, {T4} in eastus, would be refused; 1 left.")
    assert [(c.region, c.spot) for c in report.candidates] == [("westus2", False)]
    ((dropped, why),) = report.dropped
    assert dropped.region == "eastus" and why.startswith("QuotaExceeded: ")
    out = report.to_json()
    assert out["candidates"] == [{"vm_size": T4, "region": "westus2", "zone": None, "spot": False}]
    assert out["dropped"][0]["region"] == "eastus" and out["dropped"][0]["reason"].startswith("QuotaExceeded")
    emu.set_quota("westus2", FAMILY, 0)
    refused = preflight_job(emulator_session(emu, subscription="22222222-2222-2222-2222-222222222222"), spec, print)
    assert refused.exit_code == EXIT_AZURE_REFUSED and refused.candidates == [] and len(refused.dropped) == 2


def test_lifecycle_records_attempts_and_fails_with_the_preflight_list(tmp_path: Path, emu: Emulator) -> None:
    from orchestrator.azure.preflight import preflight

    class Say:
        lines: list[str] = []

        def say(self, text: str) -> None:
            self.lines.append(text)

    emu.set_quota("*", FAMILY, 0)
    spec = make_spec(resources={"region": ["eastus", "westus2"]})
    from orchestrator.targets.emulated import emulator_session

    with pytest.raises(CandidatesRefused) as info:
        preflight(spec, emulator_session(emu, subscription="22222222-2222-2222-2222-222222222222"), None, Say())
    text = str(info.value)
    assert text.startswith("Azure would refuse every candidate (2), says the preflight:")
    assert f"1. {T4} in eastus: QuotaExceeded" in text and f"2. {T4} in westus2: QuotaExceeded" in text
    assert info.value.exit_code == EXIT_AZURE_REFUSED


def test_cli_run_fails_over_when_a_zone_is_out_of_gpus(tmp_path: Path) -> None:
    job = tmp_path / "job" / "job.yaml"
    job.parent.mkdir()
    (job.parent / "train.py").write_text("print('trained')\n")
    job.write_text("name: failover\nresources:\n  region: eastus\n  zone: any\nrun: python3 train.py\n")
    state = tmp_path / "state"
    capacity = json.dumps([{"size": T4, "region": "eastus", "zone": "1", "vms": 0}])
    r = cli(
        "--target",
        "local",
        "--state-dir",
        str(state),
        "--json",
        "run",
        str(job),
        env={"ORCH_EMULATOR_CAPACITY": capacity},
    )
    assert r.returncode == 0, r.stderr + r.stdout
    result = json.loads(r.stdout.splitlines()[-1])
    assert result["event"] == "result" and result["verdict"] == "succeeded"
    assert [(a["zone"], a["code"]) for a in result["attempts"]] == [("1", "ZonalAllocationFailed"), ("2", None)]
    assert "trained" in r.stdout
    status = cli("--target", "local", "--state-dir", str(state), "--json", "status", result["run_id"])
    assert [a["code"] for a in json.loads(status.stdout)["attempts"]] == ["ZonalAllocationFailed", None]
    listed = json.loads(cli("--state-dir", str(state), "--json", "ls").stdout)
    assert [a["zone"] for a in listed["runs"][0]["attempts"]] == ["1", "2"]
    text = cli("--target", "local", "--state-dir", str(state), "status", result["run_id"]).stdout
    assert f"1. {T4} in eastus zone 1: ZonalAllocationFailed after" in text
    assert emulator_store(state)["resources"] == {}
