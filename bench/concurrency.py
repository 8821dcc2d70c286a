"""Many runs at once on the local target, one state directory, under a 429 storm (issue 13).

Starts N `orchestrator --target local run` processes of the smoke job at the same moment, all with
the same --state-dir, on the azure-like profile sped up by --speed, with a throttling storm injected
into every command (each ARM request answered 429 with Retry-After at the given probability), and
compares the wall time of the N against one run alone under the same settings. Then checks what a
user relies on: every run succeeded, nothing is left (the emulator's store, `status`, VM host and job
processes, VM folders), and no output anywhere says "database is locked".

    python bench/concurrency.py [--runs 50] [--speed 5] [--storm 0.3] [--job jobs/smoke/job.yaml] [--warm]

--warm: every command with ORCH_WARM=1 (README, "Warm start"); the run alone and the many each start
their own server, so its start is counted in both.

Prints the figures; exits 1 if a run failed or anything leaked (a missed time target is printed,
not an error: it depends on the machine).
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import tempfile
import threading
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from installed import compile_bytecode  # bench/installed.py

REPO = Path(__file__).resolve().parents[1]
TARGET_RATIO = 1.3
REGIONS = ("eastus", "westus2", "westus3")


@dataclass
class Finished:
    code: int
    seconds: float
    verdict: str
    stages: dict[str, float]  # seconds of wall time each stage took (STAGES)
    retries: int  # retries azure-core said it made (the storm, seen)
    output: str


def environment(speed: float, storm: float) -> dict[str, str]:
    env = {k: v for k, v in os.environ.items() if not k.startswith(("AZURE_", "ORCH_")) and "proxy" not in k.lower()}
    env["ORCH_EMULATOR_PROFILE"] = "azure-like"
    env["ORCH_EMULATOR_SPEED"] = str(speed)
    if storm > 0:
        fault = {"code": "TooManyRequests", "status": 429, "count": None, "probability": storm, "retry_after": 1}
        env["ORCH_EMULATOR_FAULTS"] = json.dumps([fault])
    return env


@dataclass
class Started:
    proc: subprocess.Popen[str]
    t0: float
    lines: list[tuple[float, str]]  # (seconds since the start, line) as the run printed them
    reader: threading.Thread
    ended: list[float]  # seconds from the start to its output's end (its exit), once it ended


def start(state: Path, job: str, env: dict[str, str], region: str) -> Started:
    args = [sys.executable, "-m", "orchestrator", "--target", "local", "--state-dir", str(state), "--json", "run", job]
    args += ["--region", region]
    proc = subprocess.Popen(
        args, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL, text=True, env=env, cwd=REPO
    )
    t0 = time.perf_counter()
    lines: list[tuple[float, str]] = []
    ended: list[float] = []

    def read() -> None:
        assert proc.stdout is not None
        for line in proc.stdout:
            lines.append((time.perf_counter() - t0, line))
        ended.append(time.perf_counter() - t0)

    reader = threading.Thread(target=read, daemon=True)
    reader.start()
    return Started(proc, t0, lines, reader, ended)


# Where a run's wall time goes, from the moments its events were printed: each stage ends at the
# first event that matches.
STAGES = (
    ("start-up", lambda e: True),  # the interpreter, imports, the job file
    ("preflight", lambda e: e.get("event") == "phase.started" and e.get("phase") == "provision"),
    ("provision", lambda e: e.get("event") == "phase.ended" and e.get("phase") == "provision"),
    ("to connect", lambda e: e.get("event") == "phase.started" and e.get("phase") == "connect"),
    ("connect..collect", lambda e: e.get("event") == "phase.started" and e.get("phase") == "teardown"),
    ("teardown", lambda e: e.get("event") == "phase.ended" and e.get("phase") == "teardown"),
)


def finish(started: Started) -> Finished:
    code = started.proc.wait(timeout=1800)
    started.reader.join()
    seconds = started.ended[0]  # not when this wait returned: the runs are waited for in turn
    events: list[tuple[float, dict[str, Any]]] = []
    for t, line in started.lines:
        try:
            events.append((t, json.loads(line)))
        except ValueError:
            continue
    result: dict[str, Any] = next((e for _, e in reversed(events) if e.get("event") == "result"), {})
    stages: dict[str, float] = {}
    last, i = 0.0, 0
    for name, ends in STAGES:
        while i < len(events) and not ends(events[i][1]):
            i += 1
        if i == len(events):
            break
        stages[name], last = events[i][0] - last, events[i][0]
    stages["exit"] = seconds - last
    retries = sum(1 for _, e in events if e.get("event") == "progress" and "Azure answered 429" in e.get("message", ""))
    output = "".join(line for _, line in started.lines)
    return Finished(code, seconds, str(result.get("verdict", "")), stages, retries, output)


def leftovers(state: Path) -> list[str]:
    """What is left of the runs: resources in the emulator, runs in `status`, processes, VM folders."""
    left = []
    from orchestrator.emulator.persist import StoreFile

    store = StoreFile(state / "emulator" / "store.json")
    with store.locked():
        data = store.load()
    left += [f"resource group {g}" for g in data.groups]
    left += [f"resource {r}" for r in data.resources]
    cli = [sys.executable, "-m", "orchestrator", "--target", "local", "--state-dir", str(state), "--json", "status"]
    status = subprocess.run(cli, capture_output=True, text=True, check=False, cwd=REPO)
    try:
        left += [f"status: run {r['run_id']} ({r['state']})" for r in json.loads(status.stdout)["runs"]]
    except (ValueError, KeyError):
        left.append(f"status did not answer: {status.stdout[-300:]} {status.stderr[-300:]}")
    deadline = time.monotonic() + 15  # the VM hosts end their jobs as they go
    while (procs := processes_under(state)) and time.monotonic() < deadline:
        time.sleep(0.2)
    left += [f"process {p}" for p in procs]
    left += [f"VM folder {p.name}" for p in (state / "vms").glob("*") if p.is_dir()]
    return left


def stop_warm_servers(tmp: Path) -> list[str]:
    """Ask the warm-start servers to leave (SIGTERM, as a logout would); any still there is a leak."""
    import signal

    from orchestrator.targets.localvm.manager import processes_in

    servers = [pid for folder in tmp.glob("warm*") for pid, _, _ in processes_in(folder)]
    for pid in servers:
        os.kill(pid, signal.SIGTERM)
    deadline = time.monotonic() + 5
    while (left := [p for p in servers if Path(f"/proc/{p}").exists()]) and time.monotonic() < deadline:
        time.sleep(0.1)
    return [f"warm-start server {p}" for p in left]


def processes_under(folder: Path) -> list[str]:
    from orchestrator.targets.localvm.manager import processes_in

    return [f"{pid} {cmdline[:120]}" for pid, cmdline, _ in processes_in(folder)]


class CpuSampler:
    """Where the CPU went: every process of the runs (the CLI commands, the VM hosts, what the VMs
    ran), sampled twice a second, its last-seen user+system time kept (a process's final half
    second is missed)."""

    def __init__(self, state: Path, warm: Path) -> None:
        self.state = str(state)
        self.warm = str(warm)
        self.seen: dict[int, tuple[str, float]] = {}
        self.tick = os.sysconf("SC_CLK_TCK")
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, daemon=True)
        self._thread.start()

    def _kind(self, pid: str) -> str | None:
        try:
            cmdline = Path(f"/proc/{pid}/cmdline").read_bytes().replace(b"\0", b" ").decode(errors="replace")
            cwd = os.readlink(f"/proc/{pid}/cwd")
        except OSError:
            return None
        if "-m orchestrator " in cmdline and self.state in cmdline:
            return "CLI (run, status)"
        if "-m orchestrator.warm " in cmdline and self.warm in cmdline:
            return "CLI forks (warm)"
        if "localvm.host" in cmdline and self.state in cmdline:
            return "VM hosts"
        if cwd.startswith(self.state) or self.state in cmdline:
            return "on the VMs (uv, job, log follower)"
        return None

    def _run(self) -> None:
        while not self._stop.wait(0.5):
            for pid in os.listdir("/proc"):
                if not pid.isdigit():
                    continue
                known = self.seen.get(int(pid))
                kind = known[0] if known else self._kind(pid)
                if kind is None:
                    continue
                try:
                    fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
                except OSError:
                    continue
                self.seen[int(pid)] = (kind, (int(fields[11]) + int(fields[12])) / self.tick)

    def stop(self) -> dict[str, float]:
        self._stop.set()
        self._thread.join()
        totals: dict[str, float] = {}
        for kind, seconds in self.seen.values():
            totals[kind] = totals.get(kind, 0.0) + seconds
        return totals


def summary(runs: list[Finished]) -> str:
    walls = [r.seconds for r in runs]
    text = f"wall median {statistics.median(walls):6.1f} s, max {max(walls):6.1f} s; median stages:"
    for name in [n for n, _ in STAGES] + ["exit"]:
        text += f" {name} {statistics.median(r.stages.get(name, 0.0) for r in runs):.1f}"
    return text


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--runs", type=int, default=50)
    ap.add_argument("--speed", type=float, default=5.0, help="emulated seconds per real second (azure-like)")
    ap.add_argument("--storm", type=float, default=0.3, help="probability that an ARM request is answered 429")
    ap.add_argument("--job", default=str(REPO / "jobs" / "smoke" / "job.yaml"))
    ap.add_argument("--warm", action="store_true", help="ORCH_WARM=1: commands fork from a warm server (README)")
    args = ap.parse_args()
    compile_bytecode()  # as a pip install leaves the tool: each of the many processes starts from bytecode
    env = environment(args.speed, args.storm)
    if args.warm:
        env["ORCH_WARM"] = "1"
    print(
        f"{args.runs} runs of {Path(args.job).parent.name} at once on --target local, one state directory; "
        f"azure-like profile at ORCH_EMULATOR_SPEED={args.speed:g}; 429 storm p={args.storm:g} (Retry-After 1 s)"
    )
    print(f"machine: {os.cpu_count()} cores, load average {os.getloadavg()[0]:.2f} at the start")
    failed: list[str] = []
    with tempfile.TemporaryDirectory(prefix="orch-concurrency-") as tmp:
        state = Path(tmp) / "state"
        # Warm: the run alone and the many each start their own server (its start is in the times).
        alone_env = {**env, "ORCH_WARM_DIR": f"{tmp}/warm-alone"}
        env["ORCH_WARM_DIR"] = f"{tmp}/warm"
        alone = finish(start(state, args.job, alone_env, REGIONS[0]))
        if alone.code != 0:
            failed.append(f"the run alone: exit {alone.code}, {alone.verdict}\n{alone.output[-2000:]}")
        print(f"alone:   {summary([alone])}")

        # The emulated subscription's default quota holds 24 NC4as_T4_v3 VMs per region (96 vCPUs), as
        # a pay-as-you-go one might: the runs are spread over three regions, as a team would.
        sampler = CpuSampler(state, Path(env["ORCH_WARM_DIR"]))
        t0 = time.perf_counter()
        procs = [start(state, args.job, env, REGIONS[i % len(REGIONS)]) for i in range(args.runs)]
        runs = [finish(p) for p in procs]
        together = time.perf_counter() - t0
        cpu = sampler.stop()
        print(f"{args.runs:>3} at once: {summary(runs)}")
        print(f"          all {args.runs} done in {together:.1f} s (first start to last exit)")
        for i, r in enumerate(runs):
            if r.code != 0 or r.verdict != "succeeded":
                failed.append(f"run {i}: exit {r.code}, verdict {r.verdict!r}\n{r.output[-1500:]}")
        locked = [i for i, r in enumerate([alone, *runs]) if "database is locked" in r.output.lower()]
        if locked:
            failed.append(f'"database is locked" in the output of {len(locked)} run(s)')
        retries = sum(r.retries for r in runs)
        left = leftovers(state) + stop_warm_servers(Path(tmp))
        if left:
            failed.append("left behind: " + "; ".join(left[:20]) + (" ..." if len(left) > 20 else ""))
    ratio = together / alone.seconds
    print(
        f"429 retries said by the {args.runs} runs: {retries}; succeeded: "
        f"{sum(r.verdict == 'succeeded' for r in runs)}/{args.runs}; leaks: {len(left)}; "
        f'"database is locked": {len(locked)}'
    )
    busy = sum(cpu.values())
    cores = os.cpu_count() or 1
    print(
        f"CPU used by the {args.runs} runs: {busy:.0f} s ({busy / args.runs:.1f} s a run; "
        + ", ".join(f"{k} {v:.0f} s" for k, v in sorted(cpu.items(), key=lambda kv: -kv[1]))
        + f") over {together:.0f} s on {cores} cores: {busy / cores:.0f} s with every core busy on nothing else; "
        f"load average {os.getloadavg()[0]:.2f} at the end"
    )
    met = "met" if ratio <= TARGET_RATIO else "MISSED"
    print(f"ratio: {args.runs} at once / one alone = {together:.1f} / {alone.seconds:.1f} = {ratio:.2f}x "
          f"(target <= {TARGET_RATIO}x: {met})")  # fmt: skip
    for problem in failed:
        print(f"FAILED: {problem}", file=sys.stderr)
    return 1 if failed else 0


if __name__ == "__main__":
    raise SystemExit(main())
