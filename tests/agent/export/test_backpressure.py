"""Backend down or slow: capture never blocks, memory stays bounded, drops are counted and
reported, and export resumes by itself when the backend is back."""

from __future__ import annotations

import logging
import time
import tracemalloc
from collections.abc import Callable

import pytest

from flowprobe.agent.config import ExportConfig, OtlpConfig
from flowprobe.agent.export import otlp
from flowprobe.agent.export.telemetry import Telemetry
from flowprobe.agent.sessionize.stats import Stats
from tests.agent.export.fakes import (
    FakeGrpcReceiver,
    FakeHttpReceiver,
    closed_port,
    edge_exchanges,
    exchange,
)
from tests.operator.clusterkit import wait_until

PROTOCOLS = ["grpc", "http/protobuf"]


def telemetry(endpoint: str, protocol: str, live: bool = False, **cfg: object) -> Telemetry:
    config = ExportConfig(
        otlp=OtlpConfig(endpoint=endpoint, protocol=protocol, timeout_seconds=0.5),
        queue_size=1_000,
        span_queue_size=2_000,
        batch_size=256,
        schedule_delay_seconds=0.05,
        metric_interval_seconds=0.2,
        **cfg,
    )
    spans, metrics = otlp.exporters(config, {})
    return Telemetry(config, Stats(), spans, metrics, wall_clock_release=live).start()


def wait_for(cond: Callable[[], bool], what: str) -> None:
    wait_until(cond, what, timeout=20, interval=0.02)


def accounted(tel: Telemetry, submitted: int) -> None:
    """Every exchange is processed or dropped; every span is exported or dropped."""
    c = tel.counters
    processed = submitted - sum(c.exchanges_dropped.values())
    assert 2 * processed == c.spans_exported + sum(c.spans_dropped.values())


@pytest.mark.parametrize("protocol", PROTOCOLS)
def test_unreachable_backend_never_blocks_and_memory_stays_bounded(protocol: str) -> None:
    tel = telemetry(f"http://127.0.0.1:{closed_port()}", protocol)
    n = 100_000
    # Capture time advances (1 ms apart), so the linker keeps deciding.
    exs = [exchange(start_us=1_700_000_000_000_000 + i * 1000) for i in range(n)]
    tracemalloc.start()
    try:
        started = time.monotonic()
        for i, ex in enumerate(exs):
            tel.submit(ex)
            if i == 20_000:
                early, _ = tracemalloc.get_traced_memory()
            if i % 1000 == 0:
                for size, cap in tel.queue_sizes().values():
                    assert size <= cap
        elapsed = time.monotonic() - started
        late, _ = tracemalloc.get_traced_memory()
    finally:
        tracemalloc.stop()
    # A hang guard, not a speed claim: exporting 100k exchanges' spans one
    # failing request at a time would take many minutes, so finishing at all
    # shows submit() never waited on the exporter.
    assert elapsed < 60, elapsed
    assert late - early < 8 * 1024 * 1024, (early, late)
    wait_for(lambda: tel.counters.export_failures["traces"] >= 1, "a failed trace export")
    t = time.monotonic()
    tel.close(timeout_s=3)
    assert time.monotonic() - t < 12
    c = tel.counters
    assert c.spans_exported == 0
    assert c.exchanges_dropped["queue_full"] + c.spans_dropped["queue_full"] > 0
    assert c.spans_dropped["export_failed"] > 0
    accounted(tel, n)


@pytest.mark.parametrize("protocol", PROTOCOLS)
def test_export_resumes_when_the_backend_comes_back_and_reports_the_drops(
    protocol: str, caplog: pytest.LogCaptureFixture
) -> None:
    caplog.set_level(logging.WARNING, logger="flowprobe.agent")
    port = closed_port()
    # As in a live capture: with no more traffic, wall time releases held calls.
    tel = telemetry(f"http://127.0.0.1:{port}", protocol, live=True, link_window_seconds=0.2)
    rx: FakeGrpcReceiver | FakeHttpReceiver | None = None
    try:
        for i in range(50):
            tel.submit(exchange(start_us=1_700_000_000_000_000 + i * 1000))
        wait_for(lambda: tel.counters.spans_dropped["export_failed"] >= 100, "100 spans dropped")
        assert "span export failed" in caplog.text
        rx = FakeGrpcReceiver(port) if protocol == "grpc" else FakeHttpReceiver(port)
        dropped = sum(tel.counters.spans_dropped.values())
        for i in range(50):
            tel.submit(exchange(start_us=1_700_000_100_000_000 + i * 1000))
        wait_for(lambda: tel.counters.spans_exported >= 100, "100 spans exported")
        # Metrics are cumulative: the drops made while it was down arrive now.
        wait_for(
            lambda: "flowprobe.agent.spans.dropped" in rx.received.metric_names(),
            "the dropped-spans metric",
        )
        tel.close(timeout_s=10)
    finally:
        if rx is not None:
            rx.stop()
    assert "span export works again" in caplog.text
    assert len(rx.received.spans()) == 100
    assert sum(tel.counters.spans_dropped.values()) == dropped == 100
    accounted(tel, 100)


def test_slow_backend_fills_the_span_queue_not_the_capture() -> None:
    rx = FakeHttpReceiver(delay_s=0.3)
    tel = telemetry(rx.endpoint, "http/protobuf", live=True, metrics=False, link_window_seconds=0.1)
    exs = [exchange(start_us=1_700_000_000_000_000 + i * 100) for i in range(20_000)]
    try:
        started = time.monotonic()
        for ex in exs:
            tel.submit(ex)
        assert time.monotonic() - started < 5
        wait_for(lambda: tel.counters.spans_exported > 0, "a span exported")
        tel.close(timeout_s=2)
    finally:
        rx.stop()
    c = tel.counters
    assert c.spans_dropped["queue_full"] + c.exchanges_dropped["queue_full"] > 0
    assert c.spans_exported > 0
    accounted(tel, 20_000)


@pytest.mark.parametrize("protocol", PROTOCOLS)
def test_metrics_of_many_edges_are_split_under_the_grpc_message_limit(protocol: str) -> None:
    # 3,000 client -> server edges make ~6 MB of cumulative metrics: more
    # than the 4 MiB a gRPC server (the collector's OTLP receiver too)
    # accepts in one message.
    rx = FakeGrpcReceiver() if protocol == "grpc" else FakeHttpReceiver()
    try:
        config = ExportConfig(otlp=OtlpConfig(endpoint=rx.endpoint, protocol=protocol))
        spans, metrics = otlp.exporters(config, {})
        tel = Telemetry(config, Stats(), spans, metrics, wall_clock_release=False).start()
        for ex in edge_exchanges(3_000):
            tel.submit(ex)
        tel.close()
        assert not tel.counters.export_failures
        assert len(rx.received.metrics) > 1
    finally:
        rx.stop()
