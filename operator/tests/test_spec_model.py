"""Parsing DerpRegion specs: defaults, every validation rule, and names derived from the spec."""

from __future__ import annotations

from typing import Any

import pytest
from derpoperator.model import (
    DEFAULT_RELAY_IMAGE,
    DEFAULT_RESOURCES,
    DerpMapSpec,
    InvalidSpecError,
    IssuerRef,
    TlsMode,
    TlsSpec,
    VerifyClientsSpec,
    check_region_name,
    node_letter,
    node_name,
    parse_region_spec,
    render_hostname,
)
from fleetfixtures import spec_of


def problems(spec: Any) -> list[str]:
    with pytest.raises(InvalidSpecError) as info:
        parse_region_spec(spec)
    return [str(p) for p in info.value.problems]


def test_minimal_spec_gets_every_default() -> None:
    spec = spec_of()
    assert spec.region_id == 900
    assert spec.region_code == "fra"
    assert spec.display_name == "fra"
    assert spec.replicas == 2
    assert spec.derp_port == 443
    assert spec.stun_port == 3478
    assert spec.stun_enabled
    assert spec.tls == TlsSpec(TlsMode.SELF_SIGNED)
    assert spec.mesh_enabled
    assert spec.verify_clients is None
    assert spec.image == DEFAULT_RELAY_IMAGE
    assert spec.image_pull_policy == "IfNotPresent"
    assert spec.resources == DEFAULT_RESOURCES
    assert spec.derp_map == DerpMapSpec()
    assert spec.publish_unhealthy is False
    assert spec.hostname_template is None
    assert (dict(spec.node_selector), spec.tolerations, dict(spec.affinity)) == ({}, (), {})


def test_full_spec_is_read_field_by_field() -> None:
    spec = spec_of(
        regionName="Frankfurt",
        replicas=3,
        nodeSelector={"derp": "yes"},
        tolerations=[{"key": "derp", "operator": "Exists"}],
        affinity={"nodeAffinity": {}},
        hostnameTemplate="derp{index}-fra.example.com",
        derpPort=8443,
        stunPort=0,
        tls={"mode": "certManager", "issuerRef": {"name": "letsencrypt", "kind": "ClusterIssuer"}},
        mesh={"enabled": False},
        verifyClients={"url": "https://hs.example/verify", "failOpen": True},
        image="example/relay:1",
        imagePullPolicy="Always",
        resources={"limits": {"memory": "1Gi"}},
        derpMap={"avoid": True, "noMeasureNoHome": True, "latitude": 50, "longitude": 8.5},
        publishUnhealthy=True,
    )
    assert spec.display_name == "Frankfurt"
    assert not spec.stun_enabled
    assert spec.tls == TlsSpec(
        TlsMode.CERT_MANAGER, None, IssuerRef("letsencrypt", "ClusterIssuer", "cert-manager.io")
    )
    assert spec.verify_clients == VerifyClientsSpec("https://hs.example/verify", fail_open=True)
    assert spec.derp_map == DerpMapSpec(True, True, 50.0, 8.5)
    assert spec.resources == {"limits": {"memory": "1Gi"}}
    assert spec.tolerations == ({"key": "derp", "operator": "Exists"},)
    assert (spec.replicas, spec.derp_port, spec.image, spec.mesh_enabled, spec.publish_unhealthy) == (
        3,
        8443,
        "example/relay:1",
        False,
        True,
    )


def test_parsed_spec_does_not_share_the_callers_objects() -> None:
    raw = {"regionID": 900, "regionCode": "fra", "affinity": {"nodeAffinity": {"x": 1}}}
    spec = parse_region_spec(raw)
    raw["affinity"]["nodeAffinity"]["x"] = 2
    assert spec.affinity == {"nodeAffinity": {"x": 1}}


