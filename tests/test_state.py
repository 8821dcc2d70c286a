"""The run store: verdicts, phase intervals, owners, and a store written by the previous version
migrated in place."""

from __future__ import annotations

import json
import os
import sqlite3
import time
from pathlib import Path

import pytest

from orchestrator.candidates import Candidate
from orchestrator.state import SCHEMA, SCHEMA_VERSION, StoreError, open_store
from orchestrator.verdict import Verdict

T4 = "Standard_NC4as_T4_v3"

# The schema orchestrator wrote before verdicts (schema version 0), as it created it.
V1_SCHEMA = """
CREATE TABLE runs (run_id TEXT PRIMARY KEY, job TEXT NOT NULL, source TEXT NOT NULL, target TEXT NOT NULL,
    subscription TEXT NOT NULL, resource_group TEXT NOT NULL, state TEXT NOT NULL, phase_started REAL NOT NULL,
    created REAL NOT NULL, updated REAL NOT NULL, pid INTEGER, exit_code INTEGER, error TEXT, artifacts TEXT,
    metrics TEXT, torn_down INTEGER NOT NULL DEFAULT 0);
CREATE TABLE events (id INTEGER PRIMARY KEY AUTOINCREMENT, run_id TEXT NOT NULL, at REAL NOT NULL,
    kind TEXT NOT NULL, data TEXT NOT NULL);
CREATE INDEX events_run ON events(run_id, id);
CREATE TABLE resources (run_id TEXT NOT NULL, resource_id TEXT NOT NULL, type TEXT NOT NULL, name TEXT NOT NULL,
    status TEXT NOT NULL, updated REAL NOT NULL, PRIMARY KEY (run_id, resource_id));
"""


def _v1_store(path: Path) -> None:
    db = sqlite3.connect(path)
    db.executescript(V1_SCHEMA)
    rows = [
        ("ok-aaaaaa", "done", 0, None, 1),
        ("gate-bbbbbb", "failed", 0, "metric gate failed: acc = 0.5, needs >= 0.9", 1),
        ("job-cccccc", "failed", 3, None, 1),
        ("int-dddddd", "failed", None, "interrupted", 1),
        ("left-eeeeee", "failed", None, "teardown failed: throttled", 0),
        ("live-ffffff", "training", None, None, 0),
    ]
    t = 1_700_000_000.0
    for run_id, state, code, error, torn in rows:
        db.execute(
            "INSERT INTO runs VALUES (?, 'job', 'job.yaml', 'local', 'sub', ?, ?, ?, ?, ?, 1, ?, ?, NULL, '{}', ?)",
            (run_id, f"orch-{run_id}", state, t, t, t, code, error, torn),
        )
        for i, st in enumerate(["planned", "provisioning", "connecting", "training", state]):
            db.execute(
                "INSERT INTO events (run_id, at, kind, data) VALUES (?, ?, 'state', ?)",
                (run_id, t + i, json.dumps({"state": st})),
            )
    db.commit()
    db.close()


def test_a_store_written_by_the_previous_version_is_migrated_in_place(tmp_path: Path) -> None:
    _v1_store(tmp_path / "runs.db")
    store = open_store(tmp_path)
    verdicts = {r.run_id: (r.state, r.verdict) for r in store.runs(10)}
    assert verdicts == {
        "ok-aaaaaa": ("gone", Verdict.SUCCEEDED),
        "gate-bbbbbb": ("gone", Verdict.GATE_FAILED),
        "job-cccccc": ("gone", Verdict.JOB_FAILED),
        "int-dddddd": ("gone", Verdict.INTERRUPTED),
        "left-eeeeee": ("tearing-down", Verdict.AZURE_REFUSED),
        "live-ffffff": ("running", None),
    }
    left = store.get("left-eeeeee")
    assert left is not None and left.holds_resources and left.error == "teardown failed: throttled"
    phases = [(p.phase, p.seconds) for p in store.phases("ok-aaaaaa")]
    assert phases == [("provision", 1.0), ("connect", 1.0), ("train", 1.0)]
    assert sqlite3.connect(tmp_path / "runs.db").execute("PRAGMA user_version").fetchone()[0] == SCHEMA_VERSION
    open_store(tmp_path)  # a second open changes nothing
    assert {r.run_id: r.verdict for r in open_store(tmp_path).runs(10)}["ok-aaaaaa"] == Verdict.SUCCEEDED


