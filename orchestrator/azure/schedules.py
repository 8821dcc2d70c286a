"""Enabling a run's auto-shutdown schedules during its last day.

A run of SCHEDULE_ENABLED_BELOW (23 h) or more gets its DevTestLab schedules created with
`status: Disabled` (plan.py explains why: a daily HH:MM enabled at the start fires within 24 h). Whoever
watches the run enables them once `plan.schedule_enable_at` has passed and before `plan.shutdown_at`:
the next occurrence of their HH:MM is then the expiry itself. Enabling is a PUT of the schedule with
`status: Enabled` (the 2018-09-15 PATCH takes only tags), the same write the provisioner makes.
"""

from __future__ import annotations

from collections.abc import Iterable
from datetime import UTC, datetime
from typing import Any

from orchestrator.azure.errors import classify
from orchestrator.azure.session import AzureSession
from orchestrator.plan import SCHEDULE_API_VERSION, T_SCHEDULE, ResourcePlan

# Members of a schedule that ARM returns but that are read-only in DevTestLab 2018-09-15 ScheduleProperties.
_READ_ONLY = {"createdDate", "provisioningState", "uniqueIdentifier"}


class TooEarlyOrLate(ValueError):
    """Enabling now would make the schedule fire at the wrong time."""


def enable_shutdown_schedules(session: AzureSession, plan: ResourcePlan, now: datetime) -> list[str]:
    """Enable the plan's disabled auto-shutdown schedules (one PUT each); returns the ids written.

    Call it when `plan.schedule_enable_at <= now < plan.shutdown_at` (UTC). Earlier, the schedule
    would fire at the previous day's HH:MM; at or after the expiry it would fire a day late: both raise
    TooEarlyOrLate (past the expiry, deallocate or delete the run instead). A plan whose schedules are
    created enabled needs nothing: returns []."""
    enable_at, shutdown_at = plan.schedule_enable_at, plan.shutdown_at
    if enable_at is None:
        return []
    now = now.astimezone(UTC)
    if now < enable_at:
        raise TooEarlyOrLate(
            f"the auto-shutdown of {plan.run_id} may be enabled from {enable_at:%Y-%m-%d %H:%M} UTC only: "
            "enabled now it would fire at the previous day's time"
        )
    if shutdown_at is not None and now >= shutdown_at:
        raise TooEarlyOrLate(
            f"{plan.run_id} expired at {shutdown_at:%Y-%m-%d %H:%M} UTC: enabling its daily auto-shutdown now would "
            "deallocate the VMs only tomorrow; deallocate or delete them instead"
        )
    written = []
    for r in plan.schedules:
        if r.body["properties"].get("status") == "Enabled":
            continue
        body = {**r.body, "properties": {**r.body["properties"], "status": "Enabled"}}
        _put(session, r.id, body)
        written.append(r.id)
    return written


def enable_shutdown_schedules_by_id(session: AzureSession, schedule_ids: Iterable[str]) -> list[str]:
    """The same for a caller that has only the schedules' ids (GET, then PUT with status Enabled).
    The caller checks the time window (see enable_shutdown_schedules); returns the ids written."""
    written = []
    for rid in schedule_ids:
        if f"/providers/{T_SCHEDULE}/".lower() not in rid.lower():
            raise ValueError(f"not an auto-shutdown schedule id: {rid}")
        try:
            current = session.resources.resources.get_by_id(rid, api_version=SCHEDULE_API_VERSION)
        except Exception as e:
            raise classify(e, resource=f"reading the auto-shutdown schedule {rid}") from e
        props = {k: v for k, v in dict(_field(current, "properties") or {}).items() if k not in _READ_ONLY}
        if props.get("status") == "Enabled":
            continue
        body: dict[str, Any] = {"location": _field(current, "location"), "properties": {**props, "status": "Enabled"}}
        tags = _field(current, "tags")
        if tags:
            body["tags"] = dict(tags)
        _put(session, rid, body)
        written.append(rid)
    return written


def _put(session: AzureSession, rid: str, body: dict[str, Any]) -> None:
    try:
        session.resources.resources.begin_create_or_update_by_id(
            rid, body, api_version=SCHEDULE_API_VERSION, polling=session.polling(T_SCHEDULE)
        ).result()
    except Exception as e:
        raise classify(e, resource=f"enabling the auto-shutdown schedule {rid.rsplit('/', 1)[-1]}") from e


def _field(obj: Any, name: str) -> Any:
    try:
        return obj[name]
    except (KeyError, TypeError):
        return getattr(obj, name, None)
