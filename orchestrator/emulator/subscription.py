"""The subscription the emulator plays: a profile (a ready subscription by default, or a brand-new
one), vCPU quota per family and region with the regional `cores` and spot `lowPriorityCores` rows,
resource providers' registration, SKU restrictions per region and zone, deny policy assignments and
the caller's RBAC actions. And the read APIs a preflight asks about them, in Azure's documented
shapes: Compute usages, Resource SKUs, VirtualMachineImages, Providers, Permissions and
PolicyInsights' checkPolicyRestrictions.

Tests set it up through the Emulator (all state lives in the store, so a daemon shares it):

    emu = Emulator(subscription="new-subscription")          # or ORCH_EMULATOR_SUBSCRIPTION
    emu.set_quota("eastus", "standardNCASv3_T4Family", 8)   # region "*": every region
    emu.set_quota("eastus", "cores", 10); emu.set_quota("eastus", "lowPriorityCores", 0)
    emu.restrict_sku("Standard_NC4as_T4_v3", "eastus")                  # type Location
    emu.restrict_sku("Standard_NC4as_T4_v3", "eastus", zones=["2"])     # type Zone
    emu.set_provider("Microsoft.Compute", registered=False)
    emu.add_policy(allowed_sizes_policy(["Standard_D2s_v5"]))  # or no_public_ip_policy()
    emu.set_permissions(["*/read"], not_actions=[])
"""

from __future__ import annotations

import copy
import hashlib
import json
import re
from dataclasses import asdict, dataclass, field
from typing import Any

from orchestrator import catalog
from orchestrator.emulator.core import DEFAULT_REGIONAL_VCPUS, ArmCore
from orchestrator.emulator.openapi import SPECS
from orchestrator.emulator.store import T_PIP, T_VM, EmuResponse, LoggedRequest
from orchestrator.emulator.validation import ArmFault

# Namespaces a subscription must register before use; Microsoft.Resources and Microsoft.Authorization
# are always registered.
REGISTRABLE = ("Microsoft.Compute", "Microsoft.Network", "Microsoft.DevTestLab", "Microsoft.PolicyInsights")
ALWAYS_REGISTERED = ("Microsoft.Resources", "Microsoft.Authorization")
GPU_FAMILIES = sorted({s.family for s in (*catalog.VM_SIZES.values(), *catalog.RETIRED_SIZES.values()) if s.is_gpu})


@dataclass(frozen=True)
class SubscriptionProfile:
    """What a fresh emulator's subscription looks like."""

    name: str
    family_quotas: dict[str, int] = field(default_factory=dict)  # applies in every region
    unregistered: tuple[str, ...] = ()


PROFILES: dict[str, SubscriptionProfile] = {
    "ready": SubscriptionProfile("ready"),
    # A brand-new pay-as-you-go subscription: no GPU quota anywhere, 10 regional vCPUs, no spot
    # vCPUs, and the providers this tool needs not yet registered.
    "new-subscription": SubscriptionProfile(
        "new-subscription",
        family_quotas={**dict.fromkeys(GPU_FAMILIES, 0), "cores": 10, "lowPriorityCores": 0},
        unregistered=("Microsoft.Compute", "Microsoft.Network", "Microsoft.DevTestLab"),
    ),
}


def get_subscription_profile(name: str) -> SubscriptionProfile:
    try:
        return PROFILES[name]
    except KeyError:
        raise ValueError(f"unknown subscription profile {name!r}; choose one of {', '.join(PROFILES)}") from None


# ---------------------------------------------------------------------- deny policies


@dataclass(frozen=True)
class DenyPolicy:
    """One Azure Policy assignment with effect Deny. `kind` "allowedValues": the field at `path` of a
    `resource_type` body must be one of `values` (e.g. Allowed virtual machine size SKUs);
    "notAllowedTypes": resources of the types in `values` may not be created (e.g. no public IPs;
    a VM whose body creates a public IP inline is denied too)."""

    kind: str
    values: tuple[str, ...]
    definition_display_name: str
    definition_name: str
    assignment_display_name: str
    assignment_name: str
    parameter_name: str
    resource_type: str = ""
    alias: str = ""
    path: str = ""
    scope: str = ""  # assignment scope; "" means the subscription


