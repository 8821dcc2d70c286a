"""The run store: SQLite (WAL) in the state directory. Runs, verdicts, phases, resources, events.

Several CLI processes may use it at once (WAL, a busy timeout, short transactions). A run is
written here, with its resource group's name, before anything is created in Azure: a process that
dies at any point leaves a record that `down`, `status` and `gc` can act on.

The schema has a version (SQLite's user_version); a store written by an older version of the tool
is migrated in place the first time a newer one opens it.
"""

from __future__ import annotations

import json
import os
import socket
import sqlite3
import time
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from orchestrator.errors import OrchestratorError
from orchestrator.verdict import Verdict

SCHEMA_VERSION = 4  # 3: attempts (one row per candidate a run tried); 4: price, autostop, restarts, expires

SCHEMA = """
CREATE TABLE IF NOT EXISTS runs (
    run_id TEXT PRIMARY KEY,
    job TEXT NOT NULL,
    source TEXT NOT NULL,
    target TEXT NOT NULL,
    subscription TEXT NOT NULL,
    resource_group TEXT NOT NULL,
    state TEXT NOT NULL,             -- see STATES
    phase_started REAL NOT NULL,
    created REAL NOT NULL,
    updated REAL NOT NULL,
    pid INTEGER,                     -- the watching process (owner)
    exit_code INTEGER,               -- the job's own exit code
    error TEXT,
    artifacts TEXT,
    metrics TEXT,
    torn_down INTEGER NOT NULL DEFAULT 0,
    verdict TEXT,                    -- see verdict.Verdict (NULL while undecided)
    detail TEXT,                     -- JSON: what the verdict rests on (gates, skipped files, ...)
    owner_host TEXT,
    owner_started REAL,              -- the owner's process start time (a reused pid is not the owner)
    heartbeat REAL,
    env TEXT,                        -- JSON: --env given at provision time, for later train/exec
    price_per_hour REAL,             -- the whole run's $/h (all nodes) recorded when its VMs were made
    autostop REAL,                   -- seconds idle after which a kept/detached VM stops itself
    restarts INTEGER NOT NULL DEFAULT 0,  -- spot evictions recovered from
    expires REAL                     -- when gc may delete a stopped or kept run (epoch seconds)
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
CREATE TABLE IF NOT EXISTS phases (
    id INTEGER PRIMARY KEY AUTOINCREMENT,
    run_id TEXT NOT NULL,
    phase TEXT NOT NULL,
    node INTEGER,                    -- a node's rank, or NULL for the whole run
    started REAL NOT NULL,
    ended REAL
);
CREATE INDEX IF NOT EXISTS phases_run ON phases(run_id, id);
CREATE TABLE IF NOT EXISTS attempts (
    id INTEGER PRIMARY KEY AUTOINCREMENT,
    run_id TEXT NOT NULL,
    n INTEGER NOT NULL,              -- 1-based, in the order the candidates were tried
    vm_size TEXT NOT NULL,
    region TEXT NOT NULL,
    zone TEXT,                       -- NULL: zoneless (Azure picked)
    spot INTEGER NOT NULL,
    code TEXT,                       -- Azure's error code, NULL when this candidate provisioned
    message TEXT,
    seconds REAL NOT NULL,           -- Azure seconds, deleting what the attempt made included
    at REAL NOT NULL
);
CREATE INDEX IF NOT EXISTS attempts_run ON attempts(run_id, id);
"""

# States that are not verdicts (DESIGN.md); a run that ended is `gone` (or `kept`) with a verdict.
STATES = ("planned", "provisioning", "running", "kept", "detached", "stopped", "tearing-down", "gone")
ACTIVE = frozenset({"planned", "provisioning", "running", "tearing-down"})
PHASES = ("check", "provision", "boot", "connect", "install", "sync", "setup", "train", "collect", "teardown")

