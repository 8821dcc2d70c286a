"""Spot eviction recovery, the whole cycle on the local target: a run evicted twice ends exactly like an
uninterrupted one (same final metrics, same model checksum); one evicted beyond recovery.max_restarts
ends restarts-exhausted (exit 3) with nothing left behind."""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
from pathlib import Path
from typing import Any

import pytest

from tests.conftest import emulator_store
from tests.test_cli import REPO, cli
from tests.test_fault_matrix import no_processes_under

pytestmark = pytest.mark.slow

# Emulated seconds at ORCH_EMULATOR_SPEED=10: each spot VM is evicted 4 s after it runs, with the
# Preempt notice 3 s ahead; checkpoints come home every second.
EVICT_TWICE = json.dumps([{"code": "Evicted", "phase": "evict", "after": 40, "count": 2}])
FAST = {"ORCH_EMULATOR_SPEED": "10", "ORCH_CHECKPOINT_SYNC_S": "1"}
TRAIN_ARGS = ["--dataset", "digits", "--epochs", "1", "--checkpoint-every", "4"]
COUNT_TO = (
    "import os, pathlib, time\n"
    "ckpt = pathlib.Path(os.environ['ORCH_CHECKPOINT_DIR'])\n"
    "step = max([int(p.stem) for p in ckpt.glob('*.step')] or [0])\n"
    "print(f'resumed at {step}' if step else 'from the start', flush=True)\n"
    "while step < {steps}:\n"
    "    step += 1\n"
    "    (ckpt / f'{step}.step').write_text('')\n"
    "    time.sleep(0.05)\n"
    "(pathlib.Path(os.environ['ORCH_OUTPUT_DIR']) / 'done.txt').write_text(str(step))\n"
)


def _run(state: Path, job: Path, faults: str) -> tuple[subprocess.CompletedProcess[str], list[dict[str, Any]]]:
    """`orchestrator --json run JOB` on the local target under these faults: the process and its events."""
    env = {**FAST, "ORCH_EMULATOR_FAULTS": faults}
    r = cli("--target", "local", "--state-dir", str(state), "--json", "run", str(job), env=env)
    return r, _events(r.stdout)


def _events(stdout: str) -> list[dict[str, Any]]:
    return [json.loads(line) for line in stdout.splitlines() if line.startswith("{")]


def _nothing_left(state: Path) -> None:
    store = emulator_store(state)
    assert store["groups"] == {} and store["resources"] == {}, store
    assert no_processes_under(state) == []
    assert not [p for p in (state / "vms").glob("*") if p.is_dir()], "a VM folder outlived its VM"


def test_a_run_evicted_twice_ends_like_an_uninterrupted_one(tmp_path: Path) -> None:
    pytest.importorskip("torch")
    jobs = tmp_path / "jobs"  # the example job and the shared trainkit, as jobs/ lays them out
    for name in ("common/trainkit.py", "mnist-cnn/train.py", "mnist-cnn/requirements.txt"):
        (jobs / name).parent.mkdir(parents=True, exist_ok=True)
        shutil.copy(REPO / "jobs" / name, jobs / name)
    job = jobs / "spot" / "job.yaml"
    job.parent.mkdir()
    job.write_text(
        "name: spot-mnist\n"
        "workdir: ..\n"
        "resources: {vm_size: Standard_NC4as_T4_v3, region: eastus, spot: true}\n"
        "python: {requirements: mnist-cnn/requirements.txt}\n"
        f"run: python3 mnist-cnn/train.py {' '.join(TRAIN_ARGS)}\n"
        "max_duration: 20m\n"
    )
    state = tmp_path / "state"
    r, events = _run(state, job, EVICT_TWICE)
    result = events[-1]
    assert r.returncode == 0, r.stdout[-4000:] + r.stderr[-2000:]
    assert (result["verdict"], result["restarts"]) == ("succeeded", 2), result
    said = [e["message"] for e in events if e["event"] == "progress"]
    restarts = [m for m in said if " evicted at " in m and "restarting from" in m]
    assert len(restarts) == 2 and restarts[1].endswith("(restart 2 of 3)"), said
    log = (state / "runs" / result["run_id"] / "logs" / "run-node0.log").read_text()
    assert log.count("orchestrator: node 0 (") == 2, "the log reads as one run, evictions included"
    assert [a["code"] for a in result["attempts"]] == [None, None, None], "the first VM and two replacements"
    recorded = json.loads(
        cli("--target", "local", "--state-dir", str(state), "--json", "status", result["run_id"]).stdout
    )
    assert recorded["restarts"] == 2

    # The same job, uninterrupted, on this machine's CPU with the same seed.
    straight = tmp_path / "straight"
    run_env = {k: v for k, v in os.environ.items() if not k.startswith("ORCH_")}
    run_env |= {"ORCH_OUTPUT_DIR": str(straight / "out"), "ORCH_CHECKPOINT_DIR": str(straight / "ckpt")}
    done = subprocess.run(
        [sys.executable, "mnist-cnn/train.py", *TRAIN_ARGS],
        cwd=REPO / "jobs",
        env=run_env,
        capture_output=True,
        text=True,
        timeout=300,
        check=False,
    )
    assert done.returncode == 0, done.stderr[-2000:]
    home = Path(result["artifacts"])
    evicted_metrics = json.loads((home / "metrics.json").read_text())
    straight_metrics = json.loads((straight / "out" / "metrics.json").read_text())
    del evicted_metrics["samples_per_second"], straight_metrics["samples_per_second"]
    assert evicted_metrics == straight_metrics
    digest = json.loads((home / "rank-0.json").read_text())["weights_sha256"]
    assert digest == json.loads((straight / "out" / "rank-0.json").read_text())["weights_sha256"]
    _nothing_left(state)


