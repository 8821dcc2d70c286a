"""Artifacts down: the outputs as one (zstd) tar stream with a sha256 manifest made on the VM.

The VM side (templates/collect-artifacts.py) streams the files and hashes each one as it sends it;
its manifest travels as the stream's last member, NUL-separated so any file name round-trips.
Collection keeps every safe member and lists the others: a link leaving the outputs, a FIFO, a
socket, a device, a member that fails verification. A link that resolves inside the outputs comes
home as a relative link. Home side, every member is checked again (no absolute path, no `..`, no
write through a link, links relative and inside), and every file against the manifest.

Never delete what the tool did not create: a destination folder is replaced only if it does not
exist, is empty, or carries the tool's marker (`.orchestrator-artifacts`, written into every
folder the tool fills). Otherwise the files go into `<dest>/<run id>/` (by the same rule). Files
land in an `.incoming-orch-*` folder next to the destination and replace it only once verified;
the old copy is removed after the rename, and the folders of the other nodes (`nodes/<rank>`) of
the same run are carried over into the new copy.
"""

from __future__ import annotations

import contextlib
import hashlib
import io
import json
import os
import re
import secrets
import shlex
import shutil
import stat
import tarfile
import threading
import time
from collections.abc import Iterator
from dataclasses import dataclass, field
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

from orchestrator.bootstrap import TEMPLATES
from orchestrator.errors import OrchestratorError
from orchestrator.remote.connect import ConnectionLost, Node
from orchestrator.remote.layout import RemoteLayout, rq

MANIFEST = ".orchestrator-sha256"
MARKER = ".orchestrator-artifacts"
INCOMING = ".incoming-"
_OURS = re.compile(r"^\.incoming-orch-(\d+)-[0-9a-f]{12}(-old)?$")
_active: set[Path] = set()  # this process's .incoming-orch-* folders, in use by a collection
_active_lock = threading.Lock()


class ArtifactError(OrchestratorError):
    pass


@dataclass
class CollectReport:
    files: int
    bytes: int
    wire_bytes: int
    seconds: float
    destination: Path
    skipped: list[tuple[str, str]] = field(default_factory=list)  # (path, reason), not brought home


@dataclass
class Extracted:
    files: int = 0
    bytes: int = 0
    skipped: list[tuple[str, str]] = field(default_factory=list)


# ------------------------------------------------------------------------------- destinations


def read_marker(folder: Path) -> dict[str, Any] | None:
    """The tool's marker in `folder`, or None if there is none (or it is not ours)."""
    try:
        path = folder / MARKER
        if path.is_symlink() or not path.is_file():
            return None
        data = json.loads(path.read_text())
    except (OSError, ValueError):
        return None
    return data if isinstance(data, dict) and isinstance(data.get("run_id"), str) else None


def _ours(entry: Path) -> bool:
    """A folder the tool made: a marked one, or one of our .incoming-orch-* folders."""
    return (
        entry.is_dir() and not entry.is_symlink() and (_OURS.match(entry.name) is not None or bool(read_marker(entry)))
    )


def _replaceable(folder: Path) -> bool:
    """Not there, empty, marked, or holding only other nodes' folders that the tool made."""
    if not folder.exists():
        return True
    entries = list(folder.iterdir())
    if not entries or read_marker(folder) is not None:
        return True
    for entry in entries:
        if _OURS.match(entry.name) and _ours(entry):
            continue
        nodes = entry.name == "nodes" and entry.is_dir() and not entry.is_symlink()
        if nodes and all(_ours(child) for child in entry.iterdir()):
            continue
        return False
    return True


def resolve_destination(dest: Path, run_id: str) -> Path:
    """Where collecting into `dest` puts the files: `dest` itself if it does not exist, is empty
    or was filled by this tool (it carries the marker); otherwise `<dest>/<run id>/`, by the same
    rule. Absolute; a symlink given as `dest` is followed."""
    path = Path(os.path.abspath(dest))
    if path.is_symlink():
        path = path.resolve()
    for _ in range(32):
        if path.exists() and not path.is_dir():
            raise ArtifactError(f"The artifacts destination {path} is a file, not a folder; choose another.")
        if _replaceable(path):
            return path
        path = path / run_id
    raise ArtifactError(f"No free artifacts folder under {dest} for {run_id}; choose another destination.")


