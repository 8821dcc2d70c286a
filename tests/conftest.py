from __future__ import annotations

from collections.abc import Callable
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

import pytest

from orchestrator.azure.session import AzureSession
from orchestrator.clock import VirtualClock
from orchestrator.emulator import Emulator
from orchestrator.plan import ResourcePlan, build_plan
from orchestrator.spec import JobSpec
from orchestrator.targets.emulated import emulator_session

pytest_plugins = ["tests.remote_fixtures"]

SUB = "22222222-2222-2222-2222-222222222222"
KEY = "ssh-ed25519 AAAAC3NzaC1lZDI1NTE5AAAAIGk2Q0t9dTestKeyForTheEmulatorOnly0000000000000 test"
NOW = datetime(2026, 3, 1, 12, 0, tzinfo=UTC)


@pytest.fixture(autouse=True)
def _private_user_dirs(tmp_path_factory: pytest.TempPathFactory, monkeypatch: pytest.MonkeyPatch) -> None:
    """A developer's own price cache (`gpus --refresh`) or state must not change what a test sees."""
    monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path_factory.mktemp("cache")))
    monkeypatch.setenv("XDG_STATE_HOME", str(tmp_path_factory.mktemp("state")))


@pytest.fixture
def clock() -> VirtualClock:
    return VirtualClock(NOW.timestamp())


@pytest.fixture
def emu(clock: VirtualClock) -> Emulator:
    return Emulator("instant", clock=clock)


@pytest.fixture
def session(emu: Emulator) -> AzureSession:
    return emulator_session(emu, subscription=SUB)


def emulator_store(state: Path) -> dict[str, Any]:
    """What the local target's emulator holds on disk under a state directory, as one JSON-able
    dict (its groups, resources, operations...), read under its lock."""
    import json

    from orchestrator.emulator.persist import StoreFile

    store = StoreFile(state / "emulator" / "store.json")
    with store.locked():
        return dict(json.loads(store.load().to_json()))


def make_spec(**fields: Any) -> JobSpec:
    data: dict[str, Any] = {"name": "demo", "run": "python train.py"}
    data.update(fields)
    return JobSpec.model_validate(data)


def make_plan(spec: JobSpec | None = None, run_id: str = "demo-abc123", **kw: Any) -> ResourcePlan:
    return build_plan(
        spec or make_spec(), run_id, subscription_id=SUB, owner="tester", now=NOW, ssh_public_key=KEY, **kw
    )


@pytest.fixture
def job_dir(tmp_path: Path) -> Callable[[str], Path]:
    """Write a job.yaml (and a train.py) into a fresh folder; returns the job.yaml path."""

    def write(text: str) -> Path:
        (tmp_path / "train.py").write_text("print('hi')\n")
        path = tmp_path / "job.yaml"
        path.write_text(text)
        return path

    return write


# Modules whose tests run whole cycles as separate CLI processes (seconds each): the `slow` tier, which
# `make test` runs and `make test-fast` skips. Unit, emulator and single-step SSH tests stay fast.
SLOW_MODULES = frozenset(
    {
        "test_cli.py",
        "test_data_safety.py",
        "test_local_vm.py",
        "test_cost.py",
        "test_commands_ssh.py",
        "test_install.py",
    }
)


def pytest_collection_modifyitems(config: pytest.Config, items: list[pytest.Item]) -> None:
    for item in items:
        # whole modules of CLI cycles, and elsewhere the tests that start the CLI as a process
        if item.path.name in SLOW_MODULES or item.name.startswith("test_cli"):
            item.add_marker(pytest.mark.slow)


_WORKERS_CHECKED: list[int] = []  # under pytest-xdist: what each worker process checked


def pytest_sessionfinish(session: pytest.Session) -> None:
    from orchestrator.emulator import openapi

    workeroutput = getattr(session.config, "workeroutput", None)
    if workeroutput is not None:  # an xdist worker: hand the count to the controller
        workeroutput["arm_bodies_checked"] = openapi.BODIES_CHECKED[0]


@pytest.hookimpl(optionalhook=True)
def pytest_testnodedown(node: Any, error: Any) -> None:
    _WORKERS_CHECKED.append(int(getattr(node, "workeroutput", {}).get("arm_bodies_checked", 0)))


def pytest_terminal_summary(terminalreporter: Any) -> None:
    """How many ARM request bodies the test processes held to Microsoft's specs (CLI subprocesses
    check theirs too; they are not counted here)."""
    from orchestrator.emulator import openapi

    checked = openapi.BODIES_CHECKED[0] + sum(_WORKERS_CHECKED)
    terminalreporter.write_line(f"ARM request bodies checked against the REST specs in-process: {checked}")
