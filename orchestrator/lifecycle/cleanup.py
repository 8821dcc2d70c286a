"""`down` and `gc`: deleting what runs left, found in the store first and on the target by tag."""

from __future__ import annotations

import socket
from datetime import UTC, datetime
from typing import Any

from orchestrator import sshconfig
from orchestrator.errors import CloudError, UserInputError
from orchestrator.lifecycle.kept import unknown_run
from orchestrator.plan import RUN_ID_RE, resource_group_name
from orchestrator.state import RunRecord, StoreError, open_store
from orchestrator.targets import Target, target_for


def _record(run_id: str, target: Target) -> tuple[RunRecord | None, list[str], str]:
    """The run's record, the ids the store knows, and why the store could not be asked ("" if it could)."""
    try:
        store = open_store(target.state)
        return store.get(run_id), store.run_ids(), ""
    except StoreError as e:
        return None, [], str(e)


def down(run: str, target: Target) -> bool:
    """Delete a run's resource group and confirm it is gone; False if there was nothing to delete.

    The store is asked first; when it is unreadable or does not know the run, the target is asked for
    the group by its `orchestrator-run` tag, so `down` works from another machine or a broken store."""
    from orchestrator.azure.teardown import delete_group, group_exists, list_run_groups

    run_id = run.removeprefix("orch-")
    if not RUN_ID_RE.match(run_id):
        raise UserInputError(f"'{run}' is not a run id (like mnist-cnn-1a2b3c); `orchestrator ls` lists runs.")
    record, known, store_problem = _record(run_id, target)
    where = target_for(record, target)
    group = record.resource_group if record else resource_group_name(run_id)
    with where.session() as session:
        if record is None:
            tagged = [g for g in list_run_groups(session, run_id) if g.run_id == run_id]
            if not tagged and not group_exists(session, group):
                if store_problem:
                    raise UserInputError(f"no run {run_id} on {where.describe()}, and {store_problem}")
                raise unknown_run(run_id, known)
        existed = delete_group(session, group, wait=True)
        if group_exists(session, group):
            raise CloudError(
                f"Resource group {group} still exists after deletion; run `orchestrator down {run_id}` again "
                "or check the Azure portal."
            )
    if record is not None:
        store = open_store(target.state)
        store.mark_resources(run_id, "deleted")
        store.end_open_phases(run_id)
        store.transition(run_id, "gone", torn_down=True)
    sshconfig.remove_entries(run_id)  # its `Host orch-<run>` entries in ~/.ssh/config, if any
    return existed


def gc(
    target: Target,
    *,
    run_id: str | None = None,
    include_unexpired: bool = False,
    force: bool = False,
    dry_run: bool = False,
    owner: str | None = None,
) -> list[Any]:
    """DESIGN.md's ownership rule: plain gc deletes expired runs and runs whose watching process on
    this host is gone; --all every run without a live owner; --all --force everything."""
    import time

    from orchestrator.azure.teardown import gc as azure_gc
    from orchestrator.lifecycle.autostop import refresh

    try:
        store: Any = open_store(target.state)
        records = store.runs(10_000)
        records = refresh(store, target, records)  # kept/detached runs whose VMs deallocated: stopped
    except StoreError:
        store, records = None, []
    here = socket.gethostname()
    now = time.time()
    # A stopped run (autostop) is kept until its own expiry (autostop.STOPPED_EXPIRY_S after it
    # stopped), whatever its group's tag says; then plain gc deletes it.
    stopped_live = {r.run_id for r in records if r.state == "stopped" and r.expires and r.expires > now}
    stopped_expired = {r.run_id for r in records if r.state == "stopped" and r.expires and r.expires <= now}
    protect = frozenset(
        {r.run_id for r in records if r.active and r.owner_alive and not force and run_id != r.run_id}
        | (set() if include_unexpired else stopped_live - {run_id})
    )
    # Owned by nobody any more: its watching process on this host is gone (killed, or it ended with
    # a teardown that did not finish). Kept, detached and stopped runs are left to their expiry.
    orphans = frozenset(
        r.run_id
        for r in records
        if (r.active or r.holds_resources)
        and r.state not in {"kept", "detached", "stopped"}
        and r.owner_host in (None, here)
        and not r.owner_alive
    )
    with target.session() as session:
        groups = azure_gc(
            session,
            datetime.now(UTC),
            run_id=run_id,
            include_unexpired=include_unexpired,
            dry_run=dry_run,
            owner=owner,
            include=orphans | stopped_expired,
            protect=protect,
        )
    if not dry_run and store is not None:  # the records of runs whose groups gc removed stop looking alive
        for g in groups:
            record = store.get(g.run_id)
            if record is not None and not record.torn_down:
                store.mark_resources(g.run_id, "deleted")
                store.end_open_phases(g.run_id)
                store.transition(g.run_id, "gone", torn_down=True, error=record.error or "removed by gc")
    if not dry_run:
        for g in groups:
            sshconfig.remove_entries(g.run_id)
    return groups
