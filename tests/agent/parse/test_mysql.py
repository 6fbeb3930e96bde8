"""MySQL/MariaDB through tshark and the whole pipeline, on pcaps recorded from a real
MariaDB server with pymysql, MySQL Connector/Python, the mariadb command-line
client and a CLIENT_DEPRECATE_EOF client (tests/data/record_mysql.py), plus the
parser on hand-made columns and hostile bytes on the wire."""

from __future__ import annotations

import random
import struct
from pathlib import Path
from typing import Any

import pytest

from flowprobe.agent.config import DdrConfig, SecurityConfig
from flowprobe.agent.parse.base import MAX_VALUES_CHARS
from flowprobe.agent.parse.messages import PAYLOAD_REPLY_TEXT, L7Message
from flowprobe.agent.parse.mysql import FIELDS, MysqlParser
from flowprobe.agent.security.payload import strip
from flowprobe.devenv.pcapgen import ACK, PSH
from tests.agent import helpers
from tests.agent.helpers import DATA, close, conn, handshake, read_pcap, run_pcap, write

MY = DATA / "mysql"
CLIENT, SERVER = "10.252.2.1", "10.252.2.2"


_summary = helpers.db_summary


def _check_common(records: list[dict[str, Any]], port: int = 3306) -> None:
    helpers.check_db_records(records, "mysql", "shop", (CLIENT, SERVER), port)


CONNECT = ("connect", None, "ok", None, None, None)


@pytest.mark.capture
def test_pymysql_queries_ok_err_ping_and_result_sets() -> None:
    records = read_pcap(MY / "queries.pcapng")
    _check_common(records)
    assert _summary(records) == [
        CONNECT,
        ("SET", "SET NAMES utf8mb4", "ok", None, 0, None),
        (
            "CREATE",
            "CREATE TABLE orders (id INT PRIMARY KEY, item_id INT, qty INT)",
            "ok",
            None,
            0,
            None,
        ),
        ("INSERT", "INSERT INTO orders VALUES (?), (?), (?)", "ok", None, 3, None),
        ("SELECT", "SELECT id, name, price FROM items ORDER BY id", "ok", 300, None, None),
        # 1200 rows over three segments; the first lists more packets than
        # its 2047-byte column holds.
        (
            "SELECT",
            "SELECT a.id, b.id, a.name FROM items a JOIN items b ON b.id <= ? ORDER BY a.id, b.id",
            "ok",
            1200,
            None,
            None,
        ),
        ("SELECT", "SELECT id, name FROM items WHERE name = ?", "ok", 0, None, None),
        ("UPDATE", "UPDATE items SET price = ? WHERE id <= ?", "ok", None, 12, None),
        ("SELECT", "SELECT * FROM missing_table", "error", None, None, "1146"),
        # Two result sets, the first flagged "more results".
        ("SELECT", "SELECT ?; SELECT ?, ?", "ok", 2, None, None),
        ("init_db", None, "ok", None, None, None),
        ("ping", None, "ok", None, None, None),
        ("DELETE", "DELETE FROM orders WHERE id > ?", "ok", None, 2, None),
        # 2.4 KB statement cut by tshark inside its literal; COM_QUIT follows
        # and makes no exchange.
        ("SELECT", "SELECT COUNT(*) FROM items WHERE name <> ?", "ok", 1, None, None),
    ]
    join = records[5]
    assert join["flowprobe.response.packets"] >= 3
    assert join["flowprobe.response.bytes"] > 20_000
    assert records[0]["flowprobe.tcp.handshake.server_us"] > 0


@pytest.mark.capture
def test_result_rows_kept_for_inspection_only_with_sensitive_data_on() -> None:
    pcap = MY / "queries.pcapng"
    ddr = read_pcap(pcap, security=SecurityConfig(ddr=DdrConfig(enabled=True)))
    rows = [r.get(PAYLOAD_REPLY_TEXT) for r in ddr]
    for r in ddr:
        strip(r)
    # Nothing else changes: the rows ride in the statements' column.
    assert ddr == read_pcap(pcap)
    # SELECT id, name, price FROM items: 300 rows, text values comma-joined.
    assert str(rows[4]).startswith("1,item-1,1.50,2,item-2,3.00,")
    # 1200 rows over several segments, kept up to the cap.
    assert "item-1" in str(rows[5]) and len(str(rows[5])) <= MAX_VALUES_CHARS + 8
    assert rows[3] is None  # INSERT: no rows
    assert rows[8] is None  # an error


