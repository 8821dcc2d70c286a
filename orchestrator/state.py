"""The local run store: SQLite (WAL) in the state directory. Runs, their phases, resources, events.

Several CLI processes may use it at once (WAL, a busy timeout, short transactions). A run is
written here, with its resource group's name, before anything is created in Azure: a process that
dies at any point leaves a record that `down`, `status` and `gc` can act on.
"""

from __future__ import annotations

import json
import os
import sqlite3
import time
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import Any

SCHEMA = """
CREATE TABLE IF NOT EXISTS runs (
    run_id TEXT PRIMARY KEY,
    job TEXT NOT NULL,
    source TEXT NOT NULL,
    target TEXT NOT NULL,
    subscription TEXT NOT NULL,
    resource_group TEXT NOT NULL,
    state TEXT NOT NULL,             -- planned, provisioning, ..., done, failed
    phase_started REAL NOT NULL,
    created REAL NOT NULL,
    updated REAL NOT NULL,
    pid INTEGER,
    exit_code INTEGER,
    error TEXT,
    artifacts TEXT,
    metrics TEXT,
    torn_down INTEGER NOT NULL DEFAULT 0
);
CREATE TABLE IF NOT EXISTS events (
    id INTEGER PRIMARY KEY AUTOINCREMENT,
    run_id TEXT NOT NULL,
    at REAL NOT NULL,
    kind TEXT NOT NULL,
    data TEXT NOT NULL
);
CREATE INDEX IF NOT EXISTS events_run ON events(run_id, id);
CREATE TABLE IF NOT EXISTS resources (
    run_id TEXT NOT NULL,
    resource_id TEXT NOT NULL,
    type TEXT NOT NULL,
    name TEXT NOT NULL,
    status TEXT NOT NULL,
    updated REAL NOT NULL,
    PRIMARY KEY (run_id, resource_id)
);
"""

# The run's states, in order; `failed` and `done` end it.
STATES = (
    "planned",
    "provisioning",
    "connecting",
    "syncing",
    "setup",
    "training",
    "collecting",
    "tearing down",
    "kept",
    "done",
    "failed",
)
ACTIVE = frozenset(STATES[:8])


@dataclass(frozen=True)
class RunRecord:
    run_id: str
    job: str
    source: str
    target: str
    subscription: str
    resource_group: str
    state: str
    phase_started: float
    created: float
    updated: float
    pid: int | None
    exit_code: int | None
    error: str | None
    artifacts: str | None
    metrics: dict[str, Any]
    torn_down: bool

    @property
    def active(self) -> bool:
        return self.state in ACTIVE

    @property
    def orphaned(self) -> bool:
        """Active, but the process that ran it is gone (killed): its resources may still exist."""
        if not self.active or self.pid is None:
            return False
        try:
            os.kill(self.pid, 0)
        except ProcessLookupError:
            return True
        except PermissionError:
            return False
        return False

    @property
    def shown_state(self) -> str:
        return f"{self.state} (process gone)" if self.orphaned else self.state


