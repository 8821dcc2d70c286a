"""orchestrator: run training jobs on Azure GPU VMs from one command, and leave nothing behind."""

__version__ = "0.1.0"
