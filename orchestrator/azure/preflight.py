"""The preflight: before anything is created, ask Azure whether this job can run, and say how to fix
what would stop it. A quota check takes about a second; a doomed provision attempt costs 30 s to
minutes plus cleanup.

Each check is a pure function over Azure's answers in their documented wire shapes (the JSON the
SDK's models hold, `Model.as_dict()`), so they are tested without any HTTP. `run_preflight` sends
the requests in parallel on one AzureSession, through the real SDK:

  credential   a token for ARM, and the subscription answering (its providers' GET)
  providers    GET /subscriptions/{s}/providers/{ns} for Microsoft.Compute, Microsoft.Network and
               Microsoft.DevTestLab; an unregistered one is registered (POST .../register, then its
               GET polled until Registered, bounded) when the caller's role allows {ns}/register/action
  quota        Compute usages (GET .../providers/Microsoft.Compute/locations/{region}/usages): the
               size's family row and the regional `cores` row (which caps every family) for on-demand
               VMs, the regional `lowPriorityCores` row alone for spot, against nodes x vCPUs
  sku          Resource SKUs (GET .../providers/Microsoft.Compute/skus?$filter=location eq '{region}'):
               offered in the region, in the zone (`locationInfo.zones`), not restricted for this
               subscription (`restrictions` of type Location or Zone), spot-capable when spot
  image        VirtualMachineImages: the newest version (list, $orderby=name desc, $top=1) or the
               pinned one, then its GET: the image exists in the region, and its
               `osDiskImage.sizeInGb` is not larger than resources.disk_gb
  permissions  GET /subscriptions/{s}/providers/Microsoft.Authorization/permissions (no SDK client
               pinned: azure-core's HttpRequest through the resource client's pipeline): the caller's
               actions/notActions cover templates/azure-role.json; a missing right the run can do
               without (the preflight's own reads, registering providers already registered) is a
               warning
  policy       POST /subscriptions/{s}/providers/Microsoft.PolicyInsights/checkPolicyRestrictions with
               the VM's body: which assignment would deny what, and the values it allows

When quota or the size's availability fails in the asked region, the other catalog regions that
offer the size are asked (usages and SKUs, in parallel) for one where it has quota and is offered.
A problem is one paragraph with its fix; warnings do not stop a run. Exit codes: 0 the job can run,
3 Azure would refuse it, 2 the job file itself is wrong (an OS disk smaller than the image's).
"""

from __future__ import annotations

import re
import threading
import time
from collections.abc import Callable, Iterable
from concurrent.futures import Future, ThreadPoolExecutor
from dataclasses import dataclass, field, replace
from datetime import UTC, datetime
from typing import TYPE_CHECKING, Any, Protocol

from orchestrator import catalog
from orchestrator.azure import permissions as rbac
from orchestrator.azure.errors import (
    AuthError,
    DiskTooSmallError,
    InvalidRequestError,
    PolicyDeniedError,
    ProviderNotRegisteredError,
    QuotaExceededError,
    SkuNotAvailableError,
    classify,
    error_code_and_message,
)
from orchestrator.errors import EXIT_AZURE_REFUSED, EXIT_BAD_INPUT, EXIT_OK, CloudError

if TYPE_CHECKING:
    from orchestrator.azure.session import AzureSession
    from orchestrator.candidates import Candidate
    from orchestrator.spec import JobSpec

OK, WARNING, PROBLEM = "ok", "warning", "problem"
PROVIDERS = ("Microsoft.Compute", "Microsoft.Network", "Microsoft.DevTestLab")
ARM_SCOPE = "https://management.azure.com/.default"
PERMISSIONS_API = "2022-04-01"
POLICY_API = "2024-10-01"
VM_API = "2026-04-01"  # the Compute api-version azure-mgmt-compute sends for virtualMachines
QUOTA_PAGE = "https://portal.azure.com/#view/Microsoft_Azure_Capacity/QuotaMenuBlade/~/myQuotas"
QUOTA_DOCS = {
    "family": "https://learn.microsoft.com/azure/quotas/per-vm-quota-requests",
    "cores": "https://learn.microsoft.com/azure/quotas/regional-quota-requests",
    "lowPriorityCores": "https://learn.microsoft.com/azure/quotas/spot-quota",
}
REGISTRATION_WAIT_S = 300.0  # Azure says a registration takes a minute or two
REGISTRATION_POLL_S = 5.0
WORKERS = 32
CHECK_ORDER = ("credential", "providers", "quota", "sku", "image", "permissions", "autostop", "policy")


class _Says(Protocol):
    def say(self, text: str) -> None: ...


# ---------------------------------------------------------------------------------------- results


@dataclass(frozen=True)
class Check:
    name: str
    status: str  # ok, warning, problem
    message: str  # one paragraph: what, where, what to do
    code: str = ""  # a problem: the error code Azure would answer the run with
    bad_input: bool = False  # a problem in the job file (exit 2) rather than Azure's refusal (exit 3)
    details: dict[str, Any] = field(default_factory=dict)

    def to_json(self) -> dict[str, Any]:
        out: dict[str, Any] = {"name": self.name, "status": self.status, "message": self.message}
        if self.code:
            out["code"] = self.code
        if self.details:
            out["details"] = self.details
        return out


def ok(name: str, message: str, **details: Any) -> Check:
    return Check(name, OK, message, details=details)


def warning(name: str, message: str, **details: Any) -> Check:
    return Check(name, WARNING, message, details=details)


def problem(name: str, message: str, code: str, *, bad_input: bool = False, **details: Any) -> Check:
    return Check(name, PROBLEM, message, code, bad_input, details)


