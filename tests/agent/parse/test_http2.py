"""HTTP/2 (h2c) and gRPC through tshark and the whole pipeline, on pcaps recorded from a
real grpcio server and client and a python-h2 server with python-h2 and curl clients
(tests/data/record_grpc.py), plus the parser on hand-made columns and synthetic frames."""

from __future__ import annotations

import contextlib
import random
import struct
from collections import Counter
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import pytest

from flowprobe.agent.capture.columns import ColumnLayout
from flowprobe.agent.capture.tshark import Tools, read_file
from flowprobe.agent.config import AgentConfig
from flowprobe.agent.parse.base import COLUMN_LIMIT
from flowprobe.agent.parse.http2 import (
    MAX_STREAMS_PER_CONNECTION,
    Http2Parser,
    cut_values,
)
from flowprobe.agent.parse.messages import L7Message
from flowprobe.agent.pipeline import Pipeline, Sinks
from flowprobe.devenv.pcapgen import ACK, PSH
from tests.agent import helpers
from tests.agent.helpers import DATA, close, conn, handshake, read_pcap, run_pcap, write

GRPC = DATA / "grpc"
SERVICE = "flowprobe.test.Echo"
# gRPC's pcaps use the parser's default port (50051); h2c's use 8081, given as
# --port http2=8081 would (tshark has no port for h2c: both need decode-as).
H2C_PORTS = {"http2": (8081,)}


def _rpc(records: list[dict[str, Any]]) -> list[tuple[Any, ...]]:
    return [
        (
            r.get("rpc.method"),
            r.get("rpc.grpc.status_code"),
            r["flowprobe.outcome"],
            r.get("error.type"),
        )
        for r in records
    ]


def _by_stream(records: list[dict[str, Any]]) -> list[dict[str, Any]]:
    return sorted(records, key=lambda r: (r["client.port"], r["flowprobe.http2.stream_id"]))


def _check_common(records: list[dict[str, Any]], protocol: str) -> None:
    for r in records:
        assert r["flowprobe.protocol"] == protocol
        assert r["network.protocol.name"] == "http"
        assert r["network.protocol.version"] == "2"
        assert r["client.address"] == "10.252.0.1"
        assert r["server.address"] == "10.252.0.2"
        assert r["flowprobe.duration_us"] > 0
        if protocol == "grpc":
            assert r["rpc.system"] == "grpc"
            assert r["rpc.service"] == SERVICE
            assert r["url.path"] == f"/{SERVICE}/{r['rpc.method']}"
            assert r["http.request.method"] == "POST"


# -- recorded traffic ---------------------------------------------------------


@pytest.mark.capture
def test_unary_calls_on_one_channel() -> None:
    records = _by_stream(read_pcap(GRPC / "unary.pcapng"))
    _check_common(records, "grpc")
    assert _rpc(records) == [("Unary", 0, "ok", None)] * 5
    assert [r["flowprobe.http2.stream_id"] for r in records] == [1, 3, 5, 7, 9]
    assert len({r["client.port"] for r in records}) == 1
    for r in records:
        assert r["http.response.status_code"] == 200
        assert r["http.request.header.host"] == "10.252.0.2:50051"
        # 5-byte gRPC prefix + "hello N" / "echo:hello N".
        assert (r["http.request.body.size"], r["http.response.body.size"]) == (12, 17)
        # SETTINGS and PINGs before a message are not its start.
        assert 0 < r["flowprobe.server_response_time_us"] < r["flowprobe.duration_us"] + 1
        assert r["flowprobe.duration_us"] < 20_000
        assert "user_agent.original" not in r


@pytest.mark.capture
def test_user_agent_only_when_enabled() -> None:
    records = read_pcap(GRPC / "unary.pcapng", payload={"user_agent": True})
    assert all(r["user_agent.original"].startswith("grpc-python/") for r in records)


@pytest.mark.capture
def test_server_streaming_is_one_exchange_per_call() -> None:
    records = _by_stream(read_pcap(GRPC / "streaming.pcapng"))
    _check_common(records, "grpc")
    assert _rpc(records) == [
        ("Stream", 0, "ok", None),
        ("Stream", 0, "ok", None),
        # Two messages, then the server gives up.
        ("Stream", 8, "error", "RESOURCE_EXHAUSTED"),
    ]
    # Messages "item N" (6 bytes + 5-byte prefix) each: 10, 3 and 2 of them.
    assert [r["http.response.body.size"] for r in records] == [110, 33, 22]
    assert records[0]["flowprobe.response.packets"] > 1


