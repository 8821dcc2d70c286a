"""Azure failures -> typed errors with a message a user can act on.

Classification is by ARM's `error.code`, never by exception class: a 409 arrives as
ResourceExistsError for SkuNotAvailable, OperationNotAllowed and ResourceGroupBeingDeleted alike,
and AllocationFailed arrives as a failed LRO with status 200.
"""

from __future__ import annotations

import re
from typing import Any

from orchestrator.errors import CloudError


class AuthError(CloudError):
    pass


class SkuNotAvailableError(CloudError):
    pass


class QuotaExceededError(CloudError):
    def __init__(
        self,
        message: str,
        *,
        code: str,
        resource: str = "",
        family: str = "",
        region: str = "",
        limit: int | None = None,
        usage: int | None = None,
        required: int | None = None,
    ) -> None:
        super().__init__(message, code=code, resource=resource)
        self.family, self.region = family, region
        self.limit, self.usage, self.required = limit, usage, required


class CapacityError(CloudError):
    """No capacity for the size (region or zone): retry later, elsewhere, or without a zone."""


class InvalidRequestError(CloudError):
    pass


class GroupBeingDeletedError(CloudError):
    pass


class DiskTooSmallError(InvalidRequestError):
    """OperationNotAllowed: the OS disk asked for is smaller than the image's."""

    def __init__(
        self,
        message: str,
        *,
        code: str,
        resource: str = "",
        requested_gb: int | None = None,
        image_gb: int | None = None,
    ) -> None:
        super().__init__(message, code=code, resource=resource)
        self.requested_gb, self.image_gb = requested_gb, image_gb


class ProviderNotRegisteredError(CloudError):
    """MissingSubscriptionRegistration: a resource provider is not registered (new subscriptions)."""

    def __init__(self, message: str, *, code: str, resource: str = "", namespace: str = "") -> None:
        super().__init__(message, code=code, resource=resource)
        self.namespace = namespace


class PolicyDeniedError(CloudError):
    """RequestDisallowedByPolicy: an Azure Policy assignment denied the request."""

    def __init__(
        self, message: str, *, code: str, resource: str = "", policies: list[dict[str, str]] | None = None
    ) -> None:
        super().__init__(message, code=code, resource=resource)
        self.policies = policies or []


class ThrottledError(CloudError):
    pass


class NotFoundError(CloudError):
    pass


CAPACITY_CODES = {
    "AllocationFailed",
    "ZonalAllocationFailed",
    "OverconstrainedAllocationRequest",
    "OverconstrainedZonalAllocationRequest",
    "SpotAllocationFailed",
}
QUOTA_CODES = {"QuotaExceeded", "ResourceQuotaExceeded"}
AUTH_CODES = {
    "AuthenticationFailed",
    "InvalidAuthenticationToken",
    "InvalidAuthenticationTokenTenant",
    "ExpiredAuthenticationToken",
    "AuthorizationFailed",
    "LinkedAuthorizationFailed",
}
INVALID_CODES = {
    "InvalidParameter",
    "InvalidRequestContent",
    "InvalidResourceName",
    "InvalidResourceReference",
    "InvalidTemplate",
    "PropertyChangeNotAllowed",
    "LocationNotAvailableForResourceType",
    "InvalidResourceGroupLocation",
    "BadRequest",
    "InvalidAddressPrefixFormat",
    "NetcfgSubnetRangeOutsideVnet",
    "ReferencedResourceNotProvisioned",
    "SecurityRuleConflict",
    "ZonesNotSupported",
}

_DISK_RE = re.compile(
    r"specified disk size (?P<requested>\d+) GB is smaller than the size of the corresponding disk in the VM "
    r"image: (?P<image>\d+) GB",
    re.I,
)
_NAMESPACE_RE = re.compile(r"namespace '(?P<ns>[\w.]+)'", re.I)
_QUOTA_RE = re.compile(
    r"exceeding approved (?P<family>\S+) Cores quota.*?Location: (?P<region>[\w-]+).*?Current Limit: "
    r"(?P<limit>\d+).*?Current Usage: (?P<usage>\d+).*?Additional Required: (?P<required>\d+)",
    re.S,
)


def _error_body(exc: BaseException) -> dict[str, Any]:
    """ARM's error object (code, message, target, details, additionalInfo) as sent, or {}."""
    response = getattr(exc, "response", None)
    try:
        body = response.json() if response is not None else None
    except Exception:  # a body that is not JSON
        body = None
    if isinstance(body, dict):
        inner = body.get("error")
        if isinstance(inner, dict):  # {"error": {...}} and a failed LRO's {"status": "Failed", "error": {...}}
            return inner
        if body.get("code"):
            return body
    return {}


