"""Print a phase's log from a byte offset until the phase ends; exit with the phase's exit code.

Shipped with every phase by orchestrator and run on the VM as `python3 log-follower.py OFFSET`.
Ending on the wrapper's exit_code file, not on its pid, keeps it right where an init process is
slow to reap zombies; polling an open file costs no process per check.
"""

import os
import sys
import time

NO_STATUS = 254


def _alive() -> bool:
    """The wrapper still runs (a zombie counts as ended: nobody may be reaping it)."""
    try:
        with open("pid") as f:
            pid = int(f.read().strip())
        with open(f"/proc/{pid}/stat", "rb") as f:
            stat = f.read()
    except (OSError, ValueError):
        return os.path.exists("pid") and not os.path.isdir("/proc/self")  # no /proc: assume alive
    return stat[stat.rindex(b")") + 2 :][:1] != b"Z"


def main() -> int:
    offset = int(sys.argv[1])
    out = sys.stdout.buffer
    fd = None
    idle = 0.02
    while True:
        finished = os.path.exists("exit_code")  # checked first: once true, the log is complete
        if fd is None and os.path.exists("log"):
            fd = os.open("log", os.O_RDONLY)
            os.lseek(fd, offset, os.SEEK_SET)
        wrote = False
        while fd is not None:
            data = os.read(fd, 1 << 16)
            if not data:
                break
            out.write(data)
            wrote = True
        if wrote:
            out.flush()
            idle = 0.02
        if finished:
            break
        if not wrote and not os.path.exists("pid"):
            return NO_STATUS
        if not wrote and idle >= 0.2 and not _alive() and not os.path.exists("exit_code"):
            time.sleep(0.5)  # the wrapper writes exit_code just before it ends: look once more
            if not os.path.exists("exit_code"):
                idle = 0.02
                continue_reading = True
                while continue_reading and fd is not None:
                    data = os.read(fd, 1 << 16)
                    continue_reading = bool(data)
                    out.write(data)
                out.flush()
                return NO_STATUS
        time.sleep(idle)
        idle = min(idle * 1.5, 0.2)
    try:
        with open("exit_code") as f:
            return int(f.read().strip())
    except (OSError, ValueError):
        return NO_STATUS


if __name__ == "__main__":
    sys.exit(main())
