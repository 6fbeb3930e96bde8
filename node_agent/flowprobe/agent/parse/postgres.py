"""PostgreSQL exchanges from tshark's ``pgsql`` dissector.

One exchange is one round trip that ends at ReadyForQuery: a simple Query, or
an extended-protocol batch (Parse/Bind/Describe/Execute ... Sync). Start-up and
authentication (SSLRequest, StartupMessage, the SASL or password messages, the
server's Authentication, ParameterStatus and BackendKeyData messages up to the
first ReadyForQuery, or the FATAL error that refuses the login) make one
``connect`` exchange.

What tshark hands over, and how it is read here:

* Every field is a comma-joined list of its occurrences in the segment, and
  empty occurrences are left out: an unnamed statement adds nothing to
  ``pgsql.statement``. Only ``pgsql.type`` and ``pgsql.length`` have one entry
  per message, so they give the order.
* A custom column holds at most 2047 bytes. A segment of a few hundred
  DataRows cuts ``pgsql.type`` short, so the counts that matter come from
  columns with one short entry per rare message: ``pgsql.tag``
  (CommandComplete, "SELECT 500" gives the rows), ``pgsql.status``
  (ReadyForQuery) and ``pgsql.code`` (ErrorResponse, NoticeResponse).
* Query texts are comma-joined too, and SQL is full of commas: when a segment
  carries several Query or Parse messages, the texts are split where the
  byte lengths agree with each message's ``pgsql.length``.
* The dissector reads strings as ASCII: bytes above 0x7f show as U+FFFD, and
  newlines and tabs as ``\\n`` and ``\\t``.
"""

from __future__ import annotations

import re
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field

from flowprobe.agent.capture.columns import ColumnLayout
from flowprobe.agent.parse.base import column_cut, keep_values, occurrences, split_occurrences
from flowprobe.agent.parse.messages import (
    PAYLOAD_QUERY,
    PAYLOAD_QUERY_VALUES,
    PAYLOAD_REPLY_VALUES,
    AttrValue,
    L7Message,
)
from flowprobe.agent.parse.redact import sanitize_sql, sql_collection, sql_operation

FIELDS = (
    "pgsql.type",
    "pgsql.length",
    "pgsql.query",
    "pgsql.statement",
    "pgsql.tag",
    "pgsql.status",
    "pgsql.code",
    "pgsql.severity",
    "pgsql.parameter_name",
    "pgsql.parameter_value",
)

NAME = "postgresql"
# Bind parameters and DataRow values, read only for in-agent inspection.
VALUES_FIELD = "pgsql.val.data"

# Per-connection memory is bounded whatever the client does.
MAX_STATEMENTS = 256
MAX_BATCH = 1024
MAX_OUTSTANDING = 1024

FRONTEND_TYPES = frozenset(
    {
        "Simple query",
        "Parse",
        "Bind",
        "Execute",
        "Describe",
        "Close",
        "Flush",
        "Sync",
        "Function call",
        "Copy failure",
        "Termination",
        "Password message",
        "SASLInitialResponse message",
        "SASLResponse message",
        "GSSResponse message",
        "Startup message",
        "SSL request",
        "GSS encrypt request",
        "Cancel request",
    }
)
BACKEND_TYPES = frozenset(
    {
        "Authentication request",
        "Backend key data",
        "Parameter status",
        "Parse completion",
        "Bind completion",
        "Close completion",
        "Command completion",
        "Parameter description",
        "Row description",
        "Data row",
        "Empty query",
        "No data",
        "Error",
        "Notice",
        "Portal suspended",
        "Ready for query",
        "Notification response",
        "Function call response",
        "CopyIn response",
        "CopyOut response",
        "CopyBoth response",
        "Negotiate protocol version",
    }
)
# Both directions use these names.
COPY_TYPES = frozenset({"Copy data", "Copy completion"})
# Messages the server may send at any moment, outside any response.
ASYNC_TYPES = frozenset({"Notice", "Notification response", "Parameter status"})

# CommandComplete tags whose count is rows written rather than rows returned.
DML_TAGS = frozenset({"INSERT", "UPDATE", "DELETE", "MERGE", "COPY"})
ROW_TAGS = frozenset({"SELECT", "FETCH"})