def _pid_alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    return True


def remove_leftovers(parent: Path) -> list[Path]:
    """Remove `.incoming-*` folders a killed collection left in `parent`: ours by name
    (`.incoming-orch-<pid>-<hex>` whose process is gone, or ours and no longer in use), or any
    `.incoming-*` folder carrying the tool's marker. Anything else is left alone."""
    removed: list[Path] = []
    try:
        entries = list(parent.iterdir())
    except OSError:
        return removed
    with _active_lock:
        active = set(_active)
    for entry in entries:
        if not entry.name.startswith(INCOMING) or entry.is_symlink() or not entry.is_dir():
            continue
        m = _OURS.match(entry.name)
        if m is not None:
            pid = int(m.group(1))
            stale = entry not in active if pid == os.getpid() else not _pid_alive(pid)
        else:
            stale = read_marker(entry) is not None
        if stale:
            shutil.rmtree(entry, ignore_errors=True)
            removed.append(entry)
    return removed


def _new_incoming(parent: Path, suffix: str = "") -> Path:
    path = parent / f"{INCOMING}orch-{os.getpid()}-{secrets.token_hex(6)}{suffix}"
    with _active_lock:
        _active.add(path)
    path.mkdir(mode=0o700)
    return path


def _release_incoming(path: Path) -> None:
    if path.exists() and not path.is_symlink():
        shutil.rmtree(path, ignore_errors=True)
    with _active_lock:
        _active.discard(path)


def write_marker(folder: Path, run_id: str, rank: int) -> None:
    marker = {"run_id": run_id, "node_rank": rank, "collected_at": datetime.now(UTC).isoformat(timespec="seconds")}
    (folder / MARKER).write_text(json.dumps(marker) + "\n")


def _carry_nodes(old: Path, new: Path, run_id: str) -> None:
    """Move the other nodes' folders of the same run from the old copy into the new one."""
    nodes = old / "nodes"
    if not nodes.is_dir() or nodes.is_symlink():
        return
    for child in nodes.iterdir():
        marker = read_marker(child) if child.is_dir() and not child.is_symlink() else None
        if marker is None or marker.get("run_id") != run_id or (new / "nodes" / child.name).exists():
            continue
        (new / "nodes").mkdir(exist_ok=True)
        child.rename(new / "nodes" / child.name)


def _install(incoming: Path, final: Path, run_id: str) -> None:
    """Put the verified `incoming` folder in place of `final` (which is replaceable)."""
    if not final.exists():
        incoming.rename(final)
        return
    if final == Path.cwd() or not any(final.iterdir()):
        # An empty folder the user made, or the working directory: fill it in place, so the folder
        # itself, its mode and a shell standing in it stay. The marker goes in last.
        old = _new_incoming(final.parent, "-old")
        try:
            _carry_nodes(final, incoming, run_id)
            for entry in list(final.iterdir()):
                entry.rename(old / entry.name)
            for entry in sorted(incoming.iterdir(), key=lambda e: e.name == MARKER):
                entry.rename(final / entry.name)
        finally:
            _release_incoming(old)
        return
    old = _new_incoming(final.parent, "-old")
    old.rmdir()
    try:
        final.rename(old)
        incoming.rename(final)
        _carry_nodes(old, final, run_id)
    finally:
        _release_incoming(old)


# ----------------------------------------------------------------------------------- the stream


def collect_command(layout: RemoteLayout, extra: list[str]) -> str:
    """The VM side: collect-artifacts.py (sent inline) streams a tar with its manifest last,
    through zstd when the VM has it."""
    script = (TEMPLATES / "collect-artifacts.py").read_text()
    args = " ".join(shlex.quote(p) for p in extra)
    return (
        f"mkdir -p {rq(layout.root)} && cd {rq(layout.root)} && "  # a run that never synced has none yet
        "{ command -v zstd >/dev/null 2>&1 && Z='zstd -1 -T0 -q -c' || Z=cat; } && "
        f"python3 -c {shlex.quote(script)} {args} | $Z"
    )


def _chunks(chan: object) -> Iterator[bytes]:
    while True:
        data = chan.recv(1 << 20)  # type: ignore[attr-defined]
        if not data:
            return
        yield data


