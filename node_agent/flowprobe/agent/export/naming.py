"""Low-cardinality names for exchanges: routes from raw paths, operations from queries.

Captured traffic carries no framework route, so a route is derived: first from
the configured patterns (``/users/{id}/orders``), else by the heuristic that
turns path segments looking like identifiers (numbers, UUIDs, hashes, long
tokens) into ``{id}``, as Beyla does. Span names and every metric attribute use
the result, never the raw path.
"""

from __future__ import annotations

import re
from collections.abc import Iterable, Mapping

from flowprobe.agent.export import semconv as sc
from flowprobe.agent.sessionize.records import Exchange

# A path segment that looks like an identifier, as a whole segment: preceded
# by "/" or the start, followed by "/" or the end. One substitution over the
# path, rather than a match per segment, since it runs for every request.
_ID_SEGMENTS = re.compile(
    r"""(?<![^/])(?:
        \d+                                             # numbers
      | [0-9a-fA-F]{8}-[0-9a-fA-F]{4}-[0-9a-fA-F]{4}-[0-9a-fA-F]{4}-[0-9a-fA-F]{12}  # UUID
      | [0-9a-fA-F]{16,}                                # hashes, hex ids
      | (?=[A-Za-z0-9_-]*\d)[A-Za-z0-9_-]{20,}          # long tokens with digits
    )(?=/|\Z)""",
    re.VERBOSE,
)
_PLACEHOLDER = re.compile(r"^\{[A-Za-z_][A-Za-z0-9_.-]*\}$")


def route_from_path(path: str) -> str:
    return _ID_SEGMENTS.sub("{id}", path) if path else "/"


def _compile_pattern(pattern: str) -> re.Pattern[str]:
    """``/a/{x}/b`` matches exactly one segment per ``{x}``; a final ``*`` matches the rest."""
    if not pattern.startswith("/"):
        raise ValueError(f"route pattern must start with '/': {pattern!r}")
    parts = pattern.split("/")[1:]
    out: list[str] = []
    for n, seg in enumerate(parts):
        if seg == "*" and n == len(parts) - 1:
            out.append("/.+")
        elif _PLACEHOLDER.match(seg):
            out.append("/[^/]+")
        elif "{" in seg or "}" in seg or "*" in seg:
            raise ValueError(
                f"route pattern {pattern!r}: a segment is either literal, {{name}} or a final *"
            )
        else:
            out.append("/" + re.escape(seg))
    return re.compile("".join(out) + r"/?\Z")


class RouteTable:
    """Configured route patterns, tried in order, then the identifier heuristic."""

    def __init__(self, patterns: Iterable[str] = ()) -> None:
        self.patterns = [(p, _compile_pattern(p)) for p in patterns]

    def route(self, path: str) -> tuple[str, str]:
        """The route of ``path`` and where it came from: ``pattern`` or ``heuristic``."""
        for pattern, rx in self.patterns:
            if rx.match(path):
                return pattern, "pattern"
        return route_from_path(path), "heuristic"


_DEFAULT_ROUTES = RouteTable()


def normalize_method(method: str) -> tuple[str, str | None]:
    """The semconv method (``_OTHER`` when unknown) and the original when it differs."""
    if method in sc.HTTP_METHODS:
        return method, None
    return sc.HTTP_METHOD_OTHER, method or None


def db_span_name(attrs: Mapping[str, object], protocol: str) -> str:
    """``{db.operation.name} {db.collection.name}``, the operation alone, or the system."""
    op = attrs.get(sc.DB_OPERATION_NAME)
    if op:
        coll = attrs.get(sc.DB_COLLECTION_NAME)
        return f"{op} {coll}" if coll else str(op)
    summary = attrs.get(sc.DB_QUERY_SUMMARY)
    if summary:
        return str(summary)
    return str(attrs.get(sc.DB_SYSTEM_NAME) or protocol)


def rpc_span_name(attrs: Mapping[str, object]) -> str | None:
    """``{service}/{method}``; newer parsers may already put both in rpc.method."""
    method = attrs.get(sc.RPC_METHOD)
    if not method:
        return None
    service = attrs.get(sc.RPC_SERVICE)
    return f"{service}/{method}" if service else str(method)


def endpoint_name(ex: Exchange, routes: RouteTable | None = None) -> str:
    a = ex.attrs
    proto = ex.protocol
    table = routes or _DEFAULT_ROUTES
    if proto in ("http", "http2", "grpc"):
        rpc = rpc_span_name(a) if proto != "http" else None
        if rpc is not None:
            return rpc
        method, _ = normalize_method(str(a.get(sc.HTTP_REQUEST_METHOD, "")))
        return f"{method} {table.route(str(a.get(sc.URL_PATH, '')))[0]}"
    if proto == "dns":
        return f"{a.get(sc.DNS_QUESTION_TYPE, '?')} lookup"
    if sc.DB_OPERATION_NAME in a or proto in sc.DB_PROTOCOLS:
        return db_span_name(a, proto)
    return proto
