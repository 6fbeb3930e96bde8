"""The span model: names, kinds, resources, capture timestamps, attributes, status, events."""

from __future__ import annotations

from opentelemetry.sdk.trace import ReadableSpan
from opentelemetry.trace import SpanKind, StatusCode

from flowprobe.agent.config import ExportConfig
from flowprobe.agent.export.workloads import Workload
from flowprobe.agent.sessionize.records import Outcome
from tests.agent.export.fakes import exchange, run_telemetry

T0 = 1_700_000_000_123_456


def by_kind(spans: list[ReadableSpan]) -> dict[SpanKind, ReadableSpan]:
    out = {s.kind: s for s in spans}
    assert len(out) == len(spans), spans
    return out


def service(span: ReadableSpan) -> str:
    return str(span.resource.attributes["service.name"])


def test_http_exchange_is_a_client_span_parent_of_a_server_span() -> None:
    ex = exchange(
        start_us=T0,
        end_us=T0 + 4_321,
        attrs={
            "http.request.method": "GET",
            "url.path": "/orders/8f14e45fceea167a5a36dedd4bea2543/items/42",
            "url.query": "page=2&Signature=secret",
            "network.protocol.version": "1.1",
            "http.request.header.host": "shop:8080",
            "http.response.status_code": 200,
        },
        events=[(T0 + 1_000, "tcp.retransmission"), (T0 + 2_000, "tcp.zero_window")],
    )
    spans, _, _ = run_telemetry([ex])
    k = by_kind(spans)
    client, server = k[SpanKind.CLIENT], k[SpanKind.SERVER]
    for s in (client, server):
        assert s.name == "GET /orders/{id}/items/{id}"
        # Capture time, to the nanosecond (capture resolution is µs).
        assert s.start_time == T0 * 1000
        assert s.end_time == (T0 + 4_321) * 1000
        a = s.attributes
        assert a is not None
        assert a["http.route"] == "/orders/{id}/items/{id}"
        assert a["url.path"] == "/orders/8f14e45fceea167a5a36dedd4bea2543/items/42"
        assert a["url.query"] == "page=2&Signature=REDACTED"
        assert list(a["http.request.header.host"]) == ["shop:8080"]  # type: ignore[arg-type]
        assert (a["server.address"], a["server.port"]) == ("shop", 8080)
        # The XPM figures are on every span.
        assert a["flowprobe.server_response_time_us"] == 4_121
        assert a["flowprobe.tcp.handshake.server_us"] == 40
        assert a["flowprobe.tcp.handshake.client_us"] == 30
        assert a["flowprobe.tcp.rtt.mean_us"] == 100
        assert a["flowprobe.tcp.retransmits"] == 0
        assert a["flowprobe.request.bytes"] == 80
        assert a["flowprobe.response.bytes"] == 300
        assert [(e.name, e.timestamp) for e in s.events] == [
            ("tcp.retransmission", (T0 + 1_000) * 1000),
            ("tcp.zero_window", (T0 + 2_000) * 1000),
        ]
        assert s.status.status_code is StatusCode.UNSET
        assert s.instrumentation_scope is not None
        assert s.instrumentation_scope.name == "flowprobe.agent"
    assert service(client) == "10.0.0.1"
    assert service(server) == "10.0.0.2:8080"
    assert client.parent is None
    assert server.parent is not None
    assert server.parent.span_id == client.context.span_id
    assert server.context.trace_id == client.context.trace_id
    assert client.attributes is not None and server.attributes is not None
    assert client.attributes["network.peer.address"] == "10.0.0.2"
    assert client.attributes["url.full"] == (
        "http://shop:8080/orders/8f14e45fceea167a5a36dedd4bea2543/items/42"
        "?page=2&Signature=REDACTED"
    )
    assert server.attributes["network.peer.address"] == "10.0.0.1"
    assert server.attributes["network.local.address"] == "10.0.0.2"
    assert server.attributes["flowprobe.parent.rule"] == "same_exchange"


def test_http_status_rules_differ_between_client_and_server() -> None:
    def statuses(code: int) -> dict[SpanKind, tuple[StatusCode, object]]:
        ex = exchange(
            attrs={
                "http.request.method": "POST",
                "url.path": "/x",
                "http.response.status_code": code,
            },
            error_type=str(code) if code >= 500 else None,
            outcome=Outcome.ERROR if code >= 500 else Outcome.OK,
        )
        spans, _, _ = run_telemetry([ex])
        return {
            s.kind: (s.status.status_code, (s.attributes or {}).get("error.type")) for s in spans
        }

    assert statuses(404) == {
        SpanKind.CLIENT: (StatusCode.ERROR, "404"),
        SpanKind.SERVER: (StatusCode.UNSET, None),
    }
    assert statuses(503) == {
        SpanKind.CLIENT: (StatusCode.ERROR, "503"),
        SpanKind.SERVER: (StatusCode.ERROR, "503"),
    }
    assert statuses(302) == {
        SpanKind.CLIENT: (StatusCode.UNSET, None),
        SpanKind.SERVER: (StatusCode.UNSET, None),
    }


