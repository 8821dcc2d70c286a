"""What a whole `orchestrator run` adds on top of the job itself, on the local target (instant profile).

Runs the smoke job N times through the CLI (separate processes, as a user would) and splits each
run's wall time into the job's own phases (setup, training) and everything else (start-up,
provisioning, connecting, syncing, collecting, teardown), from the run store's state events.

    python bench/run_overhead.py [--runs 5] [--job jobs/smoke/job.yaml]
"""

from __future__ import annotations

import argparse
import itertools
import json
import os
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
JOB_STATES = {"setup", "training"}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--runs", type=int, default=5)
    ap.add_argument("--job", default=str(REPO / "jobs" / "smoke" / "job.yaml"))
    args = ap.parse_args()
    with tempfile.TemporaryDirectory() as tmp:
        cli = [sys.executable, "-m", "orchestrator", "--target", "local", "--state-dir", tmp]
        env = {k: v for k, v in os.environ.items() if not k.startswith("ORCH_")}
        overheads, walls, jobs = [], [], []
        for _ in range(args.runs):
            t = time.perf_counter()
            subprocess.run([*cli, "run", args.job], env=env, capture_output=True, check=True)
            wall = time.perf_counter() - t
            run_id = json.loads(
                subprocess.run([*cli, "--json", "ls"], capture_output=True, text=True, check=True).stdout
            )[0]["run_id"]
            status = json.loads(
                subprocess.run([*cli, "--json", "status", run_id], capture_output=True, text=True, check=True).stdout
            )
            states = [(e["at"], e["state"]) for e in status["events"] if e["kind"] == "state"]
            job = sum(b[0] - a[0] for a, b in itertools.pairwise(states) if a[1] in JOB_STATES)
            walls.append(wall)
            jobs.append(job)
            overheads.append(wall - job)
    print(f"{args.runs} runs of {Path(args.job).parent.name} on --target local (instant profile)")
    print(f"wall   median {statistics.median(walls):.2f} s")
    print(f"job    median {statistics.median(jobs):.2f} s (setup + training as the VM ran them)")
    print(f"added  median {statistics.median(overheads):.2f} s, max {max(overheads):.2f} s   (target <= 2 s)")


if __name__ == "__main__":
    main()
