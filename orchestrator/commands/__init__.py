"""CLI commands that live in their own module, each registered at the end of orchestrator/cli.py.

A module here imports only click (and orchestrator's light modules) at import time: `orchestrator
--help` loads every one of them and must stay fast.
"""
