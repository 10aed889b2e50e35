"""Real Headscale and real tailscaled on the DERP map the operator published.

A DerpRegion whose relays admit clients through Headscale's ``/verify`` is
applied and published; then Headscale v0.29.3 (SQLite, embedded DERP off)
takes that map both ways users wire it — ``derp.urls`` at the operator's
``/derpmap.json``, and ``derp.paths`` at the ConfigMap's ``derpmap.yaml`` —
and two tailscaled nodes (userspace networking, ``TS_DEBUG_ALWAYS_USE_DERP``)
join it with a pre-auth key.  Every byte between them crosses our relays:
pings, a TCP stream, ``tailscale debug derp`` and ``tailscale netcheck``.
Admission is Headscale's: a registered node is let in, an unknown key and a
deleted node are not.

The steps build on each other (one Headscale, one pair of nodes), so they
run in file order; each wait is bounded and names what it waited for.
"""

from __future__ import annotations

import asyncio
import contextlib
import hashlib
import json
import os
import re
import socket
import ssl
import subprocess
import sys
import tempfile
import threading
import urllib.request
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
from conftest import (
    NAMESPACE,
    OPERATOR_NAMESPACE,
    Kubectl,
    OperatorProcess,
    condition,
    operators_running,
    region_doc,
    wait_for,
    wait_until,
)
from derpcluster import tailnet_binaries
from derpcluster.tailnet import Headscale, LoopbackWatch, TailnetError, Tailscaled
from derprelay.client import DerpClientError, Endpoint, connect
from derprelay.keys import NodePrivateKey, public_key_text

REGION = "tailnet"
REGION_ID = 970
REGION_CODE = "hs"
NODE_NAMES = ("node-one", "node-two")
STREAM_BYTES = 512 * 1024
STREAM_TIMEOUT = 60.0
pytestmark = pytest.mark.timeout(900)


@pytest.fixture(scope="module")
def workdir() -> Iterator[Path]:
    """Every file of Headscale and the nodes; removed at the end (logs are shown before that)."""
    with tempfile.TemporaryDirectory(prefix="derpfleet-tailnet-") as path:
        yield Path(path)


@pytest.fixture(scope="module")
def binaries() -> tailnet_binaries.TailnetBinaries:
    return tailnet_binaries.ensure()


@pytest.fixture(scope="module")
def operator(cluster: Any, kubectl: Kubectl, workdir: Path) -> Iterator[OperatorProcess]:
    operators = workdir / "operators"
    operators.mkdir()
    with operators_running(cluster, kubectl, operators) as running:
        yield running[0]


@pytest.fixture(scope="module")
def loopback_watch() -> Iterator[LoopbackWatch]:
    watch = LoopbackWatch()
    yield watch
    watch.stop()


@pytest.fixture(scope="module")
def headscale(binaries: tailnet_binaries.TailnetBinaries, workdir: Path) -> Iterator[Headscale]:
    server = Headscale(binaries.headscale, workdir / "headscale")
    try:
        yield server
    finally:
        server.stop()
        if server.process is not None:
            sys.stderr.write(f"--- headscale log (tail) ---\n{server.process.log_tail()}\n")


@pytest.fixture(scope="module")
def published(kubectl: Kubectl, operator: OperatorProcess, headscale: Headscale) -> Iterator[dict[str, Any]]:
    """The region Ready and in the published map, its relays asking Headscale about every client."""
    kubectl(
        "apply",
        "-f",
        "-",
        input=region_doc(
            REGION, regionID=REGION_ID, regionCode=REGION_CODE, verifyClients={"url": headscale.verify_url}
        ),
    )
    try:
        wait_until(
            f"region {REGION} Ready",
            lambda: condition(kubectl.region(REGION), "Ready").get("status") == "True",
        )
        served = wait_for(
            f"region {REGION_ID} with both relays on the operator's /derpmap.json",
            lambda: operator.http("/derpmap.json"),
            lambda answer: (
                answer[0] == 200
                and len(json.loads(answer[1])["Regions"].get(str(REGION_ID), {}).get("Nodes", [])) == 2
            ),
        )
        yield json.loads(served[1])["Regions"][str(REGION_ID)]
    finally:
        kubectl("-n", NAMESPACE, "delete", "derpregion", REGION, "--wait=true", "--timeout=60s", check=False)


