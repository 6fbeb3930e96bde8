"""Agent configuration: one pydantic model, from the command line or the operator's policy."""

from __future__ import annotations

from typing import Annotated, Literal

from pydantic import BaseModel, ConfigDict, Field

ALL_PROTOCOLS = ("http", "http2", "dns", "redis", "postgresql", "mysql")


class _Model(BaseModel):
    model_config = ConfigDict(extra="forbid", frozen=True)


class PayloadConfig(_Model):
    """What of the payload may leave the agent. Everything off by default."""

    headers: bool = False
    bodies: bool = False
    body_max_bytes: int = Field(default=1024, ge=0, le=65536)
    user_agent: bool = False
    # Off means query text is sanitised (literals -> ?), never dropped.
    raw_query_text: bool = False


class OtlpConfig(_Model):
    """Where OTLP goes. Unset fields fall back to the standard OTEL_EXPORTER_OTLP_*
    variables (signal-specific first), then to the defaults; docs/export.md."""

    # Base URL (http://host:4317 for gRPC, http://host:4318 for HTTP, which
    # gets /v1/traces and /v1/metrics appended).
    endpoint: str | None = None
    protocol: Literal["grpc", "http/protobuf"] | None = None
    headers: dict[str, str] = Field(default_factory=dict)
    # gRPC only: plaintext even without an http:// scheme.
    insecure: bool | None = None
    certificate: str | None = None  # CA bundle (PEM) to verify the backend
    client_certificate: str | None = None  # mTLS
    client_key: str | None = None
    compression: Literal["gzip", "deflate", "none"] | None = None
    timeout_seconds: float | None = Field(default=None, gt=0, le=300)
    # The name the backend's certificate must carry when it is not the
    # endpoint's host; accept any certificate (still encrypted).
    server_name: str | None = None
    insecure_skip_verify: bool = False


class ExportConfig(_Model):
    """Spans and metrics over OTLP; off unless an endpoint is configured."""

    otlp: OtlpConfig = OtlpConfig()
    traces: bool = True
    metrics: bool = True
    # Print spans (one OTLP/JSON span per line) instead of sending them.
    console_spans: bool = False
    # service.name per workload outside Kubernetes: "address:port" (a server)
    # or "address" (either role) -> name. Unlisted ones are named after the
    # address.
    service_names: dict[str, str] = Field(default_factory=dict)
    # Route templates tried before the identifier heuristic: "/users/{id}/orders",
    # a final "*" matches the rest of the path.
    routes: tuple[str, ...] = ()
    agent_service_name: str = "flowprobe-agent"
    # Exchanges waiting for the export thread; beyond this they are dropped
    # (counted), never waited for: capture must not block.
    queue_size: int = Field(default=8192, ge=16, le=1_000_000)
    span_queue_size: int = Field(default=16384, ge=16, le=1_000_000)
    batch_size: int = Field(default=512, ge=1, le=16384)
    schedule_delay_seconds: float = Field(default=1.0, gt=0, le=60)
    metric_interval_seconds: float = Field(default=15.0, gt=0, le=3600)
    # How long a possible downstream call waits for its parent request to end.
    link_window_seconds: float = Field(default=2.0, ge=0, le=60)
    max_held_exchanges: int = Field(default=20_000, ge=0, le=1_000_000)
    max_workloads: int = Field(default=1000, ge=1, le=100_000)
    self_metrics_otlp: bool = True
    metrics_port: int | None = Field(default=None, ge=0, le=65535)
    metrics_address: str = "0.0.0.0"
    shutdown_timeout_seconds: float = Field(default=30.0, gt=0, le=600)


# CRS rule ids or ranges as SecRuleRemoveById takes them: "942100", "942100-942199".
RuleIdOrRange = Annotated[str, Field(pattern=r"^[0-9]{1,9}(-[0-9]{1,9})?$")]


class WafConfig(_Model):
    """ModSecurity + OWASP CRS on captured HTTP/1 exchanges, detection only (docs/security.md)."""

    enabled: bool = False
    paranoia_level: int = Field(default=1, ge=1, le=4)
    # CRS's anomaly thresholds: a request (response) whose summed rule scores
    # reach them also hits the evaluation rule 949110 (959100).
    inbound_anomaly_threshold: int = Field(default=5, ge=1, le=10000)
    outbound_anomaly_threshold: int = Field(default=4, ge=1, le=10000)
    # 920350 (Host is a numeric IP): pods calling each other by IP is normal
    # east-west traffic, not an attack.
    excluded_rules: tuple[RuleIdOrRange, ...] = ("920350",)
    excluded_tags: tuple[Annotated[str, Field(pattern=r"^[A-Za-z0-9_./-]{1,128}$")], ...] = ()


class DdrConfig(_Model):
    """Sensitive-data detection in headers, bodies, SQL text and rows, Redis commands and replies."""

    enabled: bool = False
    # Empty: every category (flowprobe.agent.security.ddr.CATEGORIES).
    categories: tuple[str, ...] = ()


class SecurityConfig(_Model):
    """Everything off by default; turning either part on makes the HTTP parser keep
    header lines and bodies (internally: they never leave the agent unmasked)."""

    waf: WafConfig = WafConfig()
    ddr: DdrConfig = DdrConfig()
    # Bodies are cut here before inspection; tshark's column text stops at
    # 2047 characters anyway.
    body_max_bytes: int = Field(default=2047, ge=0, le=2047)
    # Exchanges waiting for inspection; beyond this they pass uninspected
    # (counted), capture never waits.
    queue_size: int = Field(default=4096, ge=16, le=1_000_000)
    # Matched data in exported findings, after masking.
    matched_data_max_chars: int = Field(default=64, ge=0, le=1024)

    @property
    def enabled(self) -> bool:
        return self.waf.enabled or self.ddr.enabled


