"""Requests held to Microsoft's contract: the OpenAPI (Swagger 2.0) extracts vendored in specs/.

`SPECS.lookup(method, path, api_version)` finds the operation a request names. Three outcomes:
  - an operation of the vendored spec (path template, method and api-version all match): its body
    parameter's schema is compiled once and `check_body` walks the request body against it;
  - the path and method exist in the spec but only for other api-versions: Azure's refusal
    (400 NoRegisteredProviderFound for a typed resource, 400 InvalidApiVersionParameter for
    Microsoft.Resources' own paths);
  - the path is not in the vendored extracts (they are partial: see specs/SOURCES.md): the request
    is let through, unvalidated, when its provider namespace knows the api-version, and refused with
    NoRegisteredProviderFound when the namespace is vendored but never at that api-version.

The schema subset is the one OpenAPI 2.0 uses: $ref (with a fallback to the nearest stored copy of a
`common-types` file, see SOURCES.md), type, enum (x-ms-enum modelAsString=true enums are extensible
in Azure and are not enforced), required, properties, additionalProperties, allOf, items, readOnly
(ignored when sent, as Azure ignores it), format int32/int64/uuid. An object schema that lists
properties and no additionalProperties refuses unknown members, as Compute's and Network's
deserializers do ('Could not find member ...'). A $ref whose target is not stored accepts anything.
"""

from __future__ import annotations

import json
import re
import threading
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from orchestrator.emulator.validation import ArmFault

SPEC_ROOT = Path(__file__).parent / "specs" / "specification"
# Served without a vendored spec: azure-mgmt-core's auto-registration policy (on a 409
# MissingSubscriptionRegistration) POSTs .../providers/{ns}/register and polls GET .../providers/{ns}
# with api-version 2016-02-01, which ARM still serves.
EXTRA_VERSIONS = {("microsoft.resources", "2016-02-01")}
_METHODS = ("get", "put", "post", "delete", "patch", "head")
_UUID = re.compile(r"^[0-9a-fA-F]{8}-[0-9a-fA-F]{4}-[0-9a-fA-F]{4}-[0-9a-fA-F]{4}-[0-9a-fA-F]{12}$")
_INT_RANGES = {"int32": (-(2**31), 2**31 - 1), "int64": (-(2**63), 2**63 - 1)}
_CLR_TYPES = {"integer": "System.Int32", "number": "System.Double", "boolean": "System.Boolean",
              "string": "System.String", "array": "System.Collections.Generic.List", "object": "Object"}  # fmt: skip


@dataclass
class Schema:
    """A compiled schema node. `unknown`: its definition is not stored, so anything is accepted."""

    name: str = ""
    types: frozenset[str] = frozenset()
    enum: frozenset[str] | None = None
    enum_type: str = ""
    properties: dict[str, Schema] = field(default_factory=dict)
    read_only: frozenset[str] = frozenset()
    required: frozenset[str] = frozenset()
    additional: Schema | bool | None = None  # None: not given (closed when properties are listed)
    items: Schema | None = None
    fmt: str = ""
    unknown: bool = False

    @property
    def closed(self) -> bool:
        return self.additional is None and bool(self.properties)


ANY = Schema(name="any", unknown=True)


@dataclass(frozen=True)
class Operation:
    method: str
    template: str
    api_version: str
    namespace: str
    file: Path
    operation_id: str
    regex: re.Pattern[str]
    literal_segments: int
    body: Schema | None
    body_required: bool


@dataclass(frozen=True)
class Lookup:
    operation: Operation | None  # None: the path is not in the vendored extracts
    namespace: str