@pytest.mark.capture
def test_server_side_prepared_statements() -> None:
    records = read_pcap(MY / "prepared.pcapng")
    _check_common(records)
    one = "SELECT id, name, price FROM items WHERE id = ?"
    reset = ("stmt_reset", None, "ok", None, None, None)
    assert _summary(records) == [
        CONNECT,
        ("SET", "SET NAMES ? COLLATE ?", "ok", None, 0, None),
        ("SET", "SET @@session.autocommit = ON", "ok", None, 0, None),
        ("ping", None, "ok", None, None, None),
        ("PREPARE", one, "ok", None, None, None),
        # Connector/Python resets the statement before each execute; the
        # execute carries the text prepared under its statement id.
        reset,
        ("SELECT", one, "ok", 1, None, None),
        reset,
        ("SELECT", one, "ok", 1, None, None),
        reset,
        ("SELECT", one, "ok", 1, None, None),
        # COM_STMT_CLOSE: no response, no exchange.
        ("PREPARE", "SELECT id, name FROM items WHERE id < ?", "ok", None, None, None),
        reset,
        # Binary rows, which tshark labels "OK Packet".
        ("SELECT", "SELECT id, name FROM items WHERE id < ?", "ok", 99, None, None),
        ("PREPARE", "UPDATE items SET price = ? WHERE id = ?", "ok", None, None, None),
        reset,
        ("UPDATE", "UPDATE items SET price = ? WHERE id = ?", "ok", None, 1, None),
        ("PREPARE", "SELECT * FROM nope WHERE id = ?", "error", None, None, "1146"),
        ("PREPARE", "INSERT INTO items (id, name) VALUES (?)", "ok", None, None, None),
        reset,
        ("INSERT", "INSERT INTO items (id, name) VALUES (?)", "error", None, None, "1062"),
        ("ping", None, "ok", None, None, None),
        ("SELECT", "SELECT COUNT(*) FROM items", "ok", 1, None, None),
    ]


@pytest.mark.capture
def test_mariadb_command_line_client() -> None:
    records = read_pcap(MY / "cli.pcapng")
    _check_common(records)
    assert _summary(records) == [
        CONNECT,
        ("SELECT", "SELECT id, name FROM items WHERE id <= ?", "ok", 5, None, None),
        ("UPDATE", "UPDATE items SET price = ? WHERE id = ?", "ok", None, 1, None),
        ("SELECT", "SELECT ? FROM missing_table", "error", None, None, "1146"),
    ]


@pytest.mark.capture
def test_client_deprecate_eof_result_sets_end_at_their_ok() -> None:
    records = read_pcap(MY / "deprecate_eof.pcapng")
    _check_common(records)
    assert _summary(records) == [
        CONNECT,
        ("SELECT", "SELECT id, name FROM items WHERE id <= ?", "ok", 40, None, None),
        ("UPDATE", "UPDATE items SET price = ? WHERE id IN (?)", "ok", None, 2, None),
        ("SELECT", "SELECT * FROM missing_table", "error", None, None, "1146"),
        ("SELECT", "SELECT ?; SELECT ?, ?", "ok", 2, None, None),
        ("PREPARE", "SELECT id, name FROM items WHERE id < ?", "ok", None, None, None),
        ("SELECT", "SELECT id, name FROM items WHERE id < ?", "ok", 5, None, None),
        ("ping", None, "ok", None, None, None),
    ]


@pytest.mark.capture
def test_non_standard_port_needs_decode_as() -> None:
    assert read_pcap(MY / "altport.pcapng") == []
    records = read_pcap(MY / "altport.pcapng", ports={"mysql": (3307,)})
    _check_common(records, port=3307)
    assert _summary(records) == [
        CONNECT,
        ("SET", "SET NAMES utf8mb4", "ok", None, 0, None),
        ("SELECT", "SELECT id, name FROM items WHERE id <= ?", "ok", 20, None, None),
        ("UPDATE", "UPDATE items SET price = ? WHERE id = ?", "ok", None, 1, None),
    ]


@pytest.mark.capture
def test_raw_query_text_keeps_literals_when_asked() -> None:
    records = read_pcap(MY / "queries.pcapng", payload={"raw_query_text": True})
    texts = [r.get("db.query.text") for r in records]
    assert "SELECT id, name FROM items WHERE name = 'item-7, or not'" in texts