STARTUP, READY = 0, 1
# The connect exchange starts with these, so they are not mere control.
NEGOTIATION = frozenset({"SSL request", "GSS encrypt request"})


# --- query text as tshark shows it ------------------------------------------

_ESCAPE = re.compile(r"\\(?:x[0-9A-Fa-f]{2}|[0-7]{3}|[abfnrtv])")
_WS_ESCAPE = re.compile(r"\\[nrtvf]")
_UNTERMINATED = re.compile(r"'|\$[A-Za-z_]*\$")
_UNTERMINATED_MYSQL = re.compile(r"['\"]")


def shown_byte_range(text: str) -> tuple[int, int]:
    """Possible byte lengths on the wire of a string tshark displayed as ``text``.

    tshark escapes control characters (``\\n``, ``\\x01``) but not backslashes,
    so each escape-like sequence is either one byte or the literal characters.
    Bytes it could not decode show as one U+FFFD each.
    """
    lo = hi = 0
    pos = 0
    for m in _ESCAPE.finditer(text):
        plain = text[pos : m.start()]
        n = len(plain.encode()) - 2 * plain.count("\ufffd")
        lo += n + 1
        hi += n + len(m.group())
        pos = m.end()
    rest = text[pos:]
    n = len(rest.encode()) - 2 * rest.count("\ufffd")
    return lo + n, hi + n


def split_texts(
    joined: str,
    fits: Sequence[Callable[[int, int], bool]],
    tops: Sequence[int],
    last_may_be_cut: bool = False,
    rest_allowed: bool = False,
) -> list[str] | None:
    """Split a comma-joined column of strings that may contain commas themselves.

    ``fits[i](lo, hi)`` tells whether the i-th string may be ``lo`` to ``hi``
    bytes long on the wire, from its message's length; ``tops[i]`` is the most
    it can be. ``rest_allowed``: occurrences of messages tshark did not list
    may follow. ``last_may_be_cut``: the column was cut, so it may end inside
    a string and fewer strings than ``fits`` are returned. None when no split
    fits.
    """
    if len(fits) == 1 and not rest_allowed:
        return [joined]
    pieces = joined.split(",")
    if len(pieces) > 1024:
        return None
    out: list[str] = []
    failed: set[tuple[int, int]] = set()

    def walk(start: int, k: int) -> bool:
        if k == len(fits):
            return start == len(pieces) or rest_allowed
        if start == len(pieces):
            return last_may_be_cut
        if (start, k) in failed:
            return False
        last = k == len(fits) - 1
        for end in range(start + 1, len(pieces) + 1):
            if not rest_allowed and not last_may_be_cut and last and end != len(pieces):
                continue
            text = ",".join(pieces[start:end])
            lo, hi = shown_byte_range(text)
            if lo > tops[k]:
                break
            cut = last_may_be_cut and end == len(pieces)
            if cut or fits[k](lo, hi):
                out.append(text)
                if walk(end, k + 1):
                    return True
                out.pop()
        failed.add((start, k))
        return False

    return list(out) if walk(0, 0) else None


_WS_CHARS = {"n": "\n", "r": "\r", "t": "\t", "v": "\v", "f": "\f"}


def sql_text(shown: str) -> str:
    """The statement as tshark showed it, with escaped whitespace made plain again."""
    return _WS_ESCAPE.sub(lambda m: _WS_CHARS[m.group()[1]], shown)


_DOUBLE_QUOTED = re.compile(r'"(?:[^"\\]|""|\\.)*"', re.DOTALL)


def safe_sanitize(text: str, double_quoted_literals: bool = False) -> str:
    """sanitize_sql, and nothing after a literal left unterminated.

    A statement cut at the column limit (or malformed) can end inside a
    literal, which the sanitizer leaves alone; its value must not leak.
    MySQL reads "..." as a string too (unless ANSI_QUOTES is on).
    """
    if double_quoted_literals:
        text = _DOUBLE_QUOTED.sub("?", text)
    out = sanitize_sql(text)
    m = (_UNTERMINATED_MYSQL if double_quoted_literals else _UNTERMINATED).search(out)
    if m is not None:
        out = (out[: m.start()].rstrip() + " ?").lstrip()
    return out


