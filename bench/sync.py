"""Moving bytes over SSH: our sync and artifact download against rsync -az and Fabric, at ~50 ms RTT.

A real OpenSSH sshd on loopback, behind a proxy that delays each direction by half the round trip.
The tree: 2,000 source-like files (20 MB) plus one 200 MB binary. Measured:
  first upload      ours vs `rsync -az` (fresh ControlMaster connection)
  re-sync           after 10 files change: ours vs rsync -az, both over a reused connection
  small-file tree   ours vs Fabric's per-file put (timed on a sample, scaled to 2,000 files)
  download          a 200 MB artifact: ours vs Fabric's get (SFTP) with default settings
  log latency       a line printed on the VM to the line on our side (loopback, no proxy)

    python bench/sync.py [--rtt-ms 50] [--blob-mb 200] [--files 2000] [--put-sample 60]
"""

from __future__ import annotations

import argparse
import os
import random
import shutil
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # for tests.sshd and bench.tcpproxy

from bench.tcpproxy import DelayProxy
from orchestrator.remote import artifacts, run, sync
from orchestrator.remote.connect import ConnectOptions, Endpoint, Node
from orchestrator.remote.layout import RemoteLayout
from tests.sshd import LocalSshd, SshdUnavailable, run_sshd

WORDS = [
    "def",
    "class",
    "return",
    "import",
    "self",
    "model",
    "loss",
    "optimizer",
    "tensor",
    "batch",
    "epoch",
    "train",
    "eval",
    "data",
    "loader",
    "config",
    "print",
    "range",
    "len",
    "float",
    "int",
    "str",
    "list",
    "dict",
    "none",
    "true",
    "false",
    "if",
    "else",
    "for",
    "while",
    "with",
    "as",
]


def make_tree(root: Path, files: int, total_mb: float, blob_mb: int) -> None:
    rng = random.Random(7)
    per_file = int(total_mb * (1 << 20) / files)
    for i in range(files):
        d = root / f"pkg{i % 40}" / f"mod{i % 7}"
        d.mkdir(parents=True, exist_ok=True)
        words = []
        size = 0
        while size < per_file:
            w = rng.choice(WORDS)
            words.append(w)
            size += len(w) + 1
        (d / f"file{i}.py").write_text(" ".join(words))
    (root / "weights.bin").write_bytes(os.urandom(blob_mb << 20))


def ssh_cmd(sshd: LocalSshd, port: int, control: Path) -> list[str]:
    return [
        "ssh",
        "-p",
        str(port),
        "-i",
        str(sshd.client_key),
        "-o",
        f"UserKnownHostsFile={sshd.known_hosts}",
        "-o",
        "StrictHostKeyChecking=yes",
        "-o",
        "HostKeyAlias=[127.0.0.1]:" + str(sshd.port),
        "-o",
        "ControlMaster=auto",
        "-o",
        f"ControlPath={control}",
        "-o",
        "ControlPersist=120",
        "-o",
        "BatchMode=yes",
        "-o",
        "IdentitiesOnly=yes",
    ]


def timed(fn) -> float:  # type: ignore[no-untyped-def]
    t = time.perf_counter()
    fn()
    return time.perf_counter() - t


def fabric_connection(sshd: LocalSshd, port: int):  # type: ignore[no-untyped-def]
    """Fabric with its defaults (2 MB window, SFTP put/get), only pinned to our host key."""
    import paramiko
    from fabric import Config, Connection

    conn = Connection(
        "127.0.0.1",
        user=sshd.user,
        port=port,
        config=Config(lazy=True),
        connect_kwargs={"key_filename": str(sshd.client_key), "look_for_keys": False, "allow_agent": False},
    )
    conn.client.set_missing_host_key_policy(paramiko.AutoAddPolicy())
    return conn


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--rtt-ms", type=float, default=50.0)
    ap.add_argument("--blob-mb", type=int, default=200)
    ap.add_argument("--files", type=int, default=2000)
    ap.add_argument("--tree-mb", type=float, default=20.0)
    ap.add_argument("--put-sample", type=int, default=60, help="files timed for Fabric's per-file put")
    ap.add_argument("--window-mb", type=int, default=8)
    args = ap.parse_args()
    if not shutil.which("rsync"):
        sys.exit("bench/sync.py needs rsync (apt-get install rsync)")

    tmp = Path(tempfile.mkdtemp(prefix="orch-bench-sync-"))
    src = tmp / "src"
    make_tree(src, args.files, args.tree_mb, args.blob_mb)
    print(
        f"tree: {args.files} files, {args.tree_mb:g} MB + one {args.blob_mb} MB binary; "
        f"RTT {args.rtt_ms:g} ms via a delay proxy; window {args.window_mb} MB"
    )
    try:
        with run_sshd(tmp / "sshd") as sshd, DelayProxy(sshd.port, args.rtt_ms / 2000) as proxy:
            results = measure(args, tmp, src, sshd, proxy.port)
    except SshdUnavailable as e:
        sys.exit(str(e))
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    print()
    for line in results:
        print(line)


