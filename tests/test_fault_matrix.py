"""The fault matrix (issue 13): the whole cycle on the local target under each fault a user meets, one
row each. Every row runs `orchestrator --json run` as a separate process, does to it what the row says
(an emulator fault, a signal at a given moment, a cut network), and then holds it to what a user
relies on: the verdict and exit code, the message, nothing left in the emulated Azure or in `status`,
no VM host or job process left running, and every output at home wherever the job finished.

Rows share their job folders (made once) and use the instant profile unless a row needs time to pass
(a VM still being created, a VM still booting): then azure-like, sped up as far as the window allows.
"""

from __future__ import annotations

import hashlib
import json
import os
import signal
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import pytest

from orchestrator.targets.localvm.manager import processes_in
from tests.conftest import emulator_store
from tests.test_cli import REPO, cli

pytestmark = pytest.mark.slow

VM = "Microsoft.Compute/virtualMachines"
NO_TRACEBACK = ("Traceback", "was never retrieved", "internal error")
PAYLOAD_MB = 24  # big enough that sync and collect last a moment, small enough to cost little

# The jobs. Each writes what it has done under $ORCH_OUTPUT_DIR, so a finished run's artifacts can be
# checked whole.
QUICK = (
    "name: quick\n"
    "run: |\n"
    "  echo '{\"ok\": 1}' > $ORCH_OUTPUT_DIR/metrics.json\n"
    "  echo done > $ORCH_OUTPUT_DIR/out.txt\n"
    "expect: {ok: '>= 1'}\n"
)
TICKING = (
    "name: ticking\n"
    "setup: echo setting up && sleep 60\n"
    "run: for i in $(seq 40); do echo tick $i; echo $i > $ORCH_OUTPUT_DIR/progress.txt; sleep 0.05; done\n"
)
TRAINING = TICKING.replace("sleep 60", "true")
# the payload travels up with the code; the job proves it arrived whole by its checksum
BULKY = "name: bulky\nrun: sha256sum payload.bin > $ORCH_OUTPUT_DIR/sum.txt\n"
# the job's output is big enough that bringing it home takes a moment
WRITER = f"name: writer\nrun: head -c {PAYLOAD_MB}M /dev/urandom > $ORCH_OUTPUT_DIR/big.bin && echo written\n"
# resumes from its checkpoint, as a job on spot VMs must
RESUMING = (
    "name: resuming\n"
    "resources: {spot: true}\n"
    "run: |\n"
    "  i=$(cat $ORCH_CHECKPOINT_DIR/step 2>/dev/null || echo 0)\n"
    # 6 s of work: each spot VM is evicted 2 s after it runs, so two evictions land before the end
    "  while [ $i -lt 60 ]; do i=$((i+1)); echo $i > $ORCH_CHECKPOINT_DIR/step; echo tick $i; sleep 0.1; done\n"
    "  echo $i > $ORCH_OUTPUT_DIR/final.txt\n"
)
JOBS = {
    "quick": QUICK,
    "zoned": QUICK + "resources: {region: eastus, zone: any}\n",
    "two-regions": QUICK + "resources: {region: [eastus, westus2], order: listed}\n",
    "ticking": TICKING,
    "training": TRAINING,
    "bulky": BULKY,
    "writer": WRITER,
    "resuming": RESUMING,
}

SLOW = {"ORCH_EMULATOR_PROFILE": "azure-like", "ORCH_EMULATOR_SPEED": "60"}  # a VM create: 2 s
BOOTING = {"ORCH_EMULATOR_PROFILE": "azure-like", "ORCH_EMULATOR_SPEED": "30"}  # boot to SSH: 1.5 s
# The VM's boot (to SSH) counts from when it runs; the host process's own start-up (~0.7 s here, idle)
# eats into it before the first connection: 2.25 s leaves room under load.
LONG_BOOT = {"ORCH_EMULATOR_PROFILE": "azure-like", "ORCH_EMULATOR_SPEED": "20"}


def faults(*items: dict[str, Any]) -> dict[str, str]:
    return {"ORCH_EMULATOR_FAULTS": json.dumps(list(items)), "ORCH_EMULATOR_SEED": "0"}  # one draw, every time


@dataclass(frozen=True)
class Act:
    """What the row does to the run, once `when` holds for a JSON event: "SIGINT", "SIGKILL" (then
    `gc`), or "drop" (cut the VM's SSH connections, as a network failure does)."""

    what: str
    when: Callable[[dict[str, Any]], bool]
    after: str = ""  # a phase that must never start: proof the act landed where the row says
    delay: float = 0.0  # seconds from the event to the act


