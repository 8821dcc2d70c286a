"""JobSpec: the job.yaml schema, its defaults, and validation that points at file:line.

Loading is two steps. `load_yaml_with_lines` turns the text into plain Python values while
remembering the line of every key and item, refusing duplicate keys, alias bombs and binary junk.
Then pydantic validates; each pydantic error location is mapped back to a line.
"""

from __future__ import annotations

import difflib
import ipaddress
import re
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path, PurePosixPath
from typing import Annotated, Any, Literal

import yaml
from pydantic import (
    AfterValidator,
    BaseModel,
    BeforeValidator,
    ConfigDict,
    Field,
    PrivateAttr,
    ValidationError,
    ValidationInfo,
    field_validator,
    model_validator,
)

from orchestrator import catalog
from orchestrator.errors import UserInputError

MAX_FILE_BYTES = 256 * 1024
MAX_YAML_NODES = 20_000  # a real job.yaml has a few hundred; alias bombs expand to millions

Loc = tuple[str | int, ...]


@dataclass
class SpecProblem:
    where: str  # "job.yaml:12" or "--region"
    field: str  # "resources.vm_size"
    message: str


class SpecError(UserInputError):
    def __init__(self, problems: list[SpecProblem]) -> None:
        self.problems = problems
        lines = []
        for p in problems[:6]:
            prefix = f"{p.where}: " + (f"{p.field}: " if p.field else "")
            lines.append(prefix + p.message)
        if len(problems) > 6:
            lines.append(f"... and {len(problems) - 6} more problems")
        super().__init__("\n".join(lines))


# ---------------------------------------------------------------------------------------------
# YAML with line numbers


@dataclass
class LinedDocument:
    data: Any
    lines: dict[Loc, int] = field(default_factory=dict)

    def line_of(self, loc: Loc) -> int:
        """The line of the deepest known prefix of loc (a missing key points at its parent)."""
        while loc:
            if loc in self.lines:
                return self.lines[loc]
            loc = loc[:-1]
        return self.lines.get((), 1)


def load_yaml_with_lines(raw: bytes, filename: str) -> LinedDocument:
    def fail(line: int, msg: str) -> SpecError:
        return SpecError([SpecProblem(f"{filename}:{line}", "", msg)])

    if len(raw) > MAX_FILE_BYTES:
        raise fail(1, f"file is {len(raw)} bytes; a job file may be at most {MAX_FILE_BYTES} bytes")
    if b"\x00" in raw:
        line = raw[: raw.index(b"\x00")].count(b"\n") + 1
        raise fail(line, "file holds binary data (a NUL byte); a job file must be UTF-8 text")
    try:
        text = raw.decode("utf-8")
    except UnicodeDecodeError as e:
        line = raw[: e.start].count(b"\n") + 1
        raise fail(line, "file is not UTF-8 text; save it as UTF-8") from None
    loader = yaml.SafeLoader(text)
    try:
        node = loader.get_single_node()
    except yaml.MarkedYAMLError as e:
        mark = e.problem_mark or e.context_mark
        line = mark.line + 1 if mark else 1
        raise fail(line, f"not valid YAML: {e.problem or e.context}") from None
    except yaml.YAMLError as e:
        raise fail(1, f"not valid YAML: {e}") from None
    finally:
        loader.dispose()
    doc = LinedDocument(data=None)
    if node is None:
        raise fail(1, "the file is empty; a job needs at least `name` and `run`")
    doc.lines[()] = node.start_mark.line + 1
    budget = [0]

    def build(n: yaml.Node, loc: Loc) -> Any:
        budget[0] += 1
        if budget[0] > MAX_YAML_NODES:
            raise fail(n.start_mark.line + 1, "the document expands to too many values (alias bomb?)")
        doc.lines.setdefault(loc, n.start_mark.line + 1)
        if isinstance(n, yaml.MappingNode):
            loader.flatten_mapping(n)  # resolves `<<` merge keys
            out: dict[Any, Any] = {}
            for key_node, value_node in n.value:
                if not isinstance(key_node, yaml.ScalarNode):
                    raise fail(key_node.start_mark.line + 1, "a key must be a plain string")
                key = loader.construct_scalar(key_node)
                if key in out:
                    first = doc.lines.get((*loc, key), "?")
                    raise fail(key_node.start_mark.line + 1, f"duplicate key '{key}' (first at line {first})")
                doc.lines[(*loc, key)] = key_node.start_mark.line + 1
                out[key] = build(value_node, (*loc, key))
            return out
        if isinstance(n, yaml.SequenceNode):
            return [build(item, (*loc, i)) for i, item in enumerate(n.value)]
        try:
            return loader.construct_object(n, deep=True)
        except yaml.YAMLError as e:
            raise fail(n.start_mark.line + 1, f"bad value: {e}") from None

    doc.data = build(node, ())
    return doc


