"""The SSH runner against emulated VMs (asyncssh) and a real OpenSSH sshd on loopback."""

from __future__ import annotations

import io
import os
import tarfile
import threading
import time
from pathlib import Path

import pytest

from orchestrator.remote import artifacts, run, sync
from orchestrator.remote.connect import ConnectOptions, Endpoint, HostKeyMismatch, Node, SshError, connect
from orchestrator.remote.layout import RemoteLayout
from orchestrator.sshkeys import generate_host_key, generate_keypair
from tests.remote_fixtures import FAST, EmulatedVms, Sshd, start_vms

# ---------------------------------------------------------------------------------------- connect


@pytest.mark.slow
def test_connect_waits_through_the_boot_delay(tmp_path: Path) -> None:
    import json

    env = start_vms(tmp_path, boot_seconds=3.0)
    try:
        ep = env.nodes[0].ep
        attempts = []
        conn = connect(ep, FAST, sleep=lambda s: (attempts.append(s), time.sleep(s))[1])
        booted = json.loads((env.target.vms_dir / ep.name / "vm.json").read_text())["boot_after"]
        assert time.time() >= booted, "connected only once the VM had booted"
        assert attempts, "the first attempts during boot must have been refused and retried"
        conn.close()
    finally:
        env.close()


def test_a_wrong_host_key_is_refused_never_accepted(vms: EmulatedVms) -> None:
    ep = vms.nodes[0].ep
    impostor = Endpoint(ep.name, ep.host, ep.port, ep.user, generate_host_key().public, ep.key_file)
    with pytest.raises(HostKeyMismatch, match="not the key generated for it"):
        connect(impostor, FAST)


@pytest.mark.slow  # a VM of its own (~1.5 s)
def test_the_vm_answers_with_each_host_key_its_custom_data_carried(vms: EmulatedVms) -> None:
    """A client that asks for RSA (an older OpenSSH, an editor's SSH library) gets the RSA key the
    VM's cloud-init carried, signed with its private half; one that asks for ed25519, the pinned key."""
    import socket

    import paramiko

    from orchestrator.emulator.cloudinit import parse_cloud_init

    ep = vms.nodes[0].ep
    carried = parse_cloud_init(vms.keys.custom_data[0])["ssh_keys"]
    for key_type, expected in (("rsa-sha2-512", carried["rsa_public"]), ("ssh-ed25519", ep.host_key)):
        transport = paramiko.Transport(socket.create_connection((ep.host, ep.port), timeout=10))
        try:
            transport.get_security_options().key_types = [key_type]
            transport.start_client(timeout=10)  # fails unless the server signs with that key
            key = transport.get_remote_server_key()
            assert f"{key.get_name()} {key.get_base64()}" == " ".join(expected.split()[:2])
        finally:
            transport.close()


@pytest.mark.slow  # a VM of its own (~1.5 s)
def test_commands_are_not_held_back_by_nagle(vms: EmulatedVms) -> None:
    """Each command is a few small SSH packets: with Nagle's algorithm on, each waited ~40 ms for a
    delayed ACK. The connection's socket has TCP_NODELAY."""
    import socket

    node = vms.nodes[0]
    assert node.run("true", "a command").exit_code == 0
    assert node.transport().sock.getsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY) != 0


def test_a_wrong_client_key_is_refused(vms: EmulatedVms, tmp_path: Path) -> None:
    other, _ = generate_keypair(tmp_path, "other")
    ep = vms.nodes[0].ep
    with pytest.raises(SshError, match="refused the run's SSH key"):
        connect(Endpoint(ep.name, ep.host, ep.port, ep.user, ep.host_key, other), FAST)


def test_connect_gives_up_at_the_deadline(tmp_path: Path) -> None:
    key, _ = generate_keypair(tmp_path)
    ep = Endpoint("nowhere", "127.0.0.1", 9, "me", generate_host_key().public, key)  # port 9: refused
    with pytest.raises(SshError, match="did not answer SSH within"):
        connect(ep, ConnectOptions(deadline_s=0.5, first_backoff_s=0.05))


def test_commands_run_in_the_vm_home_with_exit_codes(vms: EmulatedVms) -> None:
    result = vms.nodes[0].exec("pwd; echo oops >&2; exit 7")
    assert result.exit_code == 7
    assert result.text.strip() == str(vms.home())
    assert result.stderr == b"oops\n"


