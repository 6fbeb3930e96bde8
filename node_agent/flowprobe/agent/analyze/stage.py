"""Top-N gauges and anomaly alerts from the exchanges an OTLP sink exports.

    Telemetry process thread --observe(ex, client, server)--> top-N windows, edge baselines
                                                          --> alert: log record (Alerts) + span event
                                                          --> alert: freeze(connection) -> pcap named
    metric thread --Metrics.collect()--> collect(): flowprobe.top.* gauges

The analyzer is an observer of :class:`~flowprobe.agent.export.telemetry.Telemetry`:
it runs where both ends of an exchange are already resolved to workloads
and before the exchange's spans are built, so the span event of an alert
lands on the span of the exchange that raised it. With forensics on, an
alert freezes a connection of its edge into a pcap (docs/forensics.md): the
alert's record and event name it, and so does the span of the exchange that
raised it. Only the top-N windows are shared with the metric thread; one
lock guards all state, so the daemon can close an analyzer while its sink
still drains.

Exported cardinality is bounded by construction: per metric, at most
``top_n`` points per dimension (the current members, each with its rank);
alert counts per edge and kind ride on the edges the flowprobe.edge.*
metrics already have.
"""

from __future__ import annotations

import logging
import threading
import time
from collections.abc import Callable, Mapping
from dataclasses import dataclass

from opentelemetry.sdk.metrics.export import Gauge, Metric, NumberDataPoint
from opentelemetry.sdk.util.instrumentation import InstrumentationScope

from flowprobe.agent.analyze.anomaly import Baselines, EdgeKey, Kind, Transition
from flowprobe.agent.analyze.topn import METRICS, SlidingTopN
from flowprobe.agent.config import AnomalyConfig
from flowprobe.agent.export.metrics import EXTERNAL, Instrument, Metrics
from flowprobe.agent.export.spans import error_of
from flowprobe.agent.export.telemetry import Telemetry
from flowprobe.agent.export.workloads import Workload
from flowprobe.agent.parse.messages import AttrValue
from flowprobe.agent.security.alerts import Alerts
from flowprobe.agent.sessionize.records import Endpoints, Exchange, Outcome

log = logging.getLogger("flowprobe.agent")

SCOPE = InstrumentationScope("flowprobe.agent.anomaly", "0.1.0")
ANOMALY = "flowprobe.anomaly"
RESOLVED = "flowprobe.anomaly.resolved"
ANOMALY_ALERTS = Instrument(
    "flowprobe.anomaly.alerts",
    "{alert}",
    "Anomaly alerts (an edge leaving its baseline) per edge and kind.",
)
# Who is ranked: the client's address, the client's and the server's workload.
CLIENT_ADDRESS, CLIENT_WORKLOAD, SERVER_WORKLOAD = DIMENSIONS = (
    "client.address",
    "client.workload",
    "server.workload",
)


@dataclass(frozen=True)
class _Gauge:
    name: str
    unit: str
    description: str
    scale: float = 1.0


# Per metric of topn.METRICS, in its order. Values are totals over the window,
# except latency: the mean, in seconds.
GAUGES = (
    _Gauge("flowprobe.top.requests", "{exchange}", "Exchanges over the window, top N members."),
    _Gauge("flowprobe.top.errors", "{exchange}", "Failed exchanges over the window, top N."),
    _Gauge("flowprobe.top.bytes", "By", "L7 bytes (both directions) over the window, top N."),
    _Gauge("flowprobe.top.latency", "s", "Mean exchange duration over the window, top N.", 1e-6),
    _Gauge("flowprobe.top.retransmits", "{packet}", "TCP retransmissions over the window, top N."),
    _Gauge("flowprobe.top.resets", "{exchange}", "Exchanges ended by a reset, over the window."),
)
_LABELS = {
    Kind.ERROR_RATIO: "error ratio",
    Kind.LATENCY: "p95 latency",
    Kind.RATE_INCREASE: "rate rise",
    Kind.RATE_DECREASE: "rate drop",
}
# Freezes an alert's connection around [start µs, end µs] (forensics/): the attributes
# naming the pcap, none when nothing is frozen (trigger off, rate limit).
Freeze = Callable[[Endpoints, int, int], Mapping[str, AttrValue]]
# Intervals close on wall time this long after their end while no exchange
# comes: exchanges are handed on when they complete, a little late.
_GRACE_US = 1_000_000


