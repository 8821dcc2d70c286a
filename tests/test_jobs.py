"""The example jobs train for real, offline, on CPU: thresholds, outputs, exact resume, torchrun."""

from __future__ import annotations

import json
import os
import re
import subprocess
import sys
from pathlib import Path

import pytest
import yaml

pytest.importorskip("torch")
pytest.importorskip("sklearn")

JOBS = Path(__file__).resolve().parents[1] / "jobs"


def train(job: str, tmp: Path, *args: str, launcher: list[str] | None = None) -> tuple[dict[str, object], str]:
    env = {
        **os.environ,
        "ORCH_OUTPUT_DIR": str(tmp / "out"),
        "ORCH_CHECKPOINT_DIR": str(tmp / "ckpt"),
        "OMP_NUM_THREADS": "2",
        "KERAS_BACKEND": "torch",
    }
    cmd = [*(launcher or [sys.executable]), str(JOBS / job / "train.py"), "--dataset", "digits", *args]
    out = subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=300, check=False, cwd=JOBS)
    assert out.returncode == 0, out.stdout[-2000:] + out.stderr[-3000:]
    metrics_file = tmp / "out" / "metrics.json"
    metrics = json.loads(metrics_file.read_text()) if metrics_file.exists() else {}
    return metrics, out.stdout


TRAINED = ["mnist-cnn", "seq-lstm", "dcgan", "keras-mnist"]
OUTPUTS = {
    "mnist-cnn": ["model.pt", "curves.png"],
    "seq-lstm": ["model.pt", "curves.png"],
    "dcgan": ["generator.pt", "samples.png", "curves.png"],
    "keras-mnist": ["model.keras", "curves.png"],
}
GATE_RE = re.compile(r">=\s*(\d+(?:\.\d+)?)")


def job_gate(job: str) -> tuple[str, float]:
    """The metric and level job.yaml gates on (each example has one `expect`, all of them `>=`)."""
    expect = yaml.safe_load((JOBS / job / "job.yaml").read_text())["expect"]
    assert len(expect) == 1, expect
    ((metric, cond),) = expect.items()
    m = GATE_RE.fullmatch(str(cond).strip())
    assert m, cond
    return metric, float(m.group(1))


def readme_levels(job: str) -> tuple[float, float]:
    """(the job.yaml row's level, the offline row's level) from the README's table."""
    rows = [line for line in (JOBS / job / "README.md").read_text().splitlines() if line.startswith("|")]
    gate = [r for r in rows if "job.yaml" in r]
    offline = [r for r in rows if "offline" in r]
    assert len(gate) == 1 and len(offline) == 1, rows
    return float(GATE_RE.findall(gate[0])[-1]), float(GATE_RE.findall(offline[0])[-1])


@pytest.mark.slow
@pytest.mark.parametrize("job", TRAINED)
def test_each_job_clears_its_documented_offline_gate(tmp_path: Path, job: str) -> None:
    """The README's offline command (python JOB/train.py --dataset digits, the job's defaults) reaches
    the offline level its README documents, on the metric its job.yaml gates on."""
    metric, _ = job_gate(job)
    _, offline = readme_levels(job)
    metrics, _ = train(job, tmp_path)
    assert float(metrics[metric]) >= offline, (job, metric, offline, metrics)  # type: ignore[arg-type]
    for name in OUTPUTS[job]:
        assert (tmp_path / "out" / name).stat().st_size > 0, name
    assert list((tmp_path / "ckpt").iterdir()), "checkpoints are written under ORCH_CHECKPOINT_DIR"


def test_smoke_job_passes_its_gate(tmp_path: Path) -> None:
    env = {**os.environ, "ORCH_OUTPUT_DIR": str(tmp_path / "out")}
    cmd = [sys.executable, "smoke.py"]
    out = subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=60, check=False, cwd=JOBS / "smoke")
    assert out.returncode == 0, out.stderr[-2000:]
    metric, level = job_gate("smoke")
    metrics = json.loads((tmp_path / "out" / "metrics.json").read_text())
    assert float(metrics[metric]) >= level, metrics
    assert json.loads((tmp_path / "out" / "machine.json").read_text())["cpus"]


@pytest.mark.parametrize("job", TRAINED)
def test_readme_documents_the_job_yaml_gate_and_offline_commands_gate_on_the_offline_level(job: str) -> None:
    """The README's job.yaml row states job.yaml's gate; an offline orchestrator command (digits) must
    replace that MNIST-level gate with the offline level by --expect, or it would fail its own gate."""
    metric, level = job_gate(job)
    documented, offline = readme_levels(job)
    assert documented == level, (job, documented, level)
    assert offline <= level
    readme = (JOBS / job / "README.md").read_text() + (JOBS / job / "job.yaml").read_text()
    local = [line for line in readme.splitlines() if "orchestrator" in line and "DATASET=digits" in line]
    for line in local:
        gates = re.findall(r"--expect\s+'([\w.]+)>=([\d.]+)'", line)
        assert gates == [(metric, f"{offline:g}")], (job, line)


