"""The OTLP sink: exchanges in on the capture thread, spans and metrics out on their own.

    capture thread --submit()--> [exchange queue] --process thread--> linker -> spans, metrics
                                                                  --> [span queue] --span thread--> exporter
                                                   metric thread --every interval--> exporter

Both queues are bounded and never waited on: a full queue drops (and counts)
the newest item, so capture never blocks and memory stays bounded however
long the backend is down or slow. The span queue holds spans already encoded
(bytes and their workload, nothing else: a long queue is little memory and
little work for the garbage collector); the span thread only groups a batch
into one request. The
exporters retry within their timeout and reconnect by themselves; a batch
that still fails is dropped and counted, and the agent logs the first failure and the recovery (with how
much was dropped meanwhile). Metrics are cumulative, so an export missed
while the backend was down is made up by the next one.
"""

from __future__ import annotations

import logging
import os
import socket
import threading
import time
from collections import deque
from collections.abc import Callable
from typing import Protocol

from opentelemetry.sdk.metrics.export import MetricExporter, MetricExportResult
from opentelemetry.sdk.resources import Resource

from flowprobe.agent.config import ExportConfig
from flowprobe.agent.export import semconv as sc
from flowprobe.agent.export.metrics import Metrics
from flowprobe.agent.export.naming import RouteTable
from flowprobe.agent.export.selfmetrics import ExportCounters, Sample, SelfMetrics
from flowprobe.agent.export.spans import (
    Linker,
    Node,
    NodeFactory,
    SpanBuilder,
    TraceRequestEncoder,
)
from flowprobe.agent.export.transport import SpanSink
from flowprobe.agent.export.workloads import AddressResolver, Workload, WorkloadResolver
from flowprobe.agent.sessionize.records import Exchange
from flowprobe.agent.sessionize.stats import Stats

log = logging.getLogger("flowprobe.agent")

_IDLE_POLL_S = 0.05


class ExchangeObserver(Protocol):
    """Sees every exchange with both ends resolved, on the process thread, before its spans
    are built (so it may add span events); analyze/ is one."""

    def observe(self, ex: Exchange, client: Workload | None, server: Workload | None) -> None: ...

    def tick(self, now_us: int) -> None:
        """Wall time while no exchange comes (live capture only)."""
        ...


def agent_resource(service_name: str) -> Resource:
    # Resource.create: the agent's own resource honours OTEL_RESOURCE_ATTRIBUTES.
    instance = os.environ.get("NODE_NAME") or socket.gethostname()
    return Resource.create({sc.SERVICE_NAME: service_name, sc.SERVICE_INSTANCE_ID: instance})


