"""The DerpRegion API as typed data: constants, the parsed spec, and its validation.

``parse_region_spec`` applies the same defaults as ``crds/derpregion.yaml`` (a
test compares them) and repeats the checks the CRD makes, including its CEL
rules, so ``derpfleet render`` rejects exactly what the API server would.  It
also catches what no schema can say, e.g. a hostname template that renders to
an invalid DNS name.  Every problem is reported at once, each with its path.
"""

from __future__ import annotations

import copy
import re
from collections.abc import Mapping
from dataclasses import dataclass, field
from enum import StrEnum
from typing import Any

API_GROUP = "derpfleet.io"
API_VERSION = "v1alpha1"
KIND = "DerpRegion"
PLURAL = "derpregions"

MIN_REGION_ID = 1
MAX_REGION_ID = 999
"""DERP region IDs are small ints; 900-999 is the range conventionally left to self-hosted relays."""

MAX_REPLICAS = 26
"""Node names end in one letter (900a..900z), so a region holds at most 26 relays."""

DEFAULT_REPLICAS = 2
DEFAULT_DERP_PORT = 443
DEFAULT_STUN_PORT = 3478
STUN_OFF = 0
"""``stunPort: 0`` turns the relay's STUN responder off (the map then says STUNPort -1)."""

DEFAULT_RELAY_IMAGE = "ghcr.io/derpfleet/derp-relay:0.1.0"
"""Used when ``spec.image`` is empty, so upgrading the operator upgrades relays that don't pin one."""

DEFAULT_IMAGE_PULL_POLICY = "IfNotPresent"
IMAGE_PULL_POLICIES = ("Always", "IfNotPresent", "Never")
DEFAULT_RESOURCES: Mapping[str, Any] = {"requests": {"cpu": "100m", "memory": "64Mi"}}
DEFAULT_ISSUER_KIND = "Issuer"
DEFAULT_ISSUER_GROUP = "cert-manager.io"

REGION_CODE_PATTERN = r"^[a-z0-9]([a-z0-9-]{0,14}[a-z0-9])?$"
"""1-16 characters, DNS-label style: region codes appear in hostnames and netcheck reports."""

MAX_NAME_LENGTH = 47
"""``derp-<name>`` names the StatefulSet, whose pods carry a ``<sts>-<10 char hash>`` revision label (<= 63)."""
NAME_PATTERN = r"^[a-z0-9]([-a-z0-9]*[a-z0-9])?$"
"""A DNS label, unlike most object names: the name becomes part of Service names and host names."""

HOSTNAME_PLACEHOLDERS = ("{ordinal}", "{index}", "{letter}")
"""``{ordinal}``: the pod ordinal 0, 1, …; ``{index}``: ordinal + 1; ``{letter}``: a, b, … (as in 900a)."""

HOSTNAME_TEMPLATE_PATTERN = r"^[a-z0-9.{}-]+$"
MAX_HOSTNAME_LENGTH = 253
HOME_PAGE_PATTERN = r"^(blank|https?://\S+)?$"
"""What the relays' ``/`` serves (derp-relay --home): the default page, ``blank``, or a redirect URL."""
MAX_HOME_PAGE_LENGTH = 2048
SECRET_NAME_PATTERN = r"^[a-z0-9]([-a-z0-9.]*[a-z0-9])?$"
MAX_REGION_NAME_LENGTH = 128
DNS_NAME_PATTERN = r"^[a-z0-9]([-a-z0-9]{0,61}[a-z0-9])?([.][a-z0-9]([-a-z0-9]{0,61}[a-z0-9])?)*$"
"""What a rendered hostname must match (lowercase RFC 1123); the CRD's CEL rule uses the same regex."""
_PLACEHOLDER = re.compile(r"\{[^{}]*\}")
_URL = re.compile(r"^https?://\S+$")


class TlsMode(StrEnum):
    """Where the relays' certificate comes from."""

    SELF_SIGNED = "selfSigned"
    """The operator generates one certificate per region; the DERP map pins it (CertName)."""
    SECRET = "secret"
    """A kubernetes.io/tls Secret the user provides (``tls.secretName``)."""
    CERT_MANAGER = "certManager"
    """The operator renders a cert-manager Certificate for the template's hostnames."""


@dataclass(frozen=True, slots=True)
class IssuerRef:
    name: str
    kind: str = DEFAULT_ISSUER_KIND
    group: str = DEFAULT_ISSUER_GROUP


@dataclass(frozen=True, slots=True)
class TlsSpec:
    mode: TlsMode = TlsMode.SELF_SIGNED
    secret_name: str | None = None
    issuer_ref: IssuerRef | None = None