# ------------------------------------------------------------------------------------------- sync


def make_tree(root: Path) -> None:
    (root / "src").mkdir(parents=True)
    (root / "src" / "model.py").write_text("print('model')\n")
    (root / "train.py").write_text("print('train')\n")
    (root / "data").mkdir()
    (root / "data" / "big.bin").write_bytes(os.urandom(1000))
    (root / "notes.tmp").write_text("scratch")
    (root / "keep.log").write_text("kept by negation")
    (root / ".gitignore").write_text("data/\n*.log\n!keep.log\n")
    (root / ".orchestratorignore").write_text("*.tmp\n")
    (root / ".git").mkdir()
    (root / ".git" / "config").write_text("[core]")
    (root / "run.sh").write_text("#!/bin/sh\necho hi\n")
    (root / "run.sh").chmod(0o755)


def remote_files(home: Path, layout: RemoteLayout) -> dict[str, bytes]:
    job = home / layout.job_dir.removeprefix("~/")
    return {str(p.relative_to(job)): p.read_bytes() for p in sorted(job.rglob("*")) if p.is_file()}


def test_sync_honours_gitignore_and_orchestratorignore(vms: EmulatedVms, tmp_path: Path) -> None:
    root = tmp_path / "work"
    make_tree(root)
    report, _ = sync.upload(vms.nodes[0], root, vms.layout)
    files = remote_files(vms.home(), vms.layout)
    assert sorted(files) == [".gitignore", ".orchestratorignore", "keep.log", "run.sh", "src/model.py", "train.py"]
    assert report.sent_files == 6 and report.compressed
    job = vms.home() / vms.layout.job_dir.removeprefix("~/")
    assert os.access(job / "run.sh", os.X_OK), "file modes travel with the files"


def test_resync_sends_only_changes_and_removes_deleted_files(vms: EmulatedVms, tmp_path: Path) -> None:
    root = tmp_path / "work"
    make_tree(root)
    _, entries = sync.upload(vms.nodes[0], root, vms.layout)
    (root / "train.py").write_text("print('train v2')\n")
    (root / "src" / "model.py").unlink()
    (root / "src" / "new.py").write_text("new\n")
    report, _ = sync.upload(vms.nodes[0], root, vms.layout, previous=entries)
    assert (report.sent_files, report.deleted) == (2, 1)
    files = remote_files(vms.home(), vms.layout)
    assert files["train.py"] == b"print('train v2')\n" and "src/model.py" not in files and "src/new.py" in files
    again, _ = sync.upload(vms.nodes[0], root, vms.layout)
    assert (again.sent_files, again.deleted) == (0, 0)
    assert "up to date" in again.summary()


def test_resync_trusts_its_last_state_only_while_the_vm_manifest_matches(vms: EmulatedVms, tmp_path: Path) -> None:
    root = tmp_path / "work"
    make_tree(root)
    _, state = sync.upload(vms.nodes[0], root, vms.layout)
    # Someone changes the VM behind our back: a file and the manifest are gone.
    job = vms.home() / vms.layout.job_dir.removeprefix("~/")
    (job / "train.py").unlink()
    (job.parent / "sync-manifest.json").unlink()
    report, _ = sync.upload(vms.nodes[0], root, vms.layout, previous=state)
    assert report.sent_files == 6, "the stale guard refused our belief and everything was sent again"
    assert (job / "train.py").exists()


@pytest.fixture
def small_ranges(monkeypatch: pytest.MonkeyPatch) -> None:
    """Files of 1 MB count as large and go in 1 MB ranges, so tests need no 16 MB files."""
    monkeypatch.setattr(sync, "LARGE_FILE", 1 << 20)
    monkeypatch.setattr(sync, "CHUNK", 1 << 20)


@pytest.mark.usefixtures("small_ranges")
def test_large_files_go_in_parallel_ranges_and_arrive_intact(vms: EmulatedVms, tmp_path: Path) -> None:
    root = tmp_path / "work"
    root.mkdir()
    blob = os.urandom((3 << 20) + 12345)
    (root / "weights.bin").write_bytes(blob)
    (root / "a.py").write_text("x = 1\n")
    sync.upload(vms.nodes[0], root, vms.layout)
    assert remote_files(vms.home(), vms.layout)["weights.bin"] == blob
    (root / "weights.bin").write_bytes(blob[: 1 << 20])  # shrinks: the remote copy must too
    sync.upload(vms.nodes[0], root, vms.layout)
    assert remote_files(vms.home(), vms.layout)["weights.bin"] == blob[: 1 << 20]


