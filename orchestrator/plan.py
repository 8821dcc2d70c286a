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
from orchestrator.candidates import Candidate
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

# The auto-shutdown is a DevTestLab daily schedule (dailyRecurrence.time HHmm in a timeZoneId): it
# fires at the first HH:MM after it is enabled, so one created enabled at the start of a run always
# fires within 24 h. With max_duration below SCHEDULE_ENABLED_BELOW the expiry (max_duration + 30 min
# grace) is less than 23 h 30 min away and its HH:MM is the next one: the schedule is created enabled.
# From SCHEDULE_ENABLED_BELOW on it is created disabled and must be enabled during the run's last day,
# from SCHEDULE_ENABLE_LEAD before the expiry (an hour after the previous occurrence of that HH:MM, so
# the next occurrence after enabling is the expiry itself) until the expiry.
SCHEDULE_ENABLED_BELOW = timedelta(hours=23)
SCHEDULE_ENABLE_LEAD = timedelta(hours=23)
SCHEDULE_TIME_ZONE = "UTC"
NO_SSH_RULE_WARNING = (
    "ssh.allowed_cidrs resolves to no address, so the NSG has no SSH rule and denies SSH: nothing could "
    "connect to the nodes"
)

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
    # When this node's auto-shutdown schedule, created disabled, must be enabled (UTC); None: it is
    # created enabled. See SCHEDULE_ENABLED_BELOW.
    schedule_enable_at: datetime | None = None


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
    # When the auto-shutdown schedules deallocate the VMs (UTC, to the minute): the run's expiry.
    shutdown_at: datetime | None = None
    candidate: Candidate | None = None  # the size, region, zone and spot choice of every node

    @property
    def schedule_enable_at(self) -> datetime | None:
        """When the disabled auto-shutdown schedules must be enabled; None when they start enabled."""
        return min((n.schedule_enable_at for n in self.nodes if n.schedule_enable_at), default=None)

    @property
    def schedules(self) -> list[PlannedResource]:
        return [r for r in self.resources if r.type == T_SCHEDULE]

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


def expiry(spec: JobSpec, now: datetime) -> datetime:
    """When a run started at `now` counts as abandoned (UTC): max_duration plus the grace."""
    return now.astimezone(UTC) + timedelta(seconds=spec.max_duration) + EXPIRY_GRACE


def schedule_enable_time(spec: JobSpec, now: datetime) -> datetime | None:
    """When a run's disabled auto-shutdown must be enabled (UTC); None when it is created enabled."""
    if timedelta(seconds=spec.max_duration) < SCHEDULE_ENABLED_BELOW:
        return None
    return expiry(spec, now).replace(second=0, microsecond=0) - SCHEDULE_ENABLE_LEAD


def make_tags(spec: JobSpec, run_id: str, owner: str, now: datetime) -> dict[str, str]:
    expires = expiry(spec, now)
    return {
        TAG_RUN: run_id,
        TAG_OWNER: owner[:256],
        TAG_EXPIRES: expires.strftime("%Y-%m-%dT%H:%M:%SZ"),
        TAG_JOB: spec.name,
    }


