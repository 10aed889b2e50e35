"""/debug/, /debug/varz and the JSON log format: pure parts with values, the rest on real relays."""

from __future__ import annotations

import asyncio
import json
import re
import subprocess
import sys
from collections import Counter
from collections.abc import Callable
from pathlib import Path

import pytest
from derprelay import SPEEDUPS, metrics, profiling
from derprelay import frames as f
from derprelay.client import DerpClient
from derprelay.debug import DebugAccess, DebugConfigError, describe_views, render_index, traffic_round
from derprelay.keys import NodePrivateKey, public_key_text
from derprelay.mesh import MeshViews
from derprelay.server import ConnectionTraffic
from relayharness import RelayProcess, fetch, free_port, metric, new_client, start_pair, start_relay
from test_mesh import deliver

# --- access, as derper's tsweb.AllowDebugAccess --------------------------------------


@pytest.mark.parametrize(
    ("peer", "allowed"),
    [
        ("127.0.0.1", True),
        ("127.8.9.10", True),
        ("::1", True),
        ("::ffff:127.0.0.1", True),
        ("100.64.0.1", True),
        ("100.127.255.254", True),
        ("fd7a:115c:a1e0::1", True),
        ("100.128.0.1", False),
        ("10.1.2.3", False),
        ("fd7a:115c:a1e1::1", False),
        ("", False),
    ],
)
def test_debug_access_is_loopback_and_tailscale_addresses(peer: str, allowed: bool) -> None:
    assert DebugAccess().allows(peer, {}) is allowed


def test_debug_allow_list_and_derpers_environment() -> None:
    access = DebugAccess.from_settings(
        "10.244.0.0/16",
        {"TS_ALLOW_DEBUG_IP": "192.0.2.7", "TS_DEBUG_TRUSTED_CIDRS": "2001:db8::/32, 198.51.100.0/24"},
    )
    for peer in ("10.244.3.4", "192.0.2.7", "2001:db8::5", "198.51.100.9", "::ffff:10.244.0.1"):
        assert access.allows(peer, {}), peer
    for peer in ("10.245.0.1", "192.0.2.8", "203.0.113.1"):
        assert not access.allows(peer, {}), peer
    # derper refuses any request that came through a proxy, whatever the proxy's address.
    assert not access.allows("127.0.0.1", {"x-forwarded-for": "127.0.0.1"})
    with pytest.raises(DebugConfigError, match="'pods' is not an IP address or CIDR"):
        DebugAccess.from_settings("pods", {})


# --- expositions, without a relay ------------------------------------------------------


def test_varz_text_is_derpers_format_and_vars_is_json() -> None:
    stats = metrics.RelayStats()
    stats.drop(metrics.DropReason.UNKNOWN_DEST, metrics.DISCO_MAGIC + bytes(56))
    stats.drop(metrics.DropReason.QUEUE_HEAD, b"wireguard")
    gauges = metrics.Gauges(3, 1, 0, 2, 1, 2, 0, 4, 1)
    mesh = [metrics.MeshPeerState('b"1', True, 4)]
    families = metrics.relay_families(stats, gauges, mesh, metrics.Identity("9.9"))
    text = metrics.render_varz_families(families).decode()
    assert "# TYPE derp_packets_dropped counter\n" in text
    assert 'derp_packets_dropped{reason="unknown_dest",kind="disco"} 1\n' in text
    assert 'derp_bytes_dropped{reason="queue_head",kind="other"} 9\n' in text
    assert "# TYPE derp_current_connections gauge\nderp_current_connections 3\n" in text
    assert "derp_clients_total 6\n" in text  # 2 local + 4 only through the mesh
    assert 'derp_mesh_peer_up{peer="b\\"1"} 1\n' in text  # label values escaped
    assert "\nderp_accepts 0\n" in text and "derp_accepts_total" not in text  # derper's counter names
    doc = json.loads(metrics.vars_json(families))
    assert doc["derp_packets_dropped"]["reason=unknown_dest,kind=disco"] == 1
    assert doc["version"] == {"version=9.9,binary=derp-relay": 1}


def test_queue_time_is_derpers_per_packet_moving_average() -> None:
    stats = metrics.RelayStats()
    average = 0.0
    for waited_ms, packets in ((10.0, 2), (0.0, 3), (30.0, 1), (0.0, 5)):
        stats.packets_sent += packets
        if waited_ms:
            stats.note_queue_time(waited_ms / 1000, packets)
        for _ in range(packets):  # derper: one step of the average per packet written
            average = 0.1 * waited_ms + 0.9 * average
        assert stats.average_queue_ms == pytest.approx(average)


