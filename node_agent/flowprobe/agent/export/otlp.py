"""OTLP exporters from configuration and the standard ``OTEL_EXPORTER_OTLP_*`` variables.

Everything is resolved here, once, into explicit :class:`SignalSettings`, and
the exporters are built with explicit arguments: what the agent will do is
then visible (and logged) in one place instead of split between our
configuration and the SDK's own environment lookups. Spans go through the
agent's own senders (``transport.py``: the agent encodes them itself), metrics
through the SDK's OTLP metric exporters.

Precedence per setting: agent configuration (flags included) > the
signal-specific variable (``OTEL_EXPORTER_OTLP_TRACES_*``) > the generic one
(``OTEL_EXPORTER_OTLP_*``) > the default. OTLP is off unless an endpoint comes
from one of them; ``OTEL_TRACES_EXPORTER=none`` / ``OTEL_METRICS_EXPORTER=none``
turn one signal off.
"""

from __future__ import annotations

import logging
import os
import urllib.parse
from collections.abc import Mapping
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any, Literal

import grpc
from opentelemetry.sdk._logs.export import LogRecordExporter
from opentelemetry.sdk.metrics.export import MetricExporter

from flowprobe.agent.config import ExportConfig, OtlpConfig

if TYPE_CHECKING:
    import requests

    from flowprobe.agent.export.transport import SpanSink

Signal = Literal["traces", "metrics", "logs"]
Protocol = Literal["grpc", "http/protobuf"]
PROTOCOLS: tuple[Protocol, ...] = ("grpc", "http/protobuf")
COMPRESSIONS = ("gzip", "deflate", "none")
# The Python SDK's distro defaults to gRPC, and so do the agent's docs and
# the collector's well-known port; the OTLP spec's default is http/protobuf.
DEFAULT_PROTOCOL: Protocol = "grpc"
DEFAULT_TIMEOUT_S = 10.0

log = logging.getLogger("flowprobe.agent")


class OtlpConfigError(ValueError):
    """An OTLP setting (flag, configuration or variable) cannot be used."""


@dataclass(frozen=True)
class SignalSettings:
    signal: Signal
    protocol: Protocol
    # Full URL for http/protobuf (…/v1/traces); for gRPC what was given.
    endpoint: str
    headers: dict[str, str] = field(default_factory=dict)
    insecure: bool = False
    certificate: str | None = None
    client_certificate: str | None = None
    client_key: str | None = None
    compression: str = "none"
    timeout_s: float = DEFAULT_TIMEOUT_S
    # See tlsopts: the name the certificate must carry, and accepting any.
    server_name: str | None = None
    insecure_skip_verify: bool = False

    def describe(self) -> str:
        """One line for the log: never the header values (they hold credentials)."""
        tls = "plaintext" if self.insecure or self.endpoint.startswith("http://") else "TLS"
        headers = ",".join(sorted(self.headers)) or "-"
        return (
            f"{self.signal} -> {self.endpoint} ({self.protocol}, {tls}, compression "
            f"{self.compression}, timeout {self.timeout_s:g}s, headers {headers})"
        )


def _env(env: Mapping[str, str], signal: Signal, name: str) -> str | None:
    """The signal-specific variable if set (and not empty), else the generic one."""
    for key in (f"OTEL_EXPORTER_OTLP_{signal.upper()}_{name}", f"OTEL_EXPORTER_OTLP_{name}"):
        value = env.get(key, "").strip()
        if value:
            return value
    return None


def parse_headers(text: str) -> dict[str, str]:
    """``k1=v1,k2=v2`` with URL-encoded values, as the OTLP exporter spec defines."""
    out: dict[str, str] = {}
    for item in text.split(","):
        if not item.strip():
            continue
        key, sep, value = item.partition("=")
        if not sep or not key.strip():
            raise OtlpConfigError(f"bad OTLP header {item.strip()!r}: expected key=value")
        out[urllib.parse.unquote(key.strip()).lower()] = urllib.parse.unquote(value.strip())
    return out