class SpecIndex:
    """Every vendored operation, loaded and compiled on first use (thread-safe)."""

    def __init__(self, root: Path = SPEC_ROOT) -> None:
        self.root = root
        self._ops: list[Operation] | None = None
        self._docs: dict[Path, Any] = {}
        self._compiled: dict[tuple[Path, str], Schema] = {}
        self._real: dict[Path, Path] = {}  # resolve() remembered: a few files, referred to thousands of times
        self._fallbacks: dict[tuple[Path, str], Path | None] = {}
        self._lock = threading.Lock()
        self.versions: dict[str, set[str]] = {}  # namespace (lower) -> api-versions vendored

    # ------------------------------------------------------------------ loading

    def operations(self) -> list[Operation]:
        with self._lock:
            if self._ops is None:
                self._ops = self._load()
            return self._ops

    def _resolved(self, path: Path) -> Path:
        real = self._real.get(path)
        if real is None:
            real = self._real[path] = path.resolve()
        return real

    def _doc(self, path: Path) -> Any:
        path = self._resolved(path)
        if path not in self._docs:
            self._docs[path] = json.loads(path.read_text()) if path.is_file() else None
        return self._docs[path]

    def _load(self) -> list[Operation]:
        ops: list[Operation] = []
        for file in sorted(self.root.rglob("*.json")):
            if "examples" in file.parts or "common-types" in file.parts:
                continue
            doc = self._doc(file)
            version = _folder_version(file)
            namespace = next((p for p in file.parts if p.lower().startswith("microsoft.")), "")
            if not version or not namespace:
                continue
            self.versions.setdefault(namespace.lower(), set()).add(version)
            for template, item in (doc.get("paths") or {}).items():
                regex, literals = _template_regex(template)
                for method, op in item.items():
                    if method not in _METHODS:
                        continue
                    body, required = None, False
                    for param in op.get("parameters", []):
                        param = self._param(file, param)
                        if param.get("in") == "body":
                            body = self._compile(file, param.get("schema") or {}, f"{template} body")
                            required = bool(param.get("required"))
                    ops.append(
                        Operation(
                            method.upper(),
                            template,
                            version,
                            namespace,
                            file,
                            op.get("operationId", ""),
                            regex,
                            literals,
                            body,
                            required,
                        )
                    )
        return ops

    def _param(self, file: Path, param: dict[str, Any]) -> dict[str, Any]:
        ref = param.get("$ref")
        if not ref:
            return param
        target = self._resolve(file, ref)
        return target[1] if target is not None and isinstance(target[1], dict) else {}

    def _resolve(self, file: Path, ref: str) -> tuple[Path, Any] | None:
        """(file, node) a $ref points at; common-types fall back to the nearest stored copy."""
        rel, _, pointer = ref.partition("#")
        target_file = self._resolved(file.parent / rel if rel else file)
        doc = self._doc(target_file)
        if doc is None and "common-types/" in rel:  # a folder of shared types (not a file-local common-types.json)
            target_file = self._common_fallback(file, rel) or target_file
            doc = self._doc(target_file)
        if doc is None:
            return None
        node: Any = doc
        for part in [p for p in pointer.split("/") if p]:
            if not isinstance(node, dict) or part not in node:
                return None
            node = node[part]
        return target_file, node

    def _common_fallback(self, file: Path, rel: str) -> Path | None:
        key = (file.parent, rel)
        if key not in self._fallbacks:
            self._fallbacks[key] = self._find_common(file, rel)
        return self._fallbacks[key]

    def _find_common(self, file: Path, rel: str) -> Path | None:
        tail = rel.split("common-types/", 1)[1]  # e.g. v1/common.json, resource-management/v2/types.json
        directory = self._resolved(file.parent)
        root = self._resolved(self.root)
        while root in directory.parents or directory == root:
            exact = directory / "common-types" / tail
            if exact.is_file():
                return exact
            parent = (directory / "common-types" / tail).parent.parent
            name = Path(tail).name
            if parent.is_dir():  # another version of the same common-types file (v2 -> v3)
                found = sorted(parent.glob(f"v*/{name}"))
                if found:
                    return found[-1]
            directory = directory.parent
        return None

    def _compile(self, file: Path, schema: dict[str, Any], name: str) -> Schema:
        ref = schema.get("$ref")
        if ref:
            target = self._resolve(file, ref)
            if target is None:
                return ANY
            key = (target[0], ref.partition("#")[2])
            if key in self._compiled:
                return self._compiled[key]
            node = Schema(name=ref.rsplit("/", 1)[-1])
            self._compiled[key] = node  # before filling: recursive definitions end here
            self._fill(node, target[0], target[1])
            return node
        node = Schema(name=name)
        self._fill(node, file, schema)
        return node

    def _fill(self, node: Schema, file: Path, schema: dict[str, Any]) -> None:
        types = schema.get("type")
        node.types = frozenset([types] if isinstance(types, str) else types or [])
        enum = schema.get("enum")
        x_enum = schema.get("x-ms-enum") or {}
        if enum and not x_enum.get("modelAsString", False):
            node.enum = frozenset(str(e).lower() for e in enum)
            node.enum_type = str(x_enum.get("name") or node.name)
        node.fmt = str(schema.get("format", ""))
        props: dict[str, Schema] = {}
        read_only: set[str] = set()
        required: set[str] = set(schema.get("required") or [])
        for part in schema.get("allOf") or []:
            base = self._compile(file, part, node.name)
            if base.unknown:
                continue
            props.update(base.properties)
            read_only |= base.read_only
            required |= base.required
            node.types = node.types or base.types
            if base.additional is not None and node.additional is None:
                node.additional = base.additional
        for pname, pschema in (schema.get("properties") or {}).items():
            props[pname] = self._compile(file, pschema, pname)
            if pschema.get("readOnly"):
                read_only.add(pname)
        node.properties, node.read_only, node.required = props, frozenset(read_only), frozenset(required)
        extra = schema.get("additionalProperties")
        if isinstance(extra, dict):
            node.additional = self._compile(file, extra, node.name) if extra else True
        elif isinstance(extra, bool):
            node.additional = extra
        if isinstance(schema.get("items"), dict):
            node.items = self._compile(file, schema["items"], node.name)
        if props and not node.types:
            node.types = frozenset({"object"})

    # ------------------------------------------------------------------ lookup

    def lookup(self, method: str, path: str, api_version: str, location: str = "") -> Lookup:
        namespace = request_namespace(path)
        if (namespace.lower(), api_version) in EXTRA_VERSIONS:
            return Lookup(None, namespace)
        # A template that is all parameters (`/{resourceId}`) names no resource type: never matched.
        candidates = [
            op for op in self.operations() if op.method == method and op.literal_segments and op.regex.match(path)
        ]
        if candidates:
            best = max(op.literal_segments for op in candidates)
            candidates = [op for op in candidates if op.literal_segments == best]
            for op in candidates:
                if op.api_version == api_version:
                    return Lookup(op, namespace)
            raise api_version_fault(path, namespace, api_version, {op.api_version for op in candidates}, location)
        known = self.versions.get(namespace.lower())
        if known and api_version not in known:
            raise api_version_fault(path, namespace, api_version, known, location)
        return Lookup(None, namespace)