def test_index_traffic_rounds_and_mesh_views() -> None:
    page = render_index("t", [("TLS hostname", "<h>")], [("/debug/vars", "Metrics")]).decode()
    assert "<li><b>TLS hostname:</b> &lt;h&gt;</li>" in page and '<a href="/debug/vars">' in page

    key = NodePrivateKey.generate().public
    first, seen = traffic_round({}, [ConnectionTraffic("1.2.3.4:5", key, 10, 20, 1)])
    assert [json.loads(line) for line in first] == [
        {"Remote": "1.2.3.4:5", "Key": public_key_text(key), "Sent": 10, "Recv": 20, "UniqueSenders": 1}
    ]
    quiet, seen = traffic_round(seen, [ConnectionTraffic("1.2.3.4:5", key, 10, 20, 1)])
    assert quiet == []
    moved, _ = traffic_round(seen, [ConnectionTraffic("1.2.3.4:5", key, 11, 20, 1)])
    assert len(moved) == 1

    a, b, c = (NodePrivateKey.generate().public for _ in range(3))
    assert describe_views(MeshViews("peer", frozenset({a, b}), frozenset({a, b}))) == []
    problems = describe_views(MeshViews("peer", learned=frozenset({a, b}), reported=frozenset({a, c})))
    assert [p.split(":")[1].strip() for p in problems] == [
        "1 of its clients unknown to our link (e.g. nodekey",
        "our link still routes 1 clients it no longer has (e.g. nodekey",
    ]


def test_tcp_rtt_buckets_and_tcp_info() -> None:
    assert [metrics.tcp_rtt_label(s) for s in (0.0004, 0.010, 0.0101, 0.3, 0.5, 2.0)] == [
        "10ms",
        "10ms",
        "20ms",
        "500ms",
        "500ms",
        "inf",
    ]
    info = bytearray(104)
    info[68:72] = (123_456).to_bytes(4, sys.byteorder)
    assert metrics.tcp_info_rtt(bytes(info)) == pytest.approx(0.123456)
    with pytest.raises(ValueError, match="no tcpi_rtt"):
        metrics.tcp_info_rtt(bytes(40))


def test_ip_octets_from_netstat() -> None:
    netstat = "TcpExt: A B\nTcpExt: 1 2\nIpExt: InNoRoutes InOctets OutOctets\nIpExt: 0 1234 5678\n"
    assert metrics.parse_ip_octets(netstat) == (1234, 5678)
    with pytest.raises(ValueError, match="no IpExt"):
        metrics.parse_ip_octets("TcpExt: A\nTcpExt: 1\n")


def test_collapsed_stacks() -> None:
    samples: Counter[tuple[str, ...]] = Counter({("main", "loop", "relay;route"): 3, ("main",): 1})
    assert profiling.collapse(samples) == "main;loop;relay;route 3\nmain 1\n"

    def inner() -> tuple[str, ...]:
        import sys  # noqa: PLC0415 - the frame of this very call is what is read

        return profiling.stack_of(sys._getframe())

    stack = inner()
    assert stack[-1].startswith("test_collapsed_stacks.<locals>.inner (") and ";" not in "".join(stack)


# --- on real relays --------------------------------------------------------------------


@pytest.fixture
def relay(relay_factory: Callable[..., RelayProcess]) -> RelayProcess:
    """One process: with workers, the pages other than the metrics are the answering worker's."""
    return relay_factory("--workers", "1")


