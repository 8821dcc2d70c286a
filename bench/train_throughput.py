"""Training throughput of each example job against a seed-style loop on the same device.

"ours" is the job as shipped (on CUDA: bf16 autocast (dcgan: fp32/TF32, --amp off), channels_last,
TF32, the dataset and each epoch's index order held on the GPU, fused Adam, and the whole step
replayed as one CUDA graph); "seed-style" is the same model and batch size in plain fp32 with a CPU
DataLoader copying each batch to the device and no channels_last. On a CPU the two differ only in
the data path. Figures are samples per second over the timed steps (warm-up excluded; the per-epoch
evaluation and checkpoint count, the outputs written after training do not); `quality` is
each run's test_accuracy (dcgan: generated_accuracy), a check that the fast path still learns.

The bundled digits set has 1,437 training images: at batch 256 an epoch is 6 steps, too few to time
a GPU fairly (the first 5 steps are warm-up). `--repeat-data N` tiles the training set N times per
epoch for the throughput figure only (40 gives about 57,000 images, the size of MNIST's training
set); the accuracies of such runs are not the jobs' documented ones.

    python bench/train_throughput.py [--dataset digits|mnist] [--epochs 3] [--device auto] [--repeat-data 1]
        [--jobs mnist-cnn,seq-lstm,dcgan,keras-mnist] [--variant 'JOB:ARGS' ...]

`--variant 'dcgan:--amp bf16'` adds a row: that job's "ours" run with those extra arguments, against
the same seed-style figure (e.g. `--eager` for no CUDA graphs, `--amp off|bf16`); commas may stand for
the spaces (`dcgan:--amp,bf16`, for gpu_check.sh's BENCH_ARGS).
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile
from pathlib import Path

JOBS = Path(__file__).resolve().parents[1] / "jobs"
CASES = [  # job, extra args (the seed-style baseline uses the same)
    ("mnist-cnn", ["--batch-size", "256"]),
    ("seq-lstm", ["--batch-size", "256"]),
    ("dcgan", ["--batch-size", "256"]),
]


def run(job: str, args: list[str], seed_style: bool) -> dict[str, object]:
    """The job's metrics.json, with "notes": the lines it printed starting with "note:" (a CUDA graph
    capture that fell back to eager says so there)."""
    with tempfile.TemporaryDirectory() as tmp:
        env = {
            **os.environ,
            "ORCH_OUTPUT_DIR": f"{tmp}/out",
            "ORCH_CHECKPOINT_DIR": f"{tmp}/ckpt",
            "KERAS_BACKEND": "torch",
        }
        cmd = [sys.executable, str(JOBS / job / "train.py"), *args, "--checkpoint-every", "100000"]
        if seed_style:
            cmd.append("--seed-style")
        out = subprocess.run(cmd, env=env, capture_output=True, text=True, check=False, cwd=JOBS)
        if out.returncode != 0:
            raise SystemExit(f"{job} failed:\n{out.stderr[-2000:]}")
        metrics = dict(json.loads(Path(tmp, "out", "metrics.json").read_text()))
        metrics["notes"] = [line for line in (out.stdout + out.stderr).splitlines() if line.startswith("note:")]
        return metrics


def quality(m: dict[str, object]) -> str:
    q = m.get("test_accuracy", m.get("generated_accuracy"))
    return f"{float(q):.3f}" if isinstance(q, (int, float)) else "-"


def row(name: str, ours: dict[str, object], base: dict[str, object]) -> None:
    o, b = float(ours["samples_per_second"]), float(base["samples_per_second"])  # type: ignore[arg-type]
    print(
        f"{name:<22} {ours['device']!s:<8} {o:>10.0f}/s {b:>10.0f}/s {o / b:>7.2f}x "
        f"{quality(ours):>7} {quality(base):>7}",
        flush=True,
    )
    for note in ours["notes"]:  # type: ignore[attr-defined]
        print(f"{'':<22} {note}", flush=True)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--dataset", default="digits", choices=["digits", "mnist"])
    ap.add_argument("--epochs", type=int, default=3)
    ap.add_argument("--device", default="auto")
    ap.add_argument("--repeat-data", type=int, default=1, help="tile the training set N times (see above)")
    ap.add_argument("--jobs", default="mnist-cnn,seq-lstm,dcgan,keras-mnist", help="comma-separated")
    ap.add_argument("--variant", action="append", default=[], metavar="JOB:ARGS", help="an extra 'ours' row")
    args = ap.parse_args()
    jobs = args.jobs.split(",")
    variants: dict[str, list[list[str]]] = {}
    for v in args.variant:
        job, _, extra = v.partition(":")
        variants.setdefault(job, []).append(extra.replace(",", " ").split())
    common = ["--dataset", args.dataset, "--epochs", str(args.epochs), "--device", args.device]
    common += ["--repeat-data", str(args.repeat_data)]
    print(f"dataset {args.dataset} (training set x{args.repeat_data}), {args.epochs} epochs, device {args.device}")
    print(f"{'job':<22} {'device':<8} {'ours':>12} {'seed-style':>12} {'speedup':>8} {'quality (ours, seed)':>15}")
    failed = []
    for job, extra in CASES:
        if job not in jobs:
            continue
        try:  # a job that fails is reported and the others still run
            base = run(job, [*common, *extra], seed_style=True)
            for more in [[], *variants.get(job, [])]:
                name = f"{job} {' '.join(more)}".strip()
                row(name, run(job, [*common, *extra, *more], seed_style=False), base)
        except SystemExit as e:
            print(f"{job:<22} FAILED: {e}", flush=True)
            failed.append(job)
    if "keras-mnist" in jobs:
        keras = run("keras-mnist", [*common, "--batch-size", "256"], seed_style=False)
        print(
            f"{'keras-mnist':<22} {keras['device']!s:<8} {float(keras['samples_per_second']):>10.0f}/s "  # type: ignore[arg-type]
            f"{'(Keras fit)':>12}"
        )
    print("target on a GPU: mnist-cnn >= 3x the seed-style loop")
    if failed:
        raise SystemExit(f"failed: {', '.join(failed)}")


if __name__ == "__main__":
    main()
