"""Microsoft.Network: virtual networks with their subnets, network security groups, public IPs and
network interfaces; private addresses allocated from the subnet, public ones from a counter; and the
network RP's refusals to delete what is in use."""

from __future__ import annotations

import copy
import ipaddress
import uuid
from typing import Any

from orchestrator.emulator import validation as v
from orchestrator.emulator.store import (
    T_NIC,
    T_NSG,
    T_PIP,
    T_SUBNET,
    T_VNET,
    EmuResponse,
    LoggedRequest,
    base,
    group_of,
    rid,
)
from orchestrator.emulator.typed import TypedResources, Write, Written
from orchestrator.emulator.validation import ArmFault


class NetworkRP(TypedResources):
    def _h_subnet(
        self, method: str, g: dict[str, str], query: dict[str, str], body: Any, rec: LoggedRequest
    ) -> EmuResponse:
        rec.kind, rec.resource_type = "read", T_SUBNET
        if method != "GET":
            raise ArmFault(405, "MethodNotAllowed", "This emulator manages subnets through their VNet.")
        vnet = self.store.resources.get(rid(g["sub"], g["rg"], T_VNET, g["vnet"]).lower())
        subnet = _find_subnet(vnet, g["name"]) if vnet else None
        if subnet is None:
            raise ArmFault(404, "NotFound", f"Resource {rec.path} not found.")
        return self._ok(200, subnet)

    def _check_deletable(self, res: dict[str, Any]) -> None:
        res_id = res["id"].lower()
        for other in self.store.resources.values():
            if other["type"] != T_NIC or other["properties"].get("provisioningState") == "Deleting":
                continue
            props = other["properties"]
            if (props.get("networkSecurityGroup") or {}).get("id", "").lower() == res_id:
                raise ArmFault(
                    400,
                    "InUseNetworkSecurityGroupCannotBeDeleted",
                    f"Network security group {res_id} cannot be deleted because it is in use by {other['id']}.",
                )
            for ipc in props.get("ipConfigurations", []):
                if ipc["properties"]["subnet"]["id"].lower().startswith(res_id + "/"):
                    raise ArmFault(400, "InUseSubnetCannotBeDeleted", f"Subnet is in use by {other['id']}.")
                if (ipc["properties"].get("publicIPAddress") or {}).get("id", "").lower() == res_id:
                    raise ArmFault(400, "PublicIPAddressCannotBeDeleted", f"Public IP {res_id} is in use.")
        if res["type"] == T_NIC and res["properties"].get("virtualMachine"):
            raise ArmFault(400, "NicInUse", f"Network interface {res_id} is attached to a virtual machine.")

    # ------------------------------------------------------------------ writers

    def _put_vnet(self, w: Write) -> Written:
        v.check_vnet(w.body)
        self._fault("PUT", T_VNET, w.rec, location=w.location)
        res = base(w.rid, w.name, T_VNET, w.location, w.body)
        props = copy.deepcopy(w.body["properties"])
        props["subnets"] = [
            {
                "name": s["name"],
                "id": f"{w.rid}/subnets/{s['name']}",
                "type": T_SUBNET,
                "properties": {**s["properties"], "provisioningState": "Succeeded"},
            }
            for s in props.get("subnets") or []
        ]
        res["properties"] = props
        res["etag"] = f'W/"{uuid.uuid4()}"'
        return Written(res, [], self.profile.create_seconds(T_VNET))

    def _put_nsg(self, w: Write) -> Written:
        v.check_nsg(w.body)
        self._fault("PUT", T_NSG, w.rec, location=w.location)
        res = base(w.rid, w.name, T_NSG, w.location, w.body)
        props = copy.deepcopy(w.body.get("properties") or {})
        props["securityRules"] = [
            {**r, "id": f"{w.rid}/securityRules/{r['name']}"} for r in props.get("securityRules") or []
        ]
        res["properties"] = props
        return Written(res, [], self.profile.create_seconds(T_NSG))

    def _put_pip(self, w: Write) -> Written:
        self._fault("PUT", T_PIP, w.rec, location=w.location)
        return Written(self._pip(w.rid, w.name, w.location, w.body, w.body), [], self.profile.create_seconds(T_PIP))

    def _put_nic(self, w: Write) -> Written:
        ipcs = v.require(w.body, "properties.ipConfigurations", list)
        if not ipcs:
            raise v.invalid("A network interface needs at least one ipConfiguration.")
        for ipc in ipcs:
            v.require(ipc, "name", str)
            v.require(ipc, "properties.subnet.id", str)
        self._fault("PUT", T_NIC, w.rec, location=w.location)
        nic, _ = self._nic(w.rid, w.name, w.location, w.body["properties"], w.body, w.rid)
        if w.existing is not None and w.existing["properties"].get("virtualMachine"):
            nic["properties"]["virtualMachine"] = w.existing["properties"]["virtualMachine"]
        return Written(nic, [], self.profile.create_seconds(T_NIC))

    # ------------------------------------------------------------------ records (shared with compute)

    def _nic(
        self,
        nic_id: str,
        nic_name: str,
        location: str,
        props: dict[str, Any],
        body: dict[str, Any],
        owner: str,
    ) -> tuple[dict[str, Any], list[dict[str, Any]]]:
        """A NIC record (and, for inline VM configurations, its new public IPs) from NIC properties."""
        nic = base(nic_id, nic_name, T_NIC, location, body)
        nsg_ref = (props.get("networkSecurityGroup") or {}).get("id")
        if nsg_ref:
            self._referenced(nsg_ref, owner, location)
        pips = []
        ipconfigs: list[dict[str, Any]] = []
        existing_nic = self.store.resources.get(nic_id.lower())
        old = {c["name"]: c for c in (existing_nic or {}).get("properties", {}).get("ipConfigurations", [])}
        for ipc in props["ipConfigurations"]:
            iprops = ipc["properties"]
            subnet_id = iprops["subnet"]["id"]
            vnet_id, _, subnet_name = subnet_id.rpartition("/subnets/")
            vnet = self._referenced(vnet_id, owner, location)
            if _find_subnet(vnet, subnet_name) is None:
                raise ArmFault(400, "InvalidResourceReference", f"Subnet {subnet_id} referenced by {owner} "
                               "was not found.")  # fmt: skip
            private = old.get(ipc["name"], {}).get("properties", {}).get("privateIPAddress")
            entry: dict[str, Any] = {
                "name": ipc["name"],
                "id": f"{nic_id}/ipConfigurations/{ipc['name']}",
                "properties": {
                    "subnet": {"id": subnet_id},
                    "privateIPAllocationMethod": "Dynamic",
                    "privateIPAddress": private or self._private_ip(vnet, subnet_id, nic_id, ipconfigs),
                    "primary": iprops.get("primary", True),
                },
            }
            pcfg = iprops.get("publicIPAddressConfiguration")
            pref = (iprops.get("publicIPAddress") or {}).get("id")
            if pcfg:
                rg_prefix = nic_id.rsplit("/providers/", 1)[0]
                pip_id = f"{rg_prefix}/providers/{T_PIP}/{pcfg['name']}"
                pip = self._pip(pip_id, pcfg["name"], location, pcfg, body)
                pip["properties"]["ipConfiguration"] = {"id": entry["id"]}
                pip["_deleteOption"] = (pcfg.get("properties") or {}).get("deleteOption", "Detach")
                pips.append(pip)
                entry["properties"]["publicIPAddress"] = {"id": pip_id}
            elif pref:
                target = self._referenced(pref, owner, location)
                target["properties"]["ipConfiguration"] = {"id": entry["id"]}
                entry["properties"]["publicIPAddress"] = {"id": pref}
            ipconfigs.append(entry)
        nic["properties"] = {
            "ipConfigurations": ipconfigs,
            "enableAcceleratedNetworking": bool(props.get("enableAcceleratedNetworking")),
            "primary": props.get("primary", True),
        }
        if nsg_ref:
            nic["properties"]["networkSecurityGroup"] = {"id": nsg_ref}
        return nic, pips

    def _pip(self, pip_id: str, name: str, location: str, cfg: dict[str, Any], body: dict[str, Any]) -> dict[str, Any]:
        old = self.store.resources.get(pip_id.lower())
        pip = base(pip_id, name, T_PIP, location, body)
        pip["sku"] = cfg.get("sku") or {"name": "Standard", "tier": "Regional"}
        method = (cfg.get("properties") or {}).get("publicIPAllocationMethod", "Static")
        if method not in {"Static", "Dynamic"}:
            raise v.invalid("publicIPAllocationMethod must be Static or Dynamic.")
        if pip["sku"].get("name") == "Standard" and method != "Static":
            raise v.invalid("Standard sku publicIp must have AllocationMethod set to Static.",
                            "StandardSkuPublicIPAddressesMustBeStatic")  # fmt: skip
        pip["properties"] = {
            "publicIPAllocationMethod": method,
            "ipAddress": old["properties"]["ipAddress"] if old else self._public_ip(),
        }
        return pip

    def _private_ip(self, vnet: dict[str, Any], subnet_id: str, nic_id: str, taken: list[dict[str, Any]]) -> str:
        """The subnet's first free address. The NICs on it are looked for in the VNet's group and
        the new NIC's (where this tool puts them), not across the subscription."""
        subnet = _find_subnet(vnet, subnet_id.rpartition("/subnets/")[2]) or {}
        net = ipaddress.ip_network(subnet["properties"]["addressPrefix"])
        groups = {f"{group_of(vnet['id'].lower())}/", f"{group_of(nic_id.lower())}/"}
        configs = [c for g in groups for _, r in self.store.resources.under(g) if r["type"] == T_NIC
                   for c in r["properties"].get("ipConfigurations", [])]  # fmt: skip
        used = {
            c["properties"].get("privateIPAddress")
            for c in [*configs, *taken]
            if c["properties"]["subnet"]["id"].lower() == subnet_id.lower()
        }
        for host in list(net.hosts())[3:]:  # Azure reserves the first addresses of every subnet
            if str(host) not in used:
                return str(host)
        raise ArmFault(400, "SubnetIsFull", "Subnet does not have enough capacity for the IP configurations.")

    def _public_ip(self) -> str:
        self.store.ip_counter += 1
        n = self.store.ip_counter
        return f"20.{(n >> 16) & 255}.{(n >> 8) & 255}.{n & 255}"  # looks like Azure; never dialled


def _find_subnet(vnet: dict[str, Any] | None, name: str) -> dict[str, Any] | None:
    for s in (vnet or {}).get("properties", {}).get("subnets", []):
        if s["name"].lower() == name.lower():
            return dict(s)
    return None
