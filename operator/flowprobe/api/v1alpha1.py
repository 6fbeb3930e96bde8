"""ProbePolicy v1alpha1: the pydantic mirror of crds/probepolicies.flowprobe.io.yaml.

The CRD's OpenAPI schema is what the API server enforces; these models are
what the operator (and, for the shared types, the agent) parse a stored
object into. Field names, enums, bounds and defaults are the same on both
sides, which tests/operator/test_models.py checks field by field, so a
policy the API server accepts always parses here.
"""

from __future__ import annotations

import datetime
import ipaddress
from enum import StrEnum
from typing import Annotated, Any, Literal, Self

from pydantic import (
    AfterValidator,
    BaseModel,
    ConfigDict,
    Field,
    field_validator,
    model_validator,
)
from pydantic.alias_generators import to_camel

from flowprobe.api.conditions import Condition


class _Model(BaseModel):
    model_config = ConfigDict(
        alias_generator=to_camel, populate_by_name=True, extra="forbid", frozen=True
    )


# -- enums (CamelCase values, as the API conventions ask) ---------------------


class ManagementState(StrEnum):
    MANAGED = "Managed"
    UNMANAGED = "Unmanaged"


class Direction(StrEnum):
    INGRESS = "Ingress"
    EGRESS = "Egress"
    BOTH = "Both"


class Protocol(StrEnum):
    HTTP = "HTTP"
    HTTP2 = "HTTP2"
    GRPC = "GRPC"
    DNS = "DNS"
    REDIS = "Redis"
    POSTGRESQL = "PostgreSQL"
    MYSQL = "MySQL"
    TCP = "TCP"


class HeaderCaptureMode(StrEnum):
    NONE = "None"
    ALL = "All"
    ALLOWLIST = "Allowlist"


class BodyCaptureMode(StrEnum):
    NONE = "None"
    ALL = "All"


class QueryTextMode(StrEnum):
    SANITIZED = "Sanitized"
    RAW = "Raw"
    OMITTED = "Omitted"


class WafMode(StrEnum):
    OFF = "Off"
    DETECTION_ONLY = "DetectionOnly"


class SensitiveDataMode(StrEnum):
    OFF = "Off"
    DETECT = "Detect"


class SensitiveDataCategory(StrEnum):
    CARD_NUMBER = "CardNumber"
    IBAN = "IBAN"
    EMAIL = "Email"
    PHONE = "Phone"
    NATIONAL_ID = "NationalID"
    JWT = "JWT"
    API_KEY = "APIKey"
    PRIVATE_KEY = "PrivateKey"
    PASSWORD = "Password"


class AnomalyMode(StrEnum):
    OFF = "Off"
    DETECT = "Detect"


class ForensicsMode(StrEnum):
    OFF = "Off"
    ENABLED = "Enabled"


class ForensicsTrigger(StrEnum):
    SERVER_ERROR = "ServerError"
    CONNECTION_RESET = "ConnectionReset"
    TIMEOUT = "Timeout"
    SECURITY_ALERT = "SecurityAlert"
    ANOMALY_ALERT = "AnomalyAlert"


class OtlpProtocol(StrEnum):
    GRPC = "Grpc"
    HTTP_PROTOBUF = "HttpProtobuf"


class LabelSelectorOperator(StrEnum):
    IN = "In"
    NOT_IN = "NotIn"
    EXISTS = "Exists"
    DOES_NOT_EXIST = "DoesNotExist"


class TolerationOperator(StrEnum):
    EXISTS = "Exists"
    EQUAL = "Equal"


class TaintEffect(StrEnum):
    NO_SCHEDULE = "NoSchedule"
    PREFER_NO_SCHEDULE = "PreferNoSchedule"
    NO_EXECUTE = "NoExecute"


class NodeNoteType(StrEnum):
    CAPTURE_INTERFACE_MISSING = "CaptureInterfaceMissing"
    TLS_NOT_VISIBLE = "TLSNotVisible"
    AGENT_NOT_REPORTING = "AgentNotReporting"


