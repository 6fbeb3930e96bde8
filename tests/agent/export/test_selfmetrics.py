"""The agent's own metrics on a Prometheus /metrics endpoint, and the command line's export."""

from __future__ import annotations

import json
import urllib.request

import pytest

from flowprobe.agent.config import ExportConfig
from flowprobe.agent.export.selfmetrics import DEFINITIONS, ExportCounters, SelfMetrics
from flowprobe.agent.export.telemetry import Telemetry
from flowprobe.agent.sessionize.stats import Stats
from tests.agent.export.fakes import FakeHttpReceiver, closed_port, exchange
from tests.agent.helpers import DATA, agent


def scrape(url: str) -> str:
    opener = urllib.request.build_opener(urllib.request.ProxyHandler({}))
    with opener.open(url, timeout=10) as resp:
        assert resp.status == 200
        return str(resp.read().decode())


def test_metrics_endpoint_serves_the_counters_in_prometheus_format() -> None:
    stats = Stats(packets=42, exchanges=5, connections=2)
    stats.anomalies["parse_error.http"] = 3
    stats.anomalies["response_without_request.redis"] = 1
    counters = ExportCounters()
    counters.spans_dropped["export_failed"] = 7
    counters.exchanges_dropped["queue_full"] = 2
    counters.export_failures["traces"] = 1
    stats.capture_dropped = 9
    sm = SelfMetrics(
        stats, counters, lambda: [("flowprobe.agent.queue.size", {"queue": "spans"}, 11)]
    )
    port = sm.serve(0, "127.0.0.1")
    try:
        text = scrape(f"http://127.0.0.1:{port}/metrics")
    finally:
        sm.stop()
    lines = set(text.splitlines())
    for expected in (
        "flowprobe_agent_packets_total 42.0",
        "flowprobe_agent_capture_dropped_total 9.0",
        'flowprobe_agent_parse_errors_total{protocol="http"} 3.0',
        'flowprobe_agent_anomalies_total{kind="response_without_request.redis"} 1.0',
        'flowprobe_agent_spans_dropped_total{reason="export_failed"} 7.0',
        'flowprobe_agent_exchanges_dropped_total{reason="queue_full"} 2.0',
        'flowprobe_agent_export_failures_total{signal="traces"} 1.0',
        'flowprobe_agent_queue_size{queue="spans"} 11.0',
        "# TYPE flowprobe_agent_packets_total counter",
    ):
        assert expected in lines, expected
    assert "process_resident_memory_bytes" in text
    # Every definition has its HELP line, even with no samples yet.
    for d in DEFINITIONS:
        assert f"# HELP {d.prometheus_name}" in text


def test_telemetry_serves_metrics_while_the_backend_is_down() -> None:
    cfg = ExportConfig(metrics_port=0, metrics_address="127.0.0.1")
    from flowprobe.agent.config import OtlpConfig
    from flowprobe.agent.export import otlp

    cfg = cfg.model_copy(
        update={
            "otlp": OtlpConfig(endpoint=f"http://127.0.0.1:{closed_port()}", timeout_seconds=0.5)
        }
    )
    spans, metrics = otlp.exporters(cfg, {})
    tel = Telemetry(cfg, Stats(), spans, metrics, wall_clock_release=True).start()
    try:
        tel.submit(exchange())
        assert tel.metrics_url is not None
        text = scrape(tel.metrics_url)
        assert 'flowprobe_agent_queue_capacity{queue="exchanges"} 8192.0' in text
    finally:
        tel.close(timeout_s=3)


@pytest.mark.capture
def test_read_exports_over_otlp_and_keeps_stdout_free() -> None:
    rx = FakeHttpReceiver()
    try:
        pcap = str(DATA / "http" / "keepalive.pcapng")
        r = agent(
            "read", pcap, "--otlp-endpoint", rx.endpoint, "--otlp-protocol", "http/protobuf",
            "--service-name", "10.251.0.2:8080=api", "--otlp-header", "x-team=probe",
        )  # fmt: skip
        assert r.returncode == 0, r.stderr
        assert r.stdout == ""
        spans = rx.received.spans()
        assert len(spans) == 20
        servers = [(res, s) for res, s in spans if s.kind == s.SPAN_KIND_SERVER]
        assert {res["service.name"] for res, _ in servers} == {"api"}
        assert {s.name for _, s in servers} == {"GET /items/{id}"}
        assert all(h.get("x-team") == "probe" for h in rx.received.headers)
        assert "http.server.request.duration" in rx.received.metric_names()
        # --output - keeps the JSON Lines on stdout as well.
        r = agent("read", pcap, "--otlp-endpoint", rx.endpoint, "--otlp-protocol",
                  "http/protobuf", "--output", "-")  # fmt: skip
        assert r.returncode == 0, r.stderr
        assert len([json.loads(ln) for ln in r.stdout.splitlines()]) == 10
    finally:
        rx.stop()


def test_bad_otlp_settings_are_a_one_line_error() -> None:
    r = agent("read", "/nonexistent.pcap", "--otlp-endpoint", "collector:4318",
              "--otlp-protocol", "http/protobuf")  # fmt: skip
    assert r.returncode == 2
    assert r.stderr.count("\n") == 1 and "http://" in r.stderr
