"""Semconv histograms per workload, RED per edge, the agent's own metrics over OTLP."""

from __future__ import annotations

from typing import Any

from opentelemetry.sdk.metrics.export import HistogramDataPoint, NumberDataPoint
from opentelemetry.sdk.resources import Resource

from flowprobe.agent.config import ExportConfig
from flowprobe.agent.export import semconv as sc
from flowprobe.agent.export.metrics import Metrics
from flowprobe.agent.export.spans import NodeFactory, SpanBuilder
from flowprobe.agent.export.workloads import AddressResolver
from flowprobe.agent.sessionize.records import Exchange, Outcome, TcpFigures
from tests.agent.export.fakes import MemoryMetricExporter, exchange, run_telemetry

T0 = 1_700_000_000_000_000


def http(path: str, client: str, code: int = 200, dur_us: int = 30_000, **kw: Any) -> Any:
    return exchange(
        client=(client, 40000),
        start_us=T0,
        end_us=T0 + dur_us,
        attrs={
            "http.request.method": "GET",
            "url.path": path,
            "url.query": "q=1",
            "network.protocol.version": "1.1",
            "http.response.status_code": code,
        },
        outcome=Outcome.ERROR if code >= 500 else Outcome.OK,
        error_type=str(code) if code >= 500 else None,
        **kw,
    )


def test_http_histograms_use_the_route_and_the_workload_resource() -> None:
    exs = [
        http("/items/1", "10.0.0.1", dur_us=30_000),
        http("/items/2", "10.0.0.9", dur_us=70_000),
        http("/items/3", "10.0.0.1", code=503, dur_us=2_000),
    ]
    _, m, _ = run_telemetry(exs)
    server = m.points(sc.HTTP_SERVER_REQUEST_DURATION)
    assert {r["service.name"] for r, _, _ in server} == {"10.0.0.2:8080"}
    by_code = {a["http.response.status_code"]: (a, p) for _, a, p in server}
    ok_attrs, ok = by_code[200]
    assert ok_attrs == {
        "http.request.method": "GET",
        "http.route": "/items/{id}",
        "http.response.status_code": 200,
        "url.scheme": "http",
        "network.protocol.name": "http",
        "network.protocol.version": "1.1",
    }
    assert isinstance(ok, HistogramDataPoint)
    assert ok.count == 2  # two raw paths, one route, two clients: one series
    assert abs(ok.sum - 0.1) < 1e-9
    assert tuple(ok.explicit_bounds) == sc.HTTP_DURATION_BUCKETS
    assert by_code[503][0]["error.type"] == "503"
    assert m.metric(sc.HTTP_SERVER_REQUEST_DURATION).unit == "s"

    client = m.points(sc.HTTP_CLIENT_REQUEST_DURATION)
    assert {r["service.name"] for r, _, _ in client} == {"10.0.0.1", "10.0.0.9"}
    for _, a, _ in client:
        assert a["server.address"] == "10.0.0.2" and a["server.port"] == 8080
        assert "url.path" not in a and "client.address" not in a and "http.route" not in a