def error_code_and_message(exc: BaseException) -> tuple[str, str]:
    """ARM's error code and message from an azure-core exception (sync or failed-LRO)."""
    err: Any = getattr(exc, "error", None)
    code = getattr(err, "code", None) or ""
    message = getattr(err, "message", None) or ""
    if not code:
        inner = _error_body(exc)
        code = str(inner.get("code") or "")
        message = str(inner.get("message") or message)
    if not message:
        message = str(getattr(exc, "message", "") or exc)
    return code, message


def error_details(exc: BaseException) -> tuple[list[dict[str, Any]], list[dict[str, Any]]]:
    """The error's `details` and `additionalInfo` (each a list of plain dicts), wherever azure-core put them.

    ARMErrorFormat parses `additionalInfo` into TypedErrorInfo(type, info) objects and `details` into
    nested error objects; the raw response body has both as JSON. Details' own additionalInfo is
    included (Azure nests a policy violation there when the top-level code is generic).
    """
    details: list[dict[str, Any]] = []
    infos: list[dict[str, Any]] = []
    body = _error_body(exc)
    if body:
        details = [d for d in body.get("details") or [] if isinstance(d, dict)]
        infos = [i for i in body.get("additionalInfo") or [] if isinstance(i, dict)]
    else:
        err: Any = getattr(exc, "error", None)
        for d in getattr(err, "details", None) or []:
            details.append(
                {
                    "code": getattr(d, "code", None),
                    "message": getattr(d, "message", None),
                    "target": getattr(d, "target", None),
                    "additionalInfo": [
                        {"type": getattr(i, "type", None), "info": getattr(i, "info", None)}
                        for i in getattr(d, "additional_info", None) or []
                    ],
                }
            )
        infos = [
            {"type": getattr(i, "type", None), "info": getattr(i, "info", None)}
            for i in getattr(err, "additional_info", None) or []
        ]
    for d in details:
        infos.extend(i for i in d.get("additionalInfo") or [] if isinstance(i, dict))
    return details, infos


def _policy_violations(infos: list[dict[str, Any]]) -> list[dict[str, str]]:
    out: list[dict[str, str]] = []
    for item in infos:
        info = item.get("info")
        if item.get("type") != "PolicyViolation" or not isinstance(info, dict):
            continue
        keys = (
            "policyDefinitionDisplayName",
            "policyDefinitionName",
            "policyDefinitionId",
            "policyAssignmentDisplayName",
            "policyAssignmentName",
            "policyAssignmentId",
            "policyAssignmentScope",
            "policySetDefinitionDisplayName",
            "policyDefinitionEffect",
        )
        out.append({k: str(info[k]) for k in keys if info.get(k)})
    return out


