"""MySQL and MariaDB exchanges from tshark's ``mysql`` dissector.

One exchange is one command and its whole response: COM_QUERY up to the last
result set, COM_STMT_PREPARE up to its last column definition, COM_PING up to
its OK. The handshake (server greeting, login request, any auth switch, up to
the OK or ERR) is one ``connect`` exchange. Commands without a response
(COM_QUIT, COM_STMT_CLOSE, COM_STMT_SEND_LONG_DATA) make none; a statement's
text, known from its COM_STMT_PREPARE, is attached to later COM_STMT_EXECUTEs
by statement id.

Where a response ends is the hard part; what tshark 4.0 gives and how it is
read:

* ``mysql.response_code`` names OK, EOF and ERR packets, but binary result
  rows (the answer to COM_STMT_EXECUTE) are mislabelled "OK Packet"; only
  real OK and EOF packets carry ``mysql.stat.mr`` (server status, "more
  results"), so real OKs are counted as status flags minus EOF markers.
* Without CLIENT_DEPRECATE_EOF a result set has two EOF packets (after the
  column definitions and after the rows); with it, one: the final 0xFE OK,
  which tshark also calls "EOF Packet". The login request says which.
* Fields are comma-joined lists of occurrences with no order between
  columns, and each column holds at most 2047 bytes, so a segment of many
  rows cuts ``mysql.packet_number``. The end of a response is decided from
  counts of rare markers (result set headers, EOF markers, status flags,
  errors) and the last status flag, which survive the cut; rows are counted
  from packet sequence numbers, across cuts by their gaps.

With ``keep_payload`` (sensitive-data detection on), the statement text before
sanitising and the text result rows (``mysql.row.text``) also go on the
messages under ``flowprobe.payload.*``, for the security stage only
(docs/security.md).
"""

from __future__ import annotations

from collections import deque
from collections.abc import Sequence
from dataclasses import dataclass, field

from flowprobe.agent.capture.columns import ColumnLayout
from flowprobe.agent.parse.base import column_cut, keep_values, occurrences, split_occurrences
from flowprobe.agent.parse.messages import PAYLOAD_REPLY_TEXT, AttrValue, L7Message
from flowprobe.agent.parse.postgres import exactly, split_texts, statement_attrs

FIELDS = (
    "mysql.command",
    "mysql.query",
    "mysql.stmt_id",
    "mysql.schema",
    "mysql.login_request",
    "mysql.server_greeting",
    "mysql.caps.deprecate_eof",
    "mysql.packet_number",
    "mysql.packet_length",
    "mysql.response_code",
    "mysql.error_code",
    "mysql.affected_rows",
    "mysql.num_fields",
    "mysql.num_params",
    "mysql.eof",
    "mysql.stat.mr",
)

# Text result rows, read only for in-agent inspection. Statements go from
# client to server and rows the other way, so both never share a segment and
# rows ride in the statement's column: one field more per packet for tshark,
# no column more.
QUERY_OR_ROWS = "mysql.query or mysql.row.text"

NAME = "mysql"
MAX_STATEMENTS = 256
MAX_PENDING = 1024

# What the server answers, per kind of command.
CONNECT, STATUS, RESULTS, PREPARE, FETCH, FIELD_LIST, STRING = range(7)

