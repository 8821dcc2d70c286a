"""JobSpec + run id -> ResourcePlan: every Azure resource, its ARM body, and what it waits for.

Pure: no I/O, no clock, no randomness except through arguments, so the plan is unit-testable and
the dry-run shows exactly what provisioning will send.

The shape is chosen for Azure's dependency chain: the group, then the VNet (with its subnet inline)
and the NSG side by side, then every VM at once with its NIC and public IP created inline by the
compute RP (networkInterfaceConfigurations), which saves two dependent network round trips per node
and lets `deleteOption: Delete` remove them with the VM. The NSG sits on each NIC rather than on the
subnet so that the VNet need not wait for it.
"""

from __future__ import annotations

import re
import secrets
from collections.abc import Mapping
from dataclasses import dataclass, field
from datetime import UTC, datetime, timedelta
from typing import Any

from orchestrator import catalog
from orchestrator.spec import JobSpec

TAG_RUN = "orchestrator-run"
TAG_OWNER = "orchestrator-owner"
TAG_EXPIRES = "orchestrator-expires"
TAG_JOB = "orchestrator-job"

# How long after max_duration a run's resources count as abandoned for `gc`: teardown of a
# healthy run finishes well within it.
EXPIRY_GRACE = timedelta(minutes=30)
VNET_CIDR = "10.42.0.0/16"
SUBNET_CIDR = "10.42.0.0/24"
SUBNET_NAME = "nodes"
NETWORK_API_FOR_INLINE_NIC = "2022-11-01"
RUN_ID_RE = re.compile(r"^[a-z][a-z0-9-]{2,38}[a-z0-9]$")

T_RG = "Microsoft.Resources/resourceGroups"
T_VNET = "Microsoft.Network/virtualNetworks"
T_NSG = "Microsoft.Network/networkSecurityGroups"
T_VM = "Microsoft.Compute/virtualMachines"
T_SCHEDULE = "Microsoft.DevTestLab/schedules"
SCHEDULE_API_VERSION = "2018-09-15"


def new_run_id(job_name: str, token: str | None = None) -> str:
    """`<job name, at most 24 chars>-<6 hex>`: valid in every resource name it becomes part of."""
    stem = job_name[:24].rstrip("-")
    return f"{stem}-{token or secrets.token_hex(3)}"


def resource_group_name(run_id: str) -> str:
    return f"orch-{run_id}"


@dataclass(frozen=True)
class PlannedResource:
    type: str
    name: str
    id: str
    body: dict[str, Any]
    depends_on: tuple[str, ...] = ()
    stage: int = 0

    @property
    def short_type(self) -> str:
        return self.type.rsplit("/", 1)[-1]


@dataclass(frozen=True)
class NodePlan:
    rank: int
    vm_name: str
    nic_name: str
    public_ip_name: str
    os_disk_name: str


@dataclass(frozen=True)
class ResourcePlan:
    run_id: str
    subscription_id: str
    resource_group: str
    region: str
    tags: dict[str, str]
    resources: tuple[PlannedResource, ...]
    nodes: tuple[NodePlan, ...]
    ssh_user: str
    ssh_sources: tuple[str, ...]
    hourly_usd: float
    warnings: tuple[str, ...] = field(default=())

    @property
    def stages(self) -> list[list[PlannedResource]]:
        out: list[list[PlannedResource]] = []
        for r in self.resources:
            while len(out) <= r.stage:
                out.append([])
            out[r.stage].append(r)
        return out

    def by_id(self, rid: str) -> PlannedResource:
        for r in self.resources:
            if r.id == rid:
                return r
        raise KeyError(rid)

    def critical_path_seconds(self, typical: dict[str, float] | None = None) -> float:
        """Longest dependency chain, in typical seconds per resource type."""
        typical = typical or catalog.TYPICAL_SECONDS
        finish: dict[str, float] = {}
        for r in self.resources:  # resources are in dependency order
            start = max((finish[d] for d in r.depends_on), default=0.0)
            finish[r.id] = start + typical.get(r.type, 0.0)
        return max(finish.values(), default=0.0)


def _rid(sub: str, rg: str, provider_type: str | None = None, name: str | None = None) -> str:
    base = f"/subscriptions/{sub}/resourceGroups/{rg}"
    return base if provider_type is None else f"{base}/providers/{provider_type}/{name}"