def phase_started(name: str) -> Callable[[dict[str, Any]], bool]:
    return lambda e: e.get("event") == "phase.started" and e.get("phase") == name


def log_line(text: str) -> Callable[[dict[str, Any]], bool]:
    return lambda e: e.get("event") == "log" and str(e.get("line", "")).endswith(text)


def creating_vm(e: dict[str, Any]) -> bool:
    return e.get("event") == "resource.creating" and e.get("type") == VM


@dataclass(frozen=True)
class Row:
    id: str
    job: str
    verdict: str
    exit_code: int
    says: tuple[str, ...] = ()  # in the result's message, or (SIGKILL) in gc's output
    env: dict[str, str] = field(default_factory=dict)
    flags: tuple[str, ...] = ()
    act: Act | None = None
    # file -> its content, its size, or a check of its content: every file the run brought home
    artifacts: Mapping[str, str | int | Callable[[str], bool]] | None = None
    attempts: tuple[str | None, ...] | None = None  # each attempt's Azure error code (None: it worked)
    output: tuple[str, ...] = ()  # anywhere in what the run printed
    ticks: int = 0  # the job's "tick N" lines: each exactly once, in order
    once: tuple[str, ...] = ()  # lines of the job's output seen exactly once (a resumed job's first)


FINISHED_QUICK = {"out.txt": "done\n", "metrics.json": '{"ok": 1}\n'}

ROWS = [
    Row(
        "429-storm",
        "quick",
        "succeeded",
        0,
        env=faults({"code": "TooManyRequests", "status": 429, "count": None, "probability": 0.3, "retry_after": 0.01}),
        artifacts=FINISHED_QUICK,
        output=("Azure answered 429",),
    ),
    Row(
        "5xx",
        "quick",
        "succeeded",
        0,
        env=faults(
            {"code": "InternalServerError", "status": 500, "method": "PUT", "count": 3, "retry_after": 0.01},
            {"code": "InternalServerError", "status": 503, "method": "GET", "count": 3, "retry_after": 0.01},
        ),
        artifacts=FINISHED_QUICK,
        output=("Azure answered 500", "Azure answered 503"),
    ),
    Row(
        "allocation-failed-late",
        "quick",
        "azure-refused",
        3,
        says=("AllocationFailed", "Everything created for this run has been deleted"),
        env=faults({"code": "AllocationFailed", "status": 200, "method": "PUT", "resource_type": VM, "phase": "lro"}),
        attempts=("AllocationFailed",),
    ),
    Row(
        "zonal-allocation-failed",
        "zoned",
        "succeeded",
        0,
        env={"ORCH_EMULATOR_CAPACITY": json.dumps([{"size": "Standard_NC4as_T4_v3", "region": "eastus", "zone": "1"}])},
        artifacts=FINISHED_QUICK,
        attempts=("ZonalAllocationFailed", None),
    ),
    Row(
        "sku-not-available",
        "two-regions",
        "succeeded",
        0,
        env=faults(
            {"code": "SkuNotAvailable", "method": "PUT", "resource_type": VM, "location": "eastus", "count": None}
        ),
        artifacts=FINISHED_QUICK,
        attempts=("SkuNotAvailable", None),
    ),
    Row(
        "quota",
        "quick",
        "azure-refused",
        3,
        says=("OperationNotAllowed", "quota"),
        env=faults({"code": "OperationNotAllowed", "method": "PUT", "resource_type": VM}),
        attempts=("OperationNotAllowed",),
    ),
    Row(
        "resource-group-being-deleted",
        "quick",
        "azure-refused",
        3,
        says=("ResourceGroupBeingDeleted",),
        env=faults({"code": "ResourceGroupBeingDeleted", "method": "PUT", "resource_type": VM}),
    ),
    Row(
        "ssh-refused-during-boot",
        "quick",
        "succeeded",
        0,
        env=LONG_BOOT,
        act=Act("booting", phase_started("connect")),  # connecting began while the VM's SSH refused
        artifacts=FINISHED_QUICK,
    ),
    Row(
        "ssh-dropped-mid-sync",
        "bulky",
        "succeeded",
        0,
        act=Act("drop", phase_started("sync"), delay=0.15),  # once the upload is under way
        artifacts={"sum.txt": "<payload sum>"},
        output=("(2 attempts: the connection dropped)",),
    ),
    Row(
        "ssh-dropped-mid-training",
        "training",
        "succeeded",
        0,
        act=Act("drop", log_line("tick 5")),
        artifacts={"progress.txt": "40\n"},
        ticks=40,  # every line once, in order, across the cut
    ),
    Row(
        "spot-evicted-twice",
        "resuming",
        "succeeded",
        0,
        # each spot VM (the first replacement too) evicted 2 s after it runs, the Preempt notice 1 s ahead
        env={
            "ORCH_EMULATOR_SPEED": "30",
            "ORCH_CHECKPOINT_SYNC_S": "0.5",
            **faults({"code": "Evicted", "phase": "evict", "after": 60, "count": 2}),
        },
        artifacts={"final.txt": "60\n"},
        attempts=(None, None, None),  # the first VM and its two replacements
        output=("restarting from its checkpoint (restart 1 of 3)", "restarting from its checkpoint (restart 2 of 3)"),
        once=("tick 1", "tick 60"),  # resumed from its checkpoint each time, never from the start
    ),
    Row(
        "sigint-provision",
        "quick",
        "interrupted",
        130,
        says=("Interrupted",),
        env=SLOW,
        act=Act("SIGINT", creating_vm, after="connect"),
    ),
    Row(
        "sigint-connect",
        "quick",
        "interrupted",
        130,
        says=("Interrupted",),
        env=BOOTING,
        act=Act("SIGINT", phase_started("connect"), after="sync"),
    ),
    Row(
        "sigint-sync",
        "bulky",
        "interrupted",
        130,
        says=("Interrupted",),
        act=Act("SIGINT", phase_started("sync"), after="train"),
    ),
    Row(
        "sigint-setup",
        "ticking",
        "interrupted",
        130,
        says=("Interrupted; the outputs written so far are in",),
        act=Act("SIGINT", log_line("setting up"), after="train"),
    ),
    Row(
        "sigint-train",
        "training",
        "interrupted",
        130,
        says=("Interrupted; the outputs written so far are in",),
        act=Act("SIGINT", log_line("tick 5")),
        artifacts={"progress.txt": lambda text: int(text) >= 5},
        output=("stopping the job and collecting what it wrote",),
    ),
    Row(
        "sigint-collect",
        "writer",
        "interrupted",
        130,
        says=("Interrupted; the outputs written so far are in",),  # the job had finished: all of them
        act=Act("SIGINT", phase_started("collect")),
        artifacts={"big.bin": PAYLOAD_MB << 20},
    ),
    Row(
        "sigkill-provision-then-gc",
        "quick",
        "",
        -signal.SIGKILL,
        says=("Deleted orch-quick-",),
        env=SLOW,
        act=Act("SIGKILL", creating_vm),
    ),
]


