"""OTLP settings from configuration and OTEL_EXPORTER_OTLP_*, and what really goes on the wire."""

from __future__ import annotations

import ssl
from pathlib import Path

import grpc
import pytest
from opentelemetry.exporter.otlp.proto.http.metric_exporter import (
    OTLPMetricExporter as HttpMetricExporter,
)

from flowprobe.agent.config import ExportConfig, OtlpConfig
from flowprobe.agent.export import otlp
from flowprobe.agent.export.otlp import OtlpConfigError, resolve
from flowprobe.agent.export.telemetry import Telemetry
from flowprobe.agent.export.transport import GrpcSpanSender, HttpSpanSender
from flowprobe.agent.sessionize.stats import Stats
from tests.agent.export.fakes import FakeGrpcReceiver, FakeHttpReceiver, exchange, self_signed


def test_off_without_an_endpoint() -> None:
    assert resolve(OtlpConfig(), "traces", {}) is None
    assert otlp.exporters(ExportConfig(), {}) == (None, None)


def test_generic_variables_and_http_paths() -> None:
    env = {
        "OTEL_EXPORTER_OTLP_ENDPOINT": "http://collector:4318/",
        "OTEL_EXPORTER_OTLP_PROTOCOL": "http/protobuf",
        "OTEL_EXPORTER_OTLP_HEADERS": "Authorization=Bearer%20abc,x-tenant=7",
        "OTEL_EXPORTER_OTLP_COMPRESSION": "gzip",
        "OTEL_EXPORTER_OTLP_TIMEOUT": "2500",  # milliseconds, per the spec
    }
    t = resolve(OtlpConfig(), "traces", env)
    m = resolve(OtlpConfig(), "metrics", env)
    assert t is not None and m is not None
    assert t.endpoint == "http://collector:4318/v1/traces"
    assert m.endpoint == "http://collector:4318/v1/metrics"
    assert t.headers == {"authorization": "Bearer abc", "x-tenant": "7"}
    assert (t.compression, t.timeout_s, t.protocol) == ("gzip", 2.5, "http/protobuf")
    # The log line names headers, never their values.
    assert "abc" not in t.describe() and "authorization" in t.describe()


def test_signal_specific_variables_win_over_generic_and_are_full_urls() -> None:
    env = {
        "OTEL_EXPORTER_OTLP_ENDPOINT": "http://generic:4318",
        "OTEL_EXPORTER_OTLP_PROTOCOL": "http/protobuf",
        "OTEL_EXPORTER_OTLP_TRACES_ENDPOINT": "https://traces.example:443/custom/path",
        "OTEL_EXPORTER_OTLP_TRACES_COMPRESSION": "deflate",
        "OTEL_EXPORTER_OTLP_COMPRESSION": "gzip",
    }
    t = resolve(OtlpConfig(), "traces", env)
    m = resolve(OtlpConfig(), "metrics", env)
    assert t is not None and m is not None
    assert t.endpoint == "https://traces.example:443/custom/path"
    assert t.compression == "deflate" and m.compression == "gzip"
    assert m.endpoint == "http://generic:4318/v1/metrics"


def test_configuration_wins_over_variables() -> None:
    env = {
        "OTEL_EXPORTER_OTLP_ENDPOINT": "http://from-env:4318",
        "OTEL_EXPORTER_OTLP_PROTOCOL": "http/protobuf",
        "OTEL_EXPORTER_OTLP_HEADERS": "a=env,b=env",
    }
    cfg = OtlpConfig(endpoint="http://from-flag:4317", protocol="grpc", headers={"A": "flag"})
    t = resolve(cfg, "traces", env)
    assert t is not None
    assert (t.endpoint, t.protocol) == ("http://from-flag:4317", "grpc")
    assert t.headers == {"a": "flag", "b": "env"}
    assert t.insecure  # http:// on gRPC means plaintext


def test_grpc_tls_inference_and_insecure_variable() -> None:
    def insecure(endpoint: str, **env: str) -> bool:
        s = resolve(OtlpConfig(), "traces", {"OTEL_EXPORTER_OTLP_ENDPOINT": endpoint, **env})
        assert s is not None
        return s.insecure

    assert insecure("http://c:4317")
    assert not insecure("https://c:4317")
    assert not insecure("c:4317")
    assert insecure("c:4317", OTEL_EXPORTER_OTLP_INSECURE="true")
    assert not insecure("https://c:4317", OTEL_EXPORTER_OTLP_INSECURE="true")


