"""What the tool knows about Azure without asking it: VM sizes, regions, images, prices, durations.

Pure data at the bottom of the import graph, so that spec validation, planning, the provisioner and
the emulator agree on one list. Prices are a dated snapshot of the public retail prices API
(Linux, pay-as-you-go, USD); refresh with:

    curl -s "https://prices.azure.com/api/retail/prices?\\$filter=serviceName eq 'Virtual Machines' \\
        and armRegionName eq 'eastus' and armSkuName eq 'Standard_NC4as_T4_v3'" | jq '.Items[]'

Regional prices differ from eastus by a small factor; the snapshot keeps one factor per region
rather than a full matrix.
"""

from __future__ import annotations

from dataclasses import dataclass

PRICE_SNAPSHOT_DATE = "2026-11-01"


@dataclass(frozen=True)
class VmSize:
    name: str
    vcpus: int
    memory_gib: float
    gpus: int
    gpu_model: str | None
    family: str  # the quota family Azure names in OperationNotAllowed messages
    usd_per_hour: float  # eastus, Linux, pay-as-you-go
    spot_factor: float  # typical spot price as a fraction of pay-as-you-go
    regions: frozenset[str]
    accelerated_networking: bool = True

    @property
    def is_gpu(self) -> bool:
        return self.gpus > 0


_T4 = frozenset(
    {
        "eastus", "eastus2", "westus2", "westus3", "southcentralus", "northcentralus", "centralus",
        "westeurope", "northeurope", "uksouth", "francecentral", "germanywestcentral", "swedencentral",
        "japaneast", "australiaeast", "southeastasia", "canadacentral", "koreacentral", "centralindia",
    }
)  # fmt: skip
_V100 = frozenset({"eastus", "eastus2", "westus2", "southcentralus", "westeurope", "northeurope", "japaneast"})
_A100 = frozenset(
    {"eastus", "eastus2", "westus2", "westus3", "southcentralus", "westeurope", "swedencentral", "japaneast"}
)
_H100 = frozenset({"eastus", "eastus2", "southcentralus", "westus3", "swedencentral"})
_A10 = frozenset({"eastus", "southcentralus", "westus2", "westus3", "westeurope", "northeurope", "uksouth"})
_ALL = _T4 | _V100 | _A100 | _H100 | _A10

VM_SIZES: dict[str, VmSize] = {
    s.name: s
    for s in (
        VmSize("Standard_NC4as_T4_v3", 4, 28, 1, "Tesla T4 16GB", "standardNCASv3_T4Family", 0.526, 0.2, _T4),
        VmSize("Standard_NC8as_T4_v3", 8, 56, 1, "Tesla T4 16GB", "standardNCASv3_T4Family", 0.752, 0.2, _T4),
        VmSize("Standard_NC16as_T4_v3", 16, 110, 1, "Tesla T4 16GB", "standardNCASv3_T4Family", 1.204, 0.2, _T4),
        VmSize("Standard_NC64as_T4_v3", 64, 440, 4, "Tesla T4 16GB", "standardNCASv3_T4Family", 4.352, 0.2, _T4),
        VmSize("Standard_NC6s_v3", 6, 112, 1, "Tesla V100 16GB", "standardNCSv3Family", 3.06, 0.25, _V100),
        VmSize("Standard_NC12s_v3", 12, 224, 2, "Tesla V100 16GB", "standardNCSv3Family", 6.12, 0.25, _V100),
        VmSize("Standard_NC24s_v3", 24, 448, 4, "Tesla V100 16GB", "standardNCSv3Family", 12.24, 0.25, _V100),
        VmSize(
            "Standard_NC24ads_A100_v4",
            24,
            220,
            1,
            "A100 80GB",
            "StandardNCADSA100v4Family",
            3.673,
            0.3,
            _A100,
        ),
        VmSize(
            "Standard_NC48ads_A100_v4",
            48,
            440,
            2,
            "A100 80GB",
            "StandardNCADSA100v4Family",
            7.346,
            0.3,
            _A100,
        ),
        VmSize(
            "Standard_NC96ads_A100_v4",
            96,
            880,
            4,
            "A100 80GB",
            "StandardNCADSA100v4Family",
            14.692,
            0.3,
            _A100,
        ),
        VmSize("Standard_ND96asr_v4", 96, 900, 8, "A100 40GB", "standardNDASv4_A100Family", 27.197, 0.3, _A100),
        VmSize(
            "Standard_ND96isr_H100_v5",
            96,
            1900,
            8,
            "H100 80GB",
            "standardNDSH100v5Family",
            98.32,
            0.35,
            _H100,
        ),
        VmSize("Standard_NV36ads_A10_v5", 36, 440, 1, "A10 24GB", "StandardNVADSA10v5Family", 3.20, 0.25, _A10),
        VmSize("Standard_B2s", 2, 4, 0, None, "standardBSFamily", 0.0416, 1.0, _ALL, accelerated_networking=False),
        VmSize("Standard_D2s_v5", 2, 8, 0, None, "standardDSv5Family", 0.096, 0.15, _ALL),
        VmSize("Standard_D4s_v5", 4, 16, 0, None, "standardDSv5Family", 0.192, 0.15, _ALL),
        VmSize("Standard_D8s_v5", 8, 32, 0, None, "standardDSv5Family", 0.384, 0.15, _ALL),
        VmSize("Standard_D16s_v5", 16, 64, 0, None, "standardDSv5Family", 0.768, 0.15, _ALL),
        VmSize("Standard_F4s_v2", 4, 8, 0, None, "standardFSv2Family", 0.169, 0.15, _ALL),
    )
}