@pytest.fixture(scope="module")
def jobs(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Path]:
    root = tmp_path_factory.mktemp("jobs")
    made = {}
    for name, text in JOBS.items():
        (root / name).mkdir()
        (root / name / "job.yaml").write_text(text)
        made[name] = root / name / "job.yaml"
    (root / "bulky" / "payload.bin").write_bytes(os.urandom(PAYLOAD_MB << 20))
    return made


def payload_sum(jobs: dict[str, Path]) -> str:
    digest = hashlib.sha256((jobs["bulky"].parent / "payload.bin").read_bytes()).hexdigest()
    return f"{digest}  payload.bin\n"


@dataclass
class Ran:
    returncode: int
    events: list[dict[str, Any]]
    stdout: str
    stderr: str
    acted: str  # what the act saw; "" if its moment never came


def run_with(row: Row, job: Path, state: Path) -> Ran:
    """`orchestrator --json run JOB` as a separate process, doing the row's act when its event comes."""
    env = {k: v for k, v in os.environ.items() if not k.startswith(("AZURE_", "ORCH_")) and "proxy" not in k.lower()}
    env.update(row.env)
    args = [sys.executable, "-m", "orchestrator", "--target", "local", "--state-dir", str(state), "--json", "run"]
    with tempfile.TemporaryFile("w+") as err:
        proc = subprocess.Popen(
            [*args, str(job), *row.flags],
            stdout=subprocess.PIPE,
            stderr=err,
            stdin=subprocess.DEVNULL,
            text=True,
            env=env,
            cwd=REPO,
        )
        assert proc.stdout is not None
        lines, events, acted = [], [], ""
        for line in proc.stdout:
            lines.append(line)
            try:
                event = json.loads(line)
            except ValueError:
                continue
            events.append(event)
            if row.act is not None and not acted and row.act.when(event):
                time.sleep(row.act.delay)
                acted = act(row.act.what, proc, state)
        proc.wait(timeout=120)
        err.seek(0)
        return Ran(proc.returncode, events, "".join(lines), err.read(), acted)


