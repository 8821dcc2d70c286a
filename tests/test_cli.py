"""The CLI as a user runs it: separate processes, real exit codes, no tracebacks."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
from pathlib import Path

import pytest

from orchestrator.emulator.persist import StoreFile
from tests.conftest import emulator_store

REPO = Path(__file__).resolve().parents[1]
SMOKE = REPO / "jobs" / "smoke" / "job.yaml"


def cli(*args: str, env: dict[str, str] | None = None, cwd: Path | None = None) -> subprocess.CompletedProcess[str]:
    """The CLI as a separate process, as a user runs it: no Azure or orchestrator settings, no proxy,
    no az CLI on the PATH, nothing on stdin."""
    full_env = {
        k: v for k, v in os.environ.items() if not k.startswith(("AZURE_", "ORCH_")) and "proxy" not in k.lower()
    }
    full_env["PATH"] = str(Path(sys.executable).parent) + ":/usr/bin:/bin"  # no az CLI
    full_env.update(env or {})
    return subprocess.run(
        [sys.executable, "-m", "orchestrator", *args],
        capture_output=True,
        text=True,
        env=full_env,
        cwd=cwd or REPO,
        timeout=120,
        check=False,
        stdin=subprocess.DEVNULL,
    )


def test_help_imports_no_sdk() -> None:
    code = (
        "import sys; from orchestrator.cli import main; "
        "sys.argv=['orchestrator','--help']; rc = main(); "
        "bad = [m for m in sys.modules if m.split('.')[0] in ('azure','fabric','paramiko','invoke','rich',"
        "'pydantic')]; print(bad)"
    )
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    assert out.stdout.strip().endswith("[]"), out.stdout
    assert "Exit codes" in out.stdout


def test_dry_run_shows_stages_requests_time_and_cost() -> None:
    r = cli("run", str(SMOKE), "--dry-run", "--nodes", "2")
    assert r.returncode == 0, r.stderr
    out = r.stdout
    assert "nothing is created" in out
    for text in (
        "resourceGroups",
        "virtualNetworks",
        "networkSecurityGroups",
        "virtualMachines",
        "Standard_NC4as_T4_v3",
        "10.42.0.0/16",
        "port 22",
        "orchestrator-expires=",
        "PUT",
        "DELETE",
        "Estimate",
        "/hour",
    ):
        assert text in out, text
    assert out.count("virtualMachines/smoke-") >= 2


def test_dry_run_json_is_one_document() -> None:
    r = cli("--json", "provision", str(SMOKE), "--dry-run", "--region", "westeurope")
    assert r.returncode == 0, r.stderr
    doc = json.loads(r.stdout)
    assert doc["region"] == "westeurope"
    assert [len(s) for s in doc["stages"]] == [1, 2, 1, 1]  # group; VNet + NSG; VM; its auto-shutdown
    assert doc["estimate"]["usd_per_hour"] > 0
    assert doc["requests"][0]["method"] == "PUT"
    vm = doc["stages"][2][0]["body"]
    assert vm["properties"]["osProfile"]["linuxConfiguration"]["disablePasswordAuthentication"] is True


def test_bad_job_is_exit_2_with_one_paragraph(tmp_path: Path) -> None:
    job = tmp_path / "job.yaml"
    job.write_text("name: demo\nrun: x\nresources:\n  vm_size: Standard_NC4as_T4\n")
    r = cli("run", str(job), "--dry-run")
    assert r.returncode == 2
    assert f"{job}:4: resources.vm_size: unknown VM size" in r.stderr
    assert "Traceback" not in r.stderr + r.stdout


def test_bad_flag_is_exit_2() -> None:
    r = cli("run", str(SMOKE), "--nodes", "99", "--dry-run")
    assert r.returncode == 2
    assert "Traceback" not in r.stderr


def test_no_credentials_gives_a_clear_message(tmp_path: Path) -> None:
    r = cli(
        "--state-dir", str(tmp_path), "provision", str(SMOKE), "--ssh-cidr", "203.0.113.7", env={"HOME": str(tmp_path)}
    )
    assert r.returncode == 3
    assert "No Azure subscription found" in r.stderr and "--dry-run" in r.stderr
    assert "Traceback" not in r.stderr


def test_local_target_provision_and_down_across_processes(tmp_path: Path) -> None:
    state = ["--target", "local", "--state-dir", str(tmp_path)]
    r = cli(*state, "--json", "provision", str(SMOKE), "--nodes", "2")
    assert r.returncode == 0, r.stderr
    events = [json.loads(line) for line in r.stdout.splitlines()]
    done = events[-1]
    assert done["event"] == "provisioned" and len(done["nodes"]) == 2
    run_id = done["run_id"]
    key = tmp_path / "runs" / run_id / "id_ed25519"
    assert key.stat().st_mode & 0o777 == 0o600
    status = json.loads(cli(*state, "--json", "status", run_id).stdout)
    assert status["resource_group"] == f"orch-{run_id}" and status["state"] == "kept"
    assert {r["status"] for r in status["resources"]} == {"created"}

    listed = cli(*state, "--json", "gc", "--all", "--dry-run")
    assert [g["run_id"] for g in json.loads(listed.stdout)["groups"]] == [run_id]

    r = cli(*state, "down", run_id)
    assert r.returncode == 0, r.stderr
    assert "nothing of it is left" in r.stdout
    store = emulator_store(tmp_path)
    assert store["groups"] == {} and store["resources"] == {}
    again = cli(*state, "down", run_id)
    assert again.returncode == 0 and "Nothing to delete" in again.stdout


def test_gc_removes_what_a_crashed_run_left(tmp_path: Path) -> None:
    state = ["--target", "local", "--state-dir", str(tmp_path)]
    assert cli(*state, "provision", str(SMOKE)).returncode == 0
    # Not expired yet: plain gc keeps it, --all takes it.
    assert "Nothing to collect" in cli(*state, "gc").stdout
    r = cli(*state, "gc", "--all")
    assert r.returncode == 0 and "Deleted orch-smoke-" in r.stdout
    assert emulator_store(tmp_path)["resources"] == {}


@pytest.mark.parametrize("bad", ["Bad_Run", "x"])
def test_down_with_a_malformed_run_id(tmp_path: Path, bad: str) -> None:
    r = cli("--target", "local", "--state-dir", str(tmp_path), "down", bad)
    assert r.returncode == 2 and "is not a run id" in r.stderr


def write_job(tmp_path: Path, script: str, extra: str = "") -> Path:
    job = tmp_path / "job"
    job.mkdir()
    (job / "train.py").write_text(script)
    (job / "job.yaml").write_text(f"name: clitest\nrun: python3 train.py\nsecrets: [API_TOKEN]\n{extra}")
    return job / "job.yaml"


def test_run_does_the_whole_cycle_and_leaves_nothing(tmp_path: Path) -> None:
    script = (
        "import json, os\nprint('token is', os.environ['API_TOKEN'])\nprint('lr', os.environ['LR'])\n"
        "json.dump({'acc': 0.97}, open(os.path.join(os.environ['ORCH_OUTPUT_DIR'], 'metrics.json'), 'w'))\n"
    )
    job = write_job(tmp_path, script, "env:\n  LR: '0.1'\nsetup: echo setting up\n")
    state = tmp_path / "state"
    r = cli("--target", "local", "--state-dir", str(state), "run", str(job), env={"API_TOKEN": "tok-123456"})
    assert r.returncode == 0, r.stderr
    assert "token is ****" in r.stdout and "lr 0.1" in r.stdout and "setting up" in r.stdout
    assert "acc=0.97" in r.stderr and "all resources deleted" in r.stderr
    store = emulator_store(state)
    assert store["groups"] == {} and store["resources"] == {}
    (run_folder,) = (state / "runs").iterdir()
    assert json.loads((run_folder / "artifacts" / "metrics.json").read_text()) == {"acc": 0.97}
    for path in [*state.rglob("*")]:
        if path.is_file():
            assert b"tok-123456" not in path.read_bytes(), f"secret written to {path}"


def test_a_failing_job_exits_1_and_still_brings_its_outputs_home(tmp_path: Path) -> None:
    script = (
        "import os, sys\nopen(os.path.join(os.environ['ORCH_OUTPUT_DIR'], 'partial.txt'), 'w').write('p')\n"
        "print('boom', file=sys.stderr)\nsys.exit(4)\n"
    )
    job = write_job(tmp_path, script)
    state = tmp_path / "state"
    r = cli("--target", "local", "--state-dir", str(state), "run", str(job), env={"API_TOKEN": "x"})
    assert r.returncode == 1
    assert "failed in run with exit code 4" in r.stderr and "boom" in r.stdout
    (run_folder,) = (state / "runs").iterdir()
    assert (run_folder / "artifacts" / "partial.txt").read_text() == "p"
    assert emulator_store(state)["resources"] == {}


def test_a_missing_secret_is_bad_input_before_anything_is_created(tmp_path: Path) -> None:
    job = write_job(tmp_path, "print(1)\n")
    state = tmp_path / "state"
    r = cli("--target", "local", "--state-dir", str(state), "run", str(job))
    assert r.returncode == 2 and "API_TOKEN not set in your environment" in r.stderr
    assert not StoreFile(state / "emulator" / "store.json").exists()


def test_hostile_outputs_fail_the_run_but_not_the_teardown(tmp_path: Path) -> None:
    script = "import os\nos.symlink('/etc/passwd', os.path.join(os.environ['ORCH_OUTPUT_DIR'], 'leak'))\n"
    job = write_job(tmp_path, script)
    state = tmp_path / "state"
    r = cli("--target", "local", "--state-dir", str(state), "run", str(job), env={"API_TOKEN": "x"})
    # the unsafe member is left out and named; the run ends artifacts-incomplete, never losing the rest
    assert r.returncode == 1 and "left out" in r.stderr and "link leaves the outputs" in r.stderr, r.stderr
    assert "artifacts-incomplete" in r.stderr and "all resources deleted" in r.stderr
    assert emulator_store(state)["resources"] == {}


def test_run_flags_artifacts_dir_upload_limit_and_keep(tmp_path: Path) -> None:
    script = "import os\nopen(os.path.join(os.environ['ORCH_OUTPUT_DIR'], 'out.txt'), 'w').write('o')\n"
    job = write_job(tmp_path, script)
    (job.parent / "data.bin").write_bytes(b"x" * (2 << 20))
    state = tmp_path / "state"
    base = ["--target", "local", "--state-dir", str(state), "--json", "run", str(job)]
    r = cli(*base, "--max-upload-mb", "1", env={"API_TOKEN": "x"})
    result = json.loads(r.stdout.splitlines()[-1])
    assert r.returncode == 2 and result["event"] == "result" and result["verdict"] == "bad-input"
    assert "over the 1 MB upload limit" in result["message"] and "data.bin" in result["message"]
    assert emulator_store(state)["resources"] == {}, "torn down"
    (job.parent / ".orchestratorignore").write_text("*.bin\n")
    dest = tmp_path / "mine"
    r = cli(*base, "--artifacts", str(dest), "--keep", env={"API_TOKEN": "x"})
    assert r.returncode == 0, r.stderr
    finished = json.loads(r.stdout.splitlines()[-1])
    assert finished["event"] == "result" and finished["torn_down"] is False and finished["kept"] is True
    assert finished["schema"] == 1 and finished["verdict"] == "succeeded"
    assert (dest / "out.txt").read_text() == "o"
    assert emulator_store(state)["resources"] != {}, "kept"
    assert cli("--target", "local", "--state-dir", str(state), "down", finished["run_id"]).returncode == 0
    assert emulator_store(state)["resources"] == {}


def start(args: list[str], env: dict[str, str] | None = None) -> subprocess.Popen[str]:
    full_env = {k: v for k, v in os.environ.items() if not k.startswith(("AZURE_", "ORCH_"))}
    full_env.update(env or {})
    return subprocess.Popen(
        [sys.executable, "-m", "orchestrator", *args],
        stdout=subprocess.PIPE,
        stderr=subprocess.STDOUT,
        text=True,
        env=full_env,
        cwd=REPO,
    )


def wait_for(proc: subprocess.Popen[str], text: str, seen: list[str]) -> None:
    assert proc.stdout is not None
    for line in proc.stdout:
        seen.append(line)
        if text in line:
            return
    raise AssertionError(f"never saw {text!r}:\n{''.join(seen)}")


def store_of(state: Path) -> dict[str, object]:
    return emulator_store(state)


def test_sigint_during_training_tears_down_and_kills_the_job(tmp_path: Path) -> None:
    job = write_job(
        tmp_path, "import time\nfor i in range(600):\n    print('tick', i, flush=True)\n    time.sleep(0.1)\n"
    )
    state = tmp_path / "state"
    proc = start(["--target", "local", "--state-dir", str(state), "run", str(job)], {"API_TOKEN": "x"})
    seen: list[str] = []
    wait_for(proc, "tick 3", seen)
    proc.send_signal(signal.SIGINT)
    out, _ = proc.communicate(timeout=60)
    assert proc.returncode == 130, "".join(seen) + out
    assert store_of(state)["resources"] == {} and store_of(state)["groups"] == {}
    listing = subprocess.run(["ps", "-eo", "args"], capture_output=True, text=True, check=True).stdout
    assert str(state) not in listing, "the job died with its VM"
    run = json.loads(cli("--state-dir", str(state), "--json", "ls").stdout)["runs"][0]
    assert run["state"] == "gone" and run["verdict"] == "interrupted" and run["torn_down"]
    assert run["verdict_exit_code"] == 130
    # the first Ctrl-C brought home what the job had written before tearing down
    assert "outputs written so far" in run["error"]


def test_sigterm_during_provisioning_leaves_nothing(tmp_path: Path) -> None:
    state = tmp_path / "state"
    slow = {"ORCH_EMULATOR_PROFILE": "azure-like", "ORCH_EMULATOR_SPEED": "20"}
    proc = start(["--target", "local", "--state-dir", str(state), "provision", str(SMOKE)], slow)
    seen: list[str] = []
    wait_for(proc, "creating  virtualMachines", seen)
    proc.send_signal(signal.SIGTERM)
    out, _ = proc.communicate(timeout=120)
    assert proc.returncode == 130, "".join(seen) + out
    assert store_of(state)["groups"] == {} and store_of(state)["resources"] == {}


def test_sigkill_during_provisioning_then_gc_removes_everything(tmp_path: Path) -> None:
    state = tmp_path / "state"
    slow = {"ORCH_EMULATOR_PROFILE": "azure-like", "ORCH_EMULATOR_SPEED": "20"}
    proc = start(["--target", "local", "--state-dir", str(state), "provision", str(SMOKE)], slow)
    seen: list[str] = []
    wait_for(proc, "creating  virtualMachines", seen)
    proc.kill()
    proc.wait(timeout=30)
    left = store_of(state)
    assert left["groups"] and left["resources"], "a killed process leaves what it created, as on Azure"
    status = cli("--target", "local", "--state-dir", str(state), "status")
    assert "provisioning (process gone)" in status.stdout and "orchestrator down RUN" in status.stdout
    r = cli("--target", "local", "--state-dir", str(state), "gc", "--all")
    assert r.returncode == 0 and "Deleted orch-smoke-" in r.stdout, r.stdout + r.stderr
    assert store_of(state)["groups"] == {} and store_of(state)["resources"] == {}
    assert "Nothing running" in cli("--target", "local", "--state-dir", str(state), "status").stdout


def test_iterating_on_a_kept_vm_with_separate_commands(tmp_path: Path) -> None:
    script = (
        "import os\nprint('version', open('VERSION').read().strip())\n"
        "open(os.path.join(os.environ['ORCH_OUTPUT_DIR'], 'v.txt'), 'w').write(open('VERSION').read())\n"
    )
    job = write_job(tmp_path, script)
    (job.parent / "VERSION").write_text("1\n")
    local = ["--target", "local", "--state-dir", str(tmp_path / "state")]
    env = {"API_TOKEN": "x"}
    assert cli(*local, "provision", str(job), env=env).returncode == 0
    run_id = json.loads(cli(*local, "--json", "ls").stdout)["runs"][0]["run_id"]
    first = cli(*local, "train", run_id, env=env)
    assert first.returncode == 0 and "version 1" in first.stdout, first.stderr
    (job.parent / "VERSION").write_text("2\n")
    second = cli(*local, "train", run_id, env=env)
    assert second.returncode == 0 and "version 2" in second.stdout and "sent 1 files" in second.stderr
    r = cli(*local, "exec", run_id, "--", "cat", "VERSION", env=env)
    assert r.returncode == 0 and r.stdout.strip() == "2"
    assert cli(*local, "exec", run_id, "--", "false", env=env).returncode == 1
    r = cli(*local, "collect", run_id)
    assert r.returncode == 0 and (tmp_path / "state" / "runs" / run_id / "artifacts" / "v.txt").read_text() == "2\n"
    assert cli(*local, "down", run_id).returncode == 0
    assert "Nothing running" in cli(*local, "status").stdout
    assert cli(*local, "train", run_id, env=env).returncode == 2  # torn down: a clear message, no traceback


def test_metric_gates_decide_the_exit_code(tmp_path: Path) -> None:
    script = (
        "import json, os\n"
        "json.dump({'acc': 0.95}, open(os.path.join(os.environ['ORCH_OUTPUT_DIR'], 'metrics.json'), 'w'))\n"
    )
    job = write_job(tmp_path, script, "expect:\n  acc: '>= 0.99'\n")
    base = ["--target", "local", "--state-dir", str(tmp_path / "state"), "run", str(job)]
    r = cli(*base, env={"API_TOKEN": "x"})
    assert r.returncode == 1 and "missed the gates" in r.stderr and "acc = 0.95, needs >= 0.99" in r.stderr
    r = cli(*base, "--expect", "acc>=0.9", env={"API_TOKEN": "x"})
    assert r.returncode == 0 and "gate acc = 0.95, needs >= 0.9: ok" in r.stderr
    r = cli(*base, "--expect", "acc is high", env={"API_TOKEN": "x"})
    assert r.returncode == 2 and "--expect" in r.stderr


def test_the_budget_stops_and_tears_down_a_run(tmp_path: Path) -> None:
    job = write_job(
        tmp_path, "import time\nprint('training', flush=True)\ntime.sleep(120)\n", "budget_usd: 0.0004\n"
    )  # at $0.531/h: about 2.7 s
    state = tmp_path / "state"
    r = cli("--target", "local", "--state-dir", str(state), "run", str(job), env={"API_TOKEN": "x"})
    assert r.returncode == 1, r.stderr
    assert "projected cost would pass budget_usd $0.00" in r.stderr and "Stopped and torn down" in r.stderr
    assert store_of(state)["resources"] == {} and store_of(state)["groups"] == {}


def test_azure_runs_refuse_ssh_open_to_everyone_unless_asked(tmp_path: Path) -> None:
    r = cli("--state-dir", str(tmp_path), "provision", str(SMOKE), env={"AZURE_SUBSCRIPTION_ID": "x"})
    assert r.returncode == 2 and "ssh.allowed_cidrs is empty" in r.stderr and "--ssh-cidr auto" in r.stderr


def test_step_summary_for_github_actions(tmp_path: Path) -> None:
    script = (
        "import json, os\n"
        "json.dump({'acc': 0.97}, open(os.path.join(os.environ['ORCH_OUTPUT_DIR'], 'metrics.json'), 'w'))\n"
    )
    job = write_job(tmp_path, script, "expect:\n  acc: '>= 0.9'\n")
    summary = tmp_path / "summary.md"
    r = cli(
        "--target",
        "local",
        "--state-dir",
        str(tmp_path / "state"),
        "run",
        str(job),
        env={"API_TOKEN": "x", "GITHUB_STEP_SUMMARY": str(summary)},
    )
    assert r.returncode == 0, r.stderr
    text = summary.read_text()
    assert text.startswith("## orchestrator run `clitest-") and ": succeeded" in text
    for part in (
        "| provision |  |",
        "| train |  |",
        "| virtualMachines |",
        "| acc | 0.97 |",
        "| acc | 0.97 | >= 0.9 | pass |",
        "all resources deleted",
        "of compute",
    ):
        assert part in text, part


def test_the_nightly_workflow_passes_actionlint() -> None:
    import shutil

    binary = shutil.which("actionlint") or str(Path(sys.executable).parent / "actionlint")
    if not Path(binary).exists():
        pytest.skip("actionlint is not installed (it comes with the dev extra)")
    workflow = REPO / ".github" / "workflows" / "nightly.yml"
    r = subprocess.run([binary, str(workflow)], capture_output=True, text=True, check=False)
    assert r.returncode == 0, r.stdout + r.stderr
    text = workflow.read_text()
    assert "id-token: write" in text and "if: always()" in text and "orchestrator gc" in text
    assert "secrets." not in text, "OIDC: no secret in the workflow"


def test_emulator_status_and_reset(tmp_path: Path) -> None:
    state = ["--state-dir", str(tmp_path)]
    assert "holds nothing" in cli(*state, "emulator", "status").stdout
    assert cli(*state, "--target", "local", "provision", str(SMOKE)).returncode == 0
    held = json.loads(cli(*state, "--json", "emulator", "status").stdout)
    assert len(held["groups"]) == 1 and held["vms"][0]["state"] == "Succeeded"
    assert Path(held["vms"][0]["folder"]).is_dir()
    r = cli(*state, "emulator", "reset", "--yes")
    assert r.returncode == 0 and "deleted 1 resource group" in r.stdout
    assert "holds nothing" in cli(*state, "emulator", "status").stdout
    assert not Path(held["vms"][0]["folder"]).exists()
