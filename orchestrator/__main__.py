"""`orchestrator` and `python -m orchestrator`: a warm start when asked for (warm.py), else the CLI here.

Only the standard library is imported before that choice, so a warm command's own process stays
small."""

import os
import sys


def entry() -> None:
    from orchestrator import warm

    if warm.enabled(sys.argv[1:]):
        code = warm.run(sys.argv)
        if code is not None:
            sys.stdout.flush()
            sys.stderr.flush()
            os._exit(code)
    from orchestrator.cli import entry as in_process

    in_process()


if __name__ == "__main__":
    entry()
