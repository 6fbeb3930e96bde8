"""Semconv duration histograms per workload, RED metrics per client -> server edge, and the
agent's self-metrics, aggregated here and handed to the OTLP exporter as ``MetricsData``.

Why not the SDK's ``MeterProvider``: a resource is per provider, so a resource
per workload means one provider per workload; and the SDK's per-measurement
path (attribute cleaning, hashing, locks) cost about three times the whole
span path, measured, with seven measurements per exchange. The aggregation
needed here is small and fixed: explicit-bucket histograms and monotonic sums,
keyed by a resource and a few low-cardinality attributes. It lives in plain
dicts under one lock, and :meth:`Metrics.collect` builds the SDK's own data
classes, so the OTLP exporters (and their temporality) are used unchanged.

Memory is bounded: at most ``max_workloads`` resources (least recently used
is dropped after its last figures were exported once) and at most
``max_series`` attribute sets per instrument and resource; beyond that,
measurements go to one overflow series marked ``otel.metric.overflow=true``
as the SDK does.
"""

from __future__ import annotations

import bisect
import math
import threading
import time
from collections import OrderedDict
from collections.abc import Callable, Iterable, Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any, cast

from opentelemetry.sdk.metrics import Counter as SdkCounter
from opentelemetry.sdk.metrics import Histogram as SdkHistogram
from opentelemetry.sdk.metrics.export import (
    AggregationTemporality,
    Gauge,
    Histogram,
    HistogramDataPoint,
    Metric,
    MetricsData,
    NumberDataPoint,
    ResourceMetrics,
    ScopeMetrics,
    Sum,
)
from opentelemetry.sdk.resources import Resource
from opentelemetry.sdk.util.instrumentation import InstrumentationScope

from flowprobe.agent.export import semconv as sc
from flowprobe.agent.export.selfmetrics import DEFINITIONS as SELF_DEFINITIONS
from flowprobe.agent.export.selfmetrics import Sample
from flowprobe.agent.export.spans import (
    SCOPE_NAME,
    SCOPE_VERSION,
    Node,
    SpanRecord,
    resource_attributes,
)
from flowprobe.agent.export.workloads import Workload, WorkloadKey

EXTERNAL = "external"
SCOPE = InstrumentationScope(SCOPE_NAME, SCOPE_VERSION)
SELF_SCOPE = InstrumentationScope("flowprobe.agent.self", SCOPE_VERSION)
_OVERFLOW: tuple[tuple[str, Any], ...] = (("otel.metric.overflow", True),)

# Low-cardinality attributes per histogram (semconv's required and
# recommended ones we can fill); never url.path, url.query, client address.
_HTTP_SERVER_ATTRS = (
    sc.HTTP_REQUEST_METHOD,
    sc.HTTP_ROUTE,
    sc.HTTP_RESPONSE_STATUS_CODE,
    sc.ERROR_TYPE,
    sc.URL_SCHEME,
    sc.NETWORK_PROTOCOL_NAME,
    sc.NETWORK_PROTOCOL_VERSION,
)
_HTTP_CLIENT_ATTRS = (
    sc.HTTP_REQUEST_METHOD,
    sc.HTTP_RESPONSE_STATUS_CODE,
    sc.ERROR_TYPE,
    sc.SERVER_ADDRESS,
    sc.SERVER_PORT,
    sc.URL_SCHEME,
    sc.NETWORK_PROTOCOL_NAME,
    sc.NETWORK_PROTOCOL_VERSION,
)
_RPC_ATTRS = (
    sc.RPC_SYSTEM,
    sc.RPC_SYSTEM_NAME,
    sc.RPC_SERVICE,
    sc.RPC_METHOD,
    sc.RPC_GRPC_STATUS_CODE,
    sc.RPC_RESPONSE_STATUS_CODE,
    sc.ERROR_TYPE,
)
_DB_ATTRS = (
    sc.DB_SYSTEM_NAME,
    sc.DB_OPERATION_NAME,
    sc.DB_COLLECTION_NAME,
    sc.DB_NAMESPACE,
    sc.DB_RESPONSE_STATUS_CODE,
    sc.ERROR_TYPE,
    sc.SERVER_ADDRESS,
    sc.SERVER_PORT,
)
# dns.question.name is left out on purpose: names are unbounded (random
# subdomains, search-path expansions) and the span already has them.
_DNS_ATTRS = (sc.DNS_QUESTION_TYPE, sc.ERROR_TYPE)


