"""`orchestrator gpus`, `catalog.sizes_for`, and refreshing prices from (a loopback copy of) the
Azure Retail Prices API into the user's cache, which the estimate then uses."""

from __future__ import annotations

import json
import os
import threading
import urllib.parse
from collections.abc import Iterator
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path
from typing import Any

import pytest

from orchestrator import catalog, prices

REPO = Path(__file__).resolve().parents[1]
SMOKE = REPO / "jobs" / "smoke" / "job.yaml"


from tests.test_cli import cli  # noqa: E402

# ----------------------------------------------------------------------------- sizes_for (pure)


def test_accelerators_are_named_as_a_job_would_name_them() -> None:
    assert catalog.accelerator_names() == ["A10", "A100-40GB", "A100-80GB", "H100", "T4"]
    t4 = catalog.accelerator_of(catalog.VM_SIZES["Standard_NC4as_T4_v3"])
    assert t4 == catalog.Accelerator("T4", 16)
    assert catalog.accelerator_of(catalog.VM_SIZES["Standard_D4s_v5"]) is None


def test_sizes_for_picks_exact_counts_cheapest_first() -> None:
    def names(acc: str, n: int) -> list[str]:
        return [s.name for s in catalog.sizes_for(acc, n)]

    assert names("T4", 1) == ["Standard_NC4as_T4_v3", "Standard_NC8as_T4_v3", "Standard_NC16as_T4_v3"]
    assert names("t4", 4) == ["Standard_NC64as_T4_v3"]
    assert names("T4", 3) == []
    assert names("A100-80GB", 2) == ["Standard_NC48ads_A100_v4"]
    assert names("a100 40gb", 8) == ["Standard_ND96asr_v4"]
    assert names("A100", 1) == ["Standard_NC24ads_A100_v4"]  # plain A100: either memory size
    assert names("A100", 8) == ["Standard_ND96asr_v4"]
    assert names("A10", 1) == ["Standard_NV36ads_A10_v5"]  # not an A100
    assert names("H100", 8) == ["Standard_ND96isr_H100_v5"]
    for size in catalog.sizes_for("T4", 1):
        assert size.name in catalog.VM_SIZES and size.retired is None
    with pytest.raises(ValueError, match="unknown accelerator 'V100'; the catalog has A10, A100-40GB"):
        catalog.sizes_for("V100", 1)  # retired with NCv3: never offered
    with pytest.raises(ValueError, match="at least 1"):
        catalog.sizes_for("T4", 0)


# ----------------------------------------------------------------------------- gpus from the snapshot


def test_gpus_lists_every_accelerator_in_a_region_cheapest_first(tmp_path: Path) -> None:
    env = {"XDG_CACHE_HOME": str(tmp_path / "cache")}
    r = cli("--json", "gpus", "--region", "eastus", env=env)
    assert r.returncode == 0, r.stderr
    doc = json.loads(r.stdout)
    assert doc["schema"] == 1 and doc["prices"]["cache"] is None
    rows = doc["gpus"]
    assert {row["region"] for row in rows} == {"eastus"}
    assert {row["accelerator"] for row in rows} == {"T4", "A10", "A100-40GB", "A100-80GB", "H100"}
    usd = [row["on_demand_usd_per_hour"] for row in rows]
    assert usd == sorted(usd)
    first = rows[0]
    assert first == {
        "accelerator": "T4",
        "gpus": 1,
        "gpu_memory_gb": 16,
        "size": "Standard_NC4as_T4_v3",
        "vcpus": 4,
        "memory_gib": 28,
        "region": "eastus",
        "on_demand_usd_per_hour": 0.526,
        "spot_usd_per_hour": pytest.approx(0.526 * catalog.SPOT_FACTOR),
        "on_demand_source": f"snapshot {catalog.PRICE_SNAPSHOT_DATE}",
        "spot_source": "estimate",
    }
    h100 = next(row for row in rows if row["accelerator"] == "H100")
    assert (h100["gpus"], h100["gpu_memory_gb"]) == (8, 80)
    # The figure the run's estimate uses, for the same size and region.
    size = catalog.VM_SIZES["Standard_NC24ads_A100_v4"]
    a100 = next(row for row in rows if row["size"] == size.name)
    assert a100["on_demand_usd_per_hour"] == round(catalog.price_per_hour(size, "eastus", spot=False), 4)

    text = cli("gpus", "--region", "eastus", env=env)
    assert text.returncode == 0
    lines = text.stdout.splitlines()
    assert lines[0].split()[:4] == ["ACCELERATOR", "GPUS", "GPU", "MEM"]
    assert lines[1].split() == [
        "T4",
        "1",
        "16",
        "GB",
        "Standard_NC4as_T4_v3",
        "4",
        "28",
        "GiB",
        "eastus",
        "0.526",
        "~0.158",
    ]
    assert f"from the catalog's snapshot of {catalog.PRICE_SNAPSHOT_DATE}" in text.stdout


