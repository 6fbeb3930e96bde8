"""The hand-written OTLP encoding: valid protobuf, and what the SDK's encoder makes of the same spans."""

from __future__ import annotations

import json
from typing import Any

import pytest
from opentelemetry.exporter.otlp.proto.common.trace_encoder import encode_spans
from opentelemetry.proto.collector.trace.v1.trace_service_pb2 import ExportTraceServiceRequest
from opentelemetry.proto.common.v1.common_pb2 import AnyValue, ArrayValue, KeyValue, KeyValueList

from flowprobe.agent.config import ExportConfig
from flowprobe.agent.export import protobuf as pb
from flowprobe.agent.export.otlp import SignalSettings
from flowprobe.agent.export.telemetry import Telemetry
from flowprobe.agent.export.transport import ConsoleSpanPrinter, HttpSpanSender
from flowprobe.agent.sessionize.records import Exchange, Outcome, TcpFigures
from flowprobe.agent.sessionize.stats import Stats
from tests.agent.export.fakes import FakeHttpReceiver, MemorySpanSink, attrs, exchange, sdk_spans
from tests.agent.export.test_linker import call_tree

T0 = 1_700_000_000_000_000
# KeyValueList.values is field 1, a repeated KeyValue: the same layout as the
# attributes of a span, so encoded attributes parse as one.
_LIST_TAG = b"\x0a"


def _decoded(raw: bytes) -> list[KeyValue]:
    return list(KeyValueList.FromString(raw).values)


def _any(value: Any) -> AnyValue:
    if isinstance(value, bool):
        return AnyValue(bool_value=value)
    if isinstance(value, int):
        return AnyValue(int_value=value)
    if isinstance(value, float):
        return AnyValue(double_value=value)
    if isinstance(value, str):
        return AnyValue(string_value=value)
    return AnyValue(array_value=ArrayValue(values=[_any(v) for v in value]))


VALUES: list[Any] = [
    0,
    1,
    127,
    128,
    16_383,
    16_384,
    2**62,
    -1,
    -(2**63),
    True,
    False,
    1.5,
    -0.0,
    "",
    "é/ü",
    ["a", "b"],
    ("x",),
]


@pytest.mark.parametrize("value", VALUES, ids=repr)
def test_a_value_encodes_as_the_generated_classes_encode_it(value: Any) -> None:
    expected = KeyValueList(values=[KeyValue(key="k", value=_any(value))]).SerializeToString()
    assert pb.key_value(_LIST_TAG, "k", value) == expected
    for enc in (pb.AttributeEncoder(_LIST_TAG), pb.AttributeEncoder(_LIST_TAG, alone={"k"})):
        for _ in range(2):  # first encoded, then from the cache
            assert enc.encode({"k": value}) == expected


def test_cached_values_keep_their_types_and_none_is_left_out() -> None:
    # True == 1 == 1.0 as dict keys: each must still come out as its own type.
    for enc in (
        pb.AttributeEncoder(_LIST_TAG, max_entries=2),
        pb.AttributeEncoder(_LIST_TAG, alone={"v"}, max_entries=2),
        pb.AttributeEncoder(_LIST_TAG, together=[{"v", "w"}], max_entries=2),
    ):
        for _ in range(3):
            for value in (1, True, 1.0, "1", None, 2, 3, 4):
                got = attrs(_decoded(enc.encode({"v": value, "w": "x", "gone": None})))
                assert got == ({"w": "x"} if value is None else {"v": value, "w": "x"})
                if value is not None:
                    assert type(got["v"]) is type(value)


def test_excluded_keys_and_unhashable_values() -> None:
    enc = pb.AttributeEncoder(_LIST_TAG, exclude={"secret"})
    for hosts in (["a"], ["a", "b"]):
        got = attrs(_decoded(enc.encode({"secret": 1, "hosts": hosts, "n": 3})))
        assert got == {"hosts": hosts, "n": 3}


def encoded(exchanges: list[Exchange]) -> list[bytes]:
    """The trace requests the agent sends for ``exchanges``, as bytes."""
    sink = MemorySpanSink()
    tel = Telemetry(ExportConfig(), Stats(), sink, None, salt=b"t", wall_clock_release=False)
    tel.start()
    for ex in exchanges:
        tel.submit(ex)
    tel.close(timeout_s=10)
    return sink.requests