class Analyzer:
    def __init__(
        self,
        config: AnomalyConfig,
        alerts: Alerts | None = None,
        metrics: Metrics | None = None,
        live: bool = False,
        freeze: Freeze | None = None,
    ) -> None:
        self.config = config
        self.alerts = alerts
        self.metrics = metrics
        self.live = live
        self.freeze = freeze
        window_us = config.top_n_window_seconds * 1_000_000
        self.top = (
            {
                d: SlidingTopN(config.top_n, window_us, max_members=config.max_members)
                for d in DIMENSIONS
            }
            if config.top_n
            else {}
        )
        self.baselines = Baselines(config)
        self.alerted = 0
        self.errors = 0
        self._lock = threading.Lock()
        self._last_us = 0
        # Alerts raised by another edge's exchange: their span event goes on
        # the next exchange of their own edge.
        self._pending: dict[EdgeKey, list[dict[str, AttrValue]]] = {}

    # -- wiring -----------------------------------------------------------

    def attach(self, telemetry: Telemetry) -> Analyzer:
        telemetry.observers = [*telemetry.observers, self]
        telemetry.metrics.collectors = [*telemetry.metrics.collectors, self.collect]
        return self

    def detach(self, telemetry: Telemetry) -> None:
        telemetry.observers = [o for o in telemetry.observers if o is not self]
        telemetry.metrics.collectors = [
            c for c in telemetry.metrics.collectors if c != self.collect
        ]

    def close(self) -> None:
        """Report the storms still open (after the last exchange was observed)."""
        with self._lock:
            self._emit(self.baselines.stop(), None, None)
        if self.alerts is not None:
            self.alerts.close()

    def totals(self) -> dict[str, int]:
        """Alerts raised, edges and top-N members not tracked (bounds hit), analysis errors."""
        return {
            "alerts": self.alerted,
            "untracked_edges": self.baselines.untracked,
            "untracked_members": sum(t.overflow for t in self.top.values()),
            "errors": self.errors,
        }

    # -- process thread ---------------------------------------------------

    def observe(self, ex: Exchange, client: Workload | None, server: Workload | None) -> None:
        try:
            self._observe(ex, client, server)
        except Exception:
            # Analysis is a side line: a bug here must not cost the span.
            self._failed()

    def _failed(self) -> None:
        self.errors += 1
        if self.errors == 1:
            log.exception("anomaly analysis failed (further failures are only counted)")

    def _observe(self, ex: Exchange, client: Workload | None, server: Workload | None) -> None:
        at = ex.end_us
        edge = (
            client.name if client else EXTERNAL,
            server.name if server else EXTERNAL,
            ex.protocol,
        )
        failed = error_of(ex, ex.attrs, client=False) is not None
        with self._lock:
            if self.top:
                f = ex.figures
                figures = (
                    1,
                    1 if failed else 0,
                    f.client_bytes + f.server_bytes,
                    ex.duration_us,
                    f.retransmits,
                    1 if f.rst or ex.outcome is Outcome.RESET else 0,
                )
                if at > self._last_us:
                    self._last_us = at
                top = self.top
                top[CLIENT_ADDRESS].add(at, ex.endpoints.client_address, figures)
                top[CLIENT_WORKLOAD].add(at, edge[0], figures)
                top[SERVER_WORKLOAD].add(at, edge[1], figures)
            transitions = self.baselines.observe(at, edge, ex.duration_us, failed)
            if self.freeze is not None and (e := self.baselines.edges.get(edge)) is not None:
                e.latest = (ex.endpoints, ex.start_us, ex.end_us)
            if transitions:
                self._emit(transitions, ex, edge)
            pending = self._pending.pop(edge, None) if self._pending else None
        if pending:
            ex.security_events.extend((ex.start_us, ANOMALY, a) for a in pending)

    def tick(self, now_us: int) -> None:
        if not self.live:
            return
        try:
            with self._lock:
                self._emit(self.baselines.advance(now_us - _GRACE_US), None, None)
        except Exception:
            # Called by the sink's thread outside its per-exchange guard (an
            # alert's freeze runs here too): a bug must not stop that thread.
            self._failed()

    def _emit(
        self, transitions: list[Transition], ex: Exchange | None, edge: EdgeKey | None
    ) -> None:
        interval_s = self.config.interval_seconds
        for t in transitions:
            client, server, protocol = t.edge
            attrs: dict[str, AttrValue] = {
                "flowprobe.client.service": client,
                "flowprobe.server.service": server,
                "flowprobe.protocol": protocol,
                "flowprobe.anomaly.kind": t.kind.value,
                "flowprobe.anomaly.observed": t.observed,
                "flowprobe.anomaly.baseline": t.baseline,
                "flowprobe.anomaly.threshold": t.threshold,
                "flowprobe.anomaly.count": t.count,
                "flowprobe.anomaly.interval_seconds": interval_s,
                "flowprobe.anomaly.interval_start_unix_us": t.start_us,
                "flowprobe.anomaly.since_unix_us": t.since_us,
            }
            what = f"{_LABELS[t.kind]} on {client} -> {server} ({protocol})"
            if t.resolved:
                attrs["flowprobe.anomaly.reason"] = t.reason
                if self.alerts is not None:
                    self.alerts.emit(
                        RESOLVED,
                        t.end_us,
                        "INFO",
                        f"{what} {t.reason} after {t.count} intervals out of its baseline",
                        attrs,
                    )
                continue
            self.alerted += 1
            own = ex if ex is not None and t.edge == edge else None
            if self.freeze is not None:
                attrs.update(self._freeze(self.freeze, t.edge, own))
            if self.metrics is not None:
                key = (
                    ("flowprobe.client.service", client),
                    ("flowprobe.server.service", server),
                    ("flowprobe.protocol", protocol),
                    ("flowprobe.anomaly.kind", t.kind.value),
                )
                self.metrics.count(ANOMALY_ALERTS, key)
            if self.alerts is not None:
                self.alerts.emit(
                    ANOMALY,
                    t.end_us,
                    "WARNING",
                    f"{what}: {t.observed:.4g} against a baseline of {t.baseline:.4g} "
                    f"(threshold {t.threshold:.4g})",
                    attrs,
                )
            if own is not None:
                own.security_events.append((own.start_us, ANOMALY, attrs))
            elif len(self._pending) < self.config.max_edges:
                self._pending.setdefault(t.edge, []).append(attrs)

    def _freeze(
        self, freeze: Freeze, edge: EdgeKey, own: Exchange | None
    ) -> Mapping[str, AttrValue]:
        if own is None:
            e = self.baselines.edges.get(edge)
            return freeze(*e.latest) if e is not None and e.latest is not None else {}
        pcap = freeze(own.endpoints, own.start_us, own.end_us)
        # An exchange whose own failure froze its connection keeps that trigger:
        # the cut is the same one while it is pending.
        for key, value in pcap.items():
            own.attrs.setdefault(key, value)
        return pcap

    # -- metric thread ----------------------------------------------------

    def collect(self, now_ns: int) -> list[Metric]:
        """The current top N of every metric and dimension, as gauges with a rank."""
        if not self.top:
            return []
        with self._lock:
            now_us = self._last_us
            if self.live:
                now_us = max(now_us, time.time_ns() // 1000)
            rankings = {dim: top.ranking(now_us) for dim, top in self.top.items()}
        start_ns = now_ns - self.config.top_n_window_seconds * 1_000_000_000
        out = []
        for metric, gauge in zip(METRICS, GAUGES, strict=True):
            points = [
                NumberDataPoint(
                    attributes={
                        "flowprobe.top.dimension": dim,
                        "flowprobe.top.rank": rank,
                        "flowprobe.top.member": member,
                    },
                    start_time_unix_nano=start_ns,
                    time_unix_nano=now_ns,
                    value=value * gauge.scale,
                )
                for dim, ranking in rankings.items()
                for rank, (member, value) in enumerate(ranking[metric], 1)
            ]
            if points:
                out.append(Metric(gauge.name, gauge.description, gauge.unit, Gauge(points)))
        return out