def test_no_answer_is_an_error_on_both_sides() -> None:
    for outcome, err in (
        (Outcome.TIMEOUT, "timeout"),
        (Outcome.RESET, "connection_reset"),
        (Outcome.NO_RESPONSE, "no_response"),
    ):
        ex = exchange(
            attrs={"http.request.method": "GET", "url.path": "/slow"},
            outcome=outcome,
            error_type=err,
        )
        spans, _, _ = run_telemetry([ex])
        assert len(spans) == 2
        for s in spans:
            assert s.status.status_code is StatusCode.ERROR
            assert s.status.description == err
            assert (s.attributes or {})["error.type"] == err


def test_unknown_method_is_other_and_route_patterns_win() -> None:
    exs = [
        exchange(attrs={"http.request.method": "PURGE", "url.path": "/cache/7"}),
        exchange(attrs={"http.request.method": "GET", "url.path": "/users/alice/cart"}),
        exchange(attrs={"http.request.method": "GET", "url.path": "/static/js/app.js"}),
        exchange(attrs={"http.request.method": "GET", "url.path": "/users/alice"}),
    ]
    cfg = ExportConfig(routes=("/users/{name}/cart", "/static/*"))
    spans, _, _ = run_telemetry(exs, cfg)
    servers = [s for s in spans if s.kind is SpanKind.SERVER]
    assert [s.name for s in servers] == [
        "_OTHER /cache/{id}",
        "GET /users/{name}/cart",
        "GET /static/*",
        "GET /users/alice",
    ]
    a = servers[0].attributes or {}
    assert a["http.request.method"] == "_OTHER"
    assert a["http.request.method_original"] == "PURGE"
    assert [(s.attributes or {})["flowprobe.http.route.source"] for s in servers] == [
        "heuristic",
        "pattern",
        "pattern",
        "heuristic",
    ]


def test_grpc_span_names_attributes_and_status() -> None:
    def grpc(code: int) -> dict[SpanKind, ReadableSpan]:
        ex = exchange(
            "grpc",
            server=("10.0.0.3", 50051),
            attrs={
                "rpc.system": "grpc",
                "rpc.service": "shop.Cart",
                "rpc.method": "AddItem",
                "rpc.grpc.status_code": code,
                "network.protocol.name": "http",
                "network.protocol.version": "2",
            },
        )
        spans, _, _ = run_telemetry([ex])
        return by_kind(spans)

    ok = grpc(0)
    assert {s.name for s in ok.values()} == {"shop.Cart/AddItem"}
    a = ok[SpanKind.SERVER].attributes or {}
    assert (a["rpc.system"], a["rpc.service"], a["rpc.method"]) == ("grpc", "shop.Cart", "AddItem")
    assert a["rpc.grpc.status_code"] == 0
    assert all(s.status.status_code is StatusCode.UNSET for s in ok.values())
    # NOT_FOUND is the caller's failure only; INTERNAL is the server's too.
    nf = grpc(5)
    assert nf[SpanKind.CLIENT].status.status_code is StatusCode.ERROR
    assert nf[SpanKind.CLIENT].status.description == "NOT_FOUND"
    assert nf[SpanKind.SERVER].status.status_code is StatusCode.UNSET
    internal = grpc(13)
    assert internal[SpanKind.SERVER].status.status_code is StatusCode.ERROR
    assert (internal[SpanKind.SERVER].attributes or {})["error.type"] == "INTERNAL"


