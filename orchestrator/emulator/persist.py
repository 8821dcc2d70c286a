"""The emulator's store on disk, so separate CLI processes on --target local see the same Azure.

One process at a time holds the file (an flock for the whole command); the store is loaded at
entry and written back atomically at exit, even when the command failed, because resources it
created before failing are real to the next command.
"""

from __future__ import annotations

import fcntl
import os
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

from orchestrator.clock import SystemClock
from orchestrator.emulator.arm import Emulator, Store


@contextmanager
def persistent_emulator(path: Path, profile: str = "instant") -> Iterator[Emulator]:
    path.parent.mkdir(parents=True, exist_ok=True)
    lock_path = path.with_suffix(".lock")
    with open(lock_path, "a+") as lock:
        fcntl.flock(lock, fcntl.LOCK_EX)
        store = Store.from_json(path.read_text()) if path.exists() and path.stat().st_size else Store()
        emulator = Emulator(profile, clock=SystemClock(), store=store)
        try:
            yield emulator
        finally:
            tmp = path.with_suffix(".tmp")
            tmp.write_text(emulator.store.to_json())
            os.replace(tmp, path)
