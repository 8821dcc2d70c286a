"""Issue 11's promises through the CLI, as a user meets them: outputs come home without harming
anything else, secrets never land anywhere in clear."""

from __future__ import annotations

import json
from pathlib import Path

from tests.conftest import emulator_store
from tests.test_cli import cli

PEM = (
    "-----BEGIN OPENSSH PRIVATE KEY-----\n"
    "b3BlbnNzaC1rZXktdjEAAAAABG5vbmUAAAAEbm9uZQAAAAAAAAABAAAAMwAAAAtzc2gtZW\n"
    "QyNTUxOQAAACBXq7b3Jm1pbGxpb25zT2ZCeXRlc1dvdWxkTm90RG9JdEhlcmUAAAAAAA==\n"
    "-----END OPENSSH PRIVATE KEY-----"
)
TOKEN = "tok-" + "9f8e7d6c5b4a" * 3


def test_artifacts_into_the_current_directory_never_delete_it(tmp_path: Path) -> None:
    work = tmp_path / "work"
    work.mkdir()
    (work / "train.py").write_text(
        "import os\nopen(os.path.join(os.environ['ORCH_OUTPUT_DIR'], 'result.txt'), 'w').write('42')\n"
    )
    (work / "job.yaml").write_text("name: cwd\nrun: python3 train.py\n")
    (work / "notes.txt").write_text("mine, not the tool's")
    r = cli("--target", "local", "--state-dir", str(tmp_path / "state"), "--json", "run", "job.yaml",
            "--artifacts", ".", cwd=work)  # fmt: skip
    assert r.returncode == 0, r.stderr
    result = json.loads(r.stdout.splitlines()[-1])
    assert (work / "notes.txt").read_text() == "mine, not the tool's" and (work / "train.py").exists()
    assert Path(result["artifacts"]) == work / result["run_id"]
    assert (work / result["run_id"] / "result.txt").read_text() == "42"


def test_secrets_never_reach_the_terminal_the_json_events_the_logs_or_any_file(tmp_path: Path) -> None:
    work = tmp_path / "work"
    work.mkdir()
    # A PEM key printed whole, and a token split across the 64 KiB flush of output without newlines.
    (work / "train.py").write_text(
        "import os, sys, time\n"
        "print(os.environ['PEM_KEY'], flush=True)\n"
        "t = os.environ['API_TOKEN']\n"
        "sys.stdout.write('x' * (65536 - 7) + t[:11]); sys.stdout.flush(); time.sleep(0.3)\n"
        "sys.stdout.write(t[11:] + ' end\\n'); sys.stdout.flush()\n"
    )
    (work / "job.yaml").write_text("name: secret\nrun: python3 train.py\nsecrets: [PEM_KEY, API_TOKEN]\n")
    state = tmp_path / "state"
    env = {"PEM_KEY": PEM, "API_TOKEN": TOKEN}
    plain = cli("--target", "local", "--state-dir", str(state), "run", str(work / "job.yaml"), env=env)
    events = cli("--target", "local", "--state-dir", str(state), "--json", "run", str(work / "job.yaml"), env=env)
    assert plain.returncode == 0 and events.returncode == 0, plain.stderr + events.stderr
    run_ids = [json.loads(line)["run_id"] for line in events.stdout.splitlines() if '"event": "result"' in line]
    logs = cli("--state-dir", str(state), "logs", run_ids[0])
    # the key's own lines (its BEGIN/END armour is in every key file, secret or not)
    secret_lines = [line for line in PEM.splitlines() if not line.startswith("-----")] + [TOKEN]
    seen = {"terminal": plain.stdout + plain.stderr, "json events": events.stdout, "logs": logs.stdout}
    for path in state.rglob("*"):
        if path.is_file():
            seen[str(path)] = path.read_bytes().decode(errors="replace")
    for where, text in seen.items():
        for secret in secret_lines:
            assert secret not in text, f"a secret in clear in {where}"
    assert "****" in plain.stdout and " end" in plain.stdout


def _provisioned(tmp_path: Path) -> tuple[list[str], str]:
    state = ["--target", "local", "--state-dir", str(tmp_path / "state")]
    job = tmp_path / "job"
    job.mkdir()
    (job / "job.yaml").write_text("name: paying\nrun: 'true'\n")
    r = cli(*state, "--json", "provision", str(job / "job.yaml"))
    assert r.returncode == 0, r.stderr
    return state, json.loads(r.stdout.splitlines()[-1])["run_id"]


def _groups(tmp_path: Path) -> dict[str, object]:
    return dict(emulator_store(tmp_path / "state")["groups"])


def test_down_works_with_a_corrupt_store(tmp_path: Path) -> None:
    state, run_id = _provisioned(tmp_path)
    (tmp_path / "state" / "runs.db").write_bytes(b"garbage" * 1000)
    for suffix in ("-wal", "-shm"):
        (tmp_path / "state" / f"runs.db{suffix}").unlink(missing_ok=True)
    listing = cli(*state, "ls")
    assert listing.returncode == 1 and "cannot be read" in listing.stderr and "Traceback" not in listing.stderr
    assert "orchestrator down RUN" in listing.stderr, "the paragraph says how to recover"
    down = cli(*state, "down", run_id)
    assert down.returncode == 0, down.stderr
    assert _groups(tmp_path) == {}, "found by its tag and deleted"


def test_down_works_with_a_missing_store_and_a_mistyped_id_is_bad_input(tmp_path: Path) -> None:
    state, run_id = _provisioned(tmp_path)
    for name in ("runs.db", "runs.db-wal", "runs.db-shm"):
        (tmp_path / "state" / name).unlink(missing_ok=True)
    mistyped = cli(*state, "down", run_id[:-1] + ("x" if run_id[-1] != "x" else "y"))
    assert mistyped.returncode == 2 and "no run" in mistyped.stderr
    assert cli(*state, "down", run_id).returncode == 0
    assert _groups(tmp_path) == {}


def test_a_read_only_store_is_one_paragraph_and_down_still_works(tmp_path: Path) -> None:
    import os

    state, run_id = _provisioned(tmp_path)
    db = tmp_path / "state" / "runs.db"
    for name in ("runs.db-wal", "runs.db-shm"):
        (tmp_path / "state" / name).unlink(missing_ok=True)
    os.chmod(db, 0o400)
    try:
        if os.access(db, os.W_OK):  # root writes anyway: make the store unreadable as a database instead
            db.write_bytes(b"\0" * 4096)
        listing = cli(*state, "ls")
        assert listing.returncode != 0 and "internal error" not in listing.stderr, listing.stderr
        assert "run store" in listing.stderr and "Traceback" not in listing.stderr
        down = cli(*state, "down", run_id)
        assert down.returncode == 0, down.stderr
    finally:
        os.chmod(db, 0o600)
    assert _groups(tmp_path) == {}
