"""The auto-shutdown schedule: a DevTestLab daily HH:MM that fires at the first HH:MM after it is enabled.

A schedule created enabled at the start of a run fires within 24 h, so a run of 23 h or more gets it
disabled and enabled on its last day (orchestrator/azure/schedules.py)."""

from __future__ import annotations

import json
from datetime import UTC, datetime, timedelta
from typing import Any

import pytest

from orchestrator.azure.provision import Provisioner
from orchestrator.azure.schedules import (
    TooEarlyOrLate,
    enable_shutdown_schedules,
    enable_shutdown_schedules_by_id,
)
from orchestrator.clock import VirtualClock
from orchestrator.emulator import Emulator
from orchestrator.emulator.openapi import SPEC_ROOT
from orchestrator.plan import EXPIRY_GRACE, ResourcePlan
from orchestrator.spec import parse_duration
from orchestrator.targets.emulated import emulator_session
from tests.conftest import SUB, make_plan, make_spec

DTL = SPEC_ROOT / "devtestlabs/resource-manager/Microsoft.DevTestLab/stable/2018-09-15/DTL.json"


def plan_at(start: datetime, max_duration: str, nodes: int = 1) -> ResourcePlan:
    from orchestrator.plan import build_plan
    from tests.conftest import KEY

    spec = make_spec(max_duration=max_duration, nodes=nodes)
    return build_plan(spec, "demo-abc123", subscription_id=SUB, owner="tester", now=start, ssh_public_key=KEY)


def props(plan: ResourcePlan, i: int = 0) -> dict[str, Any]:
    return dict(plan.schedules[i].body["properties"])


def next_firing(hhmm: str, after: datetime) -> datetime:
    """When a daily UTC schedule at `hhmm`, enabled at `after`, first fires (as DevTestLab runs it)."""
    at = after.replace(hour=int(hhmm[:2]), minute=int(hhmm[2:]), second=0, microsecond=0)
    return at if at > after else at + timedelta(days=1)


def test_across_midnight_the_schedule_is_enabled_at_the_next_days_time() -> None:
    start = datetime(2026, 3, 1, 23, 50, tzinfo=UTC)
    plan = plan_at(start, "1h", nodes=2)
    for i in range(2):
        p = props(plan, i)
        assert p["dailyRecurrence"] == {"time": "0120"}  # 23:50 + 1 h + 30 min grace
        assert p["status"] == "Enabled" and p["timeZoneId"] == "UTC"
    assert plan.schedule_enable_at is None and all(n.schedule_enable_at is None for n in plan.nodes)
    assert plan.shutdown_at == datetime(2026, 3, 2, 1, 20, tzinfo=UTC)
    assert next_firing("0120", start) == plan.shutdown_at
    assert not any("auto-shutdown" in w for w in plan.warnings)


def test_23h45m_is_created_disabled_and_enabled_on_the_last_day() -> None:
    """The bug: planned at 09:18, time 0933 enabled at once would deallocate the VM 15 minutes in."""
    start = datetime(2026, 3, 1, 9, 18, tzinfo=UTC)
    plan = plan_at(start, "23h45m")
    p = props(plan)
    assert p["dailyRecurrence"] == {"time": "0933"}
    assert p["status"] == "Disabled"
    assert next_firing("0933", start) == datetime(2026, 3, 1, 9, 33, tzinfo=UTC)  # what Enabled would do
    assert plan.shutdown_at == datetime(2026, 3, 2, 9, 33, tzinfo=UTC)
    assert plan.schedule_enable_at == datetime(2026, 3, 1, 10, 33, tzinfo=UTC)  # an hour after 09:33
    assert plan.nodes[0].schedule_enable_at == plan.schedule_enable_at
    assert next_firing("0933", plan.schedule_enable_at) == plan.shutdown_at
    (warning,) = [w for w in plan.warnings if "auto-shutdown" in w]
    assert "created disabled" in warning and "2026-03-01 10:33 UTC" in warning and "2026-03-02 09:33 UTC" in warning
    assert "watchdog" in warning and "not the compute bill" in warning


