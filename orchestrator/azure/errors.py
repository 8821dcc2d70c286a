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
QUOTA_CODES = {"OperationNotAllowed", "QuotaExceeded", "ResourceQuotaExceeded"}
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

_QUOTA_RE = re.compile(
    r"exceeding approved (?P<family>\S+) Cores quota.*?Location: (?P<region>[\w-]+).*?Current Limit: "
    r"(?P<limit>\d+).*?Current Usage: (?P<usage>\d+).*?Additional Required: (?P<required>\d+)",
    re.S,
)


def error_code_and_message(exc: BaseException) -> tuple[str, str]:
    """ARM's error code and message from an azure-core exception (sync or failed-LRO)."""
    err: Any = getattr(exc, "error", None)
    code = getattr(err, "code", None) or ""
    message = getattr(err, "message", None) or ""
    if not code:
        response = getattr(exc, "response", None)
        try:
            body = response.json() if response is not None else None
        except Exception:  # a body that is not JSON: fall through to the exception text
            body = None
        if isinstance(body, dict):
            inner: dict[str, Any] = body["error"] if isinstance(body.get("error"), dict) else body
            code = str(inner.get("code") or "")
            message = str(inner.get("message") or message)
    if not message:
        message = str(getattr(exc, "message", "") or exc)
    return code, message


def classify(exc: BaseException, *, resource: str = "", size: str = "", region: str = "") -> CloudError:
    """Turn any azure-core error into a CloudError subclass whose str() is the user's paragraph."""
    from azure.core.exceptions import ClientAuthenticationError

    code, message = error_code_and_message(exc)
    where = f" while creating {resource}" if resource else ""
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
    if code in QUOTA_CODES:
        m = _QUOTA_RE.search(message)
        if m:
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
        return QuotaExceededError(
            f"Azure refused{where}: quota exceeded ({code}). {message}", code=code, resource=resource
        )
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
