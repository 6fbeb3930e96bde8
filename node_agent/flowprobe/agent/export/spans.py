"""Exchanges as OpenTelemetry spans: names, kinds, attributes, status, events, parents.

Spans are built directly as SDK ``ReadableSpan`` objects rather than through a
``Tracer``: their times are capture times (not "now"), each carries the
resource of the workload it describes (one agent exports for many workloads),
and trace/span ids must be chosen by us so that the caller's CLIENT span, the
callee's SERVER span and downstream calls end up in one trace. docs/export.md
describes the model; :class:`Linker` implements the parent/child rule.
"""

from __future__ import annotations

import bisect
import hashlib
import heapq
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

from opentelemetry.sdk.resources import Resource
from opentelemetry.sdk.trace import Event, ReadableSpan
from opentelemetry.sdk.util.instrumentation import InstrumentationScope
from opentelemetry.trace import SpanContext, SpanKind, TraceFlags
from opentelemetry.trace.status import Status, StatusCode

from flowprobe.agent.export import semconv as sc
from flowprobe.agent.export.naming import (
    RouteTable,
    db_span_name,
    endpoint_name,
    normalize_method,
    rpc_span_name,
)
from flowprobe.agent.export.workloads import Workload, host_port
from flowprobe.agent.sessionize.records import Exchange, Outcome

SCOPE = InstrumentationScope("flowprobe.agent", "0.1.0")
_SAMPLED = TraceFlags(TraceFlags.SAMPLED)
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
_FAILED = frozenset({Outcome.NO_RESPONSE, Outcome.RESET, Outcome.TIMEOUT})
# Query parameters semconv asks to redact in url.query / url.full.
_SENSITIVE_QUERY_KEYS = frozenset({"awsaccesskeyid", "signature", "sig", "x-goog-signature"})

# Parent rules, recorded on the span as flowprobe.parent.rule.
RULE_SAME_EXCHANGE = "same_exchange"
RULE_IN_FLIGHT = "in_flight"


def _hash(salt: bytes, kind: bytes, key: str, size: int) -> int:
    digest = hashlib.blake2b(kind + key.encode(), digest_size=size, key=salt).digest()
    # All-zero ids are invalid in OTLP; a 2^-64 event, but cheap to exclude.
    return int.from_bytes(digest, "big") or 1


@dataclass(slots=True, eq=False)
class Node:
    """One exchange on its way to becoming spans, while its parent is decided."""

    ex: Exchange | None
    seq: int
    key: str
    start_us: int
    end_us: int
    client_address: str
    server_address: str
    client_wl: Workload | None
    server_wl: Workload | None
    client_span_id: int = 0
    server_span_id: int = 0
    can_be_parent: bool = False
    parent: Node | None = None
    children: list[Node] = field(default_factory=list)
    trace_id: int = 0
    held_at: float = 0.0

    @property
    def top_span_id(self) -> int:
        return self.client_span_id or self.server_span_id