@pytest.mark.capture
def test_error_statuses() -> None:
    records = _by_stream(read_pcap(GRPC / "errors.pcapng"))
    _check_common(records, "grpc")
    assert _rpc(records) == [
        ("Fail", 5, "error", "NOT_FOUND"),
        ("Crash", 2, "error", "UNKNOWN"),
        # Unknown method: a trailers-only reply (one HEADERS with END_STREAM).
        ("Missing", 12, "error", "UNIMPLEMENTED"),
        ("Unary", 0, "ok", None),
    ]
    assert all(r["http.response.status_code"] == 200 for r in records)


@pytest.mark.capture
def test_deadline_from_the_server_and_cancel_from_the_client() -> None:
    records = _by_stream(read_pcap(GRPC / "deadline.pcapng"))
    _check_common(records, "grpc")
    summary = _rpc(records)
    assert summary[0] == ("Slow", 4, "error", "DEADLINE_EXCEEDED")
    assert summary[2] == ("Unary", 0, "ok", None)
    # The client's RST_STREAM(CANCEL) cannot end an exchange; it stays open
    # until the connection ends (with a FIN or a reset, as the channel closes).
    assert summary[1] in {
        ("Slow", None, "reset", "connection_reset"),
        ("Slow", None, "no_response", "no_response"),
    }
    assert records[0]["flowprobe.duration_us"] > 200_000


@pytest.mark.capture
def test_hundred_concurrent_calls_on_one_channel() -> None:
    records = read_pcap(GRPC / "concurrent.pcapng")
    _check_common(records, "grpc")
    assert Counter(_rpc(records)) == {("Unary", 0, "ok", None): 100}
    assert sorted(r["flowprobe.http2.stream_id"] for r in records) == list(range(1, 200, 2))
    assert len({r["client.port"] for r in records}) == 1
    assert not any("flowprobe.http2.headers_incomplete" in r for r in records)
    # "together N": 5-byte prefix + 10 or 11 bytes, echoed with "echo:".
    for r in records:
        assert r["http.response.body.size"] == r["http.request.body.size"] + 5


@pytest.mark.capture
def test_concurrent_pcap_has_many_streams_per_segment() -> None:
    """The recording exercises the hard case: tshark rows with many streams' frames,
    and header columns longer than tshark prints (so the per-header fallback runs)."""
    pipeline = Pipeline(AgentConfig(), Sinks())
    layout = pipeline.layout
    i_sid = layout.index("http2.streamid")
    i_value = layout.index("http2.header.value")
    most, cut = 0, 0
    for cols in read_file(Tools.find(), str(GRPC / "concurrent.pcapng"), pipeline.tshark_options):
        most = max(most, len(set(cols[i_sid].split(","))))
        cut += len(cols[i_value].encode()) >= COLUMN_LIMIT - 3
    assert most >= 10
    assert cut >= 1


@pytest.mark.capture
def test_large_messages_span_segments() -> None:
    records = read_pcap(GRPC / "large.pcapng")
    _check_common(records, "grpc")
    assert _rpc(records) == [("Unary", 0, "ok", None)]
    r = records[0]
    assert (r["http.request.body.size"], r["http.response.body.size"]) == (10015, 30005)
    # The request is reported at its HEADERS, so the body's segments that come
    # later count in http.request.body.size but not in flowprobe.request.*.
    assert r["flowprobe.response.packets"] > 1
    assert r["flowprobe.response.bytes"] > 30005