class Store:
    def __init__(self, path: Path) -> None:
        self.path = path
        path.parent.mkdir(parents=True, exist_ok=True)
        with self._connect() as db:
            db.execute("PRAGMA journal_mode=WAL")
            db.executescript(SCHEMA)

    def _connect(self) -> sqlite3.Connection:
        db = sqlite3.connect(self.path, timeout=30, isolation_level=None)
        db.execute("PRAGMA busy_timeout=30000")
        db.execute("PRAGMA synchronous=NORMAL")
        return db

    @contextmanager
    def _tx(self) -> Iterator[sqlite3.Connection]:
        db = self._connect()
        try:
            db.execute("BEGIN IMMEDIATE")
            yield db
            db.execute("COMMIT")
        except BaseException:
            db.execute("ROLLBACK")
            raise
        finally:
            db.close()

    def create_run(
        self,
        *,
        run_id: str,
        job: str,
        source: str,
        target: str,
        subscription: str,
        resource_group: str,
        pid: int | None,
    ) -> None:
        now = time.time()
        with self._tx() as db:
            db.execute(
                "INSERT INTO runs (run_id, job, source, target, subscription, resource_group, state, phase_started,"
                " created, updated, pid) VALUES (?, ?, ?, ?, ?, ?, 'planned', ?, ?, ?, ?)",
                (run_id, job, source, target, subscription, resource_group, now, now, now, pid),
            )
            db.execute(
                "INSERT INTO events (run_id, at, kind, data) VALUES (?, ?, 'state', ?)",
                (run_id, now, json.dumps({"state": "planned"})),
            )

    def transition(self, run_id: str, state: str, **fields: Any) -> None:
        if state not in STATES:
            raise ValueError(state)
        now = time.time()
        cols = _columns(fields)
        sets = "".join(f", {k} = ?" for k in cols)
        with self._tx() as db:
            db.execute(
                f"UPDATE runs SET state = ?, phase_started = ?, updated = ?{sets} WHERE run_id = ?",
                (state, now, now, *cols.values(), run_id),
            )
            db.execute(
                "INSERT INTO events (run_id, at, kind, data) VALUES (?, ?, 'state', ?)",
                (run_id, now, json.dumps({"state": state, **{k: v for k, v in fields.items() if k != "metrics"}})),
            )

    def update(self, run_id: str, **fields: Any) -> None:
        cols = _columns(fields)
        if not cols:
            return
        with self._tx() as db:
            db.execute(
                f"UPDATE runs SET {', '.join(f'{k} = ?' for k in cols)}, updated = ? WHERE run_id = ?",
                (*cols.values(), time.time(), run_id),
            )

    def resource(self, run_id: str, resource_id: str, type_: str, name: str, status: str) -> None:
        with self._tx() as db:
            db.execute(
                "INSERT INTO resources (run_id, resource_id, type, name, status, updated) VALUES (?, ?, ?, ?, ?, ?)"
                " ON CONFLICT(run_id, resource_id) DO UPDATE SET status = excluded.status,"
                " updated = excluded.updated",
                (run_id, resource_id, type_, name, status, time.time()),
            )

    def mark_resources(self, run_id: str, status: str) -> None:
        with self._tx() as db:
            db.execute("UPDATE resources SET status = ?, updated = ? WHERE run_id = ?", (status, time.time(), run_id))

    # -------------------------------------------------------------------------------------- reads

    def get(self, run_id: str) -> RunRecord | None:
        db = self._connect()
        try:
            db.row_factory = sqlite3.Row
            row = db.execute("SELECT * FROM runs WHERE run_id = ?", (run_id,)).fetchone()
        finally:
            db.close()
        return _record(row) if row else None

    def runs(self, limit: int = 50, active_only: bool = False) -> list[RunRecord]:
        db = self._connect()
        try:
            db.row_factory = sqlite3.Row
            where = f"WHERE state IN ({', '.join('?' * len(ACTIVE))})" if active_only else ""
            rows = db.execute(
                f"SELECT * FROM runs {where} ORDER BY created DESC LIMIT ?",
                (*(sorted(ACTIVE) if active_only else ()), limit),
            ).fetchall()
        finally:
            db.close()
        return [_record(r) for r in rows]

    def events(self, run_id: str) -> list[tuple[float, str, dict[str, Any]]]:
        db = self._connect()
        try:
            rows = db.execute("SELECT at, kind, data FROM events WHERE run_id = ? ORDER BY id", (run_id,)).fetchall()
        finally:
            db.close()
        return [(at, kind, json.loads(data)) for at, kind, data in rows]

    def resources(self, run_id: str) -> list[tuple[str, str, str]]:
        db = self._connect()
        try:
            rows = db.execute(
                "SELECT type, name, status FROM resources WHERE run_id = ? ORDER BY rowid", (run_id,)
            ).fetchall()
        finally:
            db.close()
        return [(t, n, s) for t, n, s in rows]


_UPDATABLE = frozenset({"exit_code", "error", "artifacts", "metrics", "torn_down", "pid"})


def _columns(fields: dict[str, Any]) -> dict[str, Any]:
    return {k: (json.dumps(v) if k == "metrics" else v) for k, v in fields.items() if k in _UPDATABLE}


def _record(row: sqlite3.Row) -> RunRecord:
    d = dict(row)
    d["metrics"] = json.loads(d["metrics"]) if d["metrics"] else {}
    d["torn_down"] = bool(d["torn_down"])
    return RunRecord(**d)


def open_store(state_dir: Path) -> Store:
    return Store(state_dir / "runs.db")
