"""python.requirements: the job's Python installed by the VM while it boots, with uv.

The spec field, the cloud-init that carries it to an Azure VM (uv pinned by hash, the requirements,
the size limit, the host keys and the cleanup of the custom data's copies), the job wrapper that puts
the environment first, and the whole cycle on the local target, where the VM host installs for real
from a wheelhouse the test builds (never downloading)."""

from __future__ import annotations

import base64
import json
import subprocess
from pathlib import Path
from typing import Any

import pytest

from orchestrator import bootstrap
from orchestrator.bootstrap import PythonSetup, cloud_init, python_setup_of
from orchestrator.emulator.cloudinit import parse_cloud_init
from orchestrator.spec import SpecError, load_spec
from tests.conftest import emulator_store
from tests.test_cli import cli
from tests.test_local_vm import NO_TRACEBACK, _wheel


def _job(tmp_path: Path, python: str, requirements: str | None = "orchtestpkg==1.0\n", run: str = "echo ok") -> Path:
    job = tmp_path / "job"
    job.mkdir(exist_ok=True)
    if requirements is not None:
        (job / "requirements.txt").write_text(requirements)
    (job / "job.yaml").write_text(f"name: withpython\n{python}run: {run}\n")
    return job / "job.yaml"


# ------------------------------------------------------------------------------------------ spec


def test_the_python_field_is_read_with_its_default_version(tmp_path: Path) -> None:
    spec = load_spec(_job(tmp_path, "python:\n  requirements: requirements.txt\n"))
    assert spec.python is not None and spec.python.requirements == "requirements.txt"
    assert spec.python.version == "3.11"
    spec = load_spec(_job(tmp_path, 'python:\n  requirements: requirements.txt\n  version: "3.13"\n'))
    assert spec.python is not None and spec.python.version == "3.13"
    spec = load_spec(_job(tmp_path, "python:\n  requirements: requirements.txt\n  version: 3.12\n"))
    assert spec.python is not None and spec.python.version == "3.12", "an unquoted 3.12 is 3.12"
    assert load_spec(_job(tmp_path, "")).python is None


@pytest.mark.parametrize(
    ("python", "line", "text"),
    [
        ("python:\n  requirements: missing.txt\n", 3, "python.requirements: no such file"),
        ('python:\n  requirements: requirements.txt\n  version: "3.10"\n', 4, "Python 3.10 is not offered"),
        ("python:\n  requirements: requirements.txt\n  version: 3.10\n", 4, "quote the version"),
        ("python:\n  requirements: ../requirements.txt\n", 3, "relative to the workdir"),
        ("python:\n  requirement: requirements.txt\n", 3, "unknown key"),
        ("python: requirements.txt\n", 2, "wrong type"),
    ],
)
def test_a_bad_python_field_is_refused_at_its_line(tmp_path: Path, python: str, line: int, text: str) -> None:
    path = _job(tmp_path, python)
    with pytest.raises(SpecError) as e:
        load_spec(path)
    assert f"{path}:{line}: " in str(e.value) and text in str(e.value), str(e.value)


def test_requirements_that_name_other_files_are_refused(tmp_path: Path) -> None:
    path = _job(tmp_path, "python:\n  requirements: requirements.txt\n", "numpy==2.4.6\n-r more.txt\n")
    with pytest.raises(SpecError) as e:
        load_spec(path)
    assert "requirements.txt:2: '-r more.txt' refers to a file" in str(e.value)
    assert "`setup`" in str(e.value)


def test_the_cli_refuses_a_bad_field_and_oversized_requirements_with_exit_2(tmp_path: Path) -> None:
    path = _job(tmp_path, "python:\n  requirements: nope.txt\n")
    r = cli("run", str(path), "--dry-run")
    assert r.returncode == 2 and f"{path}:3: python.requirements: no such file" in r.stderr, r.stderr
    huge = "".join(f"package-number-{i}==1.0.{i}  # pinned\n" for i in range(2000))  # ~70 KB
    path = _job(tmp_path, "python:\n  requirements: requirements.txt\n", huge)
    r = cli("run", str(path), "--dry-run")
    assert r.returncode == 2, r.stderr
    assert f"{path}:3: python.requirements: The VM's custom data" in r.stderr
    assert "Azure accepts at most 65,536" in r.stderr and "install the rest in `setup`" in r.stderr
    assert not any(m in r.stderr for m in NO_TRACEBACK)