def test_seven_days_is_created_disabled_and_enabled_23_hours_before_the_expiry() -> None:
    start = datetime(2026, 3, 1, 12, 0, tzinfo=UTC)
    plan = plan_at(start, "7d")
    p = props(plan)
    assert p["dailyRecurrence"] == {"time": "1230"} and p["status"] == "Disabled"
    assert plan.shutdown_at == datetime(2026, 3, 8, 12, 30, tzinfo=UTC)
    assert plan.schedule_enable_at == datetime(2026, 3, 7, 13, 30, tzinfo=UTC)
    assert next_firing("1230", plan.schedule_enable_at) == plan.shutdown_at
    # however late on the last day it is enabled, it still fires at the expiry
    assert next_firing("1230", plan.shutdown_at - timedelta(minutes=1)) == plan.shutdown_at


@pytest.mark.parametrize(("duration", "status"), [("22h59m", "Enabled"), ("23h", "Disabled")])
def test_the_threshold_is_23_hours(duration: str, status: str) -> None:
    assert props(plan_at(datetime(2026, 3, 1, 0, 0, tzinfo=UTC), duration))["status"] == status


@pytest.mark.parametrize("minutes", [1, 59, 60 * 12, 60 * 22 + 59, 60 * 23, 60 * 23 + 45, 60 * 24, 60 * 24 * 7])
@pytest.mark.parametrize("start_minute", [0, 17 * 60 + 31, 23 * 60 + 50])
def test_every_schedule_first_fires_at_the_expiry(minutes: int, start_minute: int) -> None:
    """Creation up to 20 minutes after planning (VM creation, retries) changes nothing."""
    start = datetime(2026, 3, 1, tzinfo=UTC) + timedelta(minutes=start_minute, seconds=42)
    plan = plan_at(start, f"{minutes}m")
    p = props(plan)
    expiry = (start + timedelta(minutes=minutes) + EXPIRY_GRACE).replace(second=0)
    assert plan.shutdown_at == expiry
    for created in (start, start + timedelta(minutes=20)):
        enabled_at = created if p["status"] == "Enabled" else plan.schedule_enable_at
        assert enabled_at is not None
        assert next_firing(p["dailyRecurrence"]["time"], max(created, enabled_at)) == expiry


def test_the_schedule_body_matches_devtestlab_2018_09_15() -> None:
    defs = json.loads(DTL.read_text())["definitions"]
    schedule, sprops = defs["Schedule"], defs["ScheduleProperties"]
    status_enum = set(defs["EnableStatus"]["enum"])
    for duration in ("2h", "7d"):
        body = plan_at(datetime(2026, 3, 1, tzinfo=UTC), duration).schedules[0].body
        assert set(body) <= set(schedule["properties"]) and set(schedule["required"]) <= set(body)
        p = body["properties"]
        writable = {k for k, v in sprops["properties"].items() if not v.get("readOnly")}
        assert set(p) <= writable, set(p) - writable
        assert p["status"] in status_enum and p["notificationSettings"]["status"] in status_enum
        assert set(p["dailyRecurrence"]) <= set(defs["DayDetails"]["properties"])
        assert set(p["notificationSettings"]) <= set(defs["NotificationSettings"]["properties"])
        assert isinstance(p["dailyRecurrence"]["time"], str) and len(p["dailyRecurrence"]["time"]) == 4


def test_the_dry_run_and_the_plan_table_say_so() -> None:
    from orchestrator.lifecycle.dryrun import dry_run
    from orchestrator.ui import describe

    start = datetime(2026, 3, 1, 9, 18, tzinfo=UTC)
    report = dry_run(make_spec(max_duration="23h45m", ssh={"allowed_cidrs": ["203.0.113.7"]}), now=start)
    assert any("created disabled" in w and "2026-03-01 10:33 UTC" in w for w in report.warnings)
    (schedule,) = report.plan.schedules
    text = describe(schedule)
    assert "09:33 UTC" in text and "DISABLED" in text and "2026-03-01 10:33 UTC" in text
    short = dry_run(make_spec(max_duration="2h", ssh={"allowed_cidrs": ["203.0.113.7"]}), now=start)
    assert "deallocates" in describe(short.plan.schedules[0]) and "DISABLED" not in describe(short.plan.schedules[0])


