"""Test doubles: OTLP receivers (HTTP and gRPC) on loopback, a span sink decoding what the
agent encodes, and exchange records."""

from __future__ import annotations

import datetime
import gzip
import ipaddress
import socket
import ssl
import threading
import time
import zlib
from collections.abc import Callable
from concurrent import futures
from dataclasses import dataclass, field
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path
from typing import Any

import grpc
from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.x509.oid import NameOID
from opentelemetry.proto.collector.logs.v1 import logs_service_pb2, logs_service_pb2_grpc
from opentelemetry.proto.collector.metrics.v1 import (
    metrics_service_pb2,
    metrics_service_pb2_grpc,
)
from opentelemetry.proto.collector.trace.v1 import trace_service_pb2, trace_service_pb2_grpc
from opentelemetry.proto.common.v1.common_pb2 import KeyValue
from opentelemetry.proto.trace.v1.trace_pb2 import Span
from opentelemetry.sdk.metrics.export import (
    Metric,
    MetricExporter,
    MetricExportResult,
    MetricsData,
)
from opentelemetry.sdk.resources import Resource
from opentelemetry.sdk.trace import Event, ReadableSpan
from opentelemetry.sdk.util.instrumentation import InstrumentationScope
from opentelemetry.trace import SpanContext, SpanKind, Status, StatusCode

from flowprobe.agent.config import ExportConfig
from flowprobe.agent.export.telemetry import Telemetry
from flowprobe.agent.export.workloads import WorkloadResolver
from flowprobe.agent.parse.messages import AttrValue
from flowprobe.agent.sessionize.records import Endpoints, Exchange, Outcome, TcpFigures
from flowprobe.agent.sessionize.stats import Stats


def closed_port() -> int:
    """A loopback port nothing listens on (connections are refused)."""
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


@dataclass
class Received:
    """What a fake receiver got: decoded requests and the headers they came with."""

    traces: list[trace_service_pb2.ExportTraceServiceRequest] = field(default_factory=list)
    metrics: list[metrics_service_pb2.ExportMetricsServiceRequest] = field(default_factory=list)
    logs: list[logs_service_pb2.ExportLogsServiceRequest] = field(default_factory=list)
    headers: list[dict[str, str]] = field(default_factory=list)
    lock: threading.Lock = field(default_factory=threading.Lock)

    def spans(self) -> list[tuple[dict[str, Any], Span]]:
        """(resource attributes, span) for every span received."""
        out: list[tuple[dict[str, Any], Span]] = []
        with self.lock:
            for req in self.traces:
                for rs in req.resource_spans:
                    res = attrs(rs.resource.attributes)
                    for ss in rs.scope_spans:
                        out.extend((res, s) for s in ss.spans)
        return out

    def log_records(self) -> list[tuple[str, dict[str, Any]]]:
        """(event name, attributes) of every log record received."""
        with self.lock:
            return [
                (lr.event_name, attrs(lr.attributes))
                for req in self.logs for rl in req.resource_logs for sl in rl.scope_logs
                for lr in sl.log_records
            ]  # fmt: skip

    def metric_names(self) -> set[str]:
        with self.lock:
            return {
                m.name
                for req in self.metrics
                for rm in req.resource_metrics
                for sm in rm.scope_metrics
                for m in sm.metrics
            }


def attrs(kvs: Any) -> dict[str, Any]:
    out: dict[str, Any] = {}
    for kv in kvs:
        assert isinstance(kv, KeyValue)
        v = kv.value
        kind = v.WhichOneof("value")
        if kind == "array_value":
            out[kv.key] = [getattr(x, x.WhichOneof("value")) for x in v.array_value.values]
        else:
            out[kv.key] = getattr(v, kind) if kind else None
    return out


