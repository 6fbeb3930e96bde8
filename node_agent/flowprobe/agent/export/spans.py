"""Exchanges as OpenTelemetry spans, encoded straight to OTLP protobuf.

Spans are not SDK objects: their times are capture times (not "now"), each
carries the resource of the workload it describes (one agent exports for many
workloads), and trace/span ids are chosen here so that the caller's CLIENT
span, the callee's SERVER span and downstream calls end up in one trace. A
finalised exchange becomes :class:`SpanRecord` objects holding the encoded
OTLP ``Span`` message (see ``protobuf.py`` for why it is hand-encoded) and
what the metrics need; :class:`TraceRequestEncoder` groups a batch of them by
resource into an ``ExportTraceServiceRequest``. docs/export.md describes the
model; :class:`Linker` implements the parent/child rule.
"""

from __future__ import annotations

import bisect
import hashlib
import heapq
import struct
import time
from collections.abc import Callable, Iterable, Mapping
from dataclasses import dataclass, field
from typing import Any, ClassVar

from flowprobe.agent.export import protobuf as pb
from flowprobe.agent.export import semconv as sc
from flowprobe.agent.export.naming import (
    RouteTable,
    db_span_name,
    endpoint_name,
    normalize_method,
    rpc_span_name,
)
from flowprobe.agent.export.workloads import Workload, host_port
from flowprobe.agent.sessionize.records import Endpoints, Exchange, Outcome

SCOPE_NAME = "flowprobe.agent"
SCOPE_VERSION = "0.1.0"
# Record bookkeeping that is not a span attribute (times become the span's
# own, events become span events).
_NOT_ATTRIBUTES = frozenset(
    {
        "flowprobe.record",
        "start_time_unix_us",
        "end_time_unix_us",
        "flowprobe.events",
        "flowprobe.security.events",
    }
)
# How span attributes are cached (protobuf.AttributeEncoder): values new on
# most exchanges are encoded alone, a connection's addresses and ports
# together, everything else (method, route, status, ...) as one block.
_ALONE = frozenset(
    {
        sc.URL_PATH,
        sc.URL_QUERY,
        sc.URL_FULL,
        sc.DB_QUERY_TEXT,
        sc.DNS_QUESTION_NAME,
        "flowprobe.duration_us",
        "flowprobe.server_response_time_us",
        "flowprobe.request.bytes",
        "flowprobe.response.bytes",
        "flowprobe.tcp.rtt.mean_us",
        "flowprobe.tcp.rtt.max_us",
        "flowprobe.tcp.handshake.server_us",
        "flowprobe.tcp.handshake.client_us",
    }
)
_CONNECTION = (frozenset({sc.CLIENT_ADDRESS, sc.CLIENT_PORT}),)
_FAILED = frozenset({Outcome.NO_RESPONSE, Outcome.RESET, Outcome.TIMEOUT})
# Query parameters semconv asks to redact in url.query / url.full.
_SENSITIVE_QUERY_KEYS = frozenset({"awsaccesskeyid", "signature", "sig", "x-goog-signature"})

# Parent rules, recorded on the span as flowprobe.parent.rule.
RULE_SAME_EXCHANGE = "same_exchange"
RULE_IN_FLIGHT = "in_flight"