def classify(exc: BaseException, *, resource: str = "", size: str = "", region: str = "") -> CloudError:
    """Turn any azure-core error into a CloudError subclass whose str() is the user's paragraph."""
    from azure.core.exceptions import ClientAuthenticationError

    code, message = error_code_and_message(exc)
    where = f" while {resource}" if resource else ""  # resource names the operation: "creating virtualMachines x"
    status = getattr(getattr(exc, "response", None), "status_code", None) or getattr(exc, "status_code", None)

    if code in AUTH_CODES or (isinstance(exc, ClientAuthenticationError) and not code):
        if code in {"AuthorizationFailed", "LinkedAuthorizationFailed"}:
            return AuthError(
                f"Azure refused{where}: your identity lacks a permission ({code}). {message}\n"
                "Ask for the custom role in templates/azure-role.json (exactly the actions this tool uses; "
                "see README) or Contributor on the subscription.",
                code=code,
                resource=resource,
            )
        return AuthError(
            f"Azure could not authenticate you{where} ({code or 'no credential'}): {message}\n"
            "Run `az login` (or set AZURE_CLIENT_ID/AZURE_TENANT_ID/AZURE_CLIENT_SECRET, or use a managed or "
            "workload identity) and try again.",
            code=code or "AuthenticationFailed",
            resource=resource,
        )
    if code == "SkuNotAvailable":
        return SkuNotAvailableError(
            f"Azure says {size or 'the VM size'} is not available in {region or 'this region'}{where} "
            "(SkuNotAvailable). Pick another region with --region, another size with --vm-size, or drop "
            "`zone`; `az vm list-skus -l REGION --size SIZE` shows where it is offered to you.",
            code=code,
            resource=resource,
        )
    if code == "MissingSubscriptionRegistration":
        details, _ = error_details(exc)
        namespace = next((str(d["target"]) for d in details if d.get("target")), "")
        if not namespace and (m := _NAMESPACE_RE.search(message)):
            namespace = m["ns"]
        ns = namespace or "<the namespace in the message>"
        return ProviderNotRegisteredError(
            f"This subscription is not registered for the resource provider {ns}{where} "
            f"(MissingSubscriptionRegistration); new subscriptions start with few providers registered. "
            f"Register it once, with Owner or Contributor rights on the subscription: `az provider register "
            f"--namespace {ns}` (it takes a minute or two; `az provider show --namespace {ns} --query "
            "registrationState` says Registered when done), then run again.",
            code=code,
            resource=resource,
            namespace=namespace,
        )
    if code == "RequestDisallowedByPolicy":
        _, infos = error_details(exc)
        policies = _policy_violations(infos)
        if policies:
            named = "; ".join(
                "policy "
                + repr(p.get("policyDefinitionDisplayName") or p.get("policyDefinitionName") or "?")
                + (f" (definition {p['policyDefinitionName']})" if p.get("policyDefinitionName") else "")
                + " assigned as "
                + repr(p.get("policyAssignmentDisplayName") or p.get("policyAssignmentName") or "?")
                + (f" (assignment {p['policyAssignmentName']})" if p.get("policyAssignmentName") else "")
                + (f" at {p['policyAssignmentScope']}" if p.get("policyAssignmentScope") else "")
                for p in policies
            )
            what = f"Azure Policy denied the request{where}: {named}."
        else:
            what = f"Azure Policy denied the request{where} (RequestDisallowedByPolicy): {message}"
        return PolicyDeniedError(
            f"{what} Your organisation's policy forbids what this run asked for (a region, size, public IP, "
            "tag...); change the job to comply, or ask the policy's owners for an exemption. `az policy "
            "assignment show --name NAME --scope SCOPE` shows the rule.",
            code=code,
            resource=resource,
            policies=policies,
        )
    if code == "OperationNotAllowed" and (m := _DISK_RE.search(message)):
        requested, image_gb = int(m["requested"]), int(m["image"])
        return DiskTooSmallError(
            f"Azure refused the OS disk{where}: {requested} GB is smaller than the image's own {image_gb} GB disk "
            f"(OperationNotAllowed). Set resources.disk_gb to at least {image_gb}.",
            code=code,
            resource=resource,
            requested_gb=requested,
            image_gb=image_gb,
        )
    quota = _QUOTA_RE.search(message) if code in QUOTA_CODES | {"OperationNotAllowed"} else None
    if quota:
        m = quota
        limit, usage, required = int(m["limit"]), int(m["usage"]), int(m["required"])
        return QuotaExceededError(
            f"Not enough vCPU quota for {m['family']} in {m['region']}{where}: limit {limit}, in use "
            f"{usage}, this run needs {required} more (so at least {usage + required}). Request an "
            "increase in the portal (Subscriptions > Usage + quotas), free cores, use fewer nodes, or "
            "try --spot or another region.",
            code=code,
            resource=resource,
            family=m["family"],
            region=m["region"],
            limit=limit,
            usage=usage,
            required=required,
        )
    if code in QUOTA_CODES or (code == "OperationNotAllowed" and "quota" in message.lower()):
        return QuotaExceededError(
            f"Azure refused{where}: quota exceeded ({code}). {message}", code=code, resource=resource
        )
    if code == "OperationNotAllowed":
        return CloudError(f"Azure refused{where} (OperationNotAllowed): {message}", code=code, resource=resource)
    if code in CAPACITY_CODES:
        advice = {
            "ZonalAllocationFailed": "Remove `zone` (or pick another) so Azure may place it in any zone",
            "OverconstrainedAllocationRequest": "Remove constraints (zone, accelerated networking) or pick "
            "another size",
            "OverconstrainedZonalAllocationRequest": "Remove `zone` or pick another size",
        }.get(code, "Try again later, another region (--region) or another size (--vm-size)")
        return CapacityError(
            f"Azure has no capacity for {size or 'this VM size'} in {region or 'this region'} right "
            f"now{where} ({code}). {advice}.",
            code=code,
            resource=resource,
        )
    if code in {"ResourceGroupBeingDeleted"}:
        return GroupBeingDeletedError(
            f"The resource group is still being deleted{where} (ResourceGroupBeingDeleted). Wait for "
            "`orchestrator down` to finish, or start a new run (it gets a new group).",
            code=code,
            resource=resource,
        )
    if code in {"TooManyRequests", "SubscriptionRequestsThrottled"} or status == 429:
        return ThrottledError(
            f"Azure kept throttling requests{where} ({code or 429}) after retries. Wait a few minutes; "
            "other tools on this subscription may be using its request budget.",
            code=code or "429",
            resource=resource,
        )
    if code in INVALID_CODES or status == 400:
        return InvalidRequestError(
            f"Azure rejected the request{where} ({code or status}): {message}", code=code, resource=resource
        )
    if code in {"ResourceNotFound", "ResourceGroupNotFound", "NotFound"} or status == 404:
        return NotFoundError(f"Not found{where} ({code or 404}): {message}", code=code, resource=resource)
    return CloudError(
        f"Azure failed{where} ({code or status or type(exc).__name__}): {message}",
        code=code,
        resource=resource,
    )