def _variety() -> list[Exchange]:
    """Exchanges exercising every branch of the span model."""
    return [
        exchange(
            start_us=T0,
            attrs={
                "http.request.method": "PATCH",
                "url.path": "/orders/42",
                "url.query": "a=1&sig=x",
                "network.protocol.version": "1.1",
                "http.request.header.host": "shop:8080",
                "http.response.status_code": 404,
            },
            events=[(T0 + 10, "tcp.retransmission"), (T0 + 20, "tcp.zero_window")],
        ),
        exchange(
            start_us=T0 + 1,
            attrs={
                "http.request.method": "BREW",
                "url.path": "/",
                "http.response.status_code": 500,
            },
        ),
        exchange(
            "grpc",
            server=("10.0.0.3", 50051),
            start_us=T0 + 2,
            attrs={"rpc.service": "shop.Cart", "rpc.method": "Get", "rpc.grpc.status_code": 14},
        ),
        exchange(
            "postgresql",
            server=("10.0.0.5", 5432),
            start_us=T0 + 3,
            attrs={"db.operation.name": "SELECT", "db.query.text": "SELECT 1"},
            outcome=Outcome.ERROR,
            error_type="42P01",
        ),
        exchange(
            "dns",
            server=("10.0.0.10", 53),
            transport="udp",
            start_us=T0 + 4,
            attrs={"dns.question.name": "x.example", "flowprobe.dns.question.type": "A"},
            figures=TcpFigures(client_bytes=30, server_bytes=2**40),
        ),
        exchange(start_us=T0 + 5, outcome=Outcome.RESET),
        *call_tree(),
    ]


def test_agent_requests_are_canonical_protobuf_and_what_the_sdk_would_send() -> None:
    requests = encoded(_variety())
    assert sum(len(sdk_spans(ExportTraceServiceRequest.FromString(r))) for r in requests) > 10
    for raw in requests:
        req = ExportTraceServiceRequest.FromString(raw)
        # Fields in field-number order, minimal varints, no unknown fields:
        # the generated classes write back exactly the same bytes.
        assert req.SerializeToString() == raw
        # The SDK's encoder, given the same spans as SDK objects, makes the
        # same message: same types, flags, empty UNSET status, grouping.
        sdk = encode_spans(sdk_spans(req))
        assert _by_span(sdk) == _by_span(req)
        for rs in req.resource_spans:
            for s in (s for ss in rs.scope_spans for s in ss.spans):
                keys = [kv.key for kv in s.attributes]
                assert len(keys) == len(set(keys)), s.name


def _by_span(req: ExportTraceServiceRequest) -> dict[bytes, tuple[bytes, bytes, bytes]]:
    return {
        s.span_id: (
            rs.resource.SerializeToString(),
            ss.scope.SerializeToString(),
            s.SerializeToString(),
        )
        for rs in req.resource_spans
        for ss in rs.scope_spans
        for s in ss.spans
    }


def test_console_printer_writes_one_otlp_json_span_per_line(
    capsys: pytest.CaptureFixture[str],
) -> None:
    (request,) = encoded([exchange(start_us=T0)])
    assert ConsoleSpanPrinter().export(request)
    lines = [json.loads(line) for line in capsys.readouterr().out.splitlines()]
    assert [d["span"]["kind"] for d in lines] == ["SPAN_KIND_CLIENT", "SPAN_KIND_SERVER"]
    client, server = (d["span"] for d in lines)
    assert server["parentSpanId"] == client["spanId"] and len(client["spanId"]) == 16
    assert client["traceId"] == server["traceId"] and len(client["traceId"]) == 32
    assert client["name"] == "GET /items/{id}"
    assert client["startTimeUnixNano"] == str(T0 * 1000)
    assert lines[0]["scope"]["name"] == "flowprobe.agent"


def test_http_sender_retries_transient_refusals_not_permanent_ones() -> None:
    (request,) = encoded([exchange(start_us=T0)])
    rx = FakeHttpReceiver(refuse=(400, 503))
    try:
        settings = SignalSettings("traces", "http/protobuf", rx.endpoint + "/v1/traces")
        sender = HttpSpanSender(settings)
        # 400 is final: no retry, reported as failed.
        assert not sender.export(request)
        assert rx.received.traces == []
        # 503, then accepted after a back-off: delivered once.
        assert sender.export(request)
        assert len(rx.received.traces) == 1
        sender.shutdown()
    finally:
        rx.stop()