@dataclass
class PreflightReport:
    checks: list[Check]
    subscription: str = ""
    seconds: float = 0.0
    requests: int = 0
    job: str | None = None
    region: str | None = None
    vm_size: str | None = None
    # The job's candidates the preflight did not rule out, in order, and those it dropped with why.
    candidates: list[Candidate] = field(default_factory=list)
    dropped: list[tuple[Candidate, str]] = field(default_factory=list)

    @property
    def problems(self) -> list[Check]:
        return [c for c in self.checks if c.status == PROBLEM]

    @property
    def warnings(self) -> list[Check]:
        return [c for c in self.checks if c.status == WARNING]

    @property
    def exit_code(self) -> int:
        if not self.problems:
            return EXIT_OK
        return EXIT_BAD_INPUT if all(c.bad_input for c in self.problems) else EXIT_AZURE_REFUSED

    def message(self) -> str:
        """The problems, one paragraph each."""
        return "\n\n".join(c.message for c in self.problems)

    def error(self) -> CloudError:
        """The classified error a run stops with: the first problem's kind, every problem's paragraph."""
        first = self.problems[0]
        d = first.details
        text = self.message()
        err: CloudError
        if first.code == "QuotaExceeded":
            err = QuotaExceededError(
                text,
                code=first.code,
                family=str(d.get("family", "")),
                region=str(d.get("region", "")),
                limit=d.get("limit"),
                usage=d.get("usage"),
                required=d.get("required"),
            )
        elif first.code == "SkuNotAvailable":
            err = SkuNotAvailableError(text, code=first.code)
        elif first.code == "MissingSubscriptionRegistration":
            err = ProviderNotRegisteredError(text, code=first.code, namespace=str(d.get("namespace", "")))
        elif first.code == "RequestDisallowedByPolicy":
            err = PolicyDeniedError(text, code=first.code, policies=list(d.get("policies", [])))
        elif first.code == "DiskTooSmall":
            err = DiskTooSmallError(
                text, code="OperationNotAllowed", requested_gb=d.get("requested_gb"), image_gb=d.get("image_gb")
            )
        elif first.code in {"AuthorizationFailed", "AuthenticationFailed", "SubscriptionNotFound"}:
            err = AuthError(text, code=first.code)
        elif first.code == "PlatformImageNotFound":
            err = InvalidRequestError(text, code=first.code)
        else:
            err = CloudError(text, code=first.code)
        err.exit_code = self.exit_code  # an OS disk smaller than the image is the job file's fault: 2
        err.preflight = self  # type: ignore[attr-defined]
        return err

    def to_json(self) -> dict[str, Any]:
        return {
            "schema": 1,
            "event": "check",
            "ok": not self.problems,
            "exit_code": self.exit_code,
            "subscription": self.subscription,
            "job": self.job,
            "region": self.region,
            "vm_size": self.vm_size,
            "seconds": round(self.seconds, 3),
            "requests": self.requests,
            "checks": [c.to_json() for c in self.checks],
            "candidates": [c.to_json() for c in self.candidates],
            "dropped": [{**c.to_json(), "reason": why} for c, why in self.dropped],
        }


# ---------------------------------------------------------------------------------------- the job


@dataclass(frozen=True)
class Need:
    """What the job asks Azure for."""

    size: catalog.VmSize
    region: str
    zone: str | None
    nodes: int
    spot: bool
    image: catalog.Image
    image_label: str
    disk_gb: int

    @property
    def vcpus(self) -> int:
        return self.nodes * self.size.vcpus

    @classmethod
    def of(cls, spec: JobSpec) -> Need:
        r = spec.resources
        size = r.size
        return cls(
            size,
            r.region,
            r.zone,
            spec.nodes,
            r.spot,
            catalog.resolve_image(r.image, gpu=size.is_gpu),
            catalog.image_label(r.image, size.is_gpu),
            r.disk_gb,
        )

    def what(self) -> str:
        kind = "spot " if self.spot else ""
        return f"{self.nodes} x {kind}{self.size.name} ({self.vcpus} vCPUs)"

    @classmethod
    def of_candidate(cls, spec: JobSpec, c: Candidate) -> Need:
        r = spec.resources
        size = c.vm
        image = catalog.resolve_image(r.image, gpu=size.is_gpu)
        return cls(
            size, c.region, c.zone, spec.nodes, c.spot, image, catalog.image_label(r.image, size.is_gpu), r.disk_gb
        )


# ------------------------------------------------------------------------------ pure checks


def normalise(name: str) -> str:
    """A quota row's name for comparing: `standardNCASv3_T4Family` (name.value, Resource SKUs' family)
    and `Standard NCASv3_T4 Family` (name.localizedValue) both become `standardncasv3t4family`."""
    return re.sub(r"[\s_\-]", "", name).lower()


_REGIONAL_LOCALIZED = {"totalregionalvcpus": "cores", "totalregionallowpriorityvcpus": "lowPriorityCores"}


def usage_rows(usages: Iterable[dict[str, Any]]) -> dict[str, dict[str, Any]]:
    """Compute usages keyed by normalised name, under both `name.value` and `name.localizedValue`."""
    rows: dict[str, dict[str, Any]] = {}
    for row in usages:
        name = row.get("name") or {}
        for key in (name.get("value"), name.get("localizedValue")):
            if key:
                k = normalise(str(key))
                rows[normalise(_REGIONAL_LOCALIZED.get(k, k))] = row
    return rows


def _row_text(row: dict[str, Any], fallback: str) -> str:
    name = row.get("name") or {}
    localized, value = name.get("localizedValue"), name.get("value")
    if localized and value and localized != value:
        return f"{localized} ({value})"
    return str(localized or value or fallback)


def quota_shortfalls(usages: Iterable[dict[str, Any]], need: Need) -> list[dict[str, Any]]:
    """The quota rows this job would exceed: [] when it fits. Spot VMs draw only on the regional
    `lowPriorityCores` row; on-demand VMs on their family's row and the regional `cores` row."""
    rows = usage_rows(usages)
    wanted = ["lowPriorityCores"] if need.spot else [need.size.family, "cores"]
    out = []
    for key in wanted:
        row = rows.get(normalise(key))
        if row is None:
            if key == "cores":
                continue  # no regional row listed: nothing caps the family's
            out.append({"row": key, "name": key, "limit": 0, "usage": 0, "missing": True})
            continue
        limit, usage = int(row.get("limit") or 0), int(row.get("currentValue") or 0)
        if limit - usage < need.vcpus:
            out.append({"row": key, "name": _row_text(row, key), "limit": limit, "usage": usage})
    return out