class Reason(StrEnum):
    """Condition reasons: one CamelCase word each, documented in docs/operator.md."""

    AGENTS_READY = "AgentsReady"
    AGENTS_PROGRESSING = "AgentsProgressing"
    AGENTS_UNAVAILABLE = "AgentsUnavailable"
    NO_AGENT_NODES = "NoAgentNodes"
    INVALID_SPEC = "InvalidSpec"
    NO_EXPORT_ENDPOINT = "NoExportEndpoint"
    RECONCILE_FAILED = "ReconcileFailed"
    EXPIRED = "Expired"
    AS_EXPECTED = "AsExpected"
    AGENT_SETTINGS_CONFLICT = "AgentSettingsConflict"
    AGENTS_NOT_REPORTING = "AgentsNotReporting"
    CAPTURE_INTERFACE_MISSING = "CaptureInterfaceMissing"
    TLS_NOT_VISIBLE = "TLSNotVisible"
    END_TIME_REACHED = "EndTimeReached"
    NO_TIME_LIMIT = "NoTimeLimit"
    WITHIN_TIME_LIMIT = "WithinTimeLimit"


DEFAULT_PROTOCOLS: tuple[Protocol, ...] = (
    Protocol.HTTP,
    Protocol.HTTP2,
    Protocol.GRPC,
    Protocol.DNS,
    Protocol.REDIS,
    Protocol.POSTGRESQL,
    Protocol.MYSQL,
)
DEFAULT_REDACTED_HEADERS: tuple[str, ...] = (
    "authorization",
    "cookie",
    "proxy-authorization",
    "set-cookie",
    "x-api-key",
)
REDACTED = "[REDACTED]"
# Protocols whose message bodies the agent decodes.
_BODY_PROTOCOLS = frozenset({Protocol.HTTP, Protocol.HTTP2, Protocol.GRPC})

# Bounds shared with the CRD (maxItems exists to bound CEL cost and object size).
MAX_PROTOCOLS = 8
MAX_PORTS = 32
MAX_SELECTOR_EXPRESSIONS = 16
MAX_SELECTOR_VALUES = 64
MAX_SELECTOR_LABELS = 32
MAX_HEADERS = 32
MAX_PATTERNS = 16
MAX_RESOURCE_ATTRIBUTES = 32
MAX_TOLERATIONS = 16
MAX_NODE_SELECTOR = 16
MAX_CONDITIONS = 8
MAX_NODE_NOTES = 32
MAX_AGENT_STATUSES = 32
MAX_AGENT_INTERFACES = 16
MIN_DURATION_SECONDS = 60
MAX_DURATION_SECONDS = 30 * 24 * 3600
MAX_PAYLOAD_BYTES = 65536
MAX_WAF_EXCLUSIONS = 64
# tshark's column text stops at 2047 characters (docs/security.md).
MAX_INSPECTED_BODY_BYTES = 2047


# -- selectors ------------------------------------------------------------------


class LabelSelectorRequirement(_Model):
    key: Annotated[str, Field(min_length=1, max_length=317)]
    operator: LabelSelectorOperator
    values: Annotated[
        list[Annotated[str, Field(max_length=63)]], Field(max_length=MAX_SELECTOR_VALUES)
    ] = []


class LabelSelector(_Model):
    """metav1.LabelSelector; an empty selector matches everything."""

    match_labels: Annotated[dict[str, str], Field(max_length=MAX_SELECTOR_LABELS)] = {}
    match_expressions: Annotated[
        list[LabelSelectorRequirement], Field(max_length=MAX_SELECTOR_EXPRESSIONS)
    ] = []

    def matches(self, labels: dict[str, str]) -> bool:
        if any(labels.get(k) != v for k, v in self.match_labels.items()):
            return False
        for req in self.match_expressions:
            present = req.key in labels
            value = labels.get(req.key)
            ok = {
                LabelSelectorOperator.IN: present and value in req.values,
                LabelSelectorOperator.NOT_IN: not present or value not in req.values,
                LabelSelectorOperator.EXISTS: present,
                LabelSelectorOperator.DOES_NOT_EXIST: not present,
            }[req.operator]
            if not ok:
                return False
        return True

    def to_query(self) -> str | None:
        """The selector in the API's ``labelSelector`` syntax ("" selects all).

        None: nothing can match (``In`` with no values), so there is nothing
        to ask the API server for.
        """
        terms = [f"{k}={v}" for k, v in sorted(self.match_labels.items())]
        for req in self.match_expressions:
            values = ",".join(req.values)
            if req.operator == LabelSelectorOperator.IN:
                if not req.values:
                    return None
                terms.append(f"{req.key} in ({values})")
            elif req.operator == LabelSelectorOperator.NOT_IN:
                if req.values:  # an empty NotIn excludes nothing
                    terms.append(f"{req.key} notin ({values})")
            elif req.operator == LabelSelectorOperator.EXISTS:
                terms.append(req.key)
            else:
                terms.append(f"!{req.key}")
        return ",".join(terms)


