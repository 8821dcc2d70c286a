"""The local "image": what a new local VM has before the job installs anything.

On Azure the GPU image brings an OS, a driver and a Python; here the image is this machine's
Python (3.11 or newer), uv, and a wheelhouse seeded at install time (`make install`) with the
example jobs' pinned requirements. Each VM gets its own environment made by uv from that Python,
with pip in it, so `python3`, `pip` and `uv pip install` on the VM install into the VM and never
into the tool's own virtualenv. Installs are real (wheels unpacked into the VM's environment) but
offline: pip and uv are pointed at the wheelhouse and told not to use the package index, since this
target may send packets only to loopback. ORCH_LOCAL_ONLINE=1 lets a VM reach the index.
"""

from __future__ import annotations

import os
import subprocess
import sys
from dataclasses import dataclass
from pathlib import Path

PIP_VERSION = "26.3"


def wheelhouse() -> Path | None:
    configured = os.environ.get("ORCH_LOCAL_WHEELHOUSE")
    path = Path(configured) if configured else Path(sys.prefix) / "share" / "orchestrator" / "wheelhouse"
    return path if path.is_dir() else None


def base_python() -> Path:
    """This machine's Python, not the tool's virtualenv (whose packages a VM must not see)."""
    base = getattr(sys, "_base_executable", None) or sys.executable
    return Path(os.path.realpath(base))


def uv_binary() -> Path:
    from uv import find_uv_bin

    return Path(find_uv_bin())


@dataclass(frozen=True)
class VmPaths:
    """One local VM's folder: `<state>/vms/<vm name>/`."""

    root: Path

    @property
    def home(self) -> Path:
        return self.root / "home"

    @property
    def tmp(self) -> Path:
        return self.root / "tmp"

    @property
    def python(self) -> Path:
        return self.root / "python"

    @property
    def bin(self) -> Path:
        return self.root / "bin"

    @property
    def spec(self) -> Path:
        return self.root / "vm.json"

    @property
    def host(self) -> Path:
        return self.root / "host.json"

    @property
    def log(self) -> Path:
        return self.root / "host.log"


def make_environment(vm: VmPaths) -> None:
    """The VM's Python environment, with pip, made by uv (about 0.1 s with a warm uv cache)."""
    uv = uv_binary()
    for d in (vm.home, vm.tmp, vm.bin):
        d.mkdir(parents=True, exist_ok=True)
    link = vm.bin / "uv"
    if not link.exists():
        link.symlink_to(uv)
    env = {**os.environ, **uv_settings()}
    env.pop("VIRTUAL_ENV", None)
    run = [str(uv), "--quiet"]
    subprocess.run([*run, "venv", "--python", str(base_python()), str(vm.python)], env=env, check=True)
    house = wheelhouse()
    if house is not None and any(house.glob("pip-*.whl")):
        subprocess.run(
            [*run, "pip", "install", "--python", str(vm.python / "bin" / "python"), f"pip=={PIP_VERSION}"],
            env=env,
            check=True,
        )


def uv_settings() -> dict[str, str]:
    """uv and pip pointed at the wheelhouse, offline unless ORCH_LOCAL_ONLINE=1."""
    house = wheelhouse()
    env: dict[str, str] = {"PIP_DISABLE_PIP_VERSION_CHECK": "1", "UV_PYTHON_DOWNLOADS": "never"}
    if house is not None:
        env.update({"PIP_FIND_LINKS": str(house), "UV_FIND_LINKS": str(house)})
    if os.environ.get("ORCH_LOCAL_ONLINE") != "1":
        env.update({"PIP_NO_INDEX": "1", "UV_OFFLINE": "1", "UV_NO_INDEX": "1"})
    # uv's cache belongs to the image, shared by every VM (installs from it are hard links): it stays
    # in this machine's user cache, not in a VM's home, which goes away with the VM.
    env["UV_CACHE_DIR"] = os.environ.get("UV_CACHE_DIR") or str(Path.home() / ".cache" / "uv")
    return env


def vm_environ(vm: VmPaths, user: str) -> dict[str, str]:
    """The environment a command on the VM starts with: nothing of the tool's own process."""
    env = {
        "HOME": str(vm.home),
        "USER": user,
        "LOGNAME": user,
        "SHELL": "/bin/bash",
        "PATH": f"{vm.python / 'bin'}:{vm.bin}:/usr/local/bin:/usr/bin:/bin",
        "VIRTUAL_ENV": str(vm.python),
        "TMPDIR": str(vm.tmp),
        "LANG": "C.UTF-8",
    }
    env.update(uv_settings())
    return env