@pytest.fixture(scope="module")
def headscale_on_derp_urls(
    headscale: Headscale, operator: OperatorProcess, published: dict[str, Any], loopback_watch: LoopbackWatch
) -> Headscale:
    """Headscale started with ``derp.urls`` = the operator's /derpmap.json, once the region is published."""
    headscale.write_config(derp_urls=[f"http://127.0.0.1:{operator.port}/derpmap.json"])
    headscale.start()
    assert headscale.process is not None
    loopback_watch.watch(headscale.process)
    return headscale


@pytest.fixture(scope="module")
def nodes(
    binaries: tailnet_binaries.TailnetBinaries,
    headscale_on_derp_urls: Headscale,
    workdir: Path,
    loopback_watch: LoopbackWatch,
) -> Iterator[list[Tailscaled]]:
    """Two nodes joined to Headscale with a pre-auth key."""
    headscale = headscale_on_derp_urls
    auth_key = headscale.preauth_key(headscale.create_user("derpfleet"))
    daemons = [
        Tailscaled(binaries.tailscaled, binaries.tailscale, workdir / name, name) for name in NODE_NAMES
    ]
    try:
        for daemon in daemons:
            daemon.start()
            assert daemon.process is not None
            loopback_watch.watch(daemon.process)
            daemon.up(headscale.url, auth_key)
        yield daemons
    finally:
        for daemon in daemons:
            daemon.stop()
        for daemon in daemons:
            if daemon.process is not None:
                sys.stderr.write(f"--- {daemon.process.name} log (tail) ---\n{daemon.process.log_tail()}\n")


def tailnet_ip(node: Tailscaled) -> str:
    return str(next(ip for ip in node.status()["Self"]["TailscaleIPs"] if "." in ip))


def peers_online(node: Tailscaled) -> list[str]:
    return sorted(p["HostName"] for p in (node.status().get("Peer") or {}).values() if p.get("Online"))


def pong_via(node: Tailscaled, ip: str) -> str:
    """The path of one disco ping to ``ip``: ``DERP(<region code>)`` or a direct endpoint."""
    try:
        out = node.cli("ping", "--until-direct=false", "-c", "1", "--timeout", "5s", ip, timeout=30)
    except TailnetError as exc:
        raise ValueError(f"no pong from {ip}: {exc}") from None
    found = re.search(r"^pong from .* via (\S+) in ", out, re.MULTILINE)
    if found is None:
        raise ValueError(f"no pong in {out!r}")
    return found.group(1)


def relay_metric(address: str, name: str) -> float:
    """One counter from a relay's /metrics (served to loopback clients only; the pin is not checked here)."""
    context = ssl.SSLContext(ssl.PROTOCOL_TLS_CLIENT)
    context.check_hostname = False
    context.verify_mode = ssl.CERT_NONE
    with urllib.request.urlopen(f"https://{address}:443/metrics", context=context, timeout=10) as answer:
        text = answer.read().decode()
    found = re.search(rf"^{re.escape(name)} ([0-9.e+-]+)$", text, re.MULTILINE)
    return float(found.group(1)) if found else 0.0


def relayed_bytes(region: dict[str, Any]) -> float:
    return sum(relay_metric(n["IPv4"], "derp_bytes_sent_total") for n in region["Nodes"])


def test_both_nodes_join_headscale_on_the_operators_derpmap_json(
    headscale: Headscale, nodes: list[Tailscaled], published: dict[str, Any]
) -> None:
    for node, other in zip(nodes, reversed(nodes), strict=True):
        wait_until(
            f"{node.name} to see {other.name} online",
            lambda node=node, other=other: peers_online(node) == [other.name],
        )
    registered = wait_for(
        "both nodes online in Headscale",
        headscale.nodes,
        lambda listed: sorted(n["given_name"] for n in listed if n.get("online")) == sorted(NODE_NAMES),
    )
    assert all(n["ip_addresses"][0].startswith("100.") for n in registered), registered
    # What the nodes got from Headscale is exactly the region the operator published.
    node_map = json.loads(nodes[0].cli("debug", "derp-map"))
    assert list(node_map["Regions"]) == [str(REGION_ID)]
    region = node_map["Regions"][str(REGION_ID)]
    # Headscale shuffles each region's nodes, so their order is its own.
    assert region["RegionCode"] == REGION_CODE
    assert sorted((n["Name"], n["HostName"], n["CertName"]) for n in region["Nodes"]) == sorted(
        (n["Name"], n["HostName"], n["CertName"]) for n in published["Nodes"]
    )


