"""Anomaly alerts live: a load generator shifts one edge's error ratio and latency.

Two client pods call the test HTTP app in a third over keep-alive
connections, at a steady rate with one request in ten failing. After a
warm-up, one client's requests start failing one in two and the other half
takes 300 ms; the other client goes on as before. The agent captures on the
node side and exports OTLP (through a forwarder out of the node namespace)
to a receiver here: exactly the shifted edge alerts, once per measure,
for an interval within the configured window of the shift; the steady edge
raises nothing.
"""

from __future__ import annotations

import json
import threading
import time
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import pytest

from flowprobe.devenv.netns import Node, Pod
from flowprobe.devenv.nsproxy import Forwarder
from flowprobe.devenv.servers import start_http
from tests.agent.export.fakes import FakeGrpcReceiver, attrs
from tests.agent.helpers import loadgen, stop_agent

pytestmark = [pytest.mark.capture, pytest.mark.netns, pytest.mark.slow]

RATE = 30  # requests per second and client
INTERVAL_S = 1
STEADY = ",".join(["/items/{n}"] * 9 + ["/status/500"])
SHIFTED = "/status/500,/delay/300"
FLAGS = [
    "--anomalies",
    "--anomaly-interval", str(INTERVAL_S),
    "--anomaly-warmup", "4",
    "--anomaly-span", "10",
    "--anomaly-min-exchanges", "10",
    # Well below the shift's 300 ms, well above what a loaded machine adds.
    "--anomaly-latency-min-increase", "150",
]  # fmt: skip


def _load(pod: Pod, target: str, seconds: int, paths: str, out: list[dict[str, Any]]) -> None:
    # Enough connections that 300 ms answers do not slow the rate down.
    out.append(loadgen(pod, target, seconds, RATE, paths, connections=12))


def _brief(alerts: list[dict[str, Any]], shift_us: int) -> list[tuple[Any, ...]]:
    """What a failed assertion shows: edge, kind, figures, interval start after the shift (s)."""
    return [
        (
            a["flowprobe.client.service"],
            a["flowprobe.anomaly.kind"],
            a["flowprobe.anomaly.observed"],
            a["flowprobe.anomaly.baseline"],
            (a["flowprobe.anomaly.interval_start_unix_us"] - shift_us) / 1e6,
        )
        for a in alerts
    ]


def _agent(node: Node, port: int, pods: Sequence[Pod], flags: Sequence[str]) -> Any:
    names = [f"{p.ip}={p.name}" for p in pods]
    return node.spawn_agent(
        [
            "-i", "any", "-f", "inbound and tcp and not net 127.0.0.0/8",
            "--otlp-endpoint", f"http://127.0.0.1:{port}",
            *[a for n in names for a in ("--service-name", n)],
            *flags,
        ]
    )  # fmt: skip


def test_exactly_the_shifted_edge_alerts_within_the_window(tmp_path: Path) -> None:
    out = tmp_path / "exchanges.jsonl"
    receiver = FakeGrpcReceiver()
    try:
        with (
            Node(subnet="10.254.7.0/24") as node,
            Forwarder(
                ("127.0.0.1", receiver.port), ("127.0.0.1", receiver.port), listen_netns=node.netns
            ),
        ):
            shifted, steady, api = (node.add_pod(n) for n in ("shifted", "steady", "api"))
            start_http(api, 8080)
            agent = _agent(node, receiver.port, [shifted, steady, api], [*FLAGS, "-o", str(out)])
            sent: list[dict[str, Any]] = []
            runs = [
                # The steady client for the whole run; the shifted one steady
                # for 8 s (longer than the baselines' warm-up), then shifted.
                # The shifted load starts before the steady one ends, so the
                # rate has no gap (the overlap stays below the rate threshold),
                # and ends with the other client's.
                threading.Thread(target=_load, args=(steady, api.ip, 15, STEADY, sent)),
                threading.Thread(target=_load, args=(shifted, api.ip, 8, STEADY, sent)),
                threading.Thread(target=_load, args=(shifted, api.ip, 8, SHIFTED, sent)),
            ]
            runs[0].start()
            runs[1].start()
            time.sleep(7.0)
            runs[2].start()
            for t in runs:
                t.join()
            assert len(sent) == 3
            # At once: both edges end together, and the interval after their
            # end must not close (an edge going silent is a rate drop).
            stop_agent(agent)
        records = receiver.received.log_records()
    finally:
        receiver.stop()

    # The shift, on capture time: the first slow request.
    shift_us = min(
        r["start_time_unix_us"]
        for r in map(json.loads, out.read_text().splitlines())
        if r.get("url.path", "").startswith("/delay/")
    )
    alerts = [a for name, a in records if name == "flowprobe.anomaly"]
    seen = _brief(alerts, shift_us)
    assert {a["flowprobe.client.service"] for a in alerts} == {"shifted"}, seen
    kinds = [a["flowprobe.anomaly.kind"] for a in alerts]
    assert sorted(kinds) == ["error_ratio", "latency"], seen
    for a in alerts:
        assert a["flowprobe.server.service"] == "api" and a["flowprobe.protocol"] == "http"
        # The interval holding the shift or one of the next two.
        start = a["flowprobe.anomaly.interval_start_unix_us"]
        assert shift_us - INTERVAL_S * 1_000_000 <= start <= shift_us + 2 * INTERVAL_S * 1_000_000
        assert a["flowprobe.anomaly.count"] == 1
    ratio = next(a for a in alerts if a["flowprobe.anomaly.kind"] == "error_ratio")
    assert ratio["flowprobe.anomaly.baseline"] < 0.2 <= ratio["flowprobe.anomaly.observed"]
    latency = next(a for a in alerts if a["flowprobe.anomaly.kind"] == "latency")
    assert latency["flowprobe.anomaly.observed"] >= 0.25 > latency["flowprobe.anomaly.baseline"]
    # Each storm, still on when the agent stopped, reported once more with its count.
    ended = [a for name, a in records if name == "flowprobe.anomaly.resolved"]
    assert {(a["flowprobe.client.service"], a["flowprobe.anomaly.kind"]) for a in ended} == {
        ("shifted", "error_ratio"),
        ("shifted", "latency"),
    }
    assert all(a["flowprobe.anomaly.count"] >= 1 for a in ended)

    # The alerts are span events on exchanges of the shifted edge.
    events = [
        attrs(e.attributes)
        for _, span in receiver.received.spans()
        for e in span.events
        if e.name == "flowprobe.anomaly"
    ]
    assert events and {e["flowprobe.client.service"] for e in events} == {"shifted"}
    assert "flowprobe.top.requests" in receiver.received.metric_names()