def allowed_sizes_policy(sizes: list[str], assignment: str = "Allowed VM sizes") -> DenyPolicy:
    return DenyPolicy(
        "allowedValues",
        tuple(sizes),
        "Allowed virtual machine size SKUs",
        "cccc23c7-8427-4f53-ad12-b6a63eb452b3",  # the built-in definition's name
        assignment,
        hashlib.sha1(assignment.encode()).hexdigest()[:24],
        "listOfAllowedSKUs",
        T_VM,
        "Microsoft.Compute/virtualMachines/sku.name",
        "properties.hardwareProfile.vmSize",
    )


def no_public_ip_policy(assignment: str = "No public IPs") -> DenyPolicy:
    return DenyPolicy(
        "notAllowedTypes",
        (T_PIP,),
        "Not allowed resource types",
        "6c112d4e-5bc7-47ae-a041-ea2d9dccd749",  # the built-in definition's name
        assignment,
        hashlib.sha1(assignment.encode()).hexdigest()[:24],
        "listOfResourceTypesNotAllowed",
    )


# ---------------------------------------------------------------------- the mixin


class SubscriptionRP(ArmCore):
    # ------------------------------------------------------------------ set-up (tests, targets)

    def use_subscription_profile(self, name: str) -> None:
        profile = get_subscription_profile(name)
        with self._locked():
            store = self.store
            store.profile = profile.name
            store.family_quotas = dict(profile.family_quotas)
            store.providers = {
                ns.lower(): {"namespace": ns, "state": "NotRegistered" if ns in profile.unregistered else "Registered"}
                for ns in REGISTRABLE
            }

    def set_provider(self, namespace: str, *, registered: bool) -> None:
        with self._locked():
            self.store.providers[namespace.lower()] = {
                "namespace": namespace,
                "state": "Registered" if registered else "NotRegistered",
            }

    def restrict_sku(
        self,
        size: str,
        location: str,
        zones: list[str] | None = None,
        reason: str = "NotAvailableForSubscription",
    ) -> None:
        """Restrict `size` in `location` (type Location) or in some of its zones (type Zone)."""
        if reason not in {"NotAvailableForSubscription", "QuotaId"}:
            raise ValueError(reason)
        with self._locked():
            self.store.restrictions.append({"size": size, "location": location, "zones": zones, "reason": reason})

    def add_policy(self, policy: DenyPolicy) -> None:
        with self._locked():
            self.store.policies.append(asdict(policy))

    def set_permissions(self, actions: list[str], not_actions: list[str] | None = None) -> None:
        with self._locked():
            entry = {"actions": list(actions), "notActions": list(not_actions or [])}
            self.store.permissions = [{**entry, "dataActions": [], "notDataActions": []}]

    # ------------------------------------------------------------------ checks on requests

    def _provider_state(self, namespace: str) -> str:
        entry = self.store.providers.get(namespace.lower())
        if entry is None:
            return "Registered"
        if entry["state"] == "Registering" and entry.get("until", 0.0) <= self.clock.now():
            entry["state"] = "Registered"
            entry.pop("until", None)
        return str(entry["state"])

    def _check_registered(self, namespaces: list[str]) -> None:
        for ns in namespaces:
            if ns in ALWAYS_REGISTERED or self._provider_state(ns) == "Registered":
                continue
            canonical = self.store.providers.get(ns.lower(), {}).get("namespace", ns)
            message = (
                f"The subscription is not registered to use namespace '{canonical}'. See "
                "https://aka.ms/rps-not-found for how to register subscriptions."
            )
            raise ArmFault(
                409,
                "MissingSubscriptionRegistration",
                message,
                details=[{"code": "MissingSubscriptionRegistration", "target": canonical, "message": message}],
            )

    def _check_policies(self, rtype: str, name: str, body: dict[str, Any], sub: str) -> None:
        for p in self.store.policies:
            policy = _policy(p)
            expressions = _violates(policy, rtype, body)
            if expressions is not None:
                raise _policy_fault(policy, name, expressions, sub)

    # ------------------------------------------------------------------ Providers

    def _provider_json(self, sub: str, namespace: str) -> dict[str, Any]:
        entry = self.store.providers.get(namespace.lower())
        canonical = entry["namespace"] if entry else _canonical_namespace(namespace)
        state = "Registered" if canonical in ALWAYS_REGISTERED else self._provider_state(canonical)
        types = sorted(
            {rt.split("/", 1)[1] for rt in _TYPES_BY_NAMESPACE.get(canonical.lower(), ())},
        )
        versions = sorted(SPECS.versions.get(canonical.lower(), set()), reverse=True)
        return {
            "id": f"/subscriptions/{sub}/providers/{canonical}",
            "namespace": canonical,
            "registrationState": state,
            "registrationPolicy": "RegistrationRequired",
            "resourceTypes": [{"resourceType": t, "apiVersions": versions} for t in types],
        }

    def _h_provider(
        self, method: str, g: dict[str, str], query: dict[str, str], body: Any, rec: LoggedRequest
    ) -> EmuResponse:
        rec.kind, rec.resource_type = "read", "Microsoft.Resources/providers"
        if method != "GET":
            raise ArmFault(405, "MethodNotAllowed", "The requested method is not allowed.")
        return self._ok(200, self._provider_json(g["sub"], g["ns"]))

    def _h_provider_register(
        self, method: str, g: dict[str, str], query: dict[str, str], body: Any, rec: LoggedRequest
    ) -> EmuResponse:
        rec.kind, rec.resource_type = "update", "Microsoft.Resources/providers"
        if method != "POST":
            raise ArmFault(405, "MethodNotAllowed", "The requested method is not allowed.")
        canonical = _canonical_namespace(g["ns"])
        entry = self.store.providers.setdefault(canonical.lower(), {"namespace": canonical, "state": "Registered"})
        if self._provider_state(canonical) != "Registered":
            entry["state"] = "Registering"
            entry["until"] = self.clock.now() + self.profile.provider_registration * self.profile.scale
            payload = self._provider_json(g["sub"], canonical)
            payload["registrationState"] = "Registering"  # the answer to the POST, even if instant
            return self._ok(200, payload)
        return self._ok(200, self._provider_json(g["sub"], canonical))

    # ------------------------------------------------------------------ Compute usages

    def usages(self, location: str) -> list[dict[str, Any]]:
        used: dict[str, int] = {}
        for r in self.store.resources.values():
            if r["type"] != T_VM or r["location"] != location:
                continue
            if r["properties"].get("provisioningState") in {"Failed", "Deleting"}:
                continue
            size = catalog.VM_SIZES.get(r["properties"]["hardwareProfile"]["vmSize"])
            if size is None:
                continue
            if r["properties"].get("priority") == "Spot":
                used["lowPriorityCores"] = used.get("lowPriorityCores", 0) + size.vcpus
            else:
                used["cores"] = used.get("cores", 0) + size.vcpus
                used[size.family] = used.get(size.family, 0) + size.vcpus
        families = sorted({s.family for s in catalog.VM_SIZES.values() if location in s.regions})
        rows = [
            _usage_row("cores", "Total Regional vCPUs", used.get("cores", 0), self.quota_limit(location, "cores")),
            _usage_row(
                "lowPriorityCores",
                "Total Regional Low-priority vCPUs",
                used.get("lowPriorityCores", 0),
                self.quota_limit(location, "lowPriorityCores"),
            ),
        ]
        rows += [_usage_row(f, family_display_name(f), used.get(f, 0), self.quota_limit(location, f)) for f in families]
        return rows

    def _h_usages(
        self, method: str, g: dict[str, str], query: dict[str, str], body: Any, rec: LoggedRequest
    ) -> EmuResponse:
        rec.kind, rec.resource_type = "list", "Microsoft.Compute/locations/usages"
        location = _location(g["loc"])
        return self._ok(200, {"value": self.usages(location)})

    # ------------------------------------------------------------------ Resource SKUs

    def _h_skus(
        self, method: str, g: dict[str, str], query: dict[str, str], body: Any, rec: LoggedRequest
    ) -> EmuResponse:
        rec.kind, rec.resource_type = "list", "Microsoft.Compute/skus"
        wanted = _filter_location(query.get("$filter"))
        out = []
        for size in catalog.VM_SIZES.values():
            for region in sorted(size.regions):
                if wanted is None or region == wanted:
                    out.append(self._sku_json(size, region))
        return self._ok(200, {"value": out})

    def _sku_json(self, size: catalog.VmSize, region: str) -> dict[str, Any]:
        zones = ["1", "2", "3"] if catalog.region_has_zones(region) else []
        restrictions = []
        for r in self.store.restrictions:
            if r["size"].lower() != size.name.lower() or r["location"] != region:
                continue
            info: dict[str, Any] = {"locations": [region]}
            if r["zones"] is not None:
                info["zones"] = list(r["zones"])
            kind = "Location" if r["zones"] is None else "Zone"
            restrictions.append({"type": kind, "values": [region], "restrictionInfo": info, "reasonCode": r["reason"]})
        capabilities = {
            "vCPUs": str(size.vcpus),
            "MemoryGB": f"{size.memory_gib:g}",
            "GPUs": str(size.gpus),
            "LowPriorityCapable": str(size.spot_supported),
            "AcceleratedNetworkingEnabled": str(size.accelerated_networking),
            "MaxResourceVolumeMB": str(size.temp_disk_gb * 1024),
            "HyperVGenerations": "V1,V2",
        }
        return {
            "resourceType": "virtualMachines",
            "name": size.name,
            "tier": "Standard",
            "size": size.name.removeprefix("Standard_"),
            "family": size.family,
            "locations": [region],
            "locationInfo": [{"location": region, "zones": zones, "zoneDetails": []}],
            "capabilities": [{"name": k, "value": val} for k, val in capabilities.items()],
            "restrictions": restrictions,
        }

    # ------------------------------------------------------------------ VirtualMachineImages

    def _h_image_versions(
        self, method: str, g: dict[str, str], query: dict[str, str], body: Any, rec: LoggedRequest
    ) -> EmuResponse:
        rec.kind, rec.resource_type = "list", _T_IMAGE
        image = _known_image(g["pub"], g["offer"], g["sku"])
        if image is None:
            return self._ok(200, [])
        location = _location(g["loc"])
        return self._ok(200, [_image_resource(g, location, IMAGE_VERSION)])

    def _h_image_version(
        self, method: str, g: dict[str, str], query: dict[str, str], body: Any, rec: LoggedRequest
    ) -> EmuResponse:
        rec.kind, rec.resource_type = "read", _T_IMAGE
        image = _known_image(g["pub"], g["offer"], g["sku"])
        if image is None or g["version"] not in {IMAGE_VERSION, "latest"}:
            raise ArmFault(404, "NotFound", "Artifact: VMImage was not found.")
        location = _location(g["loc"])
        out = _image_resource(g, location, IMAGE_VERSION)
        disk = image.os_disk_gb or 30
        out["properties"] = {
            "hyperVGeneration": "V2",
            "architecture": "x64",
            "osDiskImage": {"operatingSystem": "Linux", "sizeInBytes": disk * 1024**3, "sizeInGb": disk},
            "dataDiskImages": [],
        }
        return self._ok(200, out)

    # ------------------------------------------------------------------ Permissions

    def _h_permissions(
        self, method: str, g: dict[str, str], query: dict[str, str], body: Any, rec: LoggedRequest
    ) -> EmuResponse:
        rec.kind, rec.resource_type = "list", "Microsoft.Authorization/permissions"
        if g.get("rg"):
            self._group(g["sub"], g["rg"])
        permissions = self.store.permissions or [_OWNER]
        return self._ok(200, {"value": copy.deepcopy(permissions)})

    # ------------------------------------------------------------------ checkPolicyRestrictions

    def _h_policy_check(
        self, method: str, g: dict[str, str], query: dict[str, str], body: Any, rec: LoggedRequest
    ) -> EmuResponse:
        rec.kind, rec.resource_type = "read", "Microsoft.PolicyInsights/checkPolicyRestrictions"
        if method != "POST":
            raise ArmFault(405, "MethodNotAllowed", "The requested method is not allowed.")
        details = (body or {}).get("resourceDetails") or {}
        content = details.get("resourceContent") or {}
        rtype = str(content.get("type", ""))
        restrictions, evaluations = [], []
        for p in self.store.policies:
            policy = _policy(p)
            ref = {"policyDefinitionId": _definition_id(policy), "policyAssignmentId": _assignment_id(policy, g["sub"])}
            if policy.kind == "allowedValues" and policy.resource_type.lower() == rtype.lower():
                restrictions.append({"field": policy.alias, "restrictions": [
                    {"result": "Required", "values": list(policy.values), "policy": ref, "policyEffect": "Deny",
                     "reason": f"{policy.alias} must be one of: {', '.join(policy.values)}"}]})  # fmt: skip
            expressions = _violates(policy, rtype, content)
            if expressions is not None:
                evaluations.append({"policyInfo": ref, "evaluationResult": "NonCompliant",
                                    "evaluationDetails": {"evaluatedExpressions": expressions},
                                    "effectDetails": {"policyEffect": "Deny"}})  # fmt: skip
        return self._ok(
            200, {"fieldRestrictions": restrictions, "contentEvaluationResult": {"policyEvaluations": evaluations}}
        )


