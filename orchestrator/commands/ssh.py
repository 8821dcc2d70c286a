"""`orchestrator ssh` and `orchestrator ssh-config`: a provisioned run's VMs with OpenSSH.

Both use the run's own key and the host key pinned at provision time (nodes.json), never the user's
known_hosts: the pinned keys are written to `<run folder>/known_hosts` under each node's alias
(`HostKeyAlias orch-<run>-<rank>`), and OpenSSH is told to check against that file only, strictly.

`ssh RUN [--node N] [-- CMD]` replaces this process with `ssh` (an interactive session, or CMD).
`ssh-config RUN` prints `Host orch-<run>` (node N: `orch-<run>-N`) entries; `--write` puts them into
~/.ssh/config between markers, `--remove` (and `down RUN`) takes them out again, so plain
`ssh orch-<run>`, scp, rsync and editors' remote extensions reach the VMs.
"""

from __future__ import annotations

import json
import os
import sys
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any

import click

from orchestrator.sshconfig import begin_marker, end_marker, remove_entries, user_ssh_config, write_entries

if TYPE_CHECKING:
    from orchestrator.cli import Ctx
    from orchestrator.runfiles import NodeRecord, RunFiles
    from orchestrator.state import RunRecord
    from orchestrator.targets import Target


@dataclass(frozen=True)
class SshEntry:
    """How to reach one node with OpenSSH."""

    rank: int
    alias: str  # what `ssh <alias>` takes once the entry is in ~/.ssh/config
    host_key_alias: str  # the name the pinned key is filed under in the run's known_hosts
    host: str
    port: int
    user: str
    key: Path
    known_hosts: Path


def alias(run_id: str, rank: int) -> str:
    return f"orch-{run_id}" if rank == 0 else f"orch-{run_id}-{rank}"


def _pct(path: Path | str) -> str:
    """OpenSSH expands %-tokens in IdentityFile and UserKnownHostsFile: a literal % is %%."""
    return str(path).replace("%", "%%")


def _run_id(run: str) -> str:
    return run.removeprefix("orch-")


# --------------------------------------------------------------------------------- the run's nodes


def _client_key(record: RunRecord, files: RunFiles) -> Path:
    from orchestrator.errors import UserInputError

    if files.client_key.exists():
        return files.client_key
    try:  # the job names its own key (ssh.private_key)
        from orchestrator.spec import load_spec

        own = load_spec(record.source).ssh.private_key
    except Exception:
        own = None
    if own and Path(own).expanduser().exists():
        return Path(own).expanduser().resolve()
    raise UserInputError(
        f"run {record.run_id} has no login key in {files.root} and its job file names none that exists; "
        "provision a new run."
    )


def write_known_hosts(files: RunFiles, run_id: str, nodes: list[NodeRecord]) -> Path:
    """The run's pinned host keys as an OpenSSH known_hosts file, one line per node's alias."""
    path = files.known_hosts
    text = "".join(f"orch-{run_id}-{n.rank} {n.host_key.strip()}\n" for n in sorted(nodes, key=lambda n: n.rank))
    tmp = path.with_name(path.name + ".tmp")
    tmp.write_text(text)
    os.chmod(tmp, 0o600)
    tmp.replace(path)
    return path


def _endpoints(where: Target, nodes: list[NodeRecord]) -> list[tuple[str, int]]:
    if where.emulated:
        # The local VMs serve SSH between commands; a session (re)starts any whose process is gone.
        with where.session():
            return [where.endpoint(n) for n in nodes]
    return [where.endpoint(n) for n in nodes]


def entries(obj: Ctx, run: str, node: int | None = None) -> list[SshEntry]:
    """Every node of a provisioned run (or node `node`), reachable with the run's key and pinned host key."""
    from orchestrator.errors import UserInputError
    from orchestrator.lifecycle.kept import record_of, running_record
    from orchestrator.runfiles import RunFiles
    from orchestrator.targets import target_for

    run_id = _run_id(run)
    target = obj.target_obj()
    record = record_of(run_id, target)
    files = RunFiles(target.state, run_id)
    nodes = files.read_nodes()
    if record.torn_down:
        raise UserInputError(f"run {run_id} has been torn down: there is nothing to log in to.")
    if nodes:
        record = running_record(run_id, target)  # a stopped run's VMs are off: say so, do not wait
    if not nodes:
        raise UserInputError(
            f"run {run_id} has no provisioned nodes; `orchestrator provision JOB` (or `run --keep`) makes one "
            "you can log in to."
        )
    chosen = [n for n in nodes if node is None or n.rank == node]
    if not chosen:
        raise UserInputError(f"run {run_id} has no node {node}; its nodes are {', '.join(str(n.rank) for n in nodes)}.")
    key = _client_key(record, files)
    known = write_known_hosts(files, run_id, nodes)
    where = target_for(record, target)
    return [
        SshEntry(n.rank, alias(run_id, n.rank), f"orch-{run_id}-{n.rank}", host, port, n.user, key, known)
        for n, (host, port) in zip(chosen, _endpoints(where, chosen), strict=True)
    ]


# --------------------------------------------------------------------------------- ssh


def ssh_argv(entry: SshEntry, command: tuple[str, ...] = ()) -> list[str]:
    """OpenSSH with the run's key and its pinned host key only: nothing of ~/.ssh is read or written."""
    argv = [
        "ssh",
        "-F",
        "/dev/null",
        "-i",
        _pct(entry.key),
        "-o",
        "IdentitiesOnly=yes",
        "-o",
        f'UserKnownHostsFile="{_pct(entry.known_hosts)}"',
        "-o",
        "GlobalKnownHostsFile=/dev/null",
        "-o",
        "StrictHostKeyChecking=yes",
        "-o",
        f"HostKeyAlias={entry.host_key_alias}",
        "-p",
        str(entry.port),
        f"{entry.user}@{entry.host}",
    ]
    if command:
        argv += ["--", *command]
    return argv