# OTLP field tags (trace.proto, common.proto, resource.proto,
# trace_service.proto): ``number << 3 | wire type``.
_SPAN_ATTRIBUTE = pb.tag(9, 2)
_TRACE_ID = pb.tag(1, 2) + b"\x10"
_SPAN_ID = pb.tag(2, 2) + b"\x08"
_PARENT_ID = pb.tag(4, 2) + b"\x08"
_NAME = pb.tag(5, 2)
_KIND_SERVER = pb.tag(6, 0) + b"\x02"
_KIND_CLIENT = pb.tag(6, 0) + b"\x03"
_TIMES = struct.Struct("<BQBQ")  # start (7) and end (8), fixed64 each
_EVENT = pb.tag(11, 2)
_EVENT_TIME = struct.Struct("<BQ")  # Event.time_unix_nano (1), fixed64
_EVENT_ATTRIBUTE = pb.tag(3, 2)  # Event.attributes
_STATUS = pb.tag(15, 2)
_STATUS_UNSET = _STATUS + b"\x00"  # as the SDK sends it: present and empty
_STATUS_ERROR_CODE = pb.tag(3, 0) + b"\x02"
# SPAN_FLAGS_CONTEXT_HAS_IS_REMOTE_MASK (and not remote): what the SDK sends.
_FLAGS = pb.tag(16, 5) + struct.pack("<I", 0x100)
_SCOPE_SPANS_SPAN = pb.tag(2, 2)
_RESOURCE_SPANS = pb.tag(1, 2)
_ZERO_ID = bytes(8)
_RULE_IN_FLIGHT = pb.key_value(_SPAN_ATTRIBUTE, sc.FLOWPROBE_LINK, RULE_IN_FLIGHT)
_RULE_SAME_EXCHANGE = pb.key_value(_SPAN_ATTRIBUTE, sc.FLOWPROBE_LINK, RULE_SAME_EXCHANGE)


@dataclass(slots=True)
class SpanRecord:
    """One span, encoded, with what the metrics of its exchange need to know about it."""

    client: bool  # a CLIENT span; else SERVER
    workload: Workload
    # The span's attributes are ``own`` over ``shared`` (the exchange's).
    shared: dict[str, Any]
    own: dict[str, Any]
    error: str | None  # error.type; the span's status is ERROR when set
    # The Span message as a ScopeSpans.spans field, ready to be concatenated.
    encoded: bytes

    def attribute(self, key: str) -> Any:
        own = self.own
        return own[key] if key in own else self.shared.get(key)


def _nonzero(span_id: bytes) -> bytes:
    # All-zero ids are invalid in OTLP; a 2^-64 event, but cheap to exclude.
    return span_id if span_id != _ZERO_ID else b"\x00" * 7 + b"\x01"


@dataclass(slots=True, eq=False)
class Node:
    """One exchange on its way to becoming spans, while its parent is decided."""

    ex: Exchange | None
    seq: int
    start_us: int
    end_us: int
    client_address: str
    server_address: str
    client_wl: Workload | None
    server_wl: Workload | None
    client_span_id: bytes = b""
    server_span_id: bytes = b""
    # The trace id this exchange gets if it is a root.
    own_trace_id: bytes = b""
    can_be_parent: bool = False
    parent: Node | None = None
    children: list[Node] = field(default_factory=list)
    trace_id: bytes = b""
    held_at: float = 0.0

    @property
    def top_span_id(self) -> bytes:
        return self.client_span_id or self.server_span_id