_V1_STATES = {
    "connecting": "running",
    "syncing": "running",
    "setup": "running",
    "training": "running",
    "collecting": "running",
    "tearing down": "tearing-down",
}
_V1_PHASES = {
    "provisioning": "provision",
    "connecting": "connect",
    "syncing": "sync",
    "setup": "setup",
    "training": "train",
    "collecting": "collect",
    "tearing down": "teardown",
}


class StoreError(OrchestratorError):
    """The store cannot be read or written; the message says how to recover."""


@dataclass(frozen=True)
class Phase:
    phase: str
    node: int | None
    started: float
    ended: float | None

    @property
    def seconds(self) -> float | None:
        return None if self.ended is None else self.ended - self.started


@dataclass(frozen=True)
class AttemptRecord:
    """One candidate a run tried to provision on."""

    n: int
    vm_size: str
    region: str
    zone: str | None
    spot: bool
    code: str | None  # None: it provisioned
    message: str | None
    seconds: float

    @property
    def ok(self) -> bool:
        return self.code is None

    def line(self) -> str:
        where = self.region + (f" zone {self.zone}" if self.zone else "")
        what = "provisioned" if self.ok else self.code
        return f"{self.n}. {self.vm_size} in {where}{' (spot)' if self.spot else ''}: {what} after {self.seconds:.1f} s"

    def to_json(self) -> dict[str, Any]:
        return {
            "n": self.n,
            "vm_size": self.vm_size,
            "region": self.region,
            "zone": self.zone,
            "spot": self.spot,
            "code": self.code,
            "message": self.message,
            "seconds": round(self.seconds, 2),
        }


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
    verdict: str | None
    detail: dict[str, Any]
    owner_host: str | None
    owner_started: float | None
    heartbeat: float | None
    env: dict[str, str]
    price_per_hour: float | None = None
    autostop: float | None = None
    restarts: int = 0
    expires: float | None = None

    @property
    def active(self) -> bool:
        """Being worked on: not yet decided (a run whose teardown failed has a verdict and is not
        active, but still holds resources)."""
        return self.state in ACTIVE and self.verdict is None

    @property
    def holds_resources(self) -> bool:
        """Not confirmed deleted: listed by `status` until it is."""
        return not self.torn_down and self.state != "planned"

    @property
    def owner_alive(self) -> bool:
        """The watching process still runs (on this host; elsewhere it is assumed alive)."""
        if self.pid is None:
            return False
        if self.owner_host not in (None, socket.gethostname()):
            return True
        started = process_started(self.pid)
        if started is None:
            return False
        return self.owner_started is None or abs(started - self.owner_started) < 2.0

    @property
    def orphaned(self) -> bool:
        """Active, but the process that watched it is gone (killed): its resources may still exist."""
        return self.active and not self.owner_alive

    @property
    def shown_state(self) -> str:
        if self.verdict and self.state in {"gone", "kept"}:
            return self.verdict if self.state == "gone" else f"kept ({self.verdict})"
        if self.verdict and self.state == "tearing-down":
            return f"{self.verdict}, not torn down"
        return f"{self.state} (process gone)" if self.orphaned else self.state


def process_started(pid: int) -> float | None:
    """When a process started (seconds since the epoch), or None if it does not exist."""
    try:
        with open(f"/proc/{pid}/stat", "rb") as f:
            stat = f.read()
        fields = stat[stat.rindex(b")") + 2 :].split()
        if fields[0] == b"Z":
            return None
        ticks = int(fields[19])
        with open("/proc/stat", "rb") as f:
            boot = next(float(line.split()[1]) for line in f if line.startswith(b"btime"))
        return boot + ticks / os.sysconf("SC_CLK_TCK")
    except (OSError, ValueError, IndexError, StopIteration):
        try:
            os.kill(pid, 0)
        except ProcessLookupError:
            return None
        except PermissionError:
            pass
        return 0.0