@dataclass(frozen=True, slots=True)
class VerifyClientsSpec:
    url: str
    fail_open: bool = False


@dataclass(frozen=True, slots=True)
class DerpMapSpec:
    avoid: bool = False
    no_measure_no_home: bool = False
    latitude: float = 0.0
    longitude: float = 0.0


@dataclass(frozen=True, slots=True)
class DerpRegionSpec:
    """A DerpRegion's spec with every default applied.

    Kubernetes sub-objects the operator only passes through (tolerations,
    affinity, resources) stay plain JSON; the API server validates them.
    """

    region_id: int
    region_code: str
    region_name: str = ""
    replicas: int = DEFAULT_REPLICAS
    node_selector: Mapping[str, str] = field(default_factory=dict)
    tolerations: tuple[Mapping[str, Any], ...] = ()
    affinity: Mapping[str, Any] = field(default_factory=dict)
    hostname_template: str | None = None
    derp_port: int = DEFAULT_DERP_PORT
    stun_port: int = DEFAULT_STUN_PORT
    tls: TlsSpec = TlsSpec()
    mesh_enabled: bool = True
    verify_clients: VerifyClientsSpec | None = None
    image: str = DEFAULT_RELAY_IMAGE
    image_pull_policy: str = DEFAULT_IMAGE_PULL_POLICY
    resources: Mapping[str, Any] = field(default_factory=lambda: copy.deepcopy(DEFAULT_RESOURCES))
    derp_map: DerpMapSpec = DerpMapSpec()
    publish_unhealthy: bool = False
    home_page: str = ""

    @property
    def display_name(self) -> str:
        """RegionName for the DERP map: the given name, else the code."""
        return self.region_name or self.region_code

    @property
    def stun_enabled(self) -> bool:
        return self.stun_port != STUN_OFF


@dataclass(frozen=True, slots=True)
class SpecProblem:
    path: str
    message: str

    def __str__(self) -> str:
        return f"{self.path}: {self.message}"


class InvalidSpecError(ValueError):
    """A DerpRegion spec the operator cannot run; lists every problem with its field path."""

    def __init__(self, problems: list[SpecProblem]) -> None:
        self.problems = tuple(problems)
        super().__init__("; ".join(str(p) for p in problems))


def node_letter(ordinal: int) -> str:
    """The letter a StatefulSet ordinal gets in node names: 0 -> a, 25 -> z."""
    if not 0 <= ordinal < MAX_REPLICAS:
        raise ValueError(f"ordinal {ordinal} is outside 0..{MAX_REPLICAS - 1}")
    return chr(ord("a") + ordinal)


def node_name(region_id: int, ordinal: int) -> str:
    """The DERP node name, stable for the pod's lifetime and beyond: ``900a``, ``900b``…"""
    return f"{region_id}{node_letter(ordinal)}"


def render_hostname(template: str, ordinal: int) -> str:
    """Fill a ``hostnameTemplate`` for one ordinal (see :data:`HOSTNAME_PLACEHOLDERS`)."""
    return (
        template.replace("{ordinal}", str(ordinal))
        .replace("{index}", str(ordinal + 1))
        .replace("{letter}", node_letter(ordinal))
    )


def _hostname_template_problems(template: str) -> list[str]:
    unknown = sorted(set(_PLACEHOLDER.findall(template)) - set(HOSTNAME_PLACEHOLDERS))
    if unknown:
        return [f"unknown placeholder(s) {', '.join(unknown)}; use {', '.join(HOSTNAME_PLACEHOLDERS)}"]
    if not any(p in template for p in HOSTNAME_PLACEHOLDERS):
        return [f"must contain one of {', '.join(HOSTNAME_PLACEHOLDERS)} so every relay gets its own name"]
    if not re.fullmatch(DNS_NAME_PATTERN, render_hostname(template, 0)):
        return [f"renders to {render_hostname(template, 0)!r}, which is not a lowercase DNS name"]
    return []


def check_region_name(name: str) -> None:
    """Raise :class:`InvalidSpecError` when ``metadata.name`` cannot name the objects derived from it."""
    problems = []
    if not re.fullmatch(NAME_PATTERN, name):
        problems.append(
            SpecProblem("metadata.name", f"{name!r} must be a DNS label (lowercase, digits, '-')")
        )
    if len(name) > MAX_NAME_LENGTH:
        problems.append(SpecProblem("metadata.name", f"must be at most {MAX_NAME_LENGTH} characters"))
    if problems:
        raise InvalidSpecError(problems)