class SpanBuilder:
    """Turns a finalised :class:`Node` into its spans (CLIENT and/or SERVER)."""

    def __init__(self, routes: RouteTable | None = None, max_names: int = 8192) -> None:
        self.routes = routes or RouteTable()
        self._shared = pb.AttributeEncoder(_SPAN_ATTRIBUTE, _CONNECTION, _ALONE, _NOT_ATTRIBUTES)
        # A span's own attributes (``_describe``) are its connection's peer
        # and local sockets, encoded once per connection, and what build()
        # and _span() add: url.full, the parent rule, error.type.
        self._sockets: dict[Endpoints, tuple[bytes, bytes]] = {}
        self._url_full = pb.value_encoder(_SPAN_ATTRIBUTE, sc.URL_FULL, max_names)
        self._names: dict[str, bytes] = {}
        self._max_names = max_names

    def build(self, node: Node) -> list[SpanRecord]:
        ex = node.ex
        assert ex is not None
        shared = ex.to_dict()
        # Decided per span, with its status (a 404 fails the CLIENT span only).
        shared.pop(sc.ERROR_TYPE, None)
        name, client, server, sockets = self._describe(ex, shared)
        name_field = self._names.get(name)
        if name_field is None:
            if len(self._names) >= self._max_names:
                self._names.clear()
            name_field = self._names[name] = pb.field(_NAME, name.encode())
        # Everything both spans of the exchange share, encoded once.
        trace = _TRACE_ID + node.trace_id
        middle = _TIMES.pack(0x39, ex.start_us * 1000, 0x41, ex.end_us * 1000) + (
            self._shared.encode(shared)
        )
        events = (
            b"".join(
                pb.field(_EVENT, _EVENT_TIME.pack(0x09, t * 1000) + pb.field(b"\x12", n.encode()))
                for t, n in ex.events
            )
            if ex.events
            else b""
        )
        if ex.security_events:
            # Rule hits and first-seen sensitive data carry their own attributes.
            events += b"".join(
                pb.field(
                    _EVENT,
                    _EVENT_TIME.pack(0x09, t * 1000)
                    + pb.field(b"\x12", n.encode())
                    + pb.attributes(_EVENT_ATTRIBUTE, a.items()),
                )
                for t, n, a in ex.security_events
            )
        spans: list[SpanRecord] = []
        if node.client_span_id:
            assert node.client_wl is not None
            parent = node.parent
            head = trace + _SPAN_ID + node.client_span_id
            # In the order the fields were added: sockets, rule, error, url.full.
            own = sockets[0]
            if parent is not None:
                client[sc.FLOWPROBE_LINK] = RULE_IN_FLIGHT
                head += _PARENT_ID + parent.server_span_id
                own += _RULE_IN_FLIGHT
            url_full = client.get(sc.URL_FULL)
            spans.append(
                self._span(
                    True,
                    node.client_wl,
                    head + name_field + _KIND_CLIENT,
                    middle,
                    shared,
                    client,
                    own,
                    self._url_full(url_full) + events if url_full is not None else events,
                    error_of(ex, shared, client=True),
                )
            )
        if node.server_span_id:
            assert node.server_wl is not None
            head = trace + _SPAN_ID + node.server_span_id
            own = sockets[1]
            if node.client_span_id:
                server[sc.FLOWPROBE_LINK] = RULE_SAME_EXCHANGE
                head += _PARENT_ID + node.client_span_id
                own += _RULE_SAME_EXCHANGE
            spans.append(
                self._span(
                    False,
                    node.server_wl,
                    head + name_field + _KIND_SERVER,
                    middle,
                    shared,
                    server,
                    own,
                    events,
                    error_of(ex, shared, client=False),
                )
            )
        return spans

    def _span(
        self,
        client: bool,
        wl: Workload,
        head: bytes,
        middle: bytes,
        shared: dict[str, Any],
        own: dict[str, Any],
        own_encoded: bytes,
        tail: bytes,
        error: str | None,
    ) -> SpanRecord:
        """One span: fields in field-number order, as protobuf writers emit them.

        ``own_encoded`` is ``own`` but for error.type, added here; ``tail``
        what follows it (url.full, the events).
        """
        if error is not None:
            own[sc.ERROR_TYPE] = error
            own_encoded += pb.key_value(_SPAN_ATTRIBUTE, sc.ERROR_TYPE, error)
        body = b"".join((head, middle, own_encoded, tail, _status(error), _FLAGS))
        return SpanRecord(client, wl, shared, own, error, pb.field(_SCOPE_SPANS_SPAN, body))

    # -- per protocol -----------------------------------------------------

    def _describe(
        self, ex: Exchange, base: dict[str, Any]
    ) -> tuple[str, dict[str, Any], dict[str, Any], tuple[bytes, bytes]]:
        """Span name, the attributes that differ between the CLIENT and SERVER span,
        and their socket attributes encoded (the same for the whole connection)."""
        proto = ex.protocol
        attrs = ex.attrs
        ep = ex.endpoints
        client: dict[str, Any] = {
            sc.NETWORK_PEER_ADDRESS: ep.server_address,
            sc.NETWORK_PEER_PORT: ep.server_port,
        }
        server: dict[str, Any] = {
            sc.NETWORK_PEER_ADDRESS: ep.client_address,
            sc.NETWORK_PEER_PORT: ep.client_port,
            sc.NETWORK_LOCAL_ADDRESS: ep.server_address,
            sc.NETWORK_LOCAL_PORT: ep.server_port,
        }
        sockets = self._sockets.get(ep)
        if sockets is None:
            if len(self._sockets) >= self._max_names:
                self._sockets.clear()
            sockets = self._sockets[ep] = (
                pb.attributes(_SPAN_ATTRIBUTE, client.items()),
                pb.attributes(_SPAN_ATTRIBUTE, server.items()),
            )
        rpc_name = rpc_span_name(attrs) if proto != "http" else None
        if proto in sc.SERVER_PROTOCOLS and rpc_name is not None:
            base.setdefault(sc.RPC_SYSTEM, "grpc")
            code = grpc_status_code(attrs)
            if code is not None:
                base[sc.RPC_GRPC_STATUS_CODE] = code
            return rpc_name, client, server, sockets
        if proto in sc.SERVER_PROTOCOLS:
            return self._http(ex, base, client), client, server, sockets
        if proto in sc.DB_PROTOCOLS:
            base.setdefault(sc.DB_SYSTEM_NAME, proto)
            return db_span_name(attrs, proto), client, server, sockets
        return endpoint_name(ex, self.routes), client, server, sockets

    def _http(self, ex: Exchange, base: dict[str, Any], client: dict[str, Any]) -> str:
        """The span name; the HTTP attributes into ``base``, url.full into ``client``."""
        a = ex.attrs
        ep = ex.endpoints
        method, original = normalize_method(str(a.get(sc.HTTP_REQUEST_METHOD, "")))
        path = str(a.get(sc.URL_PATH, ""))
        route, source = self.routes.route(path)
        base[sc.HTTP_REQUEST_METHOD] = method
        if original is not None:
            base[sc.HTTP_REQUEST_METHOD_ORIGINAL] = original
        base[sc.HTTP_ROUTE] = route
        base[sc.FLOWPROBE_ROUTE_SOURCE] = source
        base[sc.URL_SCHEME] = "http"
        base[sc.NETWORK_PROTOCOL_NAME] = "http"
        query = a.get(sc.URL_QUERY)
        if isinstance(query, str):
            query = redact_query(query)
            base[sc.URL_QUERY] = query
        host = a.get(sc.HTTP_REQUEST_HEADER_HOST)
        authority = host_port(ep.server_address, ep.server_port)
        if isinstance(host, str) and host:
            # semconv types request headers as string arrays (a tuple: hashable,
            # so the encoder can cache it).
            base[sc.HTTP_REQUEST_HEADER_HOST] = (host,)
            authority = host
            base[sc.SERVER_ADDRESS], base[sc.SERVER_PORT] = split_host(host, ep.server_port)
        client[sc.URL_FULL] = f"http://{authority}{path}" + (
            f"?{query}" if isinstance(query, str) else ""
        )
        return f"{method} {route}"