@pytest.mark.capture
def test_plain_h2c_on_a_port_given_with_decode_as() -> None:
    records = _by_stream(read_pcap(GRPC / "h2c.pcapng", ports=H2C_PORTS))
    _check_common(records, "http2")
    summary = [
        (
            r["http.request.method"],
            r["url.path"],
            r["http.response.status_code"],
            r["flowprobe.outcome"],
            r.get("error.type"),
            r["http.response.body.size"],
        )
        for r in records
    ]
    # python-h2 client: four requests one after the other on one connection,
    # then one whose 20 KB header block needs a CONTINUATION frame; then ten
    # streams at once on a second connection; curl: a POST and a HEAD.
    assert summary == [
        ("GET", "/items/1", 200, "ok", None, 13),
        ("GET", "/status/404", 404, "ok", None, 11),
        ("GET", "/status/503", 503, "error", "503", 11),
        ("GET", "/big/20000", 200, "ok", None, 20000),
        ("GET", "/items/continued", 200, "ok", None, 13),
        *[("GET", f"/items/p{i}", 200, "ok", None, 13) for i in range(10)],
        ("POST", "/echo", 200, "ok", None, 10),
        ("HEAD", "/items/2", 200, "ok", None, 0),
    ]
    assert [r["http.request.body.size"] for r in records][-2:] == [10, 0]
    assert len({r["client.port"] for r in records}) == 4
    assert not any("rpc.system" in r for r in records)
    # The 20 KB header value is longer than tshark prints: its request is
    # complete in what matters and says some header could not be read.
    flagged = [r["url.path"] for r in records if "flowprobe.http2.headers_incomplete" in r]
    assert flagged == ["/items/continued"]


@pytest.mark.capture
def test_h2c_port_without_decode_as_is_not_http2() -> None:
    records, stats, error = run_pcap(GRPC / "h2c.pcapng")
    assert error is None
    assert records == []
    assert stats.anomalies["undecoded_payload.http2"] == 0  # 8081 is no http2 port


@pytest.mark.capture
def test_default_grpc_port_needs_no_configuration() -> None:
    assert len(read_pcap(GRPC / "unary.pcapng")) == 5


# -- hand-made columns --------------------------------------------------------

PARSER = helpers.bound(Http2Parser())
LAYOUT = helpers.layout(PARSER.fields)

Frame = tuple[int, str, int, int]  # stream id, type, flags, length
Block = Sequence[tuple[str, str]]
GRPC_REQ: Block = [
    (":method", "POST"),
    (":scheme", "http"),
    (":path", "/pkg.Svc/Get"),
    (":authority", "svc:50051"),
    ("content-type", "application/grpc"),
    ("grpc-accept-encoding", "identity, deflate, gzip"),
    ("te", "trailers"),
]
GRPC_HEADERS: Block = [(":status", "200"), ("content-type", "application/grpc")]
GRPC_OK: Block = [("grpc-status", "0"), ("grpc-message", "")]


def row(
    frames: Sequence[Frame],
    blocks: Sequence[Block] = (),
    counts: Sequence[int] | None = None,
    **extra: str,
) -> list[str]:
    cols = helpers.columns(PARSER.fields, **extra)

    def put(field: str, items: Sequence[object]) -> None:
        cols[LAYOUT.index(field)] = ",".join(str(x) for x in items)

    put("http2.streamid", [f[0] for f in frames])
    put("http2.type", [f[1] for f in frames])
    put("http2.flags", [f"0x{f[2]:02x}" for f in frames])
    put("http2.length", [f[3] for f in frames])
    headers = [h for b in blocks for h in b]
    put("http2.header.count", counts if counts is not None else [len(b) for b in blocks if b])
    put("http2.header.name", [n for n, _ in headers])
    put("http2.header.value", [v for _, v in headers])
    put("http2.header.value.length", [len(v) for _, v in headers])
    for name, field in (
        (":method", "http2.headers.method"),
        (":path", "http2.headers.path"),
        (":authority", "http2.headers.authority"),
        ("content-type", "http2.headers.content_type"),
    ):
        put(field, [v for n, v in headers if n == name])
    return cols


def parse(cols: list[str], to_server: bool | None, state: dict[str, object]) -> list[L7Message]:
    return PARSER.parse(cols, to_server, state)


ES, EH = 0x1, 0x4