def check_quota(usages: Iterable[dict[str, Any]], need: Need, alternatives: list[str] | None = None) -> Check:
    short = quota_shortfalls(usages, need)
    if not short:
        kind = "spot (lowPriorityCores)" if need.spot else f"{need.size.family} and regional"
        return ok("quota", f"{need.what()} fit the {kind} vCPU quota in {need.region}.")
    parts, docs = [], []
    for s in short:
        if s.get("missing"):
            parts.append(f"no quota row for {s['name']} is listed in {need.region} (the family is not offered there)")
        else:
            parts.append(f"{s['name']} allows {s['limit']} with {s['usage']} in use")
        doc_key = s["row"] if s["row"] in {"cores", "lowPriorityCores"} else "family"
        docs.append(QUOTA_DOCS[doc_key])
    target = short[0]["usage"] + need.vcpus
    message = (
        f"Not enough vCPU quota in {need.region} for {need.what()}: {'; '.join(parts)}. Request an increase to at "
        f"least {target} on the Quotas page ({QUOTA_PAGE}: Compute, region {need.region}; how: "
        f"{', '.join(dict.fromkeys(docs))}); requests for GPU families are reviewed and can take days. "
        + _elsewhere(alternatives, need)
    )
    first = short[0]
    return problem(
        "quota",
        message.strip(),
        "QuotaExceeded",
        family=first["row"],
        region=need.region,
        limit=first["limit"],
        usage=first["usage"],
        required=need.vcpus,
        shortfalls=short,
        alternatives=alternatives or [],
    )


def _elsewhere(alternatives: list[str] | None, need: Need) -> str:
    """Where else the size has quota and is offered to this subscription (None: not asked)."""
    if alternatives is None:
        return ""
    if not alternatives:
        return f"No other region this tool knows has quota for {need.what()} and offers it to you."
    named = ", ".join(f"`--region {r}`" for r in alternatives[:3])
    return f"Regions with quota for it that offer it to you, cheapest first: {named}."


def _sku_for(skus: Iterable[dict[str, Any]], size: str, region: str) -> dict[str, Any] | None:
    for sku in skus:
        if str(sku.get("resourceType", "")).lower() != "virtualmachines":
            continue
        if str(sku.get("name", "")).lower() != size.lower():
            continue
        if region in {str(loc).lower() for loc in sku.get("locations") or []}:
            return sku
    return None


def sku_availability(skus: Iterable[dict[str, Any]], need: Need, zone: str | None) -> tuple[str, list[str], str]:
    """("ok" | "absent" | "location" | "zone" | "zones" | "spot", the zones offered to you, the reason code)."""
    sku = _sku_for(skus, need.size.name, need.region)
    if sku is None:
        return "absent", [], ""
    info: dict[str, Any] = next(
        (i for i in sku.get("locationInfo") or [] if str(i.get("location", "")).lower() == need.region),
        {},
    )
    zones = [str(z) for z in info.get("zones") or []]
    restricted: set[str] = set()
    reason = ""
    for r in sku.get("restrictions") or []:
        values = {str(v).lower() for v in r.get("values") or []}
        rinfo = r.get("restrictionInfo") or {}
        if r.get("type") == "Location" and (not values or need.region in values):
            return "location", [], str(r.get("reasonCode", ""))
        if r.get("type") == "Zone" and (not values or need.region in values):
            restricted |= {str(z) for z in rinfo.get("zones") or []}
            reason = str(r.get("reasonCode", ""))
    offered = sorted(z for z in zones if z not in restricted)
    if zone is not None:
        if zone in restricted:
            return "zone", offered, reason
        if zone not in zones:
            return "zones", offered, ""
    elif zones and not offered:
        return "zone", offered, reason
    caps = {str(c.get("name")): str(c.get("value")) for c in sku.get("capabilities") or []}
    if need.spot and caps.get("LowPriorityCapable", "True").lower() == "false":
        return "spot", offered, ""
    return "ok", offered, ""


def check_sku(skus: Iterable[dict[str, Any]], need: Need, alternatives: list[str] | None = None) -> Check:
    state, offered, reason = sku_availability(skus, need, need.zone)
    size, region = need.size.name, need.region
    where = f"{region} zone {need.zone}" if need.zone else region
    if state == "ok":
        zones = f" (zones offered to you: {', '.join(offered)})" if offered else ""
        return ok("sku", f"{size} is offered to this subscription in {where}{zones}.")
    why = {
        "NotAvailableForSubscription": "not available for this subscription",
        "QuotaId": "not available to this subscription's offer type (QuotaId)",
    }.get(reason, "restricted")
    lift = (
        ", or ask Microsoft to lift the restriction (a support request of type 'Service and subscription limits "
        "(quotas)' for this size and region)"
        if reason == "NotAvailableForSubscription"
        else ""
    )
    if state == "absent":
        text = f"Azure does not offer {size} in {region} (Resource SKUs lists no such size there)."
        fix = "Pick another region with --region or another size with --vm-size."
    elif state == "location":
        text = f"{size} is {why} in {region} (Resource SKUs: a restriction of type Location, reason {reason})."
        fix = f"Pick another region with --region{lift}."
    elif state == "spot":
        text = f"{size} cannot run as a spot VM in {region} (Resource SKUs: LowPriorityCapable is False)."
        fix = "Drop spot (--no-spot) or pick another size."
    elif state == "zones":
        text = (
            f"{size} is not offered in zone {need.zone} of {region} (its zones there: {', '.join(offered) or 'none'})."
        )
        fix = "Set resources.zone to one of those, or drop `zone` to let Azure choose."
    elif need.zone is not None:
        text = (
            f"{size} is {why} in zone {need.zone} of {region} (Resource SKUs: a restriction of type Zone, reason "
            f"{reason})."
        )
        if offered:
            fix = (
                f"Set resources.zone to {' or '.join(offered)} (offered to you), or drop `zone` to let Azure "
                f"choose{lift}."
            )
        else:
            fix = f"No zone of {region} offers it to you: pick another region with --region{lift}."
    else:
        text = f"{size} is {why} in every zone of {region} (Resource SKUs: restrictions of type Zone, reason {reason})."
        fix = f"Pick another region with --region{lift}."
    message = f"{text} {fix}"
    if alternatives is not None and (alternatives or state in {"absent", "location"}):
        message += " " + _elsewhere(alternatives, need)
    return problem(
        "sku", message.strip(), "SkuNotAvailable", state=state, offered_zones=offered, reason=reason,
        alternatives=alternatives or [],
    )  # fmt: skip


