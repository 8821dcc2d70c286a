"""Delete what a run created: by resource group, with VMs force-deleted, then verified; and `gc`.

Deleting the group is one request that removes everything in it, including whatever a crashed
process created but never recorded. Force deletion skips the VMs' graceful shutdown, which is
what makes group deletion take minutes.
"""

from __future__ import annotations

from dataclasses import dataclass
from datetime import UTC, datetime
from typing import Any

from orchestrator.azure.errors import classify
from orchestrator.azure.session import AzureSession
from orchestrator.plan import TAG_EXPIRES, TAG_JOB, TAG_OWNER, TAG_RUN

FORCE_DELETE_TYPES = "Microsoft.Compute/virtualMachines"


def start_group_delete(session: AzureSession, group: str, *, poll: bool = True) -> Any:
    """Send the group DELETE (force-deleting VMs); its poller, or None if there is no such group.

    Once this returns, Azure finishes the deletion whether or not anyone waits for it. Without
    `poll` no poller thread runs: the 202 is all the caller needs."""
    from azure.core.exceptions import HttpResponseError

    from orchestrator.azure.errors import error_code_and_message

    try:
        return session.resources.resource_groups.begin_delete(
            group, force_deletion_types=FORCE_DELETE_TYPES, polling=session.polling("group-delete") if poll else False
        )
    except HttpResponseError as e:
        code, _ = error_code_and_message(e)
        if code in {"ResourceGroupNotFound", "ResourceNotFound"} or e.status_code == 404:
            return None
        raise classify(e, resource=f"deleting resource group {group}") from e


def wait_deleted(poller: Any, group: str) -> None:
    from azure.core.exceptions import HttpResponseError

    try:
        poller.result()
    except HttpResponseError as e:
        raise classify(e, resource=f"deleting resource group {group}") from e


def delete_group(session: AzureSession, group: str, *, wait: bool = True) -> bool:
    """Delete `group`; False when it did not exist. With wait, returns once Azure says it is gone."""
    poller = start_group_delete(session, group, poll=wait)
    if poller is None:
        return False
    if wait:
        wait_deleted(poller, group)
    return True


def group_exists(session: AzureSession, group: str) -> bool:
    try:
        return bool(session.resources.resource_groups.check_existence(group))
    except Exception as e:
        raise classify(e, resource=f"checking resource group {group}") from e


@dataclass(frozen=True)
class RunGroup:
    name: str
    run_id: str
    owner: str
    job: str
    expires: datetime | None
    state: str

    def expired(self, now: datetime) -> bool:
        return self.expires is not None and self.expires <= now


def _parse_expiry(value: str | None) -> datetime | None:
    if not value:
        return None
    try:
        return datetime.strptime(value, "%Y-%m-%dT%H:%M:%SZ").replace(tzinfo=UTC)
    except ValueError:
        return None


def list_run_groups(session: AzureSession, run_id: str | None = None) -> list[RunGroup]:
    """Groups tagged by orchestrator (one run's, or all); ARM filters by tag server-side."""
    flt = f"tagName eq '{TAG_RUN}'" + (f" and tagValue eq '{run_id}'" if run_id else "")
    try:
        groups: list[Any] = list(session.resources.resource_groups.list(filter=flt))
    except Exception as e:
        raise classify(e, resource="listing resource groups") from e
    out = []
    for g in groups:
        tags = dict(g.tags or {})
        props = g.properties
        state = (
            props.get("provisioningState") if isinstance(props, dict) else getattr(props, "provisioning_state", "")
        ) or ""
        out.append(
            RunGroup(
                g.name,
                tags.get(TAG_RUN, ""),
                tags.get(TAG_OWNER, ""),
                tags.get(TAG_JOB, ""),
                _parse_expiry(tags.get(TAG_EXPIRES)),
                state,
            )
        )
    return out


def select_for_gc(
    groups: list[RunGroup],
    now: datetime,
    run_id: str | None = None,
    include_unexpired: bool = False,
    owner: str | None = None,
    include: frozenset[str] = frozenset(),
    protect: frozenset[str] = frozenset(),
) -> list[RunGroup]:
    """What gc deletes: the named run's groups, or every expired one (or all, when asked), plus the
    runs in `include` (their watching process is gone), never the runs in `protect` (alive)."""
    chosen = []
    for g in groups:
        if g.state == "Deleting" or (owner is not None and g.owner != owner):
            continue
        if run_id is not None:
            if g.run_id == run_id:
                chosen.append(g)
        elif g.run_id in protect:
            continue
        elif include_unexpired or g.expired(now) or g.run_id in include:
            chosen.append(g)
    return chosen


def gc(
    session: AzureSession,
    now: datetime,
    *,
    run_id: str | None = None,
    include_unexpired: bool = False,
    dry_run: bool = False,
    wait: bool = True,
    owner: str | None = None,
    include: frozenset[str] = frozenset(),
    protect: frozenset[str] = frozenset(),
) -> list[RunGroup]:
    """Delete abandoned run groups; all deletions start before any is waited on."""
    chosen = select_for_gc(
        list_run_groups(session, run_id), now, run_id, include_unexpired, owner, include=include, protect=protect
    )
    if dry_run or not chosen:
        return chosen
    from azure.core.exceptions import HttpResponseError

    pollers = []
    for g in chosen:
        try:
            pollers.append(
                session.resources.resource_groups.begin_delete(
                    g.name,
                    force_deletion_types=FORCE_DELETE_TYPES,
                    polling=session.polling("group-delete") if wait else False,
                )
            )
        except HttpResponseError as e:
            if e.status_code != 404:
                raise classify(e, resource=f"deleting resource group {g.name}") from e
    if wait:
        for p in pollers:
            p.result()
    return chosen
