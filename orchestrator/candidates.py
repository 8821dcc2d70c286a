"""Where a run may go: the candidates (size, region, zone, spot) a job's `resources` allow, in the
order a run tries them, and the ones dropped with the reason. Pure: the catalog and the job's
values only, no I/O (the preflight drops more, from what Azure answers).

Expansion, for each size (`vm_size` as written, or every size `accelerators` names, cheapest
first; both given: the listed sizes that carry those GPUs), each region (`region` as written, or
`any`: every catalog region offering the size), each zone and each spot choice:

  zone omitted      one zoneless attempt (Azure picks the zone), as before candidates existed
  zone: 2, [1, 2]   those zones, pinned; a region without zones drops them
  zone: any         the region's zones 1, 2, 3, each pinned; one zoneless attempt in a region
                    without zones. No zoneless attempt after the zones of a zoned region: a
                    zoneless VM is placed in one of those same zones, so once all three refused it
                    costs another 30 s-minutes attempt for little chance (DESIGN: a pinned zone
                    can succeed where a zoneless request fails, not the other way round), and the
                    run moves on to the next region instead.
  spot: prefer      spot first, then on-demand, for the same size, region and zone

Order: `listed` keeps that nesting (sizes in the written order, then regions, then zones, spot
before on-demand); `cheapest` (the default) sorts it by the run's price per hour (every node's VM,
OS disk and public IP, spot prices for spot), ties keeping the listed order, so the zones of one
region stay together and are tried before moving region.

Dropped up front, with the reason: retired sizes, sizes orchestrator refuses
(`catalog.unsupported_reason`), a size not offered in a region, zones in a region without zones,
spot for a size Azure offers no spot for.
"""

from __future__ import annotations

from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any

from orchestrator import catalog

DEFAULT_VM_SIZE = "Standard_NC4as_T4_v3"
DEFAULT_REGION = "eastus"
ANY = "any"
ORDERS = ("cheapest", "listed")
SPOT_MODES = ("false", "true", "prefer")


@dataclass(frozen=True)
class Candidate:
    """One place a run can go: every node of the run gets this size in this region and zone."""

    size: str
    region: str
    zone: str | None  # None: zoneless (Azure picks)
    spot: bool

    @property
    def vm(self) -> catalog.VmSize:
        return catalog.VM_SIZES[self.size]

    @property
    def where(self) -> str:
        return self.region + (f" zone {self.zone}" if self.zone else "")

    def label(self) -> str:
        """`Standard_NC4as_T4_v3 in eastus zone 1 (spot)`."""
        return f"{self.size} in {self.where}" + (" (spot)" if self.spot else "")

    def usd_per_hour(self, nodes: int, disk_gb: int) -> float:
        """The whole run's price per hour here: every node's VM, OS disk and public IP."""
        return nodes * catalog.node_usd_per_hour(self.vm, self.region, self.spot, disk_gb)

    def to_json(self) -> dict[str, Any]:
        return {"vm_size": self.size, "region": self.region, "zone": self.zone, "spot": self.spot}


@dataclass(frozen=True)
class Dropped:
    """A candidate (or part of one: a size in no region) the job allows but that cannot run, and why.
    `field` is the job.yaml key that rules it out."""

    size: str
    region: str | None
    zone: str | None
    spot: bool | None
    reason: str
    field: str  # accelerators, vm_size, region, zone or spot (under resources)

    def label(self) -> str:
        parts = [self.size or "(no size)"]
        if self.region:
            parts.append(f"in {self.region}" + (f" zone {self.zone}" if self.zone else ""))
        if self.spot:
            parts.append("(spot)")
        return " ".join(parts)

    def to_json(self) -> dict[str, Any]:
        return {
            "vm_size": self.size or None,
            "region": self.region,
            "zone": self.zone,
            "spot": self.spot,
            "reason": self.reason,
            "field": f"resources.{self.field}",
        }


@dataclass(frozen=True)
class Candidates:
    order: str
    ordered: tuple[Candidate, ...]
    dropped: tuple[Dropped, ...] = field(default=())

    def __bool__(self) -> bool:
        return bool(self.ordered)

    def refusal(self) -> str:
        """Why no candidate can run the job: the reason itself when one thing was dropped, else one
        line per dropped candidate."""
        if len(self.dropped) == 1:
            return self.dropped[0].reason
        lines = [f"no candidate can run this job ({len(self.dropped)} dropped):"]
        lines += [f"  {d.label()}: {d.reason} [resources.{d.field}]" for d in self.dropped]
        return "\n".join(lines)


def size_problem(name: str) -> str | None:
    """Why a size that exists in the catalog (or did) cannot be created: retired, or refused by
    orchestrator; None when it can be."""
    if name in catalog.VM_SIZES:
        return catalog.unsupported_reason(catalog.VM_SIZES[name])
    retired = catalog.retired_size(name)
    if retired is not None and retired.retired is not None:
        r = retired.retired
        return (
            f"{retired.name} was retired by Azure on {r.date} and can no longer be created; use a current "
            f"size such as {r.replacement} instead (migration guide: {r.guide})"
        )
    return f"unknown VM size '{name}'"


