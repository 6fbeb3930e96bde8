"""`make demo` exporting to real backends: Jaeger has every call as spans with the right
names, times and parents, Prometheus counts what the load generator sent, every dashboard
query has data, and a collector outage under load costs spans but never the capture."""

from __future__ import annotations

import json
import math
import os
import threading
import time
import urllib.parse
import urllib.request
import uuid
from collections import Counter
from collections.abc import Callable
from dataclasses import dataclass, field
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import Any

import pytest
from prometheus_client.parser import text_string_to_metric_families
from tests.backends.conftest import poll

from flowprobe.devenv import dashboards
from flowprobe.devenv.backends import LocalBackends, attributes_of, spans_of
from flowprobe.devenv.demo import Export, run_demo

pytestmark = [pytest.mark.backends, pytest.mark.capture, pytest.mark.netns, pytest.mark.slow]


# One connection: the api serves one request at a time, so every downstream
# call has exactly one request in flight around it and must be linked.
# 18 s of load spans several of the demo's 5 s metric exports, so rates exist.
REQUESTS, RATE, DNS_LOOKUPS = 450, 25.0, 60
GRAFANA = Path(__file__).resolve().parents[2] / "otel" / "grafana" / "dashboards"
KIND = {2: "server", "SPAN_KIND_SERVER": "server", 3: "client", "SPAN_KIND_CLIENT": "client"}
ERROR = (2, "STATUS_CODE_ERROR")
# No proxy for loopback, as in backends.py.
_OPENER = urllib.request.build_opener(urllib.request.ProxyHandler({}))


@dataclass
class Run:
    tag: str
    sent: dict[str, Any]
    exchanges: list[dict[str, Any]]
    started: float
    ended: float

    def svc(self, name: str) -> str:
        return f"{self.tag}-{name}"

    def of(self, *protocols: str) -> list[dict[str, Any]]:
        return [r for r in self.exchanges if r["flowprobe.protocol"] in protocols]


def export_to(b: LocalBackends, tag: str) -> Export:
    return Export(
        b.otlp_grpc,
        metrics_port=b.ports.agent_metrics,
        service_prefix=f"{tag}-",
        jaeger_url=b.jaeger_query_url,
        prometheus_url=b.prometheus_url,
    )


def demo_run(
    b: LocalBackends, out: Path, requests: int, rate: float, dns: int, connections: int
) -> Run:
    tag = f"d{uuid.uuid4().hex[:6]}"
    started = time.time()
    sent, records = run_demo(
        requests, rate, out, dns_lookups=dns, export=export_to(b, tag), connections=connections
    )
    exchanges = [r for r in records if r["flowprobe.record"] == "exchange"]
    return Run(tag, sent, exchanges, started, time.time())


@pytest.fixture(scope="module")
def demo(local_backends: LocalBackends, tmp_path_factory: pytest.TempPathFactory) -> Run:
    out = tmp_path_factory.mktemp("demo") / "exchanges.jsonl"
    return demo_run(local_backends, out, REQUESTS, RATE, DNS_LOOKUPS, connections=1)


def values_by(b: LocalBackends, query: str, label: str) -> dict[str, float]:
    return {r["metric"].get(label, ""): float(r["value"][1]) for r in b.prom_query(query)}


def wait_for_final_metrics(b: LocalBackends, run: Run, requests: int) -> None:
    """The agent's last export (at shutdown) carries the final counts."""
    q = (
        f'sum(flowprobe_edge_exchanges_total{{flowprobe_client_service="{run.svc("frontend")}", '
        f'flowprobe_server_service="{run.svc("api")}"}})'
    )
    got = poll(lambda: values_by(b, q, ""), lambda v: v.get("") == requests)
    assert got == {"": requests}, got


# -- (a) Jaeger ----------------------------------------------------------------


def _key(kind: str, attrs: dict[str, Any], start_us: int) -> tuple[str, str, int, int]:
    return kind, str(attrs["client.address"]), int(attrs["client.port"]), start_us