# -- the parser on hand-made columns ------------------------------------------


_parse = helpers.exchange_messages
LAYOUT = helpers.layout(FIELDS)


def _parser() -> MysqlParser:
    return helpers.bound(MysqlParser())


def _cols(**values: str) -> list[str]:
    return helpers.columns(FIELDS, "mysql.", **values)


def _seqs(a: int, b: int) -> str:
    return ",".join(str(n % 256) for n in range(a, b))


def _login(p: MysqlParser, state: dict[str, object], deprecate_eof: bool = False) -> None:
    flag = "Set" if deprecate_eof else "Not set"
    assert _parse(p, _cols(server_greeting="\u2713", caps__deprecate_eof="Set"), False, state) == []
    (req,) = _parse(
        p, _cols(login_request="\u2713", caps__deprecate_eof=flag, schema="shop"), True, state
    )
    assert req.attrs["db.operation.name"] == "connect"
    (ok,) = _parse(p, _cols(response_code="OK Packet", stat__mr="Not set"), False, state)
    assert ok.final and ok.attrs["db.namespace"] == "shop"


def test_result_set_over_segments_with_cut_sequence_column() -> None:
    p, state = _parser(), dict[str, object]()
    _login(p, state)
    (req,) = _parse(p, _cols(command="Query", query="SELECT a, b FROM t"), True, state)
    assert req.attrs["db.query.text"] == "SELECT a, b FROM t"
    # Header, 2 definitions, EOF, then 1000 rows and a final EOF: 1005 packets.
    seg1 = (_seqs(1, 700))[:2047]
    (piece,) = _parse(
        p, _cols(packet_number=seg1, num_fields="2", eof="254", stat__mr="Not set"), False, state
    )
    assert not piece.final
    assert _parse(p, _cols(packet_number=_seqs(700, 900)), False, state) == []
    (done,) = _parse(
        p, _cols(packet_number=_seqs(900, 1006), eof="254", stat__mr="Not set"), False, state
    )
    assert done.final and done.attrs["flowprobe.db.rows"] == 1000


def test_multi_results_and_errors() -> None:
    p, state = _parser(), dict[str, object]()
    _login(p, state)
    _parse(p, _cols(command="Query", query="CALL p()"), True, state)
    # A result set flagged "more results", then the closing OK.
    (piece,) = _parse(
        p,
        _cols(packet_number=_seqs(1, 6), num_fields="1", eof="254,254", stat__mr="Set,Set"),
        False,
        state,
    )
    assert not piece.final
    (done,) = _parse(
        p,
        _cols(packet_number="6", response_code="OK Packet", affected_rows="0", stat__mr="Not set"),
        False,
        state,
    )
    assert done.final and done.attrs["flowprobe.db.rows"] == 1
    _parse(p, _cols(command="Query", query="SELECT * FROM nope"), True, state)
    (err,) = _parse(
        p, _cols(packet_number="1", response_code="ERR Packet", error_code="1146"), False, state
    )
    assert err.error_type == "1146" and err.attrs["db.response.status_code"] == "1146"


def test_prepare_execute_close_by_statement_id() -> None:
    p, state = _parser(), dict[str, object]()
    _login(p, state, deprecate_eof=True)
    _parse(p, _cols(command="Prepare Statement", query="SELECT x FROM t WHERE id = ?"), True, state)
    # Prepare OK, 1 parameter and 1 column definition (no EOFs: DEPRECATE_EOF).
    (ok,) = _parse(
        p,
        _cols(
            packet_number="1,2,3",
            response_code="OK Packet",
            stmt_id="7",
            num_params="1",
            num_fields="1",
        ),
        False,
        state,
    )
    assert ok.final
    (ex,) = _parse(p, _cols(command="Execute Statement", stmt_id="7"), True, state)
    assert ex.attrs["db.query.text"] == "SELECT x FROM t WHERE id = ?"
    # Binary rows look like OK packets to tshark; only the last packet has a status.
    (rows,) = _parse(
        p,
        _cols(
            packet_number="1,2,3,4,5",
            response_code="OK Packet,OK Packet,EOF Packet",
            num_fields="1",
            eof="254",
            affected_rows="0",
            stat__mr="Not set",
        ),
        False,
        state,
    )
    assert rows.final and rows.attrs["flowprobe.db.rows"] == 2
    assert _parse(p, _cols(command="Close Statement", stmt_id="7"), True, state) == []
    (again,) = _parse(p, _cols(command="Execute Statement", stmt_id="7"), True, state)
    assert "db.query.text" not in again.attrs


