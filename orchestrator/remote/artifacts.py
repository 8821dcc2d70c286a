"""Artifacts down: the outputs as one (zstd) tar stream with a sha256 manifest made on the VM.

The manifest is made on the VM while the files stream and travels as the stream's last member;
every file is checked against it after extraction. Extraction uses tarfile's `data` filter, and
any member it would have to alter (an absolute path, `..`, a link out of the folder, a device
file) makes the whole collection fail
rather than be skipped: artifacts that arrive are exactly what the VM had, or nothing arrives.
Files land in a temporary folder first and replace the destination only once verified.
"""

from __future__ import annotations

import hashlib
import io
import shutil
import tarfile
import tempfile
import time
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path, PurePosixPath
from typing import Any

from orchestrator.errors import OrchestratorError
from orchestrator.remote.connect import ConnectionLost, Node
from orchestrator.remote.layout import RemoteLayout, rq

MANIFEST = ".orchestrator-sha256"


class ArtifactError(OrchestratorError):
    pass


@dataclass
class CollectReport:
    files: int
    bytes: int
    wire_bytes: int
    seconds: float
    destination: Path


def collect_command(layout: RemoteLayout, extra: list[str]) -> str:
    """The VM side: stream the files while hashing them alongside, then append the manifest.

    Two tar archives back to back (files, then the manifest) so hashing does not delay the first
    byte; the reader takes concatenated archives (ignore_zeros)."""
    root = rq(layout.root)
    # Extra paths that do not exist (a job that wrote no log) are left out, not an error.
    pick = "set --; " + "".join(f'[ -e {rq(f"job/{p}")} ] && set -- "$@" {rq(f"job/{p}")}; ' for p in extra)
    hash_extras = 'if [ $# -gt 0 ]; then find "$@" -type f -print0 | xargs -0 -r sha256sum; fi; '
    return (
        f"cd {root} && mkdir -p outputs && {pick}"
        "{ command -v zstd >/dev/null 2>&1 && Z='zstd -1 -T0 -q -c' || Z=cat; } && "
        f"{{ {{ (cd outputs && find . -type f -print0 | xargs -0 -r sha256sum) ; {hash_extras}}} > {MANIFEST} & "
        'H=$!; tar -c -f - -C outputs . ${1:+-C ..} "$@" && wait $H && '
        f"tar -c -f - {MANIFEST}; }} | $Z"
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


def _parse_manifest(text: str) -> dict[str, str]:
    out = {}
    for line in text.splitlines():
        digest, _, name = line.partition("  ")
        if name:
            out[str(PurePosixPath(name.removeprefix("./")))] = digest
    return out


def extract_verified(stream: object, dest: Path) -> tuple[int, int]:
    """Extract a tar stream that carries its manifest (as its last member) into `dest`; (files, bytes)."""
    files = total = 0
    manifest: dict[str, str] | None = None
    seen: dict[str, str] = {}
    with tarfile.open(fileobj=stream, mode="r|", ignore_zeros=True) as tar:  # type: ignore[call-overload]
        for member in tar:
            name = str(PurePosixPath(member.name.removeprefix("./")))
            if name == MANIFEST and manifest is None and member.isfile():
                f = tar.extractfile(member)
                manifest = _parse_manifest(f.read().decode() if f else "")
                continue
            try:
                safe = tarfile.data_filter(member, str(dest))
            except tarfile.FilterError as e:
                raise ArtifactError(f"Refusing the artifacts: member {member.name!r} is unsafe ({e}).") from None
            if safe is not member and (safe.name != member.name or safe.linkname != member.linkname):
                raise ArtifactError(f"Refusing the artifacts: member {member.name!r} would be rewritten.")
            if member.isdir() or name == ".":
                continue
            if not member.isfile():
                tar.extract(member, dest, filter="data")
                continue
            h = hashlib.sha256()
            target = dest / name
            target.parent.mkdir(parents=True, exist_ok=True)
            src = tar.extractfile(member)
            with open(target, "wb") as out:
                while src is not None and (block := src.read(1 << 20)):
                    h.update(block)
                    out.write(block)
            target.chmod(member.mode & 0o755 | 0o600)
            seen[name] = h.hexdigest()
            files += 1
            total += member.size
    if manifest is None:
        raise ArtifactError("The artifact stream ended without its manifest (cut short?); refusing it.")
    missing = sorted(set(manifest) - set(seen))
    bad = sorted(n for n, d in seen.items() if manifest.get(n) != d)
    if missing or bad:
        raise ArtifactError(
            "Artifacts do not match the manifest made on the VM: "
            + (f"missing {', '.join(missing[:5])} " if missing else "")
            + (f"changed or unlisted {', '.join(bad[:5])}" if bad else "")
        )
    return files, total


def collect(
    node: Node, layout: RemoteLayout, dest: Path, extra: list[str] | None = None, retries: int = 3
) -> CollectReport:
    """Bring the run's outputs (and `extra` job paths) home into `dest`, verified."""
    import zstandard

    t0 = time.monotonic()
    dest.parent.mkdir(parents=True, exist_ok=True)
    last: Exception | None = None
    for _ in range(retries):
        tmp = Path(tempfile.mkdtemp(prefix=".incoming-", dir=dest.parent))
        try:
            chan = node.channel(collect_command(layout, extra or []))
            raw = _ChannelRaw(_chunks(chan))
            reader = io.BufferedReader(raw, 1 << 20)
            stream: Any = reader
            if reader.peek(4)[:4] == b"\x28\xb5\x2f\xfd":  # zstd's frame magic: the VM had zstd
                stream = zstandard.ZstdDecompressor().stream_reader(reader, read_across_frames=True)
            files, total = extract_verified(stream, tmp)
            code = chan.recv_exit_status()
            if code == -1:
                raise ConnectionLost(f"{node.ep.name}: connection lost while collecting artifacts")
            if code != 0:
                err = chan.recv_stderr(65536).decode(errors="replace")
                raise ArtifactError(f"Collecting artifacts on {node.ep.name} failed (exit {code}): {err[-500:]}")
            if dest.exists():
                shutil.rmtree(dest)
            tmp.rename(dest)
            return CollectReport(files, total, raw.wire, time.monotonic() - t0, dest)
        except (ConnectionLost, OSError, EOFError, tarfile.ReadError) as e:
            last = e
            node.reconnect()
        finally:
            if tmp.exists():
                shutil.rmtree(tmp, ignore_errors=True)
    raise ArtifactError(f"Collecting artifacts from {node.ep.name} failed {retries} times: {last}")