# ---------------------------------------------------------------------------------------------
# The schema

NAME_RE = re.compile(r"^[a-z][a-z0-9-]{0,38}[a-z0-9]$")
ENV_NAME_RE = re.compile(r"^[A-Za-z_][A-Za-z0-9_]*$")
LINUX_USER_RE = re.compile(r"^[a-z_][a-z0-9_-]{0,31}$")
# Azure refuses these as adminUsername (compute API, "InvalidParameter ... adminUsername").
RESERVED_USERS = frozenset(
    {
        "administrator", "admin", "user", "user1", "test", "user2", "test1", "user3", "admin1", "1",
        "123", "a", "actuser", "adm", "admin2", "aspnet", "backup", "console", "david", "guest", "john",
        "owner", "root", "server", "sql", "support", "support_388945a0", "sys", "test2", "test3",
        "user4", "user5",
    }
)  # fmt: skip
DURATION_RE = re.compile(r"^\s*(?:(\d+)\s*d)?\s*(?:(\d+)\s*h)?\s*(?:(\d+)\s*m)?\s*(?:(\d+)\s*s)?\s*$")
EXPECT_FLAG_RE = re.compile(r"^\s*([A-Za-z_][\w.-]*)\s*(>=|<=|==|!=|>|<)\s*(\S+)\s*$")
CONDITION_RE = re.compile(r"^\s*(>=|<=|==|!=|>|<)\s*(-?\d+(?:\.\d+)?(?:[eE][-+]?\d+)?)\s*$")
MAX_DURATION_SECONDS = 7 * 24 * 3600


def parse_duration(value: Any) -> int:
    """'90m', '2h', '1h30m', '45s', or a number of seconds."""
    if isinstance(value, bool):
        raise ValueError("expected a duration like '2h', '90m' or a number of seconds")
    if isinstance(value, int):
        seconds = value
    elif isinstance(value, str) and (m := DURATION_RE.match(value)) and any(m.groups()):
        d, h, mi, s = (int(g) if g else 0 for g in m.groups())
        seconds = ((d * 24 + h) * 60 + mi) * 60 + s
    else:
        raise ValueError(f"'{value}' is not a duration; write e.g. '2h', '90m', '1h30m' or seconds")
    if not 60 <= seconds <= MAX_DURATION_SECONDS:
        raise ValueError("must be between 1 minute and 7 days")
    return seconds


def parse_autostop(value: str) -> int:
    """--autostop: '30m', '2h', '1h30m', '45s' or seconds, from 1 second (tests, demos) to 7 days."""
    m = DURATION_RE.match(value.strip())
    if value.strip().isdigit():
        seconds = int(value)
    elif m and any(m.groups()):
        d, h, mi, s = (int(g) if g else 0 for g in m.groups())
        seconds = ((d * 24 + h) * 60 + mi) * 60 + s
    else:
        raise ValueError(f"'{value}' is not a duration; write e.g. '30m', '2h', '1h30m' or seconds")
    if not 1 <= seconds <= MAX_DURATION_SECONDS:
        raise ValueError("must be between 1 second and 7 days")
    return seconds


class Condition(BaseModel):
    model_config = ConfigDict(frozen=True)
    op: Literal[">=", "<=", "==", "!=", ">", "<"]
    threshold: float

    def holds(self, value: float) -> bool:
        t = self.threshold
        return {
            ">=": value >= t,
            "<=": value <= t,
            "==": value == t,
            "!=": value != t,
            ">": value > t,
            "<": value < t,
        }[self.op]

    def __str__(self) -> str:
        return f"{self.op} {self.threshold:g}"


def _env_name(k: str) -> str:
    if not ENV_NAME_RE.match(k):
        raise ValueError(f"'{k}' is not a valid environment variable name")
    if k.startswith("ORCH_"):
        raise ValueError(f"'{k}': names starting with ORCH_ are set by orchestrator")
    return k