def test_requests_and_responses_of_several_streams_in_one_segment() -> None:
    state: dict[str, object] = {}
    req3 = [(n, "/pkg.Svc/List" if n == ":path" else v) for n, v in GRPC_REQ]
    reqs = parse(
        row(
            [
                (1, "HEADERS", EH, 90),
                (1, "DATA", ES, 12),
                (3, "HEADERS", EH, 9),
                (3, "DATA", ES, 7),
            ],
            [GRPC_REQ, req3],
        ),
        True,
        state,
    )
    assert [(m.is_request, m.key, m.protocol) for m in reqs] == [
        (True, 1, "grpc"),
        (True, 3, "grpc"),
    ]
    assert reqs[0].attrs["rpc.service"] == "pkg.Svc"
    assert [m.attrs["rpc.method"] for m in reqs] == ["Get", "List"]
    assert reqs[0].attrs["http.request.header.host"] == "svc:50051"
    not_found = [("grpc-status", "5"), ("grpc-message", "no such item, sorry")]
    resps = parse(
        row(
            [
                (3, "HEADERS", EH, 3),
                (1, "HEADERS", EH, 3),
                (1, "DATA", 0, 20),
                (1, "HEADERS", EH | ES, 16),
                (0, "WINDOW_UPDATE", 0, 4),
                (3, "HEADERS", EH | ES, 30),
            ],
            [GRPC_HEADERS, GRPC_HEADERS, GRPC_OK, not_found],
        ),
        False,
        state,
    )
    got = [(m.key, m.final, m.error_type, m.attrs.get("rpc.grpc.status_code")) for m in resps]
    assert got == [
        (3, False, None, None),
        (1, False, None, None),
        (1, True, None, 0),
        (3, True, "NOT_FOUND", 5),
    ]
    assert resps[2].attrs["http.request.body.size"] == 12
    assert resps[2].attrs["http.response.body.size"] == 20
    assert resps[0].attrs["http.response.status_code"] == 200
    assert all(m.protocol == "grpc" for m in resps)


def test_trailers_only_reply_is_final() -> None:
    state: dict[str, object] = {}
    parse(row([(1, "HEADERS", EH | ES, 9)], [GRPC_REQ]), True, state)
    (msg,) = parse(
        row([(1, "HEADERS", EH | ES, 9)], [[*GRPC_HEADERS, ("grpc-status", "12")]]), False, state
    )
    assert (msg.final, msg.error_type, msg.attrs["rpc.grpc.status_code"]) == (
        True,
        "UNIMPLEMENTED",
        12,
    )


def test_plain_http2_ends_at_end_stream() -> None:
    state: dict[str, object] = {}
    get = [(":method", "GET"), (":path", "/a?x=1,2"), (":scheme", "http"), (":authority", "h")]
    head = [(":method", "HEAD"), (":path", "/b"), (":scheme", "http"), (":authority", "h")]
    reqs = parse(
        row([(1, "HEADERS", EH | ES, 9), (3, "HEADERS", EH | ES, 9)], [get, head]), True, state
    )
    assert [(m.protocol, m.attrs["url.path"], m.attrs.get("url.query")) for m in reqs] == [
        ("http2", "/a", "x=1,2"),
        ("http2", "/b", None),
    ]
    assert "rpc.system" not in reqs[0].attrs
    msgs = parse(
        row(
            [
                (1, "HEADERS", EH, 3),
                (3, "HEADERS", EH | ES, 3),
                (1, "DATA", 0, 100),
                (1, "DATA", ES, 5),
            ],
            [[(":status", "503")], [(":status", "200")]],
        ),
        False,
        state,
    )
    assert [(m.key, m.final, m.error_type) for m in msgs] == [
        (1, False, "503"),
        (3, True, None),
        (1, True, None),
    ]
    assert msgs[2].attrs["http.response.body.size"] == 105


def test_header_block_continued_in_the_next_segment() -> None:
    state: dict[str, object] = {}
    first, rest = GRPC_REQ[:3], GRPC_REQ[3:]
    assert parse(row([(1, "HEADERS", 0, 16384)], [first]), True, state) == []
    (req,) = parse(row([(1, "CONTINUATION", EH, 100), (1, "DATA", ES, 5)], [rest]), True, state)
    assert (req.attrs["url.path"], req.protocol, req.key) == ("/pkg.Svc/Get", "grpc", 1)


