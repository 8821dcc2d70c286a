"""What the tool knows about Azure without asking it: VM sizes, regions, images, prices, durations.

Pure data at the bottom of the import graph, so that spec validation, planning, the provisioner and
the emulator agree on one list.

Sizes: `VM_SIZES` holds only sizes that can be created today. Sizes Azure has retired live in
`RETIRED_SIZES` (with the date and Microsoft's suggested replacement) so that a job asking for one
is refused with a useful message; they are never suggested or offered.

Prices are an offline table shaped like the Azure Retail Prices API's answer (Linux, pay-as-you-go,
USD; see `PRICE_SOURCES` for where every figure came from and when). `prices_from_retail_items`
turns the API's `Items` into the same table, so a later refresh can replace the snapshot:

    curl -s "https://prices.azure.com/api/retail/prices?\\$filter=serviceName eq 'Virtual Machines' \\
        and armRegionName eq 'eastus' and armSkuName eq 'Standard_NC4as_T4_v3'" | jq '.Items[]'
"""

from __future__ import annotations

import json
import os
from collections.abc import Iterable, Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any

PRICE_SNAPSHOT_DATE = "2026-11-01"  # when this table was assembled from the sources below

# Where each figure in this module comes from. Facts only; the sources are public.
PRICE_SOURCES: dict[str, str] = {
    "vm_on_demand": (
        "Linux pay-as-you-go hourly prices per size and US region: SkyPilot's Azure catalog "
        "(github.com/skypilot-org/skypilot-catalog, catalogs/v6/azure/vms.csv at commit 098741e7), which is "
        "generated from the Azure Retail Prices API (prices.azure.com/api/retail/prices); read 2026-11-01. "
        "eastus figures agree with other published snapshots of the same API (e.g. NC4as_T4_v3 0.526, "
        "NC24ads_A100_v4 3.673)."
    ),
    "vm_on_demand_cpu": (
        "B2s, D*s_v5 and F4s_v2 eastus prices: carried over from the previous snapshot (Linux pay-as-you-go "
        "list prices); not re-checked against a stored copy of the API."
    ),
    "region_factor": (
        "Regions without a per-size figure use REGION_PRICE_FACTOR x the eastus price. US factors are the "
        "ratios seen in the SkyPilot snapshot (e.g. southcentralus and westus ~1.2 for NCasT4_v3, "
        "centralus ~1.13); non-US factors are estimates carried over from the previous snapshot and are "
        "NOT verified against a published price; `prices_from_retail_items` output should replace them."
    ),
    "spot": (
        "Spot: Azure publishes spot prices through the same API (skuName ending ' Spot'), but they move "
        "with supply and demand: published snapshots for NC24ads_A100_v4 in eastus range from 0.44 to 1.10 "
        "USD/h (0.12-0.30 of pay-as-you-go). Where no per-size/region spot price is in the table, the "
        "estimate uses SPOT_FACTOR = 0.3 of pay-as-you-go (DESIGN.md: 'roughly 0.3'), the conservative end, "
        "so budgets are not under-estimated."
    ),
    "os_disk": (
        "Premium SSD LRS monthly prices per tier, eastus (azure.microsoft.com/pricing/details/managed-disks/); "
        "P10 19.71, P20 73.22, P30 135.17 USD/month are also quoted by TechTarget's 'How does Azure Premium "
        "Storage billing work?'. A disk is billed at the smallest tier that holds it; a month is 730 hours "
        "(Azure pricing calculator). Other regions use REGION_PRICE_FACTOR."
    ),
    "public_ip": "Standard static public IPv4: 0.005 USD/hour (azure.microsoft.com/pricing/details/ip-addresses/).",
    "temp_disk": (
        "Temp (resource) disk sizes from Microsoft's size tables: NCasT4_v3 180/360/360/2880 GiB and "
        "NVadsA10_v5 720 GiB (azure-docs, Autodesk VRED on Azure), NC A100 v4 64/128/256 GiB plus NVMe "
        "(TUFLOW HPC on Azure); Dsv5 has no temp disk; B2s 8 GiB, F4s_v2 32 GiB, ND96asr_v4 6000 GiB, "
        "ND96isr_H100_v5 1000 GiB plus NVMe (Microsoft's series pages)."
    ),
    "retirements": (
        "NCv3 (NC6s/NC12s/NC24s/NC24rs_v3, V100) retired 2025-09-30; Microsoft's migration guide "
        "(azure-docs articles/virtual-machines/ncv3-nc6s-nc12s-nc24s-retirement.md) recommends NC A100 v4. "
        "NV (M60, v1) and NV_Promo retired 2023-09-06 (sizes/migration-guides/nv-series-retirement.md)."
    ),
    "image_os_disk": (
        "OS disk size baked into each image (the minimum `diskSizeGB`): microsoft-dsvm ubuntu-hpc 2204 "
        "64 GB; Canonical ubuntu-24_04-lts server and 0001-com-ubuntu-server-jammy 22_04-lts-gen2 30 GB. "
        "Azure refuses a smaller diskSizeGB with 409 OperationNotAllowed ('The specified disk size ... is "
        "smaller than the size of the corresponding disk in the VM image')."
    ),
}

