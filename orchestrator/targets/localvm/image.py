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
    def temp_disk(self) -> Path:
        """The VM's temporary (resource) disk, /mnt on Azure: wiped when the VM is deallocated."""
        return self.root / "mnt"

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


def mount_temp_disk(vm: VmPaths) -> None:
    """As the Azure VM's cloud-init does once (templates/cloud-init.yaml.j2): ~/orch, where runs keep
    their job, outputs and checkpoints, is a link to the temporary disk. After a deallocation the
    disk comes back empty and the link is not made again (cloud-init's runcmd runs once per VM): what
    the autostop agent moved to the OS disk is what is left."""
    vm.temp_disk.mkdir(parents=True, exist_ok=True, mode=0o755)
    vm.home.mkdir(parents=True, exist_ok=True, mode=0o755)
    link = vm.home / "orch"
    if not link.exists() and not link.is_symlink():
        (vm.temp_disk / "orch").mkdir(exist_ok=True)
        link.symlink_to(vm.temp_disk / "orch")


def wipe_temp_disk(vm: VmPaths) -> None:
    import shutil

    shutil.rmtree(vm.temp_disk, ignore_errors=True)


def make_environment(vm: VmPaths, version: str | None = None) -> str:
    """The VM's Python environment, with pip, made by uv (about 0.1 s with a warm uv cache). With
    `version` (python.version) uv looks for that Python on this machine, offline; this machine's own
    Python (3.11 or newer) stands in when it has none. Returns a note for the install log."""
    uv = uv_binary()
    for d in (vm.home, vm.tmp, vm.bin):
        d.mkdir(parents=True, exist_ok=True)
    link = vm.bin / "uv"
    if not link.exists():
        link.symlink_to(uv)
    env = {**os.environ, **uv_settings()}
    env.pop("VIRTUAL_ENV", None)
    run = [str(uv), "--quiet"]
    note = ""
    base = base_python()
    made = False
    if version is not None and not _is_version(base, version):
        tried = subprocess.run(
            [*run, "venv", "--python", version, str(vm.python)], env=env, capture_output=True, check=False
        )
        made = tried.returncode == 0
        if not made:
            note = (
                f"orchestrator: this machine has no Python {version}; the local VM uses its own "
                f"Python {_version_of(base)} ({base}) instead\n"
            )
    if not made:
        subprocess.run([*run, "venv", "--python", str(base), str(vm.python)], env=env, check=True)
    house = wheelhouse()
    if house is not None and any(house.glob("pip-*.whl")):
        subprocess.run(
            [*run, "pip", "install", "--python", str(vm.python / "bin" / "python"), f"pip=={PIP_VERSION}"],
            env=env,
            check=True,
        )
    return note


def _version_of(python: Path) -> str:
    if python == base_python():
        return f"{sys.version_info.major}.{sys.version_info.minor}"
    out = subprocess.run(
        [str(python), "-c", "import sys; print('%d.%d' % sys.version_info[:2])"], capture_output=True, text=True
    )
    return out.stdout.strip()


def _is_version(python: Path, version: str) -> bool:
    return _version_of(python) == version


def install_requirements(vm: VmPaths, requirements: str, *, note: str = "") -> int:
    """python.requirements on the local VM, as cloud-init does it on Azure: `uv pip install -r` into
    the VM's environment from the wheelhouse (offline), output to `~/.orch-install/log` and the exit
    code, written last, to `~/.orch-install/exit`. A requirement the wheelhouse lacks fails here with
    uv's message in the log."""
    from orchestrator.bootstrap import INSTALL_DIR, UV_VERSION

    folder = vm.home / INSTALL_DIR
    folder.mkdir(parents=True, exist_ok=True)
    (folder / "exit").unlink(missing_ok=True)
    listed = folder / "requirements.txt"
    listed.write_text(requirements)
    python = vm.python / "bin" / "python"
    env = {**os.environ, **uv_settings()}
    env.pop("VIRTUAL_ENV", None)
    with open(folder / "log", "ab") as log:
        log.write(
            f"orchestrator: Python {_version_of(python)} and the job's requirements, with uv "
            f"(the image's; {UV_VERSION} on Azure)\n{note}".encode()
        )
        log.flush()
        code = 0
        if any(line.strip() and not line.lstrip().startswith("#") for line in requirements.splitlines()):
            code = subprocess.run(
                [str(uv_binary()), "pip", "install", "--python", str(python), "-r", str(listed)],
                env=env,
                stdin=subprocess.DEVNULL,
                stdout=log,
                stderr=subprocess.STDOUT,
                cwd=vm.home,
                check=False,
            ).returncode
    if code == 0:
        link = folder / "python"
        link.unlink(missing_ok=True)
        link.symlink_to(vm.python)
    tmp = folder / "exit.tmp"
    tmp.write_text(f"{code}\n")
    tmp.replace(folder / "exit")
    return code


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
