"""Secret masking on the job's output stream: multi-line secrets, secrets cut across reads, timing."""

from __future__ import annotations

import threading
import time
from pathlib import Path

from orchestrator.remote import run
from orchestrator.remote.masking import MASK, StreamMasker

PEM = (
    "-----BEGIN OPENSSH PRIVATE KEY-----\n"
    "b3BlbnNzaC1rZXktdjEAAAAABG5vbmUAAAAEbm9uZQAAAAAAAAABAAAAMwAAAAtzc2gtZW\n"
    "QyNTUxOQAAACBxZ3J0cGx5c2VjcmV0a2V5bWF0ZXJpYWxmb3J0ZXN0c29ubHkAAAAAAAAA\n"
    "AAAAtzc2gtZWQyNTUxOQAAACBxZ3J0cGx5c2VjcmV0a2V5bWF0ZXJpYWxmb3J0ZXN0c29u\n"
    "-----END OPENSSH PRIVATE KEY-----"
)
TOKEN = "ghp_s3cr3tT0kenValue42"
SECRET_LINES = [line for line in PEM.splitlines() if "-----" not in line]


def _clear(out: bytes) -> list[str]:
    """Which secret material appears in clear in `out`."""
    found = [TOKEN] if TOKEN.encode() in out else []
    return found + [line[:20] for line in SECRET_LINES if line[:20].encode() in out]


def _run(masker: StreamMasker, pieces: list[bytes]) -> bytes:
    return b"".join(masker.feed(p) for p in pieces) + masker.flush()


def test_a_multi_line_pem_secret_is_masked_whole_and_line_by_line() -> None:
    text = (
        f"loading key\n{PEM}\nagain with CRLF:\n{PEM.replace(chr(10), chr(13) + chr(10))}\n"
        f"one line alone: {SECRET_LINES[1]}\nindented:\n    {SECRET_LINES[2]}\n"
    ).encode()
    out = _run(StreamMasker([PEM]), [text])
    assert _clear(out) == []
    assert out.startswith(b"loading key\n" + MASK + b"\nagain with CRLF:\n" + MASK + b"\n")
    # Short lines of a secret ("ab", "}") are not masked alone: they would mask half of all output.
    short = _run(StreamMasker(["line one is long\nab\n"]), [b"ab cd ab\n"])
    assert short == b"ab cd ab\n"


def test_a_secret_split_across_two_reads_is_masked_at_every_split_point() -> None:
    text = f"token={TOKEN}; key:\n{PEM}\ndone {TOKEN}\n".encode()
    expected = _run(StreamMasker([TOKEN, PEM]), [text])
    assert _clear(expected) == [] and expected.count(MASK) == 3
    for cut in range(len(text) + 1):
        out = _run(StreamMasker([TOKEN, PEM]), [text[:cut], text[cut:]])
        assert out == expected, f"split at {cut}"
    for cut in range(1, len(text)):  # three pieces, the second one byte: the worst case
        out = _run(StreamMasker([TOKEN, PEM]), [text[:cut], text[cut : cut + 1], text[cut + 1 :]])
        assert out == expected, f"split at {cut}, {cut + 1}"


def test_only_a_possible_secret_prefix_is_held_back() -> None:
    masker = StreamMasker([TOKEN])
    assert masker.feed(b"step 1 loss 0.5\n") == b"step 1 loss 0.5\n"
    assert masker.feed(b"progress gh") == b"progress "  # "gh" may begin the token
    assert masker.holding
    assert masker.feed(b"x\n") == b"ghx\n"  # it did not


def test_a_held_back_prefix_is_released_within_100_ms_when_no_secret_follows() -> None:
    now = [0.0]
    masker = StreamMasker([TOKEN], clock=lambda: now[0])
    assert masker.feed(b"epoch 3 ghp_s3") == b"epoch 3 "
    now[0] = 0.05
    assert masker.poll() == b""
    now[0] = 0.1
    assert masker.poll() == b"ghp_s3"
    assert not masker.holding
    # The rest of the secret arriving late is still masked: only the released beginning shows.
    assert masker.feed(TOKEN[6:].encode() + b" ok\n") == MASK + b" ok\n"


def test_log_sink_releases_a_held_prefix_and_a_progress_bar_by_itself() -> None:
    lines: list[str] = []
    sink = run.LogSink(lines.append, secrets=[TOKEN])
    # A progress bar redrawn with \r, never a newline, ending in what could begin the token.
    sink.write(b"\r 10% |#   |\r 20% |##  | g")
    deadline = time.monotonic() + 0.5
    while time.monotonic() < deadline and lines != [" 10% |#   |", " 20% |##  | g"]:
        time.sleep(0.01)
    sink.write(b"\r 30% |### |")
    time.sleep(0.3)
    sink.close()
    assert lines[:2] == [" 10% |#   |", " 20% |##  | g"], "emitted while the job is still drawing"
    assert lines[-1] == " 30% |### |"


def test_log_sink_never_writes_or_emits_a_secret(tmp_path: Path) -> None:
    text = f"using {TOKEN}\n{PEM}\nmid-line {TOKEN[:7]}".encode() + TOKEN[7:].encode() + b" end\n"
    text += b"x" * 70_000 + TOKEN.encode() + b"\n"  # the old sink cut lines over 64 KiB anywhere
    for chunk in (1, 7, 4096, 65536, len(text)):
        lines: list[str] = []
        raw = tmp_path / f"run-{chunk}.log"
        sink = run.LogSink(lines.append, secrets=[TOKEN, PEM], prefix="[node0] ", raw=raw)

        def write(sink: run.LogSink = sink, chunk: int = chunk) -> None:
            for i in range(0, len(text), chunk):
                sink.write(text[i : i + chunk])

        writer = threading.Thread(target=write)
        writer.start()
        writer.join()
        sink.close()
        emitted = "\n".join(lines).encode()
        assert _clear(emitted) == [], f"chunk {chunk}: emitted in clear"
        assert _clear(raw.read_bytes()) == [], f"chunk {chunk}: written in clear"
        assert lines[0] == "[node0] using ****" and "[node0] mid-line **** end" in lines
        assert raw.read_bytes().startswith(b"using ****\n****\nmid-line **** end\n")
    assert not [p for p in tmp_path.rglob("*") if p.is_file() and TOKEN.encode() in p.read_bytes()]