def _env_value(val: Any) -> Any:
    if isinstance(val, bool) or not isinstance(val, str | int | float):
        raise ValueError("an env value must be a string or a number")
    return str(val)


def _condition(cond: Any) -> Any:
    if isinstance(cond, Condition):
        return cond
    if isinstance(cond, int | float) and not isinstance(cond, bool):
        cond = f">= {cond}"
    m = CONDITION_RE.match(cond) if isinstance(cond, str) else None
    if not m:
        raise ValueError("write a condition like '>= 0.99' (operators: >= <= > < == !=)")
    return Condition(op=m.group(1), threshold=float(m.group(2)))  # type: ignore[arg-type]


EnvName = Annotated[str, AfterValidator(_env_name)]
EnvValue = Annotated[str, BeforeValidator(_env_value)]


class _Strict(BaseModel):
    model_config = ConfigDict(extra="forbid", strict=True, frozen=True)


def _as_list(v: Any) -> Any:
    """A scalar where a list is allowed (today's one-value form) becomes a one-item list."""
    if v is None or isinstance(v, list):
        return v
    return [v]


def _size_name(v: str) -> str:
    """A name the catalog knows (retired and refused sizes pass here: candidates drop them with the
    reason, and a job left with none says why); typos get suggestions."""
    if v in catalog.VM_SIZES or catalog.retired_size(v) is not None:
        return v
    by_lower = {k.lower(): k for k in catalog.VM_SIZES}
    if v.lower() in by_lower:
        raise ValueError(f"unknown VM size '{v}'; did you mean '{by_lower[v.lower()]}'? (case matters)")
    close = difflib.get_close_matches(v, catalog.VM_SIZES, n=3, cutoff=0.6)
    if close:
        raise ValueError(f"unknown VM size '{v}'. Did you mean {' or '.join(close)}?")
    gpus = ", ".join(k for k, s in catalog.VM_SIZES.items() if s.is_gpu)
    raise ValueError(f"unknown VM size '{v}'. Known GPU sizes: {gpus}")


def _region_name(v: str) -> str:
    if v in catalog.REGIONS or v == "any":
        return v
    close = difflib.get_close_matches(v.lower().replace(" ", ""), catalog.REGIONS, n=2, cutoff=0.6)
    hint = f" Did you mean {' or '.join(close)}?" if close else ""
    raise ValueError(f"unknown region '{v}'.{hint} Known regions: {', '.join(sorted(catalog.REGIONS))} (or any)")


def _zone_name(v: Any) -> str:
    if v == "any":
        return "any"
    if isinstance(v, bool) or str(v) not in {"1", "2", "3"}:
        raise ValueError("zone must be 1, 2 or 3, a list of them, or any (or left out to let Azure choose)")
    return str(v)


def _spot_mode(v: Any) -> str:
    if v is True or v is False:
        return "true" if v else "false"
    if v == "prefer":
        return "prefer"
    raise ValueError("spot must be true, false or prefer (spot first, then on-demand)")


SizeName = Annotated[str, AfterValidator(_size_name)]
RegionName = Annotated[str, AfterValidator(_region_name)]
ZoneName = Annotated[str, BeforeValidator(_zone_name)]