class FakeHttpReceiver:
    """OTLP/HTTP (protobuf) on 127.0.0.1: /v1/traces and /v1/metrics."""

    def __init__(
        self,
        port: int = 0,
        delay_s: float = 0.0,
        refuse: tuple[int, ...] = (),
        tls: ssl.SSLContext | None = None,
    ) -> None:
        """``refuse``: HTTP statuses answered to the first requests, one each, before any is read;
        ``tls``: serve HTTPS with this server context."""
        self.received = Received()
        received = self.received
        refusals = list(refuse)

        class Handler(BaseHTTPRequestHandler):
            def do_POST(self) -> None:
                time.sleep(delay_s)  # a slow backend
                body = self.rfile.read(int(self.headers.get("Content-Length", "0")))
                with received.lock:
                    status = refusals.pop(0) if refusals else None
                if status is not None:
                    self.send_response(status)
                    self.send_header("Content-Length", "0")
                    self.end_headers()
                    return
                enc = self.headers.get("Content-Encoding", "")
                if enc == "gzip":
                    body = gzip.decompress(body)
                elif enc == "deflate":
                    body = zlib.decompress(body)
                with received.lock:
                    received.headers.append({k.lower(): v for k, v in self.headers.items()})
                    if self.path == "/v1/traces":
                        req = trace_service_pb2.ExportTraceServiceRequest()
                        req.ParseFromString(body)
                        received.traces.append(req)
                        resp = trace_service_pb2.ExportTraceServiceResponse()
                    else:
                        mreq = metrics_service_pb2.ExportMetricsServiceRequest()
                        mreq.ParseFromString(body)
                        received.metrics.append(mreq)
                        resp = metrics_service_pb2.ExportMetricsServiceResponse()
                out = resp.SerializeToString()
                self.send_response(200)
                self.send_header("Content-Type", "application/x-protobuf")
                self.send_header("Content-Length", str(len(out)))
                self.end_headers()
                self.wfile.write(out)

            def log_message(self, *args: object) -> None:
                pass

        self.server = ThreadingHTTPServer(("127.0.0.1", port), Handler)
        if tls is not None:
            self.server.socket = tls.wrap_socket(self.server.socket, server_side=True)
        self.scheme = "https" if tls is not None else "http"
        self.port = int(self.server.server_address[1])
        self._thread = threading.Thread(target=self.server.serve_forever, daemon=True)
        self._thread.start()

    @property
    def endpoint(self) -> str:
        return f"{self.scheme}://127.0.0.1:{self.port}"

    def stop(self) -> None:
        self.server.shutdown()
        self.server.server_close()


def _collecting(
    base: type[Any], response: Callable[[], Any], sink: list[Any], lock: threading.Lock
) -> Any:
    """A servicer whose Export appends each request to ``sink``."""

    class Collecting(base):  # type: ignore[misc]
        def Export(self, request: Any, context: grpc.ServicerContext) -> Any:
            with lock:
                sink.append(request)
            return response()

    return Collecting()


class FakeGrpcReceiver:
    """OTLP/gRPC on 127.0.0.1, plaintext or TLS (``credentials``)."""

    def __init__(self, port: int = 0, credentials: grpc.ServerCredentials | None = None) -> None:
        self.received = Received()
        received = self.received

        class Traces(trace_service_pb2_grpc.TraceServiceServicer):
            def Export(
                self, request: Any, context: grpc.ServicerContext
            ) -> trace_service_pb2.ExportTraceServiceResponse:
                with received.lock:
                    received.traces.append(request)
                    received.headers.append(dict(context.invocation_metadata()))  # type: ignore[arg-type]
                return trace_service_pb2.ExportTraceServiceResponse()

        metrics = _collecting(
            metrics_service_pb2_grpc.MetricsServiceServicer,
            metrics_service_pb2.ExportMetricsServiceResponse,
            received.metrics,
            received.lock,
        )
        logs = _collecting(
            logs_service_pb2_grpc.LogsServiceServicer,
            logs_service_pb2.ExportLogsServiceResponse,
            received.logs,
            received.lock,
        )
        self.server = grpc.server(futures.ThreadPoolExecutor(max_workers=4))
        trace_service_pb2_grpc.add_TraceServiceServicer_to_server(Traces(), self.server)  # type: ignore[no-untyped-call]
        metrics_service_pb2_grpc.add_MetricsServiceServicer_to_server(metrics, self.server)  # type: ignore[no-untyped-call]
        logs_service_pb2_grpc.add_LogsServiceServicer_to_server(logs, self.server)  # type: ignore[no-untyped-call]
        address = f"127.0.0.1:{port}"
        if credentials is None:
            self.port = self.server.add_insecure_port(address)
        else:
            self.port = self.server.add_secure_port(address, credentials)
        self.server.start()

    @property
    def endpoint(self) -> str:
        return f"http://127.0.0.1:{self.port}"

    def stop(self) -> None:
        self.server.stop(0).wait()