# tshark's command names -> (db.operation.name, kind of response). None: no
# response, so no exchange.
COMMANDS: dict[str, tuple[str, int] | None] = {
    "Query": ("", RESULTS),
    "Prepare Statement": ("PREPARE", PREPARE),
    "Execute Statement": ("", RESULTS),
    "Execute Bulk Statement": ("", RESULTS),
    "Fetch Data": ("fetch", FETCH),
    "Reset Statement": ("stmt_reset", STATUS),
    "Close Statement": None,
    "Send BLOB": None,
    "Quit": None,
    "Ping": ("ping", STATUS),
    "Use Database": ("init_db", STATUS),
    "Create Database": ("create_db", STATUS),
    "Drop Database": ("drop_db", STATUS),
    "Refresh": ("refresh", STATUS),
    "Shutdown": ("shutdown", STATUS),
    "Statistics": ("statistics", STRING),
    "Process List": ("processlist", RESULTS),
    "Kill Server Thread": ("kill", STATUS),
    "Debug": ("debug", STATUS),
    "Change User": ("change_user", CONNECT),
    "Reset Connection": ("reset_connection", STATUS),
    "Set Option": ("set_option", STATUS),
    "Show Fields": ("field_list", FIELD_LIST),
    "Time": ("time", STATUS),
    "Sleep": ("sleep", STATUS),
    # Replication streams never end in a response: not exchanges.
    "Send Binlog": None,
    "Send Binlog GTID": None,
    "Register Slave": ("register_replica", STATUS),
    "Send Table": None,
    "Slave Connect": None,
}
QUERY_COMMANDS = ("Query", "Prepare Statement")
STMT_COMMANDS = (
    "Execute Statement",
    "Execute Bulk Statement",
    "Fetch Data",
    "Reset Statement",
    "Close Statement",
    "Send BLOB",
)


@dataclass(slots=True)
class _Pending:
    kind: int
    text: str | None = None


@dataclass(slots=True)
class _Response:
    """What has been seen of the response to the oldest pending command."""

    started: bool = False
    piece_sent: bool = False
    packets: int = 0
    next_seq: int | None = None
    uncertain: bool = False
    headers: int = 0
    columns: int = 0
    eofs: int = 0
    oks: int = 0
    errors: int = 0
    affected: int = 0
    error_code: str | None = None
    # COM_STMT_PREPARE: packets the whole answer takes, once known.
    expected: int | None = None
    values: list[str] = field(default_factory=list)


@dataclass(slots=True)
class _Conn:
    deprecate_eof: bool = False
    server_deprecate_eof: bool = True
    namespace: str | None = None
    statements: dict[int, str | None] = field(default_factory=dict)
    pending: deque[_Pending] = field(default_factory=deque)
    response: _Response = field(default_factory=_Response)


# Immutable in practice: the sessionizer only reads it.
_CONTROL = L7Message(NAME, False, control=True)


def _ints(value: str) -> list[int]:
    return [int(x) for x in occurrences(value) if x.isdigit()]


