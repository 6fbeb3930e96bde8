"""Parent/child: the caller's CLIENT span over the SERVER span, and downstream calls in flight."""

from __future__ import annotations

from pathlib import Path

import pytest
from opentelemetry.sdk.trace import ReadableSpan
from opentelemetry.trace import SpanKind

from flowprobe.agent.capture.tshark import Tools, read_file
from flowprobe.agent.config import AgentConfig, ExportConfig
from flowprobe.agent.export.spans import Linker, Node, NodeFactory
from flowprobe.agent.export.telemetry import Telemetry
from flowprobe.agent.export.workloads import AddressResolver
from flowprobe.agent.pipeline import Pipeline, Sinks
from flowprobe.agent.sessionize.records import Exchange
from flowprobe.agent.sessionize.stats import Stats
from flowprobe.devenv.pcapgen import ACK, FIN, PSH, SYN, Conn, write_frames
from tests.agent.export.fakes import MemorySpanSink, exchange, run_telemetry

T0 = 1_700_000_000_000_000
MS = 1_000
FRONTEND, API, CART, DB, REDIS = "10.0.0.1", "10.0.0.2", "10.0.0.3", "10.0.0.5", "10.0.0.6"


def span(spans: list[ReadableSpan], kind: SpanKind, client: str, server: str) -> ReadableSpan:
    """The span of ``kind`` for the call from address ``client`` to address ``server``."""
    if kind is SpanKind.CLIENT:
        keys = ("client.address", "network.peer.address")
    else:
        keys = ("network.peer.address", "network.local.address")
    found = [
        s
        for s in spans
        if s.kind is kind and tuple((s.attributes or {})[k] for k in keys) == (client, server)
    ]
    assert len(found) == 1, (kind, client, server, [s.name for s in spans])
    return found[0]


def parent_of(s: ReadableSpan) -> int | None:
    return s.parent.span_id if s.parent is not None else None


def redis_call(client: tuple[str, int], start_us: int, end_us: int, op: str = "GET") -> Exchange:
    return exchange(
        "redis",
        client=client,
        server=(REDIS, 6379),
        start_us=start_us,
        end_us=end_us,
        attrs={"db.operation.name": op},
    )


def call_tree() -> list[Exchange]:
    """frontend -> api (100 ms); meanwhile api -> postgres, then api -> cart -> redis.

    Listed in the order the sessionizer reports them: by end time.
    """
    return [
        exchange(
            "postgresql",
            client=(API, 41000),
            server=(DB, 5432),
            start_us=T0 + 10 * MS,
            end_us=T0 + 50 * MS,
            attrs={"db.operation.name": "SELECT", "db.collection.name": "orders"},
        ),
        redis_call((CART, 42000), T0 + 60 * MS, T0 + 80 * MS),
        exchange(
            client=(API, 41002), server=(CART, 8080), start_us=T0 + 55 * MS, end_us=T0 + 90 * MS
        ),
        exchange(client=(FRONTEND, 40000), server=(API, 8080), start_us=T0, end_us=T0 + 100 * MS),
    ]


def test_downstream_calls_in_flight_become_children_of_the_served_request() -> None:
    spans, _, tel = run_telemetry(call_tree())
    assert len(spans) == 1 + 1 + 2 + 2
    assert len({s.context.trace_id for s in spans}) == 1, "one trace for the whole call tree"
    front_c = span(spans, SpanKind.CLIENT, FRONTEND, API)
    api_s = span(spans, SpanKind.SERVER, FRONTEND, API)
    db_c = span(spans, SpanKind.CLIENT, API, DB)
    cart_c = span(spans, SpanKind.CLIENT, API, CART)
    cart_s = span(spans, SpanKind.SERVER, API, CART)
    redis_c = span(spans, SpanKind.CLIENT, CART, REDIS)
    assert parent_of(front_c) is None
    assert parent_of(api_s) == front_c.context.span_id
    assert parent_of(db_c) == api_s.context.span_id
    assert parent_of(cart_c) == api_s.context.span_id
    assert parent_of(cart_s) == cart_c.context.span_id
    assert parent_of(redis_c) == cart_s.context.span_id
    assert (db_c.attributes or {})["flowprobe.parent.rule"] == "in_flight"
    # The caller is the workload serving the parent request, so it is named
    # like it (not "10.0.0.2" without the port).
    assert db_c.resource.attributes["service.name"] == "10.0.0.2:8080"
    assert redis_c.resource.attributes["service.name"] == "10.0.0.3:8080"
    assert tel.linker.counts["linked"] == 3


