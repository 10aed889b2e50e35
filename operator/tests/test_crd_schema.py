"""The CRD YAML: loads, is structural, documents every field, and agrees with model.py.

Real admission against an API server is an e2e concern; here the schema is
checked by its own rules and by applying its defaults the way the API server
does, then parsing the result with the operator's model: both must agree.
"""

from __future__ import annotations

import copy
import re
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
import yaml
from derpoperator import model
from derpoperator.model import parse_region_spec
from fleetfixtures import CRD_PATH, EXAMPLES, REPO

Schema = dict[str, Any]

FIELDS_WITHOUT_DEFAULT = {
    # required
    "spec.regionID",
    "spec.regionCode",
    "spec.tls.issuerRef.name",
    "spec.verifyClients.url",
    # optional: absence means "not used"
    "spec.hostnameTemplate",
    "spec.tls.secretName",
    "spec.tls.issuerRef",
    "spec.verifyClients",
    # empty means the operator's built-in image, which follows operator upgrades
    "spec.image",
    # pass-through Kubernetes structures
    "spec.tolerations[].key",
    "spec.tolerations[].operator",
    "spec.tolerations[].value",
    "spec.tolerations[].effect",
    "spec.tolerations[].tolerationSeconds",
    "spec.resources.requests",
    "spec.resources.limits",
}
"""Spec fields deliberately left without a default; adding a field means deciding which it is."""


@pytest.fixture(scope="module")
def crd() -> dict[str, Any]:
    doc = yaml.safe_load(CRD_PATH.read_text())
    assert isinstance(doc, dict)
    return doc


@pytest.fixture(scope="module")
def version(crd: dict[str, Any]) -> dict[str, Any]:
    (only,) = crd["spec"]["versions"]
    return dict(only)


@pytest.fixture(scope="module")
def root(version: dict[str, Any]) -> Schema:
    return dict(version["schema"]["openAPIV3Schema"])


@pytest.fixture(scope="module")
def spec_schema(root: Schema) -> Schema:
    return dict(root["properties"]["spec"])


def walk(schema: Schema, path: str) -> Iterator[tuple[str, Schema]]:
    """Every schema node below (and including) ``schema``, with a readable path."""
    yield path, schema
    for name, child in schema.get("properties", {}).items():
        yield from walk(child, f"{path}.{name}")
    if isinstance(schema.get("items"), dict):
        yield from walk(schema["items"], f"{path}[]")
    if isinstance(schema.get("additionalProperties"), dict):
        yield from walk(schema["additionalProperties"], f"{path}{{}}")


def apply_defaults(schema: Schema, value: Any) -> Any:
    """Default the way the API server does: top-down, into objects that exist or were just defaulted."""
    if isinstance(value, dict):
        for name, child in schema.get("properties", {}).items():
            if name not in value and "default" in child:
                value[name] = copy.deepcopy(child["default"])
            if name in value:
                apply_defaults(child, value[name])
    elif isinstance(value, list) and isinstance(schema.get("items"), dict):
        for item in value:
            apply_defaults(schema["items"], item)
    return value


_TYPES: dict[str, type | tuple[type, ...]] = {
    "object": dict,
    "array": list,
    "string": str,
    "integer": int,
    "number": (int, float),
    "boolean": bool,
}