def test_pings_go_both_ways_through_our_region(nodes: list[Tailscaled]) -> None:
    for node, other in zip(nodes, reversed(nodes), strict=True):
        via = wait_for(
            f"a pong from {other.name} to {node.name}",
            lambda node=node, other=other: pong_via(node, tailnet_ip(other)),
            bool,
        )
        assert via == f"DERP({REGION_CODE})", f"{node.name} -> {other.name} went via {via}, not our relays"


class StreamServer:
    """On 127.0.0.1: reads what a client sends, answers its SHA-256 and a block of its own, then closes.

    A node in userspace networking hands connections to its tailnet IP to
    the host's loopback, so this is what node two serves to the tailnet.
    """

    def __init__(self, answer: bytes) -> None:
        self.answer = answer
        self.listener = socket.create_server(("127.0.0.1", 0))
        self.port = self.listener.getsockname()[1]
        self.received = b""
        self.thread = threading.Thread(target=self._serve, daemon=True)
        self.thread.start()

    def _serve(self) -> None:
        # A timeout or a closed listener ends it; the test then finds what did not arrive.
        self.listener.settimeout(STREAM_TIMEOUT)
        with contextlib.suppress(OSError):
            connection, _ = self.listener.accept()
            with connection:
                connection.settimeout(STREAM_TIMEOUT)
                while len(self.received) < STREAM_BYTES:
                    chunk = connection.recv(65536)
                    if not chunk:
                        return
                    self.received += chunk
                connection.sendall(hashlib.sha256(self.received).digest() + self.answer)

    def close(self) -> None:
        self.listener.close()
        self.thread.join(10)


def test_a_tcp_stream_crosses_the_tailnet_and_our_relays(
    nodes: list[Tailscaled], published: dict[str, Any]
) -> None:
    sent, answer = os.urandom(STREAM_BYTES), os.urandom(STREAM_BYTES)
    server = StreamServer(answer)
    before = relayed_bytes(published)
    received: list[bytes] = []
    nc = nodes[0].cli_process("nc", tailnet_ip(nodes[1]), str(server.port))
    assert nc.stdin is not None and nc.stdout is not None and nc.stderr is not None
    stdin, stdout = nc.stdin, nc.stdout

    def feed() -> None:
        # nc ends as soon as either direction ends, so stdin stays open until the answer is in.
        stdin.write(sent)
        stdin.flush()

    def drain() -> None:
        received.append(stdout.read())

    try:
        threads = [threading.Thread(target=feed, daemon=True), threading.Thread(target=drain, daemon=True)]
        for thread in threads:
            thread.start()
        for thread in threads:
            thread.join(STREAM_TIMEOUT)
    finally:
        nc.kill()
        nc.wait(10)
        server.close()
    assert server.received == sent, f"node two's server got {len(server.received)} of {STREAM_BYTES} bytes"
    assert received and received[0] == hashlib.sha256(sent).digest() + answer, (
        f"node one got {len(received[0]) if received else 0} bytes back; nc said {nc.stderr.read()!r}"
    )
    # Both directions went through the relays (WireGuard adds its overhead on top).
    assert relayed_bytes(published) - before >= 2 * STREAM_BYTES


def test_tailscale_debug_derp_checks_our_region(nodes: list[Tailscaled], published: dict[str, Any]) -> None:
    report = json.loads(nodes[0].cli("debug", "derp", str(REGION_ID), timeout=90))
    hosts = [n["HostName"] for n in published["Nodes"]]
    info = "\n".join(report.get("Info") or [])
    assert f'Region {REGION_ID} == "{REGION_CODE}"' in info
    for host in hosts:
        assert f'Successfully established a DERP connection with node "{host}"' in info, report
        assert f'Node "{host}" returned IPv4 STUN response' in info, report
    # The relays are IPv4-only (the nodes' loopback addresses): the check's IPv6 dial fails, and
    # that is all that may fail.
    unexpected = [e for e in report.get("Errors") or [] if "over IPv6" not in e]
    assert unexpected == [], report


