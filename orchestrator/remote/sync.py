"""Code up: the job's folder to the VM as one tar stream, only what changed on a re-sync.

Why this shape (measured, see DESIGN.md): a per-file put costs ~6 round trips, so 2,000 small files
go as one tar stream over one exec channel; one SSH channel moves at most ~2 MB per round trip
(sshd's window), so files of LARGE_FILE bytes or more are cut into ranges sent over several channels
at once; zstd is nearly free and shrinks source ~4.5x (gzip is too slow for big binaries).

A manifest of size + sha256 per file is kept beside the job folder on the VM; a re-sync reads it,
sends the files whose size or hash differ, deletes the ones that are gone, and writes it back last,
so an interrupted sync is simply redone.
"""

from __future__ import annotations

import hashlib
import io
import json
import os
import shlex
import shutil
import stat
import subprocess
import tarfile
import threading
import time
from collections.abc import Callable, Iterator
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from orchestrator.errors import UserInputError
from orchestrator.remote.connect import ConnectionLost, Node, SshError
from orchestrator.remote.layout import RemoteLayout, rq

LARGE_FILE = 16 << 20
CHUNK = 32 << 20  # a multiple of dd's 1 MiB block
PARALLEL_CHANNELS = 4
DEFAULT_LIMIT_BYTES = 2 << 30
IGNORE_FILE = ".orchestratorignore"
ZSTD_LEVEL = 3


@dataclass(frozen=True)
class FileEntry:
    path: str  # relative, posix
    size: int
    mtime_ns: int
    mode: int
    sha256: str


@dataclass
class SyncReport:
    files: int = 0  # files in the tree
    bytes: int = 0  # their total size
    sent_files: int = 0
    sent_bytes: int = 0  # uncompressed bytes of the files sent
    wire_bytes: int = 0  # bytes written to the channels
    deleted: int = 0
    seconds: float = 0.0
    compressed: bool = False
    attempts: int = 1
    largest: list[tuple[str, int]] = field(default_factory=list)

    def summary(self) -> str:
        mb = 1 / (1 << 20)
        what = (
            "up to date"
            if not self.sent_files and not self.deleted
            else f"sent {self.sent_files} files, {self.sent_bytes * mb:,.1f} MB "
            f"({self.wire_bytes * mb:,.1f} MB on the wire{', zstd' if self.compressed else ''})"
            + (f", deleted {self.deleted}" if self.deleted else "")
        )
        # a retried upload is said: a link that drops now and then is worth knowing about
        retried = f" ({self.attempts} attempts: the connection dropped)" if self.attempts > 1 else ""
        return f"{self.files:,} files, {self.bytes * mb:,.1f} MB: {what} in {self.seconds:.1f} s{retried}"


# ------------------------------------------------------------------------------------ what to send


def list_files(root: Path) -> list[str]:
    """The files git would track (negations and nested .gitignore included), else .gitignore rules;
    .orchestratorignore on top; never .git. Relative posix paths, sorted."""
    files = _git_files(root)
    if files is None:
        files = _walk_with_gitignore(root)
    ignore = root / IGNORE_FILE
    if ignore.is_file():
        import pathspec

        spec = pathspec.GitIgnoreSpec.from_lines(ignore.read_text().splitlines())
        files = [f for f in files if not spec.match_file(f)]
    return sorted(f for f in files if not f.startswith(".git/") and f != ".git")


def _git_files(root: Path) -> list[str] | None:
    if shutil.which("git") is None:
        return None
    try:
        inside = subprocess.run(
            ["git", "-C", str(root), "rev-parse", "--is-inside-work-tree"],
            capture_output=True,
            text=True,
            timeout=30,
            check=False,
        )
        if inside.returncode != 0 or inside.stdout.strip() != "true":
            return None
        out = subprocess.run(
            ["git", "-C", str(root), "ls-files", "-z", "-co", "--exclude-standard", "--", "."],
            capture_output=True,
            timeout=60,
            check=True,
        )
    except (OSError, subprocess.SubprocessError):
        return None
    names = [n.decode("utf-8", "surrogateescape") for n in out.stdout.split(b"\0") if n]
    # -c lists tracked files even when deleted from the working tree: they are not there to send.
    return [n for n in names if (root / n).is_file() or (root / n).is_symlink()]