def test_continuation_with_no_complete_header_has_no_count() -> None:
    # tshark prints no count for a header-block frame that decoded nothing.
    state: dict[str, object] = {}
    cols = row([(1, "HEADERS", 0, 16384), (1, "CONTINUATION", EH, 200)], [GRPC_REQ], counts=[7])
    (req,) = parse(cols, True, state)
    assert req.attrs["url.path"] == "/pkg.Svc/Get"
    assert "flowprobe.http2.headers_incomplete" not in req.attrs


def test_table_size_update_is_counted_but_has_no_name() -> None:
    state: dict[str, object] = {}
    cols = row(
        [(1, "HEADERS", EH | ES, 50), (3, "HEADERS", EH | ES, 9)],
        [GRPC_REQ, GRPC_REQ],
        counts=[len(GRPC_REQ) + 1, len(GRPC_REQ)],
        http2__header_table_size_update__header_table_size="0",
    )
    reqs = parse(cols, True, state)
    assert [m.attrs["url.path"] for m in reqs] == ["/pkg.Svc/Get"] * 2


def test_unattributable_headers_still_pair() -> None:
    state: dict[str, object] = {}
    # Counts that cannot be matched with the header list: the request's
    # essentials come from the per-header columns...
    (req,) = parse(row([(1, "HEADERS", EH | ES, 50)], [GRPC_REQ], counts=[3]), True, state)
    assert (req.attrs["rpc.method"], req.protocol) == ("Get", "grpc")
    assert "flowprobe.http2.headers_incomplete" not in req.attrs
    # ... and without those the request is reported without its headers; the
    # response still pairs with it.
    cols = row([(3, "HEADERS", EH | ES, 50)], [GRPC_REQ], counts=[3])
    for field in PARSER.fields:
        if field.startswith("http2.headers."):
            cols[LAYOUT.index(field)] = ""
    (req,) = parse(cols, True, state)
    assert req.attrs["flowprobe.http2.headers_incomplete"] is True
    assert "url.path" not in req.attrs
    (resp,) = parse(row([(3, "HEADERS", EH | ES, 9)], [[(":status", "200")]]), False, state)
    assert (resp.key, resp.final) == (3, True)


def test_hpack_context_lost_shows_unknown_headers() -> None:
    state: dict[str, object] = {}
    lost = [("<unknown>", ""), (":method", "POST"), (":scheme", "http"), ("<unknown>", "")]
    (req,) = parse(row([(5, "HEADERS", EH, 9)], [lost]), True, state)
    assert req.attrs["http.request.method"] == "POST"
    assert req.attrs["flowprobe.http2.headers_incomplete"] is True


def test_columns_cut_by_tshark_fall_back_to_per_header_fields() -> None:
    state: dict[str, object] = {}
    n = 30
    reqs = [
        [(n_, f"/pkg.Svc/M{i}" if n_ == ":path" else v) for n_, v in GRPC_REQ] for i in range(n)
    ]
    frames = [(1 + 2 * i, "HEADERS", EH, 9) for i in range(n)]
    cols = row(frames, reqs)
    for field in ("http2.header.name", "http2.header.value"):
        i = LAYOUT.index(field)
        assert len(cols[i]) > COLUMN_LIMIT
        cols[i] = cols[i][: COLUMN_LIMIT - 1]
    msgs = parse(cols, True, state)
    assert [m.attrs["rpc.method"] for m in msgs] == [f"M{i}" for i in range(n)]
    assert all(m.protocol == "grpc" for m in msgs)
    assert not any("flowprobe.http2.headers_incomplete" in m.attrs for m in msgs)


def test_frame_columns_cut_by_tshark_keep_the_frames_before_the_cut() -> None:
    state: dict[str, object] = {}
    n = 300
    frames = [(1 + 2 * i, "HEADERS", EH | ES, 9) for i in range(n)]
    blocks = [[(":method", "GET"), (":path", f"/{i}")] for i in range(n)]
    cols = row(frames, blocks)
    i_type = LAYOUT.index("http2.type")
    cols[i_type] = cols[i_type][: COLUMN_LIMIT - 1]
    msgs = parse(cols, True, state)
    assert 0 < len(msgs) < n
    assert [m.attrs["url.path"] for m in msgs] == [f"/{i}" for i in range(len(msgs))]


