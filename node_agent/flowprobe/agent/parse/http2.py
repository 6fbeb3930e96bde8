"""HTTP/2 (cleartext, prior knowledge) and gRPC from tshark's ``http2`` dissector.

One exchange per stream: the client's HEADERS (``:method``, ``:path``) is the
request, keyed by stream id; the server's HEADERS with ``:status`` opens the
response (a final piece when it carries END_STREAM, as in gRPC's
"trailers-only" replies), DATA frames extend it, and the piece with END_STREAM
(DATA, or the trailers HEADERS carrying ``grpc-status``) closes it. A server
RST_STREAM closes an unfinished stream as an error. Records of streams whose
request has ``content-type: application/grpc*`` are ``grpc`` (``rpc.*``
attributes, outcome error when ``grpc-status`` != 0), the others ``http2``.

tshark prints one row per TCP segment, and a segment carries any number of
frames of any streams. Per-frame fields (stream id, type, flags, length) come
as comma-joined occurrences in frame order; headers come as one flat list of
names and values, which ``http2.header.count`` (one occurrence per header-block
frame that decoded at least one header) cuts back into blocks. Header values
contain commas (``grpc-accept-encoding: identity, deflate, gzip``), so they are
cut by ``http2.header.value.length`` rather than split on commas.

tshark cuts every custom column at 2047 bytes. A segment with a dozen gRPC
requests (about 175 bytes of header values each) overflows the value column;
requests past the cut take method, path, authority and content type from the
short per-header fields (``http2.headers.path`` ...), and anything still
unknown is flagged ``flowprobe.http2.headers_incomplete``.

tshark decodes HPACK with per-connection state: a capture that starts in the
middle of a connection (or a tshark session reset) shows ``<unknown>`` for
headers taken from the dynamic table. Such exchanges still pair, flagged too.

A segment with only connection-level frames (SETTINGS, PING, WINDOW_UPDATE,
GOAWAY) yields a control message, so a side's next message starts after it.
A client's RST_STREAM (a cancelled call, an expired deadline) cannot end an
exchange, since only the server's side does: unless the server still answers,
the exchange ends by timeout or with the connection. A request is reported at
its HEADERS: body segments that follow count in ``http.request.body.size`` but
not in the record's request bytes and packets, and a long upload shows in the
server response time.

Attributes: ``http.request.method``, ``url.path``, ``url.query``,
``http.request.header.host`` (from ``:authority``), ``http.response.status_code``,
``network.protocol.name`` "http", ``network.protocol.version`` "2",
``http.request.body.size`` / ``http.response.body.size`` (DATA frame payload bytes),
``flowprobe.http2.stream_id``, ``flowprobe.http2.rst_stream.error``; gRPC adds
``rpc.system``, ``rpc.service``, ``rpc.method``, ``rpc.grpc.status_code``.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass, field

from flowprobe.agent.capture.columns import ColumnLayout
from flowprobe.agent.parse.base import column_cut, occurrences, split_occurrences
from flowprobe.agent.parse.messages import AttrValue, L7Message

FIELDS = (
    "http2.streamid",
    "http2.type",
    "http2.flags",
    "http2.length",
    "http2.header.count",
    "http2.header.name",
    "http2.header.value",
    "http2.header.value.length",
    "http2.header_table_size_update.header_table_size",
    "http2.rst_stream.error",
)

# Custom columns print the type's name, ``-T fields`` its number: accept both.
DATA, HEADERS, RST_STREAM, PUSH_PROMISE, CONTINUATION = 0, 1, 3, 5, 9
_TYPE_NAMES = {
    "DATA": DATA,
    "HEADERS": HEADERS,
    "PRIORITY": 2,
    "RST_STREAM": RST_STREAM,
    "SETTINGS": 4,
    "PUSH_PROMISE": PUSH_PROMISE,
    "PING": 6,
    "GOAWAY": 7,
    "WINDOW_UPDATE": 8,
    "CONTINUATION": CONTINUATION,
}
_HEADER_BLOCK = (HEADERS, PUSH_PROMISE, CONTINUATION)
_STREAM_FRAMES = (DATA, RST_STREAM, *_HEADER_BLOCK)
END_STREAM, END_HEADERS = 0x1, 0x4

RST_ERRORS = (
    "NO_ERROR",
    "PROTOCOL_ERROR",
    "INTERNAL_ERROR",
    "FLOW_CONTROL_ERROR",
    "SETTINGS_TIMEOUT",
    "STREAM_CLOSED",
    "FRAME_SIZE_ERROR",
    "REFUSED_STREAM",
    "CANCEL",
    "COMPRESSION_ERROR",
    "CONNECT_ERROR",
    "ENHANCE_YOUR_CALM",
    "INADEQUATE_SECURITY",
    "HTTP_1_1_REQUIRED",
)

GRPC_STATUS = (
    "OK",
    "CANCELLED",
    "UNKNOWN",
    "INVALID_ARGUMENT",
    "DEADLINE_EXCEEDED",
    "NOT_FOUND",
    "ALREADY_EXISTS",
    "PERMISSION_DENIED",
    "RESOURCE_EXHAUSTED",
    "FAILED_PRECONDITION",
    "ABORTED",
    "OUT_OF_RANGE",
    "UNIMPLEMENTED",
    "INTERNAL",
    "UNAVAILABLE",
    "DATA_LOSS",
    "UNAUTHENTICATED",
)
# gRPC's own mapping for replies that carry an HTTP status but no grpc-status
# (a proxy answered instead of the server): doc/http-grpc-status-mapping.md.
_HTTP_TO_GRPC = {400: 13, 401: 16, 403: 7, 404: 12, 429: 14, 502: 14, 503: 14, 504: 14}
# ... and for streams reset before their trailers (the same document).
_RST_TO_GRPC = {"REFUSED_STREAM": 14, "CANCEL": 1, "ENHANCE_YOUR_CALM": 8, "INADEQUATE_SECURITY": 7}

# Streams that never finish (client cancellations, lost packets) must not pile
# up in a long-lived connection's state.
MAX_STREAMS_PER_CONNECTION = 4096

Headers = list[tuple[str, str]]

# One segment with a dozen gRPC requests overflows the header value column
# (base.COLUMN_LIMIT); these columns stop up to three bytes short of it.
CUT_MARGIN = 3
# Short per-header fields that stand in for requests whose headers fell past
# the cut (the name and value columns hold every header of every block).
REQUEST_FIELDS = (
    ("http2.headers.method", ":method"),
    ("http2.headers.path", ":path"),
    ("http2.headers.authority", ":authority"),
    ("http2.headers.content_type", "content-type"),
)
USER_AGENT = ("http2.headers.user_agent", "user-agent")


@dataclass(slots=True)
class _Stream:
    protocol: str = "http2"
    request_bytes: int = 0
    response_bytes: int = 0


@dataclass(slots=True)
class _Block:
    """A header block still waiting for its CONTINUATION frames."""

    frame_type: int
    flags: int
    to_server: bool | None
    headers: Headers | None = field(default_factory=list)


@dataclass(slots=True)
class _Connection:
    streams: dict[int, _Stream] = field(default_factory=dict)
    blocks: dict[int, _Block] = field(default_factory=dict)


def cut_values(text: str, lengths: Sequence[int]) -> list[str] | None:
    """Header values from their comma-joined column, or None when they cannot be told apart.

    From a column tshark cut short, the values that are there in full.
    """
    n = len(lengths)
    if n == 0:
        return [] if not text else None
    cut = column_cut(text, CUT_MARGIN)
    if cut or len(text) == sum(lengths) + n - 1:
        out: list[str] = []
        pos = 0
        for length in lengths:
            end = pos + length
            if end > len(text) or (end < len(text) and text[end] != ","):
                break
            if cut and end == len(text):
                break
            out.append(text[pos:end])
            pos = end + 1
        else:
            return out
        if cut:
            return out
    # tshark escapes unprintable bytes, which changes the printed length; a
    # plain split still works when no value has a comma.
    parts = text.split(",")
    return parts if len(parts) == n else None


def frame_headers(
    types: Sequence[int],
    flags: Sequence[int],
    counts: Sequence[int] | None,
    headers: Headers | None,
    table_updates: int,
    complete: bool = True,
) -> dict[int, Headers | None]:
    """The decoded headers of each header-block frame in the row, by frame index.

    ``None`` marks a frame whose headers are unknown: they could not be
    attributed, or (``complete`` False) lie beyond what tshark printed.
    """
    blocks = [i for i, t in enumerate(types) if t in _HEADER_BLOCK]
    if not blocks:
        return {}
    if counts is None or headers is None:
        return dict.fromkeys(blocks)
    # A header-block frame that decoded nothing (an empty block, a header split
    # across frames, an HPACK failure) has no count; the frames that end a
    # block are then the best guess.
    if len(counts) == len(blocks):
        owners = blocks
    else:
        owners = [i for i in blocks if flags[i] & END_HEADERS]
        if len(owners) != len(counts):
            return dict.fromkeys(blocks)
    sizes = list(counts)
    # A dynamic table size update counts as an entry but prints no name; RFC
    # 7541 puts it at the start of a block, so charge the first blocks.
    for k in range(len(sizes)):
        if table_updates <= 0:
            break
        if sizes[k] > 0:
            sizes[k] -= 1
            table_updates -= 1
    total = sum(sizes)
    if table_updates or total < len(headers) or (complete and total != len(headers)):
        return dict.fromkeys(blocks)
    out: dict[int, Headers | None] = {i: [] for i in blocks}
    pos = 0
    for owner, size in zip(owners, sizes, strict=True):
        end = pos + size
        out[owner] = headers[pos:end] if end <= len(headers) else None
        pos = end
    return out


def _frame_type(text: str) -> int:
    known = _TYPE_NAMES.get(text)
    if known is not None:
        return known
    return int(text) if text.isdigit() else -1


def _rst_name(text: str) -> str:
    if text.isdigit():
        code = int(text)
        return RST_ERRORS[code] if code < len(RST_ERRORS) else f"0x{code:x}"
    return text


def grpc_status_name(code: int) -> str:
    return GRPC_STATUS[code] if 0 <= code < len(GRPC_STATUS) else str(code)


class Http2Parser:
    name = "http2"
    tshark_name = "http2"
    # No port is h2c's by standard; 50051 is gRPC's conventional one.
    default_ports: tuple[int, ...] = (50051,)
    transports: tuple[str, ...] = ("tcp",)
    shares_columns = True
    fields: tuple[str, ...] = FIELDS + tuple(f for f, _ in REQUEST_FIELDS)

    def __init__(self, keep_user_agent: bool = False) -> None:
        self.keep_user_agent = keep_user_agent
        self.request_fields = (*REQUEST_FIELDS, USER_AGENT) if keep_user_agent else REQUEST_FIELDS
        self.fields = FIELDS + tuple(f for f, _ in self.request_fields)
        self._idx: tuple[int, ...] = ()
        self._req_idx: tuple[int, ...] = ()

    def bind(self, layout: ColumnLayout) -> None:
        self._idx = layout.indices(FIELDS)
        self._req_idx = layout.indices([f for f, _ in self.request_fields])

    def parse(
        self, cols: Sequence[str], to_server: bool | None, state: dict[str, object]
    ) -> list[L7Message]:
        i_sid, i_type, i_flags, i_len, i_count, i_name, i_value, i_vlen, i_tsu, i_rst = self._idx
        types = [_frame_type(t) for t in occurrences(cols[i_type], CUT_MARGIN)]
        kinds = set(types)
        if kinds.isdisjoint(_STREAM_FRAMES):
            # SETTINGS, PING, WINDOW_UPDATE, GOAWAY only: not part of any
            # exchange, so the side's next message starts after them (unless
            # a header block waits for its CONTINUATION).
            conn = state.get("http2")
            if types and not (isinstance(conn, _Connection) and conn.blocks):
                return [L7Message("http2", to_server is not False, control=True)]
            return []
        sids = [int(s) for s in occurrences(cols[i_sid], CUT_MARGIN)]
        flags = [int(f, 0) for f in occurrences(cols[i_flags], CUT_MARGIN)]
        n_frames = min(len(sids), len(types), len(flags))
        frames_cut = n_frames != max(len(sids), len(types), len(flags))
        if frames_cut:
            if not any(column_cut(cols[i], CUT_MARGIN) for i in (i_sid, i_type, i_flags)):
                raise ValueError(
                    f"http2 frame fields do not align: {cols[i_sid]!r} {cols[i_type]!r}"
                )
            # Frames past the cut are lost; the ones before it still count.
            del sids[n_frames:], types[n_frames:], flags[n_frames:]
        lengths: list[int] = []
        if DATA in kinds:
            lengths = [int(n) for n in occurrences(cols[i_len], CUT_MARGIN)]
        lengths += [0] * (n_frames - len(lengths))
        by_frame: dict[int, Headers | None] = {}
        if not kinds.isdisjoint(_HEADER_BLOCK):
            names = occurrences(cols[i_name], CUT_MARGIN)
            values = cut_values(
                cols[i_value], [int(n) for n in occurrences(cols[i_vlen], CUT_MARGIN)]
            )
            complete = not any(column_cut(cols[i], CUT_MARGIN) for i in (i_name, i_value, i_vlen))
            headers: Headers | None = None
            if values is not None and (not complete or len(values) == len(names)):
                headers = list(zip(names, values, strict=False))
            col = cols[i_count]
            counts = (
                None if column_cut(col, CUT_MARGIN) else [int(n) for n in split_occurrences(col)]
            )
            updates = len(split_occurrences(cols[i_tsu]))
            by_frame = frame_headers(types, flags, counts, headers, updates, complete)
        rst_errors = occurrences(cols[i_rst], CUT_MARGIN) if RST_STREAM in kinds else []

        conn = state.get("http2")
        if not isinstance(conn, _Connection):
            conn = _Connection()
            state["http2"] = conn
        if to_server and None in by_frame.values():
            self._fill_requests(cols, sids, types, by_frame, conn, frames_cut)
        out: list[L7Message] = []
        n_rst = 0
        for i, (sid, ftype, fl) in enumerate(zip(sids, types, flags, strict=True)):
            if ftype in (HEADERS, PUSH_PROMISE):
                block = _Block(ftype, fl, to_server, by_frame.get(i))
                if fl & END_HEADERS:
                    self._block(conn, sid, block, out)
                else:
                    conn.blocks[sid] = block
                    _trim(conn.blocks)
            elif ftype == CONTINUATION:
                pending = conn.blocks.get(sid)
                if pending is None:
                    continue
                more = by_frame.get(i)
                if pending.headers is not None:
                    # Headers already read stay; the unreadable rest is flagged.
                    pending.headers += [("<unknown>", "")] if more is None else more
                if fl & END_HEADERS:
                    del conn.blocks[sid]
                    self._block(conn, sid, pending, out)
            elif ftype == DATA:
                st = conn.streams.get(sid)
                if st is None or to_server is None:
                    continue
                if to_server:
                    st.request_bytes += lengths[i]
                    continue
                st.response_bytes += lengths[i]
                if fl & END_STREAM:
                    out.append(self._final(conn, sid, st, {}))
            elif ftype == RST_STREAM:
                error = _rst_name(rst_errors[n_rst]) if n_rst < len(rst_errors) else "UNKNOWN"
                n_rst += 1
                st = conn.streams.get(sid)
                # A client's reset (a cancelled call, a passed deadline) cannot
                # end the exchange: only the server's side does, and it may
                # still answer; otherwise the exchange times out or ends with
                # the connection.
                if st is None or to_server is not False:
                    continue
                attrs: dict[str, AttrValue] = {"flowprobe.http2.rst_stream.error": error}
                msg = self._final(conn, sid, st, attrs)
                if st.protocol == "grpc":
                    code = _RST_TO_GRPC.get(error, 13)
                    attrs["rpc.grpc.status_code"] = code
                    msg.error_type = grpc_status_name(code)
                else:
                    msg.error_type = error
                out.append(msg)
        return out

    def _fill_requests(
        self,
        cols: Sequence[str],
        sids: Sequence[int],
        types: Sequence[int],
        by_frame: dict[int, Headers | None],
        conn: _Connection,
        frames_cut: bool,
    ) -> None:
        """Requests whose headers fell past tshark's cut, from the short per-header columns."""
        missing = [
            i
            for i, hdrs in by_frame.items()
            if hdrs is None and types[i] == HEADERS and sids[i] not in conn.streams
        ]
        if not missing:
            return
        known = [h for hdrs in by_frame.values() if hdrs is not None for h, _ in hdrs]
        filled: list[Headers] = [[] for _ in missing]
        for col, (_, name) in zip(self._req_idx, self.request_fields, strict=True):
            column = cols[col]
            vals = occurrences(column, CUT_MARGIN)[known.count(name) :]
            if (
                len(vals) == len(missing)
                or (column_cut(column, CUT_MARGIN) and len(vals) < len(missing))
                or (frames_cut and len(vals) > len(missing))
            ):
                found = vals
            elif not vals and name not in (":method", ":path"):
                continue  # absent from all of them (a GET has no content-type)
            else:
                found = []
            for k, hdrs in enumerate(filled):
                if k < len(found):
                    hdrs.append((name, found[k]))
                elif name != USER_AGENT[1]:
                    hdrs.append(("<unknown>", ""))
        for i, hdrs in zip(missing, filled, strict=True):
            by_frame[i] = hdrs

    def _block(self, conn: _Connection, sid: int, block: _Block, out: list[L7Message]) -> None:
        # Server push: a promised request and a response on an even stream the
        # client never asked for; neither is an exchange of the client's.
        if block.frame_type == PUSH_PROMISE or sid % 2 == 0:
            return
        hdrs = block.headers
        h: dict[str, str] = {}
        incomplete = hdrs is None
        for name, value in hdrs or ():
            if name == "<unknown>":
                incomplete = True
            h.setdefault(name, value)
        to_server = block.to_server
        if to_server is None:
            if ":method" in h:
                to_server = True
            elif ":status" in h:
                to_server = False
            else:
                return
        if to_server:
            # Anything else from the client is request trailers.
            if ":method" in h or (incomplete and sid not in conn.streams):
                out.append(self._request(conn, sid, h, incomplete))
            return
        st = conn.streams.get(sid)
        if st is None:
            # The request was not seen (capture started later): pair what can
            # be paired; the sessionizer counts the orphan response.
            ctype = h.get("content-type", "")
            st = _Stream(protocol="grpc" if ctype.startswith("application/grpc") else "http2")
            conn.streams[sid] = st
            _trim(conn.streams)
        attrs: dict[str, AttrValue] = {}
        if incomplete:
            attrs["flowprobe.http2.headers_incomplete"] = True
        error: str | None = None
        status_s = h.get(":status")
        status = int(status_s) if status_s and status_s.isdigit() else None
        if status_s is not None and (status is None or not 100 <= status <= 999):
            # What a client treats as a malformed response (RFC 9113 8.1.1).
            status = None
            error = "PROTOCOL_ERROR"
        if status is not None:
            if 100 <= status < 200:
                # Interim (100 Continue, 103 Early Hints): the real one follows.
                out.append(L7Message(st.protocol, False, {}, key=sid, final=False))
                return
            attrs["http.response.status_code"] = status
            if status >= 500:
                error = str(status)
        grpc_status = h.get("grpc-status")
        end = bool(block.flags & END_STREAM)
        if st.protocol == "grpc":
            if grpc_status is not None and grpc_status.isdigit():
                code = int(grpc_status)
                attrs["rpc.grpc.status_code"] = code
                error = grpc_status_name(code) if code != 0 else None
            elif end and error == "PROTOCOL_ERROR":
                attrs["rpc.grpc.status_code"] = 13
                error = grpc_status_name(13)
            elif end and status is not None and status != 200:
                code = _HTTP_TO_GRPC.get(status, 2)
                attrs["rpc.grpc.status_code"] = code
                error = grpc_status_name(code)
        if end:
            msg = self._final(conn, sid, st, attrs)
            msg.error_type = error
            out.append(msg)
        elif status is not None:
            out.append(L7Message(st.protocol, False, attrs, key=sid, final=False, error_type=error))

    def _request(
        self, conn: _Connection, sid: int, h: dict[str, str], incomplete: bool
    ) -> L7Message:
        ctype = h.get("content-type", "")
        protocol = "grpc" if ctype.startswith("application/grpc") else "http2"
        attrs: dict[str, AttrValue] = {
            "network.protocol.name": "http",
            "network.protocol.version": "2",
            "flowprobe.http2.stream_id": sid,
        }
        method = h.get(":method")
        if method is not None:
            attrs["http.request.method"] = method
        path_q = h.get(":path")
        if path_q is not None:
            path, sep, query = path_q.partition("?")
            attrs["url.path"] = path
            if sep:
                attrs["url.query"] = query
            if protocol == "grpc":
                service, slash, rpc = path.lstrip("/").rpartition("/")
                attrs["rpc.system"] = "grpc"
                if slash and service and rpc:
                    attrs["rpc.service"] = service
                    attrs["rpc.method"] = rpc
        authority = h.get(":authority")
        if authority is not None:
            attrs["http.request.header.host"] = authority
        if self.keep_user_agent and "user-agent" in h:
            attrs["user_agent.original"] = h["user-agent"]
        if incomplete:
            attrs["flowprobe.http2.headers_incomplete"] = True
        conn.streams[sid] = _Stream(protocol=protocol)
        _trim(conn.streams)
        return L7Message(protocol, True, attrs, key=sid)

    @staticmethod
    def _final(conn: _Connection, sid: int, st: _Stream, attrs: dict[str, AttrValue]) -> L7Message:
        attrs["http.request.body.size"] = st.request_bytes
        attrs["http.response.body.size"] = st.response_bytes
        conn.streams.pop(sid, None)
        return L7Message(st.protocol, False, attrs, key=sid)


def _trim(table: dict[int, _Stream] | dict[int, _Block]) -> None:
    while len(table) > MAX_STREAMS_PER_CONNECTION:
        del table[next(iter(table))]