def test_jaeger_has_every_call_with_names_times_and_parents(
    local_backends: LocalBackends, demo: Run
) -> None:
    b = local_backends
    http, db, dns = demo.of("http"), demo.of("postgresql", "redis"), demo.of("dns")
    assert len(http) == REQUESTS and len(dns) == DNS_LOOKUPS
    assert {r["flowprobe.protocol"] for r in demo.exchanges} == {
        "http",
        "postgresql",
        "redis",
        "dns",
    }
    # frontend -> api: CLIENT + SERVER; the api's DB calls and frontend's lookups: CLIENT.
    expected = 2 * len(http) + len(db) + len(dns)
    start = datetime.fromtimestamp(demo.started, UTC) - timedelta(minutes=1)
    end = datetime.fromtimestamp(demo.ended, UTC) + timedelta(minutes=1)
    # Every trace has a frontend span at its root: HTTP calls and DNS lookups.
    spans = poll(
        lambda: spans_of(b.jaeger_traces(demo.svc("frontend"), start, end, num_traces=5000)),
        lambda s: len(s) >= expected,
    )
    assert len(spans) == expected

    index: dict[tuple[str, str, int, int], dict[str, Any]] = {}
    for s in spans:
        s["attrs"] = attributes_of(s["attributes"])
        k = _key(KIND[s["kind"]], s["attrs"], int(s["startTimeUnixNano"]) // 1000)
        assert k not in index, k
        index[k] = s

    def span_of(kind: str, r: dict[str, Any]) -> dict[str, Any]:
        s = index[_key(kind, r, r["start_time_unix_us"])]
        # Capture times, to the microsecond: the exchange record's duration.
        duration_ns = int(s["endTimeUnixNano"]) - int(s["startTimeUnixNano"])
        assert duration_ns == (r["end_time_unix_us"] - r["start_time_unix_us"]) * 1000
        assert int(s["attrs"]["flowprobe.duration_us"]) == r["flowprobe.duration_us"]
        failed = s.get("status", {}).get("code") in ERROR
        return {**s, "failed": failed}

    servers = {}
    for r in http:
        server, client = span_of("server", r), span_of("client", r)
        status = r["http.response.status_code"]
        for s, svc in ((server, "api"), (client, "frontend")):
            assert s["name"] == "GET /orders/{id}"
            assert s["resource"]["service.name"] == demo.svc(svc)
            a = s["attrs"]
            assert a["http.route"] == "/orders/{id}"
            assert a["http.request.method"] == "GET"
            assert int(a["http.response.status_code"]) == status
            assert a["url.path"] == r["url.path"]
            assert s["failed"] == (status >= 500)
        assert not client.get("parentSpanId")
        assert (server["traceId"], server["parentSpanId"]) == (client["traceId"], client["spanId"])
        servers[id(r)] = server

    for r in db:
        s = span_of("client", r)
        op, coll = r["db.operation.name"], r.get("db.collection.name")
        assert s["name"] == (f"{op} {coll}" if coll else op)
        assert s["resource"]["service.name"] == demo.svc("api")
        assert s["attrs"]["db.system.name"] == r["flowprobe.protocol"]
        assert s["attrs"]["db.operation.name"] == op
        assert s["failed"] == (r["flowprobe.outcome"] == "error")
        if coll == "missing_table":
            assert s["attrs"]["db.response.status_code"] == "42P01"
            assert s["attrs"]["error.type"] == "42P01"
        # The one request in flight around the call is its parent.
        around = [
            h
            for h in http
            if h["start_time_unix_us"] < r["start_time_unix_us"]
            and h["end_time_unix_us"] > r["end_time_unix_us"]
        ]
        assert len(around) == 1, r
        parent = servers[id(around[0])]
        assert (s["traceId"], s.get("parentSpanId")) == (parent["traceId"], parent["spanId"])
        assert s["attrs"]["flowprobe.parent.rule"] == "in_flight"

    for r in dns:
        s = span_of("client", r)
        assert s["name"] == "A lookup"
        assert s["resource"]["service.name"] == demo.svc("frontend")
        assert s["attrs"]["dns.question.name"] == r["dns.question.name"]
        assert s["failed"] == (r["flowprobe.dns.response_code"] != "NOERROR")
        assert not s.get("parentSpanId"), "the frontend serves nothing: lookups are roots"

    by_name = Counter(s["name"] for s in spans)
    selects = by_name["SELECT orders"] + by_name["SELECT missing_table"]
    assert selects == by_name["INCRBY"] == by_name["GET"] == REQUESTS


# -- (b) Prometheus ------------------------------------------------------------


def test_prometheus_counts_equal_what_the_load_generator_sent(
    local_backends: LocalBackends, demo: Run
) -> None:
    b = local_backends
    wait_for_final_metrics(b, demo, REQUESTS)
    api, frontend = demo.svc("api"), demo.svc("frontend")
    by_status = {k: float(v) for k, v in demo.sent["http"].items()}
    failed = by_status.get("500", 0.0)
    assert failed, "the demo app answers /orders/0 with a 500"

    server = values_by(
        b,
        "sum by (http_response_status_code) "
        f'(http_server_request_duration_seconds_count{{job="{api}"}})',
        "http_response_status_code",
    )
    client = values_by(
        b,
        "sum by (http_response_status_code) "
        f'(http_client_request_duration_seconds_count{{job="{frontend}"}})',
        "http_response_status_code",
    )
    assert server == client == by_status

    edge = f'flowprobe_client_service="{frontend}", flowprobe_server_service="{api}"'
    ratio = values_by(
        b,
        f"sum(flowprobe_edge_errors_total{{{edge}}}) / sum(flowprobe_edge_exchanges_total{{{edge}}})",
        "",
    )
    semconv_ratio = values_by(
        b,
        f'sum(http_server_request_duration_seconds_count{{job="{api}", '
        f'http_response_status_code=~"5.."}}) / '
        f'sum(http_server_request_duration_seconds_count{{job="{api}"}})',
        "",
    )
    assert ratio == semconv_ratio == {"": failed / REQUESTS}

    pg = values_by(
        b,
        "sum by (db_collection_name) (db_client_operation_duration_seconds_count"
        f'{{job="{api}", db_system_name="postgresql", db_operation_name="SELECT"}})',
        "db_collection_name",
    )
    assert pg == {"orders": by_status["200"], "missing_table": failed}
    pg_errors = values_by(
        b,
        "sum by (error_type) (db_client_operation_duration_seconds_count"
        f'{{job="{api}", db_system_name="postgresql", error_type!=""}})',
        "error_type",
    )
    assert pg_errors == {"42P01": failed}
    redis = values_by(
        b,
        "sum by (db_operation_name) (db_client_operation_duration_seconds_count"
        f'{{job="{api}", db_system_name="redis"}})',
        "db_operation_name",
    )
    assert redis["INCRBY"] == redis["GET"] == REQUESTS

    lookups = values_by(
        b,
        f'sum by (error_type) (dns_lookup_duration_seconds_count{{job="{frontend}"}})',
        "error_type",
    )
    want = {("" if k == "NOERROR" else k): float(v) for k, v in demo.sent["dns"].items()}
    assert lookups == want
    assert sum(want.values()) == DNS_LOOKUPS


def _finite(result: list[dict[str, Any]]) -> int:
    points = [r["value"] for r in result if "value" in r]
    points += [p for r in result for p in r.get("values", [])]
    return sum(1 for _, v in points if math.isfinite(float(v)))


def test_every_dashboard_query_returns_data_for_the_demo(
    local_backends: LocalBackends, demo: Run
) -> None:
    b = local_backends
    wait_for_final_metrics(b, demo, REQUESTS)
    now = time.time()
    # The panels' variables, narrowed to this run so other tests' series
    # cannot stand in for the demo's.
    ours = {
        "client": f"{demo.tag}-.*",
        "server": f"{demo.tag}-.*",
        "workload": f"{demo.tag}-.*",
        "trace_service": demo.svc("api"),
    }
    builtins = {
        # What Grafana derives from a 15 s scrape interval; it has to span
        # two of the demo's 5 s metric exports to see an increase.
        "__rate_interval": "1m",
        "__interval": "5s",
        "__range": f"{math.ceil(now - demo.started)}s",
    }
    empty: list[str] = []
    checked = 0
    for path in sorted(GRAFANA.glob("*.json")):
        doc = json.loads(path.read_text())
        variables = dashboards.variable_values(doc)
        variables.update({k: v for k, v in ours.items() if k in _names(doc)})
        for q in dashboards.label_values_queries(doc):
            if not b.prom_query(q):
                empty.append(f"{path.name}: variable {q}")
        for pq in dashboards.queries(doc):
            expr = dashboards.substitute(pq.expr, variables, builtins)
            if pq.instant:
                result = b.prom_query(expr)
            else:
                result = b.prom_query_range(expr, demo.started, now, step=2)
            checked += 1
            # NaN only (0/0, a quantile of nothing) draws nothing: no data.
            if not _finite(result):
                empty.append(f"{pq.dashboard} / {pq.panel} [{pq.ref}]: {expr}")
    assert checked > 50
    assert not empty, "queries without data:\n" + "\n".join(empty)
    # The top-N panels fall back to 0 where a metric has no member: the gauges
    # themselves must arrive under the names they use.
    for metric in dashboards.TOP_METRICS.values():
        if metric in (
            "flowprobe_top_requests",
            "flowprobe_top_bytes",
            "flowprobe_top_latency_seconds",
        ):
            assert b.prom_query(f'{metric}{{flowprobe_top_member=~"{demo.tag}-.*"}}'), metric

    # The traces panel: Grafana's Jaeger data source calls /api/traces.
    params = {
        "service": demo.svc("api"),
        "limit": "20",
        "start": str(int(demo.started * 1e6)),
        "end": str(int(now * 1e6)),
    }
    url = f"{b.jaeger_query_url}/api/traces?{urllib.parse.urlencode(params)}"
    with _OPENER.open(url, timeout=10) as resp:
        traces = json.load(resp)["data"]
    assert len(traces) == 20


def _names(doc: dict[str, Any]) -> set[str]:
    return {str(v["name"]) for v in doc["templating"]["list"]}


# -- (c) the collector goes away under load ------------------------------------

FAULT_REQUESTS, FAULT_RATE, FAULT_DNS = 1000, 20.0, 50  # 50 s of load
OUTAGE_S = 30.0
SAMPLE_S = 0.5


@dataclass
class Sample:
    at: float
    rss_kb: int | None
    metrics: dict[tuple[str, str], float] | None


@dataclass(eq=False)  # threading keeps threads in dicts: they must stay hashable
class Outage(threading.Thread):
    """Stops the collector for OUTAGE_S once the agent captures, sampling the agent meanwhile."""

    backends: LocalBackends
    out: Path
    samples: list[Sample] = field(default_factory=list)
    down_at: float = 0.0
    up_at: float = 0.0
    error: BaseException | None = None
    done: threading.Event = field(default_factory=threading.Event)

    def __post_init__(self) -> None:
        super().__init__(name="collector-outage", daemon=True)

    @property
    def metrics_url(self) -> str:
        return f"http://127.0.0.1:{self.backends.ports.agent_metrics}/metrics"

    def run(self) -> None:
        try:
            self._run()
        except BaseException as exc:
            self.error = exc
        finally:
            # Never leave the session's backends without their collector.
            if self.down_at and not self.up_at:
                self.backends.start_collector()
                self.up_at = time.time()

    def _run(self) -> None:
        pid = None
        while not self.done.is_set():
            m = self.scrape()
            if m and m.get(("flowprobe_agent_exchanges_total", ""), 0) > 0:
                pid = agent_pid(self.out)
                break
            time.sleep(0.2)
        if pid is None:
            return
        self.sample_for(5.0, pid)
        self.down_at = time.time()
        self.backends.stop_collector()
        self.sample_for(OUTAGE_S, pid)
        self.backends.start_collector()
        self.up_at = time.time()
        while not self.done.is_set():
            self.sample(pid)
            time.sleep(SAMPLE_S)

    def sample_for(self, seconds: float, pid: int) -> None:
        end = time.monotonic() + seconds
        while time.monotonic() < end and not self.done.is_set():
            self.sample(pid)
            time.sleep(SAMPLE_S)

    def sample(self, pid: int) -> None:
        self.samples.append(Sample(time.time(), rss_kb(pid), self.scrape()))

    def scrape(self) -> dict[tuple[str, str], float] | None:
        try:
            with _OPENER.open(self.metrics_url, timeout=2) as resp:
                text = resp.read().decode()
        except OSError:
            return None
        out: dict[tuple[str, str], float] = {}
        for family in text_string_to_metric_families(text):
            for s in family.samples:
                label = ",".join(f"{k}={v}" for k, v in sorted(s.labels.items()))
                out[(s.name, label)] = s.value
        return out


def agent_pid(out: Path) -> int | None:
    """The demo's agent: the process whose command line has our output file."""
    for entry in os.listdir("/proc"):
        if not entry.isdigit():
            continue
        try:
            argv = Path(f"/proc/{entry}/cmdline").read_bytes().split(b"\0")
        except OSError:
            continue
        if b"flowprobe.agent" in argv and str(out).encode() in argv:
            return int(entry)
    return None


def rss_kb(pid: int) -> int | None:
    try:
        for line in Path(f"/proc/{pid}/status").read_text().splitlines():
            if line.startswith("VmRSS:"):
                return int(line.split()[1])
    except OSError:
        return None
    return None


def test_collector_outage_under_load_loses_spans_not_the_capture(
    local_backends: LocalBackends, tmp_path: Path, record_property: Callable[[str, object], None]
) -> None:
    b = local_backends
    out = tmp_path / "exchanges.jsonl"
    outage = Outage(b, out)
    outage.start()
    try:
        run = demo_run(b, out, FAULT_REQUESTS, FAULT_RATE, FAULT_DNS, connections=2)
    finally:
        outage.done.set()
        outage.join(120)
    assert outage.error is None, outage.error
    assert outage.down_at and outage.up_at, "the agent never reported an exchange"

    # The capture went on: every call is in the JSON Lines output.
    http = run.of("http")
    assert Counter(str(r["http.response.status_code"]) for r in http) == Counter(run.sent["http"])
    assert len(http) == FAULT_REQUESTS
    assert Counter(r["flowprobe.dns.response_code"] for r in run.of("dns")) == Counter(
        run.sent["dns"]
    )
    selects = [r for r in run.of("postgresql") if r["db.operation.name"] == "SELECT"]
    assert len(selects) == FAULT_REQUESTS
    assert http[0]["start_time_unix_us"] / 1e6 < outage.down_at
    assert http[-1]["start_time_unix_us"] / 1e6 > outage.up_at

    live = [s for s in outage.samples if s.metrics is not None]
    before = [s for s in live if s.at < outage.down_at]
    after = [s for s in live if s.at > outage.up_at]
    assert before and after

    def value(s: Sample, name: str, label: str) -> float:
        assert s.metrics is not None
        return s.metrics.get((name, label), 0.0)

    # The drop counters rose while the collector was away.
    dropped = "flowprobe_agent_spans_dropped_total", "reason=export_failed"
    failures = "flowprobe_agent_export_failures_total", "signal=traces"
    assert value(before[-1], *dropped) == 0
    assert value(after[-1], *dropped) > 0
    assert value(after[-1], *failures) > 0

    # Memory stayed bounded: what the outage added is far below the span
    # queue's worst case (16384 spans) and stops growing once export resumes.
    rss = [(s.at, s.rss_kb) for s in outage.samples if s.rss_kb is not None]
    base = max(kb for at, kb in rss if at < outage.down_at)
    during = max(kb for at, kb in rss if outage.down_at <= at <= outage.up_at)
    peak = max(kb for _, kb in rss)
    last = rss[-1][1]
    record_property("agent_rss_kb", {"before": base, "outage": during, "peak": peak, "last": last})
    print(f"agent RSS kB: before {base}, outage max {during}, peak {peak}, last {last}")
    assert peak - base < 64 * 1024

    # Export resumed by itself: from the first sample showing new exports
    # after the restart, every request's SERVER span reached Jaeger.
    exported = "flowprobe_agent_spans_exported_total", ""
    at_restart = value(after[0], *exported)
    resumed = next((s.at for s in after if value(s, *exported) > at_restart), None)
    assert resumed is not None, "no span exported after the collector came back"
    later = [r for r in http if r["start_time_unix_us"] / 1e6 > resumed]
    assert later
    start = datetime.fromtimestamp(resumed, UTC)
    end = datetime.fromtimestamp(run.ended, UTC) + timedelta(minutes=1)

    def servers() -> set[int]:
        spans = spans_of(b.jaeger_traces(run.svc("api"), start, end, num_traces=5000))
        return {int(s["startTimeUnixNano"]) // 1000 for s in spans if KIND[s["kind"]] == "server"}

    want = {r["start_time_unix_us"] for r in later}
    got = poll(servers, lambda g: want <= g)
    assert want <= got, f"{len(want - got)} of {len(want)} requests after the restart missing"

    # Cumulative counters: the drops reached Prometheus once the collector was back.
    q = 'flowprobe_agent_spans_dropped_total{job="flowprobe-agent", reason="export_failed"}'
    res = poll(lambda: values_by(b, q, "reason"), lambda v: v.get("export_failed", 0) > 0)
    assert res.get("export_failed", 0) > 0