def test_the_size_limit_stops_a_runaway_upload(vms: EmulatedVms, tmp_path: Path) -> None:
    root = tmp_path / "work"
    root.mkdir()
    (root / "dataset.bin").write_bytes(b"x" * 5000)
    from orchestrator.errors import UserInputError

    with pytest.raises(UserInputError, match=r"over the 0 MB upload limit.*dataset.bin"):
        sync.upload(vms.nodes[0], root, vms.layout, limit=1000)


@pytest.mark.usefixtures("small_ranges")
def test_a_connection_dropped_mid_sync_is_retried_to_a_correct_tree(vms: EmulatedVms, tmp_path: Path) -> None:
    root = tmp_path / "work"
    root.mkdir()
    for i in range(200):
        (root / f"f{i}.txt").write_text(f"file {i}\n" * 50)
    (root / "blob.bin").write_bytes(os.urandom(24 << 20))
    dropped = threading.Event()

    def drop() -> None:  # as soon as bytes land on the VM: the upload is under way, whatever the load
        target = vms.home() / "orch"
        deadline = time.monotonic() + 30
        while time.monotonic() < deadline and not any(p.is_file() for p in target.rglob("*")):
            time.sleep(0.002)
        vms.drop_connections(0)
        dropped.set()

    threading.Thread(target=drop, daemon=True).start()
    report, _ = sync.upload(vms.nodes[0], root, vms.layout)
    assert dropped.is_set()
    files = remote_files(vms.home(), vms.layout)
    assert files["blob.bin"] == (root / "blob.bin").read_bytes()
    assert len(files) == 201
    assert report.attempts >= 2, "the drop should have cut the first attempt short"


# --------------------------------------------------------------------------------------- training


SCRIPT = """
import os, sys, time
for i in range(int(os.environ.get("N", "20"))):
    print(f"line {i}", flush=True)
    time.sleep(float(os.environ.get("DT", "0.02")))
open(os.path.join(os.environ["ORCH_OUTPUT_DIR"], "done.txt"), "w").write("ok")
sys.exit(int(os.environ.get("CODE", "0")))
"""


def start_job(
    env: EmulatedVms, tmp_path: Path, extra_env: dict[str, str], secrets: dict[str, str] | None = None, rank: int = 0
) -> list[str]:
    root = tmp_path / "work"
    root.mkdir(exist_ok=True)
    (root / "job.py").write_text(SCRIPT)
    node = env.nodes[rank]
    sync.upload(node, root, env.layout)
    job_env = run.job_env(
        run_id=env.run_id,
        layout=env.layout,
        rank=rank,
        num_nodes=len(env.nodes),
        master_addr="10.42.0.4",
        user_env=extra_env,
        secrets=secrets or {},
    )
    assert run.start_phase(node, env.layout, "run", ["python3 job.py"], job_env)
    assert not run.start_phase(node, env.layout, "run", ["python3 job.py"], job_env), "never started twice"
    return []


def test_a_failing_job_reports_its_exit_code(vms: EmulatedVms, tmp_path: Path) -> None:
    start_job(vms, tmp_path, {"N": "3", "CODE": "3"})
    lines: list[str] = []
    sink = run.LogSink(lines.append)
    result = run.follow(vms.nodes[0], vms.layout, "run", sink)
    sink.close()
    assert result.exit_code == 3
    assert lines == ["line 0", "line 1", "line 2"]
    assert run.phase_exit_code(vms.nodes[0], vms.layout, "run") == 3


def test_training_survives_a_dropped_connection_and_the_log_resumes_exactly(vms: EmulatedVms, tmp_path: Path) -> None:
    start_job(vms, tmp_path, {"N": "60", "DT": "0.02"})
    lines: list[str] = []
    sink = run.LogSink(lines.append)

    def drop_twice() -> None:
        for _ in range(2):
            time.sleep(0.35)
            vms.drop_connections(0)

    threading.Thread(target=drop_twice, daemon=True).start()
    result = run.follow(vms.nodes[0], vms.layout, "run", sink)
    sink.close()
    assert result.exit_code == 0
    assert result.reconnects >= 1
    assert lines == [f"line {i}" for i in range(60)], "no gap and no duplicate after reconnecting"
    assert (vms.home() / vms.layout.outputs.removeprefix("~/") / "done.txt").read_text() == "ok"