class Resources(_Strict):
    """What the run asks for: every (size, region, zone, spot) it allows is a candidate
    (orchestrator/candidates.py), tried in order. `vm_size`, `region`, `zone`, `spot` and `size` read
    the first candidate; a run pins the one that provisioned (`JobSpec.pinned`)."""

    accelerators: dict[str, int] | None = None  # {T4: 1}: GPUs per node, instead of (or with) vm_size
    sizes_asked: Annotated[list[SizeName] | None, BeforeValidator(_as_list)] = Field(
        None, validation_alias="vm_size", min_length=1
    )
    regions_asked: Annotated[list[RegionName], BeforeValidator(_as_list)] = Field(
        default_factory=lambda: ["eastus"], validation_alias="region", min_length=1
    )
    zones_asked: Annotated[list[ZoneName] | None, BeforeValidator(_as_list)] = Field(
        None, validation_alias="zone", min_length=1
    )
    image: str = "auto"
    disk_gb: Annotated[int, Field(ge=30, le=4095)] = 128
    spot_mode: Annotated[str, BeforeValidator(_spot_mode)] = Field("false", validation_alias="spot")
    order: Literal["cheapest", "listed"] = "cheapest"
    _candidates: Any = PrivateAttr(default=None)

    @field_validator("accelerators")
    @classmethod
    def _accelerators(cls, v: dict[str, int] | None) -> dict[str, int] | None:
        if v is None:
            return None
        if not v:
            raise ValueError("name at least one accelerator, e.g. {T4: 1}")
        for name, count in v.items():
            if not 1 <= count <= 16:
                raise ValueError(f"{name}: a node's GPU count must be between 1 and 16, not {count}")
            catalog.sizes_for(name, count)  # ValueError for an accelerator the catalog does not know
        return v

    @field_validator("sizes_asked")
    @classmethod
    def _sizes(cls, v: list[str] | None) -> list[str] | None:
        from orchestrator.candidates import size_problem

        if v is not None:
            problems = [p for name in v if (p := size_problem(name)) is not None]
            if len(problems) == len(v):  # nothing in the list can be created: say why, here
                raise ValueError("; ".join(dict.fromkeys(problems)))
        return v

    @field_validator("regions_asked", "zones_asked")
    @classmethod
    def _any_alone(cls, v: list[str] | None) -> list[str] | None:
        if v is not None and "any" in v and len(v) > 1:
            raise ValueError("`any` stands alone: write `any` or a list of names, not both")
        return v

    @field_validator("image")
    @classmethod
    def _image(cls, v: str) -> str:
        try:
            catalog.resolve_image(v, gpu=False)
        except ValueError:
            aliases = ", ".join(["auto", *catalog.IMAGE_ALIASES])
            raise ValueError(f"image must be one of {aliases} or publisher:offer:sku:version") from None
        return v

    @field_validator("disk_gb")
    @classmethod
    def _disk_holds_image(cls, v: int, info: ValidationInfo) -> int:
        # Runs after the sizes and image (field order), whether they came from the file or a flag.
        name = info.data.get("image")
        if name is None or "sizes_asked" not in info.data or "accelerators" not in info.data:
            return v  # those fields failed and say so themselves
        for size in _sizes_of(info.data["accelerators"], info.data["sizes_asked"]):
            image = catalog.resolve_image(name, gpu=size.is_gpu)
            if image.os_disk_gb is not None and v < image.os_disk_gb:
                raise ValueError(
                    f"{v} GB is smaller than the {image.os_disk_gb} GB OS disk of image "
                    f"{catalog.image_label(name, size.is_gpu)} ({image.urn}) used with {size.name}; Azure refuses a "
                    f"smaller disk. Set resources.disk_gb to at least {image.os_disk_gb}"
                )
        return v

    @model_validator(mode="after")
    def _fits(self) -> Resources:
        from orchestrator import candidates

        found = candidates.expand(
            accelerators=self.accelerators,
            sizes=self.sizes_asked,
            regions=self.regions_asked,
            zones=self.zones_asked,
            spot=self.spot_mode,
            order=self.order,
            disk_gb=self.disk_gb,
        )
        if not found:
            raise ValueError(found.refusal())
        self._candidates = found
        return self

    @property
    def candidates(self) -> Any:
        """candidates.Candidates: ordered, and the dropped ones with their reasons."""
        return self._candidates

    @property
    def first(self) -> Any:
        """The first candidate (candidates.Candidate)."""
        return self._candidates.ordered[0]

    @property
    def vm_size(self) -> str:
        return str(self.first.size)

    @property
    def region(self) -> str:
        return str(self.first.region)

    @property
    def zone(self) -> str | None:
        zone: str | None = self.first.zone
        return zone

    @property
    def spot(self) -> bool:
        return bool(self.first.spot)

    @property
    def size(self) -> catalog.VmSize:
        return catalog.VM_SIZES[self.vm_size]


def _sizes_of(accelerators: dict[str, int] | None, sizes: list[str] | None) -> list[catalog.VmSize]:
    """The creatable sizes a job names (for the OS disk check)."""
    names = list(sizes or [])
    if accelerators and sizes is None:
        for name, count in accelerators.items():
            names += [s.name for s in catalog.sizes_for(name, count)]
    if not names:
        names = ["Standard_NC4as_T4_v3"]
    known = [catalog.VM_SIZES[n] for n in names if n in catalog.VM_SIZES]
    return [s for s in known if catalog.unsupported_reason(s) is None]


