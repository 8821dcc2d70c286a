"""Run OpenSSH's sshd on a free loopback port with its own config, host key and authorized key.

Used by the runner tests (as a fixture) and by bench/sync.py.
"""

from __future__ import annotations

import getpass
import os
import shutil
import socket
import subprocess
import time
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path

from orchestrator.sshkeys import HostKey, generate_host_key, generate_keypair


class SshdUnavailable(RuntimeError):
    pass


@dataclass
class LocalSshd:
    port: int
    user: str
    host_key: HostKey
    client_key: Path
    known_hosts: Path  # an OpenSSH known_hosts file pinning the host key (for ssh/rsync)


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


@contextmanager
def run_sshd(workdir: Path) -> Iterator[LocalSshd]:
    binary = shutil.which("sshd") or "/usr/sbin/sshd"
    if not os.path.exists(binary):
        raise SshdUnavailable("OpenSSH sshd is not installed (apt-get install openssh-server)")
    workdir.mkdir(parents=True, exist_ok=True)
    host = generate_host_key(workdir / "host_ed25519")
    client_key, client_pub = generate_keypair(workdir, "client")
    (workdir / "authorized_keys").write_text(client_pub + "\n")
    os.chmod(workdir / "authorized_keys", 0o600)
    if os.geteuid() == 0:
        Path("/run/sshd").mkdir(exist_ok=True)  # privilege separation directory
    port = free_port()
    (workdir / "sshd_config").write_text(
        f"Port {port}\nListenAddress 127.0.0.1\nHostKey {workdir / 'host_ed25519'}\nPidFile {workdir / 'sshd.pid'}\n"
        f"AuthorizedKeysFile {workdir / 'authorized_keys'}\nPasswordAuthentication no\n"
        "KbdInteractiveAuthentication no\nUsePAM no\nStrictModes no\nPermitRootLogin prohibit-password\n"
        "AllowTcpForwarding no\nX11Forwarding no\nPrintMotd no\nLogLevel ERROR\nMaxSessions 64\nMaxStartups 64\n"
        "Subsystem sftp internal-sftp\n"
    )
    known = workdir / "known_hosts"
    known.write_text(f"[127.0.0.1]:{port} {host.public}\n")
    proc = subprocess.Popen(
        [binary, "-D", "-e", "-f", str(workdir / "sshd_config")], stdout=subprocess.PIPE, stderr=subprocess.STDOUT
    )
    try:
        deadline = time.monotonic() + 10
        while True:
            with socket.socket() as s:
                if s.connect_ex(("127.0.0.1", port)) == 0:
                    break
            if proc.poll() is not None or time.monotonic() > deadline:
                out = proc.stdout.read().decode() if proc.stdout and proc.poll() is not None else ""
                raise SshdUnavailable(f"sshd did not start: {out[-300:]}")
            time.sleep(0.05)
        yield LocalSshd(port, getpass.getuser(), host, client_key, known)
    finally:
        proc.terminate()
        proc.wait(timeout=10)