def test_pipelined_commands_split_by_packet_length() -> None:
    p, state = _parser(), dict[str, object]()
    a, b = "SELECT a, b FROM t", "UPDATE t SET a = 1, b = 2"
    out = _parse(
        p,
        _cols(
            command="Query,Ping,Query",
            query=f"{a},{b}",
            packet_length=f"{len(a) + 1},1,{len(b) + 1}",
        ),
        True,
        state,
    )
    assert [m.attrs.get("db.query.text") for m in out] == [a, None, "UPDATE t SET a = ?, b = ?"]
    assert [m.attrs.get("db.operation.name") for m in out] == ["SELECT", "ping", "UPDATE"]


def test_double_quoted_strings_are_literals() -> None:
    p, state = _parser(), dict[str, object]()
    (req,) = _parse(
        p, _cols(command="Query", query='SELECT * FROM t WHERE name = "secret"'), True, state
    )
    assert req.attrs["db.query.text"] == "SELECT * FROM t WHERE name = ?"


def test_responses_without_request_are_ignored() -> None:
    p, state = _parser(), dict[str, object]()
    assert _parse(p, _cols(response_code="OK Packet", stat__mr="Not set"), False, state) == []
    assert _parse(p, _cols(command="Quit"), True, state) == []
    assert _parse(p, _cols(command="Send BLOB", stmt_id="1"), True, state) == []


def test_hostile_columns_never_raise() -> None:
    rnd = random.Random(3306)
    vocab = [
        "Query",
        "Ping",
        "Execute Statement",
        "Prepare Statement",
        "Close Statement",
        "OK Packet",
        "EOF Packet",
        "ERR Packet",
        "Set",
        "Not set",
        "254",
        "\u2713",
        "",
        "x",
        "9" * 25,
        "-3",
    ]
    p = _parser()
    for _ in range(3000):
        state: dict[str, object] = {}
        for _ in range(4):
            cols = [""] * len(LAYOUT.fields)
            for f in FIELDS:
                if rnd.random() < 0.5:
                    cols[LAYOUT.index(f)] = ",".join(
                        rnd.choice(vocab) for _ in range(rnd.randrange(0, 5))
                    )
            out = _parse(p, cols, rnd.choice([True, False, None]), state)
            assert all(isinstance(m, L7Message) for m in out)


# -- hostile bytes on the wire ---------------------------------------------


def _packet(seq: int, payload: bytes) -> bytes:
    return len(payload).to_bytes(3, "little") + bytes([seq]) + payload


@pytest.mark.capture
def test_random_and_truncated_packets_on_port_3306(tmp_path: Path) -> None:
    rnd = random.Random(2)
    frames: list[bytes] = []
    query = _packet(0, b"\x03SELECT 1")
    ok = _packet(1, b"\x00\x00\x00\x02\x00\x00\x00")
    for n in range(12):
        c = conn(n, 3306)
        frames += handshake(c)
        frames.append(c.segment(True, PSH | ACK, query))
        frames.append(c.segment(False, PSH | ACK, ok))
        choice = n % 4
        if choice == 0:
            payload = rnd.randbytes(rnd.randrange(1, 600))
        elif choice == 1:
            payload = query[:6]  # truncated
        elif choice == 2:
            payload = b"\xff\xff\xff\x00\x03SELECT"  # claims 16 MB
        else:
            payload = _packet(0, b"\x17" + struct.pack("<I", 99) + rnd.randbytes(30))
        frames.append(c.segment(rnd.random() < 0.5, PSH | ACK, payload))
        frames.append(c.segment(False, PSH | ACK, _packet(1, b"\xff\x7a\x04#42000junk")))
        frames += close(c)
    records, stats, error = run_pcap(write(tmp_path / "my.pcap", frames))
    assert error is None
    assert stats.packets == len(frames)
    assert not [k for k in stats.anomalies if k.startswith("parse_error")]
    assert len([r for r in records if r.get("db.query.text") == "SELECT ?"]) >= 12
