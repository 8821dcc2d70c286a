from __future__ import annotations

import math

from orchestrator.gates import evaluate
from tests.conftest import make_spec


def test_gates_pass_fail_and_missing() -> None:
    spec = make_spec(expect={"acc": ">= 0.99", "loss": "< 0.1", "f1": 0.5, "nan": "> 0"})
    results = {g.metric: g for g in evaluate(spec.expect, {"acc": 0.995, "loss": 0.2, "nan": math.nan})}
    assert results["acc"].passed and results["acc"].describe() == "acc = 0.995, needs >= 0.99: ok"
    assert not results["loss"].passed and "FAILED" in results["loss"].describe()
    assert not results["f1"].passed and results["f1"].describe() == "f1: not in metrics.json (needs >= 0.5)"
    assert not results["nan"].passed


def test_booleans_and_strings_are_not_numbers() -> None:
    spec = make_spec(expect={"ok": ">= 1"})
    assert not evaluate(spec.expect, {"ok": True})[0].passed
    assert not evaluate(spec.expect, {"ok": "1"})[0].passed
