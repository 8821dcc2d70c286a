"""Stream a run's outputs (and extra job paths) as one tar, hashing each file as it is sent.

Run by orchestrator on the VM, in the run's folder: `python3 -c <this> [JOB PATH...]`. Writes a PAX
tar to stdout: the files, then `.orchestrator-sha256`, a manifest of NUL-separated records, so any
byte sequence a Linux file name can hold travels unescaped:

    F NUL name NUL sha256 NUL      a regular file, as sent
    L NUL name NUL target NUL      a symbolic link that resolves inside what is collected; the
                                   target is made relative (an absolute link inside is rewritten)
    D NUL name NUL                 a directory
    S NUL name NUL reason NUL      skipped: a link leaving the outputs, a FIFO, a socket, a
                                   device, an unreadable file, a file that shrank while read

Only what is safe is sent; the other members are listed, and never cost the rest.
"""

import hashlib
import io
import os
import stat
import sys
import tarfile

MANIFEST = ".orchestrator-sha256"
RESERVED = {MANIFEST, ".orchestrator-artifacts"}  # names the tool writes at the top of the folder
ENC = "utf-8"


class HashingReader:
    """Reads `size` bytes of a file for tarfile, hashing them; pads with zeros if it shrank."""

    def __init__(self, fd, size):
        self.fd = fd
        self.left = size
        self.hash = hashlib.sha256()
        self.error = ""

    def read(self, n=-1):
        n = self.left if n is None or n < 0 else min(n, self.left)
        data = b""
        if not self.error:
            try:
                data = os.read(self.fd, n)
                while data and len(data) < n:
                    more = os.read(self.fd, n - len(data))
                    if not more:
                        break
                    data += more
            except OSError as e:
                self.error = "read failed: " + e.strerror
                data = b""
            if len(data) < n and not self.error:
                self.error = "shrank while being read"
        self.hash.update(data)
        self.left -= n
        return data + b"\0" * (n - len(data))


def main():
    extras = sys.argv[1:]
    os.makedirs("outputs", exist_ok=True)
    # Trees to send: (folder on the VM, its name in the archive); a symlink is kept if it resolves
    # inside one of them.
    trees = [(os.path.realpath("outputs"), "")]
    singles = []
    for p in extras:
        path = os.path.join("job", p)
        if not os.path.lexists(path):
            continue  # a job that wrote no log: left out, not an error
        arc = "job/" + os.path.normpath(p).lstrip("/")
        if os.path.isdir(path) and not os.path.islink(path):
            trees.append((os.path.realpath(path), arc))
        else:
            singles.append((path, arc))
    records = []
    out = tarfile.open(fileobj=sys.stdout.buffer, mode="w|", format=tarfile.PAX_FORMAT, encoding=ENC, bufsize=1 << 20)  # noqa: SIM115

    def arc_of(real):
        for root, arc in trees:
            if real == root:
                return arc
            if real.startswith(root.rstrip("/") + "/"):
                rel = real[len(root.rstrip("/")) + 1 :]
                return arc + "/" + rel if arc else rel
        return None

    def record(kind, name, value=None):
        fields = [kind.encode(), os.fsencode(name)] + ([os.fsencode(value)] if value is not None else [])
        records.append(b"".join(f + b"\0" for f in fields))

    def send(path, name):
        try:
            st = os.lstat(path)
        except OSError as e:
            record("S", name, "vanished: " + (e.strerror or str(e)))
            return
        if stat.S_ISLNK(st.st_mode):
            real = os.path.realpath(path)
            target = arc_of(real)
            if target is None:
                record("S", name, "link leaves the outputs: " + os.readlink(path))
                return
            rel = os.path.relpath(target or ".", os.path.dirname(name) or ".")
            info = tarfile.TarInfo(name)
            info.type, info.linkname, info.mtime, info.mode = tarfile.SYMTYPE, rel, st.st_mtime, 0o777
            out.addfile(info)
            record("L", name, rel)
            return
        if stat.S_ISDIR(st.st_mode):
            info = tarfile.TarInfo(name)
            info.type, info.mtime, info.mode = tarfile.DIRTYPE, st.st_mtime, st.st_mode & 0o7777
            out.addfile(info)
            record("D", name)
            return
        if not stat.S_ISREG(st.st_mode):
            kind = (
                "FIFO"
                if stat.S_ISFIFO(st.st_mode)
                else "socket"
                if stat.S_ISSOCK(st.st_mode)
                else "device"
                if stat.S_ISCHR(st.st_mode) or stat.S_ISBLK(st.st_mode)
                else "special file"
            )
            record("S", name, kind + ": not a regular file")
            return
        try:
            fd = os.open(path, os.O_RDONLY | os.O_NOFOLLOW | os.O_NONBLOCK)
        except OSError as e:
            record("S", name, "unreadable: " + (e.strerror or str(e)))
            return
        try:
            st = os.fstat(fd)
            if not stat.S_ISREG(st.st_mode):
                record("S", name, "replaced while being read")
                return
            info = tarfile.TarInfo(name)
            info.size, info.mtime, info.mode = st.st_size, st.st_mtime, st.st_mode & 0o7777
            reader = HashingReader(fd, st.st_size)
            out.addfile(info, reader)
            if reader.error:
                record("S", name, reader.error)
            else:
                record("F", name, reader.hash.hexdigest())
        finally:
            os.close(fd)

    for root, arc in trees:
        for folder, dirs, files in os.walk(root):
            rel = os.path.relpath(folder, root)
            base = arc if rel == "." else (arc + "/" + rel if arc else rel)
            if base:
                send(folder, base)
            for d in list(dirs):
                if os.path.islink(os.path.join(folder, d)):
                    dirs.remove(d)  # a link to a folder: sent as a link, never followed
                    files.append(d)
            dirs.sort()
            for f in sorted(files):
                name = base + "/" + f if base else f
                if not base and f in RESERVED:
                    record("S", name, "name reserved for the tool's own files")
                    continue
                send(os.path.join(folder, f), name)
    for path, arc in singles:
        send(path, arc)
    out.close()  # the files' archive ends; the manifest follows as a second one
    data = b"".join(records)
    tail = tarfile.open(fileobj=sys.stdout.buffer, mode="w|", format=tarfile.PAX_FORMAT, encoding=ENC)  # noqa: SIM115
    info = tarfile.TarInfo(MANIFEST)
    info.size = len(data)
    tail.addfile(info, io.BytesIO(data))
    tail.close()
    sys.stdout.buffer.flush()


if __name__ == "__main__":
    main()