class RunStore:
    def __init__(self, path: Path) -> None:
        self.path = path
        try:
            path.parent.mkdir(parents=True, exist_ok=True)
            with self._connect() as db:
                db.execute("PRAGMA journal_mode=WAL")
                self._migrate(db)
            for p in (path, path.with_name(path.name + "-wal"), path.with_name(path.name + "-shm")):
                if p.exists():
                    os.chmod(p, 0o600)
        except sqlite3.DatabaseError as e:
            raise StoreError(_unreadable(path, e)) from None
        except OSError as e:
            raise StoreError(_unwritable(path, e)) from None

    def _connect(self) -> sqlite3.Connection:
        db = sqlite3.connect(self.path, timeout=30, isolation_level=None)
        db.execute("PRAGMA busy_timeout=30000")
        db.execute("PRAGMA synchronous=NORMAL")
        return db

    def _migrate(self, db: sqlite3.Connection) -> None:
        version = int(db.execute("PRAGMA user_version").fetchone()[0])
        if version >= SCHEMA_VERSION:
            return
        db.execute("BEGIN IMMEDIATE")
        try:
            version = int(db.execute("PRAGMA user_version").fetchone()[0])  # another process may have done it
            if version < SCHEMA_VERSION:
                had_runs = db.execute("SELECT 1 FROM sqlite_master WHERE name = 'runs'").fetchone() is not None
                if had_runs:
                    columns = {row[1] for row in db.execute("PRAGMA table_info(runs)")}
                    if "verdict" not in columns:
                        _migrate_v1(db, columns)
                    _migrate_v3(db, {row[1] for row in db.execute("PRAGMA table_info(runs)")})
                for statement in SCHEMA.split(";"):  # executescript would commit this transaction
                    if statement.strip():
                        db.execute(statement)
                db.execute(f"PRAGMA user_version = {SCHEMA_VERSION}")
            db.execute("COMMIT")
        except BaseException:
            db.execute("ROLLBACK")
            raise

    @contextmanager
    def _tx(self) -> Iterator[sqlite3.Connection]:
        try:
            db = self._connect()
        except sqlite3.DatabaseError as e:
            raise StoreError(_unreadable(self.path, e)) from None
        try:
            db.execute("BEGIN IMMEDIATE")
            yield db
            db.execute("COMMIT")
        except sqlite3.OperationalError as e:
            if db.in_transaction:
                db.execute("ROLLBACK")
            if "readonly" in str(e) or "read-only" in str(e):
                raise StoreError(_unwritable(self.path, e)) from None
            raise
        except BaseException:
            if db.in_transaction:
                db.execute("ROLLBACK")
            raise
        finally:
            db.close()

    def _event(self, db: sqlite3.Connection, run_id: str, at: float, kind: str, data: dict[str, Any]) -> None:
        db.execute(
            "INSERT INTO events (run_id, at, kind, data) VALUES (?, ?, ?, ?)", (run_id, at, kind, json.dumps(data))
        )

    # -------------------------------------------------------------------------------------- writes

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
        env: dict[str, str] | None = None,
    ) -> None:
        now = time.time()
        with self._tx() as db:
            db.execute(
                "INSERT INTO runs (run_id, job, source, target, subscription, resource_group, state, phase_started,"
                " created, updated, pid, owner_host, owner_started, heartbeat, env)"
                " VALUES (?, ?, ?, ?, ?, ?, 'planned', ?, ?, ?, ?, ?, ?, ?, ?)",
                (
                    run_id,
                    job,
                    source,
                    target,
                    subscription,
                    resource_group,
                    now,
                    now,
                    now,
                    pid,
                    socket.gethostname(),
                    process_started(pid) if pid else None,
                    now,
                    json.dumps(env or {}),
                ),
            )
            self._event(db, run_id, now, "state", {"state": "planned"})

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
            self._event(db, run_id, now, "state", {"state": state, **{k: v for k, v in fields.items() if k in _SHOWN}})

    def update(self, run_id: str, **fields: Any) -> None:
        cols = _columns(fields)
        if not cols:
            return
        with self._tx() as db:
            db.execute(
                f"UPDATE runs SET {', '.join(f'{k} = ?' for k in cols)}, updated = ? WHERE run_id = ?",
                (*cols.values(), time.time(), run_id),
            )

    def decide(self, run_id: str, verdict: Verdict, detail: dict[str, Any] | None = None, **fields: Any) -> None:
        """Record the run's verdict (once decided, a later call replaces it: `train` on a kept run)."""
        now = time.time()
        cols = _columns({**fields, "verdict": str(verdict), "detail": detail or {}})
        with self._tx() as db:
            db.execute(
                f"UPDATE runs SET {', '.join(f'{k} = ?' for k in cols)}, updated = ? WHERE run_id = ?",
                (*cols.values(), now, run_id),
            )
            self._event(db, run_id, now, "verdict", {"verdict": str(verdict), **(detail or {})})

    def claim(self, run_id: str, pid: int) -> None:
        """This process now watches the run (train, attach)."""
        self.update(
            run_id, pid=pid, owner_host=socket.gethostname(), owner_started=process_started(pid), heartbeat=time.time()
        )

    def heartbeat(self, run_id: str) -> None:
        self.update(run_id, heartbeat=time.time())

    def phase_start(self, run_id: str, phase: str, node: int | None = None) -> int:
        if phase not in PHASES:
            raise ValueError(phase)
        with self._tx() as db:
            cur = db.execute(
                "INSERT INTO phases (run_id, phase, node, started) VALUES (?, ?, ?, ?)",
                (run_id, phase, node, time.time()),
            )
            return int(cur.lastrowid or 0)

    def phase_end(self, phase_id: int) -> None:
        with self._tx() as db:
            db.execute("UPDATE phases SET ended = ? WHERE id = ? AND ended IS NULL", (time.time(), phase_id))

    def end_open_phases(self, run_id: str) -> None:
        with self._tx() as db:
            db.execute("UPDATE phases SET ended = ? WHERE run_id = ? AND ended IS NULL", (time.time(), run_id))

    def event(self, run_id: str, kind: str, data: dict[str, Any]) -> None:
        with self._tx() as db:
            self._event(db, run_id, time.time(), kind, data)

    def resource(self, run_id: str, resource_id: str, type_: str, name: str, status: str) -> None:
        with self._tx() as db:
            db.execute(
                "INSERT INTO resources (run_id, resource_id, type, name, status, updated) VALUES (?, ?, ?, ?, ?, ?)"
                " ON CONFLICT(run_id, resource_id) DO UPDATE SET status = excluded.status,"
                " updated = excluded.updated",
                (run_id, resource_id, type_, name, status, time.time()),
            )

    def attempt(
        self,
        run_id: str,
        n: int,
        candidate: dict[str, Any],
        code: str | None,
        message: str | None,
        seconds: float,
    ) -> None:
        """Record one provisioning attempt; `candidate` as Candidate.to_json()."""
        with self._tx() as db:
            db.execute(
                "INSERT INTO attempts (run_id, n, vm_size, region, zone, spot, code, message, seconds, at)"
                " VALUES (?, ?, ?, ?, ?, ?, ?, ?, ?, ?)",
                (
                    run_id,
                    n,
                    candidate["vm_size"],
                    candidate["region"],
                    candidate.get("zone"),
                    int(bool(candidate.get("spot"))),
                    code,
                    message,
                    seconds,
                    time.time(),
                ),
            )

    def mark_resources(self, run_id: str, status: str) -> None:
        with self._tx() as db:
            db.execute("UPDATE resources SET status = ?, updated = ? WHERE run_id = ?", (status, time.time(), run_id))

    # -------------------------------------------------------------------------------------- reads

    def _rows(self, sql: str, args: tuple[Any, ...]) -> list[sqlite3.Row]:
        try:
            db = self._connect()
        except sqlite3.DatabaseError as e:
            raise StoreError(_unreadable(self.path, e)) from None
        try:
            db.row_factory = sqlite3.Row
            return list(db.execute(sql, args).fetchall())
        except sqlite3.DatabaseError as e:
            raise StoreError(_unreadable(self.path, e)) from None
        finally:
            db.close()

    def get(self, run_id: str) -> RunRecord | None:
        rows = self._rows("SELECT * FROM runs WHERE run_id = ?", (run_id,))
        return _record(rows[0]) if rows else None

    def run_ids(self) -> list[str]:
        return [r["run_id"] for r in self._rows("SELECT run_id FROM runs ORDER BY created DESC", ())]

    def runs(self, limit: int = 50, active_only: bool = False) -> list[RunRecord]:
        where = f"WHERE state IN ({', '.join('?' * len(ACTIVE))})" if active_only else ""
        rows = self._rows(
            f"SELECT * FROM runs {where} ORDER BY created DESC LIMIT ?",
            (*(sorted(ACTIVE) if active_only else ()), limit),
        )
        return [_record(r) for r in rows]

    def events(self, run_id: str) -> list[tuple[float, str, dict[str, Any]]]:
        rows = self._rows("SELECT at, kind, data FROM events WHERE run_id = ? ORDER BY id", (run_id,))
        return [(r["at"], r["kind"], json.loads(r["data"])) for r in rows]

    def cancel_requested(self, run_id: str) -> bool:
        """`orchestrator cancel` asked for this run (the watching process ends it as cancelled)."""
        return bool(self._rows("SELECT 1 FROM events WHERE run_id = ? AND kind = 'cancel' LIMIT 1", (run_id,)))

    def phases(self, run_id: str) -> list[Phase]:
        rows = self._rows("SELECT phase, node, started, ended FROM phases WHERE run_id = ? ORDER BY id", (run_id,))
        return [Phase(r["phase"], r["node"], r["started"], r["ended"]) for r in rows]

    def attempts(self, run_id: str) -> list[AttemptRecord]:
        rows = self._rows("SELECT * FROM attempts WHERE run_id = ? ORDER BY id", (run_id,))
        return [
            AttemptRecord(
                r["n"], r["vm_size"], r["region"], r["zone"], bool(r["spot"]), r["code"], r["message"], r["seconds"]
            )
            for r in rows
        ]

    def resources(self, run_id: str) -> list[tuple[str, str, str]]:
        rows = self._rows("SELECT type, name, status FROM resources WHERE run_id = ? ORDER BY rowid", (run_id,))
        return [(r["type"], r["name"], r["status"]) for r in rows]


