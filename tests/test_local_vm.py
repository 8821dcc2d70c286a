"""The local target's VMs behave like VMs: own Python, own loopback addresses, multi-node for real,
no traceback ever reaching the user."""

from __future__ import annotations

import ipaddress
import json
import shutil
import subprocess
import sys
import zipfile
from pathlib import Path

import pytest

from tests.test_cli import REPO, cli

NO_TRACEBACK = ("Traceback", "was never retrieved")


def _wheel(folder: Path) -> Path:
    """A real, installable wheel built here (tests never download)."""
    path = folder / "orchtestpkg-1.0-py3-none-any.whl"
    files = {
        "orchtestpkg/__init__.py": "VALUE = 42\n",
        "orchtestpkg-1.0.dist-info/METADATA": "Metadata-Version: 2.1\nName: orchtestpkg\nVersion: 1.0\n",
        "orchtestpkg-1.0.dist-info/WHEEL": (
            "Wheel-Version: 1.0\nGenerator: test\nRoot-Is-Purelib: true\nTag: py3-none-any\n"
        ),
    }
    record = "".join(f"{name},,\n" for name in files) + "orchtestpkg-1.0.dist-info/RECORD,,\n"
    with zipfile.ZipFile(path, "w") as z:
        for name, text in files.items():
            z.writestr(name, text)
        z.writestr("orchtestpkg-1.0.dist-info/RECORD", record)
    return path


def _freeze() -> bytes:
    return subprocess.run([sys.executable, "-m", "pip", "freeze"], capture_output=True, check=True).stdout


def test_a_job_installs_into_its_vm_never_into_the_tools_environment(tmp_path: Path) -> None:
    job = tmp_path / "job"
    job.mkdir()
    _wheel(job)
    (job / "job.yaml").write_text(
        "name: isolated\n"
        "setup: python3 -m pip install -q orchtestpkg-1.0-py3-none-any.whl\n"
        "run: python3 -c \"import orchtestpkg, sys, os; print(orchtestpkg.VALUE, sys.prefix, os.environ['HOME'], "
        "os.environ['TMPDIR'])\"\n"
    )
    before = _freeze()
    state = tmp_path / "state"
    r = cli("--target", "local", "--state-dir", str(state), "run", str(job / "job.yaml"))
    assert r.returncode == 0, r.stderr
    prefix, home, tmp = next(line for line in r.stdout.splitlines() if line.startswith("42 ")).split()[1:]
    vms = state / "vms"
    assert Path(prefix).parent.parent == vms and Path(prefix) != Path(sys.prefix)
    assert Path(home).is_relative_to(vms) and Path(tmp).is_relative_to(vms)
    assert _freeze() == before, "the tool's own virtualenv must not change"
    assert not [p for p in vms.iterdir() if p.is_dir()], "the VM's environment goes away with the VM"
    assert not any(m in r.stderr for m in NO_TRACEBACK)


def test_nodes_have_their_own_loopback_addresses_before_anything_connects(tmp_path: Path) -> None:
    state = ["--target", "local", "--state-dir", str(tmp_path / "state")]
    first = cli(*state, "--json", "provision", str(REPO / "jobs" / "smoke" / "job.yaml"), "--nodes", "2")
    second = cli(*state, "--json", "provision", str(REPO / "jobs" / "smoke" / "job.yaml"), "--nodes", "2")
    assert first.returncode == 0 and second.returncode == 0, first.stderr + second.stderr
    held = json.loads(cli(*state, "--json", "emulator", "status").stdout)
    addresses = [v["address"] for v in held["vms"]]
    assert len(addresses) == 4 and len(set(addresses)) == 4, "two runs never share an address"
    assert all(ipaddress.ip_address(a).is_loopback for a in addresses)
    run_id = json.loads(first.stdout.splitlines()[-1])["run_id"]
    r = cli(*state, "exec", run_id, "--", "echo $ORCH_MASTER_ADDR $ORCH_MASTER_PORT $GLOO_SOCKET_IFNAME")
    assert r.returncode == 0, r.stderr
    masters = {line.split("] ", 1)[1] for line in r.stdout.splitlines()}
    assert len(masters) == 1, "every node names the same master"
    addr, port, ifname = masters.pop().split()
    assert ipaddress.ip_address(addr).is_loopback and addr in addresses and ifname == "lo" and int(port) > 0
    for line in (first.stdout + second.stdout).splitlines():
        event = json.loads(line)
        if event.get("event") == "provisioned":
            assert cli(*state, "down", event["run_id"]).returncode == 0
    assert json.loads(cli(*state, "--json", "emulator", "status").stdout)["vms"] == []


