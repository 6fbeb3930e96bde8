"""``flowprobe-agent read --waf --ddr`` over a pcap: findings in the records, bad flags refused."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from flowprobe.devenv.pcapgen import ACK, PSH
from tests.agent.export.fakes import FakeGrpcReceiver, attrs
from tests.agent.helpers import agent, close, conn, handshake, write

pytestmark = pytest.mark.capture

SQLI = (
    b"GET /orders?id=1%20UNION%20SELECT%20password%20FROM%20users-- HTTP/1.1\r\n"
    b"Host: api\r\nUser-Agent: curl/8\r\nAccept: */*\r\n\r\n"
)
BODY = b'{"card": "4111 1111 1111 1111"}'
PAY = (
    b"POST /pay HTTP/1.1\r\nHost: api\r\nUser-Agent: curl/8\r\nAccept: */*\r\n"
    b"Content-Type: application/json\r\nContent-Length: %d\r\n\r\n" % len(BODY)
) + BODY
RESP = b"HTTP/1.1 200 OK\r\nContent-Type: application/json\r\nContent-Length: 2\r\n\r\n{}"


def _pcap(tmp_path: Path) -> Path:
    frames: list[bytes] = []
    for n, req in enumerate((SQLI, PAY), start=1):
        c = conn(n)
        frames += [
            *handshake(c),
            c.segment(True, ACK | PSH, req),
            c.segment(False, ACK | PSH, RESP),
        ]
        frames += close(c)
    return write(tmp_path / "sec.pcap", frames)


def test_read_with_waf_and_ddr(tmp_path: Path) -> None:
    stats = tmp_path / "stats.json"
    r = agent("read", str(_pcap(tmp_path)), "--waf", "--ddr", "--stats", str(stats))
    assert r.returncode == 0, r.stderr
    sqli, pay = (json.loads(line) for line in r.stdout.splitlines())
    rules = {e["flowprobe.waf.rule.id"] for e in sqli["flowprobe.security.events"]}
    assert 942100 in rules and sqli["flowprobe.waf.matches"] >= 1
    assert pay["flowprobe.ddr.categories"] == ["card"]
    assert "4111" not in r.stdout
    assert json.loads(stats.read_text())["security"] == {"inspected": 2}
    # Off by default: the same file gives plain records.
    plain = agent("read", str(tmp_path / "sec.pcap"))
    assert "flowprobe.security" not in plain.stdout and "flowprobe.payload" not in plain.stdout


def test_bad_security_flags_are_refused(tmp_path: Path) -> None:
    r = agent("read", "x.pcap", "--waf", "--waf-exclude-rule", "942x")
    assert r.returncode == 2 and "rule id or range" in r.stderr
    r = agent("read", "x.pcap", "--ddr", "--ddr-category", "dna")
    assert r.returncode == 2 and "invalid choice" in r.stderr


def test_findings_over_otlp_spans_logs_and_metrics(tmp_path: Path) -> None:
    receiver = FakeGrpcReceiver()
    try:
        r = agent(
            "read",
            str(_pcap(tmp_path)),
            "--waf",
            "--ddr",
            "--otlp-endpoint",
            receiver.endpoint,
            "--service-name",
            "10.9.1.1:8080=api",
        )
        assert r.returncode == 0, r.stderr
        got = receiver.received
        events = {e.name for _, span in got.spans() for e in span.events}
        assert {"flowprobe.waf.match", "flowprobe.ddr.first_seen"} <= events
        with got.lock:
            records = [
                lr for req in got.logs for rl in req.resource_logs for sl in rl.scope_logs
                for lr in sl.log_records
            ]  # fmt: skip
        waf = [lr for lr in records if lr.event_name == "flowprobe.waf.match"]
        ddr = [lr for lr in records if lr.event_name == "flowprobe.ddr.first_seen"]
        assert waf and ddr
        first = attrs(waf[0].attributes)
        assert first["flowprobe.server.service"] == "api" and first["client.address"] == "10.9.0.1"
        assert waf[0].severity_text == "CRITICAL"
        assert attrs(ddr[0].attributes)["flowprobe.ddr.sample"] == "************1111"
        names = got.metric_names()
        assert {"flowprobe.waf.rule.matches", "flowprobe.waf.edge.matches"} <= names
        assert {"flowprobe.ddr.detections", "flowprobe.agent.security.exchanges"} <= names
        with got.lock:
            raw = b"".join(req.SerializeToString() for req in got.traces)
            raw += b"".join(req.SerializeToString() for req in got.logs)
        assert b"4111 1111" not in raw and b"flowprobe.payload" not in raw
    finally:
        receiver.stop()