def _bool(text: str, what: str) -> bool:
    low = text.lower()
    if low in ("true", "1", "yes"):
        return True
    if low in ("false", "0", "no"):
        return False
    raise OtlpConfigError(f"{what}: expected true or false, got {text!r}")


def resolve(
    config: OtlpConfig, signal: Signal, env: Mapping[str, str] | None = None
) -> SignalSettings | None:
    """The settings for one signal, or None when OTLP is not configured for it."""
    env = os.environ if env is None else env
    if env.get(f"OTEL_{signal.upper()}_EXPORTER", "").strip().lower() == "none":
        return None
    proto_s = config.protocol or _env(env, signal, "PROTOCOL") or DEFAULT_PROTOCOL
    if proto_s not in PROTOCOLS:
        raise OtlpConfigError(
            f"OTLP protocol {proto_s!r} is not supported: use one of {', '.join(PROTOCOLS)}"
        )
    protocol: Protocol = "grpc" if proto_s == "grpc" else "http/protobuf"
    path = f"/v1/{signal}"
    if config.endpoint:
        endpoint = config.endpoint
        if protocol == "http/protobuf":
            endpoint = endpoint.rstrip("/") + path
    elif signal_endpoint := env.get(f"OTEL_EXPORTER_OTLP_{signal.upper()}_ENDPOINT", "").strip():
        # The signal-specific variable is a full URL, used as is.
        endpoint = signal_endpoint
    elif base := env.get("OTEL_EXPORTER_OTLP_ENDPOINT", "").strip():
        endpoint = base if protocol == "grpc" else base.rstrip("/") + path
    else:
        return None
    scheme = urllib.parse.urlsplit(endpoint).scheme if "://" in endpoint else ""
    if protocol == "http/protobuf" and scheme not in ("http", "https"):
        raise OtlpConfigError(f"OTLP/HTTP endpoint needs http:// or https://: {endpoint!r}")
    if protocol == "grpc" and scheme not in ("", "http", "https"):
        raise OtlpConfigError(f"OTLP/gRPC endpoint must be http(s)://host:port: {endpoint!r}")

    headers = {}
    if env_headers := _env(env, signal, "HEADERS"):
        headers.update(parse_headers(env_headers))
    headers.update({k.lower(): v for k, v in config.headers.items()})

    if config.insecure is not None:
        insecure = config.insecure
    elif (env_insecure := _env(env, signal, "INSECURE")) is not None:
        insecure = _bool(env_insecure, "OTEL_EXPORTER_OTLP_INSECURE")
    else:
        insecure = scheme == "http"
    if scheme == "https":
        insecure = False

    compression = config.compression or _env(env, signal, "COMPRESSION") or "none"
    if compression not in COMPRESSIONS:
        raise OtlpConfigError(
            f"OTLP compression {compression!r} is not supported: use gzip, deflate or none"
        )
    if config.timeout_seconds is not None:
        timeout_s = config.timeout_seconds
    elif (env_timeout := _env(env, signal, "TIMEOUT")) is not None:
        # The spec gives this variable in milliseconds.
        try:
            timeout_s = float(env_timeout) / 1000.0
        except ValueError:
            raise OtlpConfigError(
                f"OTEL_EXPORTER_OTLP_TIMEOUT: not a number: {env_timeout!r}"
            ) from None
        if timeout_s <= 0:
            raise OtlpConfigError("OTEL_EXPORTER_OTLP_TIMEOUT must be positive (milliseconds)")
    else:
        timeout_s = DEFAULT_TIMEOUT_S
    settings = SignalSettings(
        signal=signal,
        protocol=protocol,
        endpoint=endpoint,
        headers=headers,
        insecure=insecure,
        certificate=config.certificate or _env(env, signal, "CERTIFICATE"),
        client_certificate=config.client_certificate or _env(env, signal, "CLIENT_CERTIFICATE"),
        client_key=config.client_key or _env(env, signal, "CLIENT_KEY"),
        compression=compression,
        timeout_s=timeout_s,
        server_name=config.server_name,
        insecure_skip_verify=config.insecure_skip_verify,
    )
    for path_setting in (settings.certificate, settings.client_certificate, settings.client_key):
        if path_setting is not None and not os.path.isfile(path_setting):
            raise OtlpConfigError(f"OTLP TLS file not found: {path_setting}")
    if (settings.client_certificate is None) != (settings.client_key is None):
        raise OtlpConfigError("OTLP mTLS needs both a client certificate and a client key")
    return settings