# -- traffic --------------------------------------------------------------------


class PortRule(_Model):
    """A server port, by number or by the selected pods' container port name."""

    port: Annotated[int, Field(ge=1, le=65535)] | None = None
    name: Annotated[str, Field(min_length=1, max_length=15)] | None = None
    protocol: Protocol | None = None

    @model_validator(mode="after")
    def _one_of_port_or_name(self) -> Self:
        if (self.port is None) == (self.name is None):
            raise ValueError("set exactly one of port or name")
        return self


class TimeLimit(_Model):
    end_time: datetime.datetime | None = None
    duration_seconds: (
        Annotated[int, Field(ge=MIN_DURATION_SECONDS, le=MAX_DURATION_SECONDS)] | None
    ) = None

    @model_validator(mode="after")
    def _one_of(self) -> Self:
        if (self.end_time is None) == (self.duration_seconds is None):
            raise ValueError("set exactly one of endTime or durationSeconds")
        return self

    def ends_at(self, created: datetime.datetime) -> datetime.datetime:
        if self.end_time is not None:
            return self.end_time
        assert self.duration_seconds is not None  # _one_of
        return created + datetime.timedelta(seconds=self.duration_seconds)


# -- payload and redaction ------------------------------------------------------


class HeaderCapture(_Model):
    mode: HeaderCaptureMode = HeaderCaptureMode.NONE
    include: Annotated[
        list[Annotated[str, Field(min_length=1, max_length=128)]], Field(max_length=MAX_HEADERS)
    ] = []
    max_bytes: Annotated[int, Field(ge=0, le=MAX_PAYLOAD_BYTES)] = 4096

    @model_validator(mode="after")
    def _include_iff_allowlist(self) -> Self:
        if (self.mode == HeaderCaptureMode.ALLOWLIST) != bool(self.include):
            raise ValueError(
                "payload.headers.include is required with mode Allowlist, and only then"
            )
        return self


class BodyCapture(_Model):
    mode: BodyCaptureMode = BodyCaptureMode.NONE
    max_bytes: Annotated[int, Field(ge=1, le=MAX_PAYLOAD_BYTES)] = 1024


class PayloadSpec(_Model):
    headers: HeaderCapture = HeaderCapture()
    bodies: BodyCapture = BodyCapture()


class RedactionPattern(_Model):
    name: Annotated[str, Field(min_length=1, max_length=63)]
    regex: Annotated[str, Field(min_length=1, max_length=512)]
    replacement: Annotated[str, Field(max_length=64)] = REDACTED


class RedactionSpec(_Model):
    query_text: QueryTextMode = QueryTextMode.SANITIZED
    headers: Annotated[
        list[Annotated[str, Field(min_length=1, max_length=128)]], Field(max_length=MAX_HEADERS)
    ] = list(DEFAULT_REDACTED_HEADERS)
    patterns: Annotated[list[RedactionPattern], Field(max_length=MAX_PATTERNS)] = []


# -- security -------------------------------------------------------------------


class WafSpec(_Model):
    mode: WafMode = WafMode.OFF
    paranoia_level: Annotated[int, Field(ge=1, le=4)] = 1
    inbound_anomaly_threshold: Annotated[int, Field(ge=1, le=10000)] = 5
    outbound_anomaly_threshold: Annotated[int, Field(ge=1, le=10000)] = 4
    excluded_rules: Annotated[
        list[
            Annotated[
                str, Field(min_length=1, max_length=19, pattern=r"^[0-9]{1,9}(-[0-9]{1,9})?$")
            ]
        ],
        Field(max_length=MAX_WAF_EXCLUSIONS),
    ] = ["920350"]
    excluded_tags: Annotated[
        list[Annotated[str, Field(min_length=1, max_length=128, pattern=r"^[A-Za-z0-9_./-]+$")]],
        Field(max_length=MAX_WAF_EXCLUSIONS),
    ] = []


class SensitiveDataSpec(_Model):
    mode: SensitiveDataMode = SensitiveDataMode.OFF
    categories: Annotated[
        list[SensitiveDataCategory], Field(max_length=len(SensitiveDataCategory))
    ] = []


