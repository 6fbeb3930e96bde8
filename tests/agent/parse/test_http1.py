"""HTTP/1.x through tshark and the whole pipeline, on pcaps recorded from real servers
(tests/data/record_http.py), plus the parser on hand-made columns."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import pytest

from flowprobe.agent.parse.http1 import FIELDS, Http1Parser
from flowprobe.devenv.pcapgen import ACK, PSH
from tests.agent import helpers
from tests.agent.helpers import DATA, REQ, RESP, close, conn, handshake, read_pcap, write

HTTP = DATA / "http"


def _summary(records: list[dict[str, Any]]) -> list[tuple[Any, ...]]:
    return [
        (
            r.get("http.request.method"),
            r.get("url.path"),
            r.get("http.response.status_code"),
            r["flowprobe.outcome"],
        )
        for r in records
    ]


@pytest.mark.capture
def test_keepalive_connection_yields_one_exchange_per_request() -> None:
    records = read_pcap(HTTP / "keepalive.pcapng")
    assert _summary(records) == [("GET", f"/items/{i}", 200, "ok") for i in range(10)]
    first = records[0]
    # The handshake was captured, so the first exchange carries its split.
    assert first["flowprobe.tcp.handshake.server_us"] > 0
    assert first["flowprobe.tcp.handshake.client_us"] > 0
    assert all("flowprobe.tcp.handshake.server_us" not in r for r in records[1:])
    for r in records:
        assert r["client.address"] == "10.251.0.1"
        assert r["server.address"] == "10.251.0.2"
        assert r["server.port"] == 8080
        assert r["end_time_unix_us"] >= r["start_time_unix_us"]
        assert r["flowprobe.request.bytes"] == 36
        assert r["flowprobe.response.bytes"] > 0
        assert r["http.request.header.host"] == "api"


@pytest.mark.capture
def test_pipelined_requests_pair_in_order() -> None:
    records = read_pcap(HTTP / "pipelined.pcapng")
    assert _summary(records) == [
        ("GET", "/a", 200, "ok"),
        ("GET", "/b", 200, "ok"),
        ("HEAD", "/c", 200, "ok"),
    ]
    # All three left in one segment, so they share a start.
    assert len({r["start_time_unix_us"] for r in records}) == 1


@pytest.mark.capture
def test_chunked_continue_head_errors_and_upgrade() -> None:
    records = read_pcap(HTTP / "features.pcapng")
    assert _summary(records) == [
        ("GET", "/chunked", 200, "ok"),
        ("POST", "/echo", 200, "ok"),
        ("HEAD", "/items/7", 200, "ok"),
        ("GET", "/status/503", 503, "error"),
        ("GET", "/status/404", 404, "ok"),
        ("GET", "/upgrade", 101, "ok"),
    ]
    chunked, echo = records[0], records[1]
    assert chunked["flowprobe.response.bytes"] > 5 * 50 * 8  # every chunk counted
    # The client waited ~0.3 s for 100 Continue before sending the body: the
    # exchange spans both, the interim response does not end it.
    assert echo["flowprobe.duration_us"] > 250_000
    assert records[3]["error.type"] == "503"
    assert "error.type" not in records[4]


@pytest.mark.capture
def test_server_delays_are_measured_from_capture_timestamps() -> None:
    records = read_pcap(HTTP / "delays.pcapng")
    client_measured = {
        int(ms): int(us)
        for ms, us in (ln.split() for ln in (HTTP / "delays.client.txt").read_text().splitlines())
    }
    assert [r["url.path"] for r in records] == [f"/delay/{ms}" for ms in client_measured]
    for r in records:
        ms = int(r["url.path"].rsplit("/", 1)[1])
        # Server think time is at least the injected delay.
        assert r["flowprobe.server_response_time_us"] >= ms * 1000
        # The wire duration can only be shorter than what the client saw.
        assert r["flowprobe.duration_us"] <= client_measured[ms] + 1000


@pytest.mark.capture
def test_requests_without_response_are_reported_not_dropped() -> None:
    records = read_pcap(HTTP / "noresponse.pcapng")
    outcomes = sorted((r["url.path"], r["flowprobe.outcome"]) for r in records)
    assert outcomes == [("/items/1", "ok"), ("/silent", "no_response"), ("/silent", "reset")]
    reset = next(r for r in records if r["flowprobe.outcome"] == "reset")
    assert reset["error.type"] == "connection_reset"
    assert reset["flowprobe.tcp.rst"] >= 1


def _cols(**values: str) -> list[str]:
    return helpers.columns(FIELDS, **values)


def _parser() -> Http1Parser:
    return helpers.bound(Http1Parser())


def test_uri_with_commas_is_kept_whole_for_a_single_request() -> None:
    cols = _cols(**{"http.request.method": "GET", "http.request.uri": "/a,b?x=1,2"})
    (msg,) = _parser().parse(cols, True, {})
    assert msg.attrs["url.path"] == "/a,b"
    assert msg.attrs["url.query"] == "x=1,2"


def test_interim_and_upgrade_responses() -> None:
    p = _parser()
    (cont,) = p.parse(_cols(**{"http.response.code": "100"}), False, {})
    assert not cont.final
    (up,) = p.parse(_cols(**{"http.response.code": "101"}), False, {})
    assert up.final and up.upgrade
    (err,) = p.parse(_cols(**{"http.response.code": "500"}), False, {})
    assert err.error_type == "500"


def test_garbage_status_code_raises_value_error_for_the_sessionizer_to_count() -> None:
    with pytest.raises(ValueError):
        _parser().parse(_cols(**{"http.response.code": "abc"}), False, {})


@pytest.mark.capture
def test_http_on_a_non_standard_port_is_found_by_tshark_heuristics(tmp_path: Path) -> None:
    """No --port rule: tshark's HTTP-over-TCP heuristic recognises it."""
    c = conn(1, port=9999)
    frames = [
        *handshake(c),
        c.segment(True, PSH | ACK, REQ),
        c.segment(False, PSH | ACK, RESP),
        *close(c),
    ]
    records = read_pcap(write(tmp_path / "odd.pcap", frames))
    assert [(r["server.port"], r["http.response.status_code"]) for r in records] == [(9999, 200)]