def test_signals_can_be_turned_off_and_bad_values_are_errors(tmp_path: Path) -> None:
    env = {"OTEL_EXPORTER_OTLP_ENDPOINT": "http://c:4317", "OTEL_TRACES_EXPORTER": "none"}
    assert resolve(OtlpConfig(), "traces", env) is None
    assert resolve(OtlpConfig(), "metrics", env) is not None
    base = {"OTEL_EXPORTER_OTLP_ENDPOINT": "http://c:4317"}
    for extra in (
        {"OTEL_EXPORTER_OTLP_PROTOCOL": "http/json"},
        {"OTEL_EXPORTER_OTLP_COMPRESSION": "zstd"},
        {"OTEL_EXPORTER_OTLP_TIMEOUT": "soon"},
        {"OTEL_EXPORTER_OTLP_HEADERS": "novalue"},
        {"OTEL_EXPORTER_OTLP_CERTIFICATE": str(tmp_path / "missing.pem")},
        {"OTEL_EXPORTER_OTLP_CLIENT_KEY": str(tmp_path)},
    ):
        with pytest.raises(OtlpConfigError):
            resolve(OtlpConfig(), "traces", {**base, **extra})
    with pytest.raises(OtlpConfigError):
        resolve(OtlpConfig(endpoint="collector:4318", protocol="http/protobuf"), "traces", {})


def test_metric_interval_from_configuration_then_the_sdk_variable() -> None:
    env = {"OTEL_METRIC_EXPORT_INTERVAL": "5000"}
    assert otlp.metric_interval(ExportConfig(), {}) == 15.0
    assert otlp.metric_interval(ExportConfig(), env) == 5.0
    assert otlp.metric_interval(ExportConfig(metric_interval_seconds=30), env) == 30.0
    for bad in ("soon", "0", "-5"):
        with pytest.raises(OtlpConfigError):
            otlp.metric_interval(ExportConfig(), {"OTEL_METRIC_EXPORT_INTERVAL": bad})


def test_exporter_classes_follow_the_protocol() -> None:
    spans, metrics = otlp.exporters(
        ExportConfig(otlp=OtlpConfig(endpoint="http://127.0.0.1:4317")), {}
    )
    assert isinstance(spans, GrpcSpanSender)
    spans.shutdown()
    spans, metrics = otlp.exporters(
        ExportConfig(otlp=OtlpConfig(endpoint="http://127.0.0.1:4318", protocol="http/protobuf")),
        {"OTEL_METRICS_EXPORTER": "none"},
    )
    assert metrics is None
    assert isinstance(spans, HttpSpanSender)
    _, metrics = otlp.exporters(
        ExportConfig(otlp=OtlpConfig(endpoint="http://127.0.0.1:4318", protocol="http/protobuf")),
        {},
    )
    assert isinstance(metrics, HttpMetricExporter)
    for s in (spans, metrics):
        assert s is not None
        s.shutdown()


def _send(config: ExportConfig) -> Telemetry:
    spans, metrics = otlp.exporters(config, {})
    tel = Telemetry(config, Stats(), spans, metrics, salt=b"s", wall_clock_release=False).start()
    tel.submit(exchange())
    tel.close(timeout_s=20)
    return tel


@pytest.mark.parametrize("compression", ["gzip", "none"])
def test_http_protobuf_with_headers_and_compression(compression: str) -> None:
    rx = FakeHttpReceiver()
    try:
        cfg = ExportConfig(
            otlp=OtlpConfig(
                endpoint=rx.endpoint,
                protocol="http/protobuf",
                headers={"Authorization": "Bearer t0ken"},
                compression=compression,
            )
        )
        tel = _send(cfg)
    finally:
        rx.stop()
    assert tel.counters.spans_exported == 2
    spans = rx.received.spans()
    assert {res["service.name"] for res, _ in spans} == {"10.0.0.1", "10.0.0.2:8080"}
    assert all(h["authorization"] == "Bearer t0ken" for h in rx.received.headers)
    encodings = {h.get("content-encoding") for h in rx.received.headers}
    assert encodings == ({"gzip"} if compression == "gzip" else {None})
    assert "http.server.request.duration" in rx.received.metric_names()
    assert "flowprobe.agent.spans.exported" in rx.received.metric_names()