class _ChannelRaw(io.RawIOBase):
    """The channel's bytes as a raw stream; wrapped in a BufferedReader so tarfile's many small
    reads cost no copying of large buffers."""

    def __init__(self, chunks: Iterator[bytes]) -> None:
        self._chunks = chunks
        self._chunk = memoryview(b"")
        self.wire = 0

    def readable(self) -> bool:
        return True

    def readinto(self, buffer: Any) -> int:
        if not self._chunk:
            try:
                data = next(self._chunks)
            except StopIteration:
                return 0
            self.wire += len(data)
            self._chunk = memoryview(data)
        n = min(len(buffer), len(self._chunk))
        buffer[:n] = self._chunk[:n]
        self._chunk = self._chunk[n:]
        return n


def parse_manifest(data: bytes) -> dict[str, tuple[str, str]]:
    """NUL-separated records (see templates/collect-artifacts.py) -> {name: (kind, value)}."""
    fields = data.split(b"\0")
    out: dict[str, tuple[str, str]] = {}
    i = 0
    while i + 1 < len(fields):
        kind = fields[i].decode("ascii", errors="replace")
        name = fields[i + 1].decode("utf-8", errors="surrogateescape")
        if kind == "D":
            out[name] = (kind, "")
            i += 2
            continue
        if i + 2 >= len(fields):
            break
        out[name] = (kind, fields[i + 2].decode("utf-8", errors="surrogateescape"))
        i += 3
    return out


def _safe_name(name: str) -> str | None:
    """The member's relative path, or None if it is absolute, climbs out, or is empty."""
    name = name.removeprefix("./")
    if not name or name.startswith("/") or "\0" in name:
        return None
    parts = [p for p in name.split("/") if p not in ("", ".")]
    if not parts or ".." in parts:
        return None
    return "/".join(parts)


def _link_ok(name: str, target: str) -> bool:
    """A relative target that stays inside: only leading `..`, no deeper than the link's folder."""
    if not target or target.startswith("/") or "\0" in target:
        return False
    parts = [p for p in target.split("/") if p not in ("", ".")]
    ups = 0
    while ups < len(parts) and parts[ups] == "..":
        ups += 1
    return ".." not in parts[ups:] and ups <= name.count("/")


def _parent(dest: Path, name: str) -> Path:
    """The folder for member `name` under dest, made if needed; refuses to pass through a link."""
    folder = dest
    for part in name.split("/")[:-1]:
        folder = folder / part
        try:
            st = os.lstat(folder)
        except FileNotFoundError:
            folder.mkdir(mode=0o755)
            continue
        if not stat.S_ISDIR(st.st_mode):
            raise OSError(f"{part!r} on its path is not a folder")
    return folder


