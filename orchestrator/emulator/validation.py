"""Request-body checks the way ARM and the resource providers make them.

Each check raises ArmFault with the status and error code Azure would answer, so that a body the
real service would refuse is refused here too instead of silently accepted.
"""

from __future__ import annotations

import base64
import binascii
import ipaddress
import re
from typing import Any

from orchestrator import catalog


class ArmFault(Exception):
    """An ARM error answer: status, code, message, and the optional members of ARM's error object."""

    def __init__(
        self,
        status: int,
        code: str,
        message: str,
        retry_after: float | None = None,
        *,
        target: str | None = None,
        details: list[dict[str, Any]] | None = None,
        additional_info: list[dict[str, Any]] | None = None,
    ) -> None:
        super().__init__(message)
        self.status = status
        self.code = code
        self.message = message
        self.retry_after = retry_after
        self.target = target
        self.details = details
        self.additional_info = additional_info

    def body(self) -> dict[str, Any]:
        error: dict[str, Any] = {"code": self.code, "message": self.message}
        if self.target is not None:
            error["target"] = self.target
        if self.details is not None:
            error["details"] = self.details
        if self.additional_info is not None:
            error["additionalInfo"] = self.additional_info
        return {"error": error}


def invalid(message: str, code: str = "InvalidParameter", status: int = 400) -> ArmFault:
    return ArmFault(status, code, message)


_NAME_RULES: dict[str, tuple[int, int, re.Pattern[str]]] = {
    "Microsoft.Resources/resourceGroups": (1, 90, re.compile(r"^[-\w._()]*[-\w_()]$")),
    "Microsoft.Network/virtualNetworks": (2, 64, re.compile(r"^[A-Za-z0-9][A-Za-z0-9_.-]*[A-Za-z0-9_]$")),
    "Microsoft.Network/networkSecurityGroups": (
        1,
        80,
        re.compile(r"^[A-Za-z0-9]([A-Za-z0-9_.-]*[A-Za-z0-9_])?$"),
    ),
    "Microsoft.Network/publicIPAddresses": (
        1,
        80,
        re.compile(r"^[A-Za-z0-9]([A-Za-z0-9_.-]*[A-Za-z0-9_])?$"),
    ),
    "Microsoft.Network/networkInterfaces": (
        1,
        80,
        re.compile(r"^[A-Za-z0-9]([A-Za-z0-9_.-]*[A-Za-z0-9_])?$"),
    ),
    "Microsoft.Compute/virtualMachines": (1, 64, re.compile(r"^[A-Za-z0-9]([A-Za-z0-9.-]*[A-Za-z0-9])?$")),
    "Microsoft.Compute/disks": (1, 80, re.compile(r"^[A-Za-z0-9_]([A-Za-z0-9_.-]*[A-Za-z0-9_])?$")),
}
SSH_KEY_RE = re.compile(r"^(ssh-rsa|ssh-ed25519|ecdsa-sha2-nistp(256|384|521)) [A-Za-z0-9+/]+={0,3}( .*)?$")
RESERVED_ADMIN_NAMES = frozenset(
    {"administrator", "admin", "user", "user1", "test", "user2", "test1", "user3", "admin1", "1", "123",
     "a", "actuser", "adm", "admin2", "aspnet", "backup", "console", "david", "guest", "john", "owner",
     "root", "server", "sql", "support", "support_388945a0", "sys", "test2", "test3", "user4", "user5"}
)  # fmt: skip
NSG_PROTOCOLS = {"Tcp", "Udp", "Icmp", "Esp", "Ah", "*"}
SERVICE_TAGS = {"*", "Internet", "VirtualNetwork", "AzureLoadBalancer"}


def check_name(resource_type: str, name: str) -> None:
    lo, hi, pattern = _NAME_RULES.get(resource_type, (1, 80, re.compile(r"^[A-Za-z0-9][A-Za-z0-9_.-]*$")))
    if not (lo <= len(name) <= hi) or not pattern.match(name):
        code = "InvalidResourceGroupName" if resource_type.endswith("resourceGroups") else "InvalidResourceName"
        raise invalid(f"Resource name {name} is invalid. The name can be up to {hi} characters long.", code)


def require(obj: Any, path: str, kind: type | tuple[type, ...] = object) -> Any:
    """Walk a dotted path; missing or mistyped fields are InvalidParameter, as ARM says them."""
    cur = obj
    for part in path.split("."):
        if not isinstance(cur, dict) or part not in cur or cur[part] is None:
            raise invalid(f"Required parameter '{path}' is missing (null).")
        cur = cur[part]
    if not isinstance(cur, kind) or (kind is not bool and isinstance(cur, bool) and kind is not object):
        raise invalid(f"The value of parameter '{path}' has the wrong type.")
    return cur


