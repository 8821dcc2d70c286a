"""Report the machine (CPU, memory, GPUs, driver) and write it to $ORCH_OUTPUT_DIR/machine.json."""

from __future__ import annotations

import json
import os
import platform
import shutil
import subprocess
import sys
from pathlib import Path


def gpus() -> list[dict[str, str]]:
    smi = shutil.which("nvidia-smi")
    if not smi:
        return []
    out = subprocess.run(
        [smi, "--query-gpu=name,memory.total,driver_version", "--format=csv,noheader"],
        capture_output=True,
        text=True,
        timeout=30,
        check=False,
    )
    rows = []
    for line in out.stdout.strip().splitlines():
        name, memory, driver = (part.strip() for part in line.split(","))
        rows.append({"name": name, "memory": memory, "driver": driver})
    return rows


def memory_gib() -> float:
    try:
        with open("/proc/meminfo") as f:
            kib = int(next(line for line in f if line.startswith("MemTotal")).split()[1])
        return round(kib / 1024 / 1024, 1)
    except (OSError, StopIteration, ValueError):
        return 0.0


def main() -> int:
    out_dir = Path(os.environ.get("ORCH_OUTPUT_DIR", "outputs"))
    out_dir.mkdir(parents=True, exist_ok=True)
    report = {
        "host": platform.node(),
        "python": sys.version.split()[0],
        "os": platform.platform(),
        "cpus": os.cpu_count(),
        "memory_gib": memory_gib(),
        "gpus": gpus(),
        "run_id": os.environ.get("ORCH_RUN_ID", ""),
        "node_rank": os.environ.get("ORCH_NODE_RANK", "0"),
    }
    (out_dir / "machine.json").write_text(json.dumps(report, indent=2))
    (out_dir / "metrics.json").write_text(json.dumps({"python_ok": 1, "gpus": len(report["gpus"])}))
    print(json.dumps(report, indent=2))
    print(f"smoke: {len(report['gpus'])} GPU(s), {report['cpus']} CPUs, {report['memory_gib']} GiB")
    return 0


if __name__ == "__main__":
    sys.exit(main())