@dataclass(frozen=True)
class Instrument:
    name: str
    unit: str
    description: str
    bounds: tuple[float, ...] | None = None  # None: a monotonic sum

    @property
    def is_histogram(self) -> bool:
        return self.bounds is not None


HTTP_SERVER = Instrument(
    sc.HTTP_SERVER_REQUEST_DURATION,
    "s",
    "Duration of HTTP server requests.",
    sc.HTTP_DURATION_BUCKETS,
)
HTTP_CLIENT = Instrument(
    sc.HTTP_CLIENT_REQUEST_DURATION,
    "s",
    "Duration of HTTP client requests.",
    sc.HTTP_DURATION_BUCKETS,
)
RPC_SERVER = Instrument(
    sc.RPC_SERVER_CALL_DURATION,
    "s",
    "Measures the duration of an incoming Remote Procedure Call (RPC).",
    sc.RPC_DURATION_BUCKETS,
)
RPC_CLIENT = Instrument(
    sc.RPC_CLIENT_CALL_DURATION,
    "s",
    "Measures the duration of an outgoing Remote Procedure Call (RPC).",
    sc.RPC_DURATION_BUCKETS,
)
DB_CLIENT = Instrument(
    sc.DB_CLIENT_OPERATION_DURATION,
    "s",
    "Duration of database client operations.",
    sc.DB_DURATION_BUCKETS,
)
DNS_LOOKUP = Instrument(
    sc.DNS_LOOKUP_DURATION,
    "s",
    "Measures the time taken to perform a DNS lookup.",
    sc.DNS_DURATION_BUCKETS,
)
EDGE_EXCHANGES = Instrument("flowprobe.edge.exchanges", "{exchange}", "Exchanges per edge.")
EDGE_ERRORS = Instrument("flowprobe.edge.errors", "{exchange}", "Failed exchanges per edge.")
EDGE_BYTES = Instrument("flowprobe.edge.bytes", "By", "L7 payload bytes per edge and direction.")
EDGE_RETRANSMITS = Instrument(
    "flowprobe.edge.retransmits", "{packet}", "TCP retransmissions during exchanges per edge."
)
_EDGE_DURATION_BOUNDS = sc.HTTP_DURATION_BUCKETS
EDGE_DURATION = Instrument(
    "flowprobe.edge.duration", "s", "Exchange duration per edge.", _EDGE_DURATION_BOUNDS
)
EDGE_RTT = Instrument(
    "flowprobe.edge.rtt",
    "s",
    "Mean TCP round-trip time of each exchange, per edge.",
    sc.RTT_BUCKETS,
)


def pick(protocol: str, span: SpanRecord) -> tuple[Instrument | None, Sequence[str]]:
    """The semconv histogram a span's duration goes to, and its attribute keys."""
    server = not span.client
    if protocol in sc.SERVER_PROTOCOLS and sc.RPC_SYSTEM in span.shared:
        return (RPC_SERVER if server else RPC_CLIENT), _RPC_ATTRS
    if protocol in sc.SERVER_PROTOCOLS:
        return (HTTP_SERVER, _HTTP_SERVER_ATTRS) if server else (HTTP_CLIENT, _HTTP_CLIENT_ATTRS)
    # A database or DNS server's own view has no semconv metric.
    if server:
        return None, ()
    if protocol in sc.DB_PROTOCOLS:
        return DB_CLIENT, _DB_ATTRS
    if protocol == "dns":
        return DNS_LOOKUP, _DNS_ATTRS
    return None, ()


Key = tuple[tuple[str, Any], ...]


def _key(span: SpanRecord, keys: Sequence[str]) -> Key:
    own, shared = span.own, span.shared
    return tuple((k, own[k] if k in own else shared[k]) for k in keys if k in own or k in shared)


@dataclass(slots=True)
class _Hist:
    counts: list[int]
    total: float = 0.0
    count: int = 0
    lo: float = math.inf
    hi: float = -math.inf