def _version_key(name: str) -> tuple[int | str, ...]:
    return tuple(int(p) if p.isdigit() else p for p in re.split(r"[.]", name))


def newest_version(versions: Iterable[dict[str, Any]]) -> str | None:
    names = [str(v.get("name")) for v in versions if v.get("name")]
    if not names:
        return None
    try:
        return max(names, key=_version_key)
    except TypeError:  # mixed numeric and text parts: the list's order
        return names[0]


def check_image(image_json: dict[str, Any] | None, need: Need, version: str | None = None) -> Check:
    """`image_json` is the image version's GET, or None when Azure has no such image in the region."""
    urn, region = need.image.urn, need.region
    named = need.image_label if need.image_label == urn else f"{need.image_label}, {urn},"
    if image_json is None:
        return problem(
            "image",
            f"The image {named} does not exist in {region}: VirtualMachineImages lists no such "
            f"version there, and creating the VM would fail (PlatformImageNotFound). Check the URN with `az vm image "
            f"list --location {region} --publisher {need.image.publisher} --offer {need.image.offer} --sku "
            f"{need.image.sku} --all -o table`, use a catalog alias (ubuntu-24.04, ubuntu-22.04, ubuntu-hpc-22.04) "
            "or `image: auto`, or pick another region.",
            "PlatformImageNotFound",
            urn=urn,
        )
    disk = ((image_json.get("properties") or {}).get("osDiskImage") or {}).get("sizeInGb")
    shown = f"{urn.rsplit(':', 1)[0]}:{version}" if version else urn
    named = f"{need.image_label} ({shown})" if need.image_label != urn else shown
    if isinstance(disk, int) and disk > need.disk_gb:
        return problem(
            "image",
            f"The OS disk asked for is {need.disk_gb} GB, smaller than the {disk} GB disk of the image "
            f"{named}; Azure refuses a smaller disk (OperationNotAllowed). Set "
            f"resources.disk_gb to at least {disk}.",
            "DiskTooSmall",
            bad_input=True,
            requested_gb=need.disk_gb,
            image_gb=disk,
        )
    size_text = f"; its OS disk is {disk} GB (asked: {need.disk_gb} GB)" if isinstance(disk, int) else ""
    return ok("image", f"The image {named} exists in {region}{size_text}.", urn=shown)


@dataclass(frozen=True)
class ProviderState:
    namespace: str
    state: str  # the last registrationState seen
    registered_now: bool = False  # this preflight registered it
    may_register: bool | None = None  # None: the caller's rights are unknown
    error: str = ""  # why registering failed


def check_providers(states: list[ProviderState], subscription: str) -> Check:
    bad = [s for s in states if s.state != "Registered"]
    done = [s.namespace for s in states if s.registered_now and s.state == "Registered"]
    if not bad:
        text = f"{', '.join(s.namespace for s in states)} are registered for this subscription"
        if done:
            text += f" ({', '.join(done)} registered just now)"
        return ok("providers", text + ".", registered_now=done)
    paragraphs = []
    for s in bad:
        cmd = f"`az provider register --namespace {s.namespace}`"
        show = f"`az provider show --namespace {s.namespace} --query registrationState`"
        if s.state == "Registering":
            paragraphs.append(
                f"{s.namespace} is still registering for subscription {subscription} (started by "
                f"{'this check' if s.registered_now else 'someone'}; Azure usually takes a minute or two, "
                f"sometimes longer). Run again when {show} says Registered."
            )
        else:
            who = (
                f"your role may not register it (it lacks {s.namespace}/register/action)"
                if s.may_register is False
                else f"registering it failed ({s.error})"
                if s.error
                else "it could not be registered"
            )
            paragraphs.append(
                f"The resource provider {s.namespace} is not registered for subscription {subscription} "
                f"({s.state}) and {who}; a run would fail with MissingSubscriptionRegistration. Ask someone with "
                f"Owner or Contributor on the subscription to run {cmd} (a minute or two; {show} says Registered "
                "when done), then run again."
            )
    return problem(
        "providers",
        "\n\n".join(paragraphs),
        "MissingSubscriptionRegistration",
        namespace=bad[0].namespace,
        unregistered=[s.namespace for s in bad],
        registered_now=done,
    )


def check_permissions(
    permissions: list[dict[str, Any]], needed: Iterable[str], optional: Iterable[str], scope: str
) -> Check:
    """Problem: the role lacks an action a run sends. Warning: it lacks only what the preflight (or a
    new subscription's provider registration) uses, which a run can do without."""
    needed, optional_set = list(needed), set(optional)
    missing = [a for a in needed if not rbac.allowed(a, permissions)]
    required = [a for a in missing if a not in optional_set]
    extra = [a for a in missing if a in optional_set]
    role = "the custom role in templates/azure-role.json (see README, 'Azure permissions') or Contributor"
    if required:
        text = (
            f"Your identity lacks {len(required)} permission(s) a run needs at {scope}: {', '.join(required)}. "
            f"Azure would refuse the run (AuthorizationFailed). Ask for {role}."
        )
        if extra:
            text += f" It also lacks what the preflight uses: {', '.join(extra)}."
        return problem("permissions", text, "AuthorizationFailed", missing=required, missing_optional=extra)
    if extra:
        return warning(
            "permissions",
            f"Your identity may do everything a run does, but lacks {', '.join(extra)} (used by this preflight, or "
            f"to register a resource provider on a new subscription); those checks say so where they matter. "
            f"{role[0].upper() + role[1:]} grants them.",
            missing_optional=extra,
        )
    return ok("permissions", f"Your identity may do everything a run needs at {scope} ({len(needed)} actions).")


