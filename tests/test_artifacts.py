"""Artifact collection against a real OpenSSH sshd: never delete what the tool did not create, keep
every safe file, list the rest."""

from __future__ import annotations

import io
import json
import os
import subprocess
import sys
import tarfile
from pathlib import Path

import pytest

from orchestrator.remote import artifacts
from orchestrator.remote.layout import RemoteLayout
from tests.remote_fixtures import Sshd


def outputs(sshd: Sshd, layout: RemoteLayout | None = None) -> Path:
    out = Path((layout or sshd.layout).outputs)
    out.mkdir(parents=True, exist_ok=True)
    return out


def test_a_folder_with_unrelated_files_keeps_them_and_the_artifacts_go_into_a_run_subfolder(
    sshd: Sshd, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    (outputs(sshd) / "model.pt").write_bytes(b"weights")
    project = tmp_path / "project"
    (project / "src").mkdir(parents=True)
    (project / "notes.txt").write_text("mine")
    (project / "src" / "train.py").write_text("print('mine')")
    monkeypatch.chdir(project)
    run_id = sshd.layout.run_id
    # `run --artifacts .` in a project folder: told up front where the files will land.
    assert artifacts.resolve_destination(Path("."), run_id) == project / run_id
    report = artifacts.collect(sshd.node, sshd.layout, Path("."))
    assert report.destination == project / run_id
    assert (project / "notes.txt").read_text() == "mine" and (project / "src" / "train.py").exists()
    assert (project / run_id / "model.pt").read_bytes() == b"weights"
    marker = json.loads((project / run_id / artifacts.MARKER).read_text())
    assert marker["run_id"] == run_id and marker["node_rank"] == 0 and marker["collected_at"]
    # Collecting again replaces the run's own folder (it carries the marker), nothing else.
    (outputs(sshd) / "model.pt").write_bytes(b"weights v2")
    again = artifacts.collect(sshd.node, sshd.layout, Path("."))
    assert again.destination == project / run_id
    assert (project / run_id / "model.pt").read_bytes() == b"weights v2"
    assert sorted(p.name for p in project.iterdir()) == sorted(["notes.txt", "src", run_id])


def test_a_marked_folder_is_replaced_an_empty_one_filled_and_an_unmarked_one_kept(sshd: Sshd, tmp_path: Path) -> None:
    out = outputs(sshd)
    (out / "a.txt").write_text("first")
    (out / "old-only.txt").write_text("gone next time")
    dest = tmp_path / "artifacts"
    dest.mkdir()  # empty: filled in place
    assert artifacts.collect(sshd.node, sshd.layout, dest).destination == dest
    assert (dest / "old-only.txt").exists() and artifacts.read_marker(dest) is not None
    (out / "old-only.txt").unlink()
    (out / "a.txt").write_text("second")
    assert artifacts.collect(sshd.node, sshd.layout, dest).destination == dest
    assert (dest / "a.txt").read_text() == "second" and not (dest / "old-only.txt").exists()
    # Without the marker the folder is the user's: left alone, the files go one level down.
    (dest / artifacts.MARKER).unlink()
    report = artifacts.collect(sshd.node, sshd.layout, dest)
    assert report.destination == dest / sshd.layout.run_id
    assert (dest / "a.txt").read_text() == "second" and (dest / sshd.layout.run_id / "a.txt").exists()
    assert not [p for p in tmp_path.iterdir() if p.name.startswith(".incoming-")]


def test_a_failed_collection_leaves_the_previous_copy_in_place(
    sshd: Sshd, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    (outputs(sshd) / "a.txt").write_text("kept")
    dest = tmp_path / "artifacts"
    artifacts.collect(sshd.node, sshd.layout, dest)
    monkeypatch.setattr(artifacts, "collect_command", lambda layout, extra: "echo broken >&2; exit 3")
    with pytest.raises(artifacts.ArtifactError, match="exit 3"):
        artifacts.collect(sshd.node, sshd.layout, dest, retries=1)
    assert (dest / "a.txt").read_text() == "kept"
    assert not [p for p in tmp_path.iterdir() if p.name.startswith(".incoming-")]


def test_links_inside_come_home_relative_links_out_fifos_and_sockets_are_skipped(sshd: Sshd, tmp_path: Path) -> None:
    out = outputs(sshd)
    (out / "ckpt").mkdir()
    (out / "ckpt" / "step-100.pt").write_bytes(b"step 100")
    (out / "model.pt").write_bytes(b"final")
    os.symlink(out / "ckpt" / "step-100.pt", out / "latest.pt")  # absolute, pointing inside
    os.symlink("../model.pt", out / "ckpt" / "final.pt")  # relative, inside
    os.symlink(out / "ckpt", out / "checkpoints")  # a link to a folder inside
    os.symlink("/etc/passwd", out / "passwd")  # leaves the outputs
    os.symlink("../../../elsewhere", out / "ckpt" / "up")  # leaves too, relatively
    os.mkfifo(out / "pipe")
    sock = out / "s.sock"
    subprocess.run(
        [sys.executable, "-c", f"import socket; socket.socket(socket.AF_UNIX).bind({str(sock)!r})"], check=True
    )
    dest = tmp_path / "artifacts"
    report = artifacts.collect(sshd.node, sshd.layout, dest)
    assert os.readlink(dest / "latest.pt") == "ckpt/step-100.pt", "an absolute link inside becomes relative"
    assert (dest / "latest.pt").read_bytes() == b"step 100"
    assert (dest / "ckpt" / "final.pt").read_bytes() == b"final"
    assert os.readlink(dest / "checkpoints") == "ckpt" and (dest / "checkpoints" / "step-100.pt").exists()
    skipped = dict(report.skipped)
    assert set(skipped) == {"passwd", "ckpt/up", "pipe", "s.sock"}, report.skipped
    assert "leaves the outputs" in skipped["passwd"] and "FIFO" in skipped["pipe"] and "socket" in skipped["s.sock"]
    for name in skipped:
        assert not os.path.lexists(dest / name)
    assert report.files == 2 and (dest / "model.pt").read_bytes() == b"final"


def test_any_file_name_round_trips_exactly(sshd: Sshd, tmp_path: Path) -> None:
    out = os.fsencode(outputs(sshd))
    names = [b"back\\slash.txt", b"new\nline.txt", b"latin-\xe9-\xff.bin", b"tab\there", b"  spaced  ", b"-dash"]
    os.mkdir(out + b"/d\\ir\n\xfe")
    for i, name in enumerate(names):
        for folder in (out, out + b"/d\\ir\n\xfe"):
            with open(folder + b"/" + name, "wb") as f:
                f.write(b"content %d" % i + name)
    dest = tmp_path / "artifacts"
    report = artifacts.collect(sshd.node, sshd.layout, dest)
    assert report.skipped == []
    got = os.fsencode(dest)
    assert sorted(os.listdir(got)) == sorted([*names, b"d\\ir\n\xfe", os.fsencode(artifacts.MARKER)])
    assert sorted(os.listdir(got + b"/d\\ir\n\xfe")) == sorted(names)
    for i, name in enumerate(names):
        with open(got + b"/d\\ir\n\xfe/" + name, "rb") as f:
            assert f.read() == b"content %d" % i + name
    assert report.files == 2 * len(names)


def test_leftover_incoming_folders_are_removed_only_when_they_are_ours(sshd: Sshd, tmp_path: Path) -> None:
    (outputs(sshd) / "a.txt").write_text("x")
    gone = subprocess.Popen(["true"])
    gone.wait()  # a pid that no longer runs: a killed collection's
    dead = tmp_path / f".incoming-orch-{gone.pid}-0123456789ab"
    (dead / "half").mkdir(parents=True)
    old = tmp_path / f".incoming-orch-{gone.pid}-ba9876543210-old"
    old.mkdir()
    marked = tmp_path / ".incoming-something"
    marked.mkdir()
    (marked / artifacts.MARKER).write_text(json.dumps({"run_id": "job-zzzzzz", "node_rank": 0}))
    foreign = tmp_path / ".incoming-user-data"  # someone else's name, no marker: not ours
    foreign.mkdir()
    (foreign / "keep.txt").write_text("keep")
    alive = tmp_path / f".incoming-orch-{os.getppid()}-aaaaaaaaaaaa"  # a live process's: in use
    alive.mkdir()
    artifacts.collect(sshd.node, sshd.layout, tmp_path / "artifacts")
    left = sorted(p.name for p in tmp_path.iterdir() if p.name.startswith(".incoming-"))
    assert left == sorted([foreign.name, alive.name])
    assert (foreign / "keep.txt").read_text() == "keep"


def test_replacing_rank_0_never_removes_the_other_ranks_folders(sshd: Sshd, tmp_path: Path) -> None:
    rank1 = RemoteLayout(sshd.layout.run_id, str(tmp_path / "remote-rank1"))
    (outputs(sshd) / "rank.txt").write_text("0")
    (outputs(sshd, rank1) / "rank.txt").write_text("1")
    dest = tmp_path / "artifacts"
    # Rank 1 first (the order must not matter), then rank 0 into the folder that holds nodes/1.
    artifacts.collect(sshd.node, rank1, dest / "nodes" / "1")
    assert artifacts.resolve_destination(dest, sshd.layout.run_id) == dest
    artifacts.collect(sshd.node, sshd.layout, dest)
    artifacts.collect(sshd.node, sshd.layout, dest)  # and a rank 0 replacing its own copy again
    assert (dest / "rank.txt").read_text() == "0"
    assert (dest / "nodes" / "1" / "rank.txt").read_text() == "1"


# ------------------------------------------------------------------- hostile or damaged streams


def _tar(members: list[tuple[tarfile.TarInfo, bytes]], manifest: bytes) -> io.BytesIO:
    buf = io.BytesIO()
    with tarfile.open(fileobj=buf, mode="w") as tar:
        for info, data in members:
            tar.addfile(info, io.BytesIO(data) if data else None)
    with tarfile.open(fileobj=buf, mode="w") as tar:
        info = tarfile.TarInfo(artifacts.MANIFEST)
        info.size = len(manifest)
        tar.addfile(info, io.BytesIO(manifest))
    buf.seek(0)
    return buf


def _m(name: str, kind: bytes = tarfile.REGTYPE, data: bytes = b"", link: str = "") -> tuple[tarfile.TarInfo, bytes]:
    info = tarfile.TarInfo(name)
    info.type, info.linkname = kind, link
    info.size = len(data) if kind == tarfile.REGTYPE else 0
    return info, data


def test_hostile_members_are_skipped_and_listed_and_the_rest_is_kept(tmp_path: Path) -> None:
    import hashlib

    good = b"good data"
    digest = hashlib.sha256(good).hexdigest().encode()
    manifest = b"F\0good.txt\0" + digest + b"\0F\0bad.txt\0" + b"0" * 64 + b"\0F\0never-sent.txt\0" + b"1" * 64 + b"\0"
    members = [
        _m("good.txt", data=good),
        _m("bad.txt", data=b"tampered"),
        _m("/etc/cron.d/evil", data=b"x"),
        _m("../../outside.txt", data=b"x"),
        _m("ok/../../escape.txt", data=b"x"),
        _m("link", tarfile.SYMTYPE, link="/etc/shadow"),
        _m("link2", tarfile.SYMTYPE, link="../../../home"),
        _m("loop", tarfile.SYMTYPE, link="."),
        _m("loop2", tarfile.SYMTYPE, link="loop/.."),  # "." then "..": would leave if followed
        _m("hard", tarfile.LNKTYPE, link="/etc/passwd"),
        _m("dev", tarfile.CHRTYPE),
        _m("fifo", tarfile.FIFOTYPE),
        _m("via/link", tarfile.SYMTYPE, link=".."),
        _m("via/link/through.txt", data=b"x"),  # written through a link: refused
    ]
    dest = tmp_path / "dest"
    result = artifacts.extract_verified(_tar(members, manifest), dest)
    assert (dest / "good.txt").read_bytes() == good and result.files == 1
    skipped = dict(result.skipped)
    assert set(skipped) >= {
        "bad.txt",
        "never-sent.txt",
        "/etc/cron.d/evil",
        "../../outside.txt",
        "ok/../../escape.txt",
        "link",
        "link2",
        "loop2",
        "hard",
        "dev",
        "fifo",
        "via/link/through.txt",
    }
    assert "does not match" in skipped["bad.txt"] and not (dest / "bad.txt").exists()
    assert not (tmp_path / "outside.txt").exists() and not (tmp_path / "escape.txt").exists()
    assert not (dest / "through.txt").exists()
    for p in dest.rglob("*"):
        if p.is_symlink():
            assert p.resolve().is_relative_to(dest.resolve()), p