def _observe(hist: _Hist, bounds: tuple[float, ...], value: float) -> None:
    hist.counts[bisect.bisect_left(bounds, value)] += 1
    hist.total += value
    hist.count += 1
    if value < hist.lo:
        hist.lo = value
    if value > hist.hi:
        hist.hi = value


@dataclass(slots=True)
class _EdgeSlots:
    exchanges: list[float]
    request_bytes: list[float]
    response_bytes: list[float]
    duration: _Hist
    # Only once the edge has an RTT sample: an empty series would be exported.
    rtt: _Hist | None = None


@dataclass(slots=True)
class _SpanSlot:
    """A span's duration histogram, found once per workload, instrument and attributes."""

    hist: _Hist
    bounds: tuple[float, ...]
    state_key: WorkloadKey


@dataclass
class _Series:
    instrument: Instrument
    # attribute key -> histogram or running sum
    values: dict[Key, _Hist | list[float]] = field(default_factory=dict)


@dataclass
class _State:
    resource: Resource
    start_ns: int
    series: dict[str, _Series] = field(default_factory=dict)


class Metrics:
    """Records each finalised exchange; :meth:`collect` gathers everything as ``MetricsData``."""

    def __init__(
        self,
        agent_resource: Resource,
        max_workloads: int = 1000,
        preferred_temporality: Mapping[type, AggregationTemporality] | None = None,
        max_series: int = 2000,
        self_samples: Callable[[], Iterable[Sample]] | None = None,
    ) -> None:
        self.agent_resource = agent_resource
        self.max_workloads = max_workloads
        self.max_series = max_series
        self.self_samples = self_samples
        temporality = preferred_temporality or {}
        self._delta_hist = temporality.get(SdkHistogram) is AggregationTemporality.DELTA
        self._delta_sum = temporality.get(SdkCounter) is AggregationTemporality.DELTA
        self.evictions = 0
        self.overflows = 0
        self._lock = threading.Lock()
        self._states: OrderedDict[WorkloadKey, _State] = OrderedDict()
        self._agent = _State(agent_resource, time.time_ns())
        self._retired: list[_State] = []
        self._edge_slots: dict[Key, _EdgeSlots] = {}
        self._span_slots: dict[tuple[Workload, str, str | None, tuple[Any, ...]], _SpanSlot] = {}
        self._self_start = time.time_ns()
        self._self_last: dict[tuple[str, Key], float] = {}
        # Metrics made elsewhere (analyze/: top-N gauges) for the agent's
        # resource, called with the collection time; replaced, never mutated.
        self.collectors: list[Callable[[int], list[Metric]]] = []

    @property
    def workloads(self) -> int:
        return len(self._states)

    # -- recording (process thread) ---------------------------------------

    def _state(self, wl: Workload) -> _State:
        key = wl.key
        state = self._states.get(key)
        if state is not None:
            self._states.move_to_end(key)
            return state
        if len(self._states) >= self.max_workloads:
            _, old = self._states.popitem(last=False)
            self.evictions += 1
            # Cached slots may belong to the retired state.
            self._span_slots.clear()
            # Exported once more at the next collect, then forgotten.
            self._retired.append(old)
        state = self._states[key] = _State(Resource(resource_attributes(wl)), time.time_ns())
        return state

    def _slot(self, state: _State, inst: Instrument, key: Key) -> _Hist | list[float]:
        """The histogram or running sum of ``key`` in ``inst`` (the overflow one when full)."""
        series = state.series.get(inst.name)
        if series is None:
            series = state.series[inst.name] = _Series(inst)
        values = series.values
        slot = values.get(key)
        if slot is None:
            if len(values) >= self.max_series:
                self.overflows += 1
                key = _OVERFLOW
                slot = values.get(key)
            if slot is None:
                bounds = inst.bounds
                slot = values[key] = _Hist([0] * (len(bounds) + 1)) if bounds is not None else [0.0]
        return slot

    def _add(self, state: _State, inst: Instrument, key: Key, value: float) -> None:
        slot = self._slot(state, inst, key)
        if isinstance(slot, _Hist):
            assert inst.bounds is not None
            _observe(slot, inst.bounds, value)
        else:
            slot[0] += value

    def _edge(self, edge: Key) -> _EdgeSlots:
        """The agent's per-edge series an exchange always adds to, found once per edge.

        Kept until the next collection, which may start new series (delta
        temporality) and so ends this cache.
        """
        agent = self._agent
        slots = self._edge_slots[edge] = _EdgeSlots(
            cast(list[float], self._slot(agent, EDGE_EXCHANGES, edge)),
            cast(
                list[float],
                self._slot(agent, EDGE_BYTES, (*edge, ("flowprobe.direction", "request"))),
            ),
            cast(
                list[float],
                self._slot(agent, EDGE_BYTES, (*edge, ("flowprobe.direction", "response"))),
            ),
            cast(_Hist, self._slot(agent, EDGE_DURATION, edge)),
        )
        return slots

    def record(self, node: Node, spans: Iterable[SpanRecord]) -> None:
        ex = node.ex
        assert ex is not None
        seconds = ex.duration_us / 1e6
        failed: bool | None = None
        with self._lock:
            for span in spans:
                # The callee's verdict is the edge's when there is one: a 404
                # fails the caller's span but is not a server error.
                if not span.client or failed is None:
                    failed = span.error is not None
                inst, keys = pick(ex.protocol, span)
                if inst is None:
                    continue
                # The metric attributes are the exchange's (shared) but for
                # error.type, which is the span's own: so the values and the
                # span's error find the series without building its key.
                wl = span.workload
                cache_key = (wl, inst.name, span.error, tuple(map(span.shared.get, keys)))
                cached = self._span_slots.get(cache_key)
                if cached is None:
                    assert inst.bounds is not None
                    overflows = self.overflows
                    state = self._state(wl)
                    cached = _SpanSlot(
                        cast(_Hist, self._slot(state, inst, _key(span, keys))), inst.bounds, wl.key
                    )
                    if self.overflows == overflows:
                        # Not an overflow series: those keep being counted per measurement.
                        self._span_slots[cache_key] = cached
                else:
                    self._states.move_to_end(cached.state_key)
                _observe(cached.hist, cached.bounds, seconds)
            edge: Key = (
                ("flowprobe.client.service", node.client_wl.name if node.client_wl else EXTERNAL),
                ("flowprobe.server.service", node.server_wl.name if node.server_wl else EXTERNAL),
                ("flowprobe.protocol", ex.protocol),
            )
            slots = self._edge_slots.get(edge) or self._edge(edge)
            f = ex.figures
            slots.exchanges[0] += 1
            slots.request_bytes[0] += f.client_bytes
            slots.response_bytes[0] += f.server_bytes
            _observe(slots.duration, _EDGE_DURATION_BOUNDS, seconds)
            agent = self._agent
            if failed:
                self._add(agent, EDGE_ERRORS, edge, 1)
            if f.retransmits:
                self._add(agent, EDGE_RETRANSMITS, edge, f.retransmits)
            if f.rtt_samples:
                rtt = slots.rtt
                if rtt is None:
                    rtt = slots.rtt = cast(_Hist, self._slot(agent, EDGE_RTT, edge))
                _observe(rtt, sc.RTT_BUCKETS, f.rtt_sum_us / f.rtt_samples / 1e6)

    def count(self, inst: Instrument, key: Key, value: float = 1) -> None:
        """A sum on the agent's resource measured off the span path (security/)."""
        with self._lock:
            self._add(self._agent, inst, key, value)

    # -- collection (metric thread) ---------------------------------------

    def collect(self) -> MetricsData:
        """Every workload's and the agent's metrics, as one OTLP request's worth."""
        now = time.time_ns()
        out: list[ResourceMetrics] = []
        # Outside the lock: a collector has its own and may call count().
        extra = [m for collect in self.collectors for m in collect(now)]
        with self._lock:
            self._edge_slots.clear()
            self._span_slots.clear()
            retired, self._retired = self._retired, []
            states = [*retired, *self._states.values(), self._agent]
            for state in states:
                metrics = self._metrics(state, now)
                if state is self._agent:
                    metrics += extra
                scopes = [ScopeMetrics(SCOPE, metrics, "")] if metrics else []
                if state is self._agent:
                    own = self._self_metrics(now)
                    if own:
                        scopes.append(ScopeMetrics(SELF_SCOPE, own, ""))
                if scopes:
                    out.append(ResourceMetrics(state.resource, scopes, ""))
        return MetricsData(resource_metrics=_merge(out))

    def _metrics(self, state: _State, now: int) -> list[Metric]:
        out: list[Metric] = []
        for series in state.series.values():
            inst = series.instrument
            if not series.values:
                continue
            if inst.bounds is not None:
                delta = self._delta_hist
                hpoints = [
                    HistogramDataPoint(
                        attributes=dict(key),
                        start_time_unix_nano=state.start_ns,
                        time_unix_nano=now,
                        count=h.count,
                        sum=h.total,
                        bucket_counts=list(h.counts),
                        explicit_bounds=inst.bounds,
                        min=h.lo,
                        max=h.hi,
                    )
                    for key, h in series.values.items()
                    if isinstance(h, _Hist)
                ]
                temporality = (
                    AggregationTemporality.DELTA if delta else AggregationTemporality.CUMULATIVE
                )
                out.append(
                    Metric(inst.name, inst.description, inst.unit, Histogram(hpoints, temporality))
                )
            else:
                delta = self._delta_sum
                npoints = [
                    NumberDataPoint(
                        attributes=dict(key),
                        start_time_unix_nano=state.start_ns,
                        time_unix_nano=now,
                        value=_number(v[0]),
                    )
                    for key, v in series.values.items()
                    if isinstance(v, list)
                ]
                temporality = (
                    AggregationTemporality.DELTA if delta else AggregationTemporality.CUMULATIVE
                )
                out.append(
                    Metric(inst.name, inst.description, inst.unit, Sum(npoints, temporality, True))
                )
            if delta:
                series.values.clear()
        if self._delta_hist or self._delta_sum:
            state.start_ns = now
        return out

    def _self_metrics(self, now: int) -> list[Metric]:
        if self.self_samples is None:
            return []
        by_name: dict[str, list[NumberDataPoint]] = {}
        start = self._self_start
        for name, labels, value in self.self_samples():
            key = (name, tuple(sorted(labels.items())))
            v = value
            if self._delta_sum and _SELF_KINDS.get(name) == "counter":
                v = value - self._self_last.get(key, 0.0)
                self._self_last[key] = value
            by_name.setdefault(name, []).append(
                NumberDataPoint(dict(labels), start, now, _number(v))
            )
        if self._delta_sum:
            self._self_start = now
        out = []
        for d in SELF_DEFINITIONS:
            points = by_name.get(d.name)
            if not points:
                continue
            data: Sum | Gauge
            if d.kind == "counter":
                temporality = (
                    AggregationTemporality.DELTA
                    if self._delta_sum
                    else AggregationTemporality.CUMULATIVE
                )
                data = Sum(points, temporality, True)
            else:
                data = Gauge(points)
            out.append(Metric(d.name, d.description, d.unit, data))
        return out

    def shutdown(self) -> None:
        with self._lock:
            self._states.clear()
            self._retired.clear()


