"""One run as named steps (check, provision, connect, sync, setup, train, collect, teardown), its
verdict, and the verbs that act on runs. The CLI calls these with a Target and a Reporter."""

from orchestrator.lifecycle.cleanup import down, gc
from orchestrator.lifecycle.dryrun import DryRunReport, dry_run
from orchestrator.lifecycle.kept import collect, exec_command, record_of, train, unknown_run
from orchestrator.lifecycle.outcome import LimitReached, RunOutcome
from orchestrator.lifecycle.reporter import Fanout, Quiet, Reporter
from orchestrator.lifecycle.run import provision, run

__all__ = [
    "DryRunReport",
    "Fanout",
    "LimitReached",
    "Quiet",
    "Reporter",
    "RunOutcome",
    "collect",
    "down",
    "dry_run",
    "exec_command",
    "gc",
    "provision",
    "record_of",
    "run",
    "train",
    "unknown_run",
]