def test_rpc_db_and_dns_histograms() -> None:
    grpc = exchange(
        "grpc",
        server=("10.0.0.3", 50051),
        attrs={
            "rpc.system": "grpc",
            "rpc.service": "shop.Cart",
            "rpc.method": "Get",
            "rpc.grpc.status_code": 5,
        },
        outcome=Outcome.ERROR,
        error_type="NOT_FOUND",
    )
    pg = exchange(
        "postgresql",
        server=("10.0.0.5", 5432),
        end_us=T0 + 3_000,
        start_us=T0,
        attrs={
            "db.system.name": "postgresql",
            "db.operation.name": "SELECT",
            "db.collection.name": "orders",
            "db.query.text": "SELECT * FROM orders WHERE id = ?",
            "db.namespace": "shop",
        },
    )
    dns = exchange(
        "dns",
        server=("10.0.0.10", 53),
        transport="udp",
        attrs={"dns.question.name": "x.example", "flowprobe.dns.question.type": "A"},
    )
    _, m, _ = run_telemetry([grpc, pg, dns])
    ((res, a, p),) = m.points(sc.RPC_SERVER_CALL_DURATION)
    assert res["service.name"] == "10.0.0.3:50051"
    assert a == {
        "rpc.system": "grpc",
        "rpc.service": "shop.Cart",
        "rpc.method": "Get",
        "rpc.grpc.status_code": 5,
    }  # NOT_FOUND is not a server error
    ((_, a, _),) = m.points(sc.RPC_CLIENT_CALL_DURATION)
    assert a["error.type"] == "NOT_FOUND"
    ((res, a, p),) = m.points(sc.DB_CLIENT_OPERATION_DURATION)
    assert res["service.name"] == "10.0.0.1"
    assert a == {
        "db.system.name": "postgresql",
        "db.operation.name": "SELECT",
        "db.collection.name": "orders",
        "db.namespace": "shop",
        "server.address": "10.0.0.5",
        "server.port": 5432,
    }
    assert tuple(p.explicit_bounds) == sc.DB_DURATION_BUCKETS
    ((res, a, _),) = m.points(sc.DNS_LOOKUP_DURATION)
    assert a == {"flowprobe.dns.question.type": "A"}


def test_edge_metrics_are_red_per_client_server_pair() -> None:
    figures = TcpFigures(
        client_bytes=100, server_bytes=1000, retransmits=2, rtt_samples=4, rtt_sum_us=800
    )
    exs = [
        http("/a", "10.0.0.1", figures=figures),
        http("/b", "10.0.0.1", code=500, figures=figures),
        http("/c", "10.0.0.1", code=404),  # the caller's failure, not the edge's
    ]
    cfg = ExportConfig(service_names={"10.0.0.1": "frontend", "10.0.0.2:8080": "api"})
    _, m, _ = run_telemetry(exs, cfg)
    edge = {
        "flowprobe.client.service": "frontend",
        "flowprobe.server.service": "api",
        "flowprobe.protocol": "http",
    }

    def value(name: str, extra: dict[str, str] | None = None) -> Any:
        (pt,) = [p for r, a, p in m.points(name) if a == {**edge, **(extra or {})}]
        # Edges describe the observation, so they carry the agent's resource.
        return pt

    exchanges = value("flowprobe.edge.exchanges")
    assert isinstance(exchanges, NumberDataPoint) and exchanges.value == 3
    assert value("flowprobe.edge.errors").value == 1
    assert value("flowprobe.edge.retransmits").value == 4
    assert value("flowprobe.edge.bytes", {"flowprobe.direction": "request"}).value == 200 + 80
    assert value("flowprobe.edge.bytes", {"flowprobe.direction": "response"}).value == 2300
    rtt = value("flowprobe.edge.rtt")
    assert rtt.count == 3 and tuple(rtt.explicit_bounds) == sc.RTT_BUCKETS
    assert value("flowprobe.edge.duration").count == 3
    agents = {r["service.name"] for r, _, _ in m.points("flowprobe.edge.exchanges")}
    assert agents == {"flowprobe-agent"}


def test_agent_self_metrics_go_over_otlp_too() -> None:
    _, m, _ = run_telemetry([http("/a", "10.0.0.1")])
    ((res, _, exported),) = m.points("flowprobe.agent.spans.exported")
    assert res["service.name"] == "flowprobe-agent"
    assert "service.instance.id" in res
    assert exported.value == 2
    queues = {a["queue"] for _, a, _ in m.points("flowprobe.agent.queue.capacity")}
    assert queues == {"exchanges", "spans", "linker"}


def test_evicted_workloads_are_still_exported_once() -> None:
    exs = [
        exchange(
            server=(f"10.0.1.{i}", 8080), attrs={"http.request.method": "GET", "url.path": "/"}
        )
        for i in range(6)
    ]
    _, m, tel = run_telemetry(exs, ExportConfig(max_workloads=2))
    servers = {r["service.name"] for r, _, _ in m.points(sc.HTTP_SERVER_REQUEST_DURATION)}
    assert servers == {f"10.0.1.{i}:8080" for i in range(6)}
    assert tel.metrics.workloads <= 2
    assert tel.metrics.evictions > 0


