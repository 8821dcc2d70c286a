"""A spot run's checkpoints over SSH: copied home while the job runs (periodically, and at once when
the VM-side watcher, templates/preempt-watch.py, has seen Azure's Preempt notice and left its
marker), and restored to every node before a restart (lifecycle/recovery.py)."""

from __future__ import annotations

import re
import shutil
import tarfile
import tempfile
import threading
from collections.abc import Callable
from pathlib import Path
from typing import Any

from orchestrator.remote.layout import rq

PREEMPT_MARKER = "preempted"  # in the run's folder on the VM (RemoteLayout.root)


class CheckpointShipper:
    """One thread per node: waits on the VM (one command per interval) for the interval to pass or
    the Preempt marker to appear, then copies the node's checkpoint folder home if it changed."""

    def __init__(self, nodes: list[Any], layout: Any, home: Path, interval: float, say: Callable[[str], None]) -> None:
        self.layout, self.home, self.interval, self.say = layout, home, interval, say
        self._stop = threading.Event()
        self._seen: dict[int, str] = {}
        self._pulling = threading.Lock()  # held while a copy writes home/<rank>
        self._threads = [threading.Thread(target=self._loop, args=(n,), daemon=True) for n in nodes]
        for t in self._threads:
            t.start()

    def _loop(self, node: Any) -> None:
        marker = rq(f"{self.layout.root}/{PREEMPT_MARKER}")
        ticks = max(1, round(self.interval * 2))
        wait = (
            f"i=0; while [ $i -lt {ticks} ] && [ ! -e {marker} ]; do sleep 0.5; i=$((i+1)); done; "
            f"[ -e {marker} ] && echo preempt || echo tick"
        )
        announced = False
        while not self._stop.is_set():
            try:
                preempt = node.exec(wait, timeout=self.interval + 30).text.strip() == "preempt"
                if self._stop.is_set():
                    return
                if preempt and not announced:
                    announced = True
                    self.say(
                        f"node {node.ep.rank}: Azure announced a spot eviction (Preempt); copying its checkpoint home"
                    )
                with self._pulling:
                    if self._stop.is_set():
                        return
                    pull(node, self.layout, self.home, self._seen)
                if preempt:
                    self._stop.wait(1.0)  # until the VM goes: the job may still write a last one
            except Exception:  # the connection is gone (eviction?) or cancelled: the watch decides
                if self._stop.wait(1.0):
                    return

    def cancel(self, wait_s: float = 30.0) -> None:
        """Stop, and wait (a while) for a copy under way to finish: `recover` pulls the same folders
        next. A thread only waiting on the VM is not waited for."""
        self._stop.set()
        if self._pulling.acquire(timeout=wait_s):
            self._pulling.release()


def pull(node: Any, layout: Any, home: Path, seen: dict[int, str]) -> bool:
    """Copy the node's checkpoint folder home (`home/<rank>`) if it changed since the last copy;
    replaced whole once received. True if copied."""
    rank = node.ep.rank
    ckpt = rq(layout.checkpoints)
    cmd = (
        f"cd {ckpt} 2>/dev/null || exit 0; fp=$(find . -type f ! -name '*.tmp' -printf '%P %s %T@\\n' | sort | cksum); "
        f'echo "$fp" >&2; [ -z "$(ls -A)" ] && exit 0; [ "$fp" = {seen.get(rank, "-")!r} ] && exit 0; '
        "tar --exclude='*.tmp' -cf - . 2>/dev/null; [ $? -le 1 ]"
    )
    final = home / str(rank)
    incoming = home / f".incoming-{rank}"
    shutil.rmtree(incoming, ignore_errors=True)
    incoming.mkdir(parents=True, mode=0o700)
    # Streamed straight into place, never held in memory: a checkpoint may be gigabytes.
    chan = node.channel(cmd)
    chan.settimeout(600)
    try:
        try:
            with tarfile.open(fileobj=chan.makefile("rb"), mode="r|") as tar:
                tar.extractall(incoming, filter="data")
        except tarfile.ReadError:  # nothing sent (unchanged or empty), or a broken stream: not kept
            shutil.rmtree(incoming, ignore_errors=True)
            incoming.mkdir(mode=0o700)
        code = chan.recv_exit_status()
        fingerprint = chan.makefile_stderr("rb").read().decode(errors="replace").strip().splitlines()[-1:] or [""]
    finally:
        chan.close()
    if code != 0 or not any(incoming.iterdir()):
        shutil.rmtree(incoming, ignore_errors=True)
        return False
    old = home / f".old-{rank}"
    shutil.rmtree(old, ignore_errors=True)
    if final.exists():
        final.rename(old)
    incoming.rename(final)
    shutil.rmtree(old, ignore_errors=True)
    seen[rank] = fingerprint[0]
    return True


def restore(node: Any, layout: Any, home: Path) -> Path | None:
    """Replace the node's checkpoint folder with the latest copy home: its own rank's if it has one,
    else rank 0's (the rank that writes them in the example jobs); an empty folder when there is
    none, so every rank starts from the same place. Returns the copy used."""
    source = next((home / str(r) for r in (node.ep.rank, 0) if has_files(home / str(r))), None)
    ckpt = rq(layout.checkpoints)
    with tempfile.TemporaryFile() as data:  # streamed, never held in memory
        with tarfile.open(fileobj=data, mode="w") as tar:
            if source is not None:
                for path in sorted(source.rglob("*")):
                    tar.add(path, arcname=str(path.relative_to(source)), recursive=False)
        data.seek(0)
        chunks = iter(lambda: data.read(1 << 20), b"")
        node.exec(f"rm -rf {ckpt} && mkdir -p {ckpt} && tar -C {ckpt} -xf -", chunks).check("restoring the checkpoint")
    return source


def has_files(folder: Path) -> bool:
    return folder.is_dir() and any(p.is_file() for p in folder.rglob("*"))


def latest_step(folder: Path | None) -> int | None:
    """The step of the latest checkpoint, read from the numbers in its file names (ckpt-00000120.pt)."""
    if folder is None:
        return None
    steps = [int(m) for p in folder.rglob("*") if p.is_file() for m in re.findall(r"\d+", p.name)[-1:]]
    return max(steps) if steps else None