def _walk_with_gitignore(root: Path) -> list[str]:
    import pathspec

    specs: list[tuple[str, pathspec.GitIgnoreSpec]] = []
    out: list[str] = []
    for dirpath, dirnames, filenames in os.walk(root):
        rel_dir = os.path.relpath(dirpath, root)
        rel_dir = "" if rel_dir == "." else rel_dir.replace(os.sep, "/") + "/"
        gi = Path(dirpath) / ".gitignore"
        if gi.is_file():
            specs.append((rel_dir, pathspec.GitIgnoreSpec.from_lines(gi.read_text().splitlines())))

        def ignored(rel: str, is_dir: bool) -> bool:
            probe = rel + "/" if is_dir else rel
            return any(probe.startswith(base) and spec.match_file(probe[len(base) :]) for base, spec in specs)

        dirnames[:] = sorted(d for d in dirnames if d != ".git" and not ignored(rel_dir + d, True))
        out.extend(rel_dir + f for f in filenames if not ignored(rel_dir + f, False))
    return out


def scan(root: Path, cache: dict[str, FileEntry] | None = None) -> dict[str, FileEntry]:
    """Size, mtime, mode and sha256 of each file; hashes are reused when size and mtime match."""
    cache = cache or {}
    out: dict[str, FileEntry] = {}
    for rel in list_files(root):
        st = (root / rel).lstat()
        if stat.S_ISLNK(st.st_mode):
            digest = "link:" + os.readlink(root / rel)
        else:
            old = cache.get(rel)
            digest = (
                old.sha256 if old and old.size == st.st_size and old.mtime_ns == st.st_mtime_ns else _sha256(root / rel)
            )
        out[rel] = FileEntry(rel, st.st_size, st.st_mtime_ns, stat.S_IMODE(st.st_mode), digest)
    return out


def _sha256(path: Path) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for block in iter(lambda: f.read(1 << 20), b""):
            h.update(block)
    return h.hexdigest()


def check_size(entries: dict[str, FileEntry], limit: int) -> None:
    total = sum(e.size for e in entries.values())
    if total <= limit:
        return
    biggest = sorted(entries.values(), key=lambda e: e.size, reverse=True)[:5]
    listing = ", ".join(f"{e.path} ({e.size / (1 << 20):,.0f} MB)" for e in biggest)
    raise UserInputError(
        f"The job folder holds {total / (1 << 20):,.0f} MB, over the {limit / (1 << 20):,.0f} MB upload limit. "
        f"Largest: {listing}. Exclude data and outputs with .gitignore or {IGNORE_FILE}, or raise the limit "
        "(--max-upload-mb)."
    )


# ------------------------------------------------------------------------------------ the transfer


def _remote_state(node: Node, layout: RemoteLayout) -> tuple[dict[str, dict[str, object]], bool]:
    result = node.run(
        f"command -v zstd >/dev/null 2>&1 && echo zstd || echo nozstd; cat {rq(layout.manifest)} 2>/dev/null || true",
        "reading the sync manifest",
    )
    first, _, rest = result.text.partition("\n")
    try:
        manifest = json.loads(rest) if rest.strip() else {}
    except ValueError:
        manifest = {}  # a manifest cut short by an interrupted sync: send everything again
    return (manifest if isinstance(manifest, dict) else {}), first.strip() == "zstd"


def _tar_stream(
    root: Path,
    paths: list[str],
    compress: bool,
    counter: list[int],
    *,
    strip: str = "",
    extra: dict[str, bytes] | None = None,
) -> Iterator[bytes]:
    """Yield a (zstd-compressed) tar of `paths` in chunks, without holding it all in memory.

    Member names are `paths`; each file is read from `root / path` with `strip` removed. `extra`
    members (name -> bytes) come last."""
    import zstandard

    buf = _ChunkBuffer()
    sink: Any = buf
    if compress:
        sink = zstandard.ZstdCompressor(level=ZSTD_LEVEL, threads=-1).stream_writer(buf, closefd=False)  # type: ignore[arg-type]
    with tarfile.open(fileobj=sink, mode="w|", format=tarfile.PAX_FORMAT) as tar:  # type: ignore[call-overload]
        for name in paths:
            local = root / name.removeprefix(strip)
            info = tar.gettarinfo(str(local), arcname=name)
            info.uid = info.gid = 0
            info.uname = info.gname = ""
            if info.isreg():
                with open(local, "rb") as f:
                    tar.addfile(info, f)
            else:
                tar.addfile(info)
            if buf.size() >= 1 << 20:
                data = buf.take()
                counter[0] += len(data)
                yield data
        for extra_name, payload in (extra or {}).items():
            info = tarfile.TarInfo(extra_name)
            info.size, info.mode, info.mtime = len(payload), 0o600, int(time.time())
            tar.addfile(info, io.BytesIO(payload))
    if compress:
        sink.close()
    data = buf.take()
    counter[0] += len(data)
    if data:
        yield data