class MysqlParser:
    name = NAME
    tshark_name = "mysql"
    default_ports: tuple[int, ...] = (3306,)
    transports: tuple[str, ...] = ("tcp",)
    shares_columns = True
    fields: tuple[str, ...] = FIELDS

    def __init__(self, raw_query_text: bool = False, keep_payload: bool = False) -> None:
        self.raw_query_text = raw_query_text
        self.keep_payload = keep_payload
        if keep_payload:
            self.fields = tuple(QUERY_OR_ROWS if f == "mysql.query" else f for f in FIELDS)
        self._idx: dict[str, int] = {}

    def bind(self, layout: ColumnLayout) -> None:
        self._idx = {f: layout.index(f) for f in FIELDS}

    def _col(self, cols: Sequence[str], field_name: str) -> str:
        return cols[self._idx[field_name]]

    def parse(
        self, cols: Sequence[str], to_server: bool | None, state: dict[str, object]
    ) -> list[L7Message]:
        conn = state.get(NAME)
        if not isinstance(conn, _Conn):
            conn = _Conn()
            state[NAME] = conn
        col = self._col
        if to_server is None:
            to_server = bool(col(cols, "mysql.command") or col(cols, "mysql.login_request"))
        if to_server:
            return self._client(cols, conn)
        if col(cols, "mysql.server_greeting"):
            flags = split_occurrences(col(cols, "mysql.caps.deprecate_eof"))
            conn.server_deprecate_eof = not flags or flags[0] == "Set"
            # The greeting opens the connection; the connect exchange's
            # response is what answers the login.
            return [_CONTROL]
        return self._server(cols, conn)

    # -- client --------------------------------------------------------------

    def _client(self, cols: Sequence[str], conn: _Conn) -> list[L7Message]:
        col = self._col
        if col(cols, "mysql.login_request"):
            flags = split_occurrences(col(cols, "mysql.caps.deprecate_eof"))
            conn.deprecate_eof = bool(flags) and flags[-1] == "Set" and conn.server_deprecate_eof
            schema = col(cols, "mysql.schema")
            if schema:
                conn.namespace = schema
            conn.pending.clear()
            conn.response = _Response()
            return [self._request(conn, {"db.operation.name": "connect"}, _Pending(CONNECT))]
        commands = split_occurrences(col(cols, "mysql.command"))
        if not commands:
            # Auth switch responses, LOCAL INFILE data: part of an exchange
            # already under way.
            return [_CONTROL]
        texts = self._texts(cols, commands)
        stmt_ids = _ints(col(cols, "mysql.stmt_id"))
        schemas = split_occurrences(col(cols, "mysql.schema"))
        out: list[L7Message] = []
        qi = si = 0
        for command in commands:
            text: str | None = None
            stmt_id: int | None = None
            if command in QUERY_COMMANDS:
                text = texts[qi] if qi < len(texts) else None
                qi += 1
            elif command in STMT_COMMANDS:
                stmt_id = stmt_ids[si] if si < len(stmt_ids) else None
                si += 1
            spec = COMMANDS.get(command)
            if command == "Close Statement" and stmt_id is not None:
                conn.statements.pop(stmt_id, None)
            if spec is None:
                # COM_QUIT, COM_STMT_CLOSE: no exchange, and the next one
                # starts after them. Long data belongs to the next execute.
                if command != "Send BLOB":
                    out.append(_CONTROL)
                continue
            op, kind = spec
            attrs: dict[str, AttrValue]
            if command == "Query" or command == "Prepare Statement":
                attrs = statement_attrs(
                    [text], self.raw_query_text, mysql=True, keep_text=self.keep_payload
                )
                if op:
                    attrs["db.operation.name"] = op
            elif kind == RESULTS and stmt_id is not None:
                text = conn.statements.get(stmt_id)
                attrs = statement_attrs(
                    [text], self.raw_query_text, mysql=True, keep_text=self.keep_payload
                )
            else:
                attrs = {"db.operation.name": op} if op else {}
            if command == "Use Database" and schemas:
                conn.namespace = schemas[0]
            out.append(self._request(conn, attrs, _Pending(kind, text)))
        return out

    def _texts(self, cols: Sequence[str], commands: list[str]) -> list[str | None]:
        joined = self._col(cols, "mysql.query")
        slots = [n for n, c in enumerate(commands) if c in QUERY_COMMANDS]
        if not slots:
            return []
        if not joined:
            return [None] * len(slots)
        if len(slots) == 1:
            return [joined]
        # Several statements in one segment (pipelining): one packet per
        # command, whose payload is the command byte and the text.
        lengths = _ints(self._col(cols, "mysql.packet_length"))
        if len(lengths) != len(commands):
            return [None] * len(slots)
        sizes = [lengths[n] - 1 for n in slots]
        parts = split_texts(
            joined,
            [exactly(s) for s in sizes],
            sizes,
            last_may_be_cut=column_cut(joined),
        )
        if parts is None:
            return [None] * len(slots)
        texts: list[str | None] = list(parts)
        if len(texts) > 1 and column_cut(joined):
            # Half a statement next to whole ones would only add noise.
            texts[-1] = None
        return texts + [None] * (len(slots) - len(texts))

    def _request(self, conn: _Conn, attrs: dict[str, AttrValue], pending: _Pending) -> L7Message:
        base: dict[str, AttrValue] = {"db.system.name": NAME}
        if conn.namespace:
            base["db.namespace"] = conn.namespace
        base.update(attrs)
        if len(conn.pending) >= MAX_PENDING:
            conn.pending.popleft()
        conn.pending.append(pending)
        return L7Message(NAME, True, base)

    # -- server --------------------------------------------------------------

    def _server(self, cols: Sequence[str], conn: _Conn) -> list[L7Message]:
        if not conn.pending:
            return [_CONTROL]
        col = self._col
        head = conn.pending[0]
        resp = conn.response
        codes = split_occurrences(col(cols, "mysql.response_code"))
        errors = split_occurrences(col(cols, "mysql.error_code"))
        statuses = split_occurrences(col(cols, "mysql.stat.mr"))
        eofs = len(split_occurrences(col(cols, "mysql.eof")))
        self._count_packets(resp, col(cols, "mysql.packet_number"))
        resp.started = True
        if self.keep_payload and col(cols, "mysql.query"):
            # The column holds the rows here (QUERY_OR_ROWS).
            keep_values(resp.values, col(cols, "mysql.query"))
        if errors and resp.error_code is None:
            resp.error_code = errors[0]
        resp.errors += len(errors)
        resp.affected += sum(_ints(col(cols, "mysql.affected_rows")))
        kind = head.kind
        done = bool(errors)
        if kind in (CONNECT, STATUS, FIELD_LIST):
            done = done or any(c in ("OK Packet", "EOF Packet") for c in codes)
            if kind == CONNECT:
                # An auth switch request or more auth data comes before the OK.
                done = bool(errors) or "OK Packet" in codes
        elif kind == STRING:
            done = True
        elif kind == PREPARE:
            done = done or self._prepared(cols, conn, head, resp)
        elif kind == FETCH:
            resp.eofs += eofs
            done = done or eofs > 0
        else:
            headers = _ints(col(cols, "mysql.num_fields"))
            resp.headers += len(headers)
            resp.columns += sum(headers)
            resp.eofs += eofs
            # Binary rows pass for OK packets; only real OKs carry a status.
            resp.oks += max(0, len(statuses) - eofs)
            per_set = 1 if conn.deprecate_eof else 2
            open_sets = resp.headers - resp.eofs // per_set
            more = statuses[-1] == "Set" if statuses else True
            done = done or (open_sets <= 0 and not more)
        if not done:
            if resp.piece_sent:
                return []
            resp.piece_sent = True
            return [L7Message(NAME, False, {}, final=False)]
        conn.pending.popleft()
        conn.response = _Response()
        return [self._final(conn, head, resp)]

    def _count_packets(self, resp: _Response, column: str) -> None:
        seqs = _ints(column)
        if not seqs:
            return
        if resp.next_seq is not None and seqs[0] != resp.next_seq:
            # The previous segment's column was cut: the gap is what it held.
            resp.packets += (seqs[0] - resp.next_seq) % 256
        resp.packets += len(seqs)
        resp.next_seq = (seqs[-1] + 1) % 256
        resp.uncertain = column_cut(column)

    def _prepared(self, cols: Sequence[str], conn: _Conn, head: _Pending, resp: _Response) -> bool:
        if resp.expected is None:
            ids = _ints(self._col(cols, "mysql.stmt_id"))
            params = _ints(self._col(cols, "mysql.num_params"))
            columns = _ints(self._col(cols, "mysql.num_fields"))
            if not ids:
                return False
            if len(conn.statements) >= MAX_STATEMENTS:
                conn.statements.pop(next(iter(conn.statements)))
            conn.statements[ids[0]] = head.text
            p = params[0] if params else 0
            c = columns[0] if columns else 0
            eofs = 0 if conn.deprecate_eof else int(p > 0) + int(c > 0)
            resp.expected = 1 + p + c + eofs
        return resp.packets >= resp.expected

    def _final(self, conn: _Conn, head: _Pending, resp: _Response) -> L7Message:
        attrs: dict[str, AttrValue] = {}
        if resp.error_code is not None:
            attrs["db.response.status_code"] = resp.error_code
        elif head.kind == RESULTS:
            if resp.headers and not resp.uncertain:
                rows = resp.packets - resp.headers - resp.columns - resp.eofs - resp.oks
                attrs["flowprobe.db.rows"] = max(0, rows)
            if resp.oks:
                attrs["flowprobe.db.affected_rows"] = resp.affected
        elif head.kind == FETCH and not resp.uncertain:
            attrs["flowprobe.db.rows"] = max(0, resp.packets - resp.eofs)
        if conn.namespace:
            attrs["db.namespace"] = conn.namespace
        if resp.values:
            attrs[PAYLOAD_REPLY_TEXT] = ",".join(resp.values)
        return L7Message(NAME, False, attrs, error_type=resp.error_code)