class Recovery(_Strict):
    """`recovery:` what a run does when spot VMs are evicted (recovery itself is a later issue)."""

    max_restarts: Annotated[int, Field(ge=0, le=100)] | None = None  # default: 3 with spot true or prefer, else 0


class Ssh(_Strict):
    user: str = "azureuser"
    allowed_cidrs: list[str] = Field(default_factory=list, max_length=50)
    private_key: str | None = None  # path to an existing key; default: a key pair generated per run

    @field_validator("user")
    @classmethod
    def _user(cls, v: str) -> str:
        if not LINUX_USER_RE.match(v):
            raise ValueError("ssh.user must be 1-32 lowercase letters, digits, '_' or '-', not starting with a digit")
        if v in RESERVED_USERS:
            raise ValueError(f"Azure does not allow '{v}' as the admin user; pick another (e.g. azureuser)")
        return v

    @field_validator("allowed_cidrs")
    @classmethod
    def _cidrs(cls, v: list[str]) -> list[str]:
        out = []
        for c in v:
            if c in {"auto", "any"}:  # detect this machine's public address / open to all (explicitly)
                out.append(c)
                continue
            try:
                net = ipaddress.ip_network(c, strict=False)
            except ValueError:
                raise ValueError(f"'{c}' is not an IP address or CIDR range (e.g. 203.0.113.7/32)") from None
            out.append(str(net))
        return out


PYTHON_VERSIONS = ("3.11", "3.12", "3.13")
# Lines a requirements file may not hold: it is installed while the VM boots, before the job's code
# arrives, so it cannot name other files (those belong in `setup`, which runs in the synced folder).
_FILE_REFERENCE_RE = re.compile(
    r"^\s*(?:-r|--requirement|-c|--constraint)\b|^\s*(?:(?:-e|--editable)\s+)?\.{1,2}(?:/|\s|$)"
)


class PythonEnv(_Strict):
    """`python:`: the job's own Python environment, installed by the VM with uv while it boots."""

    requirements: str | None = None  # a pip requirements file, relative to the workdir
    version: str = "3.11"

    @field_validator("version", mode="before")
    @classmethod
    def _version(cls, v: Any) -> Any:
        if isinstance(v, float):  # `version: 3.12` unquoted; YAML reads 3.10 as 3.1, so say so
            v = repr(v)
        if v not in PYTHON_VERSIONS:
            hint = " (YAML reads an unquoted 3.10 as 3.1: quote the version)" if v == "3.1" else ""
            raise ValueError(f"Python {v!s} is not offered; use one of {', '.join(PYTHON_VERSIONS)}{hint}")
        return v

    @field_validator("requirements")
    @classmethod
    def _requirements(cls, v: str | None) -> str | None:
        if v is None:
            return None
        pure = PurePosixPath(v)
        if not v.strip() or pure.is_absolute() or ".." in pure.parts:
            raise ValueError(f"'{v}' must be a file path relative to the workdir (no '/' start, no '..')")
        return v


