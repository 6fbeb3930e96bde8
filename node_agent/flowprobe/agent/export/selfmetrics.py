"""The agent's own health: capture, parsing, queues, export. Over OTLP and on ``/metrics``.

One table of definitions feeds two views of the same counters:

* OTLP, with the other metrics (resource ``service.name=flowprobe-agent``,
  scope ``flowprobe.agent.self``; export/metrics.py builds the points);
* a Prometheus ``/metrics`` endpoint served by ``prometheus_client`` from a
  private registry.

``prometheus_client`` is used directly rather than the OpenTelemetry
Prometheus reader because the endpoint must keep answering exactly when the
OTel export path is what is broken (a wedged exporter, a full queue), so it
shares nothing with that path but the counters; it is a stable library
(the OTel reader is still a beta package), serves from a private registry
(the OTel reader registers into the process-global one) and adds the
standard ``process_*`` metrics (memory, CPU, open fds) that show whether the
agent's memory stays bounded. Names follow the OTel -> Prometheus rules the
collector applies (dots to underscores, ``_total`` on counters), so a series
looks the same whether scraped here or received through the collector.
"""

from __future__ import annotations

import logging
import threading
from collections import Counter
from collections.abc import Callable, Iterable, Iterator
from dataclasses import dataclass, field
from typing import Literal
from wsgiref.simple_server import WSGIServer

from prometheus_client import CollectorRegistry, ProcessCollector, start_http_server
from prometheus_client.core import CounterMetricFamily, GaugeMetricFamily, Metric
from prometheus_client.registry import Collector

from flowprobe.agent.sessionize.stats import Stats

log = logging.getLogger("flowprobe.agent")

Kind = Literal["counter", "gauge"]


@dataclass(frozen=True)
class Definition:
    name: str
    kind: Kind
    unit: str
    description: str
    label: str | None = None  # the one attribute that splits the series, if any

    @property
    def prometheus_name(self) -> str:
        # prometheus_client appends _total to counters itself.
        return self.name.replace(".", "_")


DEFINITIONS = (
    Definition("flowprobe.agent.packets", "counter", "{packet}", "Packets the pipeline processed."),
    Definition(
        "flowprobe.agent.capture.dropped",
        "counter",
        "{packet}",
        "Packets the capture (dumpcap/kernel) dropped, as dumpcap reports when it stops.",
    ),
    Definition("flowprobe.agent.exchanges", "counter", "{exchange}", "Exchanges paired."),
    Definition("flowprobe.agent.connections", "counter", "{connection}", "Connections closed."),
    Definition(
        "flowprobe.agent.parse.errors",
        "counter",
        "{error}",
        "Packets a protocol parser could not make sense of.",
        "protocol",
    ),
    Definition(
        "flowprobe.agent.anomalies",
        "counter",
        "{anomaly}",
        "Everything the pipeline dropped, repaired or could not pair, by kind.",
        "kind",
    ),
    Definition(
        "flowprobe.agent.queue.size", "gauge", "{item}", "Items waiting in a queue.", "queue"
    ),
    Definition("flowprobe.agent.queue.capacity", "gauge", "{item}", "A queue's bound.", "queue"),
    Definition(
        "flowprobe.agent.exchanges.dropped",
        "counter",
        "{exchange}",
        "Exchanges dropped before export (no spans, no metrics), by reason.",
        "reason",
    ),
    Definition(
        "flowprobe.agent.spans.exported", "counter", "{span}", "Spans the backend accepted."
    ),
    Definition(
        "flowprobe.agent.spans.dropped",
        "counter",
        "{span}",
        "Spans not exported, by reason.",
        "reason",
    ),
    Definition(
        "flowprobe.agent.export.failures",
        "counter",
        "{request}",
        "Export requests that failed after the exporter's retries, by signal.",
        "signal",
    ),
    Definition(
        "flowprobe.agent.links",
        "counter",
        "{exchange}",
        "Parent decisions of the in-flight rule: linked, root, ambiguous, forced.",
        "result",
    ),
    Definition(
        "flowprobe.agent.workloads", "gauge", "{workload}", "Workloads with live metric state."
    ),
)
_BY_NAME = {d.name: d for d in DEFINITIONS}

