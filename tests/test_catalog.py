"""The catalog: only creatable sizes offered, retired ones kept with date and replacement, prices in the
Retail Prices API's shape, image OS disk minimums, temp disks."""

from __future__ import annotations

import pytest

from orchestrator import catalog

# Items as the Retail Prices API returns them (fields as documented; figures from the snapshot).
RETAIL_ITEMS = [
    {
        "currencyCode": "USD",
        "tierMinimumUnits": 0.0,
        "retailPrice": 0.526,
        "unitPrice": 0.526,
        "armRegionName": "eastus",
        "location": "US East",
        "effectiveStartDate": "2021-11-01T00:00:00Z",
        "meterName": "NC4as T4 v3",
        "productName": "Virtual Machines NCasT4_v3 Series",
        "skuName": "NC4as T4 v3",
        "serviceName": "Virtual Machines",
        "serviceFamily": "Compute",
        "unitOfMeasure": "1 Hour",
        "type": "Consumption",
        "isPrimaryMeterRegion": True,
        "armSkuName": "Standard_NC4as_T4_v3",
    },
    {  # the spot meter of the same size and region
        "currencyCode": "USD",
        "retailPrice": 0.1578,
        "armRegionName": "eastus",
        "meterName": "NC4as T4 v3 Spot",
        "productName": "Virtual Machines NCasT4_v3 Series",
        "skuName": "NC4as T4 v3 Spot",
        "serviceName": "Virtual Machines",
        "unitOfMeasure": "1 Hour",
        "type": "Consumption",
        "armSkuName": "Standard_NC4as_T4_v3",
    },
    {  # Batch's low priority: not what a Spot VM pays
        "currencyCode": "USD",
        "retailPrice": 0.1052,
        "armRegionName": "eastus",
        "skuName": "NC4as T4 v3 Low Priority",
        "productName": "Virtual Machines NCasT4_v3 Series",
        "serviceName": "Virtual Machines",
        "unitOfMeasure": "1 Hour",
        "type": "Consumption",
        "armSkuName": "Standard_NC4as_T4_v3",
    },
    {  # Windows licence included: not ours
        "currencyCode": "USD",
        "retailPrice": 0.71,
        "armRegionName": "eastus",
        "skuName": "NC4as T4 v3",
        "productName": "Virtual Machines NCasT4_v3 Series Windows",
        "serviceName": "Virtual Machines",
        "unitOfMeasure": "1 Hour",
        "type": "Consumption",
        "armSkuName": "Standard_NC4as_T4_v3",
    },
    {  # a reservation: not pay-as-you-go
        "currencyCode": "USD",
        "retailPrice": 2900.0,
        "armRegionName": "eastus",
        "skuName": "NC4as T4 v3",
        "productName": "Virtual Machines NCasT4_v3 Series",
        "serviceName": "Virtual Machines",
        "unitOfMeasure": "1 Hour",
        "type": "Reservation",
        "reservationTerm": "1 Year",
        "armSkuName": "Standard_NC4as_T4_v3",
    },
    {
        "currencyCode": "USD",
        "retailPrice": 0.631,
        "armRegionName": "southcentralus",
        "skuName": "NC4as T4 v3",
        "productName": "Virtual Machines NCasT4_v3 Series",
        "serviceName": "Virtual Machines",
        "unitOfMeasure": "1 Hour",
        "type": "Consumption",
        "armSkuName": "Standard_NC4as_T4_v3",
    },
    {  # a managed disk meter: another service, priced per month
        "currencyCode": "USD",
        "retailPrice": 19.71,
        "armRegionName": "eastus",
        "skuName": "P10 LRS",
        "productName": "Premium SSD Managed Disks",
        "serviceName": "Storage",
        "unitOfMeasure": "1/Month",
        "type": "Consumption",
        "armSkuName": "Premium_SSD_Managed_Disk_P10",
    },
]


def test_prices_from_retail_items_keeps_linux_pay_as_you_go_and_spot() -> None:
    table = catalog.prices_from_retail_items(RETAIL_ITEMS)
    assert table == {
        ("Standard_NC4as_T4_v3", "eastus"): catalog.Price(on_demand=0.526, spot=0.1578),
        ("Standard_NC4as_T4_v3", "southcentralus"): catalog.Price(on_demand=0.631, spot=None),
    }


