"""What a whole `orchestrator run` adds on top of the job itself, on the local target (instant profile).

Runs the smoke job N times through the CLI (separate processes, as a user would) and splits each
run's wall time into the job's own phases (setup, train) and everything else (start-up,
provisioning, connecting, syncing, collecting, teardown), from the run store's phase intervals. It
also times the creation of a local VM on its own.

    python bench/run_overhead.py [--runs 5] [--job jobs/smoke/job.yaml]
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

from installed import compile_bytecode  # bench/installed.py

REPO = Path(__file__).resolve().parents[1]
JOB_PHASES = {"setup", "train"}


def vm_creation_seconds(state: Path) -> float:
    """A local VM from the create request to SSH answering in its own Python environment: the
    emulator's VM create, the host process start, its uv-made environment, its SSH listener."""
    from datetime import UTC, datetime

    from orchestrator.azure.provision import Provisioner
    from orchestrator.azure.teardown import delete_group
    from orchestrator.lifecycle.steps import make_keys
    from orchestrator.plan import build_plan, new_run_id
    from orchestrator.remote.connect import Endpoint, Node
    from orchestrator.runfiles import NodeRecord, RunFiles
    from orchestrator.spec import JobSpec
    from orchestrator.targets.local import LocalTarget

    target = LocalTarget(state)
    spec = JobSpec.model_validate({"name": "vm", "run": "true", "base_dir": str(state)})
    run_id = new_run_id("vm")
    keys = make_keys(spec, run_id, RunFiles(state, run_id).ensure())
    with target.session() as session:
        plan = build_plan(
            spec, run_id, subscription_id=session.subscription_id, owner="bench", now=datetime.now(UTC),
            ssh_public_key=keys.client_public, custom_data=keys.custom_data,
        )  # fmt: skip
        t = time.perf_counter()
        node = Provisioner(session).provision(plan).nodes[0]
        record = NodeRecord(0, node.vm_name, node.public_ip, node.private_ip, "azureuser", keys.host_keys[0])
        host, port = target.endpoint(record)
        vm = Node(Endpoint(node.vm_name, host, port, "azureuser", record.host_key, keys.client_key))
        vm.run("python3 -c 'import sys; assert sys.prefix != sys.base_prefix'", "the VM's own Python")
        took = time.perf_counter() - t
        vm.close()
        delete_group(session, plan.resource_group)
    return took


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--runs", type=int, default=5)
    ap.add_argument("--job", default=str(REPO / "jobs" / "smoke" / "job.yaml"))
    args = ap.parse_args()
    compile_bytecode()
    with tempfile.TemporaryDirectory() as tmp:
        creations = [vm_creation_seconds(Path(tmp) / f"vm{i}") for i in range(args.runs)]
        cli = [sys.executable, "-m", "orchestrator", "--target", "local", "--state-dir", tmp]
        env = {k: v for k, v in os.environ.items() if not k.startswith("ORCH_")}
        overheads, walls, jobs = [], [], []
        for _ in range(args.runs):
            t = time.perf_counter()
            subprocess.run([*cli, "run", args.job], env=env, capture_output=True, check=True)
            wall = time.perf_counter() - t
            listing = subprocess.run([*cli, "--json", "ls"], capture_output=True, text=True, check=True).stdout
            run_id = json.loads(listing)["runs"][0]["run_id"]
            status = json.loads(
                subprocess.run([*cli, "--json", "status", run_id], capture_output=True, text=True, check=True).stdout
            )
            job = sum(p["seconds"] or 0.0 for p in status["phases"] if p["phase"] in JOB_PHASES)
            walls.append(wall)
            jobs.append(job)
            overheads.append(wall - job)
    print(f"{args.runs} runs of {Path(args.job).parent.name} on --target local (instant profile)")
    print(
        f"local VM creation median {statistics.median(creations):.2f} s, max {max(creations):.2f} s"
        "   (create request -> a command answering in the VM's own Python; target <= 3 s)"
    )
    print(f"wall   median {statistics.median(walls):.2f} s")
    print(f"job    median {statistics.median(jobs):.2f} s (setup + training as the VM ran them)")
    print(f"added  median {statistics.median(overheads):.2f} s, max {max(overheads):.2f} s   (target <= 2 s)")


if __name__ == "__main__":
    main()