HOURS_PER_MONTH = 730.0
SPOT_FACTOR = 0.3
STANDARD_PUBLIC_IP_USD_PER_HOUR = 0.005


@dataclass(frozen=True)
class Retirement:
    date: str  # ISO date Azure stopped the size
    replacement: str  # a size Microsoft's migration guide points to
    guide: str  # where the retirement and migration are documented


@dataclass(frozen=True)
class VmSize:
    name: str
    vcpus: int
    memory_gib: float
    gpus: int
    gpu_model: str | None
    family: str  # the quota family Azure names in OperationNotAllowed messages
    usd_per_hour: float  # eastus, Linux, pay-as-you-go
    spot_factor: float  # spot as a fraction of pay-as-you-go when no spot price is published
    regions: frozenset[str]
    accelerated_networking: bool = True
    temp_disk_gb: int = 0  # local temp disk (/mnt on Azure's Ubuntu images); 0: none
    spot_supported: bool = True  # Azure offers no Spot for B-series
    retired: Retirement | None = None
    trusted_launch: bool = True  # Azure offers Trusted Launch on this size (SECURITY_SOURCES["sizes"])

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
_ALL = _T4 | _A100 | _H100 | _A10

_NCV3_RETIRED = Retirement(
    "2025-09-30",
    "Standard_NC24ads_A100_v4",
    "https://learn.microsoft.com/azure/virtual-machines/ncv3-nc6s-nc12s-nc24s-retirement",
)
_NV_RETIRED = Retirement(
    "2023-09-06",
    "Standard_NV36ads_A10_v5",
    "https://learn.microsoft.com/azure/virtual-machines/sizes/migration-guides/nv-series-retirement",
)
_S = SPOT_FACTOR

VM_SIZES: dict[str, VmSize] = {
    s.name: s
    for s in (
        VmSize(
            "Standard_NC4as_T4_v3",
            4,
            28,
            1,
            "Tesla T4 16GB",
            "standardNCASv3_T4Family",
            0.526,
            _S,
            _T4,
            temp_disk_gb=180,
        ),
        VmSize(
            "Standard_NC8as_T4_v3",
            8,
            56,
            1,
            "Tesla T4 16GB",
            "standardNCASv3_T4Family",
            0.752,
            _S,
            _T4,
            temp_disk_gb=360,
        ),
        VmSize(
            "Standard_NC16as_T4_v3",
            16,
            110,
            1,
            "Tesla T4 16GB",
            "standardNCASv3_T4Family",
            1.204,
            _S,
            _T4,
            temp_disk_gb=360,
        ),
        VmSize(
            "Standard_NC64as_T4_v3",
            64,
            440,
            4,
            "Tesla T4 16GB",
            "standardNCASv3_T4Family",
            4.352,
            _S,
            _T4,
            temp_disk_gb=2880,
        ),
        VmSize(
            "Standard_NC24ads_A100_v4",
            24,
            220,
            1,
            "A100 80GB",
            "StandardNCADSA100v4Family",
            3.673,
            _S,
            _A100,
            temp_disk_gb=64,
        ),
        VmSize(
            "Standard_NC48ads_A100_v4",
            48,
            440,
            2,
            "A100 80GB",
            "StandardNCADSA100v4Family",
            7.346,
            _S,
            _A100,
            temp_disk_gb=128,
        ),
        VmSize(
            "Standard_NC96ads_A100_v4",
            96,
            880,
            4,
            "A100 80GB",
            "StandardNCADSA100v4Family",
            14.692,
            _S,
            _A100,
            temp_disk_gb=256,
        ),
        VmSize(
            "Standard_ND96asr_v4",
            96,
            900,
            8,
            "A100 40GB",
            "standardNDASv4_A100Family",
            27.197,
            _S,
            _A100,
            temp_disk_gb=6000,
            trusted_launch=False,  # NDasrA100_v4: "currently not supported" (SECURITY_SOURCES["sizes"])
        ),
        VmSize(
            "Standard_ND96isr_H100_v5",
            96,
            1900,
            8,
            "H100 80GB",
            "standardNDSH100v5Family",
            98.32,
            _S,
            _H100,
            temp_disk_gb=1000,
        ),
        VmSize(
            "Standard_NV36ads_A10_v5",
            36,
            440,
            1,
            "A10 24GB",
            "StandardNVADSA10v5Family",
            3.20,
            _S,
            _A10,
            temp_disk_gb=720,
        ),
        VmSize(
            "Standard_B2s",
            2,
            4,
            0,
            None,
            "standardBSFamily",
            0.0416,
            _S,
            _ALL,
            accelerated_networking=False,
            temp_disk_gb=8,
            spot_supported=False,
        ),
        VmSize("Standard_D2s_v5", 2, 8, 0, None, "standardDSv5Family", 0.096, _S, _ALL),
        VmSize("Standard_D4s_v5", 4, 16, 0, None, "standardDSv5Family", 0.192, _S, _ALL),
        VmSize("Standard_D8s_v5", 8, 32, 0, None, "standardDSv5Family", 0.384, _S, _ALL),
        VmSize("Standard_D16s_v5", 16, 64, 0, None, "standardDSv5Family", 0.768, _S, _ALL),
        VmSize("Standard_F4s_v2", 4, 8, 0, None, "standardFSv2Family", 0.169, _S, _ALL, temp_disk_gb=32),
    )
}

