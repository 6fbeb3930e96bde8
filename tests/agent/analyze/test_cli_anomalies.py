"""``flowprobe-agent read --anomalies`` over a synthetic pcap: alerts on pcap time, to OTLP.

Two clients call one server over keep-alive connections for 40 s of capture
time. Halfway, one client's calls start failing and slowing down; the other
stays as it was. The pcap is read in well under those 40 s, so every alert
here was timed by the exchanges' own timestamps.
"""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from flowprobe.devenv.pcapgen import ACK, PSH, Conn, write_frames
from tests.agent.export.fakes import FakeGrpcReceiver, attrs
from tests.agent.helpers import agent, close, handshake

pytestmark = pytest.mark.capture

T0 = 1_700_000_000_000_000
SECONDS, SHIFT_S, EVERY_US = 40, 20, 50_000
INTERVAL_S = 2
FLAGS = [
    "--anomalies",
    "--anomaly-interval", str(INTERVAL_S),
    "--anomaly-warmup", "3",
    "--anomaly-min-exchanges", "10",
    "--top-n", "3",
    "--service-name", "10.9.0.1=shifted",
    "--service-name", "10.9.0.2=steady",
    "--service-name", "10.9.1.1:8080=api",
]  # fmt: skip


def _response(failed: bool) -> bytes:
    status = b"500 Internal Server Error" if failed else b"200 OK"
    return b"HTTP/1.1 " + status + b"\r\nContent-Length: 2\r\n\r\nok"


def _pcap(path: Path) -> Path:
    """Both clients send a request every 50 ms, round robin over eight keep-alive
    connections; one in ten fails. From SHIFT_S on, client 1 sees six in ten
    fail and answers after 200 ms instead of 2 ms."""
    frames: list[tuple[int, bytes]] = []
    for n in (1, 2):
        pool = [
            Conn(
                cip=bytes([10, 9, 0, n]),
                sip=bytes([10, 9, 1, 1]),
                cport=40000 + 10 * n + k,
                sport=8080,
            )
            for k in range(8)
        ]
        for k, c in enumerate(pool):
            frames += [(T0 + k * 10 + i, f) for i, f in enumerate(handshake(c))]
        t = T0 + 1000
        i = 0
        while t < T0 + SECONDS * 1_000_000:
            c = pool[i % len(pool)]
            shifted = n == 1 and t >= T0 + SHIFT_S * 1_000_000
            failed = i % 10 < (6 if shifted else 1)
            req = f"GET /orders/{i} HTTP/1.1\r\nHost: api\r\n\r\n".encode()
            frames.append((t, c.segment(True, ACK | PSH, req)))
            latency = 200_000 if shifted else 2000
            frames.append((t + latency, c.segment(False, ACK | PSH, _response(failed))))
            t += EVERY_US
            i += 1
        for k, c in enumerate(pool):
            frames += [(t + 300_000 + k * 10 + j, f) for j, f in enumerate(close(c))]
    frames.sort(key=lambda tf: tf[0])
    with path.open("wb") as f:
        write_frames(f, frames)
    return path


def test_a_shifted_edge_alerts_once_per_measure_on_pcap_time(tmp_path: Path) -> None:
    receiver = FakeGrpcReceiver()
    try:
        stats = tmp_path / "stats.json"
        r = agent(
            "read",
            str(_pcap(tmp_path / "shift.pcap")),
            "--otlp-endpoint",
            receiver.endpoint,
            "--stats",
            str(stats),
            *FLAGS,
        )
        assert r.returncode == 0, r.stderr
        logs = receiver.received.log_records()
        alerts = [a for name, a in logs if name == "flowprobe.anomaly"]
        assert {(a["flowprobe.client.service"], a["flowprobe.anomaly.kind"]) for a in alerts} == {
            ("shifted", "error_ratio"),
            ("shifted", "latency"),
        }
        assert len(alerts) == 2
        for a in alerts:
            assert (
                a["flowprobe.server.service"] == "api:8080"
                or a["flowprobe.server.service"] == "api"
            )
            # Within the configured window: the first interval holding shifted traffic.
            start_s = (a["flowprobe.anomaly.interval_start_unix_us"] - T0) / 1e6
            assert SHIFT_S - INTERVAL_S <= start_s <= SHIFT_S, a
        ratio = next(a for a in alerts if a["flowprobe.anomaly.kind"] == "error_ratio")
        assert abs(ratio["flowprobe.anomaly.baseline"] - 0.1) < 0.02
        assert ratio["flowprobe.anomaly.observed"] >= 0.5
        # The storm did not end before the capture did: reported as stopped, with its count.
        ended = [a for name, a in logs if name == "flowprobe.anomaly.resolved"]
        assert {a["flowprobe.client.service"] for a in ended} == {"shifted"}
        assert all(a["flowprobe.anomaly.count"] >= 1 for a in ended)
        assert json.loads(stats.read_text())["anomalies"]["alerts"] == 2

        # The span event is on a span of that edge, after the shift.
        events = [
            (res["service.name"], e)
            for res, span in receiver.received.spans()
            for e in span.events
            if e.name == "flowprobe.anomaly"
        ]
        assert {svc for svc, _ in events} == {"shifted", "api"}
        assert {attrs(e.attributes)["flowprobe.anomaly.kind"] for _, e in events} == {
            "error_ratio",
            "latency",
        }
        for _, e in events:
            assert e.time_unix_nano // 1000 >= T0 + SHIFT_S * 1_000_000

        names = receiver.received.metric_names()
        assert {f"flowprobe.top.{m}" for m in ("requests", "errors", "bytes", "latency")} <= names
        assert "flowprobe.anomaly.alerts" in names
    finally:
        receiver.stop()


def test_top_n_gauges_rank_the_members(tmp_path: Path) -> None:
    receiver = FakeGrpcReceiver()
    try:
        r = agent(
            "read", str(_pcap(tmp_path / "shift.pcap")), "--otlp-endpoint", receiver.endpoint,
            *FLAGS,
        )  # fmt: skip
        assert r.returncode == 0, r.stderr
        got = receiver.received
        with got.lock:
            points = [
                (m.name, attrs(p.attributes), p.as_double or p.as_int)
                for req in got.metrics for rm in req.resource_metrics for sm in rm.scope_metrics
                for m in sm.metrics if m.name.startswith("flowprobe.top.")
                for p in m.gauge.data_points
            ]  # fmt: skip

        def ranked(name: str, dim: str) -> list[str]:
            return [
                a["flowprobe.top.member"]
                for _, a, _ in sorted(
                    (p for p in points if p[0] == name and p[1]["flowprobe.top.dimension"] == dim),
                    key=lambda p: p[1]["flowprobe.top.rank"],
                )
            ]

        # One export at the end of the read: the last 60 s window, the whole pcap.
        assert ranked("flowprobe.top.errors", "client.workload") == ["shifted", "steady"]
        assert ranked("flowprobe.top.latency", "client.address") == ["10.9.0.1", "10.9.0.2"]
        assert ranked("flowprobe.top.requests", "server.workload") == ["api"]
    finally:
        receiver.stop()


def test_anomalies_without_otlp_are_refused(tmp_path: Path) -> None:
    r = agent("read", "x.pcap", "--anomalies")
    assert r.returncode == 2 and "--anomalies needs --otlp-endpoint" in r.stderr