class _ChunkBuffer(io.RawIOBase):
    def __init__(self) -> None:
        self._parts: list[bytes] = []
        self._size = 0

    def writable(self) -> bool:
        return True

    def write(self, b: bytes) -> int:  # type: ignore[override]
        self._parts.append(bytes(b))
        self._size += len(b)
        return len(b)

    def size(self) -> int:
        return self._size

    def take(self) -> bytes:
        data = b"".join(self._parts)
        self._parts, self._size = [], 0
        return data


def _compressible(path: Path, sample: int = 1 << 20) -> bool:
    """Whether zstd pays for this file: weights and archives are often already dense, and then
    compressing only costs CPU on both ends (measured on a 1 MB sample from the middle)."""
    import zstandard

    size = path.stat().st_size
    with open(path, "rb") as f:
        f.seek(max(0, size // 2 - sample // 2))
        data = f.read(sample)
    return bool(data) and len(zstandard.ZstdCompressor(level=1).compress(data)) < 0.9 * len(data)


def _file_ranges(path: Path, start: int, length: int, compress: bool, counter: list[int]) -> Iterator[bytes]:
    import zstandard

    cctx = zstandard.ZstdCompressor(level=1) if compress else None
    with open(path, "rb") as f:
        f.seek(start)
        remaining = length
        comp = cctx.compressobj() if cctx else None
        while remaining > 0:
            block = f.read(min(4 << 20, remaining))
            if not block:
                break
            remaining -= len(block)
            out = comp.compress(block) if comp else block
            if out:
                counter[0] += len(out)
                yield out
        if comp:
            tail = comp.flush()
            counter[0] += len(tail)
            yield tail


@dataclass
class SyncState:
    """What the VM holds after a sync: the files (also a hash cache for the next scan) and whether
    it can decompress zstd. Passed back in, it lets a re-sync skip reading the VM's manifest."""

    entries: dict[str, FileEntry]
    zstd: bool

    def manifest(self) -> bytes:
        body = {e.path: {"size": e.size, "sha256": e.sha256, "mode": e.mode} for e in self.entries.values()}
        return json.dumps(body, sort_keys=True, separators=(",", ":")).encode()

    def digest(self) -> str:
        return hashlib.sha256(self.manifest()).hexdigest()


class _StaleState(Exception):
    """The VM's manifest is not the one we last wrote: read it instead of trusting ours."""


EXIT_STALE = 65


def upload(
    node: Node,
    root: Path,
    layout: RemoteLayout,
    *,
    limit: int = DEFAULT_LIMIT_BYTES,
    previous: SyncState | None = None,
    retries: int = 3,
    progress: Callable[[int], None] | None = None,
) -> tuple[SyncReport, SyncState]:
    """Bring the VM's copy of `root` up to date; retried over a new connection if it drops.

    With `previous` (the state this returned last time for the same VM) a re-sync is one command:
    it sends the changes, guarded by the digest of the manifest we last wrote; if the VM's manifest
    differs, the guard refuses and the VM's own manifest is read and used instead.
    """
    t0 = time.monotonic()
    entries = scan(root, previous.entries if previous else None)
    check_size(entries, limit)
    last: Exception | None = None
    for attempt in range(1, retries + 1):
        try:
            try:
                report, zstd = _upload_once(node, root, layout, entries, progress, previous)
            except _StaleState:
                previous = None
                report, zstd = _upload_once(node, root, layout, entries, progress, None)
            report.attempts = attempt
            report.seconds = time.monotonic() - t0
            return report, SyncState(entries, zstd)
        except ConnectionLost as e:
            last = e
            previous = None  # after a cut, trust only what the VM says it has
            node.reconnect()
    raise SshError(f"Uploading the job folder to {node.ep.name} failed {retries} times: {last}")


def _upload_once(
    node: Node,
    root: Path,
    layout: RemoteLayout,
    entries: dict[str, FileEntry],
    progress: Callable[[int], None] | None,
    previous: SyncState | None,
) -> tuple[SyncReport, bool]:
    if previous is not None:
        remote: dict[str, dict[str, object]] = {
            e.path: {"sha256": e.sha256, "mode": e.mode} for e in previous.entries.values()
        }
        has_zstd = previous.zstd
    else:
        remote, has_zstd = _remote_state(node, layout)
    send = [
        e
        for e in entries.values()
        if (r := remote.get(e.path)) is None or r.get("sha256") != e.sha256 or r.get("mode") != e.mode
    ]
    deleted = sorted(set(remote) - set(entries))
    report = SyncReport(
        files=len(entries),
        bytes=sum(e.size for e in entries.values()),
        sent_files=len(send),
        sent_bytes=sum(e.size for e in send),
        deleted=len(deleted),
        compressed=has_zstd,
        largest=sorted(((e.path, e.size) for e in entries.values()), key=lambda x: -x[1])[:3],
    )
    large = [e for e in send if e.size >= LARGE_FILE and not e.sha256.startswith("link:")]
    small = [e.path for e in send if e not in large]
    new_manifest = SyncState(entries, has_zstd).manifest()
    counter = [0]
    lock = threading.Lock()

    def count(n: int) -> None:
        with lock:
            if progress:
                progress(n)

    unzstd = "zstd -dc | " if has_zstd else ""
    root_dir, job_dir = rq(layout.root), rq(layout.job_dir)
    manifest_name = layout.manifest.rsplit("/", 1)[-1]
    # Run last, after every byte landed: sizes and modes of large files, deletions, the manifest.
    # A sync cut short before this point is redone in full next time.
    finish = [f"cd {job_dir}"]
    for e in large:
        finish.append(f"truncate -s {e.size} {shlex.quote(e.path)} && chmod {e.mode:o} {shlex.quote(e.path)}")
    if deleted:
        finish.append("rm -f -- " + " ".join(shlex.quote(p) for p in deleted))
    finish.append(f"mv ../{manifest_name}.new ../{manifest_name}")

    if not large:
        # One command does it all: guard, unpack (the new manifest rides in the same tar), finish.
        guard = ""
        if previous is not None:
            guard = (
                f'[ "$(sha256sum < {manifest_name} 2>/dev/null | cut -c1-64)" = "{previous.digest()}" ] '
                f"|| exit {EXIT_STALE}; "
            )
        cmd = f"mkdir -p {job_dir} && cd {root_dir} && {guard}{unzstd}tar -x -f - --no-same-owner && " + " && ".join(
            finish
        )
        members = [f"job/{p}" for p in small]
        stream = _tar_stream(
            root, members, has_zstd, counter, strip="job/", extra={f"{manifest_name}.new": new_manifest}
        )
        result = node.exec(cmd, _counted(stream, count))
        if result.exit_code == EXIT_STALE:
            raise _StaleState()
        result.check("unpacking the job folder")
        report.wire_bytes = counter[0]
        return report, has_zstd

    jobs: list[Callable[[], None]] = []
    if small:

        def send_small() -> None:
            local = [0]
            cmd = f"mkdir -p {job_dir} && cd {job_dir} && {unzstd}tar -x -f - --no-same-owner"
            node.exec(cmd, _counted(_tar_stream(root, small, has_zstd, local), count)).check("unpacking the job folder")
            with lock:
                counter[0] += local[0]

        jobs.append(send_small)
    for e in large:
        squeeze = has_zstd and _compressible(root / e.path)
        for start in range(0, max(e.size, 1), CHUNK):
            jobs.append(
                _range_job(node, root, e, start, min(CHUNK, e.size - start), squeeze, job_dir, counter, lock, count)
            )
    with ThreadPoolExecutor(max_workers=PARALLEL_CHANNELS) as pool:
        for f in [pool.submit(j) for j in jobs]:
            f.result()
    node.exec(f"cat > {rq(layout.manifest)}.new && " + " && ".join(finish), new_manifest).check("finishing the upload")
    report.wire_bytes = counter[0]
    return report, has_zstd


def _range_job(
    node: Node,
    root: Path,
    e: FileEntry,
    start: int,
    length: int,
    compress: bool,
    job_dir: str,
    counter: list[int],
    lock: threading.Lock,
    count: Callable[[int], None],
) -> Callable[[], None]:
    def run() -> None:
        local = [0]
        parent = shlex.quote(str(Path(e.path).parent))
        unzstd = "zstd -dc | " if compress else ""
        cmd = (
            f"mkdir -p {job_dir}/{parent} && cd {job_dir} && {unzstd}dd of={shlex.quote(e.path)} bs=1M "
            f"seek={start >> 20} conv=notrunc status=none"
        )
        node.exec(cmd, _counted(_file_ranges(root / e.path, start, length, compress, local), count)).check(
            f"uploading {e.path}"
        )
        with lock:
            counter[0] += local[0]

    return run


def _counted(chunks: Iterator[bytes], count: Callable[[int], None]) -> Iterator[bytes]:
    for chunk in chunks:
        count(len(chunk))
        yield chunk