_UPDATABLE = frozenset(
    {
        "exit_code",
        "error",
        "artifacts",
        "metrics",
        "torn_down",
        "pid",
        "verdict",
        "detail",
        "owner_host",
        "owner_started",
        "heartbeat",
        "env",
        "price_per_hour",
        "autostop",
        "restarts",
        "expires",
    }
)
_JSON = frozenset({"metrics", "detail", "env"})
_SHOWN = frozenset({"exit_code", "error", "artifacts", "torn_down"})


def _columns(fields: dict[str, Any]) -> dict[str, Any]:
    return {k: (json.dumps(v) if k in _JSON else v) for k, v in fields.items() if k in _UPDATABLE}


def _record(row: sqlite3.Row) -> RunRecord:
    d = dict(row)
    for k in _JSON:
        d[k] = json.loads(d[k]) if d.get(k) else {}
    d["torn_down"] = bool(d["torn_down"])
    fields: dict[str, Any] = {k: d.get(k) for k in RunRecord.__dataclass_fields__}
    return RunRecord(**fields)


def _migrate_v1(db: sqlite3.Connection, columns: set[str]) -> None:
    """A store written before verdicts: add the columns, map its states, infer each ended run's
    verdict from what it recorded, and turn its state events into phase intervals."""
    for column, kind in (
        ("verdict", "TEXT"),
        ("detail", "TEXT"),
        ("owner_host", "TEXT"),
        ("owner_started", "REAL"),
        ("heartbeat", "REAL"),
        ("env", "TEXT"),
    ):
        if column not in columns:
            db.execute(f"ALTER TABLE runs ADD COLUMN {column} {kind}")
    db.execute(
        "CREATE TABLE IF NOT EXISTS phases (id INTEGER PRIMARY KEY AUTOINCREMENT, run_id TEXT NOT NULL,"
        " phase TEXT NOT NULL, node INTEGER, started REAL NOT NULL, ended REAL)"
    )
    rows = db.execute("SELECT run_id, state, exit_code, error, torn_down FROM runs").fetchall()
    for run_id, state, code, error, torn_down in rows:
        verdict: str | None = None
        new_state = _V1_STATES.get(state, state)
        if state in {"done", "failed"}:
            verdict = _v1_verdict(state, code, error)
            new_state = "gone" if torn_down else "tearing-down"
        elif state == "kept" and code is not None:
            verdict = Verdict.SUCCEEDED if code == 0 else Verdict.JOB_FAILED
        db.execute("UPDATE runs SET state = ?, verdict = ? WHERE run_id = ?", (new_state, verdict, run_id))
        events = db.execute(
            "SELECT at, data FROM events WHERE run_id = ? AND kind = 'state' ORDER BY id", (run_id,)
        ).fetchall()
        states = [(at, json.loads(data).get("state")) for at, data in events]
        for (at, st), (nxt, _) in zip(states, [*states[1:], (None, None)], strict=True):
            if st in _V1_PHASES:
                db.execute(
                    "INSERT INTO phases (run_id, phase, node, started, ended) VALUES (?, ?, NULL, ?, ?)",
                    (run_id, _V1_PHASES[st], at, nxt),
                )