# ------------------------------------------------------------------------------------ cloud-init


def _render(python: PythonSetup | None, **kw: Any) -> tuple[str, dict[str, Any]]:
    from orchestrator.sshkeys import generate_host_key

    key = generate_host_key()
    document = cloud_init(
        run_id="withpython-1a2b3c",
        vm_name="withpython-1a2b3c-0",
        rank=0,
        host_private_key=key.private_openssh,
        host_public_key=key.public,
        python=python,
        **kw,
    )
    return document, parse_cloud_init(bootstrap.as_custom_data(document))


def _install_script(doc: dict[str, Any]) -> str:
    (entry,) = [f for f in doc["write_files"] if f["path"] == "/usr/local/sbin/orchestrator-install-python"]
    return str(entry["content"])


def test_cloud_init_installs_uv_pinned_by_hash_then_the_requirements() -> None:
    text, doc = _render(PythonSetup("3.12", "torch==2.13.0\nnumpy==2.4.6\n", "jobs/x/requirements.txt"))
    assert doc["packages"] == ["python3-pip"], "pip exists before the install runs"
    script = _install_script(doc)
    subprocess.run(["bash", "-n"], input=script, text=True, check=True)
    expected = f"uv=={bootstrap.UV_VERSION} --hash=sha256:{bootstrap.UV_WHEEL_SHA256}"
    assert expected in script and len(bootstrap.UV_WHEEL_SHA256) == 64
    assert "pip download --quiet --no-deps --only-binary=:all: --require-hashes" in script
    assert "uv venv --seed --python 3.12 /opt/orch/python" in script
    assert "uv pip install --python /opt/orch/python/bin/python -r /etc/orchestrator/requirements.txt" in script
    assert '"$dir/exit.tmp" && mv "$dir/exit.tmp" "$dir/exit"' in script, "the exit code is written last"
    assert "://" not in text, "no host name of any package registry in what the VM receives"
    # The requirements travel in the custom data, and read back as the local VM host reads them.
    setup = python_setup_of(doc)
    assert setup is not None and setup.version == "3.12" and setup.requirements == "torch==2.13.0\nnumpy==2.4.6\n"
    (req,) = [f for f in doc["write_files"] if f["path"] == "/etc/orchestrator/requirements.txt"]
    assert base64.b64decode(req["content"]).decode() == setup.requirements
    assert doc["runcmd"][-1] == ["/usr/local/sbin/orchestrator-install-python"], "last: after the keys are cleaned"


def test_without_the_field_there_is_no_install() -> None:
    text, doc = _render(None)
    assert "packages" not in doc and python_setup_of(doc) is None
    assert "orchestrator-install-python" not in text


def test_custom_data_over_azures_limit_is_refused() -> None:
    huge = "".join(f"package-number-{i}==1.0.{i}\n" for i in range(3000))
    with pytest.raises(bootstrap.CustomDataTooLarge) as e:
        _render(PythonSetup("3.11", huge, "jobs/x/requirements.txt"))
    assert "jobs/x/requirements.txt is" in str(e.value) and "65,536" in str(e.value)
    assert bootstrap.custom_data_problem(PythonSetup("3.11", huge, "r.txt"))
    assert not bootstrap.custom_data_problem(PythonSetup("3.11", "torch==2.13.0\n", "r.txt"))