class _Fields:
    """Reads one JSON object of the spec, recording problems instead of stopping at the first."""

    def __init__(self, doc: object, path: str, problems: list[SpecProblem]) -> None:
        self.path = path
        self.problems = problems
        self.seen: set[str] = set()
        if isinstance(doc, Mapping):
            self.doc: Mapping[str, Any] = doc
        else:
            self.doc = {}
            self.fail("", "must be an object")

    def fail(self, key: str, message: str) -> None:
        self.problems.append(SpecProblem(f"{self.path}.{key}" if key else self.path, message))

    def _get(self, key: str) -> Any:
        self.seen.add(key)
        return self.doc.get(key)

    def integer(self, key: str, default: int | None, low: int, high: int) -> int:
        value = self._get(key)
        if value is None:
            if default is None:
                self.fail(key, "required")
                return low
            return default
        if not isinstance(value, int) or isinstance(value, bool):
            self.fail(key, f"must be an integer, got {value!r}")
            return default if default is not None else low
        if not low <= value <= high:
            self.fail(key, f"must be between {low} and {high}, got {value}")
        return value

    def number(self, key: str, default: float, low: float, high: float) -> float:
        value = self._get(key)
        if value is None:
            return default
        if not isinstance(value, int | float) or isinstance(value, bool):
            self.fail(key, f"must be a number, got {value!r}")
            return default
        if not low <= value <= high:
            self.fail(key, f"must be between {low} and {high}, got {value}")
        return float(value)

    def boolean(self, key: str, default: bool) -> bool:
        value = self._get(key)
        if value is None:
            return default
        if not isinstance(value, bool):
            self.fail(key, f"must be true or false, got {value!r}")
            return default
        return value

    def string(
        self, key: str, default: str | None = None, pattern: str | None = None, max_length: int | None = None
    ) -> str | None:
        value = self._get(key)
        if value is None:
            return default
        if not isinstance(value, str):
            self.fail(key, f"must be a string, got {value!r}")
            return default
        if max_length is not None and len(value) > max_length:
            self.fail(key, f"must be at most {max_length} characters")
        elif pattern is not None and not re.fullmatch(pattern, value):
            self.fail(key, f"{value!r} does not match {pattern}")
        return value

    def required_string(self, key: str, pattern: str | None = None) -> str:
        value = self.string(key, pattern=pattern)
        if not value:
            self.fail(key, "required")
        return value or ""

    def choice(self, key: str, default: str, choices: tuple[str, ...]) -> str:
        value = self.string(key, default)
        if value not in choices:
            self.fail(key, f"must be one of {', '.join(choices)}, got {value!r}")
            return default
        return value

    def child(self, key: str) -> _Fields:
        """A nested object; absent means empty, as the CRD's ``default: {}`` makes it."""
        value = self._get(key)
        return _Fields({} if value is None else value, f"{self.path}.{key}", self.problems)

    def optional_child(self, key: str) -> _Fields | None:
        """A nested object whose absence means "feature off" (no CRD default)."""
        return None if self.doc.get(key) is None else self.child(key)

    def json_object(self, key: str, default: Mapping[str, Any] | None = None) -> dict[str, Any]:
        value = self._get(key)
        if value is None:
            return copy.deepcopy(dict(default or {}))
        if not isinstance(value, Mapping):
            self.fail(key, "must be an object")
            return {}
        return copy.deepcopy(dict(value))

    def string_map(self, key: str) -> dict[str, str]:
        mapping = self.json_object(key)
        for name, value in mapping.items():
            if not isinstance(value, str):
                self.fail(f"{key}.{name}", f"must be a string, got {value!r}")
        return mapping

    def object_list(self, key: str) -> tuple[Mapping[str, Any], ...]:
        value = self._get(key)
        if value is None:
            return ()
        if not isinstance(value, list) or not all(isinstance(item, Mapping) for item in value):
            self.fail(key, "must be a list of objects")
            return ()
        return tuple(copy.deepcopy(dict(item)) for item in value)

    def reject_unknown(self) -> None:
        """Offline there is no API server pruning typos away: name them instead."""
        for key in sorted(set(self.doc) - self.seen):
            self.fail(key, "unknown field")