# ---------------------------------------------------------------------- helpers

_T_IMAGE = "Microsoft.Compute/locations/publishers/artifacttypes/offers/skus/versions"
IMAGE_VERSION = "1.0.0"  # the one version the emulator offers of each image the catalog knows
_OWNER = {"actions": ["*"], "notActions": [], "dataActions": [], "notDataActions": []}
_TYPES_BY_NAMESPACE: dict[str, tuple[str, ...]] = {
    "microsoft.compute": ("Microsoft.Compute/virtualMachines", "Microsoft.Compute/disks", "Microsoft.Compute/skus",
                          "Microsoft.Compute/locations/usages"),
    "microsoft.network": ("Microsoft.Network/virtualNetworks", "Microsoft.Network/networkSecurityGroups",
                          "Microsoft.Network/publicIPAddresses", "Microsoft.Network/networkInterfaces"),
    "microsoft.devtestlab": ("Microsoft.DevTestLab/schedules",),
    "microsoft.policyinsights": ("Microsoft.PolicyInsights/checkPolicyRestrictions",),
}  # fmt: skip


def family_display_name(family: str) -> str:
    """`standardNCASv3_T4Family` -> `Standard NCASv3_T4 Family` (Compute usages' localizedValue)."""
    core = family
    if core.lower().startswith("standard"):
        core = core[len("standard") :]
    core = core.removesuffix("Family")
    return f"Standard {core} Family"