def _migrate_v3(db: sqlite3.Connection, columns: set[str]) -> None:
    """v4's columns on a store written before them (a fresh store gets them from SCHEMA)."""
    for column, kind in (
        ("price_per_hour", "REAL"),
        ("autostop", "REAL"),
        ("restarts", "INTEGER NOT NULL DEFAULT 0"),
        ("expires", "REAL"),
    ):
        if column not in columns:
            db.execute(f"ALTER TABLE runs ADD COLUMN {column} {kind}")


def _v1_verdict(state: str, code: int | None, error: str | None) -> str:
    error = error or ""
    if error.startswith("metric gate failed"):
        return Verdict.GATE_FAILED
    if error == "interrupted":
        return Verdict.INTERRUPTED
    if "max_duration" in error:
        return Verdict.TIMED_OUT
    if "budget" in error:
        return Verdict.OVER_BUDGET
    if code not in (None, 0):
        return Verdict.JOB_FAILED
    if state == "done":
        return Verdict.SUCCEEDED
    if "artifact" in error or "manifest" in error:
        return Verdict.ARTIFACTS_INCOMPLETE
    return Verdict.AZURE_REFUSED


def _unreadable(path: Path, e: Exception) -> str:
    return (
        f"The run store {path} cannot be read ({e}). Your runs' resources are not affected: `orchestrator "
        "down RUN` still finds a run's resource group by its tag, and `orchestrator gc` finds them all. To start "
        f"a fresh store, move the file away (mv {path} {path}.broken); the runs it listed are then known only "
        "by their tags."
    )


def _unwritable(path: Path, e: Exception) -> str:
    return (
        f"The run store {path} cannot be written ({e}). Check that the state directory {path.parent} is "
        "yours and writable (or pass --state-dir DIR to use another); `orchestrator down RUN` still works "
        "from the run's tag."
    )


def open_store(state_dir: Path) -> RunStore:
    return RunStore(state_dir / "runs.db")