def metric_interval(export: ExportConfig, env: Mapping[str, str] | None = None) -> float:
    """Seconds between metric exports: the configuration if it sets one, else the SDK's
    ``OTEL_METRIC_EXPORT_INTERVAL`` (milliseconds), else the configuration's default."""
    env = os.environ if env is None else env
    if "metric_interval_seconds" in export.model_fields_set:
        return export.metric_interval_seconds
    text = env.get("OTEL_METRIC_EXPORT_INTERVAL", "").strip()
    if not text:
        return export.metric_interval_seconds
    try:
        seconds = float(text) / 1000.0
    except ValueError:
        raise OtlpConfigError(f"OTEL_METRIC_EXPORT_INTERVAL: not a number: {text!r}") from None
    if not 0 < seconds <= 3600:
        raise OtlpConfigError(
            "OTEL_METRIC_EXPORT_INTERVAL must be between 1 and 3600000 (milliseconds)"
        )
    return seconds


def grpc_tls(
    s: SignalSettings,
) -> tuple[grpc.ChannelCredentials | None, tuple[tuple[str, str], ...]]:
    """Channel credentials (None: the default roots) and channel options for ``s``."""
    if s.insecure:
        return None, ()

    def read(path: str | None) -> bytes | None:
        if path is None:
            return None
        with open(path, "rb") as f:
            return f.read()

    roots = read(s.certificate)
    name = s.server_name
    if s.insecure_skip_verify:
        # Imported on use, as requests (which tlsopts needs) is slow to import.
        from flowprobe.agent.export import tlsopts

        host, port = tlsopts.grpc_host_port(s.endpoint)
        try:
            pem, name = tlsopts.presented_certificate(host, port, s.server_name, s.timeout_s)
            roots = pem.encode()
        except (OSError, ValueError) as exc:
            # Backend not up yet: the span sender pins again when it reconnects.
            log.debug("OTLP %s: no certificate to pin yet: %s", s.signal, exc)
    options = (("grpc.ssl_target_name_override", name),) if name else ()
    if roots is None and not s.client_certificate:
        return None, options
    creds = grpc.ssl_channel_credentials(
        root_certificates=roots,
        private_key=read(s.client_key),
        certificate_chain=read(s.client_certificate),
    )
    return creds, options


def grpc_compression(name: str) -> grpc.Compression:
    return {
        "gzip": grpc.Compression.Gzip,
        "deflate": grpc.Compression.Deflate,
        "none": grpc.Compression.NoCompression,
    }[name]


def _grpc_kwargs(s: SignalSettings) -> dict[str, Any]:
    credentials, options = grpc_tls(s)
    return {
        "endpoint": s.endpoint,
        "insecure": s.insecure,
        "credentials": credentials,
        "channel_options": options or None,
        "headers": dict(s.headers),
        "timeout": s.timeout_s,
        "compression": grpc_compression(s.compression),
    }


def http_session(s: SignalSettings) -> requests.Session:
    """A session applying ``s``'s server name and verification (see tlsopts)."""
    import requests

    from flowprobe.agent.export import tlsopts

    session = requests.Session()
    if s.insecure_skip_verify or s.server_name:
        verify: bool | str = False if s.insecure_skip_verify else (s.certificate or True)
        session.mount("https://", tlsopts.TlsAdapter(verify, s.server_name))
    return session