def _usage_row(value: str, localized: str, current: int, limit: int) -> dict[str, Any]:
    return {"unit": "Count", "currentValue": current, "limit": limit,
            "name": {"value": value, "localizedValue": localized}}  # fmt: skip


def _location(name: str) -> str:
    return name.lower().replace(" ", "")


def _canonical_namespace(ns: str) -> str:
    for known in (*REGISTRABLE, *ALWAYS_REGISTERED):
        if known.lower() == ns.lower():
            return known
    return ns


def _filter_location(expr: str | None) -> str | None:
    if not expr:
        return None
    m = re.fullmatch(r"\s*location\s+eq\s+'([^']+)'\s*", expr, re.I)
    if m is None:
        message = f"Invalid $filter '{expr}': only location eq 'x' is supported."
        raise ArmFault(400, "InvalidFilterInQueryString", message)
    return _location(m.group(1))


def _known_image(publisher: str, offer: str, sku: str) -> catalog.Image | None:
    for image in catalog.IMAGE_ALIASES.values():
        if (image.publisher.lower(), image.offer.lower(), image.sku.lower()) == (
            publisher.lower(),
            offer.lower(),
            sku.lower(),
        ):
            return image
    return None


def _image_resource(g: dict[str, str], location: str, version: str) -> dict[str, Any]:
    return {
        "id": f"/Subscriptions/{g['sub']}/Providers/Microsoft.Compute/Locations/{location}/Publishers/{g['pub']}"
        f"/ArtifactTypes/VMImage/Offers/{g['offer']}/Skus/{g['sku']}/Versions/{version}",
        "name": version,
        "location": location,
    }


