"""The preflight's wall time and request count on the emulator's azure-like profile (0.15 s a request).

Real wall time (the emulator's clock is the system clock, so every request really waits its 0.15 s):
  ready        a ready subscription: credential, 3 providers, permissions, usages, SKUs, image
               (list + get), policy; all pass
  no-quota     the size's family has no quota in the asked region nor anywhere else: the other 19
               catalog regions' usages and SKUs are asked too, in parallel
  sequential   the ready checks' requests sent one after another (what the parallelism saves)
The first preflight of a process also imports the SDK and builds its clients: `cold` is that one.

And in emulated Azure seconds (time-scaled, ScaledClock):
  new-sub      a brand-new subscription: 3 providers registered and waited for (the profile's 60 s)

    python bench/preflight.py [--repeat 5]
"""

from __future__ import annotations

import argparse
import statistics
import time
from dataclasses import dataclass

from orchestrator.azure.preflight import run_preflight
from orchestrator.clock import ScaledClock, SystemClock
from orchestrator.emulator import Emulator
from orchestrator.spec import JobSpec
from orchestrator.targets.emulated import emulator_session

SUB = "44444444-4444-4444-4444-444444444444"
SPEC = JobSpec.model_validate({"name": "bench", "run": "true", "nodes": 2})
FAMILY = SPEC.resources.size.family


@dataclass
class Sample:
    seconds: float
    requests: int
    exit_code: int


def emulator(case: str, speed: float = 1.0) -> Emulator:
    clock = SystemClock() if speed == 1.0 else ScaledClock(speed)
    emu = Emulator("azure-like", clock=clock, subscription="new-subscription" if case == "new-sub" else None)
    if case == "no-quota":
        emu.set_quota("*", FAMILY, 0)
    if case == "new-sub":
        emu.set_quota("*", FAMILY, 96)
    return emu


def measure(case: str) -> Sample:
    """One preflight on a fresh azure-like emulator; wall seconds (emulated seconds for new-sub)."""
    speed = 20.0 if case == "new-sub" else 1.0
    emu = emulator(case, speed)
    session = emulator_session(emu, subscription=SUB)
    t0, c0 = time.monotonic(), emu.clock.now()
    report = run_preflight(session, SPEC)
    seconds = emu.clock.now() - c0 if case == "new-sub" else time.monotonic() - t0
    return Sample(seconds, len(emu.requests()), report.exit_code)


def sequential() -> Sample:
    """The ready case's requests, through the same SDK calls, one after another."""
    emu = emulator("ready")
    s = emulator_session(emu, subscription=SUB)
    image = SPEC.resources
    t0 = time.monotonic()
    for ns in ("Microsoft.Compute", "Microsoft.Network", "Microsoft.DevTestLab"):
        s.resources.providers.get(ns)
    from azure.core.rest import HttpRequest

    s.resources.send_request(
        HttpRequest("GET", f"/subscriptions/{SUB}/providers/Microsoft.Authorization/permissions?api-version=2022-04-01")
    )
    list(s.compute.usage.list(image.region))
    list(s.compute.resource_skus.list(filter=f"location eq '{image.region}'"))
    versions = s.compute.virtual_machine_images.list(image.region, "microsoft-dsvm", "ubuntu-hpc", "2204", top=1)
    s.compute.virtual_machine_images.get(image.region, "microsoft-dsvm", "ubuntu-hpc", "2204", versions[0].name)
    s.resources.send_request(
        HttpRequest(
            "POST",
            f"/subscriptions/{SUB}/providers/Microsoft.PolicyInsights/checkPolicyRestrictions?api-version=2024-10-01",
            json={"resourceDetails": {"resourceContent": {"type": "Microsoft.Compute/virtualMachines"}}},
        )
    )
    return Sample(time.monotonic() - t0, len(emu.requests()), 0)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--repeat", type=int, default=5)
    args = ap.parse_args()
    cold = measure("ready")
    print(f"azure-like profile (0.15 s a request), {SPEC.nodes} x {SPEC.resources.vm_size} in {SPEC.resources.region}")
    print(f"{'case':<12} {'seconds':>8} {'requests':>9} {'exit':>5}")
    print(f"{'cold':<12} {cold.seconds:>8.2f} {cold.requests:>9} {cold.exit_code:>5}   (first in process: SDK import)")
    for case, fn in (("ready", lambda: measure("ready")), ("no-quota", lambda: measure("no-quota")),
                     ("sequential", sequential)):  # fmt: skip
        samples = [fn() for _ in range(args.repeat)]
        median = statistics.median(s.seconds for s in samples)
        last = samples[-1]
        print(f"{case:<12} {median:>8.2f} {last.requests:>9} {last.exit_code:>5}   (median of {args.repeat}, wall)")
    new = measure("new-sub")
    print(f"{'new-sub':<12} {new.seconds:>8.1f} {new.requests:>9} {new.exit_code:>5}   (Azure seconds: registration)")


if __name__ == "__main__":
    main()