async def test_debug_pages_on_a_relay(relay: RelayProcess) -> None:
    client, key = await new_client(relay)
    try:
        await client.send(key.public, b"to myself")
        await asyncio.wait_for(client.recv_packet(), 10)
        status, _, body = fetch(relay, "/debug/")
        page = body.decode()
        assert status == 200 and "<h1>derp-relay debug</h1>" in page
        for fact in (
            "Uptime:",
            "Version:</b> derp-relay",
            "TLS hostname:</b> 127.0.0.1",
            "Mesh key:</b> false",
            f"Per-packet path:</b> {SPEEDUPS.describe()}",  # the relay runs in this test's environment
        ):
            assert fact in page
        for link in ("/debug/vars", "/debug/varz", "/debug/pprof/profile", "/debug/check", "/debug/traffic"):
            assert f'href="{link}' in page

        status, _, body = fetch(relay, "/debug/vars")
        assert status == 200 and json.loads(body)["derp_packets_sent"] == 1
        assert json.loads(body)["derp_tcp_rtt"] == {"le=10ms": 1}  # loopback, sampled at connect
        assert metric(relay, "derp_packets_sent", path="/debug/varz") == 1
        assert metric(relay, "derp_packets_sent_total") == 1  # /metrics keeps prometheus-client's names
        assert metric(relay, "process_open_fds", path="/debug/varz") > 0
        assert json.loads(body)["derp_relay_speedups_info"] == {f"path={SPEEDUPS.path}": 1}
        assert metric(relay, "derp_relay_speedups_info", f'path="{SPEEDUPS.path}"') == 1
        assert f"per-packet path: {SPEEDUPS.describe()}" in relay.log()

        status, _, body = fetch(relay, "/debug/pprof/goroutine")
        assert status == 200 and re.search(r"^\d+ asyncio tasks$", body.decode(), re.MULTILINE)
        assert "thread 'MainThread'" in body.decode()
        status, _, body = fetch(relay, "/debug/gc")
        assert status == 200 and body.startswith(b"running GC...\nDone: ")
        assert b"tracemalloc started now" in fetch(relay, "/debug/pprof/heap")[2]
        heap = fetch(relay, "/debug/pprof/heap")[2].decode()
        assert "top 30 allocation sites" in heap and "objects tracked by the garbage collector" in heap
        assert b"tracemalloc stopped" in fetch(relay, "/debug/pprof/heap?stop=1")[2]

        status, _, body = fetch(relay, "/debug/check")
        assert (status, body) == (200, b"derp-relay consistency check okay (0 mesh peers compared)\n")
        status, _, body = fetch(relay, "/debug/traffic?seconds=1")
        lines = [json.loads(line) for line in body.decode().splitlines() if line]
        [mine] = [line for line in lines if line["Key"] == public_key_text(key.public)]
        # Sent: packet bytes written to it; Recv: DERP bytes read, its ClientInfo and the 46-byte SendPacket.
        assert status == 200 and mine["Sent"] == 9 and mine["Recv"] > 46
        assert fetch(relay, "/debug/nope")[0] == 404
    finally:
        await client.close()


async def test_cpu_profile_samples_a_busy_relay(relay: RelayProcess) -> None:
    client, key = await new_client(relay)

    async def keep_busy() -> None:
        while True:
            for _ in range(50):
                await client.send(key.public, bytes(1000))
            await asyncio.sleep(0)

    busy = asyncio.create_task(keep_busy())
    drain = asyncio.create_task(_drain(client))
    try:
        status, _, body = await asyncio.to_thread(fetch, relay, "/debug/pprof/profile?seconds=2", None, 20)
        concurrent = await asyncio.gather(
            asyncio.to_thread(fetch, relay, "/debug/pprof/profile?seconds=1", None, 20),
            asyncio.to_thread(fetch, relay, "/debug/pprof/profile?seconds=1", None, 20),
        )
    finally:
        busy.cancel()
        drain.cancel()
        await client.close()
    assert status == 200
    lines = body.decode().splitlines()
    assert lines and all(re.fullmatch(r".+ \d+", line) for line in lines)
    # The Python frames of the relay's code: with the compiled modules, those of http.py that call them.
    assert any("derprelay/http.py" in line for line in lines)
    assert sorted(answer[0] for answer in concurrent) == [200, 409]  # one SIGPROF timer per process


async def _drain(client: DerpClient) -> None:
    while True:
        await client.recv()


def test_debug_refused_through_a_proxy_and_counted(relay: RelayProcess) -> None:
    status, _, body = fetch(relay, "/debug/varz", {"X-Forwarded-For": "203.0.113.9"})
    assert (status, body) == (403, b"debug access denied\n")
    assert fetch(relay, "/metrics", {"X-Forwarded-For": "203.0.113.9"})[0] == 403
    assert metric(relay, "derp_http_requests", 'route="debug_denied"', path="/debug/varz") == 2
    assert "debug access denied" in relay.log()


NETNS_ADDRESS = "192.0.2.1"
"""A documentation address (TEST-NET-1), given to loopback inside the test's own network namespace."""

IN_NETNS = (
    "unshare",
    "--net",
    "sh",
    "-c",
    f'ip link set lo up && ip addr add {NETNS_ADDRESS}/32 dev lo && exec "$@"',
    "sh",
)
"""Runs the relay in a new network namespace where it can be reached from a non-loopback address."""

_GET_STATUS = """
import ssl, sys, urllib.error, urllib.request
try:
    answer = urllib.request.urlopen(sys.argv[1], context=ssl._create_unverified_context(), timeout=10)
    print(answer.status)
except urllib.error.HTTPError as exc:
    print(exc.code)
"""


def status_in_netns(relay: RelayProcess, host: str, path: str) -> int:
    """GET from inside the relay's namespace; the kernel sends from ``host`` itself."""
    url = f"https://{host}:{relay.status['derpPort']}{path}"
    answer = subprocess.run(
        ["nsenter", f"--net=/proc/{relay.process.pid}/ns/net", sys.executable, "-c", _GET_STATUS, url],
        capture_output=True,
        text=True,
        timeout=30,
        check=True,
    )
    return int(answer.stdout)


