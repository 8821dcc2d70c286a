"""What a VM is told at boot: the cloud-init document rendered from templates/, as custom data.

Pure apart from reading the template (and, for a job with `python.requirements`, that file), so tests
can parse what a VM would receive. The job's Python travels here too: the VM installs uv (pinned,
verified by its sha256), makes the job's environment with it and installs the requirements while it
boots, writing a log and an exit code where the tool (lifecycle/install.py) reads them over SSH.
The local target's VM host reads the same document (python_setup_of) and does the same offline.
"""

from __future__ import annotations

import base64
import math
import posixpath
from dataclasses import dataclass
from functools import cache
from pathlib import Path
from typing import Any

from orchestrator.errors import UserInputError

TEMPLATES = Path(__file__).resolve().parent.parent / "templates"

# uv, pinned: the manylinux x86_64 wheel of this version, which pip downloads with --require-hashes.
UV_VERSION = "0.13.8"
UV_WHEEL_SHA256 = "e18a57b8b352eb7c8feb317b9f6f533c8f0ad9673fd6cf34bbe3cf1a9f6a8984"

# Where the install happens and reports, the same on every target. INSTALL_DIR is relative to the
# admin user's home: `log` (uv's output), `exit` (its exit code, written last) and `python` (a link
# to the environment, which the job wrapper puts first on PATH).
INSTALL_DIR = ".orch-install"
PYTHON_ENV = "/opt/orch/python"  # on Azure; the local VM's environment is <vm>/python
REQUIREMENTS_PATH = "/etc/orchestrator/requirements.txt"
RUN_FILE = "/etc/orchestrator/run"

# Azure: "The size can't exceed 64 KB" (learn.microsoft.com/azure/virtual-machines/custom-data). The
# API itself accepts 87,380 base64 characters (65,535 bytes decoded); the tool holds the base64 text
# to 64 KiB, which keeps it within either reading.
CUSTOM_DATA_LIMIT = 64 * 1024


@dataclass(frozen=True)
class PythonSetup:
    """What the VM installs at boot: a Python version and the text of a requirements file."""

    version: str
    requirements: str
    source: str = "requirements.txt"  # where the text came from, for messages


class CustomDataTooLarge(UserInputError):
    pass


@cache
def _environment() -> Any:
    import jinja2

    return jinja2.Environment(
        loader=jinja2.FileSystemLoader(str(TEMPLATES)),
        undefined=jinja2.StrictUndefined,
        keep_trailing_newline=True,
        autoescape=False,  # YAML and shell, not HTML
    )


def render(template: str, **values: Any) -> str:
    return str(_environment().get_template(template).render(**values))


def python_setup(job: Any) -> PythonSetup | None:
    """The job's `python:` field with its requirements file read (None without the field)."""
    python = getattr(job, "python", None)
    if python is None:
        return None
    if python.requirements is None:
        return PythonSetup(python.version, "", "")
    path = Path(job.workdir_path) / python.requirements
    return PythonSetup(python.version, path.read_text(encoding="utf-8"), str(path))


def cloud_init(
    *,
    run_id: str,
    vm_name: str,
    rank: int,
    host_private_key: str,
    host_public_key: str,
    user: str = "azureuser",
    max_duration: int = 4 * 3600,
    gpu: bool = False,
    job: Any = None,
    python: PythonSetup | None = None,
    rsa_host_key: tuple[str, str] | None = None,
) -> str:
    """The VM's cloud-config. `job` (a JobSpec) brings its `python:` field unless `python` is given;
    `rsa_host_key` (private, public) is generated here when not given. A document whose custom data
    would exceed Azure's limit raises CustomDataTooLarge (bad input: nothing has been created)."""
    if python is None and job is not None:
        python = python_setup(job)
    if rsa_host_key is None:
        from orchestrator.sshkeys import generate_rsa_host_key

        rsa = generate_rsa_host_key()
        rsa_host_key = (rsa.private_openssh, rsa.public)
    document = _render(
        run_id=run_id,
        vm_name=vm_name,
        rank=rank,
        host_private_key=host_private_key,
        host_public_key=host_public_key,
        rsa_private_key=rsa_host_key[0],
        rsa_public_key=rsa_host_key[1],
        user=user,
        max_duration=max_duration,
        gpu=gpu,
        python=python,
    )
    problem = _size_problem(document, python)
    if problem:
        raise CustomDataTooLarge(problem)
    return document


