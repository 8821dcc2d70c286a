"""Candidates: job.yaml's accelerators, vm_size/region/zone lists, `any`, spot prefer and order, their
file:line errors, the order a run tries them, what is dropped and why, and the dry-run's table."""

from __future__ import annotations

import json
from collections.abc import Callable
from pathlib import Path

import pytest

from orchestrator import candidates, catalog
from orchestrator.candidates import Candidate
from orchestrator.lifecycle.dryrun import dry_run
from orchestrator.spec import Overrides, SpecError, load_spec
from tests.conftest import make_plan, make_spec

T4 = "Standard_NC4as_T4_v3"
T4_8 = "Standard_NC8as_T4_v3"
A100 = "Standard_NC24ads_A100_v4"


def load(job_dir: Callable[[str], Path], resources: str, overrides: Overrides | None = None):  # type: ignore[no-untyped-def]
    return load_spec(job_dir("name: demo\nrun: x\nresources:\n" + resources), overrides)


def error_of(job_dir: Callable[[str], Path], resources: str, overrides: Overrides | None = None) -> str:
    with pytest.raises(SpecError) as e:
        load(job_dir, resources, overrides)
    return str(e.value)


def test_todays_single_value_form_is_one_candidate(job_dir: Callable[[str], Path]) -> None:
    spec = load(job_dir, f"  vm_size: {T4_8}\n  region: westeurope\n  zone: 2\n  spot: true\n")
    assert spec.resources.candidates.ordered == (Candidate(T4_8, "westeurope", "2", True),)
    assert (spec.resources.vm_size, spec.resources.region, spec.resources.zone, spec.resources.spot) == (
        T4_8,
        "westeurope",
        "2",
        True,
    )
    assert spec.max_restarts == 3  # spot: the default recovery
    default = load_spec(job_dir("name: demo\nrun: x\n"))
    assert default.resources.candidates.ordered == (Candidate(T4, "eastus", None, False),)
    assert default.max_restarts == 0


def test_lists_any_prefer_and_recovery_parse(job_dir: Callable[[str], Path]) -> None:
    spec = load(
        job_dir,
        f"  vm_size: [{T4}, {T4_8}]\n  region: [eastus, westus2]\n  zone: [1, 3]\n  spot: prefer\n  order: listed\n",
    )
    got = spec.resources.candidates.ordered
    assert len(got) == 2 * 2 * 2 * 2
    assert got[:4] == (
        Candidate(T4, "eastus", "1", True),
        Candidate(T4, "eastus", "1", False),
        Candidate(T4, "eastus", "3", True),
        Candidate(T4, "eastus", "3", False),
    )
    assert got[4].region == "westus2" and got[8].size == T4_8
    assert spec.max_restarts == 3
    spec = load_spec(job_dir(f"name: demo\nrun: x\nresources:\n  vm_size: {T4}\nrecovery: {{max_restarts: 5}}\n"))
    assert spec.max_restarts == 5


def test_zone_any_tries_each_zone_then_the_next_region_and_zoneless_where_there_are_no_zones(
    job_dir: Callable[[str], Path],
) -> None:
    spec = load(job_dir, f"  vm_size: {T4}\n  region: [eastus, northcentralus, westus2]\n  zone: any\n")
    where = [(c.region, c.zone) for c in spec.resources.candidates.ordered]
    assert where == [
        ("eastus", "1"),
        ("eastus", "2"),
        ("eastus", "3"),
        ("northcentralus", None),  # no zones there: one zoneless attempt
        ("westus2", "1"),
        ("westus2", "2"),
        ("westus2", "3"),
    ]


def test_region_any_is_every_catalog_region_offering_the_size(job_dir: Callable[[str], Path]) -> None:
    spec = load(job_dir, "  vm_size: Standard_ND96isr_H100_v5\n  region: any\n")
    regions = {c.region for c in spec.resources.candidates.ordered}
    assert regions == set(catalog.VM_SIZES["Standard_ND96isr_H100_v5"].regions)
    assert not spec.resources.candidates.dropped  # `any` never names a region that does not offer it


