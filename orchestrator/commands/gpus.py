"""`orchestrator gpus`: the accelerators the catalog offers, with sizes and prices per region.

The prices are the ones the run's estimate uses (`catalog.vm_prices`): the refreshed figures in the
user's cache where there are any (`--refresh` fetches them from the Azure Retail Prices API), else
the catalog's snapshot; a figure neither has is estimated from a documented factor and marked `~`.
"""

from __future__ import annotations

import json
from dataclasses import asdict, dataclass
from typing import TYPE_CHECKING, Any

import click

if TYPE_CHECKING:
    from orchestrator.cli import Ctx


@dataclass(frozen=True)
class GpuRow:
    accelerator: str
    gpus: int  # per VM
    gpu_memory_gb: int  # per GPU
    size: str
    vcpus: int
    memory_gib: float
    region: str
    on_demand_usd_per_hour: float
    spot_usd_per_hour: float | None  # None: the size has no spot offer
    on_demand_source: str  # "refreshed <date>", "snapshot <date>" or "estimate"
    spot_source: str


def gpu_rows(region: str | None = None, spot: bool = False) -> list[GpuRow]:
    """Every GPU size in every region that offers it (or in `region`), cheapest first (on-demand,
    or spot with `spot`)."""
    from orchestrator import catalog

    rows = []
    for size in catalog.VM_SIZES.values():
        acc = catalog.accelerator_of(size)
        if acc is None or (spot and not size.spot_supported):
            continue
        for r in sorted(size.regions):
            if region is not None and r != region:
                continue
            price = catalog.vm_prices(size, r)
            assert price.on_demand is not None and price.spot is not None  # vm_prices fills both
            on_source, spot_source = catalog.price_source(size.name, r)
            rows.append(
                GpuRow(
                    acc.name,
                    size.gpus,
                    acc.memory_gb,
                    size.name,
                    size.vcpus,
                    size.memory_gib,
                    r,
                    round(price.on_demand, 4),
                    round(price.spot, 4) if size.spot_supported else None,
                    on_source,
                    spot_source if size.spot_supported else "",
                )
            )

    def key(row: GpuRow) -> tuple[float, str, str]:
        usd = row.spot_usd_per_hour if spot and row.spot_usd_per_hour is not None else row.on_demand_usd_per_hour
        return usd, row.size, row.region

    return sorted(rows, key=key)


def price_origin() -> str:
    """Where the prices come from and of when: the refreshed cache (with its date), else the snapshot."""
    from orchestrator import catalog

    refreshed = catalog.refreshed_prices()
    snapshot = f"the catalog's snapshot of {catalog.PRICE_SNAPSHOT_DATE}"
    if refreshed is None:
        return f"{snapshot} (`orchestrator gpus --refresh` fetches current ones)"
    return (
        f"the Azure Retail Prices API as fetched {refreshed.latest[:16].replace('T', ' ')} UTC into "
        f"{refreshed.path}, else {snapshot}"
    )


def prices_said() -> str:
    """One sentence: which prices are shown, from where and of when."""
    return f"Prices: Linux pay-as-you-go USD per VM-hour, from {price_origin()}."


def _check_region(region: str | None) -> None:
    import difflib

    from orchestrator import catalog
    from orchestrator.errors import UserInputError

    if region is None or region in catalog.REGIONS:
        return
    close = difflib.get_close_matches(region, list(catalog.REGIONS), n=3, cutoff=0.6)
    hint = f" Did you mean {', '.join(close)}?" if close else ""
    raise UserInputError(f"unknown region '{region}'.{hint} The catalog knows: {', '.join(sorted(catalog.REGIONS))}.")


def _usd(value: float | None, source: str) -> str:
    if value is None:
        return "-"
    return ("~" if source == "estimate" else "") + f"{value:.3f}"


@click.command()
@click.option("--region", help="Only this region (e.g. eastus).")
@click.option("--spot", is_flag=True, help="Order by the spot price (sizes without spot left out).")
@click.option(
    "--refresh",
    is_flag=True,
    help="First fetch current prices from the Azure Retail Prices API into the cache (ORCH_PRICES_URL overrides it).",
)
@click.pass_obj
def gpus(obj: Ctx, region: str | None, spot: bool, refresh: bool) -> None:
    """List GPU sizes: accelerator, GPUs per VM, memory, vCPUs, and $/h per region, cheapest first.

    The prices are those the run's estimate uses. ~ marks an estimated figure (spot: 0.3 of
    on-demand; a region without its own figure: a regional factor)."""
    _check_region(region)
    refreshed: Any = None
    if refresh:
        from orchestrator import prices

        refreshed = prices.refresh(region)
        if not obj.as_json:
            click.echo(
                f"Fetched {refreshed.figures} prices (the catalog's {refreshed.sizes} sizes asked for) "
                f"{'in ' + region if region else 'in every region'} from {refreshed.source} into {refreshed.path}."
            )
    rows = gpu_rows(region, spot)
    if obj.as_json:
        from orchestrator import catalog

        cache = catalog.refreshed_prices()
        click.echo(
            json.dumps(
                {
                    "schema": 1,
                    "region": region,
                    "spot": spot,
                    "prices": {
                        "snapshot_date": catalog.PRICE_SNAPSHOT_DATE,
                        "cache": str(cache.path) if cache else None,
                        "cache_fetched": cache.latest if cache else None,
                        "refreshed_now": refreshed is not None,
                        "text": prices_said(),
                    },
                    "gpus": [asdict(r) for r in rows],
                }
            )
        )
        return
    header = (
        f"{'ACCELERATOR':<11} {'GPUS':>4} {'GPU MEM':>7}  {'SIZE':<26} {'VCPUS':>5} {'MEMORY':>8}  "
        f"{'REGION':<18} {'$/H':>8} {'SPOT $/H':>8}"
    )
    click.echo(header)
    for r in rows:
        click.echo(
            f"{r.accelerator:<11} {r.gpus:>4} {str(r.gpu_memory_gb) + ' GB':>7}  {r.size:<26} {r.vcpus:>5} "
            f"{f'{r.memory_gib:g} GiB':>8}  {r.region:<18} {_usd(r.on_demand_usd_per_hour, r.on_demand_source):>8} "
            f"{_usd(r.spot_usd_per_hour, r.spot_source):>8}"
        )
    click.echo(prices_said())
    click.echo("~ estimated: spot as 0.3 of on-demand, or a regional factor where a region has no figure of its own.")
