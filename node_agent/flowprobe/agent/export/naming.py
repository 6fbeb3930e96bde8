"""Low-cardinality names for exchanges: routes from raw paths, operations from queries.

Captured traffic carries no framework route, so path segments that look like
identifiers (numbers, UUIDs, hashes, long tokens) become placeholders, as Beyla
does; the span name and every metric attribute use the result, never the raw path.
"""

from __future__ import annotations

import re

from flowprobe.agent.sessionize.records import Exchange

_ID_SEGMENT = re.compile(
    r"""^(?:
        \d+                                             # numbers
      | [0-9a-fA-F]{8}-[0-9a-fA-F]{4}-[0-9a-fA-F]{4}-[0-9a-fA-F]{4}-[0-9a-fA-F]{12}  # UUID
      | [0-9a-fA-F]{16,}                                # hashes, hex ids
      | (?=[A-Za-z0-9_-]*\d)[A-Za-z0-9_-]{20,}          # long tokens with digits
    )$""",
    re.VERBOSE,
)


def route_from_path(path: str) -> str:
    if not path:
        return "/"
    segments = path.split("/")
    return "/".join("{id}" if seg and _ID_SEGMENT.match(seg) else seg for seg in segments)


def endpoint_name(ex: Exchange) -> str:
    a = ex.attrs
    proto = ex.protocol
    if proto == "http":
        method = str(a.get("http.request.method", "_OTHER"))
        return f"{method} {route_from_path(str(a.get('url.path', '')))}"
    if proto in ("grpc", "http2"):
        if "rpc.method" in a:
            return f"{a.get('rpc.service', '')}/{a['rpc.method']}"
        return f"{a.get('http.request.method', '_OTHER')} {route_from_path(str(a.get('url.path', '')))}"
    if proto == "dns":
        return f"{a.get('flowprobe.dns.question.type', '?')} lookup"
    if "db.operation.name" in a:
        coll = a.get("db.collection.name")
        return f"{a['db.operation.name']} {coll}" if coll else str(a["db.operation.name"])
    return proto