def make_tags(spec: JobSpec, run_id: str, owner: str, now: datetime) -> dict[str, str]:
    expires = now.astimezone(UTC) + timedelta(seconds=spec.max_duration) + EXPIRY_GRACE
    return {
        TAG_RUN: run_id,
        TAG_OWNER: owner[:256],
        TAG_EXPIRES: expires.strftime("%Y-%m-%dT%H:%M:%SZ"),
        TAG_JOB: spec.name,
    }


def _nsg_rules(sources: list[str]) -> list[dict[str, Any]]:
    ssh_source: dict[str, Any] = {"sourceAddressPrefixes": sources} if sources else {"sourceAddressPrefix": "Internet"}
    return [
        {
            "name": "ssh-in",
            "properties": {
                "priority": 100,
                "direction": "Inbound",
                "access": "Allow",
                "protocol": "Tcp",
                "sourcePortRange": "*",
                "destinationPortRange": "22",
                "destinationAddressPrefix": "*",
                **ssh_source,
            },
        },
        {
            # Multi-node training talks on arbitrary ports (NCCL, torchrun's rendezvous).
            "name": "intra-vnet-in",
            "properties": {
                "priority": 110,
                "direction": "Inbound",
                "access": "Allow",
                "protocol": "*",
                "sourcePortRange": "*",
                "destinationPortRange": "*",
                "sourceAddressPrefix": "VirtualNetwork",
                "destinationAddressPrefix": "VirtualNetwork",
            },
        },
        {
            # Azure's own default rules also allow the load balancer's probes; we want nothing but
            # the two rules above, so say so explicitly ahead of the defaults.
            "name": "deny-all-in",
            "properties": {
                "priority": 4000,
                "direction": "Inbound",
                "access": "Deny",
                "protocol": "*",
                "sourcePortRange": "*",
                "destinationPortRange": "*",
                "sourceAddressPrefix": "*",
                "destinationAddressPrefix": "*",
            },
        },
    ]


def build_plan(
    spec: JobSpec,
    run_id: str,
    *,
    subscription_id: str,
    owner: str,
    now: datetime,
    ssh_public_key: str,
    custom_data: Mapping[int, str] | None = None,
) -> ResourcePlan:
    """`custom_data` maps a node's rank to its base64 cloud-init (each VM has its own host key)."""
    if not RUN_ID_RE.match(run_id):
        raise ValueError(f"run id {run_id!r} is not valid in Azure resource names")
    res = spec.resources
    size = res.size
    image = catalog.resolve_image(res.image, gpu=size.is_gpu)
    rg = resource_group_name(run_id)
    tags = make_tags(spec, run_id, owner, now)
    sub = subscription_id
    warnings: list[str] = []

    rg_res = PlannedResource(T_RG, rg, _rid(sub, rg), {"location": res.region, "tags": tags}, (), 0)
    vnet_name, nsg_name = f"{run_id}-vnet", f"{run_id}-nsg"
    vnet_id, nsg_id = _rid(sub, rg, T_VNET, vnet_name), _rid(sub, rg, T_NSG, nsg_name)
    subnet_id = f"{vnet_id}/subnets/{SUBNET_NAME}"
    vnet = PlannedResource(
        T_VNET,
        vnet_name,
        vnet_id,
        {
            "location": res.region,
            "tags": tags,
            "properties": {
                "addressSpace": {"addressPrefixes": [VNET_CIDR]},
                "subnets": [{"name": SUBNET_NAME, "properties": {"addressPrefix": SUBNET_CIDR}}],
            },
        },
        (rg_res.id,),
        1,
    )
    sources = [c for c in spec.ssh.allowed_cidrs if c not in {"auto", "any"}]
    if "any" in spec.ssh.allowed_cidrs or not sources:
        sources = []
        warnings.append(
            "SSH (port 22) is open to the whole Internet; set ssh.allowed_cidrs to your address "
            "(or --ssh-cidr auto to detect it)"
        )
    nsg = PlannedResource(
        T_NSG,
        nsg_name,
        nsg_id,
        {"location": res.region, "tags": tags, "properties": {"securityRules": _nsg_rules(sources)}},
        (rg_res.id,),
        1,
    )

    vms: list[PlannedResource] = []
    nodes: list[NodePlan] = []
    for rank in range(spec.nodes):
        vm_name = f"{run_id}-{rank}"
        node = NodePlan(rank, vm_name, f"{vm_name}-nic", f"{vm_name}-pip", f"{vm_name}-osdisk")
        nodes.append(node)
        vms.append(
            PlannedResource(
                T_VM,
                vm_name,
                _rid(sub, rg, T_VM, vm_name),
                _vm_body(spec, node, tags, image, subnet_id, nsg_id, ssh_public_key, (custom_data or {}).get(rank)),
                (vnet.id, nsg.id),
                2,
            )
        )
    # Azure's auto-shutdown deallocates each VM at a time of day: the backstop that stops compute
    # billing if this process (and its teardown) dies. Daily schedules have minute resolution in
    # UTC; runs longer than a day are stopped by the VM's own watchdog and by `gc`.
    shutdown_at = (now.astimezone(UTC) + timedelta(seconds=spec.max_duration) + EXPIRY_GRACE).strftime("%H%M")
    schedules = [
        PlannedResource(
            T_SCHEDULE,
            f"shutdown-computevm-{vm.name}",
            _rid(sub, rg, T_SCHEDULE, f"shutdown-computevm-{vm.name}"),
            {
                "location": res.region,
                "tags": tags,
                "properties": {
                    "status": "Enabled",
                    "taskType": "ComputeVmShutdownTask",
                    "dailyRecurrence": {"time": shutdown_at},
                    "timeZoneId": "UTC",
                    "targetResourceId": vm.id,
                    "notificationSettings": {"status": "Disabled"},
                },
            },
            (vm.id,),
            3,
        )
        for vm in vms
    ]
    if spec.max_duration > 24 * 3600:
        warnings.append("max_duration is over a day: Azure's daily auto-shutdown may stop the VMs before it ends")
    if res.spot:
        warnings.append("spot VMs can be evicted at any time; checkpoints under $ORCH_CHECKPOINT_DIR survive")
    return ResourcePlan(
        run_id=run_id,
        subscription_id=sub,
        resource_group=rg,
        region=res.region,
        tags=tags,
        resources=(rg_res, vnet, nsg, *vms, *schedules),
        nodes=tuple(nodes),
        ssh_user=spec.ssh.user,
        ssh_sources=tuple(sources),
        hourly_usd=spec.hourly_usd(),
        warnings=tuple(warnings),
    )