SPECS = SpecIndex()


# ---------------------------------------------------------------------- body validation


@dataclass
class BodyReport:
    read_only: list[str] = field(default_factory=list)  # read-only properties sent (ignored)


BODIES_CHECKED = [0]  # request bodies checked against the specs in this process (the test suite reports it)


def check_body(op: Operation, body: Any, raw: bytes | None) -> BodyReport:
    """Raise Azure's 400 for a body the operation's schema refuses; report ignored read-only members."""
    report = BodyReport()
    if op.body is None:
        return report
    if body is None:
        if op.body_required:
            raise ArmFault(400, "InvalidRequestContent", "The request content was invalid and could not be "
                           "deserialized: 'The request body is required.'.")  # fmt: skip
        return report
    BODIES_CHECKED[0] += 1
    _walk(op.body, body, "", raw or b"", report)
    return report


def _walk(schema: Schema, value: Any, path: str, raw: bytes, report: BodyReport) -> None:
    if schema.unknown:
        return
    if value is None:
        return  # null is "not given" for ARM's deserializers; required-ness is checked by the parent
    if schema.types and not any(_is_type(value, t) for t in schema.types):
        kind = next(iter(schema.types))
        raise _content_fault(
            f"Error converting value {json.dumps(value)[:60]} to type '{_CLR_TYPES.get(kind, kind)}'", path, raw
        )
    if schema.fmt in _INT_RANGES and isinstance(value, int):
        lo, hi = _INT_RANGES[schema.fmt]
        if not lo <= value <= hi:
            raise _content_fault(f"Value was either too large or too small for an {schema.fmt}", path, raw)
    if schema.fmt == "uuid" and isinstance(value, str) and not _UUID.match(value):
        raise _content_fault(f"Error converting value {json.dumps(value)} to type 'System.Guid'", path, raw)
    if schema.enum is not None and isinstance(value, str) and value.lower() not in schema.enum:
        raise _content_fault(f"Error converting value {json.dumps(value)} to type '{schema.enum_type}'", path, raw)
    if isinstance(value, list) and schema.items is not None:
        for i, item in enumerate(value):
            _walk(schema.items, item, f"{path}[{i}]", raw, report)
        return
    if not isinstance(value, dict):
        return
    for name in sorted(schema.required):
        if value.get(name) is None and name not in schema.read_only:
            where = f"{path}.{name}" if path else name
            raise ArmFault(400, "InvalidParameter", f"Required parameter '{where}' is missing (null).")
    for name, member in value.items():
        where = f"{path}.{name}" if path else name
        sub = schema.properties.get(name)
        if sub is None:
            if schema.closed:
                raise _content_fault(f"Could not find member '{name}' on object of type '{schema.name}'", where, raw)
            if isinstance(schema.additional, Schema):
                _walk(schema.additional, member, where, raw, report)
            continue
        if name in schema.read_only:
            report.read_only.append(where)  # Azure ignores read-only members a client sends
            continue
        _walk(sub, member, where, raw, report)