class SecuritySpec(_Model):
    waf: WafSpec = WafSpec()
    sensitive_data: SensitiveDataSpec = SensitiveDataSpec()
    body_max_bytes: Annotated[int, Field(ge=0, le=MAX_INSPECTED_BODY_BYTES)] = (
        MAX_INSPECTED_BODY_BYTES
    )


# -- anomalies ------------------------------------------------------------------


class TopNSpec(_Model):
    size: Annotated[int, Field(ge=0, le=50)] = 10
    window_seconds: Annotated[int, Field(ge=10, le=3600)] = 60


class BaselineSpec(_Model):
    interval_seconds: Annotated[int, Field(ge=1, le=300)] = 10
    span_intervals: Annotated[int, Field(ge=2, le=1000)] = 30
    warmup_intervals: Annotated[int, Field(ge=1, le=1000)] = 6
    min_exchanges: Annotated[int, Field(ge=1, le=1_000_000)] = 20


class AnomalyThresholds(_Model):
    error_ratio_increase_percent: Annotated[int, Field(ge=1, le=100)] = 10
    latency_increase_percent: Annotated[int, Field(ge=1, le=10_000)] = 100
    latency_min_increase_milliseconds: Annotated[int, Field(ge=0, le=600_000)] = 20
    rate_change_percent: Annotated[int, Field(ge=0, le=10_000)] = 300


class AnomaliesSpec(_Model):
    """Top-N talkers and per-edge baselines with alerts (docs/anomalies.md)."""

    mode: AnomalyMode = AnomalyMode.OFF
    top_n: TopNSpec = TopNSpec()
    baseline: BaselineSpec = BaselineSpec()
    thresholds: AnomalyThresholds = AnomalyThresholds()
    quiet_intervals: Annotated[int, Field(ge=1, le=1000)] = 3


# -- isolation ------------------------------------------------------------------


class IsolationMode(StrEnum):
    DRY_RUN = "DryRun"
    ENFORCE = "Enforce"


class IsolationRuleType(StrEnum):
    DENY_REQUEST = "DenyRequest"
    DENY_NEW_EDGE = "DenyNewEdge"
    BLOCK_ON_WAF_MATCH = "BlockOnWafMatch"


class HttpMethod(StrEnum):
    GET = "GET"
    HEAD = "HEAD"
    POST = "POST"
    PUT = "PUT"
    DELETE = "DELETE"
    PATCH = "PATCH"
    OPTIONS = "OPTIONS"
    CONNECT = "CONNECT"
    TRACE = "TRACE"


class WafSeverity(StrEnum):
    """CRS rule severities, most severe first."""

    CRITICAL = "Critical"
    ERROR = "Error"
    WARNING = "Warning"
    NOTICE = "Notice"


MAX_ISOLATION_RULES = 32
MAX_PEER_NAMES = 32
MAX_ISOLATION_PROTECTED = 16
MAX_BLOCK_SECONDS = 24 * 3600


def _network(value: str) -> str:
    ipaddress.ip_network(value, strict=False)  # ValueError names the bad one
    return value


_Name = Annotated[str, Field(min_length=1, max_length=253)]
# An address or network, as the CRD's isCIDR(c) || isIP(c).
_Cidr = Annotated[str, Field(min_length=1, max_length=43), AfterValidator(_network)]


class IsolationPeer(_Model):
    """One end of an edge. Each list that is set must match (OR within a list);
    an absent or empty peer matches anything."""

    # service.name as the agent names workloads (docs/isolation.md).
    workloads: Annotated[list[_Name], Field(max_length=MAX_PEER_NAMES)] = []
    namespaces: Annotated[
        list[Annotated[str, Field(min_length=1, max_length=63)]], Field(max_length=MAX_PEER_NAMES)
    ] = []
    cidrs: Annotated[list[_Cidr], Field(max_length=MAX_PEER_NAMES)] = []
    ports: Annotated[
        list[Annotated[int, Field(ge=1, le=65535)]], Field(max_length=MAX_PEER_NAMES)
    ] = []