def _get_path(body: dict[str, Any], path: str) -> Any:
    cur: Any = body
    for part in path.split("."):
        if not isinstance(cur, dict):
            return None
        cur = cur.get(part)
    return cur


def _violates(policy: DenyPolicy, rtype: str, body: dict[str, Any]) -> list[dict[str, Any]] | None:
    """The evaluated expressions when `body` (of type `rtype`) is denied by `policy`, else None."""
    if policy.kind == "allowedValues":
        if policy.resource_type.lower() != rtype.lower():
            return None
        value = _get_path(body, policy.path)
        if value is None or str(value).lower() in {v.lower() for v in policy.values}:
            return None
        return [{"result": "False", "expressionKind": "Field", "expression": policy.alias, "path": policy.path,
                 "expressionValue": value, "targetValue": list(policy.values), "operator": "In"}]  # fmt: skip
    if policy.kind == "notAllowedTypes":
        denied = {v.lower() for v in policy.values}
        created = {rtype.lower()}
        if rtype.lower() == T_VM.lower():
            for cfg in _get_path(body, "properties.networkProfile.networkInterfaceConfigurations") or []:
                for ipc in (cfg.get("properties") or {}).get("ipConfigurations") or []:
                    if (ipc.get("properties") or {}).get("publicIPAddressConfiguration"):
                        created.add(T_PIP.lower())  # the VM would create a public IP inline
        hit = sorted(created & denied)
        if not hit:
            return None
        return [{"result": "True", "expressionKind": "Field", "expression": "type", "path": "type",
                 "expressionValue": hit[0], "targetValue": list(policy.values), "operator": "In"}]  # fmt: skip
    return None


