"""The operator's HTTP endpoint on a real loopback socket, and its command-line settings."""

from __future__ import annotations

import asyncio
import json
import socket
import urllib.error
import urllib.request

import pytest
from derpoperator.cli import build_parser, main, run_config
from derpoperator.derp_map_yaml import headscale_yaml
from derpoperator.metrics import OperatorMetrics
from derpoperator.web import Published, build_app, start_server


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def fetch(url: str) -> tuple[int, str, str]:
    try:
        with urllib.request.urlopen(url, timeout=5) as response:
            return response.status, response.headers["Content-Type"], response.read().decode()
    except urllib.error.HTTPError as exc:
        return exc.code, exc.headers["Content-Type"], exc.read().decode()


async def test_map_health_and_metrics_are_served() -> None:
    published = Published()
    metrics = OperatorMetrics()
    metrics.reconciles.labels("ok").inc()
    port = free_port()
    runner = await start_server(build_app(published, metrics.registry), "127.0.0.1", port)
    base = f"http://127.0.0.1:{port}"
    try:
        for path in ("/derpmap.json", "/derpmap.yaml"):
            status, _, body = await asyncio.to_thread(fetch, f"{base}{path}")
            assert (status, body) == (503, "no DERP map published yet; the operator is starting\n")
        published.derp_map_json = json.dumps({"Regions": {}, "omitDefaultRegions": True})
        status, kind, body = await asyncio.to_thread(fetch, f"{base}/derpmap.json")
        assert (status, kind, json.loads(body)) == (
            200,
            "application/json; charset=utf-8",
            {"Regions": {}, "omitDefaultRegions": True},
        )
        status, kind, body = await asyncio.to_thread(fetch, f"{base}/derpmap.yaml")
        assert (status, kind, body) == (
            200,
            "application/yaml; charset=utf-8",
            headscale_yaml(published.derp_map_json),
        )
        published.role = "leading"
        assert await asyncio.to_thread(fetch, f"{base}/healthz") == (
            200,
            "text/plain; charset=utf-8",
            "ok: leading\n",
        )
        status, _, body = await asyncio.to_thread(fetch, f"{base}/metrics")
        assert status == 200
        assert 'derpfleet_reconciles_total{result="ok"} 1.0' in body
    finally:
        await runner.cleanup()


def test_operator_flags_make_its_settings() -> None:
    args = build_parser().parse_args(
        [
            "operator",
            "-n",
            "derp",
            "-n",
            "edge",
            "--listen",
            "127.0.0.1:9",
            "--probe-interval",
            "3",
            "--no-leader-elect",
            "--relay-debug-allow",
            "10.244.0.0/16 10.96.0.0/12",
        ]
    )
    config = run_config(args)
    assert config.operator.relay_debug_allow == "10.244.0.0/16,10.96.0.0/12"
    assert config.operator.namespaces == ("derp", "edge")
    assert (config.listen_host, config.listen_port, config.leader_election) == ("127.0.0.1", 9, False)
    assert config.operator.probe_interval == 3.0
    assert run_config(build_parser().parse_args(["operator", "--listen", "[::1]:80"])).listen_host == "::1"


@pytest.mark.parametrize(
    ("flags", "message"),
    [
        (["--listen", "8080"], "--listen '8080': expected host:port"),
        (["--listen", "host:99999"], "--listen 'host:99999': expected host:port"),
        (["--probe-interval", "0"], "--probe-interval must be positive, not 0.0"),
        (["--relay-debug-allow", "everyone"], "--relay-debug-allow: 'everyone' is not an IP address or CIDR"),
    ],
)
def test_bad_operator_flags_are_named(
    capsys: pytest.CaptureFixture[str], flags: list[str], message: str
) -> None:
    assert main(["operator", *flags]) == 2
    assert message in capsys.readouterr().err
