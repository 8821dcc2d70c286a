"""Secret masking for a byte stream (job output), independent of how the stream is cut into reads.

`StreamMasker.feed` returns what can be released now, masked; it holds back only a suffix of the
data seen that could be the beginning of a secret, and `poll` releases such a suffix once it has
been held for `hold_s` (100 ms) with no secret completing it, so a quiet job's last bytes (a
progress bar drawn with `\\r`) still show. Each secret is masked whole, and each line of a
multi-line secret (a PEM key) is masked on its own too, so a key printed with other line endings,
or a part of it, does not appear in clear; lines shorter than 4 characters are too common to be
masked alone.

If the rest of a secret arrives after its beginning was released (the job paused longer than
`hold_s` in the middle of it), the rest is still masked: the masker remembers the tail of what it
released.
"""

from __future__ import annotations

import re
import time
from collections.abc import Callable, Iterable

MASK = b"****"
MIN_LINE = 4  # lines of a multi-line secret shorter than this are not masked alone


def secret_patterns(secrets: Iterable[str | bytes]) -> list[bytes]:
    """The byte strings to mask: each secret whole, its \\r\\n form, and each non-trivial line."""
    out: set[bytes] = set()
    for secret in secrets:
        value = secret.encode() if isinstance(secret, str) else bytes(secret)
        if not value:
            continue
        out.add(value)
        lines = [line.rstrip(b"\r") for line in value.split(b"\n")]
        if len(lines) > 1:
            out.add(b"\r\n".join(lines))
            out.update(line for line in lines if len(line.strip()) >= MIN_LINE)
            out.update(line.strip() for line in lines if len(line.strip()) >= MIN_LINE)
    return sorted(out, key=lambda p: (-len(p), p))  # longest first: the regex prefers it


class StreamMasker:
    """feed(bytes) -> masked bytes that can be released now; poll() and flush() for the rest."""

    def __init__(
        self,
        secrets: Iterable[str | bytes],
        *,
        hold_s: float = 0.1,
        clock: Callable[[], float] = time.monotonic,
    ) -> None:
        self.patterns = secret_patterns(secrets)
        self.hold_s = hold_s
        self.clock = clock
        self._re = re.compile(b"|".join(re.escape(p) for p in self.patterns)) if self.patterns else None
        self._longest = max((len(p) for p in self.patterns), default=0)
        self._by_first: dict[int, list[bytes]] = {}
        for p in self.patterns:
            self._by_first.setdefault(p[0], []).append(p)
        self._buf = b""  # held back: could be the beginning of a secret
        self._held_since: float | None = None
        # The last bytes released in clear (at most longest - 1), to catch a secret whose
        # beginning was released by the timer. Reset after a mask: a secret never spans one.
        self._tail = b""

    @property
    def holding(self) -> bool:
        return bool(self._buf)

    def deadline(self) -> float | None:
        """When the held bytes must be released (clock time), or None if nothing is held."""
        return None if self._held_since is None else self._held_since + self.hold_s

    def feed(self, data: bytes) -> bytes:
        if self._re is None:
            return data
        self._buf += data
        return self._release(final=False) + self.poll()

    def poll(self) -> bytes:
        """Release the held bytes if they were held for hold_s without becoming a secret."""
        if self._buf and self._held_since is not None and self.clock() - self._held_since >= self.hold_s:
            return self._release(final=True)
        return b""

    def flush(self) -> bytes:
        """Everything still held, masked as far as it goes (the stream ended)."""
        return self._release(final=True) if self._buf else b""

    # ------------------------------------------------------------------------------------------

    def _hold_start(self, buf: bytes, pos: int) -> int:
        """The earliest position >= pos whose suffix is a proper prefix of some pattern."""
        n = len(buf)
        for s in range(max(pos, n - self._longest + 1), n):
            candidates = self._by_first.get(buf[s])
            if candidates:
                rest = buf[s:]
                if any(len(p) > len(rest) and p.startswith(rest) for p in candidates):
                    return s
        return n

    def _release(self, *, final: bool) -> bytes:
        assert self._re is not None
        ctx = self._tail + self._buf
        floor = 0  # where the clear context starts: nothing before a mask can begin a secret
        pos = len(self._tail)  # everything before pos was released already
        out = bytearray()
        if self._tail:  # a secret that began in what was released: mask what is still here
            for span in self._re.finditer(ctx):
                if span.end() <= pos:
                    continue
                if span.start() < pos:
                    out += MASK
                    pos = floor = span.end()
                break
        while True:
            hold = len(ctx) if final else max(pos, self._hold_start(ctx, floor))
            m = self._re.search(ctx, pos)
            if m is not None and m.start() < hold:
                out += ctx[pos : m.start()] + MASK
                pos = floor = m.end()
                continue
            out += ctx[pos:hold]
            pos = hold
            break
        moved = pos > len(self._tail)  # some of the held bytes went out: the rest is newer
        keep = self._longest - 1
        self._tail = ctx[floor:pos][-keep:] if keep > 0 else b""
        self._buf = ctx[pos:]
        if not self._buf:
            self._held_since = None
        elif self._held_since is None or moved:
            self._held_since = self.clock()
        return bytes(out)