def _policy(stored: dict[str, Any]) -> DenyPolicy:
    fields: dict[str, Any] = {**stored, "values": tuple(stored["values"])}
    return DenyPolicy(**fields)


def _definition_id(policy: DenyPolicy) -> str:
    return f"/providers/Microsoft.Authorization/policyDefinitions/{policy.definition_name}"


def _assignment_id(policy: DenyPolicy, sub: str) -> str:
    scope = policy.scope or f"/subscriptions/{sub}"
    return f"{scope}/providers/Microsoft.Authorization/policyAssignments/{policy.assignment_name}"


def _policy_fault(policy: DenyPolicy, name: str, expressions: list[dict[str, Any]], sub: str) -> ArmFault:
    definition_id, assignment_id = _definition_id(policy), _assignment_id(policy, sub)
    identifiers = [
        {
            "policyAssignment": {"name": policy.assignment_display_name, "id": assignment_id},
            "policyDefinition": {"name": policy.definition_display_name, "id": definition_id},
        }
    ]
    info = {
        "policyDefinitionDisplayName": policy.definition_display_name,
        "evaluationDetails": {"evaluatedExpressions": expressions},
        "policyDefinitionId": definition_id,
        "policyDefinitionName": policy.definition_name,
        "policyDefinitionEffect": "Deny",
        "policyAssignmentId": assignment_id,
        "policyAssignmentName": policy.assignment_name,
        "policyAssignmentDisplayName": policy.assignment_display_name,
        "policyAssignmentScope": policy.scope or f"/subscriptions/{sub}",
        "policyAssignmentParameters": {policy.parameter_name: {"value": list(policy.values)}},
    }
    return ArmFault(
        403,
        "RequestDisallowedByPolicy",
        f"Resource '{name}' was disallowed by policy. Policy identifiers: {json.dumps(identifiers)}.",
        target=name,
        additional_info=[{"type": "PolicyViolation", "info": info}],
    )


__all__ = [
    "DEFAULT_REGIONAL_VCPUS",
    "PROFILES",
    "DenyPolicy",
    "SubscriptionProfile",
    "SubscriptionRP",
    "allowed_sizes_policy",
    "family_display_name",
    "get_subscription_profile",
    "no_public_ip_policy",
]
