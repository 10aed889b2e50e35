"""Summing worker expositions: series by series, whatever the metric names."""

from __future__ import annotations

import json

import pytest
from derprelay import certreload, certs
from derprelay.metrics import Gauges, Identity, RelayMetrics, RelayStats, relay_families
from derprelay.metricsum import sum_expositions, sum_vars
from prometheus_client.parser import text_string_to_metric_families

IDENTITY = Identity("test")


def exposition(stats: RelayStats, connections: int, name: str) -> bytes:
    gauges = Gauges(connections, 0, 0, connections, 0, 0, 0, 0, 0)
    return RelayMetrics(lambda: relay_families(stats, gauges, [], IDENTITY)).exposition(name)


def samples(text: bytes) -> dict[tuple[str, tuple[tuple[str, str], ...]], float]:
    return {
        (s.name, tuple(sorted(s.labels.items()))): s.value
        for family in text_string_to_metric_families(text.decode())
        for s in family.samples
    }


@pytest.mark.parametrize(
    ("name", "sent_line"), [("metrics", "derp_packets_sent_total 7"), ("varz", "derp_packets_sent 7")]
)
def test_counters_gauges_and_labelled_series_add_up(name: str, sent_line: str) -> None:
    one, two = RelayStats(), RelayStats()
    one.packets_sent, two.packets_sent = 3, 4
    one.drop("queue_head", b"x" * 100)
    two.drop("queue_head", b"x" * 10)
    two.drop("unknown_dest", b"x" * 5)
    text = sum_expositions([exposition(one, 2, name), exposition(two, 5, name)])
    assert sent_line in text.decode().splitlines()  # the exposition's own names, summed
    summed = samples(text)  # (the parser names every counter sample x_total)
    queue_head = (("kind", "other"), ("reason", "queue_head"))
    assert summed[("derp_packets_sent_total", ())] == 7
    assert summed[("derp_packets_dropped_total", queue_head)] == 2
    assert summed[("derp_bytes_dropped_total", queue_head)] == 110
    assert summed[("derp_packets_dropped_total", (("kind", "other"), ("reason", "unknown_dest")))] == 1
    assert summed[("derp_current_connections", ())] == 7


@pytest.mark.parametrize("name", ["metrics", "varz"])
def test_one_exposition_comes_back_with_the_same_names_types_and_values(name: str) -> None:
    stats = RelayStats()
    stats.accepts = 9
    text = exposition(stats, 1, name)
    again = sum_expositions([text])
    assert samples(again) == samples(text)
    type_lines = {line for line in text.decode().splitlines() if line.startswith("# TYPE")}
    assert {line for line in again.decode().splitlines() if line.startswith("# TYPE")} == type_lines


def test_series_a_sum_would_make_wrong_are_combined_by_their_meaning() -> None:
    worker_0 = (
        b"# TYPE process_start_time_seconds gauge\nprocess_start_time_seconds 100.0\n"
        b'# TYPE version gauge\nversion{version="0.1.0"} 1.0\n'
        b"# TYPE derp_average_queue_duration_ms gauge\nderp_average_queue_duration_ms 2.0\n"
        b'# TYPE derp_mesh_peer_up gauge\nderp_mesh_peer_up{peer="b"} 1.0\n'
        b"# TYPE uptime_sec counter\nuptime_sec 50\n"
    )
    worker_1 = worker_0.replace(b" 100.0", b" 90.0").replace(b"ms 2.0", b"ms 4.0").replace(b" 50", b" 49")
    summed = samples(sum_expositions([worker_0, worker_1]))
    assert summed == {
        ("process_start_time_seconds", ()): 90.0,
        ("version", (("version", "0.1.0"),)): 1.0,
        ("derp_average_queue_duration_ms", ()): 3.0,
        ("derp_mesh_peer_up", (("peer", "b"),)): 1.0,
        ("uptime_sec_total", ()): 50.0,
    }
    varz = json.dumps({"uptime_sec": 50, "version": {"version=0.1.0": 1}, "derp_accepts": 2}).encode()
    assert json.loads(sum_vars([varz, varz])) == {
        "uptime_sec": 50,
        "version": {"version=0.1.0": 1},
        "derp_accepts": 4,
    }


def test_unknown_metrics_and_per_worker_labels_are_kept_apart() -> None:
    worker_0 = b'# TYPE w gauge\nw{worker="0"} 3.0\n# TYPE renamed_total counter\nrenamed_total 1.0\n'
    worker_1 = b'# TYPE w gauge\nw{worker="1"} 4.0\n# TYPE renamed_total counter\nrenamed_total 2.0\n'
    summed = samples(sum_expositions([worker_0, worker_1]))
    assert summed == {
        ("w", (("worker", "0"),)): 3.0,
        ("w", (("worker", "1"),)): 4.0,
        ("renamed_total", ()): 3.0,
    }


def test_vars_documents_add_up_key_by_key() -> None:
    stats = RelayStats()
    stats.packets_sent = 2
    stats.drop("queue_head", b"x")
    gauges = Gauges(1, 0, 0, 1, 0, 0, 0, 0, 0)
    document = RelayMetrics(lambda: relay_families(stats, gauges, [], IDENTITY)).vars()
    summed = json.loads(sum_vars([document, document, document]))
    assert summed["derp_packets_sent"] == 6
    assert summed["derp_packets_dropped"]["reason=queue_head,kind=other"] == 3
    assert summed["derp_current_connections"] == 3


def test_help_and_label_values_are_escaped_again() -> None:
    text = b'# HELP odd a \\\\ b\\nc\n# TYPE odd gauge\nodd{path="a\\"b\\\\c"} 1.0\n'
    assert samples(sum_expositions([text, text])) == {("odd", (("path", 'a"b\\c'),)): 2.0}


@pytest.mark.parametrize("name", ["metrics", "varz"])
def test_workers_certificate_series_are_one_workers_not_their_sum(name: str) -> None:
    """Every worker watches the same files: one rotation is one reload, the expiry the earliest served."""
    first, renewed = certs.generate_self_signed("derp.test"), certs.generate_self_signed("derp.test")
    behind, ahead = certreload.ServedCertificate(first, b""), certreload.ServedCertificate(renewed, b"")
    behind.results[certreload.RELOADED], ahead.results[certreload.RELOADED] = 1, 2  # a sum says 3
    texts = [RelayMetrics(lambda s=s: certreload.cert_families(s)).exposition(name) for s in (behind, ahead)]
    summed = samples(sum_expositions(texts))
    # (the parser names every counter sample x_total, whichever exposition it read)
    assert summed[("derp_tls_cert_reloads_total", (("result", "reloaded"),))] == 2
    assert summed[("derp_tls_cert_reloads_total", (("result", "key_mismatch"),))] == 0
    assert summed[("derp_tls_cert_not_after_unix_time", ())] == int(
        first.leaf.not_valid_after_utc.timestamp()
    )
    serials = {labels for metric, labels in summed if metric == "derp_tls_cert_info"}
    assert serials == {(("serial", f"{m.leaf.serial_number:x}"),) for m in (first, renewed)}