def test_a_refreshed_table_drives_the_estimate() -> None:
    table = catalog.prices_from_retail_items(RETAIL_ITEMS)
    size = catalog.VM_SIZES["Standard_NC4as_T4_v3"]
    assert catalog.vm_prices(size, "eastus", table) == catalog.Price(0.526, 0.1578)
    # no spot meter for southcentralus: the documented factor fills it
    south = catalog.vm_prices(size, "southcentralus", table)
    assert south.on_demand == 0.631 and south.spot == pytest.approx(0.631 * 0.3)


def test_the_snapshot_has_regional_figures_and_falls_back_to_documented_factors() -> None:
    t4 = catalog.VM_SIZES["Standard_NC4as_T4_v3"]
    assert catalog.price_per_hour(t4, "eastus", spot=False) == 0.526
    assert catalog.price_per_hour(t4, "southcentralus", spot=False) == 0.631
    assert catalog.price_per_hour(t4, "westeurope", spot=False) == pytest.approx(
        0.526 * catalog.REGION_PRICE_FACTOR["westeurope"]
    )
    assert catalog.price_per_hour(t4, "eastus", spot=True) == pytest.approx(0.526 * 0.3)
    for size in catalog.VM_SIZES.values():
        assert size.spot_factor == catalog.SPOT_FACTOR  # the old 0.2 and 0.15 are gone
        for region in size.regions:
            assert catalog.price_per_hour(size, region, spot=False) > 0
    assert set(catalog.PRICE_SOURCES) >= {"vm_on_demand", "spot", "os_disk", "public_ip", "region_factor"}


def test_retired_sizes_are_kept_apart_with_date_and_replacement() -> None:
    for name in ("Standard_NC6s_v3", "Standard_NC12s_v3", "Standard_NC24s_v3", "Standard_NC24rs_v3"):
        assert name not in catalog.VM_SIZES
        retired = catalog.retired_size(name)
        assert retired is not None and retired.retired is not None
        assert retired.retired.date == "2025-09-30"
        assert retired.retired.replacement in catalog.VM_SIZES
    assert catalog.retired_size("standard_nc6s_v3") is catalog.RETIRED_SIZES["Standard_NC6s_v3"]
    assert catalog.retired_size("Standard_NC4as_T4_v3") is None
    assert all(s.retired is None for s in catalog.VM_SIZES.values())
    assert not set(catalog.VM_SIZES) & set(catalog.RETIRED_SIZES)


def test_every_image_carries_its_os_disk_size() -> None:
    assert catalog.IMAGE_ALIASES["ubuntu-hpc-22.04"].os_disk_gb == 64
    assert catalog.IMAGE_ALIASES["ubuntu-24.04"].os_disk_gb == 30
    assert all(image.os_disk_gb for image in catalog.IMAGE_ALIASES.values())
    assert catalog.resolve_image("auto", gpu=True).os_disk_gb == 64
    assert catalog.resolve_image("microsoft-dsvm:ubuntu-hpc:2204:22.04.2024", gpu=False).os_disk_gb == 64
    assert catalog.resolve_image("someone:custom:image:1", gpu=True).os_disk_gb is None


@pytest.mark.parametrize(
    ("disk_gb", "tier", "monthly"), [(30, "P4", 5.28), (64, "P6", 10.21), (100, "P10", 19.71), (4095, "P50", 495.57)]
)
def test_os_disks_are_billed_at_their_premium_ssd_tier(disk_gb: int, tier: str, monthly: float) -> None:
    assert catalog.disk_tier(disk_gb) == (tier, monthly)
    assert catalog.os_disk_usd_per_hour(disk_gb, "eastus") == pytest.approx(monthly / 730)


def test_temp_disks_match_the_published_size_tables() -> None:
    temp = {name: s.temp_disk_gb for name, s in catalog.VM_SIZES.items()}
    assert temp["Standard_NC4as_T4_v3"] == 180 and temp["Standard_NC64as_T4_v3"] == 2880
    assert temp["Standard_NC24ads_A100_v4"] == 64 and temp["Standard_NV36ads_A10_v5"] == 720
    assert temp["Standard_D4s_v5"] == 0  # Dsv5: no temp disk, /mnt is on the OS disk
    assert not catalog.VM_SIZES["Standard_B2s"].spot_supported