def measure(args: argparse.Namespace, tmp: Path, src: Path, sshd: LocalSshd, port: int) -> list[str]:
    opts = ConnectOptions(window_bytes=args.window_mb << 20)
    node = Node(Endpoint("bench", "127.0.0.1", port, sshd.user, sshd.host_key.public, sshd.client_key), opts)
    # paramiko pins by "[host]:port"; the proxy port differs from sshd's, the key is the same.
    out: list[str] = []
    node.connection()

    # --- first upload: ours (connection already open, as after wait-until-ready) vs rsync -az
    layout = RemoteLayout("bench-000001", str(tmp / "remote-ours"))
    state: list[sync.SyncState] = []
    ours_first = timed(lambda: state.append(sync.upload(node, src, layout)[1]))
    control = tmp / "cm.sock"
    ssh = ssh_cmd(sshd, port, control)
    rsync_dst = tmp / "remote-rsync"
    rsync = ["rsync", "-az", "-e", " ".join(ssh), f"{src}/", f"{sshd.user}@127.0.0.1:{rsync_dst}/"]
    rsync_first = timed(lambda: subprocess.run(rsync, check=True))
    out.append(
        f"first upload        ours {ours_first:6.2f} s   rsync -az {rsync_first:6.2f} s   "
        f"ratio {ours_first / rsync_first:.2f}   (target <= 0.6)"
    )

    # --- re-sync after 10 files change, both over a reused connection
    changed = sorted(src.rglob("*.py"))[:10]
    ours_re, rsync_re = [], []
    for round_ in range(3):
        for p in changed:
            p.write_text(p.read_text() + f"\n# change {round_}\n")
        # As the runner does: the state of the last sync to this VM comes back in.
        ours_re.append(timed(lambda: state.append(sync.upload(node, src, layout, previous=state[-1])[1])))
        rsync_re.append(timed(lambda: subprocess.run(rsync, check=True)))
    o, r = statistics.median(ours_re), statistics.median(rsync_re)
    out.append(f"re-sync 10 files    ours {o:6.2f} s   rsync -az {r:6.2f} s   ratio {o / r:.2f}   (target <= 1.0)")
    subprocess.run([*ssh, "-O", "exit", "127.0.0.1"], capture_output=True, check=False)

    # --- small-file tree: ours vs Fabric's per-file put (sampled)
    small_src = tmp / "small"
    shutil.copytree(src, small_src, ignore=shutil.ignore_patterns("weights.bin"))
    small_layout = RemoteLayout("bench-000002", str(tmp / "remote-small"))
    ours_small = timed(lambda: sync.upload(node, small_src, small_layout))
    files = sorted(p for p in small_src.rglob("*") if p.is_file())
    sample = files[: args.put_sample]
    conn = fabric_connection(sshd, port)
    conn.open()
    put_dst = tmp / "remote-put"

    def put_sample() -> None:
        for p in sample:
            rel = p.relative_to(small_src)
            target = put_dst / rel
            conn.run(f"mkdir -p {target.parent}", hide=True)
            conn.put(str(p), str(target))

    per_file = timed(put_sample) / len(sample)
    fabric_all = per_file * len(files)
    out.append(
        f"2,000 small files   ours {ours_small:6.2f} s   Fabric put {fabric_all:7.1f} s "
        f"({per_file * 1000:.0f} ms/file x {len(files)}, sampled)   speedup {fabric_all / ours_small:.0f}x "
        "(target >= 100x)"
    )

    # --- 200 MB artifact download: ours vs Fabric get with defaults
    out_dir = tmp / "remote-ours" / "bench-000001" / "outputs"
    out_dir.mkdir(parents=True, exist_ok=True)
    shutil.copy(src / "weights.bin", out_dir / "model.bin")
    ours_dl = timed(lambda: artifacts.collect(node, layout, tmp / "artifacts"))
    fabric_dl = timed(lambda: conn.get(str(out_dir / "model.bin"), str(tmp / "fabric-model.bin")))
    assert (tmp / "artifacts" / "model.bin").read_bytes() == (tmp / "fabric-model.bin").read_bytes()
    out.append(
        f"{args.blob_mb} MB download     ours {ours_dl:6.2f} s   Fabric get {fabric_dl:6.2f} s   "
        f"ratio {ours_dl / fabric_dl:.2f}   (target <= 0.5)"
    )
    conn.close()
    node.close()

    # --- live log latency on loopback (no proxy): printed on the VM -> seen here
    direct = Node(Endpoint("bench", "127.0.0.1", sshd.port, sshd.user, sshd.host_key.public, sshd.client_key))
    job = tmp / "latency"
    job.mkdir()
    (job / "job.py").write_text(
        "import time\nfor i in range(20):\n    print(repr(time.time()), flush=True)\n    time.sleep(0.1)\n"
    )
    lay = RemoteLayout("bench-000003", str(tmp / "remote-latency"))
    sync.upload(direct, job, lay)
    env = run.job_env(
        run_id=lay.run_id, layout=lay, rank=0, num_nodes=1, master_addr="127.0.0.1", user_env={}, secrets={}
    )
    delays: list[float] = []
    run.start_phase(direct, lay, "run", ["python3 job.py"], env)
    run.follow(direct, lay, "run", run.LogSink(lambda line: delays.append(time.time() - float(line))))
    direct.close()
    out.append(
        f"log line latency    median {statistics.median(delays) * 1000:.0f} ms, "
        f"max {max(delays) * 1000:.0f} ms over {len(delays)} lines   (target <= 500 ms)"
    )
    return out


if __name__ == "__main__":
    main()