def test_debug_pages_refuse_other_addresses_unless_allowed(tmp_path: Path) -> None:
    refusing = start_relay(
        tmp_path / "refusing", "-a", "0.0.0.0:0", "--debug-allow", "198.51.100.0/24", wrapper=IN_NETNS
    )
    try:
        assert status_in_netns(refusing, NETNS_ADDRESS, "/debug/varz") == 403
        assert status_in_netns(refusing, NETNS_ADDRESS, "/metrics") == 403
        assert status_in_netns(refusing, NETNS_ADDRESS, "/derp/probe") == 200  # the rest is public
        assert status_in_netns(refusing, "127.0.0.1", "/debug/") == 200
    finally:
        refusing.stop()
    assert f"{NETNS_ADDRESS}:" in refusing.log() and "debug access denied to /metrics" in refusing.log()
    allowing = start_relay(
        tmp_path / "allowing", "-a", "0.0.0.0:0", "--debug-allow", "192.0.2.0/24", wrapper=IN_NETNS
    )
    try:
        assert status_in_netns(allowing, NETNS_ADDRESS, "/debug/varz") == 200
    finally:
        allowing.stop()


def test_bad_debug_allow_list_is_refused_at_start(relay_factory: Callable[..., RelayProcess]) -> None:
    with pytest.raises(RuntimeError, match=r"--debug-allow .*'10\.0\.0\.0/33' is not an IP address"):
        relay_factory("--debug-allow", "10.0.0.0/33")


async def test_drops_are_counted_by_reason_and_kind(relay: RelayProcess) -> None:
    client, _ = await new_client(relay)
    try:
        nobody = NodePrivateKey.generate().public
        await client.send(nobody, metrics.DISCO_MAGIC + bytes(56))
        await client.send(nobody, b"wireguard")
        await client.ping(b"12345678")  # answered after the two sends are routed
        while not isinstance(await asyncio.wait_for(client.recv(), 10), f.Pong):
            pass
    finally:
        await client.close()
    varz = "/debug/varz"
    assert metric(relay, "derp_packets_dropped", 'reason="unknown_dest",kind="disco"', path=varz) == 1
    assert metric(relay, "derp_packets_dropped", 'reason="unknown_dest",kind="other"', path=varz) == 1
    assert metric(relay, "derp_bytes_dropped", 'reason="unknown_dest",kind="other"', path=varz) == 9
    assert metric(relay, "derp_packets_received_kind", 'kind="disco"', path=varz) == 1
    assert metric(relay, "derp_peer_gone_not_here_frames", path=varz) == 1


async def test_check_compares_each_mesh_peer(
    relay_factory: Callable[..., RelayProcess], tmp_path: Path, mesh_key_file: Path
) -> None:
    relay_a, relay_b = start_pair(relay_factory, tmp_path, mesh_key_file, (free_port(), free_port()))
    client_1, _ = await new_client(relay_a)
    client_2, key_2 = await new_client(relay_b)
    try:
        await deliver(client_1, client_2, key_2.public, b"meshed")
        for relay in (relay_a, relay_b):
            status, _, body = fetch(relay, "/debug/check")
            assert (status, body) == (200, b"derp-relay consistency check okay (1 mesh peers compared)\n")
            page = fetch(relay, "/debug/")[2].decode()
            assert re.search(r"Mesh peer 127\.0\.0\.1:\d+:</b> up, \d+ clients learned", page)
            assert (
                metric(
                    relay,
                    "derp_mesh_peer_up",
                    f'peer="127.0.0.1:{_other(relay, relay_a, relay_b)}"',
                    path="/debug/varz",
                )
                == 1
            )
        relay_b.stop()
        status, _, body = fetch(relay_a, "/debug/check")
        assert status == 500 and b"cannot list its clients" in body
    finally:
        await client_1.close()
        await client_2.close()


def _other(relay: RelayProcess, a: RelayProcess, b: RelayProcess) -> int:
    return int((b if relay is a else a).status["derpPort"])


async def test_json_logs_say_why_each_connection_closed(relay_factory: Callable[..., RelayProcess]) -> None:
    relay = relay_factory("--log-format", "json")
    client, _ = await new_client(relay)
    await client.send_raw(b"\x04\x00\x00\x00\x01x")  # a SendPacket too short for its key
    with pytest.raises(Exception):  # noqa: B017 - any read error: the relay hung up
        await asyncio.wait_for(client.recv(), 10)
    await client.close()
    relay.stop()
    entries = [json.loads(line) for line in relay.log().splitlines()]
    assert entries and all(set(e) >= {"time", "level", "logger", "message"} for e in entries)
    closed = [e for e in entries if ": closed: protocol_error" in e["message"]]
    assert closed and closed[0]["level"] == "warning" and closed[0]["time"].endswith("+00:00")