def error_of(ex: Exchange, attrs: Mapping[str, Any], client: bool) -> str | None:
    """error.type, or None when the exchange's client (server) span failed.

    semconv: a SERVER span fails on 5xx, a CLIENT span on 4xx too; both on no answer.
    """
    error = ex.error_type
    if ex.outcome in _FAILED:
        return error or ex.outcome.value
    if sc.RPC_SYSTEM in attrs and isinstance(attrs.get(sc.RPC_GRPC_STATUS_CODE), int):
        code = int(attrs[sc.RPC_GRPC_STATUS_CODE])
        failed = code != 0 if client else code in sc.GRPC_SERVER_ERROR_CODES
        return grpc_code_name(code) if failed else None
    if isinstance(attrs.get(sc.HTTP_RESPONSE_STATUS_CODE), int):
        code = int(attrs[sc.HTTP_RESPONSE_STATUS_CODE])
        return str(code) if code >= (400 if client else 500) else None
    return error


def _status(error: str | None) -> bytes:
    """The Status field: ERROR with error.type as its message, else UNSET."""
    if error is None:
        return _STATUS_UNSET
    return pb.field(_STATUS, pb.field(b"\x12", error.encode()) + _STATUS_ERROR_CODE)


class TraceRequestEncoder:
    """Batches of encoded spans (``(workload, SpanRecord.encoded)``) as one
    ``ExportTraceServiceRequest``, grouped by resource.

    A workload's Resource and the agent's InstrumentationScope are encoded
    once and kept (``max_resources`` at most, then the cache starts over).
    """

    def __init__(self, max_resources: int = 4096) -> None:
        self._heads: dict[object, bytes] = {}
        self._max = max_resources
        scope = pb.field(b"\x0a", SCOPE_NAME.encode()) + pb.field(b"\x12", SCOPE_VERSION.encode())
        self._scope = pb.field(b"\x0a", scope)

    def _head(self, wl: Workload) -> bytes:
        """ResourceSpans.resource, the Resource of ``wl``."""
        head = self._heads.get(wl.key)
        if head is None:
            if len(self._heads) >= self._max:
                self._heads.clear()
            resource = pb.attributes(b"\x0a", resource_attributes(wl).items())
            head = self._heads[wl.key] = pb.field(b"\x0a", resource)
        return head

    def encode(self, spans: Iterable[tuple[Workload, bytes]]) -> bytes:
        by_resource: dict[Workload, list[bytes]] = {}
        for wl, span in spans:
            group = by_resource.get(wl)
            if group is None:
                group = by_resource[wl] = []
            group.append(span)
        return b"".join(
            pb.field(
                _RESOURCE_SPANS,
                self._head(wl) + pb.field(b"\x12", self._scope + b"".join(encoded)),
            )
            for wl, encoded in by_resource.items()
        )