def _is_type(value: Any, kind: str) -> bool:
    if kind == "string":
        return isinstance(value, str)
    if kind == "integer":
        return isinstance(value, int) and not isinstance(value, bool)
    if kind == "number":
        return isinstance(value, (int, float)) and not isinstance(value, bool)
    if kind == "boolean":
        return isinstance(value, bool)
    if kind == "object":
        return isinstance(value, dict)
    if kind == "array":
        return isinstance(value, list)
    return True


def _content_fault(reason: str, path: str, raw: bytes) -> ArmFault:
    """Azure's deserialization refusal: 'The request content was invalid and could not be
    deserialized: '<reason>. Path '<path>', line <l>, position <p>.'.'"""
    line, position = _position(raw, path)
    return ArmFault(
        400,
        "InvalidRequestContent",
        f"The request content was invalid and could not be deserialized: '{reason}. Path '{path}', "
        f"line {line}, position {position}.'.",
    )


def _position(raw: bytes, path: str) -> tuple[int, int]:
    """Where Json.NET would stop: just after the last member name of `path` (approximate)."""
    text = raw.decode("utf-8", "replace")
    key = re.sub(r"\[\d+\]$", "", path).rsplit(".", 1)[-1]
    at = text.find(f'"{key}"')
    end = at + len(key) + 2 if at >= 0 else len(text)
    before = text[:end]
    return before.count("\n") + 1, end - (before.rfind("\n") + 1)


# ---------------------------------------------------------------------- paths and api-versions


def _template_regex(template: str) -> tuple[re.Pattern[str], int]:
    parts = template.strip("/").split("/")
    out, literals = [], 0
    for part in parts:
        m = re.fullmatch(r"\{(\w+)\}", part)
        if m is None:
            out.append(re.escape(part))
            literals += 1
        elif m.group(1) in {"resourceId", "scope", "parentResourcePath", "resourceType"}:
            out.append(r".+")  # x-ms-skip-url-encoding parameters span segments
        else:
            out.append(r"[^/]+")
    return re.compile("^/" + "/".join(out) + "/?$", re.I), literals


def request_namespace(path: str) -> str:
    """The resource provider a request path addresses (Microsoft.Resources for groups, providers)."""
    parts = path.strip("/").split("/")
    lowered = [p.lower() for p in parts]
    idx = [i for i, p in enumerate(lowered) if p == "providers"]
    if not idx:
        return "Microsoft.Resources"
    i = idx[-1]
    if i + 1 >= len(parts):
        return "Microsoft.Resources"
    if len(idx) == 1 and i == 2 and (len(parts) <= 4 or lowered[4] in {"register", "unregister", "resourcetypes"}):
        return "Microsoft.Resources"  # /subscriptions/{s}/providers/{ns}[/register]
    return parts[i + 1]


def resource_type_of(path: str) -> str:
    parts = path.strip("/").split("/")
    lowered = [p.lower() for p in parts]
    if "providers" in lowered:
        i = len(lowered) - 1 - lowered[::-1].index("providers")
        rest = parts[i + 2 :]
        return "/".join(rest[0::2]) if rest else parts[-1]
    return "resourceGroups" if "resourcegroups" in lowered else "subscriptions"


def api_version_fault(path: str, namespace: str, api_version: str, supported: set[str], location: str) -> ArmFault:
    versions = ", ".join(sorted(supported, reverse=True))
    if namespace.lower() == "microsoft.resources":
        return ArmFault(
            400,
            "InvalidApiVersionParameter",
            f"The api-version '{api_version}' is invalid. The supported versions are '{versions}'.",
        )
    return ArmFault(
        400,
        "NoRegisteredProviderFound",
        f"No registered resource provider found for location '{location or 'eastus'}' and API version "
        f"'{api_version}' for type '{resource_type_of(path)}'. The supported api-versions are '{versions}'. "
        f"The supported locations are '{location or 'eastus'}'.",
    )


def _folder_version(file: Path) -> str:
    for parent in file.parents:
        if parent.parent.name in {"stable", "preview"}:
            return parent.name
    return ""
