"""Refreshing the price table from the Azure Retail Prices API (public, no credentials).

`orchestrator gpus --refresh` asks the API for the current Linux pay-as-you-go and spot prices of
every size in the catalog and writes them into the user's cache directory
(`catalog.price_cache_path()`: `$XDG_CACHE_HOME/orchestrator/prices.json`), each figure with the
date it was fetched. The estimate, `gpus` and `cost` then use them; the catalog's snapshot stays the
fallback wherever the cache has no figure.

The API's documented shape: `GET <url>?$filter=<OData>` answers `{"Items": [...], "NextPageLink":
<url of the next page, or null>}`; each item has `armSkuName`, `armRegionName`, `retailPrice`,
`unitOfMeasure` ("1 Hour"), `type` ("Consumption"), `skuName` (ending "Spot" or "Low Priority" for
those meters), `productName` ("... Windows" for the licence-inclusive meter), `serviceName`.
`catalog.prices_from_retail_items` keeps what an estimate needs. One query per size (all regions at
once, or the one region asked for) keeps it to a page or two each.

`ORCH_PRICES_URL` replaces the API's address (tests serve its documented format on loopback).
"""

from __future__ import annotations

import json
import os
import urllib.parse
import urllib.request
from collections.abc import Iterable, Mapping
from dataclasses import dataclass
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

from orchestrator import catalog
from orchestrator.errors import OrchestratorError

DEFAULT_PRICES_URL = "https://prices.azure.com/api/retail/prices"
MAX_PAGES = 100  # per query: a size's meters in every region fit in a few pages


class PriceFetchError(OrchestratorError):
    """The Retail Prices API could not be read; the cached or snapshot prices still apply."""


@dataclass(frozen=True)
class Refreshed:
    path: Path
    source: str
    fetched: str  # ISO 8601, UTC
    figures: int  # (size, region) pairs with a price
    sizes: int
    regions: list[str]  # the regions asked for; [] means all


def prices_url() -> str:
    return os.environ.get("ORCH_PRICES_URL") or DEFAULT_PRICES_URL


def query_url(base: str, odata_filter: str) -> str:
    """`base` with `$filter` added (kept readable: quotes and `$` as the API's own examples write them)."""
    sep = "&" if urllib.parse.urlsplit(base).query else "?"
    return f"{base}{sep}$filter={urllib.parse.quote(odata_filter, safe=chr(39))}"


def size_filter(size: str, region: str | None = None) -> str:
    text = f"serviceName eq 'Virtual Machines' and armSkuName eq '{size}'"
    return text + (f" and armRegionName eq '{region}'" if region else "")


def fetch_items(url: str, *, timeout: float = 30.0, max_pages: int = MAX_PAGES) -> list[dict[str, Any]]:
    """Every page's `Items`, following `NextPageLink` (only to the same host as `url`)."""
    host = urllib.parse.urlsplit(url).hostname
    items: list[dict[str, Any]] = []
    next_url: str | None = url
    pages = 0
    while next_url:
        if urllib.parse.urlsplit(next_url).hostname != host:
            raise PriceFetchError(f"the price API's next page points to another host ({next_url}); not followed.")
        pages += 1
        if pages > max_pages:
            raise PriceFetchError(f"the price API kept answering more pages (over {max_pages}) for {url}.")
        try:
            with urllib.request.urlopen(next_url, timeout=timeout) as response:
                doc = json.loads(response.read())
        except (OSError, ValueError) as e:
            raise PriceFetchError(
                f"Could not read prices from {next_url} ({e}). The estimate goes on using "
                f"{'the cached prices' if catalog.refreshed_prices() else 'the catalog snapshot'}; "
                "try again later, or set ORCH_PRICES_URL to another copy of the Retail Prices API."
            ) from None
        if not isinstance(doc, dict) or not isinstance(doc.get("Items"), list):
            raise PriceFetchError(f"{next_url} did not answer in the Retail Prices API's format (no `Items` list).")
        items.extend(i for i in doc["Items"] if isinstance(i, dict))
        link = doc.get("NextPageLink")
        next_url = link if isinstance(link, str) and link else None
    return items


def merge_cache(
    old: Mapping[str, Any] | None,
    table: catalog.PriceTable,
    fetched: str,
    source: str,
    scope: Iterable[tuple[str, str]],
) -> dict[str, Any]:
    """The new cache document: `table`'s figures replace every figure in `scope` (the (size, region)
    pairs that were asked for); the old cache's figures outside it are kept."""
    in_scope = set(scope)
    rows: dict[tuple[str, str], dict[str, Any]] = {}
    for row in (old or {}).get("prices", []):
        try:
            key = (str(row["size"]), str(row["region"]))
        except (KeyError, TypeError):
            continue
        if key not in in_scope:
            rows[key] = dict(row)
    for (size, region), price in table.items():
        if (size, region) in in_scope:
            rows[(size, region)] = {
                "size": size,
                "region": region,
                "on_demand": price.on_demand,
                "spot": price.spot,
                "fetched": fetched,
            }
    return {
        "schema": catalog.PRICE_CACHE_SCHEMA,
        "source": source,
        "fetched": fetched,
        "prices": [rows[k] for k in sorted(rows)],
    }


def refresh(region: str | None = None, *, now: datetime | None = None, path: Path | None = None) -> Refreshed:
    """Fetch the current prices of every catalog size (in `region`, or everywhere it is offered)
    and write them into the cache. Nothing is written unless every query succeeded."""
    base = prices_url()
    fetched = (now or datetime.now(UTC)).strftime("%Y-%m-%dT%H:%M:%SZ")
    path = path or catalog.price_cache_path()
    items: list[dict[str, Any]] = []
    sizes = [s for s in catalog.VM_SIZES.values() if region is None or region in s.regions]
    for size in sizes:
        items.extend(fetch_items(query_url(base, size_filter(size.name, region))))
    known = {s.name: s for s in sizes}
    table = {
        key: price
        for key, price in catalog.prices_from_retail_items(items).items()
        if key[0] in known and (region is None or key[1] == region)
    }
    scope = [(s.name, r) for s in sizes for r in ([region] if region else sorted(s.regions | {k[1] for k in table}))]
    try:
        old = json.loads(path.read_text()) if path.exists() else None
    except (OSError, ValueError):
        old = None  # an unreadable cache is replaced
    doc = merge_cache(old if isinstance(old, dict) else None, table, fetched, base, scope)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(path.name + ".tmp")
    tmp.write_text(json.dumps(doc, indent=1) + "\n")
    tmp.replace(path)
    return Refreshed(path, base, fetched, len(table), len(sizes), [region] if region else [])