def test_gpus_everywhere_and_by_spot_price(tmp_path: Path) -> None:
    env = {"XDG_CACHE_HOME": str(tmp_path / "cache")}
    rows = json.loads(cli("--json", "gpus", env=env).stdout)["gpus"]
    assert len({row["region"] for row in rows}) > 5
    t4_regions = {row["region"] for row in rows if row["size"] == "Standard_NC4as_T4_v3"}
    assert t4_regions == set(catalog.VM_SIZES["Standard_NC4as_T4_v3"].regions)
    west = next(r for r in rows if r["size"] == "Standard_NC4as_T4_v3" and r["region"] == "westeurope")
    assert west["on_demand_source"] == "estimate"  # no per-region figure: the documented factor
    spot = json.loads(cli("--json", "gpus", "--spot", env=env).stdout)["gpus"]
    usd = [row["spot_usd_per_hour"] for row in spot]
    assert usd == sorted(usd)


def test_gpus_refuses_an_unknown_region_with_close_matches(tmp_path: Path) -> None:
    r = cli("gpus", "--region", "eastu", env={"XDG_CACHE_HOME": str(tmp_path)})
    assert r.returncode == 2 and "unknown region 'eastu'. Did you mean eastus" in r.stderr
    j = cli("--json", "gpus", "--region", "eastu", env={"XDG_CACHE_HOME": str(tmp_path)})
    assert j.returncode == 2 and json.loads(j.stdout)["exit_code"] == 2


# ----------------------------------------------------------------------------- a loopback Retail Prices API


def meter(size: str, region: str, usd: float, kind: str = "", product: str = "") -> dict[str, Any]:
    """One item as the Retail Prices API documents it."""
    short = size.removeprefix("Standard_").replace("_", " ")
    return {
        "currencyCode": "USD",
        "tierMinimumUnits": 0.0,
        "retailPrice": usd,
        "unitPrice": usd,
        "armRegionName": region,
        "location": region,
        "effectiveStartDate": "2026-01-01T00:00:00Z",
        "meterId": f"{size}-{region}-{kind}",
        "meterName": f"{short}{' ' + kind if kind else ''}",
        "productId": "DZH318Z0BQ4W",
        "skuId": "DZH318Z0BQ4W/00C9",
        "productName": product or "Virtual Machines NCasT4_v3 Series",
        "skuName": f"{short}{' ' + kind if kind else ''}",
        "serviceName": "Virtual Machines",
        "serviceId": "DZH313Z7MMC8",
        "serviceFamily": "Compute",
        "unitOfMeasure": "1 Hour",
        "type": "Consumption",
        "isPrimaryMeterRegion": True,
        "armSkuName": size,
    }


ITEMS = [
    meter("Standard_NC4as_T4_v3", "eastus", 0.61),
    meter("Standard_NC4as_T4_v3", "eastus", 0.2, "Spot"),
    meter("Standard_NC4as_T4_v3", "eastus", 0.09, "Low Priority"),
    meter("Standard_NC4as_T4_v3", "eastus", 0.99, product="Virtual Machines NCasT4_v3 Series Windows"),
    meter("Standard_NC4as_T4_v3", "westeurope", 0.7),
    meter("Standard_NC24ads_A100_v4", "eastus", 3.5),
    meter("Standard_NC24ads_A100_v4", "eastus", 0.9, "Spot"),
    {**meter("Standard_NC24ads_A100_v4", "eastus", 2500.0), "unitOfMeasure": "1 Month", "type": "Reservation"},
]
PAGE = 2  # items per page, so that paging is exercised


