"""OpenTelemetry semantic-convention names, units and advised buckets the exporter uses.

Kept as plain constants rather than imported from ``opentelemetry-semantic-conventions``:
most of these live in its ``_incubating`` modules, which are renamed between releases,
and a rename there must not silently change what flowprobe emits. A unit test checks
these against the installed package so a real divergence is noticed.
"""

from __future__ import annotations

from typing import Final

# -- attributes -------------------------------------------------------------

SERVICE_NAME: Final = "service.name"
SERVICE_INSTANCE_ID: Final = "service.instance.id"
TELEMETRY_SDK_NAME: Final = "telemetry.sdk.name"

HTTP_REQUEST_METHOD: Final = "http.request.method"
HTTP_REQUEST_METHOD_ORIGINAL: Final = "http.request.method_original"
HTTP_RESPONSE_STATUS_CODE: Final = "http.response.status_code"
HTTP_ROUTE: Final = "http.route"
HTTP_REQUEST_HEADER_HOST: Final = "http.request.header.host"
URL_PATH: Final = "url.path"
URL_QUERY: Final = "url.query"
URL_SCHEME: Final = "url.scheme"
URL_FULL: Final = "url.full"
URL_TEMPLATE: Final = "url.template"
ERROR_TYPE: Final = "error.type"
SERVER_ADDRESS: Final = "server.address"
SERVER_PORT: Final = "server.port"
CLIENT_ADDRESS: Final = "client.address"
CLIENT_PORT: Final = "client.port"
NETWORK_PEER_ADDRESS: Final = "network.peer.address"
NETWORK_PEER_PORT: Final = "network.peer.port"
NETWORK_LOCAL_ADDRESS: Final = "network.local.address"
NETWORK_LOCAL_PORT: Final = "network.local.port"
NETWORK_TRANSPORT: Final = "network.transport"
NETWORK_PROTOCOL_NAME: Final = "network.protocol.name"
NETWORK_PROTOCOL_VERSION: Final = "network.protocol.version"

RPC_SYSTEM: Final = "rpc.system"
RPC_SYSTEM_NAME: Final = "rpc.system.name"
RPC_SERVICE: Final = "rpc.service"
RPC_METHOD: Final = "rpc.method"
RPC_GRPC_STATUS_CODE: Final = "rpc.grpc.status_code"
RPC_RESPONSE_STATUS_CODE: Final = "rpc.response.status_code"

DB_SYSTEM_NAME: Final = "db.system.name"
DB_OPERATION_NAME: Final = "db.operation.name"
DB_COLLECTION_NAME: Final = "db.collection.name"
DB_NAMESPACE: Final = "db.namespace"
DB_QUERY_TEXT: Final = "db.query.text"
DB_QUERY_SUMMARY: Final = "db.query.summary"
DB_RESPONSE_STATUS_CODE: Final = "db.response.status_code"

DNS_QUESTION_NAME: Final = "dns.question.name"
# No semconv attribute exists for these yet; the DNS parser's names are used.
DNS_QUESTION_TYPE: Final = "flowprobe.dns.question.type"
DNS_RCODE: Final = "flowprobe.dns.response_code"

# flowprobe's own span attributes beyond what the exchange record carries.
FLOWPROBE_ROUTE_SOURCE: Final = "flowprobe.http.route.source"
FLOWPROBE_LINK: Final = "flowprobe.parent.rule"

# -- metrics ----------------------------------------------------------------

HTTP_SERVER_REQUEST_DURATION: Final = "http.server.request.duration"
HTTP_CLIENT_REQUEST_DURATION: Final = "http.client.request.duration"
# rpc.server.duration (ms) is deprecated in favour of these (s); see docs/export.md.
RPC_SERVER_CALL_DURATION: Final = "rpc.server.call.duration"
RPC_CLIENT_CALL_DURATION: Final = "rpc.client.call.duration"
DB_CLIENT_OPERATION_DURATION: Final = "db.client.operation.duration"
DNS_LOOKUP_DURATION: Final = "dns.lookup.duration"

# Advised explicit bucket boundaries, in seconds.
HTTP_DURATION_BUCKETS: Final = (
    0.005, 0.01, 0.025, 0.05, 0.075, 0.1, 0.25, 0.5, 0.75, 1.0, 2.5, 5.0, 7.5, 10.0,
)  # fmt: skip
RPC_DURATION_BUCKETS: Final = HTTP_DURATION_BUCKETS
DB_DURATION_BUCKETS: Final = (0.001, 0.005, 0.01, 0.05, 0.1, 0.5, 1.0, 5.0, 10.0)
DNS_DURATION_BUCKETS: Final = HTTP_DURATION_BUCKETS
# Round-trip times on a cluster network are tens of microseconds to a few
# milliseconds; the HTTP buckets would put them all in the first one.
RTT_BUCKETS: Final = (
    0.00005, 0.0001, 0.00025, 0.0005, 0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0,
)  # fmt: skip

# -- value sets -------------------------------------------------------------

# The methods semconv knows; anything else is reported as _OTHER so a client
# sending random verbs cannot blow up the span-name and metric cardinality.
HTTP_METHODS: Final = frozenset(
    {"CONNECT", "DELETE", "GET", "HEAD", "OPTIONS", "PATCH", "POST", "PUT", "TRACE", "QUERY"}
)
HTTP_METHOD_OTHER: Final = "_OTHER"

# gRPC codes that mark a SERVER span as failed (semconv rpc/grpc); on the
# client side every non-OK code does.
GRPC_SERVER_ERROR_CODES: Final = frozenset({2, 4, 12, 13, 14, 15})
GRPC_CODE_NAMES: Final = (
    "OK", "CANCELLED", "UNKNOWN", "INVALID_ARGUMENT", "DEADLINE_EXCEEDED", "NOT_FOUND",
    "ALREADY_EXISTS", "PERMISSION_DENIED", "RESOURCE_EXHAUSTED", "FAILED_PRECONDITION",
    "ABORTED", "OUT_OF_RANGE", "UNIMPLEMENTED", "INTERNAL", "UNAVAILABLE", "DATA_LOSS",
    "UNAUTHENTICATED",
)  # fmt: skip

# Protocols whose callee is a service we can name: a SERVER span, plus the
# caller's CLIENT span when the caller is an observed workload too.
SERVER_PROTOCOLS: Final = frozenset({"http", "http2", "grpc"})
DB_PROTOCOLS: Final = frozenset({"postgresql", "mysql", "redis"})