class IsolationRule(_Model):
    name: Annotated[
        str, Field(min_length=1, max_length=63, pattern=r"^[a-z0-9]([-a-z0-9]*[a-z0-9])?$")
    ]
    type: IsolationRuleType
    # "from" is a Python keyword.
    source: IsolationPeer = Field(default=IsolationPeer(), alias="from")
    to: IsolationPeer = IsolationPeer()
    # DenyRequest: an HTTP request with one of these methods (any if empty)
    # whose path matches one of these glob patterns (any if empty).
    methods: Annotated[list[HttpMethod], Field(max_length=len(HttpMethod))] = []
    paths: Annotated[
        list[Annotated[str, Field(min_length=1, max_length=256, pattern=r"^/")]],
        Field(max_length=MAX_PATTERNS),
    ] = []
    # DenyNewEdge: edges first seen within this long of the rule taking effect are allowed.
    learning_seconds: Annotated[int, Field(ge=0, le=MAX_DURATION_SECONDS)] | None = None
    # BlockOnWafMatch: a CRS rule of at least this severity.
    min_severity: WafSeverity | None = None
    block_seconds: Annotated[int, Field(ge=1, le=MAX_BLOCK_SECONDS)] | None = None

    @model_validator(mode="after")
    def _fields_of_type(self) -> Self:
        t = self.type
        if (self.methods or self.paths) and t != IsolationRuleType.DENY_REQUEST:
            raise ValueError("methods and paths apply only to rules of type DenyRequest")
        if t == IsolationRuleType.DENY_REQUEST and not (self.methods or self.paths):
            raise ValueError("a DenyRequest rule needs methods or paths")
        if (self.learning_seconds is not None) != (t == IsolationRuleType.DENY_NEW_EDGE):
            raise ValueError("learningSeconds is required with type DenyNewEdge, and only then")
        if self.min_severity is not None and t != IsolationRuleType.BLOCK_ON_WAF_MATCH:
            raise ValueError("minSeverity applies only to rules of type BlockOnWafMatch")
        return self


class IsolationSpec(_Model):
    mode: IsolationMode = IsolationMode.DRY_RUN
    block_seconds: Annotated[int, Field(ge=1, le=MAX_BLOCK_SECONDS)] = 300
    rules: Annotated[list[IsolationRule], Field(min_length=1, max_length=MAX_ISOLATION_RULES)]
    # Addresses never blocked on top of the node's own and the API server's.
    protected_cidrs: Annotated[list[_Cidr], Field(max_length=MAX_ISOLATION_PROTECTED)] = []

    @model_validator(mode="after")
    def _unique_names(self) -> Self:
        names = [r.name for r in self.rules]
        if len(names) != len(set(names)):
            raise ValueError("isolation rule names must be unique")
        return self


# -- forensics ------------------------------------------------------------------


class ForensicsRing(_Model):
    """dumpcap's ring: at most files x fileSizeMegabytes bytes and files x fileDurationSeconds."""

    files: Annotated[int, Field(ge=2, le=256)] = 32
    file_size_megabytes: Annotated[int, Field(ge=1, le=1024)] = 4
    file_duration_seconds: Annotated[int, Field(ge=1, le=60)] = 2


class ForensicsSpec(_Model):
    mode: ForensicsMode = ForensicsMode.OFF
    triggers: Annotated[list[ForensicsTrigger], Field(max_length=len(ForensicsTrigger))] = list(
        ForensicsTrigger
    )
    ring: ForensicsRing = ForensicsRing()
    seconds_before: Annotated[int, Field(ge=0, le=600)] = 10
    seconds_after: Annotated[int, Field(ge=0, le=60)] = 2
    max_frozen_megabytes: Annotated[int, Field(ge=1, le=16384)] = 128
    max_frozen_files: Annotated[int, Field(ge=1, le=10000)] = 100
    max_freezes_per_minute: Annotated[int, Field(ge=1, le=600)] = 6

    @model_validator(mode="after")
    def _window_fits(self) -> Self:
        if self.seconds_before + self.seconds_after >= self.ring.files * (
            self.ring.file_duration_seconds
        ):
            raise ValueError(
                "forensics: secondsBefore + secondsAfter must be shorter than the ring "
                "(ring.files x ring.fileDurationSeconds)"
            )
        return self


# -- export ---------------------------------------------------------------------


class SecretRef(_Model):
    """A Secret in the operator's namespace (agents run there and mount it)."""

    name: Annotated[str, Field(min_length=1, max_length=253)]


class SecretKeyRef(_Model):
    name: Annotated[str, Field(min_length=1, max_length=253)]
    key: Annotated[str, Field(min_length=1, max_length=253)] = "ca.crt"