def resource_attributes(wl: Workload) -> dict[str, Any]:
    """A workload's resource: ``service.name`` and whatever its resolver added (``k8s.*``).

    Not ``Resource.create()``'s: OTEL_RESOURCE_ATTRIBUTES and the SDK's
    telemetry.sdk.* describe the agent, not this workload.
    """
    return {sc.SERVICE_NAME: wl.name, **dict(wl.attributes)}


def grpc_status_code(attrs: dict[str, Any]) -> int | None:
    code = attrs.get(sc.RPC_GRPC_STATUS_CODE)
    if isinstance(code, int):
        return code
    if isinstance(code, str) and code.isdigit():
        return int(code)
    named = attrs.get(sc.RPC_RESPONSE_STATUS_CODE)
    if isinstance(named, str) and named in sc.GRPC_CODE_NAMES:
        return sc.GRPC_CODE_NAMES.index(named)
    return None


def grpc_code_name(code: int) -> str:
    return sc.GRPC_CODE_NAMES[code] if 0 <= code < len(sc.GRPC_CODE_NAMES) else str(code)


def split_host(host: str, default_port: int) -> tuple[str, int]:
    """``api:8080`` -> (api, 8080); ``[::1]:80`` -> (::1, 80); ``api`` -> (api, default)."""
    if host.startswith("["):
        name, _, rest = host[1:].partition("]")
        port_s = rest.removeprefix(":")
    else:
        name, sep, port_s = host.rpartition(":")
        if not sep or ":" in name:
            return host, default_port
    return name, int(port_s) if port_s.isdigit() else default_port


def redact_query(query: str) -> str:
    if not query:
        return query
    parts = []
    for part in query.split("&"):
        k, sep, _v = part.partition("=")
        parts.append(f"{k}=REDACTED" if sep and k.lower() in _SENSITIVE_QUERY_KEYS else part)
    return "&".join(parts)