_SELF_KINDS = {d.name: d.kind for d in SELF_DEFINITIONS}


def _number(v: float) -> int | float:
    return int(v) if float(v).is_integer() else v


def _merge(resource_metrics: list[ResourceMetrics]) -> list[ResourceMetrics]:
    """One entry per resource and scope: OTLP encoders key on them and would drop the rest.

    A workload dropped from the LRU and seen again before the next export is
    the case: two states, one resource.
    """
    by_resource: dict[Resource, dict[InstrumentationScope, list[Metric]]] = {}
    for rm in resource_metrics:
        scopes = by_resource.setdefault(rm.resource, {})
        for sm in rm.scope_metrics:
            scopes.setdefault(sm.scope, []).extend(sm.metrics)
    out = []
    for resource, scopes in by_resource.items():
        merged = []
        for scope, metrics in scopes.items():
            by_name: dict[str, Metric] = {}
            for m in metrics:
                prev = by_name.get(m.name)
                if prev is None:
                    by_name[m.name] = m
                else:
                    # Same instrument from two states: keep both point sets.
                    prev.data.data_points = [*prev.data.data_points, *m.data.data_points]  # type: ignore[misc]
            merged.append(ScopeMetrics(scope, list(by_name.values()), ""))
        out.append(ResourceMetrics(resource, merged, ""))
    return out