class PriceApi(BaseHTTPRequestHandler):
    """GET /api/retail/prices?$filter=<field eq 'value' and ...>[&$skip=N], the documented answer."""

    items: list[dict[str, Any]] = ITEMS
    seen: list[str] = []

    def do_GET(self) -> None:
        self.seen.append(self.path)
        url = urllib.parse.urlsplit(self.path)
        query = urllib.parse.parse_qs(url.query)
        if url.path != "/api/retail/prices":
            self.send_error(404)
            return
        wanted: dict[str, str] = {}
        for clause in query.get("$filter", [""])[0].split(" and "):
            if clause:
                field, op, value = clause.split(" ", 2)
                assert op == "eq", clause
                wanted[field] = value.strip("'")
        match = [i for i in self.items if all(str(i.get(f)) == v for f, v in wanted.items())]
        skip = int(query.get("$skip", ["0"])[0])
        page = match[skip : skip + PAGE]
        more = skip + PAGE < len(match)
        host, port = self.server.server_address[:2]
        next_link = None
        if more:
            next_link = f"http://{host}:{port}/api/retail/prices?" + urllib.parse.urlencode(
                {"$filter": query.get("$filter", [""])[0], "$skip": skip + PAGE}, quote_via=urllib.parse.quote
            )
        body = json.dumps(
            {
                "BillingCurrency": "USD",
                "CustomerEntityId": "Default",
                "CustomerEntityType": "Retail",
                "Items": page,
                "NextPageLink": next_link,
                "Count": len(page),
            }
        ).encode()
        self.send_response(200)
        self.send_header("Content-Type", "application/json")
        self.send_header("Content-Length", str(len(body)))
        self.end_headers()
        self.wfile.write(body)

    def log_message(self, format: str, *args: Any) -> None:
        pass


@pytest.fixture
def price_api() -> Iterator[str]:
    PriceApi.seen = []
    server = ThreadingHTTPServer(("127.0.0.1", 0), PriceApi)
    thread = threading.Thread(target=server.serve_forever, daemon=True)
    thread.start()
    try:
        yield f"http://127.0.0.1:{server.server_address[1]}/api/retail/prices"
    finally:
        server.shutdown()
        server.server_close()


def test_refresh_fetches_current_prices_that_the_estimate_then_uses(tmp_path: Path, price_api: str) -> None:
    cache = tmp_path / "cache"
    env = {"XDG_CACHE_HOME": str(cache), "ORCH_PRICES_URL": price_api}
    before = json.loads(cli("--json", "run", str(SMOKE), "--dry-run", env=env).stdout)["estimate"]["usd_per_hour"]

    r = cli("gpus", "--refresh", "--region", "eastus", env=env)
    assert r.returncode == 0, r.stderr
    assert f"from {price_api} into {cache / 'orchestrator' / 'prices.json'}" in r.stdout
    # One query per size offered in eastus, in the documented filter syntax, following NextPageLink.
    filters = [urllib.parse.parse_qs(urllib.parse.urlsplit(p).query)["$filter"][0] for p in PriceApi.seen]
    t4_query = (
        "serviceName eq 'Virtual Machines' and armSkuName eq 'Standard_NC4as_T4_v3' and armRegionName eq 'eastus'"
    )
    assert t4_query in filters
    assert len(set(filters)) == sum(1 for s in catalog.VM_SIZES.values() if "eastus" in s.regions)  # one per size
    assert any(urllib.parse.parse_qs(urllib.parse.urlsplit(p).query).get("$skip") == ["2"] for p in PriceApi.seen)

    doc = json.loads((cache / "orchestrator" / "prices.json").read_text())
    assert doc["schema"] == 1 and doc["source"] == price_api and doc["fetched"].endswith("Z")
    by_key = {(row["size"], row["region"]): row for row in doc["prices"]}
    # Linux pay-as-you-go and Spot kept; Low Priority, Windows and reservations left out; only eastus asked.
    assert set(by_key) == {("Standard_NC4as_T4_v3", "eastus"), ("Standard_NC24ads_A100_v4", "eastus")}
    assert (
        by_key[("Standard_NC4as_T4_v3", "eastus")]["on_demand"],
        by_key[("Standard_NC4as_T4_v3", "eastus")]["spot"],
    ) == (
        0.61,
        0.2,
    )
    assert by_key[("Standard_NC24ads_A100_v4", "eastus")]["spot"] == 0.9

    listed = json.loads(cli("--json", "gpus", "--region", "eastus", env=env).stdout)
    t4 = next(row for row in listed["gpus"] if row["size"] == "Standard_NC4as_T4_v3")
    assert (t4["on_demand_usd_per_hour"], t4["spot_usd_per_hour"]) == (0.61, 0.2)
    assert t4["on_demand_source"] == f"refreshed {doc['fetched'][:10]}" == t4["spot_source"]
    nc8 = next(row for row in listed["gpus"] if row["size"] == "Standard_NC8as_T4_v3")
    assert nc8["on_demand_source"].startswith("snapshot")  # the API listed nothing for it: the fallback
    assert listed["prices"]["cache_fetched"] == doc["fetched"]
    text = cli("gpus", "--region", "eastus", env=env).stdout
    assert "from the Azure Retail Prices API as fetched" in text and "else the catalog's snapshot" in text

    # The run's estimate now uses the refreshed price: only the VM's part changed.
    after = json.loads(cli("--json", "run", str(SMOKE), "--dry-run", env=env).stdout)["estimate"]["usd_per_hour"]
    assert after - before == pytest.approx(0.61 - 0.526, abs=1e-3)