def test_two_requests_in_flight_make_the_call_ambiguous_so_it_is_not_linked() -> None:
    exs = [
        redis_call((API, 41000), T0 + 10 * MS, T0 + 20 * MS),
        exchange(client=(FRONTEND, 40000), server=(API, 8080), start_us=T0, end_us=T0 + 30 * MS),
        exchange(
            client=(FRONTEND, 40001), server=(API, 8080), start_us=T0 + 5 * MS, end_us=T0 + 40 * MS
        ),
    ]
    spans, _, tel = run_telemetry(exs)
    redis_c = span(spans, SpanKind.CLIENT, API, REDIS)
    assert redis_c.parent is None
    assert len({s.context.trace_id for s in spans}) == 3
    assert tel.linker.counts["ambiguous"] == 1


def test_a_call_outside_the_request_or_past_the_window_is_not_linked() -> None:
    before = redis_call((API, 41000), T0 - 5 * MS, T0 + 5 * MS)
    parent = exchange(
        client=(FRONTEND, 40000), server=(API, 8080), start_us=T0, end_us=T0 + 3_000 * MS
    )
    inside = redis_call((API, 41001), T0 + 10 * MS, T0 + 20 * MS, "SET")
    # The parent ends 2.98 s after the call inside it: beyond the 2 s window.
    spans, _, _ = run_telemetry([before, inside, parent])
    assert all(s.parent is None for s in spans if s.kind is SpanKind.CLIENT)
    wide = ExportConfig(link_window_seconds=5)
    spans, _, _ = run_telemetry([before, inside, parent], wide)
    inside_c = next(s for s in spans if s.name == "SET")
    before_c = next(s for s in spans if s.name == "GET")
    assert inside_c.parent is not None
    assert before_c.parent is None


def test_a_long_run_of_sequential_requests_links_every_call() -> None:
    """One request at a time, far more of them than the scan limit: each call has one parent.

    The older requests all ended before the call, which the linker proves from the
    longest request held instead of leaving the call unlinked (``scan_limit``).
    """
    exs: list[Exchange] = []
    n = 3 * Linker.SCAN_LIMIT
    for k in range(n):
        t = T0 + k * 10 * MS
        exs.append(redis_call((API, 41000), t + 2 * MS, t + 3 * MS))
        exs.append(
            exchange(client=(FRONTEND, 40000), server=(API, 8080), start_us=t, end_us=t + 5 * MS)
        )
    exs.sort(key=lambda e: e.end_us)
    _, _, tel = run_telemetry(exs)
    assert tel.linker.counts["linked"] == n
    assert tel.linker.counts["scan_limit"] == tel.linker.counts["ambiguous"] == 0


def test_held_exchanges_are_bounded() -> None:
    finals: list[Node] = []
    factory = NodeFactory(b"x")
    linker = Linker(finals.append, window_us=10**12, max_held=50)
    resolver = AddressResolver()
    for i in range(5_000):
        ex = exchange(client=(f"10.1.{i // 250}.{i % 250}", 40000), start_us=T0 + i)
        ep = ex.endpoints
        linker.add(
            factory.node(
                ex, resolver.client(ep.client_address), resolver.server(ep.server_address, 8080)
            )
        )
        assert linker.held <= 50
    assert len(finals) == 5_000 - linker.held
    assert linker.counts["forced"] > 4_000
    linker.flush()
    assert linker.held == 0 and len(finals) == 5_000
    assert all(n.ex is None for n in finals), "finalised nodes keep no record"


# -- the real pipeline on a generated capture ------------------------------


