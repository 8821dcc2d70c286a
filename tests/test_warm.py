"""Warm start (ORCH_WARM=1): commands forked from a server that has the tool imported behave, for
the user, exactly as commands run in their own process: output, exit codes, Ctrl-C, SIGKILL."""

from __future__ import annotations

import json
import os
import shutil
import signal
import tempfile
import time
from collections.abc import Iterator
from pathlib import Path

import pytest

from orchestrator.targets.localvm.manager import processes_in
from tests.conftest import emulator_store
from tests.test_cli import SMOKE, cli, start, wait_for, write_job

pytestmark = pytest.mark.slow


@pytest.fixture
def warm_dir() -> Iterator[Path]:
    """A folder of its own for this test's server (short: a Unix socket's path is at most 107 bytes);
    the server is told to leave at the end, and must."""
    folder = Path(tempfile.mkdtemp(prefix="ow", dir="/tmp"))
    yield folder
    servers = _servers(folder)
    for pid in servers:
        os.kill(pid, signal.SIGTERM)
    _wait_until(lambda: not _servers(folder), 10)
    left = _servers(folder)
    shutil.rmtree(folder, ignore_errors=True)
    assert not left, f"the warm-start server outlived its SIGTERM: {left}"


def _servers(folder: Path) -> list[int]:
    """The server itself, not its forks (which share its command line)."""
    warm = {pid for pid, cmdline, _ in processes_in(folder) if "orchestrator.warm" in cmdline}
    return sorted(pid for pid in warm if _parent(pid) not in warm)


def _parent(pid: int) -> int | None:
    try:
        stat = Path(f"/proc/{pid}/stat").read_text()
    except OSError:
        return None
    fields = stat[stat.rindex(")") + 2 :].split()
    return None if fields[0] == "Z" else int(fields[1])


def _children(pid: int, *, commands_only: bool = True) -> list[int]:
    """Its live children; `commands_only`: not the VM hosts it started (their own sessions)."""
    found = []
    for entry in os.listdir("/proc"):
        if not entry.isdigit() or _parent(int(entry)) != pid:
            continue
        try:
            leader = os.getsid(int(entry)) == int(entry)
        except ProcessLookupError:
            continue
        if not (commands_only and leader):
            found.append(int(entry))
    return found


def _wait_until(done: object, seconds: float) -> None:
    deadline = time.monotonic() + seconds
    while not done() and time.monotonic() < deadline:  # type: ignore[operator]
        time.sleep(0.05)


def _warm(folder: Path, **more: str) -> dict[str, str]:
    return {"ORCH_WARM": "1", "ORCH_WARM_DIR": str(folder), **more}


def test_warm_commands_answer_as_cold_ones_and_share_one_server(tmp_path: Path, warm_dir: Path) -> None:
    state = ["--target", "local", "--state-dir", str(tmp_path / "state")]
    cold = cli(*state, "--json", "run", str(SMOKE))
    first = cli(*state, "--json", "run", str(SMOKE), env=_warm(warm_dir))
    (server,) = _servers(warm_dir)
    second = cli(*state, "--json", "run", str(SMOKE), env=_warm(warm_dir))
    assert _servers(warm_dir) == [server], "the second command was forked from the first one's server"
    for r in (cold, first, second):
        assert r.returncode == 0, r.stdout + r.stderr
        result = json.loads(r.stdout.splitlines()[-1])
        assert (result["event"], result["verdict"], result["exit_code"]) == ("result", "succeeded", 0)
        assert result["metrics"] == {"python_ok": 1, "gpus": 0}
    events = [[json.loads(line)["event"] for line in r.stdout.splitlines()] for r in (cold, first, second)]
    assert events[0] == events[1] == events[2]
    assert emulator_store(tmp_path / "state")["resources"] == {}

    # A user's mistake: the same paragraph on stderr and exit 2, whichever way the command ran.
    bad = tmp_path / "bad.yaml"
    bad.write_text("name: x\nrun: true\nnodes: zero\n")
    answers = [cli(*state, "run", str(bad)), cli(*state, "run", str(bad), env=_warm(warm_dir))]
    assert [a.returncode for a in answers] == [2, 2]
    assert answers[0].stderr == answers[1].stderr and "nodes" in answers[0].stderr
    assert "Traceback" not in answers[1].stderr


def test_ctrl_c_reaches_a_warm_run_which_tears_down(tmp_path: Path, warm_dir: Path) -> None:
    job = write_job(
        tmp_path, "import time\nfor i in range(600):\n    print('tick', i, flush=True)\n    time.sleep(0.1)\n"
    )
    state = tmp_path / "state"
    proc = start(["--target", "local", "--state-dir", str(state), "run", str(job)], _warm(warm_dir, API_TOKEN="x"))
    seen: list[str] = []
    wait_for(proc, "tick 3", seen)
    proc.send_signal(signal.SIGINT)  # to the client, as the terminal sends it: relayed to the fork
    out, _ = proc.communicate(timeout=60)
    assert proc.returncode == 130, "".join(seen) + out
    assert "all resources deleted" in out
    assert emulator_store(state)["resources"] == {} and emulator_store(state)["groups"] == {}
    assert processes_in(state) == [], "the job died with its VM"
    (server,) = _servers(warm_dir)
    assert _children(server) == [], "the command's fork ended with it"