def test_enabling_on_the_last_day_against_the_emulator() -> None:
    start = datetime(2026, 3, 1, 9, 18, tzinfo=UTC)
    emu = Emulator("instant", clock=VirtualClock(start.timestamp()))
    session = emulator_session(emu, subscription=SUB)
    plan = plan_at(start, "23h45m", nodes=2)
    Provisioner(session).provision(plan)

    def live_status() -> list[str]:
        return [r["properties"]["status"] for r in emu.live_resources() if r["type"].endswith("/schedules")]

    assert live_status() == ["Disabled", "Disabled"]
    assert plan.schedule_enable_at is not None and plan.shutdown_at is not None
    with pytest.raises(TooEarlyOrLate, match="previous day"):
        enable_shutdown_schedules(session, plan, plan.schedule_enable_at - timedelta(minutes=1))
    with pytest.raises(TooEarlyOrLate, match="deallocate or delete"):
        enable_shutdown_schedules(session, plan, plan.shutdown_at)
    assert live_status() == ["Disabled", "Disabled"]

    before = len(emu.requests())
    written = enable_shutdown_schedules(session, plan, plan.schedule_enable_at + timedelta(hours=3))
    assert written == [s.id for s in plan.schedules]
    assert live_status() == ["Enabled", "Enabled"]
    sent = [r for r in emu.requests()[before:] if r.kind != "poll"]
    assert [r.method for r in sent] == ["PUT", "PUT"]  # one write per VM, nothing else
    for r in emu.live_resources():
        if r["type"].endswith("/schedules"):
            assert r["properties"]["dailyRecurrence"] == {"time": "0933"}
            assert r["properties"]["targetResourceId"].endswith(r["name"].removeprefix("shutdown-computevm-"))

    # a short run has nothing to enable
    assert enable_shutdown_schedules(session, plan_at(start, "2h"), start) == []


def test_enabling_by_id_reads_then_writes_each_schedule() -> None:
    start = datetime(2026, 3, 1, 12, 0, tzinfo=UTC)
    emu = Emulator("instant", clock=VirtualClock(start.timestamp()))
    session = emulator_session(emu, subscription=SUB)
    plan = plan_at(start, "7d")
    Provisioner(session).provision(plan)
    ids = [s.id for s in plan.schedules]
    assert enable_shutdown_schedules_by_id(session, ids) == ids
    (live,) = [r for r in emu.live_resources() if r["type"].endswith("/schedules")]
    assert live["properties"]["status"] == "Enabled" and live["properties"]["dailyRecurrence"] == {"time": "1230"}
    assert live["tags"] == plan.tags
    assert enable_shutdown_schedules_by_id(session, ids) == []  # already enabled: nothing written
    with pytest.raises(ValueError, match="not an auto-shutdown schedule"):
        enable_shutdown_schedules_by_id(session, [plan.resources[0].id])


def test_max_duration_limit_is_seven_days() -> None:
    """7 d is the longest run the spec accepts, so one enable per run is enough (no re-enabling)."""
    assert parse_duration("7d") == 7 * 24 * 3600
    with pytest.raises(ValueError):
        parse_duration("7d1m")


def test_the_default_plan_in_conftest_is_enabled() -> None:
    assert make_plan().schedules[0].body["properties"]["status"] == "Enabled"


def test_the_watching_process_enables_the_schedule_on_the_last_day() -> None:
    import time

    from orchestrator.lifecycle.interrupts import ScheduleEnabler

    # Planned 23 h ago with 23h45m: its last day has begun, so the watcher enables it at once.
    start = (datetime.now(UTC) - timedelta(hours=23)).replace(second=0, microsecond=0)
    emu = Emulator("instant", clock=VirtualClock(start.timestamp()))
    session = emulator_session(emu, subscription=SUB)
    plan = plan_at(start, "23h45m")
    Provisioner(session).provision(plan)
    said: list[str] = []
    enabler = ScheduleEnabler(session, plan, said.append)
    for _ in range(100):
        if said:
            break
        time.sleep(0.05)
    enabler.cancel()
    assert said and said[0].startswith("auto-shutdown enabled for the run's last day"), said
    assert [r["properties"]["status"] for r in emu.live_resources() if r["type"].endswith("/schedules")] == ["Enabled"]
