"""The emulator's store on disk, shared by every CLI process on --target local.

Each request takes an exclusive lock, reads what it needs, is handled, and writes back what
changed: like Azure, the state lives outside any one process, a command killed with SIGKILL leaves
behind exactly what it had created, and a `down` in another terminal acts at once while a `run` is
training.

On disk (beside `store.lock`), the folder `store/` holds `subscription.json` (the subscription's
settings, operations, and anything outside a resource group) and one file per resource group under
`groups/` (the group, its resources, the role assignments at its scope). A request reads the
subscription file and the groups it touches (store.ShardedDict), so its cost does not grow with the
other runs' resources. An older single `store.json` is split on first use.
"""

from __future__ import annotations

import fcntl
import json
import os
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any
from urllib.parse import quote, unquote

from orchestrator.emulator.store import SHARDED, ShardedDict, Store, group_of


class StoreFile:
    def __init__(self, path: Path) -> None:
        """`path`: where the store's single file was kept (`<emulator dir>/store.json`); the lock
        is `store.lock` and the store the folder `store/` beside it."""
        self.legacy = path
        self.root = path.with_suffix("")
        self.groups_dir = self.root / "groups"
        self.subscription = self.root / "subscription.json"
        path.parent.mkdir(parents=True, exist_ok=True)
        self._lock_path = path.with_suffix(".lock")
        self._opened: _Opened | None = None

    @contextmanager
    def locked(self) -> Iterator[None]:
        with open(self._lock_path, "a+") as lock:
            fcntl.flock(lock, fcntl.LOCK_EX)
            try:
                yield
            finally:
                fcntl.flock(lock, fcntl.LOCK_UN)

    def exists(self) -> bool:
        return self.subscription.exists() or self.legacy.exists()

    # ------------------------------------------------------------------ inside the lock

    def open(self) -> Store:
        """The store, reading each resource group in when first touched. Call with the lock held,
        and hand it to commit() before letting go."""
        if self.legacy.exists():
            self._split_legacy()
        return self._open()

    def _open(self) -> Store:
        text = _read(self.subscription)
        sub = json.loads(text) if text else {}
        unsharded = {name: sub.pop(name, {}) for name in SHARDED}
        store = Store(**sub)
        view = _Opened(self, store, text)
        for name in SHARDED:
            setattr(store, name, ShardedDict(unsharded[name], view.load))
        self._opened = view
        return store

    def commit(self, store: Store) -> None:
        """Write what changed since open(): each group read in, and the subscription's file."""
        view, self._opened = self._opened, None
        if view is None or view.store is not store:
            raise RuntimeError("commit() of a store this StoreFile did not open last")
        buckets: dict[str | None, dict[str, dict[str, Any]]] = {g: {n: {} for n in SHARDED} for g in view.texts}
        buckets[None] = {n: {} for n in SHARDED}
        for name in SHARDED:
            for key, value in getattr(store, name).loaded().items():
                group = group_of(key)
                buckets.setdefault(group, {n: {} for n in SHARDED})[name][key] = value
        for group, sections in buckets.items():
            if group is None:
                continue
            before = view.texts.get(group, "")
            after = _dump(sections) if any(sections.values()) else ""
            if after == before:
                continue
            path = self._group_path(group)
            if after:
                _write(path, after)
            else:
                path.unlink(missing_ok=True)
        rest = {k: v for k, v in store.__dict__.items() if k not in SHARDED}
        after = _dump({**rest, **buckets[None]})
        if after != view.subscription_text:
            _write(self.subscription, after)

    def load(self) -> Store:
        """Everything, read at once (a snapshot: call with the lock held to be exact)."""
        store = self.open()
        for name in SHARDED:
            getattr(store, name).items()  # reads every group in
        self._opened = None
        snapshot = Store(**{k: v for k, v in store.__dict__.items() if k not in SHARDED})
        for name in SHARDED:
            setattr(snapshot, name, ShardedDict(getattr(store, name).loaded()))
        return snapshot

    def save(self, store: Store) -> None:
        """Write a whole store (one from load(), changed): every group, the subscription's file."""
        with_nothing = self._open()
        with_nothing.groups.items()  # every group on disk now, so that those `store` lacks go
        for name in SHARDED:
            section = getattr(with_nothing, name)
            for key in list(section.loaded()):
                dict.__delitem__(section, key)
            for key, value in getattr(store, name).items():
                dict.__setitem__(section, key, value)
        for k, v in store.__dict__.items():
            if k not in SHARDED:
                setattr(with_nothing, k, v)
        self.commit(with_nothing)

    # ------------------------------------------------------------------ outside the lock

    def resource(self, key: str) -> dict[str, Any] | None:
        """One resource as last written (no lock: each file is replaced whole, never torn)."""
        try:
            text = _read(self.file_of(key))
            found = json.loads(text).get("resources", {}).get(key) if text else None
        except ValueError:
            return None
        return found if isinstance(found, dict) else None

    def file_of(self, key: str) -> Path:
        """The file that holds a lower-cased id's entry (its resource group's; it goes with it)."""
        group = group_of(key)
        return self._group_path(group) if group is not None else self.subscription

    # ------------------------------------------------------------------ plumbing

    def _group_path(self, group: str) -> Path:
        # "/subscriptions/<sub>/resourcegroups/<rg>": one folder per subscription, a file per group
        _, _, sub, _, rg = group.split("/", 4)
        return self.groups_dir / quote(sub, safe="") / f"{quote(rg, safe='')}.json"

    def _group_files(self) -> dict[str, Path]:
        found = {}
        for path in self.groups_dir.glob("*/*.json"):
            found[f"/subscriptions/{unquote(path.parent.name)}/resourcegroups/{unquote(path.stem)}"] = path
        return found

    def _split_legacy(self) -> None:
        text = _read(self.legacy)
        if text:
            self.save(Store.from_json(text))
        self.legacy.unlink()


class _Opened:
    """The groups one open() has read in, and the text each was read as (commit compares)."""

    def __init__(self, owner: StoreFile, store: Store, subscription_text: str) -> None:
        self.owner = owner
        self.store = store
        self.subscription_text = subscription_text
        self.texts: dict[str, str] = {}
        self.all = False

    def load(self, group: str | None) -> None:
        if self.all or (group is not None and group in self.texts):
            return
        if group is None:
            for key, path in self.owner._group_files().items():
                if key not in self.texts:
                    self._read_in(key, path)
            self.all = True
        else:
            self._read_in(group, self.owner._group_path(group))

    def _read_in(self, group: str, path: Path) -> None:
        text = _read(path)
        sections = json.loads(text) if text else {}  # a file that does not parse fails the request...
        self.texts[group] = text  # ...and is never taken for an emptied group (commit deletes those)
        for name in SHARDED:
            target = getattr(self.store, name)
            for key, value in sections.get(name, {}).items():
                dict.__setitem__(target, key, value)


def _read(path: Path) -> str:
    try:
        return path.read_text()
    except FileNotFoundError:
        return ""


def _dump(data: dict[str, Any]) -> str:
    return json.dumps(data, sort_keys=True)


def _write(path: Path, text: str) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".{path.name}.tmp{os.getpid()}")
    tmp.write_text(text)
    os.replace(tmp, path)