def test_rsa_and_ed25519_host_keys_travel_and_every_copy_of_the_custom_data_is_deleted() -> None:
    from cryptography.hazmat.primitives import serialization

    _, doc = _render(PythonSetup("3.11", "", ""))
    keys = doc["ssh_keys"]
    assert set(keys) == {"ed25519_private", "ed25519_public", "rsa_private", "rsa_public"}
    assert keys["ed25519_public"].startswith("ssh-ed25519 ") and keys["rsa_public"].startswith("ssh-rsa ")
    rsa = serialization.load_ssh_private_key(keys["rsa_private"].encode(), password=None)
    assert rsa.public_key().key_size >= 3072  # type: ignore[union-attr]
    assert doc["ssh_genkeytypes"] == [] and doc["ssh_deletekeys"] is True
    cleanup = " ".join(" ".join(map(str, c)) for c in doc["runcmd"][:2])
    for copy in (
        "/var/lib/cloud/instance/user-data.txt",
        "/var/lib/cloud/instance/user-data.txt.i",
        "/var/lib/cloud/instance/cloud-config.txt",
        "/var/lib/cloud/instance/obj.pkl",
        "/var/lib/waagent/CustomData",
        "/var/lib/waagent/ovf-env.xml",
    ):
        assert copy in cleanup, copy


def test_the_ovf_env_cleanup_strips_custom_data_and_keeps_the_rest(tmp_path: Path) -> None:
    _, doc = _render(None)
    ovf = tmp_path / "ovf-env.xml"
    ovf.write_text(
        '<ns0:Environment xmlns:ns1="http://schemas.microsoft.com/windowsazure"><ns1:UserName>azureuser'
        "</ns1:UserName><ns1:CustomData>I2Nsb3VkLWNv\nbmZpZw==</ns1:CustomData></ns0:Environment>"
    )
    command = [str(part).replace("/var/lib/waagent/ovf-env.xml", str(ovf)) for part in doc["runcmd"][1]]
    subprocess.run(command, check=True)
    assert "CustomData" not in ovf.read_text() and "<ns1:UserName>azureuser</ns1:UserName>" in ovf.read_text()


def test_the_job_wrapper_puts_the_installed_environment_first(tmp_path: Path) -> None:
    home, env = tmp_path / "home", tmp_path / "env"
    (env / "bin").mkdir(parents=True)
    (env / "bin" / "python3").write_text("#!/bin/sh\necho env-python\n")
    (env / "bin" / "python3").chmod(0o755)
    (home / ".orch-install").mkdir(parents=True)
    (home / ".orch-install" / "python").symlink_to(env)
    phase = tmp_path / "phase"
    phase.mkdir()
    out = tmp_path / "out"
    (phase / "env").write_text(f"ORCH_OUTPUT_DIR={out}\nORCH_CHECKPOINT_DIR={out}\n")
    (phase / "command.sh").write_text('python3; echo "venv=$VIRTUAL_ENV"\n')
    wrapper = bootstrap.render(
        "job-wrapper.sh.j2", run_id="r", phase="setup", phase_dir=str(phase), workdir=str(tmp_path)
    )
    (phase / "wrapper.sh").write_text(wrapper)
    run = {"HOME": str(home), "PATH": "/usr/bin:/bin"}
    subprocess.run(["/bin/bash", str(phase / "wrapper.sh")], env=run, check=True)
    assert (phase / "log").read_text() == f"env-python\nvenv={env}\n"
    (home / ".orch-install" / "python").unlink()  # no python field: the image's own python3
    (phase / "env").write_text(f"ORCH_OUTPUT_DIR={out}\nORCH_CHECKPOINT_DIR={out}\n")
    (phase / "log").unlink()
    (phase / "command.sh").write_text('echo "venv=${VIRTUAL_ENV:-none}"\n')
    subprocess.run(["/bin/bash", str(phase / "wrapper.sh")], env=run, check=True)
    assert (phase / "log").read_text() == "venv=none\n"


# ----------------------------------------------------------------------------- following it


class _Result:
    def __init__(self, stdout: bytes, stderr: bytes) -> None:
        self.stdout, self.stderr = stdout, stderr


class _Node:
    """A node whose install log grows over three polls, after a dropped connection."""

    def __init__(self, polls: list[tuple[bytes, bytes] | None]) -> None:
        self.polls = polls
        self.commands: list[str] = []
        self.reconnects = 0
        self.ep = type("Ep", (), {"name": "vm-0"})()

    def exec(self, command: str, timeout: float | None = None) -> _Result:
        from orchestrator.remote.connect import ConnectionLost

        self.commands.append(command)
        poll = self.polls.pop(0)
        if poll is None:
            raise ConnectionLost("vm-0: dropped")
        return _Result(*poll)

    def reconnect(self) -> None:
        self.reconnects += 1