def test_silence_longer_than_the_keepalive_is_not_an_error(tmp_path: Path) -> None:
    job = tmp_path / "job"
    job.mkdir()
    (job / "job.yaml").write_text('name: quiet\nrun: sleep 4 && echo "done waiting"\n')
    r = cli(
        "--target", "local", "--state-dir", str(tmp_path / "state"), "run", str(job / "job.yaml"),
        env={"ORCH_SSH_KEEPALIVE": "1"},
    )  # fmt: skip
    assert r.returncode == 0, r.stderr
    assert "done waiting" in r.stdout
    assert not any(m in r.stderr for m in NO_TRACEBACK), r.stderr


@pytest.mark.slow
@pytest.mark.parametrize(("job", "epochs"), [("mnist-cnn", 3), ("seq-lstm", 10)])
def test_two_node_ddp_training_on_the_local_target(tmp_path: Path, job: str, epochs: int) -> None:
    jobs = tmp_path / "jobs"
    for part in ("common", job):
        shutil.copytree(REPO / "jobs" / part, jobs / part)
    (jobs / "ddp").mkdir()
    (jobs / "ddp" / "job.yaml").write_text(
        f"name: ddp\nworkdir: ..\nnodes: 2\n"
        f"setup: uv pip install -q -r {job}/requirements.txt\n"
        "run: >-\n"
        "  torchrun --nnodes $ORCH_NUM_NODES --node-rank $ORCH_NODE_RANK --nproc-per-node 1\n"
        "  --master-addr $ORCH_MASTER_ADDR --master-port $ORCH_MASTER_PORT\n"
        f"  {job}/train.py --dataset digits --epochs {epochs}\n"
        "expect: {test_accuracy: '>= 0.85'}\n"
    )
    state = tmp_path / "state"
    r = cli("--target", "local", "--state-dir", str(state), "--json", "run", str(jobs / "ddp" / "job.yaml"))
    result = json.loads(r.stdout.splitlines()[-1])
    assert r.returncode == 0 and result["verdict"] == "succeeded", r.stdout[-3000:] + r.stderr[-3000:]
    assert result["metrics"]["world_size"] == 2 and all(g["passed"] for g in result["gates"])
    art = Path(result["artifacts"])
    ranks = [json.loads((art / "rank-0.json").read_text()), json.loads((art / "nodes/1/rank-1.json").read_text())]
    assert [(x["rank"], x["world_size"]) for x in ranks] == [(0, 2), (1, 2)]
    assert ranks[0]["weights_sha256"] == ranks[1]["weights_sha256"], "DDP keeps every rank's weights identical"
    assert not any(m in r.stderr for m in NO_TRACEBACK)


def _job(tmp_path: Path, text: str) -> Path:
    job = tmp_path / "job"
    job.mkdir(parents=True, exist_ok=True)
    (job / "job.yaml").write_text(text)
    return job / "job.yaml"


TICKING = (
    "name: ticking\n"
    "setup: echo setting up && sleep 30\n"
    "run: for i in $(seq 600); do echo tick $i; echo $i > $ORCH_OUTPUT_DIR/progress.txt; sleep 0.1; done\n"
)