def test_database_exchanges_are_client_spans_named_per_semconv() -> None:
    pg = exchange(
        "postgresql",
        server=("10.0.0.5", 5432),
        attrs={
            "db.system.name": "postgresql",
            "db.operation.name": "SELECT",
            "db.collection.name": "orders",
            "db.query.text": "SELECT * FROM orders WHERE id = $1",
        },
    )
    redis = exchange(
        "redis",
        server=("10.0.0.6", 6379),
        attrs={"db.system.name": "redis", "db.operation.name": "GET", "db.query.text": "GET ?"},
    )
    failed = exchange(
        "mysql",
        server=("10.0.0.7", 3306),
        attrs={"db.operation.name": "SELECT", "db.collection.name": "nope"},
        outcome=Outcome.ERROR,
        error_type="1146",
    )
    spans, _, _ = run_telemetry([pg, redis, failed])
    assert [(s.name, s.kind) for s in spans] == [
        ("SELECT orders", SpanKind.CLIENT),
        ("GET", SpanKind.CLIENT),
        ("SELECT nope", SpanKind.CLIENT),
    ]
    a = spans[0].attributes or {}
    assert a["db.system.name"] == "postgresql"
    assert a["db.query.text"] == "SELECT * FROM orders WHERE id = $1"
    assert service(spans[0]) == "10.0.0.1"
    assert (spans[2].attributes or {})["db.system.name"] == "mysql"  # from the protocol
    assert spans[2].status.status_code is StatusCode.ERROR
    assert spans[2].status.description == "1146"


def test_dns_lookup_span() -> None:
    ex = exchange(
        "dns",
        server=("10.0.0.10", 53),
        transport="udp",
        attrs={
            "dns.question.name": "cart.shop.svc.cluster.local",
            "flowprobe.dns.question.type": "AAAA",
            "flowprobe.dns.response_code": "NXDOMAIN",
        },
        outcome=Outcome.ERROR,
        error_type="NXDOMAIN",
    )
    spans, _, _ = run_telemetry([ex])
    (s,) = spans
    assert (s.name, s.kind) == ("AAAA lookup", SpanKind.CLIENT)
    a = s.attributes or {}
    assert a["dns.question.name"] == "cart.shop.svc.cluster.local"
    assert a["flowprobe.dns.response_code"] == "NXDOMAIN"
    assert "flowprobe.tcp.retransmits" not in a  # UDP
    assert s.status.status_code is StatusCode.ERROR


class PodsOnly:
    """Like the Kubernetes resolver will be: only known pod addresses are workloads."""

    def __init__(self, pods: dict[str, str]) -> None:
        self.pods = pods

    def server(self, address: str, port: int, at_us: int = 0) -> Workload | None:
        name = self.pods.get(address)
        return Workload(name, (("k8s.pod.name", f"{name}-0"),)) if name else None

    def client(self, address: str, at_us: int = 0) -> Workload | None:
        return self.server(address, 0)


def test_unobserved_ends_get_no_span_and_resources_carry_workload_attributes() -> None:
    resolver = PodsOnly({"10.0.0.2": "cart", "10.0.0.5": "postgres"})
    from_outside = exchange(client=("203.0.113.9", 51000))
    to_outside = exchange(client=("10.0.0.2", 41000), server=("198.51.100.7", 443))
    db_from_outside = exchange(
        "postgresql",
        client=("203.0.113.9", 51001),
        server=("10.0.0.5", 5432),
        attrs={"db.operation.name": "SELECT", "db.collection.name": "t"},
    )
    spans, _, tel = run_telemetry([from_outside, to_outside, db_from_outside], resolver=resolver)
    got = {(s.kind, service(s), (s.attributes or {})["client.address"]): s for s in spans}
    assert set(got) == {
        (SpanKind.SERVER, "cart", "203.0.113.9"),
        (SpanKind.CLIENT, "cart", "10.0.0.2"),
        # Nobody observed made the query: the database's own view stands in.
        (SpanKind.SERVER, "postgres", "203.0.113.9"),
    }
    assert all(s.parent is None for s in spans)
    served = got[(SpanKind.SERVER, "cart", "203.0.113.9")]
    assert served.resource.attributes["k8s.pod.name"] == "cart-0"
    # The agent's environment (OTEL_RESOURCE_ATTRIBUTES) is not a workload's.
    assert "telemetry.sdk.name" not in served.resource.attributes
    assert tel.counters.exchanges_dropped == {}


def test_service_names_from_configuration() -> None:
    cfg = ExportConfig(service_names={"10.0.0.2:8080": "cart", "10.0.0.1": "frontend"})
    spans, _, _ = run_telemetry([exchange()], cfg)
    assert {s.kind: service(s) for s in spans} == {
        SpanKind.CLIENT: "frontend",
        SpanKind.SERVER: "cart",
    }


def test_ids_are_deterministic_for_the_same_input_and_salt() -> None:
    exs = [exchange(start_us=T0 + i * 10_000) for i in range(3)]
    a, _, _ = run_telemetry(exs)
    b, _, _ = run_telemetry(exs)
    ids = [(s.context.trace_id, s.context.span_id) for s in a]
    assert ids == [(s.context.trace_id, s.context.span_id) for s in b]
    assert len({t for t, _ in ids}) == 3  # one trace per independent exchange
    assert len({sid for _, sid in ids}) == 6