def check_autostop(permissions: list[dict[str, Any]], scope: str) -> Check:
    """Whether the caller may give a run's VMs their self-stop role (autostop). Either way the run
    can go on: without it, kept and detached VMs stop at their auto-shutdown, so this is never a
    problem, only said."""
    from orchestrator.azure.selfstop import ASSIGN_ACTION, VM_ROLE_NAME

    if rbac.allowed(ASSIGN_ACTION, permissions):
        return ok(
            "autostop",
            f"Your identity may assign roles at {scope} ({ASSIGN_ACTION}): VMs kept with --autostop or detached "
            f"get the role '{VM_ROLE_NAME}' and deallocate themselves when idle.",
            can_assign=True,
        )
    return ok(
        "autostop",
        f"Your identity may not assign roles at {scope} ({ASSIGN_ACTION}), so --autostop cannot make VMs "
        "deallocate themselves: kept and detached runs stop at their auto-shutdown (the run's expiry) or with "
        "`orchestrator down`. An administrator grants it once, limited to that one role (README, 'Autostop').",
        can_assign=False,
    )


def _assignment_name(assignment_id: str) -> str:
    return assignment_id.rstrip("/").rsplit("/", 1)[-1] if assignment_id else "?"


def check_policy(result: dict[str, Any], need: Need) -> Check:
    """PolicyInsights checkPolicyRestrictions' answer for the VM body."""
    evaluations = (result.get("contentEvaluationResult") or {}).get("policyEvaluations") or []
    allowed_values: dict[str, list[str]] = {}
    for fr in result.get("fieldRestrictions") or []:
        for r in fr.get("restrictions") or []:
            ref = (r.get("policy") or {}).get("policyAssignmentId", "")
            if r.get("values"):
                allowed_values[f"{ref}|{fr.get('field')}"] = [str(v) for v in r["values"]]
    denials, policies = [], []
    for e in evaluations:
        effect = str(((e.get("effectDetails") or {}).get("policyEffect")) or "").lower()
        if e.get("evaluationResult") != "NonCompliant" or effect not in {"deny", ""}:
            continue
        info = e.get("policyInfo") or {}
        assignment, definition = str(info.get("policyAssignmentId", "")), str(info.get("policyDefinitionId", ""))
        policies.append({"policyAssignmentId": assignment, "policyDefinitionId": definition})
        why = []
        for x in (e.get("evaluationDetails") or {}).get("evaluatedExpressions") or []:
            field_name = str(x.get("expression") or x.get("path") or "?")
            value, target = x.get("expressionValue"), x.get("targetValue")
            op = str(x.get("operator") or "").lower()
            allowed = allowed_values.get(f"{assignment}|{field_name}")
            if allowed:
                why.append(f"{field_name} is {value!r}; allowed: {', '.join(allowed)}")
            elif op in {"in", "equals"} and x.get("result") == "True":
                shown = ", ".join(map(str, target)) if isinstance(target, list) else target
                why.append(f"{field_name} {value!r} is among the values it forbids ({shown})")
            else:
                shown = ", ".join(map(str, target)) if isinstance(target, list) else target
                why.append(f"{field_name} is {value!r} (the policy wants {op or 'a match with'} {shown})")
        denials.append(
            f"assignment {_assignment_name(assignment)!r} ({assignment}) of definition {definition}: "
            + ("; ".join(why) or "the VM does not comply")
        )
    if not denials:
        return ok("policy", f"No Azure Policy assignment would deny the VM ({need.size.name} in {need.region}).")
    return problem(
        "policy",
        f"Azure Policy would deny the VM ({need.size.name} in {need.region}, RequestDisallowedByPolicy): "
        f"{' | '.join(denials)}. Change the job to comply (--vm-size, --region, ...), or ask the policy's owners "
        "for an exemption; `az policy assignment show --name NAME --scope SCOPE` shows the rule.",
        "RequestDisallowedByPolicy",
        policies=policies,
    )


def could_not_check(name: str, what: str, exc: BaseException) -> Check:
    """A read that failed for another reason than the answer it looks for: the run may still work."""
    code, message = error_code_and_message(exc)
    if code in {"AuthorizationFailed", "LinkedAuthorizationFailed"}:
        why = f"your identity may not read it ({code})"
    elif code == "MissingSubscriptionRegistration":
        why = f"a resource provider is not registered ({message})"
    else:
        why = str(classify(exc)).split("\n")[0]
    return warning(name, f"Could not check {what}: {why}. The run will find out when it asks.", code=code)


# ---------------------------------------------------------------------------------------- running


class _Calls:
    """Counts the HTTP requests sent (azure-core's per-call raw_request_hook; retries not counted)."""

    def __init__(self) -> None:
        self.count = 0
        self._lock = threading.Lock()

    def hook(self, request: Any) -> None:
        with self._lock:
            self.count += 1

    @property
    def kw(self) -> dict[str, Any]:
        return {"raw_request_hook": self.hook}


@dataclass
class _Answer:
    value: Any = None
    error: BaseException | None = None

    @property
    def code(self) -> str:
        return error_code_and_message(self.error)[0] if self.error is not None else ""


def _ask(fn: Callable[[], Any]) -> _Answer:
    from azure.core.exceptions import AzureError

    try:
        return _Answer(fn())
    except AzureError as e:
        return _Answer(error=e)


def _wire(model: Any) -> dict[str, Any]:
    if isinstance(model, dict):
        return model
    out: dict[str, Any] = model.as_dict()
    return out


def _send(session: AzureSession, calls: _Calls, method: str, path: str, api: str, body: Any = None) -> Any:
    """A request no pinned SDK client has an operation for, through the resource client's pipeline."""
    from azure.core.exceptions import (
        ClientAuthenticationError,
        HttpResponseError,
        ResourceExistsError,
        ResourceNotFoundError,
        map_error,
    )
    from azure.core.rest import HttpRequest
    from azure.mgmt.core.exceptions import ARMErrorFormat

    request = HttpRequest(method, path, params={"api-version": api}, json=body)
    response = session.resources.send_request(request, **calls.kw)
    if response.status_code >= 400:
        errors = {401: ClientAuthenticationError, 404: ResourceNotFoundError, 409: ResourceExistsError}
        map_error(status_code=response.status_code, response=response, error_map=errors)
        raise HttpResponseError(response=response, error_format=ARMErrorFormat)
    return response.json() if response.content else None


def _is_auth(exc: BaseException | None) -> bool:
    from azure.core.exceptions import ClientAuthenticationError

    code = error_code_and_message(exc)[0] if exc is not None else ""
    return isinstance(exc, ClientAuthenticationError) or code in {
        "AuthenticationFailed",
        "InvalidAuthenticationToken",
        "InvalidAuthenticationTokenTenant",
        "ExpiredAuthenticationToken",
    }