def _complete_runs(ctx: click.Context, param: click.Parameter, incomplete: str) -> list[str]:
    """Shell completion of RUN: the run ids the store knows."""
    try:
        from orchestrator.paths import state_dir
        from orchestrator.state import open_store

        state = ctx.find_root().params.get("state_dir") or os.environ.get("ORCH_STATE_DIR")
        return [r for r in open_store(state_dir(state)).run_ids() if r.startswith(incomplete)]
    except Exception:
        return []


@click.command(name="ssh", context_settings={"ignore_unknown_options": True})
@click.argument("run_id", metavar="RUN", shell_complete=_complete_runs)
@click.argument("command", nargs=-1, type=click.UNPROCESSED)
@click.option("--node", type=click.IntRange(0), default=0, show_default=True, help="Which node (rank).")
@click.pass_obj
def ssh(obj: Ctx, run_id: str, command: tuple[str, ...], node: int) -> None:
    """Log in to a provisioned run's VM with its key and pinned host key: orchestrator ssh RUN [-- CMD]

    Runs OpenSSH's ssh; your known_hosts and ~/.ssh/config are neither read nor changed."""
    import shutil

    from orchestrator.errors import UserInputError

    if obj.as_json:
        raise UserInputError(
            "`orchestrator ssh` is interactive and has no --json form; `orchestrator --json exec RUN -- CMD` "
            "runs a command and answers in JSON."
        )
    if shutil.which("ssh") is None:
        raise UserInputError(
            "OpenSSH's ssh client is not installed (on Debian or Ubuntu: apt-get install openssh-client); "
            "`orchestrator exec RUN -- CMD` runs a command without it."
        )
    (entry,) = entries(obj, run_id, node)
    argv = ssh_argv(entry, command)
    sys.stdout.flush()
    sys.stderr.flush()
    os.execvp(argv[0], argv)


# --------------------------------------------------------------------------------- ssh-config


def config_block(run_id: str, found: list[SshEntry]) -> str:
    """The ~/.ssh/config entries for a run, between its markers. It ends with `Host *` so that it can
    go first in the file (OpenSSH keeps the first value it finds for an option, so entries placed
    after a user's `Host *` would lose to it) while what followed keeps applying to every host."""
    lines = [
        begin_marker(run_id),
        f"# Added by `orchestrator ssh-config {run_id} --write`; `orchestrator down {run_id}` removes it.",
    ]
    for e in found:
        names = f"{e.alias} orch-{run_id}-0" if e.rank == 0 else e.alias
        lines += [
            f"Host {names}",
            f"    HostName {e.host}",
            f"    Port {e.port}",
            f"    User {e.user}",
            f'    IdentityFile "{_pct(e.key)}"',
            "    IdentitiesOnly yes",
            f'    UserKnownHostsFile "{_pct(e.known_hosts)}"',
            "    GlobalKnownHostsFile /dev/null",
            "    StrictHostKeyChecking yes",
            f"    HostKeyAlias {e.host_key_alias}",
        ]
    lines += ["Host *", end_marker(run_id)]
    return "\n".join(lines) + "\n"


@click.command(name="ssh-config")
@click.argument("run_id", metavar="RUN", shell_complete=_complete_runs)
@click.option("--node", type=click.IntRange(0), help="Only this node (rank); default: every node.")
@click.option("--write", is_flag=True, help="Add the entries to ~/.ssh/config (first in the file, between markers).")
@click.option("--remove", is_flag=True, help="Remove the run's entries from ~/.ssh/config.")
@click.pass_obj
def ssh_config(obj: Ctx, run_id: str, node: int | None, write: bool, remove: bool) -> None:
    """Print `Host orch-RUN` entries for OpenSSH (node N: orch-RUN-N); --write adds them to ~/.ssh/config.

    Then `ssh orch-RUN`, scp, rsync and editors' remote extensions reach the VM with the run's key and
    its pinned host key."""
    from orchestrator.errors import UserInputError

    run_id = _run_id(run_id)
    path = user_ssh_config()
    if write and remove:
        raise UserInputError("ssh-config takes --write or --remove, not both.")
    if remove:
        removed = remove_entries(run_id, path)
        if not removed:
            from orchestrator.lifecycle.kept import record_of

            record_of(run_id, obj.target_obj())  # an unknown id is bad input, with close matches
        _say(
            obj,
            {"schema": 1, "event": "ssh-config", "run": run_id, "removed": removed, "path": str(path)},
            f"Removed {run_id}'s entries from {path}." if removed else f"{path} has no entries for {run_id}.",
        )
        return
    found = entries(obj, run_id, node)
    block = config_block(run_id, found)
    if write:
        write_entries(run_id, block, path)
    payload: dict[str, Any] = {
        "schema": 1,
        "event": "ssh-config",
        "run": run_id,
        "written": str(path) if write else None,
        "hosts": [
            {
                "alias": e.alias,
                "node": e.rank,
                "host": e.host,
                "port": e.port,
                "user": e.user,
                "identity_file": str(e.key),
                "known_hosts": str(e.known_hosts),
                "host_key_alias": e.host_key_alias,
            }
            for e in found
        ],
        "config": block,
    }
    if write:
        names = ", ".join(e.alias for e in found)
        text = f"Added {names} to {path}: `ssh {found[0].alias}`. `orchestrator down {run_id}` removes them."
    else:
        text = block.rstrip("\n")
    _say(obj, payload, text)


def _say(obj: Ctx, payload: dict[str, Any], text: str) -> None:
    click.echo(json.dumps(payload) if obj.as_json else text)