class Linker:
    """Decides each exchange's parent and hands finalised nodes on, in a bounded memory.

    The rule (docs/export.md): an exchange X whose caller is an observed
    workload is a child of exchange P when P is an HTTP/gRPC request served
    at X's client address, P started before X and ended after X, and P is the
    only such exchange. X's CLIENT span then has P's SERVER span as parent.

    Exchanges are reported when they end, children before their parents, so a
    possible child waits until capture time is ``window_us`` past its end (or,
    when capture is idle, that much wall time); a parent that ends later than
    that is not linked. A child waits for its parent's trace id, which is
    only known once the parent's own parent is decided.

    Costs are bounded: at most ``max_held`` exchanges wait (beyond that the
    oldest is decided early, counted as ``forced``); candidate parents are
    kept per address sorted by start and forgotten once no waiting exchange
    can match them, ``max_parents`` in all; a decision looks at no more than
    ``SCAN_LIMIT`` requests that started before the call, and when that is
    not enough to prove the parent unique the call is left unlinked.
    """

    SCAN_LIMIT: ClassVar[int] = 256

    def __init__(
        self,
        on_final: Callable[[Node], None],
        window_us: int = 2_000_000,
        max_held: int = 20_000,
        clock: Callable[[], float] = time.monotonic,
        max_parents: int = 100_000,
    ) -> None:
        self.on_final = on_final
        self.window_us = window_us
        self.max_held = max_held
        self.clock = clock
        self.now_us = 0
        self.held = 0
        self._waiting: list[tuple[int, int, Node]] = []
        self.max_parents = max_parents
        # Per server address, sorted by start time.
        self._parents: dict[str, list[Node]] = {}
        # Per server address, the longest request held: a request that started
        # more than that before a call ended cannot outlast the call, which
        # proves uniqueness without scanning every older request.
        self._longest: dict[str, int] = {}
        self._n_parents = 0
        self._prune_at = 1024
        self.counts: dict[str, int] = {
            "linked": 0,
            "root": 0,
            "ambiguous": 0,
            "scan_limit": 0,
            "forced": 0,
            "parents_dropped": 0,
        }

    def add(self, node: Node) -> None:
        if node.end_us > self.now_us:
            self.now_us = node.end_us
            # Whatever's window closed before this exchange ended is decided
            # without it: the outcome must not depend on whether some other
            # exchange happened to advance the clock first.
            self.release()
        if node.can_be_parent:
            # Parents arrive in end order, so the insertion point is usually
            # near the tail.
            addr = node.server_address
            bisect.insort(self._parents.setdefault(addr, []), node, key=_start)
            self._n_parents += 1
            duration = node.end_us - node.start_us
            if duration > self._longest.get(addr, -1):
                self._longest[addr] = duration
        if not node.client_span_id:
            # No caller span: nothing to hang under a parent.
            self._finalize(node, b"")
        else:
            self.held += 1
            node.held_at = self.clock()
            heapq.heappush(self._waiting, (node.end_us + self.window_us, node.seq, node))
        waiting = self._waiting
        # The release above left nothing due; only this node can be (it ended
        # more than a window before the latest end seen), or the held limit.
        if waiting and (waiting[0][0] < self.now_us or self.held > self.max_held):
            self.release()
        else:
            self._prune()

    def release(self, idle: bool = False) -> None:
        """Decide every waiting node whose window has passed (in capture or, if idle, wall time)."""
        waiting = self._waiting
        now = self.now_us
        wall_limit = self.clock() - self.window_us / 1e6
        while waiting and (
            waiting[0][0] < now
            or (idle and waiting[0][2].held_at <= wall_limit)
            or self.held > self.max_held
        ):
            _, _, node = heapq.heappop(waiting)
            if self.held > self.max_held:
                self.counts["forced"] += 1
            self._decide(node)
        self._prune()

    def flush(self) -> None:
        """End of input: decide everything still waiting."""
        while self._waiting:
            self._decide(heapq.heappop(self._waiting)[2])
        self._parents.clear()
        self._longest.clear()
        self._n_parents = 0

    def _decide(self, node: Node) -> None:
        found: list[Node] = []
        lst = self._parents.get(node.client_address)
        if lst:
            # Requests that started before the call, the most recent first;
            # from one that started before `reach` on, none can end after the
            # call (they are no longer than the longest), so the scan stops.
            reach = node.end_us - self._longest[node.client_address]
            i = bisect.bisect_left(lst, node.start_us, key=_start)
            for j in range(i - 1, max(-1, i - 1 - self.SCAN_LIMIT), -1):
                p = lst[j]
                if p.start_us < reach:
                    break
                if p.end_us > node.end_us:
                    found.append(p)
                    if len(found) == 2:
                        break
            else:
                if i > self.SCAN_LIMIT and len(found) == 1:
                    # Another candidate may lie further back: not provably unique.
                    self.counts["scan_limit"] += 1
                    self._finalize(node, b"")
                    return
        if len(found) == 1:
            parent = found[0]
            self.counts["linked"] += 1
            node.parent = parent
            # The rule's premise is that the caller is the workload serving
            # the parent request; name it so (in address mode the client
            # name would otherwise lack the port).
            node.client_wl = parent.server_wl or node.client_wl
            if parent.trace_id:
                self._finalize(node, parent.trace_id)
            else:
                parent.children.append(node)
            return
        self.counts["ambiguous" if found else "root"] += 1
        self._finalize(node, b"")

    def _finalize(self, node: Node, trace_id: bytes) -> None:
        stack = [(node, trace_id)]
        while stack:
            n, tid = stack.pop()
            if n.client_span_id:
                self.held -= 1
            n.trace_id = tid or n.own_trace_id
            self.on_final(n)
            # Only the interval and ids are needed from now on (as a
            # candidate parent); drop the record itself.
            n.ex = None
            stack.extend((c, n.trace_id) for c in n.children)
            n.children = []

    def _prune(self) -> None:
        """Forget candidate parents no waiting exchange can match; amortised O(1) per add."""
        if self._n_parents <= self._prune_at:
            return
        # A waiting exchange X can only match parents that end after X; one
        # deciding later ends after now - window.
        oldest_waiting = self._waiting[0][2].end_us if self._waiting else self.now_us
        limit = min(oldest_waiting, self.now_us - self.window_us)
        kept: dict[str, list[Node]] = {}
        n = 0
        for addr, lst in self._parents.items():
            alive = [p for p in lst if p.end_us >= limit]
            if alive:
                kept[addr] = alive
                n += len(alive)
        if n > self.max_parents:
            # Capture time stood still or traffic outran the window: keep
            # the parents that ended last.
            ends = sorted((p.end_us for lst in kept.values() for p in lst), reverse=True)
            cut = ends[self.max_parents // 2]
            self.counts["parents_dropped"] += n
            kept = {a: [p for p in lst if p.end_us > cut] for a, lst in kept.items()}
            kept = {a: lst for a, lst in kept.items() if lst}
            n = sum(len(lst) for lst in kept.values())
            self.counts["parents_dropped"] -= n
        self._parents = kept
        # Recomputed from what is left, so one slow request long gone does not
        # keep every later scan long.
        self._longest = {a: max(p.end_us - p.start_us for p in lst) for a, lst in kept.items()}
        self._n_parents = n
        self._prune_at = max(1024, 2 * n)


def _start(node: Node) -> int:
    return node.start_us


class NodeFactory:
    """Builds nodes with deterministic ids: the same input and salt give the same trace."""

    def __init__(self, salt: bytes) -> None:
        # blake2b keys are at most 64 bytes.
        self.salt = hashlib.blake2b(salt).digest()
        self._seq = 0

    def node(
        self,
        ex: Exchange,
        client_wl: Workload | None,
        server_wl: Workload | None,
    ) -> Node:
        self._seq += 1
        seq = self._seq
        ep = ex.endpoints
        # One hash gives all three ids: the CLIENT and SERVER span ids and the
        # trace id used if the exchange turns out to be a root. The sequence
        # number makes them unique within the process, the salt across processes.
        ids = hashlib.blake2b(seq.to_bytes(8, "big"), digest_size=32, key=self.salt).digest()
        server_kind = ex.protocol in sc.SERVER_PROTOCOLS
        emit_client = client_wl is not None
        # Database and DNS exchanges are the caller's operation; only when the
        # caller is not observed does the callee's view stand in for it.
        emit_server = server_wl is not None and (server_kind or client_wl is None)
        return Node(
            ex=ex,
            seq=seq,
            start_us=ex.start_us,
            end_us=ex.end_us,
            client_address=ep.client_address,
            server_address=ep.server_address,
            client_wl=client_wl,
            server_wl=server_wl,
            client_span_id=_nonzero(ids[:8]) if emit_client else b"",
            server_span_id=_nonzero(ids[8:16]) if emit_server else b"",
            # 16 bytes of a keyed hash are never all zero in practice (2^-128).
            own_trace_id=ids[16:],
            can_be_parent=emit_server and server_kind,
        )
