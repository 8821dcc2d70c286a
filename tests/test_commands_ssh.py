"""`orchestrator ssh` and `ssh-config` with OpenSSH's real client against a local-target VM, and shell
completion. Nothing of the user's ~/.ssh is read or written, except the config entries asked for."""

from __future__ import annotations

import json
import os
import pwd
import shutil
import subprocess
from collections.abc import Iterator
from pathlib import Path

import pytest

from orchestrator import sshconfig
from orchestrator.commands import ssh as ssh_cmd

REPO = Path(__file__).resolve().parents[1]
SMOKE = REPO / "jobs" / "smoke" / "job.yaml"
SSH = shutil.which("ssh")
needs_ssh = pytest.mark.skipif(SSH is None, reason="OpenSSH's client is not installed (apt-get install openssh-client)")


from tests.test_cli import cli  # noqa: E402


def real_known_hosts() -> Path:
    """Where OpenSSH itself would record host keys: the passwd home, whatever $HOME says."""
    return Path(pwd.getpwuid(os.getuid()).pw_dir) / ".ssh" / "known_hosts"


def _snapshot(path: Path) -> tuple[bool, bytes, int]:
    return (True, path.read_bytes(), path.stat().st_mtime_ns) if path.exists() else (False, b"", 0)


@pytest.fixture(scope="module")
def kept(tmp_path_factory: pytest.TempPathFactory) -> Iterator[tuple[list[str], str, Path]]:
    """A two-node run provisioned on the local target: (global args, run id, state dir)."""
    state = tmp_path_factory.mktemp("state")
    local = ["--target", "local", "--state-dir", str(state)]
    r = cli(*local, "--json", "provision", str(SMOKE), "--nodes", "2")
    assert r.returncode == 0, r.stderr
    run_id = json.loads(r.stdout.splitlines()[-1])["run_id"]
    yield local, run_id, state
    cli(*local, "down", run_id)


@needs_ssh
def test_ssh_runs_a_command_with_the_runs_key_and_pinned_host_key(
    kept: tuple[list[str], str, Path], tmp_path: Path
) -> None:
    local, run_id, state = kept
    env = {"HOME": str(tmp_path)}
    before = _snapshot(real_known_hosts())
    r = cli(*local, "ssh", run_id, "--", "echo", "hi", env=env)
    assert r.returncode == 0, r.stderr
    assert r.stdout == "hi\n"
    assert "Warning: Permanently added" not in r.stderr
    r = cli(*local, "ssh", run_id, "--node", "1", "--", "echo", "$PWD", env=env)
    assert r.returncode == 0 and r.stdout.strip().endswith(f"/vms/{run_id}-1/home"), r.stdout + r.stderr
    assert cli(*local, "ssh", run_id, "--", "exit", "7", env=env).returncode == 7  # the remote exit code
    # The pinned keys, filed under each node's alias, in the run's folder; ~/.ssh untouched.
    known = (state / "runs" / run_id / "known_hosts").read_text().splitlines()
    nodes = json.loads((state / "runs" / run_id / "nodes.json").read_text())
    assert known == [f"orch-{run_id}-{n['rank']} {n['host_key']}" for n in nodes]
    assert not (tmp_path / ".ssh").exists()
    assert _snapshot(real_known_hosts()) == before


@needs_ssh
def test_a_wrong_host_key_is_refused(kept: tuple[list[str], str, Path], tmp_path: Path) -> None:
    local, run_id, state = kept
    entry = ssh_cmd.SshEntry(
        0,
        f"orch-{run_id}",
        f"orch-{run_id}-1",  # node 1's pinned key for node 0: not the key node 0 presents
        *_endpoint(local, run_id, tmp_path),
        "azureuser",
        state / "runs" / run_id / "id_ed25519",
        state / "runs" / run_id / "known_hosts",
    )
    r = subprocess.run(
        ssh_cmd.ssh_argv(entry, ("echo", "hi")),
        capture_output=True,
        text=True,
        timeout=60,
        check=False,
        stdin=subprocess.DEVNULL,
    )
    assert r.returncode == 255 and "hi" not in r.stdout
    assert "HOST IDENTIFICATION HAS CHANGED" in r.stderr or "Host key verification failed" in r.stderr, r.stderr


