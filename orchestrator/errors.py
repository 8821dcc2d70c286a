"""The exception tree, in one place, with the exit code each kind of failure maps to.

The CLI prints `str(error)` and exits with `error.exit_code`; a traceback only with --debug.
"""

from __future__ import annotations

EXIT_OK = 0
EXIT_JOB_FAILED = 1
EXIT_BAD_INPUT = 2
EXIT_AZURE_REFUSED = 3
EXIT_INTERRUPTED = 130


class OrchestratorError(Exception):
    """Something the user can act on; the message says what, where and what to do next."""

    exit_code = EXIT_JOB_FAILED


class UserInputError(OrchestratorError):
    """Bad job.yaml, bad flag, missing file."""

    exit_code = EXIT_BAD_INPUT


class CredentialsError(OrchestratorError):
    """No Azure login or subscription could be found."""

    exit_code = EXIT_AZURE_REFUSED


class CloudError(OrchestratorError):
    """Azure (or the emulator) refused or failed a request. Subclasses live in azure/errors.py."""

    exit_code = EXIT_AZURE_REFUSED

    def __init__(self, message: str, *, code: str = "", resource: str = "") -> None:
        super().__init__(message)
        self.code = code
        self.resource = resource


class Terminated(KeyboardInterrupt):
    """SIGTERM (a cancelled CI job, killed seconds later): tear down at once, collect nothing."""