def check_common(body: Any, resource_type: str) -> str:
    if not isinstance(body, dict):
        raise invalid("The request content was invalid and could not be deserialized.", "InvalidRequestContent")
    location = require(body, "location", str)
    normal = location.lower().replace(" ", "")
    if normal not in catalog.REGIONS:
        raise invalid(
            f"The provided location '{location}' is not available for resource type '{resource_type}'.",
            "LocationNotAvailableForResourceType",
        )
    tags = body.get("tags") or {}
    if not isinstance(tags, dict) or len(tags) > 50:
        raise invalid("Tags must be an object with at most 50 entries.", "InvalidTag")
    for k, v in tags.items():
        if not isinstance(v, str) or len(k) > 512 or len(v) > 256 or re.search(r"[<>%&\\?/]", k):
            raise invalid(f"The tag '{k}' has an invalid name or value.", "InvalidTagNameCharacters")
    return str(normal)


def _cidr(value: Any, path: str) -> ipaddress.IPv4Network | ipaddress.IPv6Network:
    try:
        return ipaddress.ip_network(value, strict=True)
    except (ValueError, TypeError):
        raise invalid(f"Value '{value}' for '{path}' is not a valid CIDR.", "InvalidAddressPrefixFormat") from None


def check_vnet(body: dict[str, Any]) -> None:
    prefixes = require(body, "properties.addressSpace.addressPrefixes", list)
    if not prefixes:
        raise invalid("addressSpace.addressPrefixes must not be empty.")
    spaces = [_cidr(p, "addressPrefixes") for p in prefixes]
    seen: set[str] = set()
    for i, subnet in enumerate(body["properties"].get("subnets") or []):
        name = require(subnet, "name", str)
        if name.lower() in seen:
            raise invalid(f"Subnet '{name}' is given twice.", "DuplicateResourceName")
        seen.add(name.lower())
        prefix = _cidr(require(subnet, "properties.addressPrefix", str), f"subnets[{i}].addressPrefix")
        if not any(prefix.version == s.version and prefix.subnet_of(s) for s in spaces):  # type: ignore[arg-type]
            raise invalid(
                f"Subnet '{name}' is not valid because its IP address range is outside the IP address "
                "range of virtual network.",
                "NetcfgSubnetRangeOutsideVnet",
            )


def check_nsg(body: dict[str, Any]) -> None:
    rules = (body.get("properties") or {}).get("securityRules") or []
    if not isinstance(rules, list):
        raise invalid("securityRules must be a list.")
    taken: set[tuple[str, int]] = set()
    for i, rule in enumerate(rules):
        name = require(rule, "name", str)
        p = require(rule, "properties", dict)
        prio = require(p, "priority", int)
        if not 100 <= prio <= 4096:
            raise invalid(
                f"Security rule {name} has invalid priority {prio}. Value provided: {prio}. Allowed range 100-4096.",
                "SecurityRuleInvalidPriority",
            )
        direction = require(p, "direction", str)
        if direction not in {"Inbound", "Outbound"}:
            raise invalid(f"securityRules[{i}].direction must be Inbound or Outbound.")
        if (direction, prio) in taken:
            raise invalid(
                f"Security rule {name} conflicts with another rule of priority {prio} in the same direction.",
                "SecurityRuleConflict",
            )
        taken.add((direction, prio))
        if require(p, "access", str) not in {"Allow", "Deny"}:
            raise invalid(f"securityRules[{i}].access must be Allow or Deny.")
        if require(p, "protocol", str) not in NSG_PROTOCOLS:
            raise invalid(f"securityRules[{i}].protocol must be one of {sorted(NSG_PROTOCOLS)}.")
        for side in ("source", "destination"):
            single, many = p.get(f"{side}AddressPrefix"), p.get(f"{side}AddressPrefixes")
            if not single and not many:
                raise invalid(
                    f"Security rule {name} needs {side}AddressPrefix or {side}AddressPrefixes.",
                    "SecurityRuleParameterContainsUnsupportedValue",
                )
            for value in [single] if single else many:
                if value not in SERVICE_TAGS:
                    _cidr(value if "/" in value else f"{value}/32", f"securityRules[{i}].{side}AddressPrefix")
            if not p.get(f"{side}PortRange") and not p.get(f"{side}PortRanges"):
                raise invalid(f"Security rule {name} needs {side}PortRange.")