# Sizes Azure no longer creates. Kept so that a job naming one is refused with the date and a
# replacement; never offered, never suggested as a correction.
RETIRED_SIZES: dict[str, VmSize] = {
    s.name: s
    for s in (
        VmSize(
            "Standard_NC6s_v3",
            6,
            112,
            1,
            "Tesla V100 16GB",
            "standardNCSv3Family",
            3.06,
            _S,
            _V100,
            retired=_NCV3_RETIRED,
        ),
        VmSize(
            "Standard_NC12s_v3",
            12,
            224,
            2,
            "Tesla V100 16GB",
            "standardNCSv3Family",
            6.12,
            _S,
            _V100,
            retired=_NCV3_RETIRED,
        ),
        VmSize(
            "Standard_NC24s_v3",
            24,
            448,
            4,
            "Tesla V100 16GB",
            "standardNCSv3Family",
            12.24,
            _S,
            _V100,
            retired=_NCV3_RETIRED,
        ),
        VmSize(
            "Standard_NC24rs_v3",
            24,
            448,
            4,
            "Tesla V100 16GB",
            "standardNCSv3Family",
            13.46,
            _S,
            _V100,
            retired=_NCV3_RETIRED,
        ),
        VmSize("Standard_NV6", 6, 56, 1, "Tesla M60", "standardNVFamily", 1.14, _S, frozenset(), retired=_NV_RETIRED),
        VmSize(
            "Standard_NV12", 12, 112, 2, "Tesla M60", "standardNVFamily", 2.28, _S, frozenset(), retired=_NV_RETIRED
        ),
        VmSize(
            "Standard_NV24", 24, 224, 4, "Tesla M60", "standardNVFamily", 4.56, _S, frozenset(), retired=_NV_RETIRED
        ),
    )
}


def unsupported_reason(size: VmSize) -> str | None:
    """Why orchestrator refuses a size Azure still offers, or None. NVadsA10 v5 needs NVIDIA's GRID
    driver: the ubuntu-hpc image ships the datacenter driver, which does not see an A10 vGPU, and
    Azure's NvidiaGpuDriverLinux extension (which installs GRID there) is not something this tool
    creates yet. Refused up front rather than paid for and found driverless at boot."""
    if size.gpu_model is not None and "A10" in size.gpu_model and "A100" not in size.gpu_model:
        return (
            f"{size.name} ({size.gpu_model}) needs NVIDIA's GRID driver, which the ubuntu-hpc image does not ship "
            "and orchestrator does not install yet (Azure's NvidiaGpuDriverLinux extension would); use a T4 "
            "(Standard_NC4as_T4_v3) or A100 (Standard_NC24ads_A100_v4) size"
        )
    return None


def retired_size(name: str) -> VmSize | None:
    """The retired size `name` names (any letter case), or None."""
    if name in RETIRED_SIZES:
        return RETIRED_SIZES[name]
    by_lower = {k.lower(): v for k, v in RETIRED_SIZES.items()}
    return by_lower.get(name.lower())