class Telemetry:
    """Spans and metrics for every exchange handed to :meth:`submit`."""

    def __init__(
        self,
        config: ExportConfig,
        stats: Stats,
        span_exporter: SpanSink | None,
        metric_exporter: MetricExporter | None,
        resolver: WorkloadResolver | None = None,
        salt: bytes | None = None,
        wall_clock_release: bool = True,
        export_timeout_s: float = 10.0,
    ) -> None:
        self.config = config
        self.stats = stats
        self.span_exporter = span_exporter
        self.metric_exporter = metric_exporter
        self.resolver: WorkloadResolver = resolver or AddressResolver(config.service_names)
        self.counters = ExportCounters()
        self.builder = SpanBuilder(RouteTable(config.routes))
        self.requests = TraceRequestEncoder()
        self.factory = NodeFactory(salt if salt is not None else os.urandom(16))
        self.linker = Linker(
            self._final,
            window_us=int(config.link_window_seconds * 1_000_000),
            max_held=config.max_held_exchanges,
        )
        self.wall_clock_release = wall_clock_release
        self.export_timeout_s = export_timeout_s
        self.agent_resource = agent_resource(config.agent_service_name)
        temporality = (
            metric_exporter._preferred_temporality if metric_exporter is not None else None
        )
        self.self_metrics = SelfMetrics(stats, self.counters, self._gauges)
        self.metrics = Metrics(
            self.agent_resource,
            max_workloads=config.max_workloads,
            preferred_temporality=temporality,
            self_samples=self.self_metrics.samples if config.self_metrics_otlp else None,
        )
        # Replaced, never mutated: the process thread reads it without a lock.
        self.observers: list[ExchangeObserver] = []
        self._inbound: deque[Exchange] = deque()
        self._spans: deque[tuple[Workload, bytes]] = deque()
        self._closing = threading.Event()
        self._processed = threading.Event()
        self._abort = threading.Event()
        self._open = False
        self._threads: list[threading.Thread] = []
        self.metrics_url: str | None = None
        self._failing_since_dropped: int | None = None
        self._failed_exports = 0

    # -- capture thread ---------------------------------------------------

    def submit(self, ex: Exchange) -> None:
        """Hand an exchange over; never blocks, drops (counted) when the queue is full."""
        if not self._open:
            self.counters.exchanges_dropped["closed"] += 1
        elif len(self._inbound) >= self.config.queue_size:
            self.counters.exchanges_dropped["queue_full"] += 1
        else:
            self._inbound.append(ex)

    # -- lifecycle --------------------------------------------------------

    def start(self) -> Telemetry:
        if self.config.metrics_port is not None:
            port = self.self_metrics.serve(self.config.metrics_port, self.config.metrics_address)
            self.metrics_url = f"http://{self.config.metrics_address}:{port}/metrics"
        self._open = True
        targets: list[tuple[str, Callable[[], None]]] = [("process", self._process_loop)]
        if self.span_exporter is not None:
            targets.append(("spans", self._span_loop))
        if self.metric_exporter is not None:
            targets.append(("metrics", self._metric_loop))
        for name, target in targets:
            t = threading.Thread(target=target, name=f"flowprobe-export-{name}", daemon=True)
            t.start()
            self._threads.append(t)
        return self

    def close(self, timeout_s: float | None = None) -> None:
        """Export what is queued (within the timeout), then stop every thread."""
        if not self._open and not self._threads:
            return
        self._open = False
        deadline = time.monotonic() + (
            timeout_s if timeout_s is not None else self.config.shutdown_timeout_seconds
        )
        self._closing.set()
        for t in self._threads:
            t.join(max(0.0, deadline - time.monotonic()))
            if t.is_alive() and self.span_exporter is not None:
                # Out of time: stop between batches, and shut the exporter
                # down, which cuts its retry back-off short. What is left is
                # counted as dropped below.
                self._abort.set()
                self.span_exporter.shutdown()
                t.join(5.0)
        self._threads = []
        if self.span_exporter is not None and not self._abort.is_set():
            self.span_exporter.shutdown()
        leftover = len(self._spans)
        if leftover:
            self.counters.spans_dropped["shutdown"] += leftover
            self._spans.clear()
        if self.metric_exporter is not None:
            # Last, so the self-metrics include the final span counts.
            self._export_metrics(max(1.0, deadline - time.monotonic()))
            self.metric_exporter.shutdown(timeout_millis=1000)
        self.metrics.shutdown()
        self.self_metrics.stop()
        self._log_drops()

    # -- process thread ---------------------------------------------------

    def _process_loop(self) -> None:
        inbound = self._inbound
        while True:
            if inbound:
                try:
                    while inbound:
                        self._process(inbound.popleft())
                except Exception:
                    # A bug on one record must not stop the export of the rest.
                    log.exception("exporting an exchange failed")
                    self.counters.exchanges_dropped["error"] += 1
                continue
            if self._closing.is_set():
                break
            self.linker.release(idle=self.wall_clock_release)
            if self.wall_clock_release:
                for observer in self.observers:
                    observer.tick(time.time_ns() // 1000)
            self._closing.wait(_IDLE_POLL_S)
        self.linker.flush()
        self._processed.set()

    def _process(self, ex: Exchange) -> None:
        ep = ex.endpoints
        client_wl = self.resolver.client(ep.client_address, ex.start_us)
        server_wl = self.resolver.server(ep.server_address, ep.server_port, ex.start_us)
        for observer in self.observers:
            observer.observe(ex, client_wl, server_wl)
        node = self.factory.node(ex, client_wl, server_wl)
        if not node.top_span_id:
            self.counters.exchanges_dropped["unattributed"] += 1
            return
        self.linker.add(node)

    def _final(self, node: Node) -> None:
        spans = self.builder.build(node)
        if self.metric_exporter is not None:
            self.metrics.record(node, spans)
        if self.span_exporter is None:
            return
        room = self.config.span_queue_size - len(self._spans)
        if room < len(spans):
            self.counters.spans_dropped["queue_full"] += len(spans) - max(room, 0)
            spans = spans[: max(room, 0)]
        self._spans.extend((span.workload, span.encoded) for span in spans)

    # -- span thread ------------------------------------------------------

    def _span_loop(self) -> None:
        cfg = self.config
        spans = self._spans
        next_flush = time.monotonic() + cfg.schedule_delay_seconds
        while not self._abort.is_set():
            draining = self._processed.is_set()
            now = time.monotonic()
            if len(spans) >= cfg.batch_size or (spans and (draining or now >= next_flush)):
                batch = [spans.popleft() for _ in range(min(cfg.batch_size, len(spans)))]
                self._export_spans(batch)
                next_flush = time.monotonic() + cfg.schedule_delay_seconds
                continue
            if draining:
                break
            wait = _IDLE_POLL_S if not spans else min(_IDLE_POLL_S, max(0.005, next_flush - now))
            self._processed.wait(wait)

    def _export_spans(self, batch: list[tuple[Workload, bytes]]) -> None:
        assert self.span_exporter is not None
        try:
            ok = self.span_exporter.export(self.requests.encode(batch))
        except Exception as exc:
            log.debug("span export raised %r", exc)
            ok = False
        c = self.counters
        if ok:
            c.spans_exported += len(batch)
            if self._failing_since_dropped is not None:
                dropped = sum(c.spans_dropped.values()) - self._failing_since_dropped
                log.warning(
                    "span export works again after %d failed requests; %d spans were dropped "
                    "meanwhile (flowprobe_agent_spans_dropped_total)",
                    self._failed_exports,
                    dropped + sum(c.exchanges_dropped.values()),
                )
                self._failing_since_dropped = None
                self._failed_exports = 0
            return
        if self._failing_since_dropped is None:
            self._failing_since_dropped = sum(c.spans_dropped.values())
            log.warning(
                "span export failed; dropping spans until the backend answers again "
                "(counted in flowprobe_agent_spans_dropped_total)"
            )
        self._failed_exports += 1
        c.export_failures["traces"] += 1
        c.spans_dropped["export_failed"] += len(batch)

    # -- metric thread ----------------------------------------------------

    def _metric_loop(self) -> None:
        interval = self.config.metric_interval_seconds
        while not self._closing.wait(interval):
            self._export_metrics(self.export_timeout_s)

    def _export_metrics(self, timeout_s: float) -> None:
        assert self.metric_exporter is not None
        try:
            data = self.metrics.collect()
            if not data.resource_metrics:
                return
            result = self.metric_exporter.export(data, timeout_millis=timeout_s * 1000)
        except Exception as exc:
            log.debug("metric export raised %r", exc)
            result = MetricExportResult.FAILURE
        if result is not MetricExportResult.SUCCESS:
            self.counters.export_failures["metrics"] += 1

    # -- introspection ----------------------------------------------------

    def queue_sizes(self) -> dict[str, tuple[int, int]]:
        return {
            "exchanges": (len(self._inbound), self.config.queue_size),
            "spans": (len(self._spans), self.config.span_queue_size),
            "linker": (self.linker.held, self.config.max_held_exchanges),
        }

    def _gauges(self) -> list[Sample]:
        out: list[Sample] = []
        for queue, (size, cap) in self.queue_sizes().items():
            out.append(("flowprobe.agent.queue.size", {"queue": queue}, size))
            out.append(("flowprobe.agent.queue.capacity", {"queue": queue}, cap))
        for result, n in dict(self.linker.counts).items():
            out.append(("flowprobe.agent.links", {"result": result}, n))
        out.append(("flowprobe.agent.workloads", {}, self.metrics.workloads))
        return out

    def _log_drops(self) -> None:
        c = self.counters
        if c.exchanges_dropped or c.spans_dropped or c.export_failures:
            log.warning(
                "export: %d spans exported; dropped exchanges %s, spans %s; failed requests %s",
                c.spans_exported,
                dict(c.exchanges_dropped),
                dict(c.spans_dropped),
                dict(c.export_failures),
            )