def _http_kwargs(s: SignalSettings) -> dict[str, Any]:
    from opentelemetry.exporter.otlp.proto.http import Compression

    return {
        "session": http_session(s),
        "endpoint": s.endpoint,
        "certificate_file": s.certificate,
        "client_key_file": s.client_key,
        "client_certificate_file": s.client_certificate,
        "headers": dict(s.headers),
        "timeout": s.timeout_s,
        "compression": Compression(s.compression),
    }


def span_exporter(s: SignalSettings) -> SpanSink:
    # Imported on use: transport.py builds on this module.
    from flowprobe.agent.export.transport import GrpcSpanSender, HttpSpanSender

    return GrpcSpanSender(s) if s.protocol == "grpc" else HttpSpanSender(s)


# Data points per metric export request. A gRPC server takes 4 MiB per
# message unless configured otherwise (the collector's OTLP receiver too),
# and the agent's cumulative histograms for every workload edge outgrow that:
# 4.75 MB after the bench's 140,000 exchanges, 6.1 MB for 3,000 edges. The
# whole export was then refused, at every interval. Those 3,000 edges are
# 14,022 points, 434 bytes each on average; split at 1,000 they went out as
# 15 requests of at most 0.63 MB.
METRIC_POINTS_PER_REQUEST = 1000


def metric_exporter(s: SignalSettings) -> MetricExporter:
    if s.protocol == "grpc":
        from opentelemetry.exporter.otlp.proto.grpc.metric_exporter import OTLPMetricExporter

        return OTLPMetricExporter(
            **_grpc_kwargs(s), max_export_batch_size=METRIC_POINTS_PER_REQUEST
        )
    from opentelemetry.exporter.otlp.proto.http.metric_exporter import (
        OTLPMetricExporter as HttpMetricExporter,
    )

    return HttpMetricExporter(**_http_kwargs(s), max_export_batch_size=METRIC_POINTS_PER_REQUEST)


def log_exporter(s: SignalSettings) -> LogRecordExporter:
    if s.protocol == "grpc":
        from opentelemetry.exporter.otlp.proto.grpc._log_exporter import OTLPLogExporter

        return OTLPLogExporter(**_grpc_kwargs(s))
    from opentelemetry.exporter.otlp.proto.http._log_exporter import (
        OTLPLogExporter as HttpLogExporter,
    )

    return HttpLogExporter(**_http_kwargs(s))


def exporters(
    export: ExportConfig, env: Mapping[str, str] | None = None
) -> tuple[SpanSink | None, MetricExporter | None]:
    """The span and metric exporters the configuration asks for (None: that signal is off)."""
    spans: SpanSink | None = None
    metrics: MetricExporter | None = None
    if export.console_spans:
        from flowprobe.agent.export.transport import ConsoleSpanPrinter

        spans = ConsoleSpanPrinter()
    elif export.traces and (t := resolve(export.otlp, "traces", env)) is not None:
        log.info("OTLP %s", t.describe())
        spans = span_exporter(t)
    if export.metrics and (m := resolve(export.otlp, "metrics", env)) is not None:
        log.info("OTLP %s", m.describe())
        metrics = metric_exporter(m)
    return spans, metrics


# The SDK metric exporters log every failed export (and every retry) at
# WARNING/ERROR; with a backend down for an hour that is hundreds of lines.
# The agent reports the first failure and the recovery itself, with drop counts.
SDK_EXPORT_LOGGERS = (
    "opentelemetry.exporter.otlp.proto.grpc.exporter",
    "opentelemetry.exporter.otlp.proto.http.metric_exporter",
    "opentelemetry.exporter.otlp.proto.http._log_exporter",
    "opentelemetry.exporter.otlp.proto.http._common",
)


def quiet_sdk_export_logs() -> None:
    for name in SDK_EXPORT_LOGGERS:
        logging.getLogger(name).setLevel(logging.CRITICAL)