# Price of each region relative to eastus, for sizes without a regional figure in PRICES (see
# PRICE_SOURCES["region_factor"]).
REGION_PRICE_FACTOR: dict[str, float] = {
    "eastus": 1.0, "eastus2": 1.0, "westus2": 1.0, "westus3": 1.0, "southcentralus": 1.2,
    "northcentralus": 1.0, "centralus": 1.13, "canadacentral": 1.1, "westeurope": 1.12,
    "northeurope": 1.08, "uksouth": 1.12, "francecentral": 1.15, "germanywestcentral": 1.15,
    "swedencentral": 1.05, "japaneast": 1.22, "koreacentral": 1.2, "australiaeast": 1.25,
    "southeastasia": 1.15, "centralindia": 1.1,
}  # fmt: skip
REGIONS = REGION_PRICE_FACTOR  # the regions this tool knows (name kept for callers)

# Regions without availability zones; every other listed region has zones 1, 2 and 3.
REGIONS_WITHOUT_ZONES = frozenset({"northcentralus", "westus"})


# ---------------------------------------------------------------------------------------------
# The price table, shaped like the Retail Prices API's answer


@dataclass(frozen=True)
class Price:
    """USD per hour for one size in one region (Linux); None where no figure is known."""

    on_demand: float | None = None
    spot: float | None = None


# (armSkuName, armRegionName) -> Price
PriceTable = dict[tuple[str, str], Price]


def prices_from_retail_items(items: Iterable[Mapping[str, Any]]) -> PriceTable:
    """The Retail Prices API's `Items` (any number of pages, concatenated) -> a PriceTable.

    Keeps Linux virtual-machine meters priced per hour in USD of type `Consumption`: `skuName`
    ending in "Spot" is the spot price, "Low Priority" (Batch's older priority) is skipped, and
    `productName` containing "Windows" (the licence-inclusive meter) is skipped. Where the API
    lists a meter twice (several effective dates), the higher price is kept: an estimate should
    not come out low.
    """
    on_demand: dict[tuple[str, str], float] = {}
    spot: dict[tuple[str, str], float] = {}
    for item in items:
        if item.get("type") != "Consumption" or item.get("unitOfMeasure") != "1 Hour":
            continue
        if item.get("serviceName", "Virtual Machines") != "Virtual Machines":
            continue
        if item.get("currencyCode", "USD") != "USD" or "Windows" in str(item.get("productName", "")):
            continue
        sku, region, sku_name = item.get("armSkuName"), item.get("armRegionName"), str(item.get("skuName", ""))
        price = item.get("retailPrice")
        if not sku or not region or isinstance(price, bool) or not isinstance(price, int | float) or price <= 0:
            continue
        if "Low Priority" in sku_name:
            continue
        target = spot if "Spot" in sku_name else on_demand
        key = (str(sku), str(region))
        target[key] = max(float(price), target.get(key, 0.0))
    return {key: Price(on_demand.get(key), spot.get(key)) for key in on_demand.keys() | spot.keys()}


def _us(size: str, **by_region: float) -> list[dict[str, Any]]:
    return [
        {
            "armSkuName": size,
            "armRegionName": region,
            "retailPrice": usd,
            "unitOfMeasure": "1 Hour",
            "type": "Consumption",
            "skuName": size.removeprefix("Standard_").replace("_", " "),
        }
        for region, usd in by_region.items()
    ]


# The snapshot, as the API's items (PRICE_SOURCES["vm_on_demand"]): per-size regional figures for US
# regions. Spot prices are deliberately not included (PRICE_SOURCES["spot"]).
PRICES: PriceTable = prices_from_retail_items(
    [
        *_us("Standard_NC4as_T4_v3", eastus=0.526, eastus2=0.526, northcentralus=0.526, westus2=0.526,
             westus3=0.526, southcentralus=0.631, centralus=0.594),
        *_us("Standard_NC8as_T4_v3", eastus=0.752, eastus2=0.752, northcentralus=0.752, westus2=0.752,
             westus3=0.752, southcentralus=0.902),
        *_us("Standard_NC16as_T4_v3", eastus=1.204, eastus2=1.204, northcentralus=1.204, westus2=1.204,
             westus3=1.204, southcentralus=1.445, centralus=1.36),
        *_us("Standard_NC64as_T4_v3", eastus=4.352, eastus2=4.352, northcentralus=4.352, westus2=4.352,
             westus3=4.352, southcentralus=5.222, centralus=4.907),
        *_us("Standard_NC24ads_A100_v4", eastus=3.673, eastus2=3.673, westus2=3.673, westus3=3.673,
             southcentralus=4.408),
        *_us("Standard_NC48ads_A100_v4", eastus=7.346, eastus2=7.346, westus2=7.346, westus3=7.346,
             southcentralus=8.815),
        *_us("Standard_NC96ads_A100_v4", eastus=14.692, eastus2=14.692, westus2=14.692, westus3=14.692,
             southcentralus=17.63),
        *_us("Standard_ND96asr_v4", eastus=27.197, westus2=27.197, southcentralus=32.63),
        *_us("Standard_ND96isr_H100_v5", eastus=98.32, eastus2=98.32),
        *_us("Standard_NV36ads_A10_v5", eastus=3.2, westus2=3.2, westus3=3.2, southcentralus=3.84),
    ]
)  # fmt: skip


