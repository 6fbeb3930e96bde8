"""A span and a counter sent over OTLP gRPC come out of Jaeger and Prometheus, and
the agent's metrics of many edges get through the collector."""

from __future__ import annotations

import json
import uuid
from datetime import UTC, datetime, timedelta
from typing import Any

import pytest
from opentelemetry.exporter.otlp.proto.grpc.metric_exporter import OTLPMetricExporter
from opentelemetry.exporter.otlp.proto.grpc.trace_exporter import OTLPSpanExporter
from opentelemetry.sdk.metrics import MeterProvider
from opentelemetry.sdk.metrics.export import PeriodicExportingMetricReader
from opentelemetry.sdk.resources import Resource
from opentelemetry.sdk.trace import TracerProvider
from opentelemetry.sdk.trace.export import BatchSpanProcessor
from opentelemetry.trace import SpanKind
from tests.agent.export.fakes import edge_exchanges
from tests.backends.conftest import poll

from flowprobe.agent.config import ExportConfig, OtlpConfig
from flowprobe.agent.export import otlp
from flowprobe.agent.export.telemetry import Telemetry
from flowprobe.agent.sessionize.stats import Stats
from flowprobe.devenv.backends import LocalBackends, attributes_of, spans_of

pytestmark = pytest.mark.backends


@pytest.fixture
def service_name() -> str:
    # Unique per test: Jaeger and Prometheus live for the whole session.
    return f"flowprobe-test-{uuid.uuid4().hex[:8]}"


@pytest.fixture
def resource(service_name: str) -> Resource:
    return Resource.create(
        {
            "service.name": service_name,
            "k8s.namespace.name": "shop",
            "k8s.pod.name": "cart-7d9f-abcde",
        }
    )


def test_span_reaches_jaeger(
    local_backends: LocalBackends, service_name: str, resource: Resource
) -> None:
    start = datetime.now(UTC) - timedelta(minutes=1)
    provider = TracerProvider(resource=resource)
    provider.add_span_processor(
        BatchSpanProcessor(OTLPSpanExporter(endpoint=local_backends.otlp_grpc, insecure=True))
    )
    tracer = provider.get_tracer("flowprobe.tests")
    with tracer.start_as_current_span(
        "GET /items/{id}",
        kind=SpanKind.SERVER,
        attributes={
            "http.request.method": "GET",
            "http.route": "/items/{id}",
            "http.response.status_code": 200,
        },
    ) as span:
        trace_id = f"{span.get_span_context().trace_id:032x}"
    assert provider.force_flush(10_000)
    provider.shutdown()

    def find() -> list[dict[str, Any]]:
        end = datetime.now(UTC) + timedelta(minutes=1)
        spans = spans_of(local_backends.jaeger_traces(service_name, start, end))
        return [s for s in spans if s["traceId"] == trace_id]

    found = poll(find, timeout=30.0)
    assert len(found) == 1, (
        f"trace {trace_id} not in Jaeger; services: {local_backends.jaeger_services()}"
    )
    got = found[0]
    assert got["name"] == "GET /items/{id}"
    assert got["kind"] in (2, "SPAN_KIND_SERVER")  # OTLP JSON allows either
    assert attributes_of(got["attributes"])["http.route"] == "/items/{id}"
    assert got["resource"]["k8s.pod.name"] == "cart-7d9f-abcde"
    assert service_name in local_backends.jaeger_services()

    # The test-only file exporter saw the same span.
    def in_file() -> bool:
        records = local_backends.otlp_file_records()
        return any(trace_id in json.dumps(r) for r in records if "resourceSpans" in r)

    assert poll(in_file, timeout=10.0)


def test_counter_reaches_prometheus(
    local_backends: LocalBackends, service_name: str, resource: Resource
) -> None:
    reader = PeriodicExportingMetricReader(
        OTLPMetricExporter(endpoint=local_backends.otlp_grpc, insecure=True),
        # Export only on force_flush, so the test controls the timing.
        export_interval_millis=3_600_000,
    )
    provider = MeterProvider(resource=resource, metric_readers=[reader])
    counter = provider.get_meter("flowprobe.tests").create_counter(
        "flowprobe.test.requests", unit="{request}", description="test requests"
    )
    counter.add(3, {"http.request.method": "GET"})
    counter.add(1, {"http.request.method": "POST"})
    assert provider.force_flush(10_000)
    provider.shutdown()

    # The exporter turns service.name into `job` (kept by honor_labels), dots
    # into underscores, drops the {annotation} unit and appends _total.
    query = f'flowprobe_test_requests_total{{job="{service_name}"}}'
    result = poll(lambda: local_backends.prom_query(query), timeout=30.0)
    by_method = {r["metric"]["http_request_method"]: float(r["value"][1]) for r in result}
    assert by_method == {"GET": 3.0, "POST": 1.0}, result
    # resource_constant_labels in otel/collector.yaml copies k8s.* onto series.
    assert {r["metric"].get("k8s_pod_name") for r in result} == {"cart-7d9f-abcde"}


def test_the_collector_takes_the_metrics_of_many_edges(local_backends: LocalBackends) -> None:
    """3,000 client -> server edges make ~6 MB of cumulative metrics, more than
    the 4 MiB the collector's OTLP/gRPC receiver takes in one message: the
    agent's exporter splits them (otlp.METRIC_POINTS_PER_REQUEST), and every
    exchange is counted in Prometheus."""
    agent = f"flowprobe-agent-{uuid.uuid4().hex[:8]}"
    config = ExportConfig(
        otlp=OtlpConfig(endpoint=local_backends.otlp_grpc, insecure=True),
        agent_service_name=agent,
    )
    spans, metrics = otlp.exporters(config, {})
    tel = Telemetry(config, Stats(), spans, metrics, wall_clock_release=False).start()
    edges = 3_000
    for ex in edge_exchanges(edges):
        tel.submit(ex)
    tel.close()
    assert not tel.counters.export_failures
    # Every exchange is counted: on its edge's series, or beyond max_series
    # (2,000) on the overflow series.
    query = f'sum(flowprobe_edge_exchanges_total{{job="{agent}"}})'

    def counted() -> float:
        result = local_backends.prom_query(query)
        return float(result[0]["value"][1]) if result else 0.0

    assert poll(counted, lambda n: n >= edges, timeout=60.0) == edges
    overflow = local_backends.prom_query(
        f'flowprobe_edge_exchanges_total{{job="{agent}", otel_metric_overflow="true"}}'
    )
    assert [float(r["value"][1]) for r in overflow] == [edges - 2_000]