class OtlpTls(_Model):
    insecure_skip_verify: bool = False
    ca_secret_ref: SecretKeyRef | None = None
    server_name: Annotated[str, Field(max_length=253)] | None = None

    @model_validator(mode="after")
    def _verify_or_skip(self) -> Self:
        if self.insecure_skip_verify and self.ca_secret_ref is not None:
            raise ValueError("tls.caSecretRef is pointless with insecureSkipVerify true")
        return self


class OtlpExport(_Model):
    endpoint: Annotated[str, Field(min_length=1, max_length=512)]
    protocol: OtlpProtocol = OtlpProtocol.GRPC
    headers_secret_ref: SecretRef | None = None
    tls: OtlpTls | None = None
    timeout_seconds: Annotated[int, Field(ge=1, le=60)] = 10

    @field_validator("endpoint")
    @classmethod
    def _scheme(cls, value: str) -> str:
        if not value.startswith(("http://", "https://")):
            raise ValueError("export.otlp.endpoint must be an http:// or https:// URL")
        return value

    @model_validator(mode="after")
    def _tls_needs_https(self) -> Self:
        if self.tls is not None and not self.endpoint.startswith("https://"):
            raise ValueError("export.otlp.tls applies only to https:// endpoints")
        return self


class ResourceAttribute(_Model):
    key: Annotated[str, Field(min_length=1, max_length=128)]
    value: Annotated[str, Field(max_length=256)]


class ExportSpec(_Model):
    otlp: OtlpExport | None = None
    resource_attributes: Annotated[
        list[ResourceAttribute], Field(max_length=MAX_RESOURCE_ATTRIBUTES)
    ] = []

    @model_validator(mode="after")
    def _no_k8s_attributes(self) -> Self:
        if any(a.key.startswith("k8s.") for a in self.resource_attributes):
            raise ValueError("resourceAttributes keys must not start with k8s.")
        return self


# -- agent ----------------------------------------------------------------------


class ResourceList(_Model):
    cpu: str | None = None
    memory: str | None = None

    @field_validator("cpu", "memory", mode="before")
    @classmethod
    def _quantity(cls, value: Any) -> Any:
        # The CRD allows int-or-string quantities (`cpu: 1`); pod specs carry strings.
        return str(value) if isinstance(value, int) and not isinstance(value, bool) else value


class ResourceRequirements(_Model):
    requests: ResourceList | None = None
    limits: ResourceList | None = None


class Toleration(_Model):
    key: Annotated[str, Field(max_length=317)] | None = None
    # Absent means Equal, as in the pod spec.
    operator: TolerationOperator | None = None
    value: Annotated[str, Field(max_length=63)] | None = None
    effect: TaintEffect | None = None
    toleration_seconds: int | None = None


class AgentSpec(_Model):
    """Agent settings; merged across policies because all share one DaemonSet."""

    image: Annotated[str, Field(min_length=1, max_length=512)] | None = None
    resources: ResourceRequirements | None = None
    tolerations: Annotated[list[Toleration], Field(max_length=MAX_TOLERATIONS)] | None = None
    node_selector: Annotated[dict[str, str], Field(max_length=MAX_NODE_SELECTOR)] | None = None
    priority_class_name: Annotated[str, Field(min_length=1, max_length=253)] | None = None


# -- ProbePolicy ----------------------------------------------------------------


