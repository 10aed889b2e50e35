"""One relay's metrics from the expositions of its worker processes: a pure sum.

Each worker counts in its own memory (``derprelay.metrics``); whichever worker
answers a scrape asks the others for their Prometheus text exposition and adds
them up here, series by series (same metric name, same labels).  Working on
the text keeps this independent of which metrics exist: a metric added or
renamed in ``metrics`` is summed like the rest.  Counters and gauges alike
are summed — connections, clients and queue figures of a relay are the sums of
its workers' — except the few series a sum would make wrong, recognised by
name (:func:`combine_rule`): start times and certificate expiry keep the
earliest, versions, uptimes, ``up`` flags and maxima the largest, averages
their mean.  The TLS certificate's reload counts and serial also keep the
largest: every worker watches the same files (``derprelay.certreload``), so one
rotation is one reload of the relay, not one per worker.
"""

from __future__ import annotations

import enum
import json
import math
import re
import statistics
from collections.abc import Callable, Iterable

from prometheus_client.parser import text_string_to_metric_families

_Labels = tuple[tuple[str, str], ...]
_SeriesKey = tuple[str, _Labels]


class Combine(enum.Enum):
    SUM = "sum"
    MIN = "min"
    MAX = "max"
    MEAN = "mean"


_RULES = (
    (re.compile(r"(_created|_start_time_seconds|_start_unix_time|_not_after_unix_time)$"), Combine.MIN),
    (
        re.compile(r"(^version$|_info$|_up$|^uptime_sec|_max_bytes$|_max$|^derp_tls_cert_reloads)"),
        Combine.MAX,
    ),
    (re.compile(r"_average_"), Combine.MEAN),
)


def combine_rule(name: str) -> Combine:
    """How the workers' values of one series (by its name) make the relay's."""
    for pattern, rule in _RULES:
        if pattern.search(name):
            return rule
    return Combine.SUM


_COMBINE: dict[Combine, Callable[[list[float]], float]] = {
    Combine.SUM: sum,
    Combine.MIN: min,
    Combine.MAX: max,
    Combine.MEAN: statistics.fmean,
}


def combine(name: str, values: list[float]) -> float:
    return _COMBINE[combine_rule(name)](values)


def sum_expositions(expositions: Iterable[bytes]) -> bytes:
    """The text exposition whose every series is the sum of that series in ``expositions``.

    Names come out as they went in: ``/metrics``'s counters end in ``_total``,
    ``/debug/varz``'s (derper's names) do not, and both stay so.
    """
    families: dict[str, tuple[str, str]] = {}
    """By family name: type and help, as the first exposition had them."""
    written: dict[str, str] = {}
    """By family name: the name its TYPE line gave (the parser adds ``_total`` to every counter)."""
    values: dict[str, dict[_SeriesKey, list[float]]] = {}
    label_order: dict[_SeriesKey, _Labels] = {}
    """Each series' labels in the order its first exposition wrote them (a dashboard's regex may care)."""
    for text in expositions:
        decoded = text.decode()
        for line in decoded.splitlines():
            if line.startswith("# TYPE "):
                typed_name = line.split(" ", 3)[2]
                written.setdefault(typed_name.removesuffix("_total"), typed_name)
        for family in text_string_to_metric_families(decoded):
            if family.name not in families:
                families[family.name] = (family.type, family.documentation)
                values[family.name] = {}
            series = values[family.name]
            for sample in family.samples:
                key = (sample.name, tuple(sorted(sample.labels.items())))
                series.setdefault(key, []).append(sample.value)
                label_order.setdefault(key, tuple(sample.labels.items()))
    lines: list[str] = []
    for name, (kind, help_text) in families.items():
        typed = written.get(name, name)
        lines.append(f"# HELP {typed} {_escape(help_text, quote=False)}")
        lines.append(f"# TYPE {typed} {kind}")
        for key, each in values[name].items():
            parsed_name, labels = key[0], label_order[key]
            sample_name = typed if parsed_name == f"{name}_total" else parsed_name
            value = combine(sample_name, each)
            label_text = ",".join(f'{k}="{_escape(v)}"' for k, v in labels)
            lines.append(
                f"{sample_name}{{{label_text}}} {_number(value)}"
                if labels
                else f"{sample_name} {_number(value)}"
            )
    return ("\n".join(lines) + "\n").encode() if lines else b""


def sum_vars(documents: Iterable[bytes]) -> bytes:
    """``/debug/vars``: the JSON documents' numbers combined key by key, as the series are."""
    return (
        json.dumps(
            _combine_documents("", [json.loads(d) for d in documents]), indent=1, sort_keys=True
        ).encode()
        + b"\n"
    )


def _combine_documents(name: str, documents: list[object]) -> object:
    """One key's values from every worker: numbers combined by the metric's rule, objects key by key."""
    if all(isinstance(d, dict) for d in documents):
        keys = dict.fromkeys(k for d in documents if isinstance(d, dict) for k in d)
        return {
            key: _combine_documents(
                name or key, [d[key] for d in documents if isinstance(d, dict) and key in d]
            )
            for key in keys
        }
    numbers = [float(d) for d in documents if isinstance(d, int | float)]
    if len(numbers) != len(documents):
        return documents[0]
    combined = combine(name, numbers)
    return int(combined) if combined.is_integer() else combined


def _escape(text: str, *, quote: bool = True) -> str:
    escaped = text.replace("\\", "\\\\").replace("\n", "\\n")
    return escaped.replace('"', '\\"') if quote else escaped


def _number(value: float) -> str:
    if math.isnan(value):
        return "NaN"
    if math.isinf(value):
        return "+Inf" if value > 0 else "-Inf"
    return str(int(value)) if float(value).is_integer() and abs(value) < 2**53 else repr(float(value))
