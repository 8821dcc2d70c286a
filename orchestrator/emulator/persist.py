"""The emulator's store on disk, shared by every CLI process on --target local.

Each request takes an exclusive lock on the file, reads the store, is handled, and writes the store
back if it changed: like Azure, the state lives outside any one process, a command killed with
SIGKILL leaves behind exactly what it had created, and a `down` in another terminal acts at once
while a `run` is training.
"""

from __future__ import annotations

import fcntl
import os
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

from orchestrator.emulator.store import Store


class StoreFile:
    def __init__(self, path: Path) -> None:
        self.path = path
        path.parent.mkdir(parents=True, exist_ok=True)
        self._lock_path = path.with_suffix(".lock")

    @contextmanager
    def locked(self) -> Iterator[None]:
        with open(self._lock_path, "a+") as lock:
            fcntl.flock(lock, fcntl.LOCK_EX)
            try:
                yield
            finally:
                fcntl.flock(lock, fcntl.LOCK_UN)

    def load(self) -> Store:
        return Store.from_json(self.read_text())

    def read_text(self) -> str:
        """The store as written (a missing or empty file: the empty store's text)."""
        try:
            text = self.path.read_text()
        except FileNotFoundError:
            text = ""
        return text or Store().to_json()

    def save(self, store: Store) -> None:
        self.write_text(store.to_json())

    def write_text(self, text: str) -> None:
        tmp = self.path.with_suffix(f".tmp{os.getpid()}")
        tmp.write_text(text)
        os.replace(tmp, self.path)