class ProbePolicySpec(_Model):
    management_state: ManagementState = ManagementState.MANAGED
    namespace_selector: LabelSelector
    pod_selector: LabelSelector = LabelSelector()
    direction: Direction = Direction.BOTH
    protocols: Annotated[list[Protocol], Field(min_length=1, max_length=MAX_PROTOCOLS)] = list(
        DEFAULT_PROTOCOLS
    )
    ports: Annotated[list[PortRule], Field(max_length=MAX_PORTS)] = []
    sampling_percent: Annotated[int, Field(ge=1, le=100)] = 100
    time_limit: TimeLimit | None = None
    payload: PayloadSpec = PayloadSpec()
    redaction: RedactionSpec = RedactionSpec()
    security: SecuritySpec = SecuritySpec()
    export: ExportSpec | None = None
    agent: AgentSpec | None = None
    anomalies: AnomaliesSpec = AnomaliesSpec()
    isolation: IsolationSpec | None = None
    forensics: ForensicsSpec = ForensicsSpec()

    @model_validator(mode="after")
    def _cross_field(self) -> Self:
        missing = {p.protocol for p in self.ports if p.protocol} - set(self.protocols)
        if missing:
            raise ValueError(
                "every spec.ports[].protocol must also be listed in spec.protocols "
                f"(missing: {', '.join(sorted(missing))})"
            )
        if self.payload.bodies.mode != BodyCaptureMode.NONE and not _BODY_PROTOCOLS & set(
            self.protocols
        ):
            raise ValueError("payload.bodies.mode All needs HTTP, HTTP2 or GRPC in protocols")
        if self.security.waf.mode != WafMode.OFF and Protocol.HTTP not in self.protocols:
            raise ValueError("security.waf.mode DetectionOnly needs HTTP in protocols")
        if (
            self.isolation is not None
            and any(r.type == IsolationRuleType.BLOCK_ON_WAF_MATCH for r in self.isolation.rules)
            and self.security.waf.mode != WafMode.DETECTION_ONLY
        ):
            raise ValueError(
                "isolation rules of type BlockOnWafMatch need security.waf.mode DetectionOnly"
            )
        return self


class NodeNote(_Model):
    node: Annotated[str, Field(max_length=253)]
    type: NodeNoteType
    message: Annotated[str, Field(max_length=1024)]


class AgentStatus(_Model):
    """What one node's agent reports, as shown on a ProbePolicy (status.agents)."""

    node: Annotated[str, Field(max_length=253)]
    ready: bool = False
    interfaces: Annotated[
        list[Annotated[str, Field(max_length=64)]], Field(max_length=MAX_AGENT_INTERFACES)
    ] = []
    # This policy's exported exchanges per second on the node (integer, as
    # the API conventions ask: a rate below 0.5/s shows as 0).
    exchanges_per_second: int = 0
    # Packets the node's capture dropped (all policies: one capture per node).
    capture_drops: int = 0


class ProbePolicyStatus(_Model):
    observed_generation: int | None = None
    conditions: Annotated[list[Condition], Field(max_length=MAX_CONDITIONS)] = []
    nodes_desired: int = 0
    nodes_ready: int = 0
    # "ready/desired" for the Nodes printer column (JSONPath cannot format).
    nodes: Annotated[str, Field(max_length=32)] = "0/0"
    matched_pods: int = 0
    expires_at: datetime.datetime | None = None
    node_notes: Annotated[list[NodeNote], Field(max_length=MAX_NODE_NOTES)] = []
    # Per-node agent reports (the first MAX_AGENT_STATUSES nodes by name) and
    # their totals over every reporting node.
    agents: Annotated[list[AgentStatus], Field(max_length=MAX_AGENT_STATUSES)] = []
    exchanges_per_second: int = 0
    capture_drops: int = 0

    def to_api(self) -> dict[str, Any]:
        """JSON-ready dict as stored under ``.status``."""
        return self.model_dump(mode="json", by_alias=True, exclude_none=True)


class ObjectMeta(BaseModel):
    # Only what the operator reads; the rest (managedFields, ...) is ignored.
    model_config = ConfigDict(alias_generator=to_camel, populate_by_name=True, extra="ignore")

    name: str
    uid: str = ""
    generation: int = 0
    resource_version: str = ""
    creation_timestamp: datetime.datetime | None = None
    deletion_timestamp: datetime.datetime | None = None
    labels: dict[str, str] = {}


class ProbePolicy(BaseModel):
    model_config = ConfigDict(alias_generator=to_camel, populate_by_name=True, extra="ignore")

    api_version: Literal["flowprobe.io/v1alpha1"] = "flowprobe.io/v1alpha1"
    kind: Literal["ProbePolicy"] = "ProbePolicy"
    metadata: ObjectMeta
    spec: ProbePolicySpec
    status: ProbePolicyStatus = ProbePolicyStatus()

    @property
    def name(self) -> str:
        return self.metadata.name

    @property
    def managed(self) -> bool:
        return self.spec.management_state == ManagementState.MANAGED

    def ends_at(self) -> datetime.datetime | None:
        """When capture stops, or None without a time limit."""
        if self.spec.time_limit is None:
            return None
        created = self.metadata.creation_timestamp or datetime.datetime.now(datetime.UTC)
        return self.spec.time_limit.ends_at(created)