def statement_attrs(
    texts: Sequence[str | None], raw: bool, mysql: bool = False, keep_text: bool = False
) -> dict[str, AttrValue]:
    """db.* attributes of one statement, or of a batch of them (OTel conventions).

    ``keep_text``: the unsanitised text too, for in-agent inspection only
    (security/, which removes it before anything is exported).
    """
    known = [sql_text(t) for t in texts if t]
    attrs: dict[str, AttrValue] = {}
    if len(texts) > 1:
        attrs["db.operation.batch.size"] = len(texts)
    if not known:
        return attrs
    if keep_text:
        attrs[PAYLOAD_QUERY] = "; ".join(known)
    ops = {sql_operation(t) for t in known}
    colls = {sql_collection(t) for t in known}
    distinct = list(dict.fromkeys(t if raw else safe_sanitize(t, mysql) for t in known))
    attrs["db.query.text"] = "; ".join(distinct)
    op = ops.pop() if len(ops) == 1 else None
    if len(texts) > 1:
        attrs["db.operation.name"] = f"BATCH {op}" if op else "BATCH"
    elif op:
        attrs["db.operation.name"] = op
    coll = colls.pop() if len(colls) == 1 else None
    if coll:
        attrs["db.collection.name"] = coll
    return attrs


# --- per-connection state ---------------------------------------------------


@dataclass(slots=True)
class _Batch:
    """Client messages since the last Sync (or simple Query)."""

    active: bool = False
    queries: list[str | None] = field(default_factory=list)
    parsed: list[str | None] = field(default_factory=list)
    executed: list[str | None] = field(default_factory=list)
    other: str | None = None
    values: list[str] = field(default_factory=list)


@dataclass(slots=True)
class _Response:
    """Server messages since the last ReadyForQuery."""

    content: bool = False
    piece_sent: bool = False
    rows: int | None = None
    affected: int | None = None
    error: str | None = None
    # The statement whose result is streaming.
    data_rows: int = 0
    row_description: bool = False
    cut: bool = False
    values: list[str] = field(default_factory=list)

    def complete(self, tag: str) -> None:
        words = tag.split()
        op = words[0].upper() if words else ""
        count = int(words[-1]) if len(words) >= 2 and words[-1].isdigit() else None
        returned = self.row_description or self.data_rows > 0 or op in ROW_TAGS
        if returned:
            self.rows = (self.rows or 0) + (count if count is not None else self.data_rows)
        if op in DML_TAGS and count is not None:
            self.affected = (self.affected or 0) + count
        self.end_statement()

    def suspended(self) -> None:
        self.rows = (self.rows or 0) + self.data_rows
        self.end_statement()

    def end_statement(self) -> None:
        self.data_rows = 0
        self.row_description = False
        self.cut = False


@dataclass(slots=True)
class _Conn:
    phase: int = READY
    namespace: str | None = None
    # Requests sent whose ReadyForQuery has not come yet.
    outstanding: int = 0
    statements: dict[str, str | None] = field(default_factory=dict)
    unnamed: str | None = None
    bound: str | None = None
    batch: _Batch = field(default_factory=_Batch)
    response: _Response = field(default_factory=_Response)


def _is_error(code: str, severity: str, typ: str) -> bool:
    if typ == "Error":
        return True
    if typ == "Notice":
        return False
    # Type unknown (column cut): SQLSTATE classes 00, 01 and 02 are success,
    # warning and no-data, the classes notices use.
    return code[:2] not in ("00", "01", "02") and severity not in ("WARNING", "NOTICE", "INFO")