def _vm_body(
    spec: JobSpec,
    node: NodePlan,
    tags: dict[str, str],
    image: catalog.Image,
    subnet_id: str,
    nsg_id: str,
    ssh_public_key: str,
    custom_data: str | None,
) -> dict[str, Any]:
    res = spec.resources
    user = spec.ssh.user
    os_profile: dict[str, Any] = {
        "computerName": node.vm_name,
        "adminUsername": user,
        "linuxConfiguration": {
            "disablePasswordAuthentication": True,
            "provisionVMAgent": True,
            "ssh": {"publicKeys": [{"path": f"/home/{user}/.ssh/authorized_keys", "keyData": ssh_public_key}]},
        },
    }
    if custom_data is not None:
        os_profile["customData"] = custom_data
    props: dict[str, Any] = {
        "hardwareProfile": {"vmSize": res.vm_size},
        "storageProfile": {
            "imageReference": {
                "publisher": image.publisher,
                "offer": image.offer,
                "sku": image.sku,
                "version": image.version,
            },
            "osDisk": {
                "name": node.os_disk_name,
                "createOption": "FromImage",
                "deleteOption": "Delete",
                "caching": "ReadWrite",
                "diskSizeGB": res.disk_gb,
                "managedDisk": {"storageAccountType": "Premium_LRS"},
            },
        },
        "osProfile": os_profile,
        "networkProfile": {
            "networkApiVersion": NETWORK_API_FOR_INLINE_NIC,
            "networkInterfaceConfigurations": [
                {
                    "name": node.nic_name,
                    "properties": {
                        "primary": True,
                        "deleteOption": "Delete",
                        "enableAcceleratedNetworking": res.size.accelerated_networking,
                        "networkSecurityGroup": {"id": nsg_id},
                        "ipConfigurations": [
                            {
                                "name": "ipconfig1",
                                "properties": {
                                    "primary": True,
                                    "subnet": {"id": subnet_id},
                                    "publicIPAddressConfiguration": {
                                        "name": node.public_ip_name,
                                        "sku": {"name": "Standard", "tier": "Regional"},
                                        "properties": {
                                            "deleteOption": "Delete",
                                            "publicIPAllocationMethod": "Static",
                                        },
                                    },
                                },
                            }
                        ],
                    },
                }
            ],
        },
    }
    if res.spot:
        props["priority"] = "Spot"
        props["evictionPolicy"] = "Delete"
        props["billingProfile"] = {"maxPrice": -1}
    body: dict[str, Any] = {"location": res.region, "tags": tags, "properties": props}
    if res.zone:
        body["zones"] = [res.zone]
    return body