@pytest.mark.slow
@pytest.mark.parametrize(
    ("phase", "marker", "env"),
    [
        (
            "provision",
            '"resource.creating", "type": "Microsoft.Compute/virtualMachines"',
            {"ORCH_EMULATOR_PROFILE": "azure-like", "ORCH_EMULATOR_SPEED": "10"},
        ),
        ("setup", "setting up", {}),
        ("train", "tick 5", {}),
    ],
)
def test_ctrl_c_in_each_phase_ends_interrupted_with_nothing_left_and_no_traceback(
    tmp_path: Path, phase: str, marker: str, env: dict[str, str]
) -> None:
    import signal

    from tests.test_cli import start, store_of, wait_for

    text = TICKING.replace("sleep 30", "sleep 0.1") if phase == "train" else TICKING
    state = tmp_path / "state"
    proc = start(["--target", "local", "--state-dir", str(state), "--json", "run", str(_job(tmp_path, text))], env)
    seen: list[str] = []
    wait_for(proc, marker, seen)
    proc.send_signal(signal.SIGINT)
    out, _ = proc.communicate(timeout=120)
    text_out = "".join(seen) + out
    assert proc.returncode == 130, text_out
    result = json.loads(text_out.strip().splitlines()[-1])
    assert result["event"] == "result" and result["verdict"] == "interrupted" and result["torn_down"]
    assert store_of(state)["resources"] == {} and store_of(state)["groups"] == {}
    assert not any(m in text_out for m in NO_TRACEBACK), text_out
    if phase == "train":  # the first Ctrl-C brought home what the job had written
        assert int((Path(result["artifacts"]) / "progress.txt").read_text()) >= 5


@pytest.mark.slow
def test_a_budget_stop_and_a_dropped_connection_read_as_verdicts_not_tracebacks(tmp_path: Path) -> None:
    import os
    import signal
    import threading
    import time

    # Standard_D2s_v5 at list price: a $0.0003 budget lasts a few seconds.
    state = tmp_path / "state"
    job = _job(
        tmp_path,
        "name: budget\nresources: {vm_size: Standard_D2s_v5}\nbudget_usd: 0.0003\n"
        "run: for i in $(seq 300); do echo tick $i; sleep 0.1; done\n",
    )

    def drop_once() -> None:  # a network failure mid-training: the log resumes, nothing is lost
        for _ in range(200):
            hosts = list((state / "vms").glob("*/host.json"))
            if hosts and any(p.name.startswith("run-") for p in (state / "runs").rglob("*.log")):
                os.kill(json.loads(hosts[0].read_text())["pid"], signal.SIGUSR1)
                return
            time.sleep(0.05)

    threading.Thread(target=drop_once, daemon=True).start()
    r = cli("--target", "local", "--state-dir", str(state), "run", str(job))
    assert r.returncode == 1, r.stderr
    assert "over-budget" in r.stderr and "budget_usd" in r.stderr
    ticks = [int(line.split()[1]) for line in r.stdout.splitlines() if line.startswith("tick ")]
    assert ticks == list(range(1, len(ticks) + 1)), "no line lost or repeated across the dropped connection"
    assert not any(m in r.stderr for m in NO_TRACEBACK), r.stderr
    listed = json.loads(cli("--state-dir", str(state), "--json", "ls").stdout)["runs"][0]
    assert listed["verdict"] == "over-budget" and listed["verdict_exit_code"] == 1 and listed["torn_down"]