def test_cheapest_orders_by_the_runs_price_and_ties_keep_the_written_order(job_dir: Callable[[str], Path]) -> None:
    spec = load(job_dir, f"  vm_size: [{A100}, {T4}]\n  region: [southcentralus, eastus]\n  spot: prefer\n")
    ordered = spec.resources.candidates.ordered
    prices = [c.usd_per_hour(1, 128) for c in ordered]
    assert prices == sorted(prices)
    assert ordered[0] == Candidate(T4, "eastus", None, True)  # southcentralus costs more (factor 1.2)
    assert ordered[-1] == Candidate(A100, "southcentralus", None, False)
    # Equal prices keep the written order: eastus before westus2 and eastus2 (all 0.526 for a T4).
    tie = load(job_dir, f"  vm_size: {T4}\n  region: [westus2, eastus, eastus2]\n").resources.candidates.ordered
    assert [c.region for c in tie] == ["westus2", "eastus", "eastus2"]


def test_listed_keeps_sizes_then_regions_then_zones_with_spot_first(job_dir: Callable[[str], Path]) -> None:
    spec = load(job_dir, f"  vm_size: [{A100}, {T4}]\n  region: [southcentralus, eastus]\n  order: listed\n")
    assert [(c.size, c.region) for c in spec.resources.candidates.ordered] == [
        (A100, "southcentralus"),
        (A100, "eastus"),
        (T4, "southcentralus"),
        (T4, "eastus"),
    ]


def test_accelerators_pick_every_size_with_that_many_gpus_cheapest_first(job_dir: Callable[[str], Path]) -> None:
    spec = load(job_dir, "  accelerators: {T4: 1}\n  order: listed\n")
    sizes = [c.size for c in spec.resources.candidates.ordered]
    assert sizes == [s.name for s in catalog.sizes_for("T4", 1)]
    # With vm_size too, both must hold: the D-series size carries no T4 and is dropped, saying so.
    both = load(job_dir, f"  accelerators: {{T4: 1}}\n  vm_size: [Standard_D4s_v5, {T4_8}]\n")
    assert [c.size for c in both.resources.candidates.ordered] == [T4_8]
    (dropped,) = both.resources.candidates.dropped
    assert dropped.size == "Standard_D4s_v5" and "carries no GPU" in dropped.reason and dropped.field == "vm_size"
    # A100 means either memory size; an A10 size is refused (GRID driver) and dropped with that reason.
    a100 = {c.size for c in load(job_dir, "  accelerators: {A100: 1}\n").resources.candidates.ordered}
    assert a100 == {s.name for s in catalog.sizes_for("A100", 1)}
    mixed = load(job_dir, "  accelerators: {A10: 1, T4: 1}\n").resources.candidates
    assert {c.size for c in mixed.ordered} == {s.name for s in catalog.sizes_for("T4", 1)}
    assert any("GRID driver" in d.reason for d in mixed.dropped)


def test_retired_refused_and_unoffered_are_dropped_with_the_reason(job_dir: Callable[[str], Path]) -> None:
    spec = load(
        job_dir,
        f"  vm_size: [Standard_NC6s_v3, Standard_ND96isr_H100_v5, {A100}]\n  region: [japaneast, uksouth]\n",
    )
    found = spec.resources.candidates
    assert [c.label() for c in found.ordered] == [f"{A100} in japaneast"]
    reasons = {(d.size, d.region): d.reason for d in found.dropped}
    assert "retired by Azure on 2025-09-30" in reasons[("Standard_NC6s_v3", None)]
    assert "not offered in japaneast" in reasons[("Standard_ND96isr_H100_v5", "japaneast")]
    assert "not offered in uksouth" in reasons[(A100, "uksouth")]


@pytest.mark.parametrize(
    ("resources", "where", "says"),
    [
        ("  zone: [1,\n    4]\n", "job.yaml:5", "resources.zone[1]: zone must be 1, 2 or 3"),
        ("  region:\n    - eastus\n    - marscentral\n", "job.yaml:6", "resources.region[1]: unknown region"),
        ("  region: [eastus, any]\n", "job.yaml:4", "`any` stands alone"),
        ("  spot: sometimes\n", "job.yaml:4", "spot must be true, false or prefer"),
        ("  order: random\n", "job.yaml:4", "resources.order"),
        ("  accelerators: {V200: 1}\n", "job.yaml:4", "unknown accelerator 'V200'"),
        ("  accelerators: {T4: 0}\n", "job.yaml:4", "between 1 and 16"),
        ("  vm_size: []\n", "job.yaml:4", "resources.vm_size"),
        (f"  vm_size: [{T4}, Standard_NC4as_T4]\n", "job.yaml:4", "resources.vm_size[1]: unknown VM size"),
        ("  accelerators: {T4: 2}\n", "job.yaml:3", "no size in the catalog has exactly 2 x T4 per VM"),
    ],
)
def test_bad_candidate_fields_name_file_line(
    job_dir: Callable[[str], Path], resources: str, where: str, says: str
) -> None:
    message = error_of(job_dir, resources)
    assert f"{where}: " in message and says in message, message