def exchange(
    protocol: str = "http",
    client: tuple[str, int] = ("10.0.0.1", 40000),
    server: tuple[str, int] = ("10.0.0.2", 8080),
    start_us: int = 1_700_000_000_000_000,
    end_us: int | None = None,
    attrs: dict[str, AttrValue] | None = None,
    outcome: Outcome = Outcome.OK,
    error_type: str | None = None,
    events: list[tuple[int, str]] | None = None,
    figures: TcpFigures | None = None,
    transport: str = "tcp",
) -> Exchange:
    if attrs is None and protocol == "http":
        attrs = {
            "http.request.method": "GET",
            "url.path": "/items/42",
            "network.protocol.version": "1.1",
            "http.response.status_code": 200,
        }
    end = end_us if end_us is not None else start_us + 5_000
    return Exchange(
        protocol=protocol,
        endpoints=Endpoints(transport, client[0], client[1], server[0], server[1]),
        start_us=start_us,
        end_us=end,
        request_end_us=start_us + 100,
        response_start_us=end - 100 if outcome in (Outcome.OK, Outcome.ERROR) else None,
        outcome=outcome,
        attrs=dict(attrs or {}),
        error_type=error_type,
        figures=figures
        or TcpFigures(
            client_packets=1,
            server_packets=2,
            client_bytes=80,
            server_bytes=300,
            retransmits=0,
            rtt_samples=2,
            rtt_sum_us=200,
            rtt_max_us=150,
        ),
        handshake_server_us=40,
        handshake_client_us=30,
        events=list(events or []),
    )


_KINDS = {Span.SPAN_KIND_CLIENT: SpanKind.CLIENT, Span.SPAN_KIND_SERVER: SpanKind.SERVER}


def sdk_spans(request: trace_service_pb2.ExportTraceServiceRequest) -> list[ReadableSpan]:
    """The spans of a decoded request as the SDK's span objects, field by field.

    Tests read the agent's spans through these, so what they check is what
    went on the wire; ``test_protobuf`` encodes them again with the SDK's own
    encoder and compares.
    """
    out: list[ReadableSpan] = []
    for rs in request.resource_spans:
        resource = Resource(attrs(rs.resource.attributes), rs.schema_url)
        for ss in rs.scope_spans:
            scope = InstrumentationScope(ss.scope.name, ss.scope.version, ss.schema_url or None)
            for s in ss.spans:
                trace_id = int.from_bytes(s.trace_id, "big")
                parent = (
                    SpanContext(trace_id, int.from_bytes(s.parent_span_id, "big"), False)
                    if s.parent_span_id
                    else None
                )
                status = (
                    Status(StatusCode(s.status.code), s.status.message or None)
                    if s.status.code
                    else Status(StatusCode.UNSET)
                )
                out.append(
                    ReadableSpan(
                        name=s.name,
                        context=SpanContext(trace_id, int.from_bytes(s.span_id, "big"), False),
                        parent=parent,
                        resource=resource,
                        attributes=attrs(s.attributes),
                        events=[
                            Event(e.name, attrs(e.attributes), e.time_unix_nano) for e in s.events
                        ],
                        kind=_KINDS[s.kind],
                        status=status,
                        start_time=s.start_time_unix_nano,
                        end_time=s.end_time_unix_nano,
                        instrumentation_scope=scope,
                    )
                )
    return out


class MemorySpanSink:
    """Keeps every encoded trace request it is given, and reads them back."""

    def __init__(self) -> None:
        self.requests: list[bytes] = []

    def export(self, request: bytes) -> bool:
        self.requests.append(request)
        return True

    def shutdown(self) -> None:
        pass

    def decoded(self) -> list[trace_service_pb2.ExportTraceServiceRequest]:
        out = []
        for raw in self.requests:
            req = trace_service_pb2.ExportTraceServiceRequest()
            req.ParseFromString(raw)
            out.append(req)
        return out

    def get_finished_spans(self) -> list[ReadableSpan]:
        return [span for req in self.decoded() for span in sdk_spans(req)]