def check_vm(body: dict[str, Any], location: str) -> catalog.VmSize:
    props = require(body, "properties", dict)
    size_name = require(props, "hardwareProfile.vmSize", str)
    size = catalog.VM_SIZES.get(size_name)
    if size is None:
        # Retired sizes (catalog.RETIRED_SIZES) are not in VM_SIZES: Azure refuses them like any size
        # the region does not offer, and never lists them among the valid ones.
        offered = [name for name, s in catalog.VM_SIZES.items() if location in s.regions]
        raise ArmFault(
            400,
            "InvalidParameter",
            f"The value {size_name} provided for the VM size is not valid. The valid sizes in the "
            f"current region are: {', '.join(offered)}.",
            target="vmSize",
        )
    image = require(props, "storageProfile.imageReference", dict)
    for key in ("publisher", "offer", "sku", "version"):
        if not isinstance(image.get(key), str) or not image[key]:
            raise invalid(f"Required parameter 'imageReference.{key}' is missing (null).")
    os_disk = require(props, "storageProfile.osDisk", dict)
    if os_disk.get("createOption") not in {"FromImage", "fromImage"}:
        raise invalid("osDisk.createOption must be FromImage for a VM created from an image.")
    disk_gb = os_disk.get("diskSizeGB")
    if disk_gb is not None and (not isinstance(disk_gb, int) or not 30 <= disk_gb <= 4095):
        raise invalid(f"The specified disk size {disk_gb} GB is invalid. Allowed: 30-4095.", "InvalidParameter")
    if os_disk.get("deleteOption", "Detach") not in {"Delete", "Detach"}:
        raise invalid("osDisk.deleteOption must be Delete or Detach.")
    os_profile = require(props, "osProfile", dict)
    admin = require(os_profile, "adminUsername", str)
    if admin.lower() in RESERVED_ADMIN_NAMES or not re.match(r"^[a-z_][a-z0-9_.-]{0,63}$", admin, re.I):
        raise invalid(f"The Admin Username specified is not allowed: {admin}.", "InvalidParameter")
    computer = os_profile.get("computerName", body.get("name", ""))
    if computer and (len(computer) > 64 or not re.match(r"^[A-Za-z0-9-]*[A-Za-z][A-Za-z0-9-]*$", computer)):
        raise invalid(f"Linux host name cannot exceed 64 characters or contain these characters: {computer}.")
    linux = require(os_profile, "linuxConfiguration", dict)
    keys = ((linux.get("ssh") or {}).get("publicKeys")) or []
    if linux.get("disablePasswordAuthentication") is True:
        if not keys:
            raise invalid(
                "Authentication using either SSH or by user name and password must be enabled in Linux profile.",
                "InvalidParameter",
            )
        if os_profile.get("adminPassword"):
            raise invalid("Password cannot be set when password authentication is disabled.")
    elif not os_profile.get("adminPassword"):
        raise invalid("Required parameter 'adminPassword' is missing (null).")
    for k in keys:
        if not isinstance(k, dict) or not SSH_KEY_RE.match(str(k.get("keyData", ""))):
            raise invalid("The value of parameter linuxConfiguration.ssh.publicKeys.keyData is invalid.")
        if not str(k.get("path", "")).startswith("/home/"):
            raise invalid("The value of parameter linuxConfiguration.ssh.publicKeys.path is invalid.")
    custom = os_profile.get("customData")
    if custom is not None:
        if not isinstance(custom, str) or len(custom) > 87380:
            raise invalid(
                "Custom data in OSProfile must be in Base64 encoding and with a maximum length of 87380 characters."
            )
        try:
            base64.b64decode(custom, validate=True)
        except (binascii.Error, ValueError):
            raise invalid(
                "Custom data in OSProfile must be in Base64 encoding and with a maximum length of 87380 characters."
            ) from None
    zones = body.get("zones")
    if zones is not None:
        if not isinstance(zones, list) or len(zones) != 1 or zones[0] not in {"1", "2", "3"}:
            raise invalid("The value of parameter zones is invalid.")
        if not catalog.region_has_zones(location):
            raise invalid(
                f"The zone(s) '{zones[0]}' for resource is not supported in location '{location}'.",
                "ZonesNotSupported",
            )
    priority = props.get("priority", "Regular")
    if priority not in {"Regular", "Spot", "Low"}:
        raise invalid("The value of parameter priority is invalid.")
    if priority == "Spot" and props.get("evictionPolicy") not in {"Deallocate", "Delete"}:
        raise invalid("Required parameter 'evictionPolicy' is missing (null).")
    net = require(props, "networkProfile", dict)
    if not net.get("networkInterfaces") and not net.get("networkInterfaceConfigurations"):
        raise invalid("At least one network interface or network interface configuration is required.")
    if net.get("networkInterfaceConfigurations") and not net.get("networkApiVersion"):
        raise invalid("Required parameter 'networkProfile.networkApiVersion' is missing (null).")
    for i, cfg in enumerate(net.get("networkInterfaceConfigurations") or []):
        require(cfg, "name", str)
        ipcs = require(cfg, "properties.ipConfigurations", list)
        if not ipcs:
            raise invalid(f"networkInterfaceConfigurations[{i}] needs an ipConfiguration.")
        for ipc in ipcs:
            require(ipc, "name", str)
            require(ipc, "properties.subnet.id", str)
            pip = (ipc.get("properties") or {}).get("publicIPAddressConfiguration")
            if pip is not None:
                require(pip, "name", str)
    return size