class PostgresParser:
    name = NAME
    tshark_name = "pgsql"
    default_ports: tuple[int, ...] = (5432,)
    transports: tuple[str, ...] = ("tcp",)
    shares_columns = True
    fields: tuple[str, ...] = FIELDS

    def __init__(self, raw_query_text: bool = False, keep_payload: bool = False) -> None:
        self.raw_query_text = raw_query_text
        self.keep_payload = keep_payload
        self.fields = (*FIELDS, VALUES_FIELD) if keep_payload else FIELDS
        self._idx: tuple[int, ...] = ()
        self._values = -1

    def bind(self, layout: ColumnLayout) -> None:
        self._idx = layout.indices(FIELDS)
        if self.keep_payload:
            self._values = layout.index(VALUES_FIELD)

    def parse(
        self, cols: Sequence[str], to_server: bool | None, state: dict[str, object]
    ) -> list[L7Message]:
        type_col = cols[self._idx[0]]
        if not type_col:
            return []
        conn = state.get(NAME)
        if not isinstance(conn, _Conn):
            conn = _Conn()
            state[NAME] = conn
        types = occurrences(type_col)
        cut = column_cut(type_col)
        if to_server is None:
            to_server = any(t in FRONTEND_TYPES for t in types)
        if self._values >= 0 and cols[self._values]:
            # The segment's values go to the request or response it ends (or
            # continues); the column does not say which message each is from.
            keep_values(
                conn.batch.values if to_server else conn.response.values, cols[self._values]
            )
        if to_server:
            return self._client(cols, types, cut, conn)
        return self._server(cols, types, cut, conn)

    # -- frontend ----------------------------------------------------------

    def _client(
        self, cols: Sequence[str], types: list[str], cut: bool, conn: _Conn
    ) -> list[L7Message]:
        i_len, i_query, i_stmt = self._idx[1], self._idx[2], self._idx[3]
        i_pname, i_pvalue = self._idx[8], self._idx[9]
        lengths = [int(x) for x in occurrences(cols[i_len]) if x.isdigit()]
        texts = self._query_texts(cols[i_query], types, lengths, cut, cols[i_stmt])
        names = split_occurrences(cols[i_stmt])
        out: list[L7Message] = []
        qi = ni = 0
        parses_left = sum(1 for t in types if t == "Parse")
        for n, typ in enumerate(types):
            # A Sync or Query in the middle of the segment starts a new batch.
            batch = conn.batch
            if typ == "Startup message":
                conn.phase = STARTUP
                conn.response = _Response()
                params = _startup_params(cols[i_pname], cols[i_pvalue])
                if "database" in params:
                    conn.namespace = params["database"]
                out.append(self._request(conn, {"db.operation.name": "connect"}))
            elif typ == "Simple query":
                text = texts[qi] if qi < len(texts) else None
                qi += 1
                batch.queries.append(text)
                conn.unnamed = None
                out.append(self._flush_batch(conn))
            elif typ == "Parse":
                text = texts[qi] if qi < len(texts) else None
                qi += 1
                parses_left -= 1
                name = None
                # A name not seen before is this Parse's own; a known one
                # belongs to a later Bind, Describe or Close.
                if ni < len(names) and names[ni] not in conn.statements:
                    name = names[ni]
                    ni += 1
                if name:
                    if len(conn.statements) >= MAX_STATEMENTS:
                        conn.statements.pop(next(iter(conn.statements)))
                    conn.statements[name] = text
                else:
                    conn.unnamed = text
                batch.active = True
                _append(batch.parsed, text)
            elif typ == "Bind":
                batch.active = True
                if ni < len(names) and (names[ni] in conn.statements or not parses_left):
                    conn.bound = conn.statements.get(names[ni])
                    ni += 1
                else:
                    conn.bound = conn.unnamed
            elif typ in ("Describe", "Close"):
                batch.active = True
                batch.other = batch.other or typ.lower()
                size = lengths[n] - 6 if n < len(lengths) else -1
                if ni < len(names) and size == len(names[ni]) and names[ni] in conn.statements:
                    if typ == "Close":
                        conn.statements.pop(names[ni], None)
                    ni += 1
            elif typ == "Execute":
                batch.active = True
                _append(batch.executed, conn.bound)
            elif typ == "Function call":
                batch.active = True
                batch.other = "function_call"
            elif typ == "Sync" and batch.active:
                out.append(self._flush_batch(conn))
        if cut and len(lengths) > len(types) and not column_cut(cols[i_len]):
            self._hidden_tail(conn, lengths[len(types) :], out)
        if not out and not conn.batch.active and not NEGOTIATION & set(types):
            # Authentication steps, a bare Sync, Terminate: the next request
            # starts after them.
            out.append(_control())
        return out

    def _hidden_tail(self, conn: _Conn, lengths: list[int], out: list[L7Message]) -> None:
        """Messages past the cut of ``pgsql.type``, known only by their lengths.

        A long pipeline (a driver's batch insert) ends in a Sync that would
        otherwise be lost with the exchange. An Execute of the unnamed portal
        is 9 bytes long; a batch that ends in a 4-byte message ends in a Sync
        (a Flush there is rare).
        """
        batch = conn.batch
        for size in lengths:
            if size == 9:
                batch.active = True
                _append(batch.executed, conn.bound)
        if lengths[-1] == 4 and batch.active:
            out.append(self._flush_batch(conn))

    def _query_texts(
        self, joined: str, types: list[str], lengths: list[int], cut: bool, names_col: str
    ) -> list[str | None]:
        slots = [n for n, t in enumerate(types) if t in ("Simple query", "Parse")]
        if not slots:
            return []
        if not joined:
            return [None] * len(slots)
        if len(slots) == 1 and not cut:
            return [joined]
        name_sizes = {0} | {len(x.encode()) for x in split_occurrences(names_col)}
        fits: list[Callable[[int, int], bool]] = []
        tops: list[int] = []
        for n in slots:
            if n >= len(lengths):
                return [None] * len(slots)
            size = lengths[n]
            if types[n] == "Simple query":
                fits.append(exactly(size - 5))
                tops.append(size - 5)
            else:
                fits.append(_parse_fit(size, name_sizes))
                tops.append(size - 8)
        parts = split_texts(
            joined, fits, tops, last_may_be_cut=column_cut(joined), rest_allowed=cut
        )
        if parts is None:
            return [None] * len(slots)
        texts: list[str | None] = list(parts)
        if len(texts) > 1 and column_cut(joined):
            # Half a statement next to whole ones would only add noise.
            texts[-1] = None
        return texts + [None] * (len(slots) - len(texts))

    def _flush_batch(self, conn: _Conn) -> L7Message:
        batch = conn.batch
        conn.batch = _Batch()
        raw = self.raw_query_text
        if batch.executed or batch.queries:
            attrs = statement_attrs(
                [*batch.executed, *batch.queries], raw, keep_text=self.keep_payload
            )
        elif batch.parsed:
            attrs = statement_attrs(batch.parsed, raw, keep_text=self.keep_payload)
            attrs["db.operation.name"] = "PREPARE"
        else:
            attrs = {"db.operation.name": batch.other or "sync"}
        if batch.values:
            attrs[PAYLOAD_QUERY_VALUES] = ",".join(batch.values)
        return self._request(conn, attrs)

    def _request(self, conn: _Conn, attrs: dict[str, AttrValue]) -> L7Message:
        base: dict[str, AttrValue] = {"db.system.name": NAME}
        if conn.namespace:
            base["db.namespace"] = conn.namespace
        base.update(attrs)
        conn.outstanding = min(conn.outstanding + 1, MAX_OUTSTANDING)
        return L7Message(NAME, True, base)

    # -- backend -----------------------------------------------------------

    def _server(
        self, cols: Sequence[str], types: list[str], cut: bool, conn: _Conn
    ) -> list[L7Message]:
        i_tag, i_status, i_code, i_sev = self._idx[4], self._idx[5], self._idx[6], self._idx[7]
        tags = split_occurrences(cols[i_tag])
        statuses = split_occurrences(cols[i_status])
        codes = split_occurrences(cols[i_code])
        severities = split_occurrences(cols[i_sev])
        out: list[L7Message] = []
        ti = si = ci = 0
        for typ in types:
            resp = conn.response
            if typ == "Ready for query":
                si += 1
                self._ready(conn, out)
                continue
            if typ in ASYNC_TYPES and conn.phase == READY:
                if typ == "Notice":
                    ci += 1
                continue
            if typ not in BACKEND_TYPES and typ not in COPY_TYPES:
                continue
            resp.content = True
            if typ == "Data row":
                resp.data_rows += 1
            elif typ == "Row description":
                resp.row_description = True
            elif typ == "Command completion":
                resp.complete(tags[ti] if ti < len(tags) else "")
                ti += 1
            elif typ == "Portal suspended":
                resp.suspended()
            elif typ == "Empty query":
                resp.end_statement()
            elif typ in ("Error", "Notice"):
                code = codes[ci] if ci < len(codes) else ""
                sev = severities[ci] if ci < len(severities) else ""
                ci += 1
                if _is_error(code, sev, typ):
                    self._error(conn, code, sev, out)
        if cut:
            # The rest of the segment is not listed: take the rare messages
            # from their own columns, in the order a response has them.
            conn.response.cut = True
            conn.response.content = True
            for tag in tags[ti:]:
                conn.response.complete(tag)
            for n in range(ci, len(codes)):
                sev = severities[n] if n < len(severities) else ""
                if _is_error(codes[n], sev, ""):
                    self._error(conn, codes[n], sev, out)
            for _ in statuses[si:]:
                self._ready(conn, out)
        resp = conn.response
        if not out and not resp.content:
            # A ReadyForQuery nobody waits for, an asynchronous notice.
            out.append(_control())
        if resp.content and not resp.piece_sent and conn.outstanding > 0:
            # The response has begun: the sessionizer takes its start from here.
            resp.piece_sent = True
            out.append(L7Message(NAME, False, {}, final=False))
        return out

    def _error(self, conn: _Conn, code: str, severity: str, out: list[L7Message]) -> None:
        resp = conn.response
        if resp.error is None:
            resp.error = code or "unknown"
        resp.end_statement()
        # FATAL ends the session (a refused login always does): no
        # ReadyForQuery will follow.
        if severity in ("FATAL", "PANIC") or conn.phase == STARTUP:
            self._finish(conn, out)

    def _ready(self, conn: _Conn, out: list[L7Message]) -> None:
        conn.phase = READY
        if conn.response.content:
            if conn.outstanding <= 0:
                # The Sync it answers was not seen (cut from its segment's
                # column): what the client sent before it is answered too.
                conn.batch = _Batch()
            self._finish(conn, out)
        else:
            # A Sync with nothing before it, or the end of a start-up the
            # capture did not see begin: no request waits for it.
            conn.response = _Response()

    def _finish(self, conn: _Conn, out: list[L7Message]) -> None:
        resp = conn.response
        conn.response = _Response()
        if conn.outstanding <= 0:
            return
        conn.outstanding -= 1
        attrs: dict[str, AttrValue] = {}
        if resp.rows is not None:
            attrs["flowprobe.db.rows"] = resp.rows
        if resp.affected is not None:
            attrs["flowprobe.db.affected_rows"] = resp.affected
        if resp.error is not None:
            attrs["db.response.status_code"] = resp.error
        if conn.namespace:
            attrs["db.namespace"] = conn.namespace
        if resp.values:
            attrs[PAYLOAD_REPLY_VALUES] = ",".join(resp.values)
        out.append(L7Message(NAME, False, attrs, error_type=resp.error))


def exactly(size: int) -> Callable[[int, int], bool]:
    return lambda lo, hi: lo <= size <= hi


def _parse_fit(size: int, name_sizes: set[int]) -> Callable[[int, int], bool]:
    """Parse is name, query, a 2-byte parameter count and 4 bytes per parameter type."""

    def fit(lo: int, hi: int) -> bool:
        for name in name_sizes:
            for text in range(lo, min(hi, lo + 3) + 1):
                rest = size - 8 - name - text
                if rest >= 0 and rest % 4 == 0:
                    return True
        return False

    return fit


def _control() -> L7Message:
    return L7Message(NAME, False, control=True)


def _append(items: list[str | None], text: str | None) -> None:
    if len(items) < MAX_BATCH:
        items.append(text)


def _startup_params(names_col: str, values_col: str) -> dict[str, str]:
    names = split_occurrences(names_col)
    values = split_occurrences(values_col)
    # A value with a comma in it makes the pairs ambiguous.
    return dict(zip(names, values, strict=True)) if len(names) == len(values) else {}