def test_status_tells_the_truth_after_a_failed_teardown(tmp_path: Path) -> None:
    faults = [
        {
            "code": "AllocationFailed", "status": 200, "method": "PUT",
            "resource_type": "Microsoft.Compute/virtualMachines", "phase": "lro",
        },
        {
            "code": "TooManyRequests", "status": 429, "method": "DELETE",
            "resource_type": "Microsoft.Resources/resourceGroups", "count": 50, "retry_after": 0.01,
        },
    ]  # fmt: skip
    state = ["--target", "local", "--state-dir", str(tmp_path / "state")]
    job = _job(tmp_path, "name: doomed\nrun: echo never\n")
    r = cli(*state, "run", str(job), env={"ORCH_EMULATOR_FAULTS": json.dumps(faults)})
    assert r.returncode == 3, r.stderr
    assert "AllocationFailed" in r.stderr and "orchestrator down" in r.stderr
    assert "while creating deleting" not in r.stderr
    status = cli(*state, "status")
    lines = status.stdout.splitlines()
    assert "no run holds resources" not in status.stdout
    holds = next(i for i, line in enumerate(lines) if "holds resources" in line)
    assert "AllocationFailed" in lines[holds], "the root cause comes first"
    assert lines[holds + 1].strip().startswith("remove them with: orchestrator down doomed-")
    run_id = lines[holds + 1].split()[-1]
    assert cli(*state, "down", run_id).returncode == 0
    assert "Nothing running; no run holds resources." in cli(*state, "status").stdout


@pytest.mark.slow
def test_gc_follows_the_ownership_rule(tmp_path: Path) -> None:
    import signal

    from tests.test_cli import start, store_of, wait_for

    state = tmp_path / "state"
    base = ["--target", "local", "--state-dir", str(state)]
    job = _job(tmp_path, TICKING.replace("sleep 30", "true"))
    alive = start([*base, "run", str(job)])
    seen: list[str] = []
    wait_for(alive, "tick 3", seen)
    spared = cli(*base, "gc", "--all")
    assert spared.returncode == 0 and "Nothing to collect" in spared.stdout, spared.stdout + spared.stderr
    assert len(store_of(state)["groups"]) == 1, "gc --all never touches a run whose watching process is alive"
    killed = start([*base, "run", str(_job(tmp_path / "second", TICKING.replace("sleep 30", "true")))])
    wait_for(killed, "tick 3", [])
    killed.send_signal(signal.SIGKILL)
    killed.wait()
    plain = cli(*base, "gc")
    assert plain.returncode == 0 and plain.stdout.count("Deleted orch-") == 1, plain.stdout + plain.stderr
    assert len(store_of(state)["groups"]) == 1, "the SIGKILLed run went at once; the live one stayed"
    forced = cli(*base, "gc", "--all", "--force")
    assert forced.returncode == 0 and forced.stdout.count("Deleted orch-") == 1, forced.stdout + forced.stderr
    out, _ = alive.communicate(timeout=120)
    assert alive.returncode == 3 and "resource group was deleted while the job was running" in out, out[-2000:]
    assert store_of(state)["groups"] == {}


@pytest.mark.slow
def test_logs_follow_goes_on_after_the_watching_process_died(tmp_path: Path) -> None:
    import signal

    from tests.test_cli import start, wait_for

    state = ["--target", "local", "--state-dir", str(tmp_path / "state")]
    job = _job(tmp_path, "name: orphan\nrun: for i in $(seq 80); do echo tick $i; sleep 0.05; done\n")
    proc = start([*state, "run", str(job)])
    wait_for(proc, "tick 5", [])
    proc.send_signal(signal.SIGKILL)
    proc.wait()
    run_id = json.loads(cli(*state, "--json", "ls").stdout)["runs"][0]["run_id"]
    followed = cli(*state, "logs", run_id, "-f")
    assert followed.returncode == 0, followed.stderr
    ticks = [int(line.split()[1]) for line in followed.stdout.splitlines() if line.startswith("tick ")]
    assert ticks == list(range(1, 81)), "the local part, then the VM's, with no gap and no repeat"
    assert not any(m in followed.stderr for m in NO_TRACEBACK)
    assert cli(*state, "down", run_id).returncode == 0