def test_grpc_with_headers() -> None:
    rx = FakeGrpcReceiver()
    try:
        cfg = ExportConfig(
            otlp=OtlpConfig(endpoint=rx.endpoint, headers={"x-tenant": "blue"}, compression="gzip")
        )
        tel = _send(cfg)
    finally:
        rx.stop()
    assert tel.counters.spans_exported == 2
    assert len(rx.received.spans()) == 2
    assert all(h.get("x-tenant") == "blue" for h in rx.received.headers)
    assert "flowprobe.edge.exchanges" in rx.received.metric_names()


def test_grpc_over_tls_verifies_the_backend_with_the_given_ca(tmp_path: Path) -> None:
    ca, cert_pem, key_pem = self_signed(tmp_path)
    creds = grpc.ssl_server_credentials([(key_pem, cert_pem)])
    rx = FakeGrpcReceiver(credentials=creds)
    try:
        endpoint = f"https://localhost:{rx.port}"
        tel = _send(ExportConfig(otlp=OtlpConfig(endpoint=endpoint, certificate=str(ca))))
        assert tel.counters.spans_exported == 2
        # Without the CA the backend's certificate is not trusted: nothing arrives.
        before = len(rx.received.spans())
        untrusted = _send(
            ExportConfig(otlp=OtlpConfig(endpoint=endpoint, timeout_seconds=2), metrics=False)
        )
        assert untrusted.counters.spans_exported == 0
        assert untrusted.counters.spans_dropped["export_failed"] == 2
        assert len(rx.received.spans()) == before
    finally:
        rx.stop()


# The backend's certificate names only this; the agent dials 127.0.0.1.
BACKEND_NAME = "otlp.backend.test"


def _tls_cases(endpoint: str, ca: Path, protocol: str) -> dict[str, Telemetry]:
    base = OtlpConfig(endpoint=endpoint, protocol=protocol, timeout_seconds=2)
    configs = {
        "ca only": base.model_copy(update={"certificate": str(ca)}),
        "ca and serverName": base.model_copy(
            update={"certificate": str(ca), "server_name": BACKEND_NAME}
        ),
        "insecureSkipVerify": base.model_copy(update={"insecure_skip_verify": True}),
    }
    return {k: _send(ExportConfig(otlp=c)) for k, c in configs.items()}


def _assert_tls_cases(sent: dict[str, Telemetry]) -> None:
    # The name differs from the dialled address: only with serverName, or
    # without verification, does anything arrive.
    assert sent["ca only"].counters.spans_exported == 0
    assert sent["ca and serverName"].counters.spans_exported == 2
    assert sent["insecureSkipVerify"].counters.spans_exported == 2


def test_grpc_server_name_and_insecure_skip_verify(tmp_path: Path) -> None:
    ca, cert_pem, key_pem = self_signed(tmp_path, (BACKEND_NAME,))
    rx = FakeGrpcReceiver(credentials=grpc.ssl_server_credentials([(key_pem, cert_pem)]))
    try:
        sent = _tls_cases(f"https://127.0.0.1:{rx.port}", ca, "grpc")
    finally:
        rx.stop()
    _assert_tls_cases(sent)
    assert len(rx.received.spans()) == 4
    # The SDK's metric exporter gets the same settings.
    assert "flowprobe.edge.exchanges" in rx.received.metric_names()


def test_http_server_name_and_insecure_skip_verify(tmp_path: Path) -> None:
    ca, cert_pem, key_pem = self_signed(tmp_path, (BACKEND_NAME,))
    (tmp_path / "cert.pem").write_bytes(cert_pem)
    (tmp_path / "key.pem").write_bytes(key_pem)
    tls = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER)
    tls.load_cert_chain(tmp_path / "cert.pem", tmp_path / "key.pem")
    rx = FakeHttpReceiver(tls=tls)
    try:
        sent = _tls_cases(rx.endpoint, ca, "http/protobuf")
    finally:
        rx.stop()
    _assert_tls_cases(sent)
    assert len(rx.received.spans()) == 4
    assert "flowprobe.edge.exchanges" in rx.received.metric_names()
