"""DNS through tshark and the whole pipeline, on pcaps recorded from a real server and
client (tests/data/record_dns.py), plus the parser on hand-made columns and hostile input."""

from __future__ import annotations

import contextlib
import random
import struct
from pathlib import Path
from typing import Any

import pytest

from flowprobe.agent.config import AgentConfig
from flowprobe.agent.parse.dns import FIELDS, DnsParser, rcode_name, rr_types
from flowprobe.agent.pipeline import Pipeline, Sinks
from flowprobe.devenv.pcapgen import ACK, PSH
from tests.agent import helpers
from tests.agent.helpers import DATA, close, conn, handshake, read_pcap, run_pcap, write

DNS = DATA / "dns"
CLIENT, SERVER = "10.252.0.1", "10.252.0.2"


def _by_name(records: list[dict[str, Any]]) -> dict[tuple[str, str], dict[str, Any]]:
    return {(r["dns.question.name"], r["flowprobe.dns.question.type"]): r for r in records}


@pytest.mark.capture
def test_parallel_udp_queries_on_one_socket_pair_by_transaction_id() -> None:
    records = read_pcap(DNS / "udp.pcapng")
    assert len(records) == 9
    got = {
        key: (
            r["flowprobe.outcome"],
            r.get("flowprobe.dns.response_code"),
            sorted(r.get("dns.answers", [])),
            r.get("flowprobe.dns.cnames"),
        )
        for key, r in _by_name(records).items()
    }
    assert got == {
        ("a.svc.test", "A"): ("ok", "NOERROR", ["10.1.0.1", "10.1.0.2"], None),
        ("slow.svc.test", "A"): ("ok", "NOERROR", ["10.1.0.9"], None),
        ("v6.svc.test", "AAAA"): ("ok", "NOERROR", ["fd00::1"], None),
        ("alias.svc.test", "A"): ("ok", "NOERROR", ["10.1.0.1", "10.1.0.2"], ["a.svc.test"]),
        ("alias.svc.test", "CNAME"): ("ok", "NOERROR", [], ["a.svc.test"]),
        ("other.svc.test", "A"): ("error", "NXDOMAIN", [], None),
        ("fail.svc.test", "A"): ("error", "SERVFAIL", [], None),
        ("drop.svc.test", "A"): ("no_response", None, [], None),
        ("retry.svc.test", "A"): ("ok", "NOERROR", ["10.1.0.7"], None),
    }
    for r in records:
        assert (r["client.address"], r["client.port"]) == (CLIENT, 40053)
        assert (r["server.address"], r["server.port"]) == (SERVER, 53)
        assert r["network.transport"] == "udp"
        assert r["flowprobe.duration_us"] > 0
    recs = _by_name(records)
    assert recs[("other.svc.test", "A")]["error.type"] == "NXDOMAIN"
    assert recs[("fail.svc.test", "A")]["error.type"] == "SERVFAIL"
    assert recs[("alias.svc.test", "A")]["flowprobe.dns.answer_count"] == 3
    # "slow" was asked second and answered last, 300 ms later: keyed pairing
    # gives it its own answer and the others theirs.
    order = [r["dns.question.name"] for r in records]
    assert order.index("slow.svc.test") == 6
    assert recs[("slow.svc.test", "A")]["flowprobe.duration_us"] > 250_000
    assert recs[("a.svc.test", "A")]["flowprobe.duration_us"] < 100_000
    # The lost query and its retry (same id) are one lookup, timed from the
    # first query; the retry is counted.
    retry = recs[("retry.svc.test", "A")]
    assert retry["flowprobe.dns.retries"] == 1
    assert retry["flowprobe.duration_us"] > 190_000
    assert recs[("drop.svc.test", "A")]["error.type"] == "no_response"


@pytest.mark.capture
def test_dns_over_tcp_with_three_queries_in_one_segment() -> None:
    records = read_pcap(DNS / "tcp.pcapng")
    assert [
        (r["dns.question.name"], r["flowprobe.dns.question.type"], r["flowprobe.outcome"])
        for r in records
    ] == [
        ("a.svc.test", "A", "ok"),
        ("other.svc.test", "A", "error"),
        ("v6.svc.test", "AAAA", "ok"),
        ("alias.svc.test", "CNAME", "ok"),
    ]
    first3 = records[:3]
    assert len({r["client.port"] for r in first3}) == 1
    assert len({r["start_time_unix_us"] for r in first3}) == 1  # one segment
    assert records[3]["client.port"] != records[0]["client.port"]
    assert sorted(first3[0]["dns.answers"]) == ["10.1.0.1", "10.1.0.2"]
    assert first3[1]["dns.answers"] == [] and first3[1]["error.type"] == "NXDOMAIN"
    assert first3[2]["dns.answers"] == ["fd00::1"]
    assert records[3]["flowprobe.dns.cnames"] == ["a.svc.test"]
    for r in records:
        assert r["network.transport"] == "tcp"
        assert (r["server.address"], r["server.port"]) == (SERVER, 53)
        assert r["flowprobe.duration_us"] > 0