def test_a_job_no_candidate_can_satisfy_lists_each_dropped_one(job_dir: Callable[[str], Path]) -> None:
    resources = "  vm_size: [Standard_B2s, Standard_ND96isr_H100_v5]\n  region: [uksouth]\n  spot: true\n"
    message = error_of(job_dir, resources)
    assert "job.yaml:3: resources: no candidate can run this job (2 dropped):" in message
    assert "Standard_B2s in uksouth (spot): Standard_B2s cannot run as a Spot VM" in message
    assert "not offered in uksouth" in message and "[resources.region]" in message


def test_flags_repeat_and_prefer_spot(job_dir: Callable[[str], Path]) -> None:
    path = job_dir("name: demo\nrun: x\nresources:\n  accelerators: {A100: 1}\n")
    spec = load_spec(path, Overrides(region=("eastus", "westus2"), vm_size=(T4, T4_8), spot="prefer"))
    res = spec.resources
    assert res.accelerators is None  # --vm-size replaces the file's GPU choice
    assert {(c.size, c.region, c.spot) for c in res.candidates.ordered} == {
        (s, r, p) for s in (T4, T4_8) for r in ("eastus", "westus2") for p in (True, False)
    }
    with pytest.raises(SpecError, match=r"^--region: resources.region\[1\]: unknown region 'mars'"):
        load_spec(path, Overrides(region=("eastus", "mars")))


def test_a_plan_for_a_candidate_puts_every_node_there() -> None:
    spec = make_spec(nodes=2, resources={"vm_size": [T4, T4_8], "region": ["eastus", "westus2"], "zone": "any"})
    plan = make_plan(spec, candidate=Candidate(T4_8, "westus2", "3", True), group_location="eastus")
    vms = [r for r in plan.resources if r.short_type == "virtualMachines"]
    assert {r.body["location"] for r in vms} == {"westus2"} and plan.region == "westus2"
    assert all(r.body["zones"] == ["3"] for r in vms)
    assert all(r.body["properties"]["hardwareProfile"]["vmSize"] == T4_8 for r in vms)
    assert all(r.body["properties"]["priority"] == "Spot" for r in vms)
    assert plan.resources[0].body["location"] == "eastus"  # the group stays where it was made
    assert plan.hourly_usd == pytest.approx(Candidate(T4_8, "westus2", "3", True).usd_per_hour(2, 128))


def test_dry_run_json_and_table_show_candidates_prices_and_drops(capsys: pytest.CaptureFixture[str]) -> None:
    from orchestrator.ui import print_plan

    spec = make_spec(
        resources={"vm_size": [A100, "Standard_NC6s_v3"], "region": ["eastus", "uksouth"], "spot": "prefer"},
    )
    report = dry_run(spec, run_id="demo-abc123")
    doc = report.to_json()
    rows = doc["candidates"]
    tried = [r for r in rows if r["status"] == "candidate"]
    assert [(r["order"], r["region"], r["spot"]) for r in tried] == [(1, "eastus", True), (2, "eastus", False)]
    assert tried[0]["usd_per_hour"] == pytest.approx(Candidate(A100, "eastus", None, True).usd_per_hour(1, 128), 1e-3)
    assert all(r["quota"] == "not checked" for r in tried)
    dropped = {(r["vm_size"], r["region"]): r for r in rows if r["status"] == "dropped"}
    assert "retired" in dropped[("Standard_NC6s_v3", None)]["reason"]
    assert "not offered in uksouth" in dropped[(A100, "uksouth")]["reason"]
    assert doc["candidate_order"] == "cheapest"
    json.dumps(doc)  # serialisable
    print_plan(report)
    out = capsys.readouterr().out
    assert "Candidates (2, cheapest first)" in out and "not checked" in out
    assert "Dropped (2):" in out and "Standard_NC6s_v3: Standard_NC6s_v3 was retired" in out


def test_expand_is_pure_and_orders_the_same_every_time() -> None:
    a = candidates.expand(sizes=[T4, T4_8], regions=["any"], zones=["any"], spot="prefer")
    b = candidates.expand(sizes=[T4, T4_8], regions=["any"], zones=["any"], spot="prefer")
    assert a == b and a.ordered[0].spot