@pytest.mark.parametrize(
    ("fields", "expected"),
    [
        ({"regionID": 0}, "spec.regionID: must be between 1 and 999, got 0"),
        ({"regionID": 1000}, "spec.regionID: must be between 1 and 999, got 1000"),
        ({"regionID": "900"}, "spec.regionID: must be an integer, got '900'"),
        ({"regionID": True}, "spec.regionID: must be an integer, got True"),
        ({"regionCode": "FRA"}, "spec.regionCode: 'FRA' does not match"),
        ({"regionCode": "fra-"}, "spec.regionCode: 'fra-' does not match"),
        ({"regionCode": "a" * 17}, "does not match"),
        ({"replicas": 27}, "spec.replicas: must be between 1 and 26, got 27"),
        ({"replicas": 0}, "spec.replicas: must be between 1 and 26, got 0"),
        ({"derpPort": 0}, "spec.derpPort: must be between 1 and 65535"),
        ({"stunPort": 70000}, "spec.stunPort: must be between 0 and 65535"),
        ({"tls": {"mode": "acme"}}, "spec.tls.mode: must be one of selfSigned, secret, certManager"),
        ({"tls": {"mode": "secret"}}, "spec.tls.secretName: is set exactly when mode is secret"),
        ({"tls": {"secretName": "mine"}}, "spec.tls.secretName: is set exactly when mode is secret"),
        (
            {"tls": {"issuerRef": {"name": "x"}}},
            "spec.tls.issuerRef: is set exactly when mode is certManager",
        ),
        (
            {"tls": {"mode": "secret", "secretName": "Bad_Name"}},
            "spec.tls.secretName: 'Bad_Name' does not match",
        ),
        (
            {"tls": {"mode": "certManager", "issuerRef": {"name": "le"}}},
            "spec.hostnameTemplate: required with tls.mode certManager",
        ),
        ({"tls": {"mode": "certManager", "issuerRef": {}}}, "spec.tls.issuerRef.name: required"),
        ({"verifyClients": {}}, "spec.verifyClients.url: required"),
        ({"verifyClients": {"url": "ftp://x"}}, "spec.verifyClients.url: 'ftp://x' does not match"),
        (
            {"verifyClients": {"url": "https://x", "failOpen": "yes"}},
            "spec.verifyClients.failOpen: must be true or false",
        ),
        (
            {"imagePullPolicy": "Sometimes"},
            "spec.imagePullPolicy: must be one of Always, IfNotPresent, Never",
        ),
        ({"derpMap": {"latitude": 91}}, "spec.derpMap.latitude: must be between -90.0 and 90.0, got 91"),
        ({"derpMap": {"longitude": "east"}}, "spec.derpMap.longitude: must be a number"),
        ({"nodeSelector": {"zone": 1}}, "spec.nodeSelector.zone: must be a string, got 1"),
        ({"tolerations": {"key": "x"}}, "spec.tolerations: must be a list of objects"),
        ({"affinity": []}, "spec.affinity: must be an object"),
        ({"mesh": {"enabled": "true"}}, "spec.mesh.enabled: must be true or false"),
        ({"mesh": {"enable": True}}, "spec.mesh.enable: unknown field"),
        ({"replica": 3}, "spec.replica: unknown field"),
        ({"tls": "selfSigned"}, "spec.tls: must be an object"),
        ({"regionName": "x" * 129}, "spec.regionName: must be at most 128 characters"),
        (
            {"tls": {"mode": "secret", "secretName": "s" * 254}},
            "spec.tls.secretName: must be at most 253 characters",
        ),
        (
            {"tls": {"mode": "certManager", "issuerRef": {"name": "le", "team": "x"}}},
            "spec.tls.issuerRef.team: unknown field",
        ),
        ({"verifyClients": {"url": "https://x", "retries": 3}}, "spec.verifyClients.retries: unknown field"),
    ],
)
def test_invalid_field_is_named_with_its_path(fields: dict[str, Any], expected: str) -> None:
    found = problems({"regionID": 900, "regionCode": "fra", **fields})
    assert any(expected in p for p in found), found


def test_every_problem_is_reported_at_once() -> None:
    found = problems({"replicas": 40, "tls": {"mode": "secret"}})
    assert found == [
        "spec.regionID: required",
        "spec.regionCode: required",
        "spec.replicas: must be between 1 and 26, got 40",
        "spec.tls.secretName: is set exactly when mode is secret",
    ]


def test_spec_must_be_an_object() -> None:
    assert problems(None)[0] == "spec: must be an object"


@pytest.mark.parametrize(
    ("template", "expected"),
    [
        ("derp.example.com", "must contain one of {ordinal}, {index}, {letter}"),
        ("derp{n}.example.com", "unknown placeholder(s) {n}"),
        ("-derp{index}.example.com", "is not a lowercase DNS name"),
        ("Derp{index}.example.com", "does not match"),
        ("derp{index}..example.com", "is not a lowercase DNS name"),
        ("derp{index}-.example.com", "is not a lowercase DNS name"),
        ("a" * 250 + "{index}", "must be at most 253 characters"),
    ],
)
def test_bad_hostname_templates(template: str, expected: str) -> None:
    found = problems({"regionID": 900, "regionCode": "fra", "hostnameTemplate": template})
    assert any(expected in p for p in found), found


def test_hostname_placeholders() -> None:
    template = "derp{index}-{letter}-{ordinal}.example.com"
    assert render_hostname(template, 0) == "derp1-a-0.example.com"
    assert render_hostname(template, 25) == "derp26-z-25.example.com"


def test_node_names_use_a_letter_per_ordinal() -> None:
    assert [node_name(900, i) for i in (0, 1, 25)] == ["900a", "900b", "900z"]
    assert node_letter(2) == "c"
    with pytest.raises(ValueError, match=r"outside 0\.\.25"):
        node_letter(26)


@pytest.mark.parametrize("name", ["fra", "eu-west-1", "a" * 47])
def test_region_names_that_fit(name: str) -> None:
    check_region_name(name)


@pytest.mark.parametrize(
    ("name", "expected"),
    [
        ("a" * 48, "at most 47 characters"),
        ("fra.eu", "must be a DNS label"),
        ("Fra", "must be a DNS label"),
        ("", "must be a DNS label"),
    ],
)
def test_region_names_that_do_not_fit(name: str, expected: str) -> None:
    with pytest.raises(InvalidSpecError, match=expected) as info:
        check_region_name(name)
    assert info.value.problems[0].path == "metadata.name"