def test_log_lines_stream_while_the_job_still_runs(vms: EmulatedVms, tmp_path: Path) -> None:
    start_job(vms, tmp_path, {"N": "5", "DT": "0.3"})
    done = vms.home() / vms.layout.outputs.removeprefix("~/") / "done.txt"
    seen_while_running: list[bool] = []
    sink = run.LogSink(lambda line: seen_while_running.append(not done.exists()))
    run.follow(vms.nodes[0], vms.layout, "run", sink)
    # Lines arrive as they are printed, not in one batch at the end (bench/sync.py measures latency).
    assert len(seen_while_running) == 5 and all(seen_while_running[:4])


def test_env_reaches_the_job_and_secrets_are_masked_and_not_left_on_disk(vms: EmulatedVms, tmp_path: Path) -> None:
    root = tmp_path / "work"
    root.mkdir()
    (root / "job.py").write_text(
        "import os\nfor k in sorted(os.environ):\n    if k.startswith(('ORCH_', 'MY_')): print(k, os.environ[k])\n"
        "import time; time.sleep(0.5)\n"
    )
    node = vms.nodes[0]
    sync.upload(node, root, vms.layout)
    env = run.job_env(
        run_id=vms.run_id,
        layout=vms.layout,
        rank=0,
        num_nodes=1,
        master_addr="10.42.0.4",
        user_env={"MY_SETTING": "a b 'c'"},
        secrets={"MY_TOKEN": "s3cr3t-value"},
    )
    run.start_phase(node, vms.layout, "run", ["python3 job.py"], env)
    listing = node.exec("ps -eo args").text
    assert "s3cr3t-value" not in listing, "secrets never appear in process listings"
    lines: list[str] = []
    raw = tmp_path / "local.log"
    sink = run.LogSink(lines.append, secrets=["s3cr3t-value"], raw=raw)
    run.follow(node, vms.layout, "run", sink)
    sink.close()
    out = dict(line.split(" ", 1) for line in lines)
    assert out["MY_SETTING"] == "a b 'c'"
    assert out["MY_TOKEN"] == "****"
    assert out["ORCH_RUN_ID"] == vms.run_id and out["ORCH_NODE_RANK"] == "0" and out["ORCH_NUM_NODES"] == "1"
    assert out["ORCH_MASTER_ADDR"] == "10.42.0.4"
    assert out["ORCH_OUTPUT_DIR"] == str(vms.home() / "orch" / vms.run_id / "outputs")
    assert "s3cr3t-value" not in raw.read_text()
    # On the VM only the job's own output (which printed it on purpose) may hold it: the env file
    # that carried it is gone once read.
    for path in vms.home().rglob("*"):
        if path.is_file() and path.name != "log":
            assert b"s3cr3t-value" not in path.read_bytes(), f"secret left in {path}"
    assert not (vms.home() / "orch" / vms.run_id / "phases" / "run" / "env").exists()


def test_two_nodes_get_their_ranks(vms2: EmulatedVms, tmp_path: Path) -> None:
    for rank in (0, 1):
        start_job(vms2, tmp_path, {"N": "1"}, rank=rank)
    homes = [vms2.home(r) for r in (0, 1)]
    for rank, home in enumerate(homes):
        result = run.follow(vms2.nodes[rank], vms2.layout, "run", run.LogSink(lambda _: None))
        assert result.exit_code == 0
        assert (home / vms2.layout.outputs.removeprefix("~/") / "done.txt").exists()
    assert homes[0] != homes[1]


# -------------------------------------------------------------------------------------- artifacts


def test_artifacts_come_home_verified(vms: EmulatedVms, tmp_path: Path) -> None:
    node = vms.nodes[0]
    out = vms.home() / "orch" / vms.run_id / "outputs"
    (out / "sub").mkdir(parents=True)
    (out / "metrics.json").write_text('{"acc": 0.99}')
    (out / "sub" / "model.pt").write_bytes(os.urandom(300_000))
    job = vms.home() / "orch" / vms.run_id / "job"
    job.mkdir(parents=True)
    (job / "train.log").write_text("log")
    report = artifacts.collect(node, vms.layout, tmp_path / "artifacts", ["train.log", "never-written.log"])
    dest = tmp_path / "artifacts"
    assert (dest / "metrics.json").read_text() == '{"acc": 0.99}'
    assert (dest / "sub" / "model.pt").read_bytes() == (out / "sub" / "model.pt").read_bytes()
    assert (dest / "job" / "train.log").read_text() == "log"
    assert report.files == 3


