"""``derpfleet render``: the example renders, output is stable given the secrets, bad input is named."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path
from typing import Any

import pytest
import yaml
from derpoperator.cli import main
from derpoperator.credentials import generate_mesh_key, generate_region_certificate
from derpoperator.model import RegionRef
from fleetfixtures import EXAMPLES, spec_of

FRA = EXAMPLES / "region-fra.yaml"
MINIMAL = EXAMPLES / "region-minimal.yaml"


def render(capsys: pytest.CaptureFixture[str], *argv: str) -> tuple[int, list[dict[str, Any]], str]:
    code = main(["render", *argv])
    out, err = capsys.readouterr()
    return code, [d for d in yaml.safe_load_all(out) if d is not None], err


@pytest.fixture
def secrets(tmp_path: Path) -> list[str]:
    """Fixed mesh key and certificate files, so renders are reproducible."""
    ref = RegionRef("fra", "derp", "")
    material = generate_region_certificate(ref, spec_of(hostnameTemplate="derp{index}-fra.example.com"))
    (tmp_path / "mesh.key").write_text(generate_mesh_key() + "\n")
    (tmp_path / "tls.crt").write_bytes(material.cert_pem)
    (tmp_path / "tls.key").write_bytes(material.key_pem)
    return [
        f"--mesh-key-file={tmp_path / 'mesh.key'}",
        f"--tls-cert-file={tmp_path / 'tls.crt'}",
        f"--tls-key-file={tmp_path / 'tls.key'}",
    ]


def test_render_the_example(capsys: pytest.CaptureFixture[str]) -> None:
    code, docs, err = render(capsys, "-f", str(FRA))
    assert code == 0
    assert [(d["kind"], d["metadata"]["name"]) for d in docs] == [
        ("Secret", "derp-fra-mesh"),
        ("ConfigMap", "derp-fra-peers"),
        ("Secret", "derp-fra-tls"),
        ("Service", "derp-fra-mesh"),
        ("StatefulSet", "derp-fra"),
        ("PodDisruptionBudget", "derp-fra"),
    ]
    assert all(d["metadata"]["namespace"] == "derp" for d in docs)
    assert "generated a new mesh key" in err and "generated a new self-signed certificate" in err


def test_render_is_reproducible_given_the_secrets(
    capsys: pytest.CaptureFixture[str], secrets: list[str]
) -> None:
    first = render(capsys, "-f", str(FRA), *secrets, "--node-address", "900a=203.0.113.7")
    second = render(capsys, "-f", str(FRA), *secrets, "--node-address", "900a=203.0.113.7")
    assert first == second
    assert first[2] == ""


def test_render_a_derp_map(capsys: pytest.CaptureFixture[str], secrets: list[str]) -> None:
    code, docs, _ = render(
        capsys,
        "-f",
        str(FRA),
        *secrets,
        "--node-address",
        "900a=203.0.113.7",
        "--node-address",
        "900a=2001:db8::7",
        "--node-address",
        "900b=203.0.113.8",
    )
    assert code == 0
    configmap = docs[-1]
    assert (configmap["kind"], configmap["metadata"]["name"], configmap["metadata"]["namespace"]) == (
        "ConfigMap",
        "derp-map",
        "derp",
    )
    derp_map = json.loads(configmap["data"]["derpmap.json"])
    nodes = derp_map["Regions"]["900"]["Nodes"]
    assert [(n["Name"], n["HostName"], n.get("IPv4"), n.get("IPv6")) for n in nodes] == [
        ("900a", "derp1-fra.example.com", "203.0.113.7", "2001:db8::7"),
        ("900b", "derp2-fra.example.com", "203.0.113.8", None),
    ]
    assert nodes[0]["CertName"].startswith("sha256-raw:")
    assert (
        yaml.safe_load(configmap["data"]["derpmap.yaml"])["regions"][900]["nodes"][1]["ipv4"] == "203.0.113.8"
    )


def test_nodes_without_any_address_stay_out_of_the_map(capsys: pytest.CaptureFixture[str]) -> None:
    code, docs, _ = render(capsys, "-f", str(MINIMAL), "--derp-map", "--node-address", "901b=10.0.0.9")
    assert code == 0
    assert docs[0]["metadata"]["namespace"] == "default"
    nodes = json.loads(docs[-1]["data"]["derpmap.json"])["Regions"]["901"]["Nodes"]
    assert [n["Name"] for n in nodes] == ["901b"]


def test_namespace_flag_fills_in_a_missing_namespace(capsys: pytest.CaptureFixture[str]) -> None:
    code, docs, _ = render(capsys, "-f", str(MINIMAL), "-n", "edge", "--cluster-domain", "k8s.example")
    assert code == 0
    assert {d["metadata"]["namespace"] for d in docs} == {"edge"}
    statefulset = next(d for d in docs if d["kind"] == "StatefulSet")
    args = statefulset["spec"]["template"]["spec"]["containers"][0]["args"]
    assert "$(POD_NAME).derp-lab-mesh.edge.svc.k8s.example" in args


def test_relays_serve_debug_pages_to_the_allowed_networks(capsys: pytest.CaptureFixture[str]) -> None:
    code, docs, _ = render(capsys, "-f", str(MINIMAL), "--relay-debug-allow", "10.244.0.0/16, fd00:10::/56")
    assert code == 0
    statefulset = next(d for d in docs if d["kind"] == "StatefulSet")
    args = statefulset["spec"]["template"]["spec"]["containers"][0]["args"]
    assert args[-2:] == ["--debug-allow", "10.244.0.0/16,fd00:10::/56"]
    code, docs, _ = render(capsys, "-f", str(MINIMAL))
    statefulset = next(d for d in docs if d["kind"] == "StatefulSet")
    assert "--debug-allow" not in statefulset["spec"]["template"]["spec"]["containers"][0]["args"]


def write(tmp_path: Path, text: str, name: str = "region.yaml") -> str:
    path = tmp_path / name
    path.write_text(text)
    return str(path)


REGION = "apiVersion: derpfleet.io/v1alpha1\nkind: DerpRegion\nmetadata: {{name: {name}}}\nspec: {spec}\n"


@pytest.mark.parametrize(
    ("text", "argv", "expected"),
    [
        ("", [], "no DerpRegion in"),
        ("[unclosed", [], "not YAML"),
        ("- a list", [], "expected a DerpRegion object"),
        (
            "apiVersion: v1\nkind: ConfigMap\n",
            [],
            "apiVersion 'v1', kind 'ConfigMap': expected derpfleet.io/v1alpha1",
        ),
        (
            REGION.format(name="fra", spec="{regionID: 0, regionCode: FRA}"),
            [],
            "spec.regionID: must be between 1 and 999",
        ),
        (
            REGION.format(name="fra", spec="{regionID: 0, regionCode: FRA}"),
            [],
            "spec.regionCode: 'FRA' does not match",
        ),
        (
            REGION.format(name="Fra", spec="{regionID: 900, regionCode: fra}"),
            [],
            "metadata.name: 'Fra' must be a DNS label",
        ),
        (
            REGION.format(name="fra", spec="{regionID: 900, regionCode: fra}").replace(
                "fra}", "fra, namespace: a}", 1
            ),
            ["-n", "b"],
            "metadata.namespace 'a' differs from --namespace 'b'",
        ),
        (
            REGION.format(name="fra", spec="{regionID: 900, regionCode: fra}"),
            ["--node-address", "900a"],
            "expected NODE=IP",
        ),
        (
            REGION.format(name="fra", spec="{regionID: 900, regionCode: fra}"),
            ["--node-address", "900c=10.0.0.1"],
            "unknown nodes 900c; known: 900a, 900b",
        ),
        (
            REGION.format(name="fra", spec="{regionID: 900, regionCode: fra}")
            + "---\n"
            + REGION.format(name="ber", spec="{regionID: 900, regionCode: ber}"),
            [],
            "default/fra: regionID 900 is already used by DerpRegion default/ber",
        ),
        (
            REGION.format(name="fra", spec="{regionID: 900, regionCode: fra}")
            + "---\n"
            + REGION.format(name="ber", spec="{regionID: 901, regionCode: ber}"),
            ["--mesh-key-file", "/dev/null"],
            "render one region at a time",
        ),
        (
            REGION.format(name="fra", spec="{regionID: 900, regionCode: fra}"),
            ["--mesh-key-file", "/nonexistent"],
            "No such file",
        ),
        (
            REGION.format(name="fra", spec="{regionID: 900, regionCode: fra}"),
            ["--mesh-key-file", "/dev/null"],
            "64 hexadecimal",
        ),
        (
            REGION.format(name="fra", spec="{regionID: 900, regionCode: fra}"),
            ["--tls-cert-file", "/dev/null"],
            "go together",
        ),
        (
            REGION.format(name="fra", spec="{regionID: 900, regionCode: fra}"),
            ["--tls-cert-file", "/dev/null", "--tls-key-file", "/dev/null"],
            "not a PEM certificate",
        ),
        (
            REGION.format(name="fra", spec="{regionID: 900, regionCode: fra}"),
            ["--relay-debug-allow", "pods"],
            "--relay-debug-allow: 'pods' is not an IP address or CIDR",
        ),
    ],
)
def test_bad_input_is_named(
    capsys: pytest.CaptureFixture[str], tmp_path: Path, text: str, argv: list[str], expected: str
) -> None:
    assert main(["render", "-f", write(tmp_path, text), *argv]) == 2
    out, err = capsys.readouterr()
    assert out == ""
    assert err.startswith("derpfleet: ")
    assert expected in err, err


def test_missing_file(capsys: pytest.CaptureFixture[str], tmp_path: Path) -> None:
    assert main(["render", "-f", str(tmp_path / "absent.yaml")]) == 2
    assert "absent.yaml: No such file or directory" in capsys.readouterr().err


def test_every_problem_of_every_file_is_listed(capsys: pytest.CaptureFixture[str], tmp_path: Path) -> None:
    one = write(tmp_path, REGION.format(name="a", spec="{regionID: 900}"), "a.yaml")
    two = write(tmp_path, REGION.format(name="b", spec="{regionCode: b, replicas: 99}"), "b.yaml")
    assert main(["render", "-f", one, "-f", two]) == 2
    lines = capsys.readouterr().err.splitlines()
    assert lines == [
        f"derpfleet: {one}: spec.regionCode: required",
        f"derpfleet: {two}: spec.regionID: required",
        f"derpfleet: {two}: spec.replicas: must be between 1 and 26, got 99",
    ]


def test_the_command_runs_as_a_program() -> None:
    done = subprocess.run(
        [sys.executable, "-m", "derpoperator.cli", "render", "-f", str(MINIMAL)],
        capture_output=True,
        text=True,
        check=True,
        timeout=60,
    )
    assert [d["kind"] for d in yaml.safe_load_all(done.stdout)][-1] == "PodDisruptionBudget"