@pytest.mark.slow
def test_detach_then_attach_from_another_process_finishes_the_run(tmp_path: Path) -> None:
    state = ["--target", "local", "--state-dir", str(tmp_path / "state")]
    job = _job(
        tmp_path,
        "name: detached\nsetup: echo set up\n"
        "run: |\n"
        "  for i in $(seq 30); do echo tick $i; sleep 0.05; done\n"
        "  echo '{\"acc\": 0.9}' > $ORCH_OUTPUT_DIR/metrics.json\n"
        "expect: {acc: '>= 0.5'}\n",
    )
    started = cli(*state, "--json", "run", str(job), "--detach")
    assert started.returncode == 0, started.stderr
    event = json.loads(started.stdout.splitlines()[-1])
    assert event["event"] == "detached"
    run_id = event["run_id"]
    listed = json.loads(cli(*state, "--json", "status").stdout)["runs"]
    assert [(r["run_id"], r["state"]) for r in listed] == [(run_id, "detached")]
    attached = cli(*state, "--json", "attach", run_id)
    assert attached.returncode == 0, attached.stderr
    result = json.loads(attached.stdout.splitlines()[-1])
    assert result["verdict"] == "succeeded" and result["torn_down"] and result["metrics"] == {"acc": 0.9}
    ticks = [json.loads(x)["line"] for x in attached.stdout.splitlines() if '"event": "log"' in x]
    assert [t for t in ticks if t.startswith("tick")] == [f"tick {i}" for i in range(1, 31)]
    assert "Nothing running" in cli(*state, "status").stdout


@pytest.mark.slow
@pytest.mark.parametrize("watched", [True, False])
def test_cancel_from_another_process_collects_then_tears_down(tmp_path: Path, watched: bool) -> None:
    from tests.test_cli import start, store_of, wait_for

    state = ["--target", "local", "--state-dir", str(tmp_path / "state")]
    job = _job(tmp_path, TICKING.replace("sleep 30", "true"))
    home = tmp_path / "home"
    home.mkdir()
    if watched:
        proc = start([*state, "run", str(job)], env={"HOME": str(home)})
        wait_for(proc, "tick 5", [])
    else:
        detached = cli(*state, "--json", "run", str(job), "--detach")
        assert detached.returncode == 0, detached.stderr
    run_id = json.loads(cli(*state, "--json", "ls").stdout)["runs"][0]["run_id"]
    assert cli(*state, "ssh-config", run_id, "--write", env={"HOME": str(home)}).returncode == 0
    assert f"Host orch-{run_id}" in (home / ".ssh" / "config").read_text()
    cancelled = cli(*state, "cancel", run_id, env={"HOME": str(home)})
    assert cancelled.returncode == 0, cancelled.stderr
    assert "error:" not in cancelled.stderr, "the user asked for it: not an error"
    # The process that tore the run down (the watcher, or this cancel) took its ssh entry out.
    if watched:
        proc.communicate(timeout=60)
    assert (home / ".ssh" / "config").read_text() == ""
    if watched:
        assert proc.returncode == 130
    record = json.loads(cli(*state, "--json", "status", run_id).stdout)
    assert record["verdict"] == "cancelled" and record["torn_down"] and record["verdict_exit_code"] == 130
    assert store_of(tmp_path / "state")["groups"] == {}
    assert int((Path(record["artifacts"]) / "progress.txt").read_text()) >= 1, "what the job wrote came home"


def test_collect_on_a_run_that_never_ran_a_job_brings_home_nothing_and_says_so(tmp_path: Path) -> None:
    """`provision`, then `collect`: nothing was synced, so the run's folder does not exist on the VM
    yet; that is no outputs, not a failure."""
    state = ["--target", "local", "--state-dir", str(tmp_path / "state")]
    r = cli(*state, "--json", "provision", str(REPO / "jobs" / "smoke" / "job.yaml"))
    assert r.returncode == 0, r.stderr
    run_id = json.loads(r.stdout.splitlines()[-1])["run_id"]
    try:
        collected = cli(*state, "collect", run_id)
        assert collected.returncode == 0, collected.stderr
        assert "collected 0 files" in collected.stdout + collected.stderr
    finally:
        assert cli(*state, "down", run_id).returncode == 0
