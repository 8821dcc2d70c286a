"""Metric gates: the job's `expect:` conditions checked against the metrics.json it wrote."""

from __future__ import annotations

import math
from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any

from orchestrator.spec import Condition


@dataclass(frozen=True)
class GateResult:
    metric: str
    condition: str  # ">= 0.99"
    value: float | None
    passed: bool

    def describe(self) -> str:
        if self.value is None:
            return f"{self.metric}: not in metrics.json (needs {self.condition})"
        verdict = "ok" if self.passed else "FAILED"
        return f"{self.metric} = {self.value:g}, needs {self.condition}: {verdict}"


def evaluate(expect: Mapping[str, Condition], metrics: Mapping[str, Any]) -> list[GateResult]:
    out = []
    for metric, cond in expect.items():
        raw = metrics.get(metric)
        value = float(raw) if isinstance(raw, int | float) and not isinstance(raw, bool) else None
        passed = value is not None and not math.isnan(value) and cond.holds(value)
        out.append(GateResult(metric, str(cond), value, passed))
    return out