def _accelerator_of(size: catalog.VmSize) -> str:
    acc = catalog.accelerator_of(size)
    return f"{size.gpus} x {acc.name}" if acc is not None else "no GPU"


def _sizes(
    accelerators: Mapping[str, int] | None, sizes: Sequence[str] | None, dropped: list[Dropped]
) -> list[catalog.VmSize]:
    """The usable sizes in the written (or, from accelerators, cheapest-first) order."""
    names: list[str] = []
    if accelerators:
        wanted: list[str] = []
        for acc, count in accelerators.items():
            found = catalog.sizes_for(acc, count)
            if not found:
                have = [n for n in range(1, 17) if catalog.sizes_for(acc, n)]
                counts = " or ".join(map(str, have)) or "none"
                reason = f"no size in the catalog has exactly {count} x {acc} per VM (its {acc} sizes have {counts})"
                dropped.append(Dropped("", None, None, None, reason, "accelerators"))
            wanted += [s.name for s in found if s.name not in wanted]
        if sizes is None:
            names = wanted
        else:
            asked = ", ".join(f"{n} x {a}" for a, n in accelerators.items())
            for name in sizes:
                if name in wanted or name not in catalog.VM_SIZES:
                    names.append(name)  # a retired size is dropped below with its own reason
                else:
                    vm = catalog.VM_SIZES[name]
                    reason = f"carries {_accelerator_of(vm)}, not what `accelerators` asks for ({asked})"
                    dropped.append(Dropped(name, None, None, None, reason, "vm_size"))
    else:
        names = list(sizes) if sizes is not None else [DEFAULT_VM_SIZE]
    out: list[catalog.VmSize] = []
    for name in dict.fromkeys(names):
        problem = size_problem(name)
        if problem is not None:
            retired = catalog.retired_size(name)
            shown = retired.name if retired is not None else name
            dropped.append(Dropped(shown, None, None, None, problem, "accelerators" if sizes is None else "vm_size"))
            continue
        out.append(catalog.VM_SIZES[name])
    return out


def expand(
    *,
    accelerators: Mapping[str, int] | None = None,
    sizes: Sequence[str] | None = None,
    regions: Sequence[str] = (DEFAULT_REGION,),
    zones: Sequence[str] | None = None,
    spot: str = "false",
    order: str = "cheapest",
    disk_gb: int = 128,
) -> Candidates:
    """Every candidate the values allow, ordered; `regions` or `zones` may be [ANY]; `spot` is
    "true", "false" or "prefer"."""
    if order not in ORDERS:
        raise ValueError(f"order must be one of {', '.join(ORDERS)}")
    if spot not in SPOT_MODES:
        raise ValueError(f"spot must be one of {', '.join(SPOT_MODES)}")
    dropped: list[Dropped] = []
    listed: list[Candidate] = []
    any_region = list(regions) == [ANY]
    any_zone = zones is not None and list(zones) == [ANY]
    spots = {"true": [True], "false": [False], "prefer": [True, False]}[spot]
    for size in _sizes(accelerators, sizes, dropped):
        where = [r for r in catalog.REGIONS if r in size.regions] if any_region else list(dict.fromkeys(regions))
        for region in where:
            if region not in size.regions:
                offered = ", ".join(sorted(size.regions))
                reason = f"{size.name} is not offered in {region}; it is offered in: {offered}"
                dropped.append(Dropped(size.name, region, None, None, reason, "region"))
                continue
            zoned = catalog.region_has_zones(region)
            region_zones: list[str | None]
            if zones is None:
                region_zones = [None]
            elif any_zone:
                region_zones = ["1", "2", "3"] if zoned else [None]
            elif not zoned:
                reason = f"{region} has no availability zones; remove `zone` (or write `zone: any`)"
                dropped += [Dropped(size.name, region, z, None, reason, "zone") for z in dict.fromkeys(zones)]
                continue
            else:
                region_zones = list(dict.fromkeys(zones))
            for zone in region_zones:
                for s in spots:
                    if s and not size.spot_supported:
                        reason = f"{size.name} cannot run as a Spot VM (Azure offers no Spot for B-series)" + (
                            "; drop `spot`" if spot == "true" else ""
                        )
                        dropped.append(Dropped(size.name, region, zone, True, reason, "spot"))
                        continue
                    listed.append(Candidate(size.name, region, zone, s))
    listed = list(dict.fromkeys(listed))
    if order == "cheapest":  # stable: ties keep the listed order
        listed.sort(key=lambda c: c.usd_per_hour(1, disk_gb))
    return Candidates(order, tuple(listed), tuple(_dedupe(dropped)))


def _dedupe(dropped: Iterable[Dropped]) -> list[Dropped]:
    return list(dict.fromkeys(dropped))


def of_spec(spec: Any) -> Candidates:
    """The candidates of a JobSpec (what `spec.resources` allows)."""
    return spec.resources.candidates  # type: ignore[no-any-return]


def priced(spec: Any, candidates: Iterable[Candidate]) -> list[tuple[Candidate, float]]:
    """Each candidate with the whole run's price per hour there."""
    return [(c, c.usd_per_hour(spec.nodes, spec.resources.disk_gb)) for c in candidates]