def test_verdicts_phases_and_owner_are_recorded(tmp_path: Path) -> None:
    store = open_store(tmp_path)
    store.create_run(
        run_id="r-aaaaaa", job="j", source="j.yaml", target="local", subscription="s", resource_group="orch-r",
        pid=os.getpid(),
    )  # fmt: skip
    record = store.get("r-aaaaaa")
    assert record is not None and record.owner_alive and not record.orphaned
    pid = store.phase_start("r-aaaaaa", "train", node=1)
    time.sleep(0.01)
    store.phase_end(pid)
    store.decide("r-aaaaaa", Verdict.GATE_FAILED, {"gates": [{"metric": "acc"}]}, exit_code=0)
    record = store.get("r-aaaaaa")
    assert record is not None and record.verdict == "gate-failed" and record.detail["gates"][0]["metric"] == "acc"
    (phase,) = store.phases("r-aaaaaa")
    assert phase.phase == "train" and phase.node == 1 and phase.seconds is not None and phase.seconds > 0
    with pytest.raises(ValueError, match="sleeping"):
        store.phase_start("r-aaaaaa", "sleeping")


def test_a_dead_owner_makes_an_active_run_orphaned(tmp_path: Path) -> None:
    import subprocess

    gone = subprocess.Popen(["true"])
    gone.wait()
    store = open_store(tmp_path)
    store.create_run(
        run_id="r-bbbbbb", job="j", source="j.yaml", target="local", subscription="s", resource_group="orch-r",
        pid=gone.pid,
    )  # fmt: skip
    store.transition("r-bbbbbb", "running")
    record = store.get("r-bbbbbb")
    assert record is not None and record.orphaned and record.shown_state == "running (process gone)"


def test_a_corrupt_store_is_one_paragraph_with_the_way_out(tmp_path: Path) -> None:
    (tmp_path / "runs.db").write_bytes(b"this is not a database" * 100)
    with pytest.raises(StoreError) as info:
        open_store(tmp_path)
    text = str(info.value)
    assert "cannot be read" in text and "orchestrator down RUN" in text and "runs.db.broken" in text


def test_an_existing_state_directory_is_made_private(tmp_path: Path) -> None:
    from orchestrator.paths import state_dir

    loose = tmp_path / "state"
    loose.mkdir(mode=0o755)
    os.chmod(loose, 0o755)
    assert state_dir(loose) == loose and loose.stat().st_mode & 0o777 == 0o700
    store = open_store(loose)
    assert store.path.stat().st_mode & 0o777 == 0o600


def test_a_v2_store_gains_the_attempts_table_and_v4_columns(tmp_path: Path) -> None:
    db = sqlite3.connect(tmp_path / "runs.db")
    v4_columns = ("price_per_hour", "autostop", "restarts", "expires")
    v2_schema = "\n".join(line for line in SCHEMA.splitlines() if not line.strip().startswith(v4_columns))
    v2_schema = v2_schema.replace("env TEXT,", "env TEXT")
    for statement in v2_schema.split(";"):
        if statement.strip() and "attempts" not in statement:
            db.execute(statement)
    db.execute(
        "INSERT INTO runs (run_id, job, source, target, subscription, resource_group, state, phase_started, created,"
        " updated, verdict)"
        " VALUES ('old-aaaaaa', 'j', 'j.yaml', 'local', 's', 'orch-old', 'gone', 1, 1, 1, 'succeeded')"
    )
    db.execute("PRAGMA user_version = 2")
    db.commit()
    db.close()
    store = open_store(tmp_path)
    assert sqlite3.connect(tmp_path / "runs.db").execute("PRAGMA user_version").fetchone()[0] == SCHEMA_VERSION == 4
    old = store.get("old-aaaaaa")
    assert old is not None and store.attempts("old-aaaaaa") == []
    assert (old.price_per_hour, old.autostop, old.restarts, old.expires) == (None, None, 0, None)
    store.update("old-aaaaaa", price_per_hour=1.052, restarts=2)
    old = store.get("old-aaaaaa")
    assert old is not None and (old.price_per_hour, old.restarts) == (1.052, 2)
    store.attempt("old-aaaaaa", 1, Candidate(T4, "eastus", "1", True).to_json(), "AllocationFailed", "no room", 2.5)
    (a,) = store.attempts("old-aaaaaa")
    assert a.line() == f"1. {T4} in eastus zone 1 (spot): AllocationFailed after 2.5 s"