def violations(schema: Schema, value: Any, path: str) -> list[str]:
    """OpenAPI checks the schema states directly (types, ranges, enums, patterns, required)."""
    if schema.get("x-kubernetes-int-or-string"):
        return (
            [] if isinstance(value, int | str) and not isinstance(value, bool) else [f"{path}: int or string"]
        )
    kind = schema["type"]
    if not isinstance(value, _TYPES[kind]) or (kind in ("integer", "number") and isinstance(value, bool)):
        return [f"{path}: expected {kind}, got {value!r}"]
    found = []
    if "enum" in schema and value not in schema["enum"]:
        found.append(f"{path}: {value!r} not in {schema['enum']}")
    if "minimum" in schema and value < schema["minimum"]:
        found.append(f"{path}: {value} < {schema['minimum']}")
    if "maximum" in schema and value > schema["maximum"]:
        found.append(f"{path}: {value} > {schema['maximum']}")
    if "pattern" in schema and not re.search(schema["pattern"], value):
        found.append(f"{path}: {value!r} does not match {schema['pattern']}")
    if "maxLength" in schema and len(value) > schema["maxLength"]:
        found.append(f"{path}: longer than {schema['maxLength']}")
    if kind == "object":
        found += [f"{path}.{name}: required" for name in schema.get("required", []) if name not in value]
        properties = schema.get("properties", {})
        for name, item in value.items():
            if name in properties:
                found += violations(properties[name], item, f"{path}.{name}")
            elif isinstance(schema.get("additionalProperties"), dict):
                found += violations(schema["additionalProperties"], item, f"{path}.{name}")
            elif not schema.get("x-kubernetes-preserve-unknown-fields"):
                found.append(f"{path}.{name}: unknown field (would be pruned)")
    if kind == "array":
        for index, item in enumerate(value):
            found += violations(schema["items"], item, f"{path}[{index}]")
    return found


def test_crd_identity(crd: dict[str, Any], version: dict[str, Any]) -> None:
    assert crd["apiVersion"] == "apiextensions.k8s.io/v1"
    assert crd["metadata"]["name"] == f"{model.PLURAL}.{model.API_GROUP}"
    spec = crd["spec"]
    assert (spec["group"], spec["scope"], spec["names"]["kind"]) == (
        model.API_GROUP,
        "Namespaced",
        model.KIND,
    )
    assert spec["names"]["shortNames"]
    assert version["name"] == model.API_VERSION
    assert version["served"] and version["storage"]
    assert version["subresources"] == {"status": {}}


def test_printer_columns(version: dict[str, Any]) -> None:
    columns = {c["name"]: c["jsonPath"] for c in version["additionalPrinterColumns"]}
    assert columns == {
        "Region": ".spec.regionID",
        "Code": ".spec.regionCode",
        "Ready Nodes": ".status.readyNodes",
        "Desired": ".status.desiredNodes",
        "Ready": '.status.conditions[?(@.type=="Ready")].status',
        "Age": ".metadata.creationTimestamp",
    }


def test_schema_is_structural(root: Schema) -> None:
    """Every node has a type, save int-or-string nodes whose anyOf branches carry the types."""
    for path, node in walk(root, "$"):
        if node.get("x-kubernetes-int-or-string"):
            assert [b["type"] for b in node["anyOf"]] == ["integer", "string"], path
            assert "type" not in node, path
            continue
        assert node.get("type") in _TYPES, f"{path} has no valid type"
        if node["type"] == "object" and node.get("x-kubernetes-preserve-unknown-fields"):
            assert "properties" not in node, path
        if node["type"] == "array":
            assert isinstance(node.get("items"), dict), f"{path} needs items"


def test_every_field_is_documented(root: Schema) -> None:
    undocumented = [
        path for path, node in walk(root, "$") if not node.get("description") and not path.endswith("{}")
    ]
    # metadata's schema may only constrain name and generateName; map values ({}) are described by their map
    assert undocumented == ["$.metadata"]


def test_defaults_are_deliberate(spec_schema: Schema) -> None:
    without = {
        path
        for path, node in walk(spec_schema, "spec")
        if path != "spec" and "default" not in node and not path.endswith(("{}", "[]"))
    }
    assert without == FIELDS_WITHOUT_DEFAULT


def test_defaults_fit_their_own_schema(spec_schema: Schema) -> None:
    for path, node in walk(spec_schema, "spec"):
        if "default" in node:
            default = apply_defaults(node, copy.deepcopy(node["default"]))
            assert violations(node, default, path) == []


@pytest.mark.parametrize(
    "spec",
    [
        {"regionID": 900, "regionCode": "fra"},
        {"regionID": 900, "regionCode": "fra", "tls": {}, "mesh": {}, "derpMap": {"avoid": True}},
        {"regionID": 900, "regionCode": "fra", "tls": {"mode": "secret", "secretName": "mine"}},
        {
            "regionID": 900,
            "regionCode": "fra",
            "hostnameTemplate": "derp{index}.example.com",
            "tls": {"mode": "certManager", "issuerRef": {"name": "le"}},
            "verifyClients": {"url": "https://hs.example/verify"},
        },
    ],
)
def test_model_applies_the_crds_defaults(spec_schema: Schema, spec: dict[str, Any]) -> None:
    """What the API server stores (defaulted) and what was written must parse to the same spec."""
    defaulted = apply_defaults(spec_schema, copy.deepcopy(spec))
    assert violations(spec_schema, defaulted, "spec") == []
    assert parse_region_spec(defaulted) == parse_region_spec(spec)