Sample = tuple[str, dict[str, str], float]


@dataclass
class ExportCounters:
    """Counts kept by the export path; each field is written by one thread only."""

    exchanges_dropped: Counter[str] = field(default_factory=Counter)
    spans_exported: int = 0
    spans_dropped: Counter[str] = field(default_factory=Counter)
    export_failures: Counter[str] = field(default_factory=Counter)


def _copy(counter: Counter[str]) -> dict[str, int]:
    # Another thread may add a key meanwhile; dict() of a Counter is one C
    # call under the GIL, retried in the unlikely case it still raced.
    for _ in range(3):
        try:
            return dict(counter)
        except RuntimeError:
            continue
    return {}


class SelfMetrics:
    """Reads the counters into samples; both views are built from :meth:`samples`."""

    def __init__(
        self,
        stats: Stats,
        counters: ExportCounters,
        gauges: Callable[[], Iterable[Sample]] | None = None,
    ) -> None:
        self.stats = stats
        self.counters = counters
        self.gauges = gauges
        self._server: WSGIServer | None = None
        self._thread: threading.Thread | None = None

    def samples(self) -> list[Sample]:
        s, c = self.stats, self.counters
        out: list[Sample] = [
            ("flowprobe.agent.packets", {}, s.packets),
            ("flowprobe.agent.capture.dropped", {}, s.capture_dropped),
            ("flowprobe.agent.exchanges", {}, s.exchanges),
            ("flowprobe.agent.connections", {}, s.connections),
            ("flowprobe.agent.spans.exported", {}, c.spans_exported),
        ]
        for kind, n in _copy(s.anomalies).items():
            if kind.startswith("parse_error."):
                out.append(
                    ("flowprobe.agent.parse.errors", {"protocol": kind.partition(".")[2]}, n)
                )
            out.append(("flowprobe.agent.anomalies", {"kind": kind}, n))
        for reason, n in _copy(c.exchanges_dropped).items():
            out.append(("flowprobe.agent.exchanges.dropped", {"reason": reason}, n))
        for reason, n in _copy(c.spans_dropped).items():
            out.append(("flowprobe.agent.spans.dropped", {"reason": reason}, n))
        for signal, n in _copy(c.export_failures).items():
            out.append(("flowprobe.agent.export.failures", {"signal": signal}, n))
        if self.gauges is not None:
            out.extend(self.gauges())
        return out

    # -- Prometheus -------------------------------------------------------

    def registry(self) -> CollectorRegistry:
        reg = CollectorRegistry(auto_describe=False)
        reg.register(_PromCollector(self))
        reg.register(ProcessCollector(registry=None))
        return reg

    def serve(self, port: int, address: str = "0.0.0.0") -> int:
        """Serve ``/metrics`` from a daemon thread; returns the bound port."""
        server, thread = start_http_server(port, addr=address, registry=self.registry())
        self._server, self._thread = server, thread
        bound = int(server.server_address[1])
        log.info("serving agent metrics on http://%s:%d/metrics", address, bound)
        return bound

    def stop(self) -> None:
        server = self._server
        if server is not None:
            server.shutdown()
            server.server_close()
            self._server = None


class _PromCollector(Collector):
    def __init__(self, metrics: SelfMetrics) -> None:
        self.metrics = metrics

    def collect(self) -> Iterator[Metric]:
        families: dict[str, CounterMetricFamily | GaugeMetricFamily] = {}
        for d in DEFINITIONS:
            names = [d.label] if d.label else []
            cls = CounterMetricFamily if d.kind == "counter" else GaugeMetricFamily
            families[d.name] = cls(d.prometheus_name, d.description, labels=names)
        for name, labels, value in self.metrics.samples():
            spec = _BY_NAME.get(name)
            if spec is None:
                continue
            label_values = [labels.get(spec.label, "")] if spec.label else []
            families[name].add_metric(label_values, value)
        yield from families.values()