class MemoryMetricExporter(MetricExporter):
    """Keeps every MetricsData it is given (cumulative, so the last one has the totals)."""

    def __init__(self) -> None:
        super().__init__()
        self.exports: list[MetricsData] = []

    def export(
        self, metrics_data: MetricsData, timeout_millis: float = 10_000, **kwargs: Any
    ) -> MetricExportResult:
        self.exports.append(metrics_data)
        return MetricExportResult.SUCCESS

    def force_flush(self, timeout_millis: float = 10_000) -> bool:
        return True

    def shutdown(self, timeout_millis: float = 30_000, **kwargs: Any) -> None:
        pass

    def points(self, name: str) -> list[tuple[dict[str, Any], dict[str, Any], Any]]:
        """(resource attributes, point attributes, point) of ``name`` in the last export."""
        out: list[tuple[dict[str, Any], dict[str, Any], Any]] = []
        for rm in self.exports[-1].resource_metrics:
            for sm in rm.scope_metrics:
                for m in sm.metrics:
                    if m.name == name:
                        out.extend(
                            (dict(rm.resource.attributes), dict(p.attributes or {}), p)
                            for p in m.data.data_points
                        )
        return out

    def metric(self, name: str) -> Metric:
        for rm in self.exports[-1].resource_metrics:
            for sm in rm.scope_metrics:
                for m in sm.metrics:
                    if m.name == name:
                        return m
        raise KeyError(name)


def run_telemetry(
    exchanges: list[Exchange],
    config: ExportConfig | None = None,
    resolver: WorkloadResolver | None = None,
    metrics: bool = True,
) -> tuple[list[ReadableSpan], MemoryMetricExporter, Telemetry]:
    """Exchanges through the real export path into in-memory exporters."""
    spans = MemorySpanSink()
    mexp = MemoryMetricExporter()
    tel = Telemetry(
        config or ExportConfig(),
        Stats(),
        spans,
        mexp if metrics else None,
        resolver=resolver,
        salt=b"test",
        wall_clock_release=False,
    ).start()
    for ex in exchanges:
        tel.submit(ex)
    tel.close(timeout_s=10)
    return spans.get_finished_spans(), mexp, tel


def self_signed(
    tmp_path: Path, names: tuple[str, ...] = ("localhost", "127.0.0.1")
) -> tuple[Path, bytes, bytes]:
    key = ec.generate_private_key(ec.SECP256R1())
    name = x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, names[0])])
    now = datetime.datetime.now(datetime.UTC)
    cert = (
        x509.CertificateBuilder()
        .subject_name(name)
        .issuer_name(name)
        .public_key(key.public_key())
        .serial_number(x509.random_serial_number())
        .not_valid_before(now - datetime.timedelta(minutes=5))
        .not_valid_after(now + datetime.timedelta(days=1))
        .add_extension(
            x509.SubjectAlternativeName([_san(n) for n in names]),
            critical=False,
        )
        .add_extension(x509.BasicConstraints(ca=True, path_length=None), critical=True)
        .sign(key, hashes.SHA256())
    )
    cert_pem = cert.public_bytes(serialization.Encoding.PEM)
    key_pem = key.private_bytes(
        serialization.Encoding.PEM,
        serialization.PrivateFormat.PKCS8,
        serialization.NoEncryption(),
    )
    """A self-signed certificate valid for ``names`` (DNS names or IPs): its
    path (the CA file to trust), the PEM and the key's PEM."""
    ca = tmp_path / "ca.pem"
    ca.write_bytes(cert_pem)
    return ca, cert_pem, key_pem


def _san(name: str) -> x509.GeneralName:
    try:
        return x509.IPAddress(ipaddress.ip_address(name))
    except ValueError:
        return x509.DNSName(name)


def edge_exchanges(edges: int) -> list[Exchange]:
    """One exchange per client -> server edge, each between its own pair of
    addresses: ``edges`` workload pairs for the metrics (3,000 come to ~6 MB of
    cumulative metrics, more than one gRPC message may carry)."""
    return [
        exchange(
            client=(f"10.1.{i // 250}.{i % 250}", 40000),
            server=(f"10.2.{i // 250}.{i % 250}", 8080),
            start_us=1_700_000_000_000_000 + i * 1000,
        )
        for i in range(edges)
    ]