def _render(
    *,
    run_id: str,
    vm_name: str,
    rank: int,
    host_private_key: str,
    host_public_key: str,
    rsa_private_key: str,
    rsa_public_key: str,
    user: str,
    max_duration: int,
    gpu: bool,
    python: PythonSetup | None,
) -> str:
    return render(
        "cloud-init.yaml.j2",
        run_id=run_id,
        vm_name=vm_name,
        rank=rank,
        host_private_key=host_private_key.strip(),
        host_public_key=host_public_key,
        rsa_private_key=rsa_private_key.strip(),
        rsa_public_key=rsa_public_key,
        user=user,
        max_duration=int(max_duration),
        gpu=gpu,
        python=python,
        requirements_b64=base64.b64encode(python.requirements.encode()).decode() if python else "",
        requirements_path=REQUIREMENTS_PATH,
        run_file=RUN_FILE,
        install_dir=INSTALL_DIR,
        python_env=PYTHON_ENV,
        python_env_parent=posixpath.dirname(PYTHON_ENV),
        uv_version=UV_VERSION,
        uv_sha256=UV_WHEEL_SHA256,
    )


def custom_data_size(document: str) -> int:
    """Characters of base64 text the document becomes."""
    return 4 * math.ceil(len(document.encode()) / 3)


def _size_problem(document: str, python: PythonSetup | None) -> str:
    size = custom_data_size(document)
    if size <= CUSTOM_DATA_LIMIT:
        return ""
    what = (
        f"; {python.source} is {len(python.requirements.encode()):,} bytes of it. Trim it (comments, hashes) or "
        "install the rest in `setup`"
        if python is not None and python.requirements
        else ""
    )
    return (
        f"The VM's custom data (its cloud-init, which carries python.requirements) would be {size:,} characters "
        f"of base64; Azure accepts at most {CUSTOM_DATA_LIMIT:,}{what}."
    )


def custom_data_problem(python: PythonSetup, *, user: str = "azureuser") -> str:
    """Before anything is created (spec checks): would this job's custom data exceed the limit? Renders
    with placeholder keys of the real keys' lengths and the longest run id; "" when it fits."""
    placeholder_ed25519 = "A" * 420  # an OpenSSH ed25519 private key is ~400 characters
    placeholder_rsa = "A" * 2700  # RSA 3072: ~2,580
    document = _render(
        run_id="x" * 47,
        vm_name="x" * 50,
        rank=15,
        host_private_key=placeholder_ed25519,
        host_public_key="ssh-ed25519 " + "A" * 68,
        rsa_private_key=placeholder_rsa,
        rsa_public_key="ssh-rsa " + "A" * 544,
        user=user,
        max_duration=7 * 24 * 3600,
        gpu=True,
        python=python,
    )
    return _size_problem(document, python)


def as_custom_data(document: str) -> str:
    return base64.b64encode(document.encode()).decode()


def python_setup_of(document: dict[str, Any]) -> PythonSetup | None:
    """The job's Python as a parsed cloud-config carries it (the local VM host reads it this way)."""
    files = {str(f.get("path")): f for f in document.get("write_files") or [] if isinstance(f, dict)}
    entry = files.get(REQUIREMENTS_PATH)
    if entry is None:
        return None
    content = str(entry.get("content") or "")
    text = base64.b64decode(content).decode() if entry.get("encoding") in {"b64", "base64"} else content
    version = "3.11"
    for line in str((files.get(RUN_FILE) or {}).get("content") or "").splitlines():
        key, _, value = line.partition("=")
        if key.strip() == "python_version" and value.strip():
            version = value.strip()
    return PythonSetup(version, text, REQUIREMENTS_PATH)