@pytest.mark.capture
def test_custom_port_needs_decode_as_for_tcp() -> None:
    # tshark's DNS-over-UDP heuristic finds the UDP query on 5300 by itself;
    # DNS over TCP on 5300 needs the --port rule.
    plain = read_pcap(DNS / "port.pcapng")
    assert [(r["network.transport"], r["server.port"]) for r in plain] == [("udp", 5300)]
    records = read_pcap(DNS / "port.pcapng", ports={"dns": (5300,)})
    assert [
        (r["network.transport"], r["server.port"], r["dns.question.name"], sorted(r["dns.answers"]))
        for r in records
    ] == [
        ("udp", 5300, "a.svc.test", ["10.1.0.1", "10.1.0.2"]),
        ("tcp", 5300, "v6.svc.test", ["fd00::1"]),
    ]


def test_dns_ports_are_decoded_over_udp_and_tcp() -> None:
    rules = Pipeline(AgentConfig(ports={"dns": (5300,)}), Sinks()).tshark_options.decode_as
    assert ("udp.port==5300", "dns") in rules and ("tcp.port==5300", "dns") in rules


# -- hand-made columns ------------------------------------------------------


LAYOUT = helpers.layout(FIELDS)


def _cols(**values: str) -> list[str]:
    return helpers.columns(FIELDS, **values)


def _parser() -> DnsParser:
    return helpers.bound(DnsParser())


QUERY = "Message is a query"
RESPONSE = "Message is a response"


def test_query_and_response_are_keyed_by_id() -> None:
    p = _parser()
    state: dict[str, object] = {}
    (q,) = p.parse(
        _cols(
            dns__id="0xbeef",
            dns__flags__response=QUERY,
            dns__qry__name="x.test",
            dns__qry__type="MX (Mail eXchange)",
            dns__count__queries="1",
            dns__count__answers="0",
        ),
        True,
        state,
    )
    assert q.is_request and q.key == 0xBEEF
    assert q.attrs["dns.question.name"] == "x.test"
    assert q.attrs["flowprobe.dns.question.type"] == "MX"
    (r,) = p.parse(
        _cols(
            dns__id="0xbeef",
            dns__flags__response=RESPONSE,
            dns__flags__rcode="Refused",
            dns__qry__name="x.test",
            dns__qry__type="MX (Mail eXchange)",
            dns__count__queries="1",
            dns__count__answers="0",
        ),
        False,
        state,
    )
    assert not r.is_request and r.key == 0xBEEF and r.error_type == "REFUSED"


def test_additional_section_addresses_are_not_answers() -> None:
    # Two responses in one TCP segment; the first has a glue A record and an
    # OPT record in its additional section, the second an AAAA answer.
    cols = _cols(
        dns__id="0x0001,0x0002",
        dns__flags__response=f"{RESPONSE},{RESPONSE}",
        dns__flags__rcode="No error,No error",
        dns__qry__name="a.test,b.test",
        dns__qry__type="NS (authoritative Name Server),AAAA (IPv6 Address)",
        dns__count__queries="1,1",
        dns__count__answers="1,1",
        dns__count__auth_rr="0,0",
        dns__count__add_rr="2,0",
        dns__resp__type=("NS (authoritative Name Server),A (Host Address),OPT,AAAA (IPv6 Address)"),
        dns__a="192.0.2.53",
        dns__aaaa="2001:db8::1",
    )
    first, second = _parser().parse(cols, False, {})
    assert first.key == 1 and first.attrs["dns.answers"] == []
    # The question is the query's to report; the answer carries the answers.
    assert "flowprobe.dns.question.type" not in first.attrs
    assert second.key == 2 and second.attrs["dns.answers"] == ["2001:db8::1"]


def test_retransmitted_query_is_one_lookup_and_duplicate_answer_is_dropped() -> None:
    p = _parser()
    state: dict[str, object] = {}
    q = _cols(
        dns__id="0x0007",
        dns__flags__response=QUERY,
        dns__qry__name="r.test",
        dns__qry__type="A (Host Address)",
    )
    assert len(p.parse(q, True, state)) == 1
    again = list(q)
    again[LAYOUT.index("dns.retransmission")] = "True"
    assert p.parse(again, True, state) == []
    resp = _cols(dns__id="0x0007", dns__flags__response=RESPONSE, dns__flags__rcode="No error")
    (r,) = p.parse(resp, False, state)
    assert r.attrs["flowprobe.dns.retries"] == 1
    dup = list(resp)
    dup[LAYOUT.index("dns.retransmission")] = "True"
    assert p.parse(dup, False, state) == []