def test_outputs_alone_come_home(vms: EmulatedVms, tmp_path: Path) -> None:
    out = vms.home() / "orch" / vms.run_id / "outputs"
    out.mkdir(parents=True)
    (out / "only.txt").write_text("x")
    report = artifacts.collect(vms.nodes[0], vms.layout, tmp_path / "artifacts")
    assert report.files == 1 and (tmp_path / "artifacts" / "only.txt").read_text() == "x"


def test_an_escaping_symlink_is_left_out_and_named_and_the_rest_comes_home(vms: EmulatedVms, tmp_path: Path) -> None:
    out = vms.home() / "orch" / vms.run_id / "outputs"
    out.mkdir(parents=True)
    (out / "fine.txt").write_text("fine")
    os.symlink("/etc/passwd", out / "passwd")
    report = artifacts.collect(vms.nodes[0], vms.layout, tmp_path / "artifacts")
    assert (tmp_path / "artifacts" / "fine.txt").read_text() == "fine"
    assert ("passwd", "link leaves the outputs: /etc/passwd") in report.skipped
    assert not (tmp_path / "artifacts" / "passwd").exists() and not (tmp_path / "artifacts" / "passwd").is_symlink()


def _stream(members: list[tuple[tarfile.TarInfo, bytes]], manifest: str) -> io.BytesIO:
    buf = io.BytesIO()
    with tarfile.open(fileobj=buf, mode="w") as tar:
        for info, data in members:
            tar.addfile(info, io.BytesIO(data) if data else None)
    with tarfile.open(fileobj=buf, mode="w") as tar:  # a second archive, as the VM sends it
        info = tarfile.TarInfo(artifacts.MANIFEST)
        info.size = len(manifest)
        tar.addfile(info, io.BytesIO(manifest.encode()))
    buf.seek(0)
    return buf


def _member(
    name: str, kind: bytes = tarfile.REGTYPE, data: bytes = b"x", link: str = ""
) -> tuple[tarfile.TarInfo, bytes]:
    info = tarfile.TarInfo(name)
    info.type = kind
    info.size = len(data) if kind == tarfile.REGTYPE else 0
    info.linkname = link
    return info, data if kind == tarfile.REGTYPE else b""


@pytest.mark.parametrize(
    "member",
    [
        _member("/etc/cron.d/evil"),
        _member("../../outside.txt"),
        _member("ok/../../escape.txt"),
        _member("link", tarfile.SYMTYPE, link="/etc/shadow"),
        _member("link2", tarfile.SYMTYPE, link="../../../home"),
        _member("hard", tarfile.LNKTYPE, link="/etc/passwd"),
        _member("dev", tarfile.CHRTYPE),
        _member("fifo", tarfile.FIFOTYPE),
    ],
)
def test_hostile_tar_members_are_skipped_and_listed_never_written(
    tmp_path: Path, member: tuple[tarfile.TarInfo, bytes]
) -> None:
    result = artifacts.extract_verified(_stream([member], ""), tmp_path / "dest")
    assert member[0].name in [p for p, _ in result.skipped]
    assert not (tmp_path / "outside.txt").exists() and not (tmp_path / "escape.txt").exists()
    written = [p for p in (tmp_path / "dest").rglob("*")] if (tmp_path / "dest").exists() else []
    assert not [p for p in written if p.is_file() or p.is_symlink()], written


def test_a_stream_without_its_manifest_is_refused(tmp_path: Path) -> None:
    buf = io.BytesIO()
    with tarfile.open(fileobj=buf, mode="w") as tar:
        info, data = _member("a.txt", data=b"hello")
        tar.addfile(info, io.BytesIO(data))
    buf.seek(0)
    with pytest.raises(artifacts.ArtifactError, match="without its manifest"):
        artifacts.extract_verified(buf, tmp_path / "d")


def test_a_file_that_does_not_match_the_manifest_is_left_out_and_named(tmp_path: Path) -> None:
    manifest = "F\0a.txt\0" + "0" * 64 + "\0"
    result = artifacts.extract_verified(_stream([_member("a.txt", data=b"hello")], manifest), tmp_path / "d")
    assert ("a.txt", "does not match the manifest made on the VM") in result.skipped
    assert not (tmp_path / "d" / "a.txt").exists()