class JobSpec(_Strict):
    name: str
    workdir: str = "."
    resources: Resources = Field(default_factory=lambda: Resources.model_validate({}))
    nodes: Annotated[int, Field(ge=1, le=16)] = 1
    python: PythonEnv | None = None
    setup: list[str] = Field(default_factory=list)
    run: str
    env: dict[EnvName, EnvValue] = Field(default_factory=dict)
    secrets: list[str] = Field(default_factory=list)
    artifacts: list[str] = Field(default_factory=list)
    max_duration: int = 4 * 3600
    budget_usd: Annotated[float, Field(gt=0, le=100_000)] | None = None
    ssh: Ssh = Field(default_factory=Ssh)
    expect: dict[str, Annotated[Condition, BeforeValidator(_condition)]] = Field(default_factory=dict)
    recovery: Recovery = Field(default_factory=Recovery)

    # Where the spec came from; filled by load_spec, not by the user.
    source: str = Field(default="", exclude=True)
    base_dir: str = Field(default=".", exclude=True)

    @field_validator("name")
    @classmethod
    def _name(cls, v: str) -> str:
        if not NAME_RE.match(v):
            raise ValueError(
                f"'{v}' is not a valid job name: use 2-40 lowercase letters, digits and '-', starting "
                "with a letter and not ending with '-' (it becomes part of Azure resource names)"
            )
        return v

    @field_validator("setup", mode="before")
    @classmethod
    def _setup(cls, v: Any) -> Any:
        return [v] if isinstance(v, str) else v

    @field_validator("run")
    @classmethod
    def _run(cls, v: str) -> str:
        if not v.strip():
            raise ValueError("run must be a command, e.g. `python train.py`")
        return v

    @field_validator("secrets")
    @classmethod
    def _secrets(cls, v: list[str]) -> list[str]:
        for s in v:
            if not ENV_NAME_RE.match(s):
                raise ValueError(f"'{s}' is not a valid environment variable name")
        if len(set(v)) != len(v):
            raise ValueError("a secret is listed twice")
        return v

    @field_validator("artifacts")
    @classmethod
    def _inside(cls, v: list[str]) -> list[str]:
        for p in v:
            pure = PurePosixPath(p)
            if pure.is_absolute() or ".." in pure.parts:
                raise ValueError(f"'{p}' must be a relative path inside the workdir (no '/' start, no '..')")
        return v

    @field_validator("workdir")
    @classmethod
    def _relative(cls, v: str) -> str:
        # May go up (`..`): a job.yaml in jobs/x/ often runs code from the repository root.
        if PurePosixPath(v).is_absolute():
            raise ValueError(f"'{v}' must be relative to the job file's folder")
        return v

    @field_validator("max_duration", mode="before")
    @classmethod
    def _duration(cls, v: Any) -> int:
        return parse_duration(v)

    @field_validator("budget_usd", mode="before")
    @classmethod
    def _budget(cls, v: Any) -> Any:
        return float(v) if isinstance(v, int) and not isinstance(v, bool) else v

    @property
    def workdir_path(self) -> Path:
        return (Path(self.base_dir) / self.workdir).resolve()

    @property
    def max_restarts(self) -> int:
        """recovery.max_restarts, or its default: 3 when spot is true or prefer, else 0."""
        if self.recovery.max_restarts is not None:
            return self.recovery.max_restarts
        return 3 if self.resources.spot_mode in {"true", "prefer"} else 0

    def pinned(self, candidate: Any) -> JobSpec:
        """This job with its resources pinned to one candidate (the one a run provisioned)."""
        res = self.resources
        data: dict[str, Any] = {
            "vm_size": candidate.size,
            "region": candidate.region,
            "image": res.image,
            "disk_gb": res.disk_gb,
            "spot": candidate.spot,
        }
        if candidate.zone is not None:
            data["zone"] = candidate.zone
        return self.model_copy(update={"resources": Resources.model_validate(data)})

    def hourly_usd(self) -> float:
        """The run's estimate per hour: every node's VM, Premium SSD OS disk and Standard public IP."""
        res = self.resources
        return self.nodes * catalog.node_usd_per_hour(res.size, res.region, res.spot, res.disk_gb)


@dataclass
class Overrides:
    """Command-line flags that replace values from the file."""

    region: str | Sequence[str] | None = None  # --region, repeatable: a list of candidate regions
    vm_size: str | Sequence[str] | None = None  # --vm-size, repeatable; replaces `accelerators` too
    spot: bool | str | None = None  # True, False or "prefer" (--spot, --no-spot, --spot-prefer)
    nodes: int | None = None
    ssh_cidrs: tuple[str, ...] = ()
    env: tuple[str, ...] = ()  # KEY=VALUE
    expect: tuple[str, ...] = ()  # "metric>=0.97"

    def apply(self, data: dict[str, Any]) -> dict[Loc, str]:
        applied: dict[Loc, str] = {}
        if self.expect:
            gates = data.setdefault("expect", {})
            if isinstance(gates, dict):
                for item in self.expect:
                    m = EXPECT_FLAG_RE.match(item)
                    if not m:
                        raise SpecError(
                            [
                                SpecProblem(
                                    "--expect",
                                    "expect",
                                    f"'{item}' is not METRIC<op>NUMBER, e.g. 'test_accuracy>=0.97'",
                                )
                            ]
                        )
                    gates[m.group(1)] = f"{m.group(2)} {m.group(3)}"
                    applied[("expect", m.group(1))] = "--expect"
        if self.env:
            env = data.setdefault("env", {})
            if isinstance(env, dict):
                for item in self.env:
                    name, sep, text = item.partition("=")
                    if not sep:
                        raise SpecError([SpecProblem("--env", "env", f"'{item}' is not KEY=VALUE")])
                    env[name] = text
                    applied[("env", name)] = "--env"
        if self.ssh_cidrs:
            ssh = data.setdefault("ssh", {})
            if isinstance(ssh, dict):
                ssh["allowed_cidrs"] = list(self.ssh_cidrs)
                applied[("ssh", "allowed_cidrs")] = "--ssh-cidr"
        res = data.setdefault("resources", {})
        if not isinstance(res, dict):
            return applied
        spot_flag = {True: "--spot", False: "--no-spot"}.get(self.spot, "--spot-prefer")  # type: ignore[arg-type]
        flag_values: tuple[tuple[Loc, str, object], ...] = (
            (("resources", "region"), "--region", _flag_list(self.region)),
            (("resources", "vm_size"), "--vm-size", _flag_list(self.vm_size)),
            (("resources", "spot"), spot_flag, self.spot),
            (("nodes",), "--nodes", self.nodes),
        )
        for loc, flag, value in flag_values:
            if value is None:
                continue
            target = data if len(loc) == 1 else res
            target[str(loc[-1])] = value
            applied[loc] = flag
        if self.vm_size and "accelerators" in res:  # the flag names the sizes: the file's GPU choice goes
            del res["accelerators"]
        return applied


