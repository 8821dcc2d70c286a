"""`orchestrator cost` and the running cost in `status`: VM-hours from the recorded phases, priced
as the run's estimate is."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import pytest

from orchestrator import catalog
from orchestrator.commands import cost as cost_cmd
from orchestrator.state import Phase, RunRecord, open_store

REPO = Path(__file__).resolve().parents[1]
SMOKE = REPO / "jobs" / "smoke" / "job.yaml"
T0 = 1_790_000_000.0


from tests.test_cli import cli  # noqa: E402


def record(**fields: Any) -> RunRecord:
    base: dict[str, Any] = {
        "run_id": "demo-abc123",
        "job": "demo",
        "source": "job.yaml",
        "target": "azure",
        "subscription": "s",
        "resource_group": "orch-demo-abc123",
        "state": "gone",
        "phase_started": T0,
        "created": T0,
        "updated": T0 + 7200,
        "pid": None,
        "exit_code": 0,
        "error": None,
        "artifacts": None,
        "metrics": {},
        "torn_down": True,
        "verdict": "succeeded",
        "detail": {},
        "owner_host": None,
        "owner_started": None,
        "heartbeat": None,
        "env": {},
    }
    base.update(fields)
    return RunRecord(**base)


def test_a_run_is_billed_from_provision_to_the_end_of_teardown() -> None:
    phases = [
        Phase("check", None, T0, T0 + 5),
        Phase("provision", None, T0 + 5, T0 + 125),
        Phase("train", 0, T0 + 200, T0 + 3000),
        Phase("teardown", None, T0 + 3000, T0 + 3605),
    ]
    start, end, hours = cost_cmd.billed_interval(record(), phases, gone_at=None, now=T0 + 99999)
    assert (start, end) == (T0 + 5, T0 + 3605) and hours == pytest.approx(1.0)


def test_a_kept_run_is_billed_until_now_and_until_down_once_it_is_gone() -> None:
    phases = [Phase("provision", None, T0, T0 + 60), Phase("train", 0, T0 + 60, T0 + 600)]
    kept = record(state="kept", torn_down=False)
    assert cost_cmd.billed_interval(kept, phases, None, now=T0 + 1800) == (T0, None, 0.5)
    # `down` from another process records no teardown phase: the moment the run went `gone` ends it.
    assert cost_cmd.billed_interval(record(), phases, gone_at=T0 + 5400, now=T0 + 99999) == (T0, T0 + 5400, 1.5)
    # A failed teardown, then a later `down`: the later of the two.
    failed = [*phases, Phase("teardown", None, T0 + 600, T0 + 700)]
    assert cost_cmd.billed_interval(record(), failed, gone_at=T0 + 3600, now=T0 + 99999)[2] == 1.0


def test_a_run_refused_before_provisioning_cost_nothing() -> None:
    r = record(state="gone", verdict="bad-input")
    assert cost_cmd.billed_interval(r, [Phase("check", None, T0, T0 + 1)], None, now=T0 + 10) == (None, None, 0.0)


def test_since_periods() -> None:
    now = T0
    assert cost_cmd.parse_since("7d", now) == now - 7 * 86400
    assert cost_cmd.parse_since("12h", now) == now - 12 * 3600
    assert cost_cmd.parse_since("2w", now) == now - 14 * 86400
    assert cost_cmd.parse_since("all", now) is None
    assert cost_cmd.parse_since("2026-03-01", now) == 1772323200.0
    with pytest.raises(Exception, match="is not a period"):
        cost_cmd.parse_since("yesterday", now)


def test_cost_of_local_runs_status_and_down(tmp_path: Path) -> None:
    state = tmp_path / "state"
    local = ["--target", "local", "--state-dir", str(state)]
    env = {"XDG_CACHE_HOME": str(tmp_path / "cache")}
    r = cli(*local, "--json", "provision", str(SMOKE), "--nodes", "2", env=env)
    assert r.returncode == 0, r.stderr
    kept_id = json.loads(r.stdout.splitlines()[-1])["run_id"]
    ran = cli(*local, "run", str(SMOKE), env=env)
    assert ran.returncode in (0, 1), ran.stderr  # its verdict does not matter here: its cost does
    ran_id = json.loads(cli(*local, "--json", "ls").stdout)["runs"][0]["run_id"]

    doc = json.loads(cli(*local, "--json", "cost", env=env).stdout)
    assert doc["schema"] == 1
    by_id = {c["run_id"]: c for c in doc["runs"]}
    assert set(by_id) == {kept_id, ran_id}
    per_node = catalog.node_usd_per_hour(catalog.VM_SIZES["Standard_NC4as_T4_v3"], "eastus", False, 64)
    kept = by_id[kept_id]
    assert kept["holds_resources"] and kept["ended"] is None and kept["nodes"] == 2
    assert kept["node_usd_per_hour"] == pytest.approx(per_node, abs=1e-6)
    assert kept["usd"] == pytest.approx(kept["vm_hours"] * per_node, rel=1e-3)
    assert kept["usd_per_hour_now"] == pytest.approx(2 * per_node, abs=1e-5)
    assert kept["billed"] is False and kept["size"] == "Standard_NC4as_T4_v3" and kept["region"] == "eastus"
    done = by_id[ran_id]
    assert not done["holds_resources"] and done["nodes"] == 1 and done["ended"] > done["started"]
    assert 0 < done["hours"] < 120 / 3600  # a smoke run on the local target: seconds
    assert doc["holding"] == {"runs": [kept_id], "usd_per_hour": pytest.approx(2 * per_node, abs=1e-5)}
    assert doc["total_usd"] == pytest.approx(kept["usd"] + done["usd"], abs=1e-5) and doc["billed_usd"] == 0

    text = cli(*local, "cost", env=env).stdout
    assert f"{kept_id} " in text and f"{ran_id} " in text and "kept *" in text
    assert "on the local target (emulated: nothing billed)" in text and f"{kept_id} ($" in text
    assert "at the price recorded when its VMs were made" in text and "today's list price" not in text
    assert kept["price_recorded"] is True and done["price_recorded"] is True

    status = cli(*local, "status", env=env).stdout
    assert "Running cost: $" in status and "/h now" in status

    one = json.loads(cli(*local, "--json", "cost", kept_id, env=env).stdout)
    assert [c["run_id"] for c in one["runs"]] == [kept_id]
    assert cli(*local, "down", kept_id).returncode == 0
    gone = json.loads(cli(*local, "--json", "cost", kept_id, env=env).stdout)["runs"][0]
    assert not gone["holds_resources"] and gone["ended"] is not None and gone["usd_per_hour_now"] == 0
    assert gone["vm_hours"] >= kept["vm_hours"]
    assert "Nothing holds resources now." in cli(*local, "cost", env=env).stdout
    assert json.loads(cli(*local, "--json", "cost", "--since", "all", env=env).stdout)["holding"]["runs"] == []

    r = cli(*local, "cost", kept_id[:-1])
    assert r.returncode == 2 and f"Did you mean {kept_id}" in r.stderr  # the closest first
    r = cli(*local, "--json", "cost", "--since", "soon")
    assert r.returncode == 2 and "is not a period" in json.loads(r.stdout)["message"]


def test_a_run_is_priced_as_recorded_and_an_older_one_from_its_job_file(tmp_path: Path) -> None:
    """The price is the one recorded when the VMs were made: it survives the job file. A run
    recorded before prices were (store schema < 4) is priced from its job file, and says so when
    that file is gone."""
    job = tmp_path / "job" / "job.yaml"
    job.parent.mkdir()
    job.write_text((SMOKE.parent / "job.yaml").read_text())
    for f in SMOKE.parent.iterdir():
        if f.name != "job.yaml" and f.is_file():
            (job.parent / f.name).write_bytes(f.read_bytes())
    local = ["--target", "local", "--state-dir", str(tmp_path / "state")]
    r = cli(*local, "--json", "provision", str(job))
    assert r.returncode == 0, r.stderr
    run_id = json.loads(r.stdout.splitlines()[-1])["run_id"]
    per_node = catalog.node_usd_per_hour(catalog.VM_SIZES["Standard_NC4as_T4_v3"], "eastus", False, 64)
    try:
        job.unlink()
        c = json.loads(cli(*local, "--json", "cost").stdout)["runs"][0]
        assert c["price_recorded"] is True and c["node_usd_per_hour"] == pytest.approx(per_node, abs=1e-6)
        assert c["usd"] is not None and c["price_problem"] is None
        open_store(tmp_path / "state").update(run_id, price_per_hour=None)  # as a v3 store left it
        c = json.loads(cli(*local, "--json", "cost").stdout)["runs"][0]
        assert c["usd"] is None and "cannot be read now" in c["price_problem"] and c["nodes"] == 1
        text = cli(*local, "cost").stdout
        assert f"{run_id}: no price: job file {job} cannot be read now" in text
        assert f"Recorded before prices were ({run_id})" in text
    finally:
        cli(*local, "down", run_id)