def test_limits_match_the_model(spec_schema: Schema) -> None:
    p = spec_schema["properties"]
    assert (p["regionID"]["minimum"], p["regionID"]["maximum"]) == (model.MIN_REGION_ID, model.MAX_REGION_ID)
    assert p["replicas"]["maximum"] == model.MAX_REPLICAS
    assert p["regionCode"]["pattern"] == model.REGION_CODE_PATTERN
    assert p["hostnameTemplate"]["pattern"] == model.HOSTNAME_TEMPLATE_PATTERN
    assert p["hostnameTemplate"]["maxLength"] == model.MAX_HOSTNAME_LENGTH
    assert p["imagePullPolicy"]["enum"] == list(model.IMAGE_PULL_POLICIES)
    assert p["tls"]["properties"]["mode"]["enum"] == [m.value for m in model.TlsMode]
    assert p["stunPort"]["minimum"] == model.STUN_OFF
    assert p["regionName"]["maxLength"] == model.MAX_REGION_NAME_LENGTH
    assert (p["homePage"]["pattern"], p["homePage"]["maxLength"]) == (
        model.HOME_PAGE_PATTERN,
        model.MAX_HOME_PAGE_LENGTH,
    )
    secret_name = p["tls"]["properties"]["secretName"]
    assert (secret_name["pattern"], secret_name["maxLength"]) == (
        model.SECRET_NAME_PATTERN,
        model.MAX_HOSTNAME_LENGTH,
    )


def test_hostname_template_rules_match_the_model(spec_schema: Schema) -> None:
    contains, renders = (
        r["rule"] for r in spec_schema["properties"]["hostnameTemplate"]["x-kubernetes-validations"]
    )
    assert contains == " || ".join(f"self.contains('{p}')" for p in model.HOSTNAME_PLACEHOLDERS)
    assert renders.endswith(f".matches('{model.DNS_NAME_PATTERN}')")
    assert model.render_hostname("{ordinal}{index}{letter}", 0) == "01a"
    assert renders.startswith(
        "self.replace('{ordinal}', '0').replace('{index}', '1').replace('{letter}', 'a')"
    )


def test_region_id_is_immutable(spec_schema: Schema) -> None:
    rules = spec_schema["properties"]["regionID"]["x-kubernetes-validations"]
    assert [r["rule"] for r in rules] == ["self == oldSelf"]


def test_name_restrictions_match_the_model(root: Schema) -> None:
    metadata = root["properties"]["metadata"]
    assert set(metadata) == {"type", "properties"}, "metadata may restrict only name and generateName"
    name = metadata["properties"]["name"]
    assert (name["maxLength"], name["pattern"]) == (model.MAX_NAME_LENGTH, model.NAME_PATTERN)


@pytest.mark.parametrize("path", sorted(EXAMPLES.glob("*.yaml")), ids=lambda p: p.name)
def test_examples_fit_the_schema(root: Schema, path: Path) -> None:
    for doc in yaml.safe_load_all(path.read_text()):
        spec_schema = root["properties"]["spec"]
        defaulted = apply_defaults(spec_schema, copy.deepcopy(doc["spec"]))
        assert violations(spec_schema, defaulted, "spec") == []
        model.check_region_name(doc["metadata"]["name"])
        parse_region_spec(doc["spec"])


def test_the_charts_crd_is_the_crd() -> None:
    """crds/ is the single source; the chart ships a copy (Helm installs CRDs only from its own crds/)."""
    chart_copy = REPO / "charts" / "derpfleet" / "crds" / "derpregion.yaml"
    assert chart_copy.read_text() == CRD_PATH.read_text(), (
        "charts/derpfleet/crds/derpregion.yaml differs from crds/derpregion.yaml: run `make chart-crds`"
    )