class SpanBuilder:
    """Turns a finalised :class:`Node` into its spans (CLIENT and/or SERVER)."""

    def __init__(self, routes: RouteTable | None = None, max_resources: int = 4096) -> None:
        self.routes = routes or RouteTable()
        self._resources: dict[object, Resource] = {}
        self._max_resources = max_resources

    def resource(self, wl: Workload) -> Resource:
        res = self._resources.get(wl.key)
        if res is None:
            if len(self._resources) >= self._max_resources:
                self._resources.clear()
            # Resource() rather than Resource.create(): OTEL_RESOURCE_ATTRIBUTES
            # and the SDK's telemetry.sdk.* describe the agent, not this workload.
            res = Resource({sc.SERVICE_NAME: wl.name, **dict(wl.attributes)})
            self._resources[wl.key] = res
        return res

    def build(self, node: Node) -> list[ReadableSpan]:
        ex = node.ex
        assert ex is not None
        base: dict[str, Any] = {
            k: v for k, v in ex.to_dict().items() if k not in _NOT_ATTRIBUTES and v is not None
        }
        name, kind_attrs = self._describe(ex, base)
        events = [Event(n, timestamp=t * 1000) for t, n in ex.events]
        events += [Event(n, a, t * 1000) for t, n, a in ex.security_events]
        spans: list[ReadableSpan] = []
        trace_id = node.trace_id
        if node.client_span_id:
            assert node.client_wl is not None
            parent = node.parent
            attrs = {**base, **kind_attrs["client"]}
            if parent is not None:
                attrs[sc.FLOWPROBE_LINK] = RULE_IN_FLIGHT
            spans.append(
                self._span(
                    name,
                    SpanKind.CLIENT,
                    trace_id,
                    node.client_span_id,
                    parent.server_span_id if parent is not None else 0,
                    node.client_wl,
                    attrs,
                    events,
                    ex,
                    self._status(ex, attrs, client=True),
                )
            )
        if node.server_span_id:
            assert node.server_wl is not None
            attrs = {**base, **kind_attrs["server"]}
            parent_id = node.client_span_id
            if parent_id:
                attrs[sc.FLOWPROBE_LINK] = RULE_SAME_EXCHANGE
            spans.append(
                self._span(
                    name,
                    SpanKind.SERVER,
                    trace_id,
                    node.server_span_id,
                    parent_id,
                    node.server_wl,
                    attrs,
                    events,
                    ex,
                    self._status(ex, attrs, client=False),
                )
            )
        return spans

    def _span(
        self,
        name: str,
        kind: SpanKind,
        trace_id: int,
        span_id: int,
        parent_id: int,
        wl: Workload,
        attrs: dict[str, Any],
        events: list[Event],
        ex: Exchange,
        status: Status,
    ) -> ReadableSpan:
        parent = SpanContext(trace_id, parent_id, False, _SAMPLED) if parent_id else None
        return ReadableSpan(
            name=name,
            context=SpanContext(trace_id, span_id, False, _SAMPLED),
            parent=parent,
            resource=self.resource(wl),
            attributes=attrs,
            events=events,
            kind=kind,
            status=status,
            # Capture timestamps are microseconds; OTLP wants nanoseconds.
            start_time=ex.start_us * 1000,
            end_time=ex.end_us * 1000,
            instrumentation_scope=SCOPE,
        )

    # -- per protocol -----------------------------------------------------

    def _describe(
        self, ex: Exchange, base: dict[str, Any]
    ) -> tuple[str, dict[str, dict[str, Any]]]:
        """Span name and the attributes that differ between the CLIENT and SERVER span."""
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
        rpc_name = rpc_span_name(dict(attrs)) if proto != "http" else None
        if proto in sc.SERVER_PROTOCOLS and rpc_name is not None:
            base.setdefault(sc.RPC_SYSTEM, "grpc")
            code = grpc_status_code(attrs)
            if code is not None:
                base[sc.RPC_GRPC_STATUS_CODE] = code
            return rpc_name, {"client": client, "server": server}
        if proto in sc.SERVER_PROTOCOLS:
            return self._http(ex, base, client, server)
        if proto in sc.DB_PROTOCOLS:
            base.setdefault(sc.DB_SYSTEM_NAME, proto)
            return db_span_name(dict(attrs), proto), {"client": client, "server": server}
        return endpoint_name(ex, self.routes), {"client": client, "server": server}

    def _http(
        self,
        ex: Exchange,
        base: dict[str, Any],
        client: dict[str, Any],
        server: dict[str, Any],
    ) -> tuple[str, dict[str, dict[str, Any]]]:
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
            # semconv types request headers as string arrays.
            base[sc.HTTP_REQUEST_HEADER_HOST] = [host]
            authority = host
            name, port = split_host(host, ep.server_port)
            for side in (client, server):
                side[sc.SERVER_ADDRESS] = name
                side[sc.SERVER_PORT] = port
        client[sc.URL_FULL] = f"http://{authority}{path}" + (
            f"?{query}" if isinstance(query, str) else ""
        )
        return f"{method} {route}", {"client": client, "server": server}

    # -- status -----------------------------------------------------------

    def _status(self, ex: Exchange, attrs: dict[str, Any], client: bool) -> Status:
        """semconv: a SERVER span fails on 5xx, a CLIENT span on 4xx too; both on no answer."""
        error = ex.error_type
        if ex.outcome in _FAILED:
            error = error or ex.outcome.value
        elif sc.RPC_SYSTEM in attrs and isinstance(attrs.get(sc.RPC_GRPC_STATUS_CODE), int):
            code = int(attrs[sc.RPC_GRPC_STATUS_CODE])
            failed = code != 0 if client else code in sc.GRPC_SERVER_ERROR_CODES
            error = grpc_code_name(code) if failed else None
        elif isinstance(attrs.get(sc.HTTP_RESPONSE_STATUS_CODE), int):
            code = int(attrs[sc.HTTP_RESPONSE_STATUS_CODE])
            error = str(code) if code >= (400 if client else 500) else None
        if error is None:
            attrs.pop(sc.ERROR_TYPE, None)
            return Status(StatusCode.UNSET)
        attrs[sc.ERROR_TYPE] = error
        return Status(StatusCode.ERROR, error)


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

    SCAN_LIMIT = 256

    def __init__(
        self,
        on_final: Callable[[Node], None],
        new_trace_id: Callable[[Node], int],
        window_us: int = 2_000_000,
        max_held: int = 20_000,
        clock: Callable[[], float] = time.monotonic,
        max_parents: int = 100_000,
    ) -> None:
        self.on_final = on_final
        self.new_trace_id = new_trace_id
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
            self._finalize(node, 0)
        else:
            self.held += 1
            node.held_at = self.clock()
            heapq.heappush(self._waiting, (node.end_us + self.window_us, node.seq, node))
        self.release()

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
                    self._finalize(node, 0)
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
        self._finalize(node, 0)

    def _finalize(self, node: Node, trace_id: int) -> None:
        stack = [(node, trace_id)]
        while stack:
            n, tid = stack.pop()
            if n.client_span_id:
                self.held -= 1
            n.trace_id = tid or self.new_trace_id(n)
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
        key = (
            f"{seq}|{ep.transport}|{ep.client_address}|{ep.client_port}|"
            f"{ep.server_address}|{ep.server_port}|{ex.start_us}"
        )
        server_kind = ex.protocol in sc.SERVER_PROTOCOLS
        emit_client = client_wl is not None
        # Database and DNS exchanges are the caller's operation; only when the
        # caller is not observed does the callee's view stand in for it.
        emit_server = server_wl is not None and (server_kind or client_wl is None)
        node = Node(
            ex=ex,
            seq=seq,
            key=key,
            start_us=ex.start_us,
            end_us=ex.end_us,
            client_address=ep.client_address,
            server_address=ep.server_address,
            client_wl=client_wl,
            server_wl=server_wl,
            client_span_id=_hash(self.salt, b"c", key, 8) if emit_client else 0,
            server_span_id=_hash(self.salt, b"s", key, 8) if emit_server else 0,
            can_be_parent=emit_server and server_kind,
        )
        return node

    def trace_id(self, node: Node) -> int:
        return _hash(self.salt, b"t", node.key, 16)