def vm_prices(size: VmSize, region: str, table: Mapping[tuple[str, str], Price] | None = None) -> Price:
    """On-demand and spot USD per hour for `size` in `region`, filling gaps from documented factors.

    Without `table`: the refreshed prices in the user's cache where they have a figure
    (`orchestrator gpus --refresh`), else the snapshot (`active_prices`)."""
    known = (active_prices() if table is None else table).get((size.name, region), Price())
    on_demand = known.on_demand
    if on_demand is None:
        on_demand = size.usd_per_hour * REGION_PRICE_FACTOR.get(region, 1.0)
    spot = known.spot if known.spot is not None else on_demand * size.spot_factor
    return Price(on_demand, spot)


def price_per_hour(size: VmSize, region: str, spot: bool) -> float:
    p = vm_prices(size, region)
    value = p.spot if spot else p.on_demand
    assert value is not None  # vm_prices fills both
    return value


# Premium SSD LRS tiers (size GiB, tier, USD per month in eastus); PRICE_SOURCES["os_disk"].
PREMIUM_SSD_TIERS: tuple[tuple[int, str, float], ...] = (
    (32, "P4", 5.28),
    (64, "P6", 10.21),
    (128, "P10", 19.71),
    (256, "P15", 38.02),
    (512, "P20", 73.22),
    (1024, "P30", 135.17),
    (2048, "P40", 259.05),
    (4096, "P50", 495.57),
)


def disk_tier(disk_gb: int) -> tuple[str, float]:
    """The Premium SSD tier a disk of `disk_gb` is billed as, and its monthly eastus price."""
    for size, tier, monthly in PREMIUM_SSD_TIERS:
        if disk_gb <= size:
            return tier, monthly
    raise ValueError(f"no Premium SSD tier holds {disk_gb} GB")


def os_disk_usd_per_hour(disk_gb: int, region: str) -> float:
    """An OS disk's Premium SSD price per hour (billed whether the VM runs or not)."""
    _, monthly = disk_tier(disk_gb)
    return monthly * REGION_PRICE_FACTOR.get(region, 1.0) / HOURS_PER_MONTH


def node_usd_per_hour(size: VmSize, region: str, spot: bool, disk_gb: int) -> float:
    """One node's estimate: the VM, its OS disk and its Standard public IP."""
    return price_per_hour(size, region, spot) + os_disk_usd_per_hour(disk_gb, region) + STANDARD_PUBLIC_IP_USD_PER_HOUR


def region_has_zones(region: str) -> bool:
    return region not in REGIONS_WITHOUT_ZONES


# ---------------------------------------------------------------------------------------------
# Images


@dataclass(frozen=True)
class Image:
    publisher: str
    offer: str
    sku: str
    version: str = "latest"
    os_disk_gb: int | None = None  # the image's OS disk: the smallest diskSizeGB Azure accepts
    # Whether the image is Generation 2 and supports Trusted Launch; None: not known (a URN this
    # catalog does not list). SECURITY_SOURCES["images"].
    trusted_launch: bool | None = None

    @property
    def urn(self) -> str:
        return f"{self.publisher}:{self.offer}:{self.sku}:{self.version}"


