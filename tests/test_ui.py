"""The terminal display: a live panel on a terminal, plain lines elsewhere."""

from __future__ import annotations

import io

from rich.console import Console

from orchestrator.azure.provision import ResourceEvent
from orchestrator.ui import LiveProgress, ProgressPrinter, progress
from tests.conftest import make_plan


def test_live_panel_shows_resources_and_job_output_above_it() -> None:
    out = io.StringIO()
    live = LiveProgress(Console(file=out, force_terminal=True, width=100, color_system=None))
    plan = make_plan()
    live.say("provisioning orch-demo-abc123 in eastus")
    for r in plan.resources:
        live.resource(ResourceEvent(r, "creating", 0.0))
    live.resource(ResourceEvent(plan.resources[0], "created", 1.0))
    live.live.refresh()
    panel = out.getvalue()
    assert "resourceGroups" in panel and "demo-abc123-0" in panel and "✓" in panel
    live.log("epoch 1 [not markup]")
    live.stop()
    text = out.getvalue()
    assert "epoch 1 [not markup]" in text, "job output is printed as-is, never as rich markup"


def test_plain_lines_when_not_a_terminal(capsys: object) -> None:
    printer = progress(as_json=False)
    assert type(printer) is ProgressPrinter  # pytest's stderr is not a terminal
