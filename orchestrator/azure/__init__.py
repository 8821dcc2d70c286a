"""Everything that talks to Azure Resource Manager through the SDK.

Nothing here imports the SDK at module import time: `orchestrator --help` must stay fast.
"""