# GPU sizes get an image that already carries the NVIDIA driver and CUDA (no 10-minute driver
# install on every VM); CPU sizes get plain Ubuntu. OS disk sizes: PRICE_SOURCES["image_os_disk"].
IMAGE_ALIASES: dict[str, Image] = {
    "ubuntu-24.04": Image("Canonical", "ubuntu-24_04-lts", "server", os_disk_gb=30, trusted_launch=True),
    "ubuntu-22.04": Image(
        "Canonical", "0001-com-ubuntu-server-jammy", "22_04-lts-gen2", os_disk_gb=30, trusted_launch=True
    ),
    "ubuntu-hpc-22.04": Image("microsoft-dsvm", "ubuntu-hpc", "2204", os_disk_gb=64, trusted_launch=True),
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


def resolve_image(name: str, gpu: bool) -> Image:
    """An alias, 'auto', or a publisher:offer:sku:version URN (a URN of a known image keeps its OS disk size)."""
    if name == "auto":
        name = DEFAULT_GPU_IMAGE if gpu else DEFAULT_CPU_IMAGE
    if name in IMAGE_ALIASES:
        return IMAGE_ALIASES[name]
    parts = name.split(":")
    if len(parts) != 4 or not all(parts):
        raise ValueError(name)
    publisher, offer, sku, version = parts
    for known in IMAGE_ALIASES.values():
        if (known.publisher.lower(), known.offer.lower(), known.sku.lower()) == (
            publisher.lower(),
            offer.lower(),
            sku.lower(),
        ):
            return Image(
                publisher, offer, sku, version, os_disk_gb=known.os_disk_gb, trusted_launch=known.trusted_launch
            )
    return Image(publisher, offer, sku, version)


def image_label(name: str, gpu: bool) -> str:
    """How to name the image `name` resolves to in a message: the alias, plus what `auto` chose."""
    if name == "auto":
        alias = DEFAULT_GPU_IMAGE if gpu else DEFAULT_CPU_IMAGE
        return f"{alias} (what `image: auto` picks for a {'GPU' if gpu else 'CPU'} size)"
    return name


# ---------------------------------------------------------------------------------------------
# Security type (Trusted Launch, Secure Boot) per size and image

SECURITY_SOURCES: dict[str, str] = {
    "spec": (
        "Property names and values: Compute ComputeRP.json 2026-04-01 (Azure/azure-rest-api-specs at commit "
        "030174c776bbc013251bc13957bbff81f0a21bd4, the commit the vendored extract came from, which now holds "
        "SecurityProfile, SecurityTypes and UefiSettings too): VirtualMachineProperties.securityProfile -> "
        "SecurityProfile {securityType: SecurityTypes (Standard | TrustedLaunch | ConfidentialVM), uefiSettings: "
        "UefiSettings {secureBootEnabled: boolean, vTpmEnabled: boolean}, ...}; 'UefiSettings will not be "
        "enabled unless [securityType] is set and is not Standard'."
    ),
    "sizes": (
        "Trusted Launch sizes: Microsoft's 'Trusted Launch for Azure virtual machines' (MicrosoftDocs/"
        "azure-compute-docs articles/virtual-machines/trusted-launch.md, 2025-04-21): GPU families NC, ND and NV "
        "supported, NDasrA100_v4 and NDm_A100_v4 'currently not supported'; the 2023 table (MicrosoftDocs/"
        "azure-docs, same article) names NCasT4_v3, NC_A100_v4 and NVadsA10 v5 as supported. B, D and F "
        "families supported. ND H100 v5 is covered only by the family-level 'ND-family' line. A size's "
        "Resource SKU capability TrustedLaunchDisabled=True marks the exceptions (trusted-launch-faq.md)."
    ),
    "images": (
        "Images: Canonical 0001-com-ubuntu-server-jammy 22_04-lts-gen2 reports SecurityType "
        "TrustedLaunchSupported (Microsoft's trusted-launch-faq.md example); Canonical: 'All Ubuntu images from "
        "20.04 forward support Trusted Launch on Hyper-V Gen2 SKUs' (canonical/ubuntu-cloud-docs, "
        "launch-ubuntu-images.rst); ubuntu-24_04-lts 'server' is the Gen2 SKU. microsoft-dsvm ubuntu-hpc: 'All "
        "images support Gen 2 VMs' (azure-compute-docs azure-hpc-vm-images.md), built on the Ubuntu 22.04 "
        "marketplace image; its Trusted Launch support is inferred from that, not read from the image's "
        "`features` (the preflight's image GET can confirm: feature SecurityType). Azure refuses TrustedLaunch "
        "with an image that lacks it (400 'Use of TrustedLaunch setting is not supported for the provided "
        "image', Azure/azure-cli#27975)."
    ),
    "secure_boot": (
        "Secure Boot off on GPU sizes: with Secure Boot on, kernel drivers must be signed by a trusted "
        "publisher (trusted-launch.md); 'Installation of the GRID driver requires Secure Boot to be disabled "
        "for Linux VMs' and 'Secure Boot should be disabled for installing CUDA drivers on other Linux VMs' "
        "(only Ubuntu's own signed packages are an exception, with extra MOK steps); the HPC images' "
        "DKMS-built modules do not load with Secure Boot on (Azure/azhpc-images#298). vTPM stays on (no cost, "
        "boot measurements)."
    ),
    "default": (
        "Why explicit: 'Trusted Launch is the default state for newly created Azure Gen2 VM' (trusted-launch.md); "
        "with Trusted Launch as default, a body without securityProfile gets Trusted Launch with Secure Boot "
        "and vTPM on when size and image support it, which would block the NVIDIA module; a body that states "
        "it is not overridden. 'Standard' is not sent: 'Parameter securityType with value Standard can be used "
        "if subscription has feature flag UseStandardSecurityType registered' (trusted-launch-faq.md; the "
        "Azure CLI's --security-type help says the same). Where Trusted Launch is impossible (size or image), "
        "securityProfile is left out: the default then does not apply and Azure creates a Standard VM."
    ),
}


@dataclass(frozen=True)
class SecurityChoice:
    """What the VM body says about its security type, and why (shown in the plan)."""

    security_type: str  # "TrustedLaunch", or "Standard" (then securityProfile is left out)
    secure_boot: bool
    vtpm: bool
    reason: str
    warning: str = ""

    def profile(self) -> dict[str, Any] | None:
        """The VM body's `securityProfile`, or None to leave it out (see SECURITY_SOURCES["default"])."""
        if self.security_type != "TrustedLaunch":
            return None
        return {
            "securityType": "TrustedLaunch",
            "uefiSettings": {"secureBootEnabled": self.secure_boot, "vTpmEnabled": self.vtpm},
        }


def security_choice(size: VmSize, image: Image) -> SecurityChoice:
    """Trusted Launch where size and image support it, Secure Boot off on GPU sizes (the NVIDIA
    module is not signed), else no securityProfile (Azure then creates a Standard VM)."""
    if not size.trusted_launch:
        return SecurityChoice("Standard", False, False, f"{size.name} does not support Trusted Launch")
    if image.trusted_launch is None:
        warning = ""
        if size.is_gpu:
            warning = (
                f"image {image.urn} is not in the catalog, so its security type is left to Azure: where Azure "
                "defaults to Trusted Launch with Secure Boot, an unsigned NVIDIA kernel module will not load"
            )
        return SecurityChoice("Standard", False, False, "image not in the catalog: Azure's default applies", warning)
    if not image.trusted_launch:
        return SecurityChoice("Standard", False, False, f"image {image.urn} does not support Trusted Launch")
    if size.is_gpu:
        return SecurityChoice("TrustedLaunch", False, True, "Secure Boot off: the NVIDIA kernel module is not signed")
    return SecurityChoice("TrustedLaunch", True, True, "Secure Boot and vTPM on")


# ---------------------------------------------------------------------------------------------
# Refreshed prices: `orchestrator gpus --refresh` (orchestrator/prices.py) writes the Retail Prices
# API's current figures into the user's cache; the estimate, `gpus` and `cost` read them from there.
# The snapshot above stays the fallback for every size and region the cache has no figure for.

PRICE_CACHE_SCHEMA = 1


def price_cache_path() -> Path:
    """`$XDG_CACHE_HOME/orchestrator/prices.json` (default `~/.cache/orchestrator/prices.json`)."""
    base = os.environ.get("XDG_CACHE_HOME") or str(Path.home() / ".cache")
    return Path(base) / "orchestrator" / "prices.json"


@dataclass(frozen=True)
class RefreshedPrices:
    """The cache's table, and when each of its figures was fetched (ISO 8601, UTC)."""

    path: Path
    source: str  # the URL they came from
    table: PriceTable
    fetched: dict[tuple[str, str], str]

    @property
    def latest(self) -> str:
        return max(self.fetched.values(), default="")


_refreshed_memo: dict[Path, tuple[int, RefreshedPrices | None]] = {}


def refreshed_prices(path: Path | None = None) -> RefreshedPrices | None:
    """The refreshed prices in the cache, or None when there is none (or it cannot be read: the
    snapshot then applies). Read again only when the file changes."""
    path = path or price_cache_path()
    try:
        mtime = path.stat().st_mtime_ns
    except OSError:
        return None
    memo = _refreshed_memo.get(path)
    if memo is not None and memo[0] == mtime:
        return memo[1]
    result: RefreshedPrices | None = None
    try:
        raw = json.loads(path.read_text())
        if raw.get("schema") == PRICE_CACHE_SCHEMA:
            table: PriceTable = {}
            fetched: dict[tuple[str, str], str] = {}
            for row in raw["prices"]:
                key = (str(row["size"]), str(row["region"]))
                on_demand, spot = row.get("on_demand"), row.get("spot")
                table[key] = Price(
                    float(on_demand) if on_demand is not None else None, float(spot) if spot is not None else None
                )
                fetched[key] = str(row["fetched"])
            result = RefreshedPrices(path, str(raw.get("source", "")), table, fetched)
    except (OSError, ValueError, KeyError, TypeError, AttributeError):
        result = None
    _refreshed_memo[path] = (mtime, result)
    return result


def active_prices() -> PriceTable:
    """The snapshot with the cache's refreshed figures laid over it (a figure the cache lacks, such
    as a spot price the API did not list, keeps the snapshot's)."""
    refreshed = refreshed_prices()
    if refreshed is None:
        return PRICES
    merged = dict(PRICES)
    for key, p in refreshed.table.items():
        old = merged.get(key, Price())
        merged[key] = Price(
            p.on_demand if p.on_demand is not None else old.on_demand, p.spot if p.spot is not None else old.spot
        )
    return merged


def price_source(size: str, region: str) -> tuple[str, str]:
    """Where the on-demand and spot figures for `size` in `region` come from, each one of
    "refreshed <date>", "snapshot <date>" or "estimate" (a documented factor)."""
    refreshed = refreshed_prices()
    got = refreshed.table.get((size, region)) if refreshed else None
    snap = PRICES.get((size, region), Price())
    when = f"refreshed {refreshed.fetched[(size, region)][:10]}" if refreshed and got else ""
    on_demand = when if got and got.on_demand is not None else ""
    spot = when if got and got.spot is not None else ""
    on_demand = on_demand or (f"snapshot {PRICE_SNAPSHOT_DATE}" if snap.on_demand is not None else "estimate")
    spot = spot or (f"snapshot {PRICE_SNAPSHOT_DATE}" if snap.spot is not None else "estimate")
    return on_demand, spot


# ---------------------------------------------------------------------------------------------
# Accelerators: what a job could ask for instead of a size (`accelerators: {T4: 1}`)


@dataclass(frozen=True)
class Accelerator:
    name: str  # T4, A10, A100-40GB, A100-80GB, H100
    memory_gb: int  # per GPU


def accelerator_of(size: VmSize) -> Accelerator | None:
    """The GPU a size carries, by the name a job would use; None for CPU sizes."""
    if not size.gpu_model:
        return None
    words = size.gpu_model.removeprefix("Tesla ").split()
    memory = int(words[-1].removesuffix("GB")) if words[-1].endswith("GB") else 0
    name = f"A100-{memory}GB" if words[0] == "A100" else words[0]
    return Accelerator(name, memory)


def accelerator_names() -> list[str]:
    """The accelerators the catalog offers (sizes that can be created today)."""
    return sorted({a.name for s in VM_SIZES.values() if (a := accelerator_of(s)) is not None})


def _accelerator_key(name: str) -> str:
    return "".join(c for c in name.upper() if c.isalnum())


def sizes_for(accelerator: str, count: int = 1) -> list[VmSize]:
    """The sizes with exactly `count` GPUs of `accelerator` per VM, cheapest first (eastus list
    price, then name): what `accelerators: {T4: 1}` would choose from. Names as `accelerator_names`
    (any letter case; `-` and spaces optional); plain `A100` means either memory size. An empty list
    when no size has that many; ValueError for an accelerator the catalog does not know."""
    if count < 1:
        raise ValueError(f"an accelerator count must be at least 1, not {count}")
    wanted = _accelerator_key(accelerator)
    names = accelerator_names()
    families = {_accelerator_key(n.split("-")[0]) for n in names}
    if wanted not in {_accelerator_key(n) for n in names} | families:
        raise ValueError(f"unknown accelerator '{accelerator}'; the catalog has {', '.join(names)}")
    matches = []
    for size in VM_SIZES.values():
        acc = accelerator_of(size)
        if acc is None or size.gpus != count:
            continue
        if wanted in (_accelerator_key(acc.name), _accelerator_key(acc.name.split("-")[0])):
            matches.append(size)
    return sorted(matches, key=lambda s: (s.usd_per_hour, s.name))