def _nsg_rules(sources: list[str], internet: bool) -> list[dict[str, Any]]:
    """`internet`: SSH from anywhere (`any`); else from `sources`, and no SSH rule at all when that is
    empty (the deny-all rule below then refuses SSH)."""
    rules: list[dict[str, Any]] = []
    if internet or sources:
        ssh_source: dict[str, Any] = (
            {"sourceAddressPrefix": "Internet"} if internet else {"sourceAddressPrefixes": sources}
        )
        rules.append(
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
            }
        )
    return [
        *rules,
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
    candidate: Candidate | None = None,
    group_location: str | None = None,
    identity: bool = False,
) -> ResourcePlan:
    """`custom_data` maps a node's rank to its base64 cloud-init (each VM has its own host key).
    `candidate`: where the nodes go (default: the job's first candidate); every node of a plan is in
    its one region and zone. `group_location`: where the run's group already is, when an earlier
    candidate created it in another region (a group's location cannot change; what it holds may be
    in any region). `identity`: each VM gets a system-assigned managed identity (autostop: the VM
    deallocates itself with it)."""
    if not RUN_ID_RE.match(run_id):
        raise ValueError(f"run id {run_id!r} is not valid in Azure resource names")
    if candidate is not None:
        spec = spec.pinned(candidate)
    res = spec.resources
    size = res.size
    image = catalog.resolve_image(res.image, gpu=size.is_gpu)
    rg = resource_group_name(run_id)
    tags = make_tags(spec, run_id, owner, now)
    sub = subscription_id
    warnings: list[str] = []

    rg_body = {"location": group_location or res.region, "tags": tags}
    rg_res = PlannedResource(T_RG, rg, _rid(sub, rg), rg_body, (), 0)
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
    internet = "any" in spec.ssh.allowed_cidrs
    sources = [] if internet else [c for c in spec.ssh.allowed_cidrs if c not in {"auto", "any"}]
    if internet:
        warnings.append(
            "SSH (port 22) is open to the whole Internet; set ssh.allowed_cidrs to your address "
            "(or --ssh-cidr auto to detect it)"
        )
    elif not sources:
        warnings.append(NO_SSH_RULE_WARNING)
    nsg = PlannedResource(
        T_NSG,
        nsg_name,
        nsg_id,
        {"location": res.region, "tags": tags, "properties": {"securityRules": _nsg_rules(sources, internet)}},
        (rg_res.id,),
        1,
    )

    security = catalog.security_choice(size, image)
    if security.warning:
        warnings.append(security.warning)
    enable_at = schedule_enable_time(spec, now)
    vms: list[PlannedResource] = []
    nodes: list[NodePlan] = []
    for rank in range(spec.nodes):
        vm_name = f"{run_id}-{rank}"
        node = NodePlan(rank, vm_name, f"{vm_name}-nic", f"{vm_name}-pip", f"{vm_name}-osdisk", enable_at)
        nodes.append(node)
        vms.append(
            PlannedResource(
                T_VM,
                vm_name,
                _rid(sub, rg, T_VM, vm_name),
                _vm_body(
                    spec,
                    node,
                    tags,
                    image,
                    security,
                    subnet_id,
                    nsg_id,
                    ssh_public_key,
                    (custom_data or {}).get(rank),
                    identity,
                ),
                (vnet.id, nsg.id),
                2,
            )
        )
    # Azure's auto-shutdown deallocates each VM at the run's expiry: the backstop that stops compute
    # billing if this process (and its teardown) dies. See SCHEDULE_ENABLED_BELOW for when it starts
    # disabled.
    shutdown_at = expiry(spec, now).replace(second=0, microsecond=0)
    schedules = [
        PlannedResource(
            T_SCHEDULE,
            f"shutdown-computevm-{vm.name}",
            _rid(sub, rg, T_SCHEDULE, f"shutdown-computevm-{vm.name}"),
            shutdown_schedule_body(vm.id, res.region, tags, shutdown_at, enabled=enable_at is None),
            (vm.id,),
            3,
        )
        for vm in vms
    ]
    if enable_at is not None:
        warnings.append(shutdown_warning(shutdown_at, enable_at))
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
        ssh_sources=("any",) if internet else tuple(sources),
        hourly_usd=spec.hourly_usd(),
        warnings=tuple(warnings),
        shutdown_at=shutdown_at,
        candidate=Candidate(res.vm_size, res.region, res.zone, res.spot),
    )


def shutdown_schedule_body(
    vm_id: str, region: str, tags: dict[str, str], at: datetime, *, enabled: bool
) -> dict[str, Any]:
    """A VM's auto-shutdown (DevTestLab 2018-09-15 Schedule): deallocates the VM daily at `at`'s HH:MM (UTC)."""
    return {
        "location": region,
        "tags": tags,
        "properties": {
            "status": "Enabled" if enabled else "Disabled",
            "taskType": "ComputeVmShutdownTask",
            "dailyRecurrence": {"time": at.astimezone(UTC).strftime("%H%M")},
            "timeZoneId": SCHEDULE_TIME_ZONE,
            "targetResourceId": vm_id,
            "notificationSettings": {"status": "Disabled"},
        },
    }


def shutdown_warning(shutdown_at: datetime, enable_at: datetime) -> str:
    fmt = "%Y-%m-%d %H:%M UTC"
    return (
        f"the auto-shutdown is created disabled: it is a daily schedule (deallocate at {shutdown_at:%H:%M} UTC) "
        "and one enabled now would fire within 24 h, before max_duration ends. The process watching the "
        f"run enables it at {enable_at.strftime(fmt)}, so that it deallocates the VMs at {shutdown_at.strftime(fmt)}. "
        "If nothing watches the run then, nothing deallocates them: the VM-side watchdog powers them off "
        "at max_duration, which stops the job but not the compute bill (a VM shut down from inside stays "
        "allocated), until `orchestrator down` or `orchestrator gc` deletes the run (gc counts it as expired "
        f"from {shutdown_at.strftime(fmt)})"
    )


def _vm_body(
    spec: JobSpec,
    node: NodePlan,
    tags: dict[str, str],
    image: catalog.Image,
    security: catalog.SecurityChoice,
    subnet_id: str,
    nsg_id: str,
    ssh_public_key: str,
    custom_data: str | None,
    identity: bool = False,
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
    profile = security.profile()
    if profile is not None:
        props["securityProfile"] = profile
    if res.spot:
        props["priority"] = "Spot"
        props["evictionPolicy"] = "Delete"
        props["billingProfile"] = {"maxPrice": -1}
    body: dict[str, Any] = {"location": res.region, "tags": tags, "properties": props}
    if identity:
        body["identity"] = {"type": "SystemAssigned"}
    if res.zone:
        body["zones"] = [res.zone]
    return body