def _comparable(metrics: dict[str, object]) -> dict[str, object]:
    return {k: v for k, v in metrics.items() if k != "samples_per_second"}


@pytest.mark.slow
@pytest.mark.parametrize(
    ("job", "args", "stop"),
    [
        ("mnist-cnn", ["--epochs", "3"], "30"),  # mid-epoch: 23 steps per epoch
        ("dcgan", ["--epochs", "3", "--checkpoint-every", "10"], "35"),
        ("keras-mnist", ["--epochs", "3"], "2"),  # Keras resumes at epoch boundaries
    ],
)
def test_an_interrupted_and_resumed_run_ends_exactly_like_an_uninterrupted_one(
    tmp_path: Path, job: str, args: list[str], stop: str
) -> None:
    straight, _ = train(job, tmp_path / "straight", *args)
    partial, out = train(job, tmp_path / "resumed", *args, "--stop-after", stop)
    assert not partial and "stopped early" in out
    resumed, out = train(job, tmp_path / "resumed", *args)
    assert "resumed from" in out
    assert _comparable(resumed) == _comparable(straight)


@pytest.mark.slow
def test_two_process_torchrun_with_gloo_and_only_rank_0_writes(tmp_path: Path) -> None:
    launcher = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc-per-node", "2"]
    metrics, out = train("mnist-cnn", tmp_path, "--epochs", "2", launcher=launcher)
    assert metrics["world_size"] == 2
    assert out.count("metrics {") == 1, "only rank 0 reports"
    assert out.count("epoch 2/2") == 1
    # rank 0 writes the outputs; each rank adds only its own report (rank, world size, weights digest)
    names = sorted(p.name for p in (tmp_path / "out").iterdir())
    assert names == ["curves.png", "metrics.json", "model.pt", "rank-0.json", "rank-1.json"]
    reports = [json.loads((tmp_path / "out" / f"rank-{r}.json").read_text()) for r in (0, 1)]
    assert [(x["rank"], x["world_size"]) for x in reports] == [(0, 2), (1, 2)]
    assert reports[0]["weights_sha256"] == reports[1]["weights_sha256"], "DDP keeps the ranks' weights identical"


def test_idx_reader_parses_mnist_format(tmp_path: Path) -> None:
    import gzip
    import struct

    sys.path.insert(0, str(JOBS / "common"))
    import trainkit

    raw = struct.pack(">HBB", 0, 8, 3) + struct.pack(">III", 2, 3, 4) + bytes(range(24))
    (tmp_path / "x-idx3-ubyte.gz").write_bytes(gzip.compress(raw))
    arr = trainkit.read_idx(tmp_path / "x-idx3-ubyte.gz")
    assert arr.shape == (2, 3, 4) and int(arr[1, 2, 3]) == 23
    (tmp_path / "bad").write_bytes(struct.pack(">HBB", 0, 0x0D, 1) + b"\0" * 8)
    with pytest.raises(ValueError):
        trainkit.read_idx(tmp_path / "bad")


@pytest.mark.parametrize("job", ["mnist-cnn", "seq-lstm", "dcgan", "keras-mnist"])
def test_job_files_are_valid_and_gate_on_the_published_level(job: str) -> None:
    from orchestrator.spec import load_spec

    spec = load_spec(JOBS / job / "job.yaml")
    assert spec.resources.size.is_gpu and spec.expect
    # The VM installs the pinned requirements with uv while it boots; `setup` no longer pip-installs.
    assert spec.python is not None and spec.python.requirements == f"{job}/requirements.txt", spec.python
    assert spec.python.version == "3.11"
    assert not any("pip" in command or "requirements" in command for command in spec.setup), spec.setup
    reqs = (JOBS / job / "requirements.txt").read_text().splitlines()
    assert all("==" in line for line in reqs if line and not line.startswith("#")), "pinned"
    metric, level = job_gate(job)
    assert list(spec.expect) == [metric]
    assert level == {"mnist-cnn": 0.99, "seq-lstm": 0.98, "dcgan": 0.90, "keras-mnist": 0.98}[job], "published"


def test_the_smoke_job_checks_the_install_path_with_an_empty_environment() -> None:
    from orchestrator.spec import load_spec

    spec = load_spec(JOBS / "smoke" / "job.yaml")
    assert spec.python is not None and spec.python.requirements == "requirements.txt" and not spec.setup
    listed = (JOBS / "smoke" / "requirements.txt").read_text().splitlines()
    assert not [line for line in listed if line.strip() and not line.startswith("#")], "standard library only"


@pytest.mark.parametrize("job", ["mnist-cnn", "seq-lstm", "dcgan", "keras-mnist", "smoke"])
def test_job_readmes_say_how_packages_arrive(job: str) -> None:
    readme = (JOBS / job / "README.md").read_text()
    assert "python: {requirements:" in readme and "--phase install" in readme
    assert "pip install" not in readme