@needs_ssh
def test_an_interactive_session_gets_a_terminal(kept: tuple[list[str], str, Path], tmp_path: Path) -> None:
    """`ssh -t` (and `orchestrator ssh RUN` from a terminal) gets a PTY, as the Azure VM's sshd gives:
    the shell is interactive, a program sees a terminal, and the exit code comes back."""
    local, run_id, state = kept
    entry = ssh_cmd.SshEntry(
        0,
        f"orch-{run_id}",
        f"orch-{run_id}-0",
        *_endpoint(local, run_id, tmp_path),
        "azureuser",
        state / "runs" / run_id / "id_ed25519",
        state / "runs" / run_id / "known_hosts",
    )
    argv = ssh_cmd.ssh_argv(entry)
    forced = [argv[0], "-tt", *argv[1:]]  # our stdin is a pipe: -tt asks for a PTY all the same
    r = subprocess.run(
        [*forced, "--", "tty; test -t 0 && echo stdin-is-a-terminal; echo TERM=$TERM; exit 5"],
        capture_output=True,
        timeout=60,
        check=False,
        stdin=subprocess.DEVNULL,
    )
    out = r.stdout.decode().replace("\r\n", "\n")
    assert r.returncode == 5, out + r.stderr.decode()
    assert out.startswith("/dev/pts/") and "stdin-is-a-terminal\n" in out and "TERM=" in out
    shell = subprocess.run(
        forced,
        input=b"echo answer=$((6*7)) $-\nexit 3\n",
        capture_output=True,
        timeout=60,
        check=False,
    )
    text = shell.stdout.decode().replace("\r\n", "\n")
    assert shell.returncode == 3, text + shell.stderr.decode()
    answer = [line for line in text.splitlines() if line.startswith("answer=")]
    assert answer and answer[-1].startswith("answer=42 ") and "i" in answer[-1].split()[1], text  # an interactive shell


def _endpoint(local: list[str], run_id: str, home: Path) -> tuple[str, int]:
    doc = json.loads(cli(*local, "--json", "ssh-config", run_id, "--node", "0", env={"HOME": str(home)}).stdout)
    host = doc["hosts"][0]
    return host["host"], host["port"]


@needs_ssh
def test_ssh_config_write_lets_plain_ssh_reach_every_node_and_down_removes_it(tmp_path: Path) -> None:
    state, home = tmp_path / "state", tmp_path / "home"
    home.mkdir()
    local = ["--target", "local", "--state-dir", str(state)]
    env = {"HOME": str(home)}
    r = cli(*local, "--json", "provision", str(SMOKE), "--nodes", "2")
    assert r.returncode == 0, r.stderr
    run_id = json.loads(r.stdout.splitlines()[-1])["run_id"]

    printed = cli(*local, "ssh-config", run_id, env=env)
    assert printed.returncode == 0 and not (home / ".ssh").exists()  # printing writes nothing
    assert f"Host orch-{run_id} orch-{run_id}-0\n" in printed.stdout and f"Host orch-{run_id}-1\n" in printed.stdout

    # The user's own config: a `Host *` whose User would win if our entries came after it.
    config = home / ".ssh" / "config"
    config.parent.mkdir(mode=0o700)
    mine = "ServerAliveInterval 30\n\nHost *\n    User somebody-else\n"
    config.write_text(mine)
    os.chmod(config, 0o600)
    r = cli(*local, "ssh-config", run_id, "--write", env=env)
    assert r.returncode == 0, r.stderr
    assert f"Added orch-{run_id}, orch-{run_id}-1 to {config}" in r.stdout
    text = config.read_text()
    assert text.startswith(f"# >>> orchestrator {run_id} >>>\n") and text.endswith(mine)
    assert f"# <<< orchestrator {run_id} <<<\n" in text and config.stat().st_mode & 0o777 == 0o600
    assert cli(*local, "ssh-config", run_id, "--write", env=env).returncode == 0
    assert config.read_text() == text  # written again: replaced, not duplicated

    before = _snapshot(real_known_hosts())
    for name, rank in ((f"orch-{run_id}", 0), (f"orch-{run_id}-0", 0), (f"orch-{run_id}-1", 1)):
        r = subprocess.run(
            [ssh_client(), "-F", str(config), name, "echo", "hi from", "$HOME"],
            capture_output=True,
            text=True,
            timeout=60,
            check=False,
            stdin=subprocess.DEVNULL,
        )
        assert r.returncode == 0, r.stderr
        assert r.stdout.startswith("hi from") and r.stdout.strip().endswith(f"/vms/{run_id}-{rank}/home"), r.stdout
    assert not (home / ".ssh" / "known_hosts").exists()
    assert _snapshot(real_known_hosts()) == before

    r = cli(*local, "down", run_id, env=env)
    assert r.returncode == 0, r.stderr
    assert config.read_text() == mine
    r = cli(*local, "ssh-config", run_id, "--remove", env=env)
    assert r.returncode == 0 and "has no entries" in r.stdout
    assert cli(*local, "ssh", run_id, "--", "true", env=env).returncode == 2  # torn down


def ssh_client() -> str:
    assert SSH is not None
    return SSH