def nested_http_pcap(path: Path) -> None:
    """frontend -> api GET /checkout; while it runs, api -> cart GET /cart/42.

    The cart request's segment is sent twice (a retransmission).
    """
    ip = {n: bytes([10, 9, 0, n]) for n in (1, 2, 3)}
    outer = Conn(cip=ip[1], sip=ip[2], cport=40000, sport=8080)
    inner = Conn(cip=ip[2], sip=ip[3], cport=41000, sport=8080)
    ts = T0
    frames: list[tuple[int, bytes]] = []

    def at(delta: int, frame: bytes) -> None:
        nonlocal ts
        ts += delta
        frames.append((ts, frame))

    def open_(c: Conn) -> None:
        at(10, c.segment(True, SYN))
        at(40, c.segment(False, SYN | ACK))
        at(30, c.segment(True, ACK))

    def close(c: Conn) -> None:
        at(10, c.segment(True, FIN | ACK))
        at(10, c.segment(False, FIN | ACK))
        at(10, c.segment(True, ACK))

    open_(outer)
    at(100, outer.segment(True, PSH | ACK, b"GET /checkout HTTP/1.1\r\nHost: api\r\n\r\n"))
    open_(inner)
    request = b"GET /cart/42 HTTP/1.1\r\nHost: cart\r\n\r\n"
    seq = inner.cseq
    at(200, inner.segment(True, PSH | ACK, request))
    inner.cseq = seq  # the same bytes again: tshark flags a retransmission
    at(200_000, inner.segment(True, PSH | ACK, request))
    at(3_000, inner.segment(False, PSH | ACK, b"HTTP/1.1 200 OK\r\nContent-Length: 2\r\n\r\nok"))
    at(20, inner.segment(True, ACK))
    at(500, outer.segment(False, PSH | ACK, b"HTTP/1.1 200 OK\r\nContent-Length: 4\r\n\r\ndone"))
    at(20, outer.segment(True, ACK))
    close(inner)
    close(outer)
    with path.open("wb") as f:
        write_frames(f, frames)


@pytest.mark.capture
def test_pcap_with_a_nested_call_gives_one_trace_with_retransmission_event(
    tmp_path: Path,
) -> None:
    pcap = tmp_path / "nested.pcap"
    nested_http_pcap(pcap)
    stats = Stats()
    exporter = MemorySpanSink()
    config = ExportConfig(
        service_names={"10.9.0.1": "frontend", "10.9.0.2": "api", "10.9.0.3": "cart"}
    )
    tel = Telemetry(config, stats, exporter, None, salt=b"t", wall_clock_release=False).start()
    sinks = Sinks()
    sinks.exchange.append(tel.submit)
    pipeline = Pipeline(AgentConfig(export=config), sinks, stats)
    rows = read_file(Tools.find(), str(pcap), pipeline.tshark_options)
    pipeline.feed(rows)
    pipeline.finish()
    tel.close(timeout_s=10)
    assert rows.error is None
    spans = exporter.get_finished_spans()
    got = {(s.name, s.kind, s.resource.attributes["service.name"]): s for s in spans}
    assert set(got) == {
        ("GET /checkout", SpanKind.CLIENT, "frontend"),
        ("GET /checkout", SpanKind.SERVER, "api"),
        ("GET /cart/{id}", SpanKind.CLIENT, "api"),
        ("GET /cart/{id}", SpanKind.SERVER, "cart"),
    }
    assert len({s.context.trace_id for s in spans}) == 1
    checkout = got[("GET /checkout", SpanKind.SERVER, "api")]
    cart_call = got[("GET /cart/{id}", SpanKind.CLIENT, "api")]
    cart = got[("GET /cart/{id}", SpanKind.SERVER, "cart")]
    assert parent_of(cart_call) == checkout.context.span_id
    assert parent_of(cart) == cart_call.context.span_id
    # Times are the capture's: the outer request's first byte to its response's.
    t_req = T0 + 10 + 40 + 30 + 100
    assert checkout.start_time == t_req * 1000
    assert [e.name for e in cart.events] == ["tcp.retransmission"]
    assert (cart.attributes or {})["flowprobe.tcp.retransmits"] == 1
    retrans = cart.events[0].timestamp
    assert cart.start_time is not None and cart.end_time is not None
    assert cart.start_time < retrans <= cart.end_time