def test_a_refresh_that_fails_changes_nothing(tmp_path: Path, price_api: str) -> None:
    cache = tmp_path / "cache"
    port = int(urllib.parse.urlsplit(price_api).port or 0)
    env = {"XDG_CACHE_HOME": str(cache), "ORCH_PRICES_URL": f"http://127.0.0.1:{port}/nowhere"}
    r = cli("gpus", "--refresh", env=env)
    assert r.returncode == 1 and "Could not read prices from http://127.0.0.1" in r.stderr, r.stderr
    assert "the catalog snapshot" in r.stderr and "Traceback" not in r.stderr
    assert not (cache / "orchestrator" / "prices.json").exists()


def test_refreshing_one_region_keeps_the_others(
    tmp_path: Path, price_api: str, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setenv("ORCH_PRICES_URL", price_api)
    path = tmp_path / "prices.json"
    everywhere = prices.refresh(path=path)
    assert everywhere.regions == [] and everywhere.figures == 3
    doc = json.loads(path.read_text())
    assert {(r["size"], r["region"]) for r in doc["prices"]} == {
        ("Standard_NC4as_T4_v3", "eastus"),
        ("Standard_NC4as_T4_v3", "westeurope"),
        ("Standard_NC24ads_A100_v4", "eastus"),
    }
    PriceApi.items = [meter("Standard_NC4as_T4_v3", "eastus", 0.5)]
    try:
        prices.refresh("eastus", path=path)
    finally:
        PriceApi.items = ITEMS
    rows = {(r["size"], r["region"]): r for r in json.loads(path.read_text())["prices"]}
    assert rows[("Standard_NC4as_T4_v3", "eastus")]["on_demand"] == 0.5
    assert rows[("Standard_NC4as_T4_v3", "eastus")]["spot"] is None  # the API no longer lists it
    assert rows[("Standard_NC4as_T4_v3", "westeurope")]["on_demand"] == 0.7  # outside the refresh: kept
    assert ("Standard_NC24ads_A100_v4", "eastus") not in rows  # asked for, not answered: gone


def test_next_page_links_to_another_host_are_not_followed(price_api: str) -> None:
    PriceApi.items = [meter("Standard_NC4as_T4_v3", "eastus", 0.5)] * 3
    try:
        # The fixture's server links its next page to 127.0.0.1; asked as localhost, that is another host.
        url = price_api.replace("127.0.0.1", "localhost")
        with pytest.raises(prices.PriceFetchError, match="another host"):
            prices.fetch_items(url + "?$filter=" + urllib.parse.quote("armRegionName eq 'eastus'"))
    finally:
        PriceApi.items = ITEMS


def test_the_catalog_reads_the_cache_and_ignores_a_broken_one(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path))
    t4 = catalog.VM_SIZES["Standard_NC4as_T4_v3"]
    path = catalog.price_cache_path()
    assert path == tmp_path / "orchestrator" / "prices.json"
    assert catalog.refreshed_prices() is None and catalog.price_per_hour(t4, "eastus", spot=False) == 0.526
    path.parent.mkdir(parents=True)
    row = {"size": t4.name, "region": "eastus", "on_demand": None, "spot": 0.12, "fetched": "2026-11-20T10:00:00Z"}
    path.write_text(json.dumps({"schema": 1, "source": "x", "fetched": row["fetched"], "prices": [row]}))
    assert catalog.vm_prices(t4, "eastus") == catalog.Price(0.526, 0.12)  # spot refreshed, on-demand snapshot
    assert catalog.price_source(t4.name, "eastus") == (
        f"snapshot {catalog.PRICE_SNAPSHOT_DATE}",
        "refreshed 2026-11-20",
    )
    path.write_text("{not json")
    os.utime(path, ns=(1, 1))  # a different mtime: read again
    assert catalog.refreshed_prices() is None and catalog.vm_prices(t4, "eastus").spot == pytest.approx(0.1578)