def _parse_tls(f: _Fields) -> TlsSpec:
    mode = TlsMode(f.choice("mode", TlsMode.SELF_SIGNED, tuple(TlsMode)))
    secret_name = f.string("secretName", pattern=SECRET_NAME_PATTERN, max_length=MAX_HOSTNAME_LENGTH)
    if (secret_name is not None) != (mode is TlsMode.SECRET):
        f.fail("secretName", "is set exactly when mode is secret")
    issuer_ref = None
    if (r := f.optional_child("issuerRef")) is not None:
        issuer_ref = IssuerRef(
            name=r.required_string("name"),
            kind=r.string("kind", DEFAULT_ISSUER_KIND) or DEFAULT_ISSUER_KIND,
            group=r.string("group", DEFAULT_ISSUER_GROUP) or DEFAULT_ISSUER_GROUP,
        )
        r.reject_unknown()
    if (issuer_ref is not None) != (mode is TlsMode.CERT_MANAGER):
        f.fail("issuerRef", "is set exactly when mode is certManager")
    f.reject_unknown()
    return TlsSpec(mode, secret_name, issuer_ref)


def _parse_verify_clients(f: _Fields) -> VerifyClientsSpec:
    spec = VerifyClientsSpec(
        url=f.required_string("url", _URL.pattern), fail_open=f.boolean("failOpen", False)
    )
    f.reject_unknown()
    return spec


def _parse_derp_map(f: _Fields) -> DerpMapSpec:
    spec = DerpMapSpec(
        avoid=f.boolean("avoid", False),
        no_measure_no_home=f.boolean("noMeasureNoHome", False),
        latitude=f.number("latitude", 0.0, -90.0, 90.0),
        longitude=f.number("longitude", 0.0, -180.0, 180.0),
    )
    f.reject_unknown()
    return spec


def parse_region_spec(spec: object, path: str = "spec") -> DerpRegionSpec:
    """Parse and validate a DerpRegion's ``spec``; raise :class:`InvalidSpecError` listing every problem."""
    problems: list[SpecProblem] = []
    f = _Fields(spec, path, problems)
    region_id = f.integer("regionID", None, MIN_REGION_ID, MAX_REGION_ID)
    region_code = f.required_string("regionCode", REGION_CODE_PATTERN)
    region_name = f.string("regionName", "", max_length=MAX_REGION_NAME_LENGTH) or ""
    replicas = f.integer("replicas", DEFAULT_REPLICAS, 1, MAX_REPLICAS)
    template = f.string("hostnameTemplate", pattern=HOSTNAME_TEMPLATE_PATTERN, max_length=MAX_HOSTNAME_LENGTH)
    if template is not None and len(template) <= MAX_HOSTNAME_LENGTH:
        for message in _hostname_template_problems(template):
            f.fail("hostnameTemplate", message)
    derp_port = f.integer("derpPort", DEFAULT_DERP_PORT, 1, 65535)
    stun_port = f.integer("stunPort", DEFAULT_STUN_PORT, 0, 65535)
    tls = _parse_tls(f.child("tls"))
    if tls.mode is TlsMode.CERT_MANAGER and template is None:
        f.fail("hostnameTemplate", "required with tls.mode certManager: the Certificate needs DNS names")
    mesh = f.child("mesh")
    mesh_enabled = mesh.boolean("enabled", True)
    mesh.reject_unknown()
    checks = f.optional_child("verifyClients")
    verify_clients = _parse_verify_clients(checks) if checks is not None else None
    parsed = DerpRegionSpec(
        region_id=region_id,
        region_code=region_code,
        region_name=region_name,
        replicas=replicas,
        node_selector=f.string_map("nodeSelector"),
        tolerations=f.object_list("tolerations"),
        affinity=f.json_object("affinity"),
        hostname_template=template,
        derp_port=derp_port,
        stun_port=stun_port,
        tls=tls,
        mesh_enabled=mesh_enabled,
        verify_clients=verify_clients,
        image=f.string("image") or DEFAULT_RELAY_IMAGE,
        image_pull_policy=f.choice("imagePullPolicy", DEFAULT_IMAGE_PULL_POLICY, IMAGE_PULL_POLICIES),
        resources=f.json_object("resources", DEFAULT_RESOURCES),
        derp_map=_parse_derp_map(f.child("derpMap")),
        publish_unhealthy=f.boolean("publishUnhealthy", False),
        home_page=f.string("homePage", "", pattern=HOME_PAGE_PATTERN, max_length=MAX_HOME_PAGE_LENGTH) or "",
    )
    f.reject_unknown()
    if problems:
        raise InvalidSpecError(problems)
    return parsed


@dataclass(frozen=True, slots=True)
class RegionRef:
    """Which DerpRegion object rendered manifests belong to (and are owned by)."""

    name: str
    namespace: str
    uid: str
    """Empty when rendering offline: then nothing gets an ownerReference."""
    cluster_domain: str = "cluster.local"
    relay_debug_allow: str = ""
    """CIDRs (commas) besides loopback the relays serve /debug/ and /metrics to: where Prometheus scrapes from."""