class _Sink:
    def __init__(self) -> None:
        self.data = b""

    def write(self, data: bytes) -> None:
        self.data += data


def test_following_resumes_from_the_offset_after_a_drop_and_returns_the_exit_code() -> None:
    from orchestrator.lifecycle.install import follow_install

    node = _Node([(b"", b"0 "), (b"Resolved 1\n", b"1 "), None, (b"+ pkg==1\n", b"1 0")])
    sink = _Sink()
    assert follow_install(node, sink, sleep=lambda s: None) == 0
    assert sink.data == b"Resolved 1\n+ pkg==1\n" and node.reconnects == 1
    assert "tail -c +1 " in node.commands[1] and "tail -c +12 " in node.commands[3]


def test_an_install_that_never_starts_fails_clearly() -> None:
    from orchestrator.lifecycle.install import InstallFailed, follow_install

    clock = iter(range(0, 10_000, 100))
    node = _Node([(b"", b"0 ")] * 100)
    with pytest.raises(InstallFailed, match="never started on vm-0"):
        follow_install(node, _Sink(), start_timeout_s=900, sleep=lambda s: None, monotonic=lambda: next(clock))


# ------------------------------------------------------------------------ the local target, for real


def _local(tmp_path: Path, *args: str, env: dict[str, str] | None = None) -> subprocess.CompletedProcess[str]:
    return cli("--target", "local", "--state-dir", str(tmp_path / "state"), *args, env=env)


def test_a_job_with_python_requirements_installs_at_boot_and_runs_with_them(tmp_path: Path) -> None:
    house = tmp_path / "wheelhouse"
    house.mkdir()
    _wheel(house)
    run = "python3 -c \"import orchtestpkg, os; print('imported', orchtestpkg.VALUE, os.environ['VIRTUAL_ENV'])\""
    job = _job(tmp_path, "python:\n  requirements: requirements.txt\n", run=run)
    wheels = {"ORCH_LOCAL_WHEELHOUSE": str(house)}
    r = _local(tmp_path, "run", str(job), "--nodes", "2", env=wheels)
    assert r.returncode == 0, r.stderr
    assert r.stdout.count("imported 42") == 2, r.stdout
    assert "+ orchtestpkg==1.0" in r.stdout, "uv's output streams live"
    run_id = next(p.name for p in (tmp_path / "state" / "runs").iterdir())
    status = json.loads(_local(tmp_path, "--json", "status", run_id).stdout)
    installs = [p for p in status["phases"] if p["phase"] == "install"]
    assert sorted(p["node"] for p in installs) == [0, 1] and all(p["ended"] for p in installs)
    order = [p["phase"] for p in status["phases"]]
    assert order.index("sync") < order.index("install") < order.index("train")
    logs = _local(tmp_path, "logs", run_id, "--phase", "install")
    assert logs.returncode == 0 and "+ orchtestpkg==1.0" in logs.stdout and "Resolved 1 package" in logs.stdout
    everything = _local(tmp_path, "logs", run_id).stdout
    assert everything.index("orchtestpkg==1.0") < everything.index("imported 42"), "install, then run"
    assert not any(m in r.stderr for m in NO_TRACEBACK)


def test_a_requirement_that_cannot_be_installed_fails_the_job_with_its_log(tmp_path: Path) -> None:
    job = _job(tmp_path, "python:\n  requirements: requirements.txt\n", "orchdoesnotexist==9.9\n", run="echo ran")
    r = _local(tmp_path, "run", str(job))
    assert r.returncode == 1, r.stderr
    assert "ran" not in r.stdout.split(), "the job never starts"
    assert "could not be installed on node0" in r.stderr
    assert "orchdoesnotexist" in r.stderr and "No solution found" in r.stderr, "uv's own message"
    assert not any(m in r.stdout + r.stderr for m in NO_TRACEBACK)
    run_id = next(p.name for p in (tmp_path / "state" / "runs").iterdir())
    status = json.loads(_local(tmp_path, "--json", "status", run_id).stdout)
    assert status["verdict"] == "job-failed" and status["torn_down"] is True
    assert emulator_store(tmp_path / "state")["resources"] == {}