# Price of each region relative to eastus (same snapshot date).
REGIONS: dict[str, float] = {
    "eastus": 1.0, "eastus2": 1.0, "westus2": 1.0, "westus3": 1.0, "southcentralus": 1.0,
    "northcentralus": 1.05, "centralus": 1.05, "canadacentral": 1.1, "westeurope": 1.12,
    "northeurope": 1.08, "uksouth": 1.12, "francecentral": 1.15, "germanywestcentral": 1.15,
    "swedencentral": 1.05, "japaneast": 1.22, "koreacentral": 1.2, "australiaeast": 1.25,
    "southeastasia": 1.15, "centralindia": 1.1,
}  # fmt: skip

# Regions without availability zones; every other listed region has zones 1, 2 and 3.
REGIONS_WITHOUT_ZONES = frozenset({"northcentralus", "westus"})

STANDARD_PUBLIC_IP_USD_PER_HOUR = 0.005


@dataclass(frozen=True)
class Image:
    publisher: str
    offer: str
    sku: str
    version: str = "latest"

    @property
    def urn(self) -> str:
        return f"{self.publisher}:{self.offer}:{self.sku}:{self.version}"


# GPU sizes get an image that already carries the NVIDIA driver and CUDA (no 10-minute driver
# install on every VM); CPU sizes get plain Ubuntu.
IMAGE_ALIASES: dict[str, Image] = {
    "ubuntu-24.04": Image("Canonical", "ubuntu-24_04-lts", "server"),
    "ubuntu-22.04": Image("Canonical", "0001-com-ubuntu-server-jammy", "22_04-lts-gen2"),
    "ubuntu-hpc-22.04": Image("microsoft-dsvm", "ubuntu-hpc", "2204"),
}
DEFAULT_GPU_IMAGE = "ubuntu-hpc-22.04"
DEFAULT_CPU_IMAGE = "ubuntu-24.04"

# Typical Azure durations in seconds (public reports), by ARM resource type: what the dry-run
# estimate adds up and what the poll schedules are shaped around.
TYPICAL_SECONDS: dict[str, float] = {
    "Microsoft.Resources/resourceGroups": 1.0,
    "Microsoft.Network/virtualNetworks": 7.0,
    "Microsoft.Network/networkSecurityGroups": 3.0,
    "Microsoft.Network/publicIPAddresses": 3.0,
    "Microsoft.Network/networkInterfaces": 3.0,
    "Microsoft.Compute/virtualMachines": 120.0,
}
TYPICAL_BOOT_TO_SSH_SECONDS = 45.0


def price_per_hour(size: VmSize, region: str, spot: bool) -> float:
    base = size.usd_per_hour * REGIONS.get(region, 1.0)
    return base * size.spot_factor if spot else base


def region_has_zones(region: str) -> bool:
    return region not in REGIONS_WITHOUT_ZONES


def resolve_image(name: str, gpu: bool) -> Image:
    """An alias, 'auto', or a publisher:offer:sku:version URN."""
    if name == "auto":
        name = DEFAULT_GPU_IMAGE if gpu else DEFAULT_CPU_IMAGE
    if name in IMAGE_ALIASES:
        return IMAGE_ALIASES[name]
    parts = name.split(":")
    if len(parts) != 4 or not all(parts):
        raise ValueError(name)
    return Image(*parts)
