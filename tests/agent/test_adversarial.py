"""Hostile and broken traffic through tshark and the pipeline: nothing escapes, anomalies are counted."""

from __future__ import annotations

import random
from pathlib import Path

import pytest

from flowprobe.devenv.pcapgen import ACK, PSH, SYN
from tests.agent.helpers import REQ, RESP, close, conn, handshake, run_pcap, write

pytestmark = pytest.mark.capture


@pytest.mark.parametrize("port", [8080, 6379, 5432, 3306, 53, 50051])
def test_random_payloads_on_protocol_ports(tmp_path: Path, port: int) -> None:
    rnd = random.Random(port)
    frames: list[bytes] = []
    for n in range(20):
        c = conn(n, port)
        frames += handshake(c)
        for _ in range(5):
            frames.append(
                c.segment(rnd.random() < 0.5, PSH | ACK, rnd.randbytes(rnd.randrange(1, 1400)))
            )
        frames += close(c)
    records, stats, error = run_pcap(write(tmp_path / "rand.pcap", frames), connections=True)
    assert error is None
    conns = [r for r in records if r["flowprobe.record"] == "connection"]
    assert len(conns) == 20  # every flow still yields its L4 record
    assert stats.packets == len(frames)
    if port == 8080:
        # Garbage on a parsed protocol's port is noticed, not silently ignored.
        assert sum(stats.anomalies.values()) >= 1, stats.anomalies


def test_truncated_request_and_missing_segment(tmp_path: Path) -> None:
    a, b = conn(1), conn(2)
    frames = [*handshake(a), a.segment(True, PSH | ACK, REQ[:10]), *close(a)]
    # b: a response whose middle segment was never captured.
    frames += [*handshake(b), b.segment(True, PSH | ACK, REQ)]
    big = b"HTTP/1.1 200 OK\r\nContent-Length: 3000\r\n\r\n" + b"x" * 3000
    seg1, seg2, seg3 = big[:1000], big[1000:2000], big[2000:]
    frames.append(b.segment(False, PSH | ACK, seg1))
    b.segment(False, PSH | ACK, seg2)  # advances seq, never written: lost
    frames.append(b.segment(False, PSH | ACK, seg3))
    frames += close(b)
    records, _stats, error = run_pcap(write(tmp_path / "t.pcap", frames))
    assert error is None
    # The complete request on b is reported, with the truth: no (parsable) response.
    assert [(r["url.path"], r["flowprobe.outcome"]) for r in records] == [("/x", "no_response")]


def test_response_without_request_is_counted(tmp_path: Path) -> None:
    c = conn()
    frames = [*handshake(c), c.segment(False, PSH | ACK, RESP), *close(c)]
    records, stats, error = run_pcap(write(tmp_path / "r.pcap", frames))
    assert error is None and records == []
    assert stats.anomalies["response_without_request.http"] == 1


def test_pipelined_requests_with_last_response_lost(tmp_path: Path) -> None:
    c = conn()
    frames = [*handshake(c), c.segment(True, PSH | ACK, REQ * 3)]
    frames += [c.segment(False, PSH | ACK, RESP), c.segment(False, PSH | ACK, RESP)]
    frames += close(c)
    records, _stats, error = run_pcap(write(tmp_path / "p.pcap", frames))
    assert error is None
    assert [r["flowprobe.outcome"] for r in records] == ["ok", "ok", "no_response"]


def test_half_open_and_mid_stream_connections(tmp_path: Path) -> None:
    syn_only, mid = conn(1), conn(2)
    frames = [
        syn_only.segment(True, SYN),
        syn_only.segment(True, SYN),
    ]  # SYN retried, never answered
    # A connection whose handshake happened before the capture started.
    frames += [mid.segment(True, PSH | ACK, REQ), mid.segment(False, PSH | ACK, RESP), *close(mid)]
    records, _stats, error = run_pcap(write(tmp_path / "h.pcap", frames), connections=True)
    assert error is None
    exchanges = [r for r in records if r["flowprobe.record"] == "exchange"]
    assert len(exchanges) == 1 and exchanges[0]["flowprobe.outcome"] == "ok"
    assert "flowprobe.tcp.handshake.server_us" not in exchanges[0]
    conns = {r["client.port"]: r for r in records if r["flowprobe.record"] == "connection"}
    assert conns[40001]["flowprobe.tcp.syn"] == 2 and conns[40001]["flowprobe.exchanges"] == 0


def test_out_of_order_segments_are_reassembled_and_counted(tmp_path: Path) -> None:
    c = conn()
    frames = [*handshake(c), c.segment(True, PSH | ACK, REQ)]
    body = b"HTTP/1.1 200 OK\r\nContent-Length: 2000\r\n\r\n" + b"y" * 2000
    first = c.segment(False, PSH | ACK, body[:1000])
    second = c.segment(False, PSH | ACK, body[1000:])
    frames += [second, first, *close(c)]
    records, _stats, error = run_pcap(write(tmp_path / "o.pcap", frames))
    assert error is None
    assert len(records) == 1
    assert records[0]["flowprobe.tcp.out_of_order"] + records[0]["flowprobe.tcp.retransmits"] >= 1
