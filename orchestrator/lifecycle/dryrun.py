"""--dry-run: the real provisioner and teardown against the dry-run target; what they would send."""

from __future__ import annotations

from dataclasses import dataclass, field
from datetime import UTC, datetime
from typing import Any

from orchestrator import catalog
from orchestrator.candidates import Candidate, Dropped, priced
from orchestrator.lifecycle.steps import owner_name
from orchestrator.plan import NO_SSH_RULE_WARNING, ResourcePlan, build_plan, new_run_id
from orchestrator.spec import JobSpec

# A syntactically valid key for the dry-run's plan; a real run generates a key pair per run.
PLACEHOLDER_PUBLIC_KEY = (
    "ssh-ed25519 AAAAC3NzaC1lZDI1NTE5AAAAIPlaceholderKeyGeneratedPerRunAtProvisionTime0 generated-per-run"
)


# What the dry-run cannot know: it asks Azure nothing (a real run's preflight does).
NOT_CHECKED = {"quota": "not checked", "offered": "not checked"}


@dataclass
class RequestLine:
    method: str
    path: str
    api_version: str
    status: int
    phase: str  # provision or teardown


@dataclass
class DryRunReport:
    plan: ResourcePlan
    requests: list[RequestLine]
    polls: int
    estimate_seconds: float
    boot_seconds: float
    hourly_usd: float
    max_cost_usd: float
    budget_usd: float | None
    warnings: list[str] = field(default_factory=list)
    source_labels: dict[str, str] = field(default_factory=dict)  # SSH source -> how to show it
    # Every candidate in the order a run tries them, with the run's price per hour there, and the
    # ones dropped with the reason. The dry-run asks Azure nothing: quota and the size's availability
    # to the subscription are "not checked" (a real run's preflight drops the doomed ones).
    candidates: list[tuple[Candidate, float]] = field(default_factory=list)
    dropped: list[Dropped] = field(default_factory=list)
    order: str = "cheapest"

    def candidates_json(self) -> list[dict[str, Any]]:
        out: list[dict[str, Any]] = [
            {"status": "candidate", "order": i + 1, **c.to_json(), "usd_per_hour": round(usd, 4), **NOT_CHECKED}
            for i, (c, usd) in enumerate(self.candidates)
        ]
        out += [{"status": "dropped", "order": None, **d.to_json()} for d in self.dropped]
        return out

    def to_json(self) -> dict[str, Any]:
        plan = self.plan
        return {
            "schema": 1,
            "run_id": plan.run_id,
            "resource_group": plan.resource_group,
            "region": plan.region,
            "tags": plan.tags,
            "stages": [
                [
                    {"type": r.type, "name": r.name, "id": r.id, "depends_on": list(r.depends_on), "body": r.body}
                    for r in stage
                ]
                for stage in plan.stages
            ],
            "requests": [r.__dict__ for r in self.requests],
            "polls": self.polls,
            "ssh_sources": self.source_labels,
            "estimate": {
                "provision_seconds": round(self.estimate_seconds, 1),
                "boot_to_ssh_seconds": self.boot_seconds,
                "usd_per_hour": round(self.hourly_usd, 4),
                "max_cost_usd": round(self.max_cost_usd, 2),
                "budget_usd": self.budget_usd,
                "price_snapshot": catalog.PRICE_SNAPSHOT_DATE,
            },
            "candidate_order": self.order,
            "candidates": self.candidates_json(),
            "warnings": self.warnings,
        }


def dry_run(
    spec: JobSpec, *, of: str = "azure", now: datetime | None = None, run_id: str | None = None
) -> DryRunReport:
    """Run the real provisioner and teardown against a throwaway emulator and report what they sent."""
    from pathlib import Path

    from orchestrator.azure.provision import Provisioner
    from orchestrator.azure.teardown import delete_group
    from orchestrator.targets.dryrun import DRY_RUN_SUBSCRIPTION, DryRunTarget

    now = now or datetime.now(UTC)
    run_id = run_id or new_run_id(spec.name)
    target = DryRunTarget(Path("."), of=of, start=now.timestamp())
    warnings: list[str] = []
    sources = target.ssh_sources(list(spec.ssh.allowed_cidrs), spec.source, warnings.append)
    warnings = [*sources.warnings, *warnings]
    spec = spec.model_copy(update={"ssh": spec.ssh.model_copy(update={"allowed_cidrs": sources.cidrs})})
    plan = build_plan(
        spec,
        run_id,
        subscription_id=DRY_RUN_SUBSCRIPTION,
        owner=owner_name(),
        now=now,
        ssh_public_key=PLACEHOLDER_PUBLIC_KEY,
    )
    with target.session() as session:
        Provisioner(session).provision(plan)
        provision_count = len(target.requests())
        delete_group(session, plan.resource_group, wait=True)
    lines, polls = [], 0
    for i, r in enumerate(target.requests()):
        if r.poll:
            polls += 1
            continue
        lines.append(
            RequestLine(r.method, r.path, r.api_version, r.status, "provision" if i < provision_count else "teardown")
        )
    found = spec.resources.candidates
    return DryRunReport(
        candidates=priced(spec, found.ordered),
        dropped=list(found.dropped),
        order=found.order,
        plan=plan,
        requests=lines,
        polls=polls,
        estimate_seconds=plan.critical_path_seconds(),
        boot_seconds=catalog.TYPICAL_BOOT_TO_SSH_SECONDS,
        hourly_usd=plan.hourly_usd,
        max_cost_usd=plan.hourly_usd * spec.max_duration / 3600,
        budget_usd=spec.budget_usd,
        warnings=[*warnings, *(w for w in plan.warnings if w not in warnings and not _said(w, sources.warnings))],
        source_labels=sources.labels,
    )


def _said(plan_warning: str, target_warnings: list[str]) -> bool:
    """The plan's 'no SSH rule' warning repeats what the target says when it resolved an empty list."""
    return plan_warning == NO_SSH_RULE_WARNING and any("allowed_cidrs is empty" in w for w in target_warnings)