def test_a_killed_warm_client_takes_its_command_with_it(tmp_path: Path, warm_dir: Path) -> None:
    state = tmp_path / "state"
    slow = _warm(warm_dir, ORCH_EMULATOR_PROFILE="azure-like", ORCH_EMULATOR_SPEED="20")
    proc = start(["--target", "local", "--state-dir", str(state), "provision", str(SMOKE)], slow)
    seen: list[str] = []
    wait_for(proc, "creating  virtualMachines", seen)
    (server,) = _servers(warm_dir)
    (fork,) = _children(server)
    proc.kill()
    proc.wait(timeout=30)
    _wait_until(lambda: not Path(f"/proc/{fork}").exists() or fork not in _children(server), 10)
    assert fork not in _children(server), "a SIGKILL of the command kills its fork too"
    left = emulator_store(state)
    assert left["groups"] and left["resources"], "what it created stays, as a killed command's does"
    gc = cli("--target", "local", "--state-dir", str(state), "gc", "--all", env=_warm(warm_dir))
    assert gc.returncode == 0, gc.stdout + gc.stderr
    assert emulator_store(state)["resources"] == {}


def test_the_server_leaves_when_idle_and_a_command_never_depends_on_it(tmp_path: Path, warm_dir: Path) -> None:
    state = ["--target", "local", "--state-dir", str(tmp_path / "state")]
    assert cli(*state, "ls", env=_warm(warm_dir, ORCH_WARM_IDLE_S="0.5")).returncode == 0
    _wait_until(lambda: not _servers(warm_dir), 10)
    assert _servers(warm_dir) == [] and not list(warm_dir.glob("*.sock")), "it left, and took its socket"
    # A folder whose socket path would be too long for Unix: the command runs in-process instead.
    deep = warm_dir / ("x" * 90)
    r = cli(*state, "ls", env=_warm(deep))
    assert r.returncode == 0 and not deep.exists()


def test_a_warm_run_under_nohup_ignores_the_hangup_as_a_normal_one_does(tmp_path: Path, warm_dir: Path) -> None:
    """SIGHUP ignored by the client (nohup, then the terminal closes) stays ignored for the command."""
    import subprocess
    import sys

    from tests.test_cli import REPO

    ticks = "import time\nfor i in range(30):\n    print('tick', i, flush=True)\n    time.sleep(0.1)\n"
    job = write_job(tmp_path, ticks)
    state = tmp_path / "state"
    env = {k: v for k, v in os.environ.items() if not k.startswith(("AZURE_", "ORCH_"))}
    env.update(_warm(warm_dir, API_TOKEN="x"))
    proc = subprocess.Popen(
        [sys.executable, "-m", "orchestrator", "--target", "local", "--state-dir", str(state), "run", str(job)],
        stdout=subprocess.PIPE,
        stderr=subprocess.STDOUT,
        text=True,
        env=env,
        cwd=REPO,
        preexec_fn=lambda: signal.signal(signal.SIGHUP, signal.SIG_IGN),
    )
    seen: list[str] = []
    wait_for(proc, "tick 3", seen)
    proc.send_signal(signal.SIGHUP)
    out, _ = proc.communicate(timeout=60)
    assert proc.returncode == 0, "".join(seen) + out
    assert "tick 29" in out and "all resources deleted" in out


def test_a_state_dir_behind_a_symlink_keeps_one_host_per_vm_and_down_ends_it(tmp_path: Path, warm_dir: Path) -> None:
    """Forked VM hosts are recognised by their (resolved) folder: a later command does not start a
    second host for the VM, and `down` ends the one there is."""
    real = tmp_path / "real"
    real.mkdir()
    (tmp_path / "link").symlink_to(real)
    state = ["--target", "local", "--state-dir", str(tmp_path / "link")]
    provisioned = cli(*state, "--json", "provision", str(SMOKE), env=_warm(warm_dir))
    assert provisioned.returncode == 0, provisioned.stdout + provisioned.stderr
    run_id = json.loads(provisioned.stdout.splitlines()[-1])["run_id"]
    assert cli(*state, "ls", env=_warm(warm_dir)).returncode == 0  # replays the running VMs
    (server,) = _servers(warm_dir)
    hosts = [pid for pid in _children(server, commands_only=False) if pid not in _children(server)]
    assert len(hosts) == 1, hosts
    assert cli(*state, "down", run_id, env=_warm(warm_dir)).returncode == 0
    assert processes_in(real) == [], "down ended the VM's host before it returned (not the host alone, later)"