def act(what: str, proc: subprocess.Popen[str], state: Path) -> str:
    """Does it; says what it saw (for "booting": whether the VM had yet to boot)."""
    if what == "booting":
        (spec,) = (state / "vms").glob("*/vm.json")
        left = json.loads(spec.read_text())["boot_after"] - time.time()
        return "booting" if left > 0 else f"booted {-left:.2f} s ago"
    if what == "SIGINT":
        proc.send_signal(signal.SIGINT)
    elif what == "SIGKILL":
        proc.kill()
    elif what == "drop":
        for host in (state / "vms").glob("*/host.json"):
            os.kill(json.loads(host.read_text())["pid"], signal.SIGUSR1)
    else:
        raise AssertionError(what)
    return what


def processes_under(folder: Path) -> list[str]:
    """Processes whose command line or working directory is inside `folder` (VM hosts, jobs, uv)."""
    return [f"{pid}: {cmdline} (in {cwd})" for pid, cmdline, cwd in processes_in(folder)]


def no_processes_under(folder: Path) -> list[str]:
    """The VM hosts end their jobs as they go: wait for that (bounded), then say what is left."""
    deadline = time.monotonic() + 15
    while (left := processes_under(folder)) and time.monotonic() < deadline:
        time.sleep(0.1)
    return left


@pytest.mark.parametrize("row", ROWS, ids=[r.id for r in ROWS])
def test_fault_matrix(row: Row, jobs: dict[str, Path], tmp_path: Path) -> None:
    state = tmp_path / "state"
    ran = run_with(row, jobs[row.job], state)
    seen = ran.stdout + ran.stderr
    assert row.act is None or ran.acted == row.act.what, f"the act: {ran.acted!r}\n{seen[-4000:]}"
    assert ran.returncode == row.exit_code, seen[-4000:]
    assert not any(m in seen for m in NO_TRACEBACK), seen[-4000:]
    for text in row.output:
        assert text in seen, (text, seen[-4000:])
    if row.act is not None and row.act.after:
        assert not any(phase_started(row.act.after)(e) for e in ran.events), f"{row.act.after} started:\n{seen}"
    base = ["--target", "local", "--state-dir", str(state)]

    if row.act is not None and row.act.what == "SIGKILL":
        assert ran.events[-1]["event"] != "result"
        left = json.loads(cli(*base, "--json", "status").stdout)["runs"]
        assert [r["state"] for r in left] == ["provisioning"], left
        collected = cli(*base, "gc")
        assert collected.returncode == 0, collected.stdout + collected.stderr
        for text in row.says:
            assert text in collected.stdout, collected.stdout
    else:
        result = ran.events[-1]
        assert result["event"] == "result", seen[-4000:]
        assert (result["verdict"], result["exit_code"]) == (row.verdict, row.exit_code), result
        assert result["torn_down"] is True and result["kept"] is False, result
        for text in row.says:
            assert text in (result["message"] or ""), (text, result["message"])
        if row.attempts is not None:
            assert [a["code"] for a in result["attempts"]] == list(row.attempts), result["attempts"]
        if row.artifacts is not None:
            home = Path(result["artifacts"])
            got = sorted(p.name for p in home.iterdir() if not p.name.startswith("."))
            assert got == sorted(row.artifacts), got
            for name, want in row.artifacts.items():
                if isinstance(want, int):
                    assert (home / name).stat().st_size == want, name
                elif callable(want):
                    assert want((home / name).read_text()), (name, (home / name).read_text())
                else:
                    want = payload_sum(jobs) if want == "<payload sum>" else want
                    assert (home / name).read_text() == want, name
            assert result["skipped"] == []
        logged = [e["line"] for e in ran.events if e["event"] == "log"]
        for line in row.once:
            assert logged.count(line) == 1, (line, logged)
        if row.ticks:
            ticks = [e["line"] for e in ran.events if e["event"] == "log" and e["line"].startswith("tick ")]
            assert ticks == [f"tick {i}" for i in range(1, row.ticks + 1)], ticks
        recorded = json.loads(cli(*base, "--json", "status", result["run_id"]).stdout)
        assert (recorded["verdict"], recorded["verdict_exit_code"]) == (row.verdict, row.exit_code), recorded

    # Nothing left anywhere: the emulated Azure, the run store, this machine's processes.
    store = emulator_store(state)
    assert store["groups"] == {} and store["resources"] == {}, store
    status = cli(*base, "--json", "status")
    assert status.returncode == 0 and json.loads(status.stdout)["runs"] == [], status.stdout
    assert no_processes_under(state) == []
    assert not [p for p in (state / "vms").glob("*") if p.is_dir()], "a VM folder outlived its VM"