def test_tailscale_netcheck_prefers_our_region(nodes: list[Tailscaled]) -> None:
    report = json.loads(nodes[0].cli("netcheck", "--format=json", timeout=90))
    assert report["UDP"] is True, f"no STUN answer from our relays: {report}"
    assert report["PreferredDERP"] == REGION_ID, report
    assert str(REGION_ID) in report["RegionLatency"], report


def test_headscale_derp_paths_reads_the_configmaps_derpmap_yaml(
    kubectl: Kubectl,
    headscale: Headscale,
    nodes: list[Tailscaled],
    workdir: Path,
    loopback_watch: LoopbackWatch,
) -> None:
    """Headscale restarted on derp.paths alone: it starts only with a non-empty map, and the nodes still relay."""
    data = kubectl.json("-n", OPERATOR_NAMESPACE, "get", "configmap", "derp-map")["data"]
    derp_yaml = workdir / "derpmap.yaml"
    derp_yaml.write_text(data["derpmap.yaml"])
    headscale.stop()
    headscale.write_config(derp_paths=[derp_yaml])
    headscale.start()
    assert headscale.process is not None
    loopback_watch.watch(headscale.process)
    for node, other in zip(nodes, reversed(nodes), strict=True):
        wait_until(
            f"{node.name} to reach {other.name} through DERP({REGION_CODE}) again",
            lambda node=node, other=other: pong_via(node, tailnet_ip(other)) == f"DERP({REGION_CODE})",
        )


def test_camelcase_json_in_derp_paths_loads_as_an_empty_map(
    kubectl: Kubectl, binaries: tailnet_binaries.TailnetBinaries, workdir: Path
) -> None:
    """The same map as JSON, in derp.paths: yaml.v3 finds none of tailcfg's fields, and Headscale refuses it."""
    data = kubectl.json("-n", OPERATOR_NAMESPACE, "get", "configmap", "derp-map")["data"]
    derp_json = workdir / "derpmap.json"
    derp_json.write_text(data["derpmap.json"])
    wrong = Headscale(binaries.headscale, workdir / "headscale-camelcase")
    wrong.write_config(derp_paths=[derp_json])
    process = wrong.launch()
    try:
        process.process.wait(30)
    except subprocess.TimeoutExpired:
        pytest.fail(f"headscale started on a CamelCase derp.paths file:\n{process.log_tail()}")
    finally:
        process.stop()
    assert "initial DERPMap is empty" in process.log_tail(), process.log_tail()


def test_admission_is_headscales(
    headscale: Headscale, nodes: list[Tailscaled], published: dict[str, Any]
) -> None:
    endpoint = Endpoint(
        f"https://{published['Nodes'][0]['IPv4']}:443/derp", cert_name=published["Nodes"][0]["CertName"]
    )
    node_key = NodePrivateKey.from_text(nodes[0].node_private_key())

    async def admitted(key: NodePrivateKey) -> bool:
        try:
            client = await connect(endpoint, key)
        except DerpClientError as exc:
            if "closed" in str(exc):
                return False
            raise
        await client.close()
        return True

    assert asyncio.run(admitted(NodePrivateKey.generate())) is False, "a key Headscale never saw was let in"
    assert asyncio.run(admitted(node_key)) is True, f"{nodes[0].name}, registered in Headscale, was refused"
    (registered,) = [n for n in headscale.nodes() if n["given_name"] == nodes[0].name]
    assert registered["node_key"] == public_key_text(node_key.public), (
        "read the wrong key from the state file"
    )
    headscale.delete_node(int(registered["id"]))
    assert asyncio.run(admitted(node_key)) is False, f"{nodes[0].name} was deleted from Headscale, yet let in"


def test_nothing_reached_past_loopback(
    headscale: Headscale, nodes: list[Tailscaled], loopback_watch: LoopbackWatch
) -> None:
    # Headscale (twice: derp.urls, then derp.paths) and every node were watched all along.
    assert len(loopback_watch.watched) == 2 + len(nodes)
    assert loopback_watch.stop() == {}, "connections past loopback"