def test_server_reset_ends_the_stream_as_an_error() -> None:
    state: dict[str, object] = {}
    get = [(":method", "GET"), (":path", "/a"), (":scheme", "http"), (":authority", "h")]
    parse(row([(1, "HEADERS", EH | ES, 9), (3, "HEADERS", EH, 9)], [get, GRPC_REQ]), True, state)
    msgs = parse(
        row(
            [(1, "RST_STREAM", 0, 4), (3, "RST_STREAM", 0, 4)],
            http2__rst_stream__error="REFUSED_STREAM,8",
        ),
        False,
        state,
    )
    assert [(m.key, m.final, m.error_type) for m in msgs] == [
        (1, True, "REFUSED_STREAM"),
        (3, True, "CANCELLED"),
    ]
    assert msgs[1].attrs["rpc.grpc.status_code"] == 1
    assert msgs[1].attrs["flowprobe.http2.rst_stream.error"] == "CANCEL"


def test_client_reset_leaves_the_exchange_to_the_server() -> None:
    state: dict[str, object] = {}
    parse(row([(1, "HEADERS", EH, 9)], [GRPC_REQ]), True, state)
    assert (
        parse(row([(1, "RST_STREAM", 0, 4)], http2__rst_stream__error="CANCEL"), True, state) == []
    )
    # A server that still answers ends it with its own status.
    (msg,) = parse(
        row([(1, "HEADERS", EH | ES, 9)], [[*GRPC_HEADERS, ("grpc-status", "1")]]), False, state
    )
    assert (msg.protocol, msg.error_type) == ("grpc", "CANCELLED")


def test_reset_after_the_end_is_ignored() -> None:
    state: dict[str, object] = {}
    parse(row([(1, "HEADERS", EH, 9)], [GRPC_REQ]), True, state)
    msgs = parse(
        row(
            [(1, "HEADERS", EH | ES, 9), (1, "RST_STREAM", 0, 4)],
            [[*GRPC_HEADERS, ("grpc-status", "4")]],
            http2__rst_stream__error="NO_ERROR",
        ),
        False,
        state,
    )
    assert [(m.final, m.error_type) for m in msgs] == [(True, "DEADLINE_EXCEEDED")]


def test_http_status_from_a_proxy_maps_to_a_grpc_code() -> None:
    state: dict[str, object] = {}
    parse(row([(1, "HEADERS", EH, 9)], [GRPC_REQ]), True, state)
    (msg,) = parse(row([(1, "HEADERS", EH | ES, 9)], [[(":status", "503")]]), False, state)
    assert (msg.error_type, msg.attrs["rpc.grpc.status_code"]) == ("UNAVAILABLE", 14)
    assert msg.attrs["http.response.status_code"] == 503


def test_interim_response_does_not_end_the_exchange() -> None:
    state: dict[str, object] = {}
    post = [(":method", "POST"), (":path", "/up"), ("expect", "100-continue")]
    parse(row([(1, "HEADERS", EH, 9)], [post]), True, state)
    msgs = parse(
        row(
            [(1, "HEADERS", EH, 3), (1, "HEADERS", EH | ES, 3)],
            [[(":status", "100")], [(":status", "201")]],
        ),
        False,
        state,
    )
    assert [(m.final, m.attrs.get("http.response.status_code")) for m in msgs] == [
        (False, None),
        (True, 201),
    ]


def test_unknown_direction_is_told_by_pseudo_headers() -> None:
    state: dict[str, object] = {}
    (req,) = parse(row([(1, "HEADERS", EH, 9)], [GRPC_REQ]), None, state)
    assert req.is_request
    (resp,) = parse(row([(1, "HEADERS", EH, 3)], [GRPC_HEADERS]), None, state)
    assert not resp.is_request and not resp.final
    # DATA and trailers need the direction.
    assert parse(row([(1, "DATA", ES, 5)]), None, state) == []
    assert parse(row([(1, "HEADERS", EH | ES, 5)], [GRPC_OK]), None, state) == []