def extract_verified(stream: object, dest: Path) -> Extracted:
    """Extract a tar stream carrying its manifest (the last member) into `dest`. Keeps every member
    that is safe and matches the manifest; lists the others in `skipped`."""
    result = Extracted()
    manifest: dict[str, tuple[str, str]] | None = None
    seen: dict[str, tuple[str, str, int]] = {}  # name -> (kind, digest or target, size)
    skipped: dict[str, str] = {}
    dest.mkdir(parents=True, exist_ok=True)
    with tarfile.open(  # type: ignore[call-overload]
        fileobj=stream, mode="r|", ignore_zeros=True, encoding="utf-8", errors="surrogateescape"
    ) as tar:
        for member in tar:
            if member.name == MANIFEST and member.isfile() and manifest is None:
                f = tar.extractfile(member)
                manifest = parse_manifest(f.read() if f else b"")
                continue
            name = _safe_name(member.name)
            if name is None:
                skipped.setdefault(member.name, "unsafe path (absolute or outside the outputs)")
                continue
            if name in seen or name in skipped or name in (MANIFEST, MARKER):
                skipped.setdefault(name, "duplicate or reserved name")
                continue
            try:
                if member.isdir():
                    folder = _parent(dest, name + "/x") if name else dest
                    seen[name] = ("D", "", 0)
                    with contextlib.suppress(OSError):
                        folder.chmod(member.mode & 0o755 | 0o700)
                elif member.issym():
                    if not _link_ok(name, member.linkname):
                        skipped[name] = f"link leaves the outputs: {member.linkname}"
                        continue
                    os.symlink(member.linkname, _parent(dest, name) / name.rsplit("/", 1)[-1])
                    seen[name] = ("L", member.linkname, 0)
                elif member.isfile():
                    h = hashlib.sha256()
                    target = _parent(dest, name) / name.rsplit("/", 1)[-1]
                    src = tar.extractfile(member)
                    flags = os.O_WRONLY | os.O_CREAT | os.O_EXCL | os.O_NOFOLLOW
                    fd = os.open(target, flags, member.mode & 0o755 | 0o600)
                    with open(fd, "wb") as out:
                        while src is not None and (block := src.read(1 << 20)):
                            h.update(block)
                            out.write(block)
                    seen[name] = ("F", h.hexdigest(), member.size)
                else:
                    kind = "hard link" if member.islnk() else "special file (FIFO, device)"
                    skipped[name] = f"{kind}: not brought home"
            except OSError as e:
                skipped[name] = f"could not be written: {e}"
    if manifest is None:
        raise ArtifactError("The artifact stream ended without its manifest (cut short?); refusing it.")
    for name, (kind, value) in manifest.items():
        if kind == "S":
            skipped.setdefault(name, value)
        elif name not in seen and name not in skipped:
            skipped[name] = "missing from the stream"
    for name, (kind, value, size) in seen.items():
        expected = manifest.get(name)
        if kind == "D":
            continue
        if expected != (kind, value):
            skipped[name] = (
                "does not match the manifest made on the VM"
                if expected and expected[0] == kind
                else "not in the manifest"
            )
            with contextlib.suppress(OSError):
                (dest / name).unlink()
            continue
        if kind == "F":
            result.files += 1
            result.bytes += size
    result.skipped = sorted(skipped.items())
    return result


def collect(
    node: Node,
    layout: RemoteLayout,
    dest: Path,
    extra: list[str] | None = None,
    retries: int = 3,
    *,
    rank: int | None = None,
) -> CollectReport:
    """Bring the run's outputs (and `extra` job paths) home into `dest` (or `<dest>/<run id>`, see
    resolve_destination), verified; unsafe or unverified members are listed in `skipped`."""
    import zstandard

    t0 = time.monotonic()
    rank = node.ep.rank if rank is None else rank
    last: Exception | None = None
    for _ in range(retries):
        final = resolve_destination(dest, layout.run_id)
        final.parent.mkdir(parents=True, exist_ok=True)
        remove_leftovers(final.parent)
        tmp = _new_incoming(final.parent)
        try:
            chan = node.channel(collect_command(layout, extra or []))
            raw = _ChannelRaw(_chunks(chan))
            reader = io.BufferedReader(raw, 1 << 20)
            stream: Any = reader
            if reader.peek(4)[:4] == b"\x28\xb5\x2f\xfd":  # zstd's frame magic: the VM had zstd
                stream = zstandard.ZstdDecompressor().stream_reader(reader, read_across_frames=True)
            failure: Exception | None = None
            try:
                got = extract_verified(stream, tmp)
            except (ArtifactError, tarfile.ReadError, EOFError) as e:
                failure = e  # the VM side failed (its exit code says so) or the link dropped
            code = chan.recv_exit_status()
            if code == -1:
                raise ConnectionLost(f"{node.ep.name}: connection lost while collecting artifacts")
            if code != 0:
                err = chan.recv_stderr(65536).decode(errors="replace").strip()
                raise ArtifactError(f"Collecting artifacts on {node.ep.name} failed (exit {code}): {err[-500:]}")
            if failure is not None:
                raise failure
            write_marker(tmp, layout.run_id, rank)
            final = resolve_destination(dest, layout.run_id)  # again: it may have changed meanwhile
            _install(tmp, final, layout.run_id)
            return CollectReport(got.files, got.bytes, raw.wire, time.monotonic() - t0, final, got.skipped)
        except (ConnectionLost, OSError, EOFError, tarfile.ReadError) as e:
            last = e
            node.reconnect()
        finally:
            _release_incoming(tmp)
    raise ArtifactError(f"Collecting artifacts from {node.ep.name} failed {retries} times: {last}")