# ------------------------------------------------------------------------------------ real sshd


def test_sshd_pinned_host_key_and_mismatch(sshd: Sshd) -> None:
    assert sshd.node.exec("echo $((6 * 7))").text.strip() == "42"
    ep = sshd.node.ep
    wrong = Endpoint(ep.name, ep.host, ep.port, ep.user, generate_host_key().public, ep.key_file)
    with pytest.raises(HostKeyMismatch):
        connect(wrong, FAST)


def test_sshd_full_cycle_sync_train_follow_collect(sshd: Sshd, tmp_path: Path) -> None:
    root = tmp_path / "work"
    make_tree(root)
    (root / "job.py").write_text(SCRIPT)
    report, entries = sync.upload(sshd.node, root, sshd.layout)
    assert report.sent_files == 7
    (root / "train.py").write_text("changed\n")
    again, _ = sync.upload(sshd.node, root, sshd.layout, previous=entries)
    assert again.sent_files == 1
    env = run.job_env(
        run_id=sshd.layout.run_id,
        layout=sshd.layout,
        rank=0,
        num_nodes=1,
        master_addr="127.0.0.1",
        user_env={"N": "30", "DT": "0.02", "CODE": "5"},
        secrets={},
    )
    run.start_phase(sshd.node, sshd.layout, "run", ["python3 job.py"], env)
    lines: list[str] = []

    def drop() -> None:
        time.sleep(0.3)
        sshd.node.transport().sock.close()  # the network goes away under the open channel

    threading.Thread(target=drop, daemon=True).start()
    result = run.follow(sshd.node, sshd.layout, "run", run.LogSink(lines.append))
    assert result.exit_code == 5
    assert lines == [f"line {i}" for i in range(30)]
    dest = tmp_path / "artifacts"
    artifacts.collect(sshd.node, sshd.layout, dest)
    assert (dest / "done.txt").read_text() == "ok"


def test_node_reconnects_transparently(sshd: Sshd) -> None:
    node: Node = sshd.node
    node.exec("true")
    node.transport().close()
    assert node.run("echo back", "echo").text.strip() == "back"


def test_every_node_s_outputs_come_home_without_overwriting_each_other(vms2: EmulatedVms, tmp_path: Path) -> None:
    from orchestrator.remote.job import JobRunner
    from orchestrator.spec import JobSpec

    for rank in (0, 1):
        out = vms2.home(rank) / "orch" / vms2.run_id / "outputs"
        out.mkdir(parents=True)
        (out / "rank.txt").write_text(str(rank))
    spec = JobSpec.model_validate({"name": "job", "run": "true", "base_dir": str(tmp_path)})
    from orchestrator.runfiles import RunFiles

    files = RunFiles(tmp_path / "state", vms2.run_id).ensure()
    runner = JobRunner(spec, vms2.nodes, vms2.layout, files, network_env={}, emit=print, say=print, secrets={})
    runner.collect(tmp_path / "artifacts")
    assert (tmp_path / "artifacts" / "rank.txt").read_text() == "0"
    assert (tmp_path / "artifacts" / "nodes" / "1" / "rank.txt").read_text() == "1"


def test_a_gpu_the_driver_does_not_see_fails_before_training(vms2: EmulatedVms) -> None:
    from orchestrator.lifecycle.steps import GpuNotVisible, gpu_check

    def nvidia_smi(rank: int, script: str) -> None:
        path = vms2.target.vms_dir / vms2.nodes[rank].ep.name / "bin" / "nvidia-smi"
        path.write_text("#!/bin/sh\n" + script)
        path.chmod(0o755)

    nvidia_smi(0, "echo 'GPU 0: Tesla T4 (UUID: GPU-1)'\n")
    nvidia_smi(1, "echo 'GPU 0: Tesla T4 (UUID: GPU-2)'\n")
    gpu_check(vms2.nodes, 1)
    nvidia_smi(1, "echo 'NVIDIA-SMI has failed because it could not communicate with the NVIDIA driver.'; exit 9\n")
    with pytest.raises(GpuNotVisible, match=r"job-aaaaaa-1 sees 0 of 1 GPU\(s\) \(nvidia-smi exit 9: NVIDIA-SMI has"):
        gpu_check(vms2.nodes, 1)