def test_server_push_is_not_an_exchange() -> None:
    state: dict[str, object] = {}
    get = [(":method", "GET"), (":path", "/"), (":scheme", "http"), (":authority", "h")]
    parse(row([(1, "HEADERS", EH | ES, 9)], [get]), True, state)
    pushed = [(":method", "GET"), (":path", "/style.css"), (":scheme", "http"), (":authority", "h")]
    msgs = parse(
        row(
            [
                (1, "PUSH_PROMISE", EH, 20),
                (1, "HEADERS", EH, 3),
                (2, "HEADERS", EH, 3),
                (2, "DATA", ES, 9),
                (1, "DATA", ES, 9),
            ],
            [pushed, [(":status", "200")], [(":status", "200")]],
        ),
        False,
        state,
    )
    assert [(m.key, m.final) for m in msgs] == [(1, False), (1, True)]


def test_numeric_frame_types_as_tshark_fields_prints_them() -> None:
    state: dict[str, object] = {}
    (req,) = parse(row([(1, "1", EH | ES, 9)], [GRPC_REQ]), True, state)
    assert req.attrs["rpc.method"] == "Get"


def test_connection_frames_alone_are_a_control_message() -> None:
    state: dict[str, object] = {}
    (msg,) = parse(row([(0, "SETTINGS", 0, 18), (0, "WINDOW_UPDATE", 0, 4)]), True, state)
    assert msg.control
    assert parse(row([]), True, state) == []
    # Between a HEADERS and its CONTINUATION the request is still being sent.
    parse(row([(1, "HEADERS", 0, 16384)], [GRPC_REQ[:2]]), True, state)
    assert parse(row([(0, "PING", 0, 8)]), True, state) == []


def test_frame_fields_that_do_not_align_are_a_parse_error() -> None:
    cols = row([(1, "HEADERS", EH, 9)], [GRPC_REQ])
    cols[LAYOUT.index("http2.type")] = "HEADERS,DATA"
    with pytest.raises(ValueError):
        parse(cols, True, {})


def test_stream_table_is_bounded() -> None:
    state: dict[str, object] = {}
    get = [(":method", "GET"), (":path", "/")]
    for sid in range(1, 2 * (MAX_STREAMS_PER_CONNECTION + 10), 2):
        parse(row([(sid, "HEADERS", EH | ES, 9)], [get]), True, state)
    conn = state["http2"]
    assert len(conn.streams) == MAX_STREAMS_PER_CONNECTION  # type: ignore[attr-defined]


def test_user_agent_column_only_when_enabled() -> None:
    assert "http2.headers.user_agent" not in Http2Parser().fields
    parser = Http2Parser(keep_user_agent=True)
    layout = ColumnLayout.build(parser.fields)
    parser.bind(layout)
    cols = [""] * len(layout.fields)
    for field, value in (
        ("http2.streamid", "1"),
        ("http2.type", "HEADERS"),
        ("http2.flags", "0x05"),
        ("http2.header.count", "3"),
        ("http2.header.name", ":method,:path,user-agent"),
        ("http2.header.value", "GET,/,curl/8, like nothing"),
        ("http2.header.value.length", "3,1,20"),
    ):
        cols[layout.index(field)] = value
    (req,) = parser.parse(cols, True, {})
    assert req.attrs["user_agent.original"] == "curl/8, like nothing"


def test_cut_values() -> None:
    assert cut_values("a,b, c,", [1, 4, 0]) == ["a", "b, c", ""]
    assert cut_values("", []) == []
    assert cut_values("", [0]) == [""]
    # Printed lengths differ (tshark escaped a byte): a split works without commas.
    assert cut_values("a\\001,b", [2, 1]) == ["a\\001", "b"]
    assert cut_values("a\\001,b,c", [2, 3]) is None
    long = ",".join(["v" * 10] * 300)[: COLUMN_LIMIT - 1]
    got = cut_values(long, [10] * 300)
    assert got is not None and 0 < len(got) < 300 and set(got) == {"v" * 10}


def test_garbage_columns_raise_only_what_the_sessionizer_counts() -> None:
    rnd = random.Random(7)
    alphabet = ["", "0", "1", "3", "9", "x", ",", "HEADERS", "DATA", "0x05", ":path", "-1", "1,3"]
    n_fields = len(LAYOUT.fields)
    for _ in range(3000):
        cols = ["".join(rnd.choices(alphabet, k=rnd.randrange(4))) for _ in range(n_fields)]
        with contextlib.suppress(ValueError, IndexError, KeyError):
            parse(cols, rnd.choice([True, False, None]), {})