def test_evictions_beyond_max_restarts_end_the_run_restarts_exhausted(tmp_path: Path) -> None:
    (tmp_path / "count.py").write_text(COUNT_TO.replace("{steps}", "600"))
    job = tmp_path / "job.yaml"
    job.write_text(
        "name: spot-count\n"
        "resources: {vm_size: Standard_NC4as_T4_v3, region: eastus, spot: true}\n"
        "recovery: {max_restarts: 1}\n"
        "run: python3 count.py\n"
        "max_duration: 10m\n"
    )
    state = tmp_path / "state"
    r, events = _run(state, job, EVICT_TWICE)
    result = events[-1]
    assert r.returncode == 3, r.stdout[-4000:] + r.stderr[-2000:]
    assert (result["verdict"], result["exit_code"], result["restarts"]) == ("restarts-exhausted", 3, 2), result
    assert "evicted 2 times; recovery.max_restarts allows 1" in result["message"], result["message"]
    assert result["torn_down"] is True
    copied = state / "runs" / result["run_id"] / "checkpoints" / "0"
    assert any(copied.glob("*.step")), "the checkpoints that reached home are kept"
    said = [e["message"] for e in events if e["event"] == "progress"]
    (restarted,) = [m for m in said if "restarting from checkpoint step" in m]
    step = int(restarted.split("restarting from checkpoint step ")[1].split()[0])
    lines = [e["line"] for e in events if e["event"] == "log"]
    assert step > 0 and f"resumed at {step}" in lines, (restarted, lines)  # restored, then resumed there
    _nothing_left(state)


def test_a_replacement_azure_has_no_spot_room_for_falls_back_to_on_demand(tmp_path: Path) -> None:
    """`spot: prefer`: the spot VM is evicted and Azure has no spot room for its replacement
    (AllocationFailed, late); the node comes back on-demand in the same place and the job finishes
    there, the run pinned and priced as on-demand from then on."""
    (tmp_path / "count.py").write_text(COUNT_TO.replace("{steps}", "160"))
    job = tmp_path / "job.yaml"
    job.write_text(
        "name: spot-fallback\n"
        "resources: {vm_size: Standard_NC4as_T4_v3, region: eastus, spot: prefer}\n"
        "run: python3 count.py\n"
        "max_duration: 10m\n"
    )
    state = tmp_path / "state"
    faults = [
        {"code": "Evicted", "phase": "evict", "after": 40, "count": 1},
        # the first VM PUT (the run's own spot VM) goes through; the next (its spot replacement) fails late
        {
            "code": "AllocationFailed",
            "status": 200,
            "method": "PUT",
            "phase": "lro",
            "skip": 1,
            "count": 1,
            "resource_type": "Microsoft.Compute/virtualMachines",
        },
    ]
    r, events = _run(state, job, json.dumps(faults))
    result = events[-1]
    assert r.returncode == 0, r.stdout[-4000:] + r.stderr[-2000:]
    assert (result["verdict"], result["restarts"]) == ("succeeded", 1), result
    tried = [(a["spot"], a["code"]) for a in result["attempts"]]
    assert tried == [(True, None), (True, "AllocationFailed"), (False, None)], result["attempts"]
    said = [e["message"] for e in events if e["event"] == "progress"]
    assert any("the run now holds Standard_NC4as_T4_v3 in eastus" in m and "(spot)" not in m for m in said), said
    assert (Path(result["artifacts"]) / "done.txt").read_text() == "160"
    lines = [e["line"] for e in events if e["event"] == "log"]
    assert any(line.startswith("resumed at ") for line in lines), lines
    (cost,) = json.loads(
        cli("--target", "local", "--state-dir", str(state), "--json", "cost", result["run_id"]).stdout
    )["runs"]
    assert cost["spot"] is False, "priced as the on-demand VM it finished on"
    _nothing_left(state)


def test_a_vm_evicted_before_its_job_started_is_replaced_and_set_up_again(tmp_path: Path) -> None:
    """Azure evicts when it needs the room, not when the job is ready: a spot VM gone while the run
    is still setting up is replaced and set up again (one restart), never a failed run."""
    (tmp_path / "count.py").write_text(COUNT_TO.replace("{steps}", "20"))
    job = tmp_path / "job.yaml"
    job.write_text(
        "name: spot-early\n"
        "resources: {vm_size: Standard_NC4as_T4_v3, region: eastus, spot: true}\n"
        "setup: 'echo setting up; sleep 4'\n"
        "run: python3 count.py\n"
        "max_duration: 10m\n"
    )
    state = tmp_path / "state"
    faults = [{"code": "Evicted", "phase": "evict", "after": 10, "count": 1}]  # 1 s after it runs: in setup
    r, events = _run(state, job, json.dumps(faults))
    result = events[-1]
    assert r.returncode == 0, r.stdout[-4000:] + r.stderr[-2000:]
    assert (result["verdict"], result["restarts"]) == ("succeeded", 1), result
    assert [a["code"] for a in result["attempts"]] == [None, None], "the first VM and its replacement"
    said = [e["message"] for e in events if e["event"] == "progress"]
    assert any("evicted at" in m and "restarting from the beginning" in m for m in said), said
    assert (Path(result["artifacts"]) / "done.txt").read_text() == "20"
    _nothing_left(state)