def _vm_body(spec: JobSpec, subscription: str) -> dict[str, Any]:
    """The VM's PUT body as a run would send it (placeholder key and run id: policy looks at the rest)."""
    from orchestrator.plan import T_VM, build_plan, new_run_id

    plan = build_plan(
        spec,
        new_run_id(spec.name, "check0"),
        subscription_id=subscription,
        owner="preflight",
        now=datetime.now(UTC),
        ssh_public_key=PLACEHOLDER_PUBLIC_KEY,
    )
    vm = next(r for r in plan.resources if r.type == T_VM)
    return {"type": T_VM, "name": vm.name, **vm.body}


PLACEHOLDER_PUBLIC_KEY = (
    "ssh-ed25519 AAAAC3NzaC1lZDI1NTE5AAAAIPlaceholderKeyGeneratedPerRunAtProvisionTime0 generated-per-run"
)


class _Preflight:
    def __init__(self, session: AzureSession, spec: JobSpec | None, say: Callable[[str], None]) -> None:
        self.session, self.spec, self.say = session, spec, say
        self.sub = session.subscription_id
        self.calls = _Calls()
        self.need = Need.of(spec) if spec is not None else None
        self.pool = ThreadPoolExecutor(max_workers=WORKERS, thread_name_prefix="preflight")

    # -------------------------------------------------------------- the requests

    def token(self) -> Any:
        return self.session.credential.get_token(ARM_SCOPE)

    def provider(self, ns: str) -> dict[str, Any]:
        return _wire(self.session.resources.providers.get(ns, **self.calls.kw))

    def register(self, ns: str) -> dict[str, Any]:
        return _wire(self.session.resources.providers.register(ns, **self.calls.kw))

    def permissions(self) -> list[dict[str, Any]]:
        path = f"/subscriptions/{self.sub}/providers/Microsoft.Authorization/permissions"
        out: list[dict[str, Any]] = []
        page = _send(self.session, self.calls, "GET", path, PERMISSIONS_API)
        while True:
            out.extend(page.get("value") or [])
            link = page.get("nextLink")
            if not link:
                return out
            page = self._next(link)

    def _next(self, link: str) -> Any:
        from azure.core.rest import HttpRequest

        response = self.session.resources.send_request(HttpRequest("GET", link), **self.calls.kw)
        response.raise_for_status()
        return response.json()

    def usages(self, region: str) -> list[dict[str, Any]]:
        return [_wire(u) for u in self.session.compute.usage.list(region, **self.calls.kw)]

    def skus(self, region: str) -> list[dict[str, Any]]:
        listed = self.session.compute.resource_skus.list(filter=f"location eq '{region}'", **self.calls.kw)
        return [_wire(s) for s in listed]

    def image(self, need: Need) -> tuple[dict[str, Any] | None, str | None]:
        """(the image version's GET, its version), or (None, None) when the region has no such image."""
        from azure.core.exceptions import ResourceNotFoundError

        img, images = need.image, self.session.compute.virtual_machine_images
        version: str | None = img.version
        try:
            if version == "latest":
                listed = images.list(
                    need.region, img.publisher, img.offer, img.sku, top=1, orderby="name desc", **self.calls.kw
                )
                version = newest_version(_wire(v) for v in listed)
                if version is None:
                    return None, None
            got = images.get(need.region, img.publisher, img.offer, img.sku, version, **self.calls.kw)
        except ResourceNotFoundError:
            return None, None
        return _wire(got), version

    def policy(self, body: dict[str, Any]) -> dict[str, Any]:
        path = f"/subscriptions/{self.sub}/providers/Microsoft.PolicyInsights/checkPolicyRestrictions"
        request = {"resourceDetails": {"resourceContent": body, "apiVersion": VM_API}}
        result: dict[str, Any] = _send(self.session, self.calls, "POST", path, POLICY_API, request) or {}
        return result

    # -------------------------------------------------------------- the run

    def submit(self, fn: Callable[..., Any], *args: Any) -> Future[_Answer]:
        return self.pool.submit(_ask, lambda: fn(*args))

    def run(self) -> list[Check]:
        need, spec = self.need, self.spec
        token = self.submit(self.token)
        providers = {ns: self.submit(self.provider, ns) for ns in PROVIDERS}
        perms = self.submit(self.permissions)
        usages = skus = image = policy = None
        if need is not None and spec is not None:
            usages = self.submit(self.usages, need.region)
            skus = self.submit(self.skus, need.region)
            image = self.submit(self.image, need)
            policy = self.submit(self.policy, _vm_body(spec, self.sub))

        # Credential and subscription: nothing else matters when they fail.
        first = [token.result(), *(f.result() for f in providers.values())]
        failed = next((a.error for a in first if _is_auth(a.error)), None)
        if failed is not None:
            return [problem("credential", str(classify(failed)), "AuthenticationFailed")]
        missing = next(
            (a.error for a in first[1:] if a.code in {"SubscriptionNotFound", "InvalidSubscriptionId"}), None
        )
        if missing is not None:
            return [
                problem(
                    "credential",
                    f"Subscription {self.sub} is not one your identity can use "
                    f"({error_code_and_message(missing)[0]}): pass --subscription ID or set AZURE_SUBSCRIPTION_ID to "
                    "one that `az account list -o table` shows.",
                    "SubscriptionNotFound",
                )
            ]
        checks = [ok("credential", f"Signed in; subscription {self.sub} answers.")]

        perm_answer = perms.result()
        perm_list: list[dict[str, Any]] | None = perm_answer.value if perm_answer.error is None else None
        states = self._providers(providers, perm_list)
        checks.append(check_providers(states, self.sub))
        compute_ok = next(s for s in states if s.namespace == "Microsoft.Compute").state == "Registered"

        if need is not None and usages is not None and skus is not None and image is not None:
            if compute_ok:  # asked again once registration made them answerable
                usages, skus, image = (
                    self.submit(fn, arg) if f.result().code == "MissingSubscriptionRegistration" else f
                    for f, fn, arg in (
                        (usages, self.usages, need.region),
                        (skus, self.skus, need.region),
                        (image, self.image, need),
                    )
                )
            checks += self._capacity(need, usages.result(), skus.result(), compute_ok)
            checks.append(self._image(need, image.result(), compute_ok))

        if perm_list is not None:
            needed = rbac.role_actions()
            checks.append(check_permissions(perm_list, needed, rbac.PREFLIGHT_ACTIONS, f"/subscriptions/{self.sub}"))
            checks.append(check_autostop(perm_list, f"/subscriptions/{self.sub}"))
        else:
            assert perm_answer.error is not None
            checks.append(could_not_check("permissions", "your permissions", perm_answer.error))

        if need is not None and policy is not None:
            answer = policy.result()
            if answer.error is None:
                checks.append(check_policy(answer.value or {}, need))
            else:
                checks.append(
                    could_not_check("policy", "Azure Policy (PolicyInsights checkPolicyRestrictions)", answer.error)
                )
        return checks

    def _providers(
        self, futures: dict[str, Future[_Answer]], perms: list[dict[str, Any]] | None
    ) -> list[ProviderState]:
        states: dict[str, ProviderState] = {}
        to_register: list[str] = []
        for ns, f in futures.items():
            answer = f.result()
            if answer.error is not None:
                states[ns] = ProviderState(ns, "Unknown", error=error_code_and_message(answer.error)[0])
                continue
            state = str(answer.value.get("registrationState", ""))
            if state in {"Registered", "Registering"}:
                states[ns] = ProviderState(ns, state)
                continue
            may = rbac.allowed(f"{ns}/register/action", perms) if perms is not None else None
            states[ns] = ProviderState(ns, state or "NotRegistered", may_register=may)
            if may is not False:
                to_register.append(ns)
        posted = {ns: self.submit(self.register, ns) for ns in to_register}
        for ns, f in posted.items():
            answer = f.result()
            if answer.error is not None:
                code = error_code_and_message(answer.error)[0]
                may = False if code in {"AuthorizationFailed", "LinkedAuthorizationFailed"} else None
                states[ns] = ProviderState(ns, states[ns].state, may_register=may, error=code)
            else:
                self.say(f"registering {ns} for this subscription (Azure takes a minute or two)")
                states[ns] = ProviderState(ns, str(answer.value.get("registrationState", "Registering")), True, True)
        waiting = [ns for ns, s in states.items() if s.state == "Registering"]
        if waiting:
            waited = {ns: self.submit(self._wait_registered, ns) for ns in waiting}
            for ns, f in waited.items():
                answer = f.result()
                state = str(answer.value) if answer.error is None else "Registering"
                states[ns] = ProviderState(ns, state, states[ns].registered_now, states[ns].may_register)
        return [states[ns] for ns in PROVIDERS]

    def _wait_registered(self, ns: str) -> str:
        clock = self.session.clock
        deadline = clock.now() + REGISTRATION_WAIT_S
        while True:
            state = str(self.provider(ns).get("registrationState", ""))
            if state != "Registering" or clock.now() >= deadline:
                return state
            clock.sleep(REGISTRATION_POLL_S)

    def _capacity(self, need: Need, usages: _Answer, skus: _Answer, compute_ok: bool) -> list[Check]:
        if not compute_ok:
            why = "until Microsoft.Compute is registered (see providers)"
            return [
                warning("quota", f"Quota in {need.region} not checked {why}."),
                warning("sku", f"{need.size.name}'s availability in {need.region} not checked {why}."),
            ]
        quota_bad = usages.error is None and bool(quota_shortfalls(usages.value, need))
        state, offered, _ = sku_availability(skus.value, need, need.zone) if skus.error is None else ("ok", [], "")
        sku_bad = state in {"absent", "location", "spot"} or (state != "ok" and not offered)  # not fixed by a zone
        alternatives = self._alternatives(need) if quota_bad or sku_bad else None
        out = []
        if usages.error is None:
            out.append(check_quota(usages.value, need, alternatives))
        else:
            out.append(could_not_check("quota", f"the vCPU quota in {need.region} (Compute usages)", usages.error))
        if skus.error is None:
            out.append(check_sku(skus.value, need, alternatives))
        else:
            out.append(could_not_check("sku", f"{need.size.name}'s availability (Resource SKUs)", skus.error))
        return out

    def _alternatives(self, need: Need) -> list[str]:
        """Other catalog regions offering the size where it has quota and is not restricted, cheapest first."""
        regions = sorted(r for r in need.size.regions if r != need.region)
        asked = {r: (self.submit(self.usages, r), self.submit(self.skus, r)) for r in regions}
        good = []
        for r, (u, s) in asked.items():
            ua, sa = u.result(), s.result()
            if ua.error is not None or sa.error is not None:
                continue
            there = replace(need, region=r, zone=None)
            if not quota_shortfalls(ua.value, there) and sku_availability(sa.value, there, None)[0] == "ok":
                good.append(r)
        return sorted(good, key=lambda r: (catalog.price_per_hour(need.size, r, need.spot), r))

    def _image(self, need: Need, answer: _Answer, compute_ok: bool) -> Check:
        if not compute_ok:
            return warning("image", f"The image {need.image.urn} not checked until Microsoft.Compute is registered.")
        if answer.error is not None:
            return could_not_check("image", f"the image {need.image.urn} in {need.region}", answer.error)
        image_json, version = answer.value
        return check_image(image_json, need, version)