def test_semconv_names_match_the_installed_conventions() -> None:
    from opentelemetry.semconv._incubating.metrics import dns_metrics, rpc_metrics
    from opentelemetry.semconv.attributes import error_attributes, http_attributes
    from opentelemetry.semconv.metrics import db_metrics, http_metrics

    assert sc.HTTP_SERVER_REQUEST_DURATION == http_metrics.HTTP_SERVER_REQUEST_DURATION
    assert sc.HTTP_CLIENT_REQUEST_DURATION == http_metrics.HTTP_CLIENT_REQUEST_DURATION
    assert sc.DB_CLIENT_OPERATION_DURATION == db_metrics.DB_CLIENT_OPERATION_DURATION
    assert sc.RPC_SERVER_CALL_DURATION == rpc_metrics.RPC_SERVER_CALL_DURATION
    assert sc.DNS_LOOKUP_DURATION == dns_metrics.DNS_LOOKUP_DURATION
    assert sc.HTTP_ROUTE == http_attributes.HTTP_ROUTE
    assert sc.ERROR_TYPE == error_attributes.ERROR_TYPE


def _record(metrics: Metrics, exs: list[Exchange]) -> None:
    """Exchanges straight into ``metrics``, as the export's process thread records them."""
    builder, factory, resolver = SpanBuilder(), NodeFactory(b"test"), AddressResolver()
    for ex in exs:
        ep = ex.endpoints
        node = factory.node(
            ex, resolver.client(ep.client_address), resolver.server(ep.server_address, 8080)
        )
        node.trace_id = node.own_trace_id
        metrics.record(node, builder.build(node))


def _histograms(metrics: Metrics, name: str) -> dict[tuple[str, Any, Any, Any], int]:
    """(service.name, route or server.address, status code, error.type) -> count, collected now."""
    exporter = MemoryMetricExporter()
    exporter.export(metrics.collect())
    return {
        (
            res["service.name"],
            a.get("http.route", a.get("server.address")),
            a.get("http.response.status_code"),
            a.get("error.type"),
        ): p.count
        for res, a, p in exporter.points(name)
    }


def test_repeated_series_are_found_again_with_each_span_s_own_error() -> None:
    # A 404 fails the CLIENT span but not the SERVER span: the series found
    # for one must not serve the other, nor the 200s.
    exs = [
        http("/a", "10.0.0.1", code=404),
        http("/a", "10.0.0.1"),
        http("/a", "10.0.0.1", code=404),
    ]
    metrics = Metrics(Resource({}))
    _record(metrics, exs)
    assert _histograms(metrics, sc.HTTP_CLIENT_REQUEST_DURATION) == {
        ("10.0.0.1", "10.0.0.2", 404, "404"): 2,
        ("10.0.0.1", "10.0.0.2", 200, None): 1,
    }
    assert _histograms(metrics, sc.HTTP_SERVER_REQUEST_DURATION) == {
        ("10.0.0.2:8080", "/a", 404, None): 2,
        ("10.0.0.2:8080", "/a", 200, None): 1,
    }
    # The next collection starts from the series, not from what was found before.
    _record(metrics, exs[:1])
    assert (
        _histograms(metrics, sc.HTTP_CLIENT_REQUEST_DURATION)[("10.0.0.1", "10.0.0.2", 404, "404")]
        == 3
    )


def test_series_beyond_the_limit_go_to_the_overflow_series_every_time() -> None:
    metrics = Metrics(Resource({}), max_series=1)
    _record(metrics, [http(p, "10.0.0.1") for p in ("/a", "/b", "/a", "/b", "/c")])
    assert _histograms(metrics, sc.HTTP_SERVER_REQUEST_DURATION) == {
        ("10.0.0.2:8080", "/a", 200, None): 2,
        ("10.0.0.2:8080", None, None, None): 3,  # otel.metric.overflow=true, no other attribute
    }
    assert metrics.overflows >= 3
