"""`orchestrator` and `python -m orchestrator`: a warm start when asked for (warm.py), else the CLI here.

Only the standard library is imported before that choice, so a warm command's own process stays
small."""

import os
import sys


def entry() -> None:
    if os.environ.get("ORCH_WARM") == "1":  # else not even the client's modules are imported
        from orchestrator import warm

        code = warm.run(sys.argv) if warm.enabled(sys.argv[1:]) else None
        if code is not None:
            sys.stdout.flush()
            sys.stderr.flush()
            os._exit(code)
    from orchestrator.cli import entry as in_process

    in_process()


if __name__ == "__main__":
    entry()