def run_preflight(
    session: AzureSession,
    spec: JobSpec | None = None,
    *,
    say: Callable[[str], None] | None = None,
    job: str | None = None,
) -> PreflightReport:
    """Every check, in parallel, on `session`; without a spec only the job-independent ones
    (credential, subscription, providers, permissions)."""
    t0 = time.monotonic()
    runner = _Preflight(session, spec, say or (lambda _text: None))
    try:
        checks = runner.run()
    finally:
        runner.pool.shutdown(wait=True)
    checks.sort(key=lambda c: CHECK_ORDER.index(c.name) if c.name in CHECK_ORDER else len(CHECK_ORDER))
    return PreflightReport(
        checks,
        subscription=session.subscription_id,
        seconds=time.monotonic() - t0,
        requests=runner.calls.count,
        job=job if job is not None else (spec.source if spec is not None else None),
        region=spec.resources.region if spec is not None else None,
        vm_size=spec.resources.vm_size if spec is not None else None,
    )


def candidate_problem(
    usages: Iterable[dict[str, Any]] | None, skus: Iterable[dict[str, Any]] | None, need: Need
) -> str:
    """Why Azure would refuse this candidate, from its region's Compute usages and Resource SKUs
    (None: that answer is missing, not checked); "" when nothing rules it out."""
    reasons = []
    if skus is not None:
        state, offered, reason = sku_availability(skus, need, need.zone)
        zones = ", ".join(offered) or "none"
        why = f"restricted for this subscription ({reason or 'restricted'})"
        text = {
            "absent": f"not offered in {need.region} (Resource SKUs)",
            "location": f"{why} in {need.region}",
            "zone": f"{why} in zone {need.zone}" if need.zone else f"{why} in every zone of {need.region}",
            "zones": f"not offered in zone {need.zone} (zones offered to you: {zones})",
            "spot": f"no spot in {need.region} (LowPriorityCapable is False)",
        }.get(state)
        if text:
            reasons.append(f"SkuNotAvailable: {text}")
    if usages is not None:
        for short in quota_shortfalls(usages, need):
            reasons.append(
                f"QuotaExceeded: {short['name']} allows {short['limit']} vCPUs with {short['usage']} in use, "
                f"the run needs {need.vcpus}"
            )
    return "; ".join(reasons)