def test_ssh_is_refused_under_json_and_unknown_runs_are_bad_input(tmp_path: Path) -> None:
    local = ["--target", "local", "--state-dir", str(tmp_path)]
    r = cli(*local, "--json", "ssh", "smoke-abc123", "--", "true")
    assert r.returncode == 2
    doc = json.loads(r.stdout)
    assert doc["schema"] == 1 and doc["event"] == "error" and doc["exit_code"] == 2
    assert "no --json form" in doc["message"]
    r = cli(*local, "ssh", "smoke-abc123")
    assert r.returncode == 2 and "no run smoke-abc123" in r.stderr and "Traceback" not in r.stderr
    r = cli(*local, "ssh-config", "smoke-abc123", "--remove", env={"HOME": str(tmp_path)})
    assert r.returncode == 2 and "no run smoke-abc123" in r.stderr


def test_unknown_run_gets_close_matches(kept: tuple[list[str], str, Path]) -> None:
    local, run_id, _ = kept
    r = cli(*local, "ssh-config", run_id[:-1])
    assert r.returncode == 2 and f"Did you mean {run_id}" in r.stderr  # the closest first
    r = cli(*local, "ssh", run_id, "--node", "5", "--", "true")
    assert r.returncode == 2 and "has no node 5; its nodes are 0, 1" in r.stderr


def test_ssh_argv_reads_and_writes_nothing_of_the_users_ssh(tmp_path: Path) -> None:
    entry = ssh_cmd.SshEntry(
        1,
        "orch-demo-abc123-1",
        "orch-demo-abc123-1",
        "127.16.0.5",
        2222,
        "azureuser",
        tmp_path / "k%1",
        tmp_path / "kh",
    )
    argv = ssh_cmd.ssh_argv(entry, ("ls", "-l"))
    assert argv[:3] == ["ssh", "-F", "/dev/null"]
    assert ["-i", f"{tmp_path}/k%%1"] == argv[3:5]  # OpenSSH expands %-tokens in paths
    for option in (
        "IdentitiesOnly=yes",
        f'UserKnownHostsFile="{tmp_path}/kh"',
        "GlobalKnownHostsFile=/dev/null",
        "StrictHostKeyChecking=yes",
        "HostKeyAlias=orch-demo-abc123-1",
    ):
        assert argv[argv.index(option) - 1] == "-o"
    assert argv[-6:] == ["-p", "2222", "azureuser@127.16.0.5", "--", "ls", "-l"]


def test_config_blocks_come_out_alone(tmp_path: Path) -> None:
    config = tmp_path / ".ssh" / "config"
    a = ssh_cmd.config_block("a-aaaaaa", [])
    b = ssh_cmd.config_block("b-bbbbbb", [])
    assert sshconfig.remove_entries("a-aaaaaa", config) is False  # no file: nothing to do
    sshconfig.write_entries("a-aaaaaa", a, config)
    assert config.stat().st_mode & 0o777 == 0o600 and config.parent.stat().st_mode & 0o777 == 0o700
    sshconfig.write_entries("b-bbbbbb", b, config)
    assert config.read_text() == b + a
    assert sshconfig.remove_entries("orch-a-aaaaaa", config) is True  # `down orch-<id>` works too
    assert config.read_text() == b
    assert sshconfig.remove_entries("a-aaaaaa", config) is False
    # A block whose end marker the user deleted: the rest of their file is never taken with it.
    mine = "Host work\n    User me\n"
    config.write_text(sshconfig.begin_marker("c-cccccc") + "\nHost orch-c-cccccc\n" + mine)
    assert sshconfig.remove_entries("c-cccccc", config) is False
    assert config.read_text().endswith(mine)


# ----------------------------------------------------------------------------- shell completion


@pytest.mark.parametrize(
    ("shell", "needle"),
    [
        ("bash", "complete -o nosort -F _orchestrator_completion orchestrator"),
        ("zsh", "compdef _orchestrator_completion orchestrator"),
        ("fish", "complete --no-files --command orchestrator"),
    ],
)
def test_shell_completion_scripts(shell: str, needle: str) -> None:
    r = cli(env={"_ORCHESTRATOR_COMPLETE": f"{shell}_source"})
    assert r.returncode == 0, r.stderr
    assert needle in r.stdout


def test_completion_of_commands_and_run_ids(kept: tuple[list[str], str, Path]) -> None:
    _, run_id, state = kept
    env = {"_ORCHESTRATOR_COMPLETE": "bash_complete", "COMP_WORDS": "orchestrator gp", "COMP_CWORD": "1"}
    assert cli(env=env).stdout.split() == ["plain,gpus"]
    env["COMP_WORDS"] = f"orchestrator --state-dir {state} ssh-config {run_id[:4]}"
    env["COMP_CWORD"] = "4"
    assert cli(env=env).stdout.split() == [f"plain,{run_id}"]
