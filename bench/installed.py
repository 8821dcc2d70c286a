"""What the benches share: the tool as a user's install has it."""

from __future__ import annotations

from pathlib import Path

REPO = Path(__file__).resolve().parents[1]


def compile_bytecode() -> None:
    """The tool as pip installs it, with its modules' bytecode written. An editable install under
    PYTHONDONTWRITEBYTECODE=1 (this machine sets it) would otherwise compile every orchestrator
    module from source in each process: ~0.25 s for the CLI and again for each local VM's host."""
    import compileall

    compileall.compile_dir(REPO / "orchestrator", quiet=1)