class AnomalyConfig(_Model):
    """Top-N talkers and per-edge baselines with alerts (docs/anomalies.md); off by default.

    Units are those of ProbePolicy ``spec.anomalies`` (whole percents and
    milliseconds), so a policy maps onto this field by field.
    """

    enabled: bool = False
    # Members reported per metric and dimension (0: no top-N).
    top_n: int = Field(default=10, ge=0, le=50)
    top_n_window_seconds: int = Field(default=60, ge=10, le=3600)
    # Baselines: figures per edge per interval, smoothed over about
    # span_intervals (EWMA, alpha = 2 / (span + 1)); no alert before
    # warmup_intervals intervals.
    interval_seconds: int = Field(default=10, ge=1, le=300)
    span_intervals: int = Field(default=30, ge=2, le=1000)
    warmup_intervals: int = Field(default=6, ge=1, le=1000)
    # Error ratio and latency are judged only on intervals with this many exchanges.
    min_exchanges: int = Field(default=20, ge=1, le=1_000_000)
    # Error ratio above its baseline by this many percentage points.
    error_ratio_increase_percent: int = Field(default=10, ge=1, le=100)
    # p95 latency above its baseline by this percentage and by at least the milliseconds.
    latency_increase_percent: int = Field(default=100, ge=1, le=10_000)
    latency_min_increase_ms: int = Field(default=20, ge=0, le=600_000)
    # Rate above baseline * (1 + p/100) or below baseline / (1 + p/100); 0: not judged.
    rate_change_percent: int = Field(default=300, ge=0, le=10_000)
    # An alert's storm ends after this many intervals back within the baseline.
    quiet_intervals: int = Field(default=3, ge=1, le=1000)
    max_edges: int = Field(default=10_000, ge=1, le=1_000_000)
    # Members per dimension in one slot of the top-N window; beyond, counted.
    max_members: int = Field(default=5000, ge=1, le=1_000_000)


class IsolationConfig(_Model):
    """Standalone micro-isolation (docs/isolation.md); off without a rules file."""

    # JSON file holding what a ProbePolicy's spec.isolation holds; re-read
    # while the agent runs (emptied or removed: isolation off).
    file: str | None = None
    # Addresses or CIDRs never blocked, on top of the node's own addresses
    # and the API server's (KUBERNETES_SERVICE_HOST).
    protected: tuple[str, ...] = ()


# What freezes a pcap: an exchange outcome (error covers HTTP 5xx, gRPC and
# SQL errors, Redis errors, DNS rcodes), a security finding on it, or an
# anomaly alert on its edge.
ForensicsTrigger = Literal["error", "reset", "timeout", "alert", "anomaly"]


class ForensicsConfig(_Model):
    """The capture ring and the pcaps frozen from it (docs/forensics.md). Off by default."""

    enabled: bool = False
    # Ring files and frozen pcaps live here (frozen/ and ring/ below it).
    directory: str = "/var/lib/flowprobe/forensics"
    # dumpcap's ring: this many files of at most this size, each closed after
    # this long, so the ring holds at most files x size bytes and files x
    # seconds of traffic. A packet reaches the disk when its file closes, so
    # a cut waits up to ring_file_seconds after its window.
    ring_files: int = Field(default=32, ge=2, le=256)
    ring_file_mb: int = Field(default=4, ge=1, le=1024)
    ring_file_seconds: int = Field(default=2, ge=1, le=60)
    # Packets of the connection kept before the exchange began and after it ended.
    seconds_before: int = Field(default=10, ge=0, le=600)
    seconds_after: int = Field(default=2, ge=0, le=60)
    # Frozen pcaps: the oldest go once either bound is passed.
    max_frozen_mb: int = Field(default=128, ge=1, le=65536)
    max_frozen_files: int = Field(default=100, ge=1, le=10000)
    # More triggers than this per minute are counted, not frozen.
    max_per_minute: int = Field(default=6, ge=1, le=600)
    triggers: tuple[ForensicsTrigger, ...] = ("error", "reset", "timeout", "alert", "anomaly")
    # Bearer token callers of the pcap endpoint must present; unset or empty:
    # every request is refused.
    token_file: str | None = None

    @property
    def ring_bytes(self) -> int:
        return self.ring_files * self.ring_file_mb << 20


class AgentConfig(_Model):
    protocols: tuple[str, ...] = ALL_PROTOCOLS
    # Extra server ports per protocol, on top of each parser's defaults; tshark
    # decodes them with "decode as".
    ports: dict[str, tuple[int, ...]] = Field(default_factory=dict)
    payload: PayloadConfig = PayloadConfig()
    response_timeout_seconds: int = Field(default=30, ge=1, le=3600)
    # tshark keeps per-conversation state for every packet it has seen;
    # resetting its session every N packets (-M) frees most of it (about
    # 0.6 KB per packet) at the cost of a few exchanges that straddle a reset.
    # What a reset does not free, replacing tshark does (capture.rotate).
    session_reset_packets: int = Field(default=50_000, ge=10_000)
    export: ExportConfig = ExportConfig()
    security: SecurityConfig = SecurityConfig()
    anomalies: AnomalyConfig = AnomalyConfig()
    # Tell connections that carry TLS (the agent cannot parse them): one more
    # tshark column; Sinks.tls hears of each such connection once.
    detect_tls: bool = False
    isolation: IsolationConfig = IsolationConfig()
    forensics: ForensicsConfig = ForensicsConfig()
