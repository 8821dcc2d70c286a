"""Time from `orchestrator run` to the job's first line of output, on the local target: the sequential
path (`setup: python3 -m pip install -r requirements.txt`, no `python:` field) against ours (the VM
installs `python.requirements` with uv while it boots, concurrently with connect and sync), next to
the bound

    provisioning critical path + boot + max(install, sync) + start

on the azure-like profile (ORCH_EMULATOR_PROFILE=azure-like, ORCH_EMULATOR_SPEED=--speed), then both
paths again on the instant profile. The requirements are mnist-cnn's (torch, numpy, scikit-learn,
matplotlib), installed for real from the wheelhouse; the job prints one line and exits.

What is scaled: ARM operations and the boot (Azure seconds / speed). What is not: installs, sync and
the job's start, which are real on this machine (warm caches, torch's CPU wheel), so at speed S the
figures are a run S-times faster than Azure's control plane with this machine's install times. The
bound uses the profile's provisioning critical path and boot (divided by the speed), the install time
of uv measured here on its own (same command, same cache, a fresh environment), and the run's own
sync and start (train phase start to first line). It also prints a projection onto Azure from the
public figures the README cites.

    .venv/bin/python bench/first_step.py [--speed 10] [--job-requirements jobs/mnist-cnn/requirements.txt]
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path

from installed import compile_bytecode  # bench/installed.py

REPO = Path(__file__).resolve().parents[1]
MARKER = "FIRST-STEP"

# Public figures for a fresh cloud VM installing a ~50-package requirements file, README "Benchmarks":
# pip 4 min 32 s, uv 18 s (the same file, the same VM).
AZURE_PIP_S = 272.0
AZURE_UV_S = 18.0


def make_job(folder: Path, requirements: Path, ours: bool) -> Path:
    folder.mkdir(parents=True)
    shutil.copy(requirements, folder / "requirements.txt")
    (folder / "train.py").write_text(f"print('{MARKER}', flush=True)\n")
    install = (
        "python:\n  requirements: requirements.txt\n"
        if ours
        else "setup: python3 -m pip install -q -r requirements.txt\n"
    )
    (folder / "job.yaml").write_text(f"name: firststep\n{install}run: python3 train.py\n")
    return folder / "job.yaml"


def run_once(state: Path, job: Path, profile: str, speed: float) -> dict[str, float]:
    """(seconds to the first line, the run's phases) for one `orchestrator run`."""
    env = {k: v for k, v in os.environ.items() if not k.startswith("ORCH_")}
    env.update({"ORCH_EMULATOR_PROFILE": profile, "ORCH_EMULATOR_SPEED": str(speed)})
    cli = [sys.executable, "-m", "orchestrator", "--target", "local", "--state-dir", str(state)]
    t0 = time.time()
    proc = subprocess.Popen([*cli, "run", str(job)], env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    assert proc.stdout is not None
    first = None
    for line in proc.stdout:
        if first is None and MARKER in line:
            first = time.time()
    _, err = proc.communicate()
    if proc.returncode != 0 or first is None:
        raise SystemExit(f"the run failed ({proc.returncode}):\n{err[-3000:]}")
    listing = json.loads(subprocess.run([*cli, "--json", "ls"], capture_output=True, text=True, check=True).stdout)
    run_id = listing["runs"][0]["run_id"]
    status = json.loads(
        subprocess.run([*cli, "--json", "status", run_id], capture_output=True, text=True, check=True).stdout
    )
    phases: dict[str, float] = {}
    for p in status["phases"]:
        phases[p["phase"]] = max(phases.get(p["phase"], 0.0), p["seconds"] or 0.0)
        if p["phase"] == "train":
            phases["start"] = first - p["started"]
        if p["phase"] == "provision":
            phases["before_provision"] = p["started"] - t0
    phases["first_line"] = first - t0
    return phases


def uv_install_seconds(requirements: Path) -> float:
    """uv installing the requirements into a fresh environment, as the VM does (wheelhouse, warm cache)."""
    from orchestrator.targets.localvm.image import base_python, uv_binary, uv_settings

    env = {**os.environ, **uv_settings()}
    env.pop("VIRTUAL_ENV", None)
    uv = str(uv_binary())
    with tempfile.TemporaryDirectory() as tmp:
        venv = Path(tmp) / "env"
        subprocess.run([uv, "--quiet", "venv", "--python", str(base_python()), str(venv)], env=env, check=True)
        t = time.perf_counter()
        subprocess.run(
            [uv, "--quiet", "pip", "install", "--python", str(venv / "bin" / "python"), "-r", str(requirements)],
            env=env,
            check=True,
        )
        return time.perf_counter() - t


def main() -> None:
    from orchestrator import catalog
    from orchestrator.emulator import get_profile

    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--speed", type=float, default=10.0, help="emulated seconds per real second (azure-like)")
    ap.add_argument("--job-requirements", type=Path, default=REPO / "jobs" / "mnist-cnn" / "requirements.txt")
    args = ap.parse_args()
    compile_bytecode()
    profile = get_profile("azure-like")
    t = catalog.TYPICAL_SECONDS
    critical = (
        t["Microsoft.Resources/resourceGroups"]
        + max(t["Microsoft.Network/virtualNetworks"], t["Microsoft.Network/networkSecurityGroups"])
        + t["Microsoft.Compute/virtualMachines"]
    )
    uv_install_seconds(args.job_requirements)  # warm uv's cache as a VM image's would be
    install = uv_install_seconds(args.job_requirements)
    results: dict[tuple[str, str], dict[str, float]] = {}
    with tempfile.TemporaryDirectory() as tmp:
        for prof, speed in (("azure-like", args.speed), ("instant", 1.0)):
            for path in ("sequential", "ours"):
                job = make_job(Path(tmp) / f"{prof}-{path}", args.job_requirements, ours=path == "ours")
                results[(prof, path)] = run_once(Path(tmp) / f"state-{prof}-{path}", job, prof, speed)
    seq, ours = results[("azure-like", "sequential")], results[("azure-like", "ours")]
    provisioning, boot = critical / args.speed, profile.boot_to_ssh / args.speed
    bound = provisioning + boot + max(install, ours.get("sync", 0.0)) + ours.get("start", 0.0)
    print(f"to the first line of output, requirements {args.job_requirements.relative_to(REPO)}")
    print(f"azure-like profile at speed {args.speed:g} (ARM and boot / {args.speed:g}; installs real):")
    print(
        f"  bound   {bound:6.1f} s = provisioning critical path {provisioning:.1f} + boot {boot:.1f} "
        f"+ max(install {install:.1f}, sync {ours.get('sync', 0.0):.1f}) + start {ours.get('start', 0.0):.1f}"
    )
    print(
        f"  ours    {ours['first_line']:6.1f} s   {ours['first_line'] / bound:.2f} x the bound (goal <= 1.15); "
        f"install phase {ours.get('install', 0.0):.1f} s"
    )
    before = ours.get("before_provision", 0.0)
    over_provision = ours.get("provision", 0.0) - provisioning
    print(
        f"          over the bound: before provisioning +{before:.1f} s (CLI start, preflight), provisioning "
        f"+{over_provision:.1f} s (requests, polls, keys), the rest "
        f"{ours['first_line'] - bound - before - over_provision:+.1f} s (SSH retries after boot, less the VM's "
        "poll slack, which its boot overlaps)"
    )
    print(
        f"  sequential {seq['first_line']:6.1f} s   setup (pip) {seq.get('setup', 0.0):.1f} s; "
        f"ours is {seq['first_line'] / ours['first_line']:.2f} x faster (goal >= 1.5)"
    )
    iseq, iours = results[("instant", "sequential")], results[("instant", "ours")]
    print("instant profile:")
    print(
        f"  ours {iours['first_line']:.1f} s, sequential {iseq['first_line']:.1f} s: "
        f"training starts {iseq['first_line'] - iours['first_line']:.1f} s sooner "
        f"({iseq['first_line'] / iours['first_line']:.2f} x)"
    )
    azure_provisioning, azure_boot = critical, profile.boot_to_ssh
    azure_seq = azure_provisioning + azure_boot + seq.get("sync", 0.0) + AZURE_PIP_S
    azure_ours = azure_provisioning + azure_boot + max(AZURE_UV_S, ours.get("sync", 0.0))
    print(
        f"projection onto Azure (provisioning {azure_provisioning:.0f} s + boot {azure_boot:.0f} s, installs from the "
        f"README's public figures: pip {AZURE_PIP_S:.0f} s, uv {AZURE_UV_S:.0f} s): sequential ~{azure_seq:.0f} s, "
        f"ours ~{azure_ours:.0f} s ({azure_seq / azure_ours:.1f} x)"
    )


if __name__ == "__main__":
    main()