def test_messages_against_the_flow_direction_are_rejected_and_counted() -> None:
    p = _parser()
    query = _cols(
        dns__id="0x0009", dns__flags__response=QUERY, dns__qry__name="x", dns__qry__type="A"
    )
    with pytest.raises(ValueError):
        p.parse(query, False, {})  # a query coming from the server
    with pytest.raises(ValueError):
        p.parse(_cols(dns__id="0x0009", dns__flags__response=RESPONSE), True, {})
    # No side known (both ports 53): the QR bit decides.
    assert [m.is_request for m in p.parse(query, None, {})] == [True]
    # A query without a question is not one.
    with pytest.raises(ValueError):
        p.parse(_cols(dns__id="0x0009", dns__flags__response=QUERY), True, {})


def test_value_strings_map_back_to_wire_names() -> None:
    assert rr_types("A (Host Address),* (A request for all records),65280") == (
        "A",
        "ANY",
        "TYPE65280",
    )
    assert rr_types("X (one, two),AAAA (IPv6 Address)") == ("X", "AAAA")
    assert rcode_name("No such name") == "NXDOMAIN"
    assert rcode_name("12") == "RCODE12"
    assert rcode_name("DSO-Type not implemented") == "DSOTYPENI"


def test_odd_columns_never_raise_anything_unexpected() -> None:
    p = _parser()
    assert p.parse(_cols(), True, {}) == []
    with pytest.raises(ValueError):
        p.parse(_cols(dns__id="0x1,0x2", dns__flags__response=QUERY), True, {})
    with pytest.raises(ValueError):
        p.parse(_cols(dns__id="zz", dns__flags__response=QUERY), True, {})
    rnd = random.Random(53)
    alphabet = "0x1,AB (c)Message is a response9-. "
    for _ in range(3000):
        cols = [
            "".join(rnd.choice(alphabet) for _ in range(rnd.randrange(0, 12)))
            for _ in range(len(LAYOUT.fields))
        ]
        with contextlib.suppress(ValueError, IndexError, KeyError):
            p.parse(cols, rnd.choice([True, False, None]), {})


def test_retry_memory_is_bounded() -> None:
    p = _parser()
    state: dict[str, object] = {}
    for qid in range(1000):
        cols = _cols(
            dns__id=hex(qid), dns__flags__response=QUERY, dns__qry__name="x", dns__qry__type="A"
        )
        cols[LAYOUT.index("dns.retransmission")] = "True"
        p.parse(cols, True, state)
    retries = state["dns.retries"]
    assert isinstance(retries, dict) and len(retries) <= 256


# -- hostile traffic through tshark -------------------------------------------


def _udp(src: bytes, dst: bytes, sport: int, dport: int, payload: bytes) -> bytes:
    udp = struct.pack("!HHHH", sport, dport, 8 + len(payload), 0) + payload
    ip = struct.pack("!BBHHHBBH4s4s", 0x45, 0, 20 + len(udp), 0, 0x4000, 64, 17, 0, src, dst)
    return b"\x02\x00\x00\x00\x00\x01\x02\x00\x00\x00\x00\x02\x08\x00" + ip + udp


def _query(qid: int, name: bytes = b"\x01a\x04test\x00") -> bytes:
    return struct.pack("!HHHHHH", qid, 0x0100, 1, 0, 0, 0) + name + b"\x00\x01\x00\x01"


@pytest.mark.capture
def test_random_and_truncated_dns_messages_are_survived_and_counted(tmp_path: Path) -> None:
    rnd = random.Random(5353)
    cip, sip = bytes([10, 9, 0, 1]), bytes([10, 9, 1, 1])
    frames = []
    for i in range(40):
        frames.append(_udp(cip, sip, 30000 + i, 53, rnd.randbytes(rnd.randrange(1, 300))))
        frames.append(_udp(sip, cip, 53, 30000 + i, rnd.randbytes(rnd.randrange(1, 300))))
    # A real query whose response is cut after the header.
    ok = _query(0x4242)
    frames.append(_udp(cip, sip, 31000, 53, ok))
    frames.append(_udp(sip, cip, 53, 31000, struct.pack("!HHHHHH", 0x4242, 0x8180, 1, 1, 0, 0)))
    # DNS over TCP: a length prefix promising more than ever arrives, then
    # random bytes.
    c = conn(7, 53)
    frames += [*handshake(c), c.segment(True, PSH | ACK, b"\x01\x00" + _query(9)[:20])]
    frames += [c.segment(True, PSH | ACK, rnd.randbytes(500)), *close(c)]
    records, stats, error = run_pcap(write(tmp_path / "dns.pcap", frames))
    assert error is None
    assert stats.packets == len(frames)
    for r in records:
        assert r["flowprobe.protocol"] == "dns"
    # Garbage that dissected as DNS responses without queries, unparsable
    # rows, or undecodable TCP payload are counted, not silent.
    assert sum(stats.anomalies.values()) >= 1, stats.anomalies