def check_candidates(
    session: AzureSession, spec: JobSpec, candidates: list[Candidate]
) -> tuple[list[Candidate], list[tuple[Candidate, str]], int]:
    """Quota and the size's availability for every candidate, asking each region once (usages and
    SKUs, all regions in parallel): (kept in order, dropped with why, requests sent). A region whose
    answers cannot be read keeps its candidates (not checked: provisioning finds out)."""
    runner = _Preflight(session, None, lambda _text: None)
    try:
        regions = sorted({c.region for c in candidates})
        asked = {r: (runner.submit(runner.usages, r), runner.submit(runner.skus, r)) for r in regions}
        kept: list[Candidate] = []
        dropped: list[tuple[Candidate, str]] = []
        for c in candidates:
            usages, skus = (f.result() for f in asked[c.region])
            reason = candidate_problem(
                usages.value if usages.error is None else None,
                skus.value if skus.error is None else None,
                Need.of_candidate(spec, c),
            )
            if reason:
                dropped.append((c, reason))
            else:
                kept.append(c)
    finally:
        runner.pool.shutdown(wait=True)
    return kept, dropped, runner.calls.count


class CandidatesRefused(CloudError):
    """The preflight can tell Azure would refuse every candidate."""

    def __init__(self, dropped: list[tuple[Candidate, str]], first: PreflightReport) -> None:
        lines = [f"Azure would refuse every candidate ({len(dropped)}), says the preflight:"]
        lines += [f"  {i}. {c.label()}: {why}" for i, (c, why) in enumerate(dropped, 1)]
        detail = "\n\n".join(ch.message for ch in first.problems if ch.name in {"quota", "sku"})
        if detail:
            lines += ["", f"The first candidate in full: {detail}"]
        code = "QuotaExceeded" if "QuotaExceeded" in dropped[0][1] else "SkuNotAvailable"
        super().__init__("\n".join(lines), code=code)
        self.dropped = dropped


def preflight_job(session: AzureSession, spec: JobSpec, say: Callable[[str], None]) -> PreflightReport:
    """Every check for the job, with all its candidates: quota and the size's availability for each
    (one usages and one SKUs request per region), the others (credential, providers, image, rights,
    policy) for the first. The first candidate's quota and size problems become warnings while
    another candidate is left; `report.candidates` are those left, `report.dropped` the others."""
    found: list[Candidate] = list(spec.resources.candidates.ordered)
    result = run_preflight(session, spec, say=say)
    if len(found) == 1:
        result.candidates = [] if result.problems else found
        return result
    if any(c.name not in {"quota", "sku"} for c in result.problems):
        return result  # a problem no other candidate can avoid: the checks say it
    kept, dropped, requests = check_candidates(session, spec, found)
    result.candidates, result.dropped = kept, dropped
    result.requests += requests
    if not kept and not result.problems:  # the first looked fine alone, not with its region's full answers
        lines = "; ".join(f"{c.label()}: {why}" for c, why in dropped)
        result.checks.append(problem("candidates", f"Azure would refuse every candidate: {lines}", "SkuNotAvailable"))
    if kept:
        first = found[0].label()
        result.checks = [
            warning(
                c.name, f"The first candidate, {first}, would be refused; {len(kept)} left. {c.message}", **c.details
            )
            if c.status == PROBLEM
            else c
            for c in result.checks
        ]
    return result


def preflight(spec: JobSpec, session: AzureSession, target: Any, report: _Says) -> PreflightReport:
    """The lifecycle's hook (run and provision, before the run record or any resource exists): say the
    warnings, raise the classified error when Azure would refuse the job; with several candidates it
    fails only when every candidate would be refused (exit 3, the list), dropping the doomed ones
    and saying which and why."""
    session.on_retry = report.say  # a throttled or failing read is said, as the run's requests are
    found: list[Candidate] = list(spec.resources.candidates.ordered)
    if len(found) == 1:
        report.say(f"checking quota, {spec.resources.vm_size} in {spec.resources.region}, image, providers and rights")
    else:
        regions = len({c.region for c in found})
        report.say(
            f"checking quota and availability of {len(found)} candidates in {regions} region(s), image, "
            "providers and rights"
        )
    result = preflight_job(session, spec, report.say)
    for c in result.warnings:
        report.say(f"warning: {c.message}")
    if result.problems:
        if len(found) > 1 and result.dropped and not result.candidates:
            raise CandidatesRefused(result.dropped, result)
        raise result.error()
    for cand, why in result.dropped:
        report.say(f"preflight dropped {cand.label()}: {why}")
    left = "" if len(found) == 1 else f"{len(result.candidates)} of {len(found)} candidates left, "
    report.say(
        f"preflight passed: {left}{len(result.checks)} checks in {result.seconds:.1f} s ({result.requests} requests)"
    )
    return result