def _flag_list(value: str | Sequence[str] | None) -> str | list[str] | None:
    """A repeatable flag: one value as today's scalar form, several as a list, none as None."""
    if value is None or isinstance(value, str):
        return value
    values = list(value)
    if not values:
        return None
    return values[0] if len(values) == 1 else values


def _value_at(data: Any, loc: Loc) -> Any:
    for key in loc:
        in_list = isinstance(data, list) and isinstance(key, int) and 0 <= key < len(data)
        if not in_list and not (isinstance(data, dict) and key in data):
            return None
        data = data[key]
    return data


def _where(doc: LinedDocument, flags: dict[Loc, str], filename: str, loc: Loc) -> str:
    for n in range(len(loc), 0, -1):
        if loc[:n] in flags:
            return flags[loc[:n]]
    return f"{filename}:{doc.line_of(loc)}"


def _message(err: Mapping[str, Any]) -> str:
    kind, msg = err["type"], err["msg"]
    if kind == "extra_forbidden":
        return "unknown key; check its spelling (see the job.yaml reference in README.md)"
    if kind == "missing":
        return "required key is missing"
    if kind.endswith("_type") or kind in {"model_type", "dict_type", "list_type"}:
        return f"wrong type: {msg.lower()}"
    return str(msg).removeprefix("Value error, ")


def _field_name(loc: tuple[Any, ...]) -> str:
    parts = []
    for p in loc:
        if p == "[key]":
            continue
        if isinstance(p, int):
            parts.append(f"[{p}]")
        elif p in {"function-after[_fits(), Resources]"}:
            continue
        else:
            parts.append(("." if parts else "") + str(p))
    return "".join(parts)


def _line_key(p: SpecProblem) -> tuple[int, str]:
    """Flags first, then by line."""
    head, _, line = p.where.rpartition(":")
    return (int(line), head) if line.isdigit() else (0, p.where)


def load_spec(path: str | Path, overrides: Overrides | None = None) -> JobSpec:
    """Read, parse and validate a job file; any problem raises SpecError (exit code 2)."""
    p = Path(path)
    filename = str(path)
    try:
        raw = p.read_bytes()
    except FileNotFoundError:
        raise SpecError([SpecProblem(filename, "", "no such file; pass the path to a job.yaml")]) from None
    except IsADirectoryError:
        hint = " (did you mean " + str(p / "job.yaml") + "?)" if (p / "job.yaml").exists() else ""
        raise SpecError([SpecProblem(filename, "", f"is a folder, not a job file{hint}")]) from None
    except OSError as e:
        raise SpecError([SpecProblem(filename, "", f"cannot read: {e.strerror}")]) from None
    doc = load_yaml_with_lines(raw, filename)
    if not isinstance(doc.data, dict):
        raise SpecError([SpecProblem(f"{filename}:1", "", "a job file must be a mapping of keys (name, run, ...)")])
    flags = (overrides or Overrides()).apply(doc.data)
    base_dir = str(p.resolve().parent)
    try:
        spec = JobSpec.model_validate({**doc.data, "source": str(p), "base_dir": base_dir})
    except ValidationError as e:
        problems = []
        for err in e.errors():
            loc = tuple(x for x in err["loc"] if not str(x).startswith("function-"))
            if loc and isinstance(loc[-1], int) and not isinstance(_value_at(doc.data, loc[:-1]), list):
                loc = loc[:-1]  # an item of a one-value form (`region: eastus`): blame the value itself
            where = _where(doc, flags, filename, loc)
            problems.append(SpecProblem(where, _field_name(loc), _message(err)))
        if not any(p.field.startswith("python") for p in problems):
            problems += _early_file_problems(doc.data, doc, filename, base_dir)
        raise SpecError(sorted(problems, key=_line_key)) from None
    _check_files(spec, doc, filename)
    return spec


