"""Per-run SSH key pairs (ed25519, private key mode 0600), or the public half of the user's own key."""

from __future__ import annotations

import os
import queue
from concurrent.futures import Future
from dataclasses import dataclass
from pathlib import Path

from orchestrator.errors import UserInputError


def generate_keypair(directory: Path, name: str = "id_ed25519") -> tuple[Path, str]:
    """Create (or reuse) a key pair in `directory`; returns the private key path and the public key line."""
    from cryptography.hazmat.primitives import serialization
    from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey

    private = directory / name
    if private.exists():
        return private, public_key_of(private)
    key = Ed25519PrivateKey.generate()
    pem = key.private_bytes(
        serialization.Encoding.PEM, serialization.PrivateFormat.OpenSSH, serialization.NoEncryption()
    )
    fd = os.open(private, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
    with os.fdopen(fd, "wb") as f:
        f.write(pem)
    public = key.public_key().public_bytes(serialization.Encoding.OpenSSH, serialization.PublicFormat.OpenSSH)
    line = public.decode() + " orchestrator"
    (directory / f"{name}.pub").write_text(line + "\n")
    return private, line


def public_key_of(private: Path) -> str:
    from cryptography.hazmat.primitives import serialization

    pub = Path(str(private) + ".pub")
    if pub.is_file():
        return pub.read_text().strip()
    try:
        key = serialization.load_ssh_private_key(private.read_bytes(), password=None)
    except (ValueError, TypeError) as e:
        raise UserInputError(
            f"{private}: cannot read this SSH private key ({e}). Use an unencrypted key, or put its public "
            f"half next to it as {pub.name}."
        ) from None
    return key.public_key().public_bytes(serialization.Encoding.OpenSSH, serialization.PublicFormat.OpenSSH).decode()


@dataclass(frozen=True)
class HostKey:
    """A VM's SSH host key, made here so the VM can be verified from its first connection."""

    private_openssh: str  # goes to the VM inside its cloud-init
    public: str  # "ssh-ed25519 AAAA..." (no comment): what the client pins


def generate_host_key(path: Path | None = None) -> HostKey:
    """A new ed25519 host key; with `path`, kept there (0600) and reused on later calls."""
    from cryptography.hazmat.primitives import serialization
    from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey

    if path is not None and path.exists():
        key = serialization.load_ssh_private_key(path.read_bytes(), password=None)
        pem = path.read_text()
    else:
        key = Ed25519PrivateKey.generate()
        pem = key.private_bytes(
            serialization.Encoding.PEM, serialization.PrivateFormat.OpenSSH, serialization.NoEncryption()
        ).decode()
        if path is not None:
            fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
            with os.fdopen(fd, "w") as f:
                f.write(pem)
    public = key.public_key().public_bytes(serialization.Encoding.OpenSSH, serialization.PublicFormat.OpenSSH)
    return HostKey(pem, public.decode())


RSA_HOST_KEY_BITS = 3072


_PREFETCHED: queue.SimpleQueue[Future[HostKey]] = queue.SimpleQueue()


def prefetch_rsa_host_keys(count: int) -> None:
    """Start making `count` RSA host keys in the background (OpenSSL releases the GIL: ~0.1-0.4 s
    each, hidden behind the preflight); generate_rsa_host_key takes them first. Each key is used once."""
    from concurrent.futures import ThreadPoolExecutor

    pool = ThreadPoolExecutor(max_workers=max(1, min(count, 4)), thread_name_prefix="rsa-host-key")
    for _ in range(count):
        _PREFETCHED.put(pool.submit(_new_rsa_host_key, RSA_HOST_KEY_BITS))
    pool.shutdown(wait=False)


def generate_rsa_host_key(bits: int = RSA_HOST_KEY_BITS) -> HostKey:
    """A new RSA host key for a VM, kept beside the pinned ed25519 one: the Azure Linux agent and some
    images expect an RSA host key to exist. It is never pinned (the runner accepts only ed25519) nor
    kept here: it goes to the VM in its custom data and nowhere else."""
    if bits == RSA_HOST_KEY_BITS:
        try:
            return _PREFETCHED.get_nowait().result()
        except queue.Empty:
            pass
    return _new_rsa_host_key(bits)


def _new_rsa_host_key(bits: int) -> HostKey:
    from cryptography.hazmat.primitives import serialization
    from cryptography.hazmat.primitives.asymmetric import rsa

    key = rsa.generate_private_key(public_exponent=65537, key_size=bits)
    pem = key.private_bytes(
        serialization.Encoding.PEM, serialization.PrivateFormat.OpenSSH, serialization.NoEncryption()
    ).decode()
    public = key.public_key().public_bytes(serialization.Encoding.OpenSSH, serialization.PublicFormat.OpenSSH)
    return HostKey(pem, public.decode())