# -- synthetic frames through tshark ---------------------------------------------


def _frame(ftype: int, flags: int, sid: int, payload: bytes) -> bytes:
    return (
        struct.pack("!I", len(payload))[1:]
        + bytes([ftype, flags])
        + struct.pack("!I", sid)
        + payload
    )


def _hpack(headers: Sequence[tuple[str, str]]) -> bytes:
    """Literal header fields without indexing, new names, no Huffman."""
    out = b""
    for name, value in headers:
        out += b"\x00" + bytes([len(name)]) + name.encode() + bytes([len(value)]) + value.encode()
    return out


PREFACE = b"PRI * HTTP/2.0\r\n\r\nSM\r\n\r\n" + _frame(4, 0, 0, b"")
REQUEST = _frame(1, EH | ES, 1, _hpack([(":method", "GET"), (":path", "/ok"), (":scheme", "http")]))
RESPONSE = (
    _frame(4, 0, 0, b"") + _frame(1, EH, 1, _hpack([(":status", "200")])) + _frame(0, ES, 1, b"hi")
)


def _h2c_pcap(path: Path, exchanges: Sequence[tuple[bytes, bytes]]) -> Path:
    frames: list[bytes] = []
    for n, (client, server) in enumerate(exchanges):
        c = conn(n + 1, 8081)
        frames += handshake(c)
        if client:
            frames.append(c.segment(True, PSH | ACK, client))
        if server:
            frames.append(c.segment(False, PSH | ACK, server))
        frames += close(c)
    return write(path, frames)


@pytest.mark.capture
def test_synthetic_exchange_parses(tmp_path: Path) -> None:
    records = read_pcap(
        _h2c_pcap(tmp_path / "ok.pcap", [(PREFACE + REQUEST, RESPONSE)]), ports=H2C_PORTS
    )
    assert [
        (r["url.path"], r["http.response.status_code"], r["flowprobe.outcome"]) for r in records
    ] == [("/ok", 200, "ok")]


@pytest.mark.capture
def test_hostile_frames_are_survived_and_counted(tmp_path: Path) -> None:
    rnd = random.Random(2)
    bad_hpack = _frame(1, EH | ES, 1, b"\xff\xff\xff\xff\x0f" + rnd.randbytes(30))
    exchanges = [
        (PREFACE + REQUEST, RESPONSE),  # the one good exchange
        (PREFACE + rnd.randbytes(300), rnd.randbytes(200)),
        (PREFACE + REQUEST[:12], b""),  # a frame cut short
        (PREFACE + _frame(1, EH, 1, b"")[:9] + b"\xff" * 40, b""),  # length lies
        (PREFACE + bad_hpack, RESPONSE),
        (PREFACE + _frame(3, 0, 1, b"\x00"), _frame(7, 0, 0, b"\x00\x00")),  # short RST/GOAWAY
        (PREFACE + REQUEST, _frame(1, EH | ES, 1, _hpack([(":status", "abc")]))),
        (rnd.randbytes(500), rnd.randbytes(500)),  # not even a preface
    ]
    path = _h2c_pcap(tmp_path / "bad.pcap", exchanges)
    records, stats, error = run_pcap(path, ports=H2C_PORTS)
    assert error is None
    assert stats.packets == 6 * len(exchanges) + sum(bool(s) for _, s in exchanges) + len(exchanges)
    got = [
        (
            r["client.port"] - 40000,
            r.get("url.path"),
            r["flowprobe.outcome"],
            r.get("error.type"),
            r.get("flowprobe.http2.headers_incomplete"),
        )
        for r in records
    ]
    assert sorted(got, key=lambda g: g[0]) == [
        (1, "/ok", "ok", None, None),
        # An empty header block, then garbage: a request nobody answered.
        (4, None, "no_response", "no_response", True),
        # Undecodable HPACK: the request still pairs with its response.
        (5, None, "ok", None, True),
        (7, "/ok", "error", "PROTOCOL_ERROR", None),
    ]
    # The connection that never was HTTP/2 is counted, not raised.
    assert stats.anomalies["undecoded_payload.http2"] == 1, stats.anomalies