def _check_files(spec: JobSpec, doc: LinedDocument, filename: str) -> None:
    problems = []
    base = Path(spec.base_dir)
    workdir = spec.workdir_path
    if not workdir.is_dir():
        problems.append(SpecProblem(f"{filename}:{doc.line_of(('workdir',))}", "workdir", f"no folder {workdir}"))
    elif workdir == Path(workdir.anchor):
        where = f"{filename}:{doc.line_of(('workdir',))}"
        problems.append(SpecProblem(where, "workdir", "is the filesystem root; point it at the job's code"))
    if spec.ssh.private_key is not None:
        key = Path(spec.ssh.private_key).expanduser()
        key = key if key.is_absolute() else base / key
        if not key.is_file():
            where = f"{filename}:{doc.line_of(('ssh', 'private_key'))}"
            problems.append(SpecProblem(where, "ssh.private_key", f"no such file {key}"))
    problems += _check_python(spec, doc, filename)
    if problems:
        raise SpecError(problems)


def _check_python(spec: JobSpec, doc: LinedDocument, filename: str) -> list[SpecProblem]:
    """python.requirements: a text file inside the workdir that fits the VM's custom data."""
    if spec.python is None or spec.python.requirements is None:
        return []
    where = f"{filename}:{doc.line_of(('python', 'requirements'))}"
    text, message = _read_requirements(spec.workdir_path, spec.python.requirements)
    if text is not None:
        from orchestrator.bootstrap import PythonSetup, custom_data_problem

        path = (spec.workdir_path / spec.python.requirements).resolve()
        message = custom_data_problem(PythonSetup(spec.python.version, text, str(path)), user=spec.ssh.user)
    return [SpecProblem(where, "python.requirements", message)] if message else []


def _read_requirements(workdir: Path, requirements: str) -> tuple[str | None, str]:
    """(the file's text, "") or (None, why it cannot be used)."""
    path = (workdir / requirements).resolve()
    if not path.is_relative_to(workdir):
        return None, f"{path} is outside the workdir {workdir}"
    if not path.is_file():
        return None, f"no such file {path} (the path is relative to the workdir {workdir})"
    try:
        text = path.read_bytes().decode("utf-8")
    except UnicodeDecodeError:
        return None, f"{path} is not UTF-8 text"
    except OSError as e:
        return None, f"cannot read {path}: {e.strerror}"
    for number, line in enumerate(text.splitlines(), 1):
        if _FILE_REFERENCE_RE.search(line):
            return None, (
                f"{path.name}:{number}: '{line.strip()}' refers to a file; the requirements are installed "
                "while the VM boots, before the job's code arrives. Install it in `setup` instead"
            )
    return text, ""


def _early_file_problems(data: dict[str, Any], doc: LinedDocument, filename: str, base_dir: str) -> list[SpecProblem]:
    """The requirements file's problems, said with the field errors (the model's own file checks only
    run on a valid model): a user fixes everything in one pass."""
    python = data.get("python")
    requirements = python.get("requirements") if isinstance(python, dict) else None
    workdir = data.get("workdir", ".")
    if not isinstance(requirements, str) or not isinstance(workdir, str):
        return []
    folder = (Path(base_dir) / workdir).resolve()
    if not folder.is_dir():
        return []
    _, message = _read_requirements(folder, requirements)
    where = f"{filename}:{doc.line_of(('python', 'requirements'))}"
    return [SpecProblem(where, "python.requirements", message)] if message else []
