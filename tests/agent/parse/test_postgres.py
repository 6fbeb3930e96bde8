"""PostgreSQL through tshark and the whole pipeline, on pcaps recorded from a real
server and psycopg 3 (tests/data/record_postgres.py), plus the parser on hand-made
columns and hostile bytes on the wire."""

from __future__ import annotations

import random
import struct
import subprocess
import sys
from pathlib import Path
from typing import Any

import pytest

from flowprobe.agent.parse.messages import L7Message
from flowprobe.agent.parse.postgres import (
    FIELDS,
    PostgresParser,
    safe_sanitize,
    shown_byte_range,
    split_texts,
    statement_attrs,
)
from flowprobe.devenv.pcapgen import ACK, PSH
from tests.agent import helpers
from tests.agent.helpers import DATA, close, conn, handshake, read_pcap, run_pcap, write

PG = DATA / "postgres"
CLIENT, SERVER = "10.252.1.1", "10.252.1.2"


_summary = helpers.db_summary


def _check_common(records: list[dict[str, Any]], port: int = 5432) -> None:
    helpers.check_db_records(records, "postgresql", "postgres", (CLIENT, SERVER), port)


@pytest.mark.capture
def test_simple_query_protocol() -> None:
    records = read_pcap(PG / "simple.pcapng")
    _check_common(records)
    assert _summary(records) == [
        ("connect", None, "ok", None, None, None),
        (
            "CREATE",
            "CREATE TABLE orders (id int PRIMARY KEY, item_id int, qty int)",
            "ok",
            None,
            None,
            None,
        ),
        (
            "INSERT",
            "INSERT INTO orders SELECT g, g % ? + ?, g % ? FROM generate_series(?) g",
            "ok",
            None,
            500,
            None,
        ),
        ("SELECT", "SELECT id, item_id, qty FROM orders ORDER BY id", "ok", 500, None, None),
        ("SELECT", "SELECT count(*) FROM items WHERE name = ?", "ok", 1, None, None),
        ("UPDATE", "UPDATE items SET price = ? WHERE id = ?", "ok", None, 1, None),
        ("SELECT", "SELECT * FROM missing_table", "error", None, None, "42P01"),
        # Two statements in one Query: one exchange, both results' rows.
        ("SELECT", "SELECT ?; SELECT ?, ?", "ok", 2, None, None),
        ("DELETE", "DELETE FROM orders WHERE id > ?", "ok", None, 10, None),
        # Sent with newlines and tabs (tshark shows them escaped) and a
        # non-ASCII literal with a comma in it.
        ("SELECT", "SELECT id, name FROM items WHERE name = ? OR id = ?", "ok", 1, None, None),
        # 2.4 KB statement, cut by tshark inside its literal.
        ("SELECT", "SELECT count(*) FROM items WHERE name <> ?", "ok", 1, None, None),
        ("connect", None, "ok", None, None, None),
        ("BEGIN", "BEGIN", "ok", None, None, None),
        ("INSERT", "INSERT INTO orders VALUES (?)", "ok", None, 1, None),
        ("COMMIT", "COMMIT", "ok", None, None, None),
        # Wrong password: the login is refused with a FATAL error.
        ("connect", None, "error", None, None, "28P01"),
    ]
    by_text = {r.get("db.query.text"): r for r in records}
    big = by_text["SELECT id, item_id, qty FROM orders ORDER BY id"]
    # 500 DataRows span two segments; the response starts at the first.
    assert big["flowprobe.response.packets"] >= 2
    assert big["db.collection.name"] == "orders"
    assert big["flowprobe.response.bytes"] > 12_000
    assert all("s3cr3t" not in str(r.get("db.query.text")) for r in records)
    # The connection handshake is reported once, on the first exchange.
    assert records[0]["flowprobe.tcp.handshake.server_us"] > 0


@pytest.mark.capture
def test_extended_query_protocol_and_prepared_statements() -> None:
    records = read_pcap(PG / "extended.pcapng")
    _check_common(records)
    assert _summary(records) == [
        ("connect", None, "ok", None, None, None),
        ("SELECT", "SELECT id, name FROM items WHERE id < $1", "ok", 49, None, None),
        # psycopg's prepare=True: Parse of a named statement with its own Sync.
        ("PREPARE", "SELECT name, price FROM items WHERE id = $1", "ok", None, None, None),
        # Bind/Execute of the named statement: its text comes from the Parse.
        ("SELECT", "SELECT name, price FROM items WHERE id = $1", "ok", 1, None, None),
        ("SELECT", "SELECT name, price FROM items WHERE id = $1", "ok", 1, None, None),
        ("SELECT", "SELECT name, price FROM items WHERE id = $1", "ok", 1, None, None),
        ("INSERT", "INSERT INTO items (id, name, price) VALUES ($1, $2, $3)", "ok", None, 1, None),
        ("SELECT", "SELECT * FROM nope WHERE id = $1", "error", None, None, "42P01"),
        ("INSERT", "INSERT INTO items (id, name) VALUES ($1, $2)", "error", None, None, "23505"),
        ("UPDATE", "UPDATE items SET price = $1 WHERE id > $2", "ok", None, 11, None),
    ]


@pytest.mark.capture
def test_pipeline_mode_batches_and_syncs() -> None:
    records = read_pcap(PG / "pipeline.pcapng")
    _check_common(records)
    batch = [(r.get("db.operation.name"), r.get("db.operation.batch.size")) for r in records]
    assert batch == [
        ("connect", None),
        # executemany: five Bind/Execute under one Sync.
        ("BATCH INSERT", 5),
        # Three Syncs pipelined by psycopg; the third batch fails.
        ("SELECT", None),
        ("UPDATE", None),
        ("SELECT", None),
        # The bare Sync that closes the pipeline makes no exchange.
        ("SELECT", None),
        ("connect", None),
        # libpq: two Parse messages with commas in one segment, one Sync.
        ("BATCH SELECT", 2),
        ("UPDATE", None),
        # 80 INSERTs and a Sync in one segment, past tshark's column limit.
        ("BATCH INSERT", 80),
    ]
    assert _summary(records)[4] == (
        "SELECT",
        "SELECT * FROM nope WHERE id = $1",
        "error",
        None,
        None,
        "42P01",
    )
    two = records[7]
    assert two["db.query.text"] == (
        "SELECT id, name FROM items WHERE id = $1; "
        "SELECT name, price FROM items WHERE id IN ($1, $2)"
    )
    assert two["flowprobe.db.rows"] == 3
    bulk = records[9]
    assert bulk["db.query.text"] == "INSERT INTO items (id, name) VALUES ($1, $2)"
    assert bulk["flowprobe.db.affected_rows"] == 80
    assert records[1]["flowprobe.db.affected_rows"] == 5


@pytest.mark.capture
def test_raw_query_text_keeps_literals_when_asked() -> None:
    records = read_pcap(PG / "simple.pcapng", payload={"raw_query_text": True})
    texts = [r.get("db.query.text") for r in records]
    assert "SELECT count(*) FROM items WHERE name = 'item-7'" in texts
    assert (
        "SELECT id,\n\tname\nFROM items\nWHERE name = '\ufffd\ufffdn\ufffd\ufffd\\code, x' OR id = 4"
        in (texts)
    )


@pytest.mark.capture
def test_non_standard_port_needs_decode_as() -> None:
    assert read_pcap(PG / "altport.pcapng") == []
    records = read_pcap(PG / "altport.pcapng", ports={"postgresql": (5433,)})
    _check_common(records, port=5433)
    assert _summary(records) == [
        ("connect", None, "ok", None, None, None),
        ("SELECT", "SELECT id, name FROM items WHERE id <= ?", "ok", 20, None, None),
        ("SELECT", "SELECT name FROM items WHERE id = $1", "ok", 1, None, None),
    ]


@pytest.mark.capture
def test_cli_port_flag_reaches_tshark_decode_as() -> None:
    out = subprocess.run(
        [
            sys.executable,
            "-m",
            "flowprobe.agent",
            "read",
            str(PG / "altport.pcapng"),
            "--port",
            "postgresql=5433",
            "--summary",
        ],
        capture_output=True,
        text=True,
        check=True,
    ).stdout
    assert "SELECT items" in out and "postgresql" in out


@pytest.mark.capture
def test_authentication_and_bare_syncs_do_not_stretch_the_next_exchange() -> None:
    records = read_pcap(PG / "simple.pcapng")
    # The first query after SASL starts at the query, not at the last auth message.
    assert records[1]["flowprobe.request.packets"] == 1
    records = read_pcap(PG / "pipeline.pcapng")
    after_pipeline = records[5]
    assert after_pipeline["db.query.text"] == "SELECT count(*) FROM items"
    assert after_pipeline["flowprobe.request.packets"] == 1
    assert after_pipeline["flowprobe.server_response_time_us"] > 0


# -- the parser on hand-made columns ------------------------------------------


_parse = helpers.exchange_messages
LAYOUT = helpers.layout(FIELDS)


def _parser(raw: bool = False) -> PostgresParser:
    return helpers.bound(PostgresParser(raw_query_text=raw))


def _cols(**values: str) -> list[str]:
    return helpers.columns(FIELDS, "pgsql.", **values)


def _msg(kind: str, sql: str) -> tuple[str, str]:
    """The type name and pgsql.length of a Query or unnamed Parse (no parameter types)."""
    size = len(sql.encode())
    return (kind, str(size + 5 if kind == "Simple query" else size + 8))


def test_pipelined_extended_batches_split_texts_with_commas() -> None:
    p, state = _parser(), dict[str, object]()
    a, b = "SELECT a, b FROM t WHERE x = $1", "UPDATE t SET a = $1, b = 'x, y'"
    types = ["Parse", "Bind", "Describe", "Execute", "Sync"] * 2
    lengths = [_msg("Parse", a)[1], "20", "6", "9", "4", _msg("Parse", b)[1], "22", "6", "9", "4"]
    out = _parse(
        p, _cols(type=",".join(types), length=",".join(lengths), query=f"{a},{b}"), True, state
    )
    assert [
        (m.is_request, m.attrs["db.operation.name"], m.attrs["db.query.text"]) for m in out
    ] == [
        (True, "SELECT", "SELECT a, b FROM t WHERE x = $1"),
        (True, "UPDATE", "UPDATE t SET a = $1, b = ?"),
    ]
    server = _parse(
        p,
        _cols(
            type="Parse completion,Bind completion,Row description,Data row,Data row,"
            "Command completion,Ready for query,Parse completion,Bind completion,No data,"
            "Command completion,Ready for query",
            tag="SELECT 2,UPDATE 7",
            status="Idle,Idle",
        ),
        False,
        state,
    )
    assert [
        (m.final, m.attrs.get("flowprobe.db.rows"), m.attrs.get("flowprobe.db.affected_rows"))
        for m in server
    ] == [
        (True, 2, None),
        (True, None, 7),
    ]


def test_rows_across_segments_and_a_cut_type_column() -> None:
    p, state = _parser(), dict[str, object]()
    assert (
        len(
            _parse(
                p, _cols(type="Simple query", length="30", query="SELECT * FROM big"), True, state
            )
        )
        == 1
    )
    first = _parse(p, _cols(type="Row description," + ",".join(["Data row"] * 100)), False, state)
    assert [(m.is_request, m.final) for m in first] == [(False, False)]
    # 300 DataRows: the type column stops at 2047 bytes, the tag tells the count.
    cut = (",".join(["Data row"] * 300))[:2047]
    last = _parse(p, _cols(type=cut, tag="SELECT 400", status="Idle"), False, state)
    assert [(m.final, m.attrs.get("flowprobe.db.rows")) for m in last] == [(True, 400)]


def test_bare_sync_and_startup_ready_for_query_make_no_exchange() -> None:
    p, state = _parser(), dict[str, object]()
    assert _parse(p, _cols(type="Sync", length="4"), True, state) == []
    assert _parse(p, _cols(type="Flush", length="4"), True, state) == []
    assert _parse(p, _cols(type="Ready for query", status="Idle"), False, state) == []
    # Start-up seen from the middle (no StartupMessage): nothing to answer.
    assert (
        _parse(
            p,
            _cols(
                type="Authentication request,Parameter status,Backend key data,Ready for query",
                status="Idle",
            ),
            False,
            state,
        )
        == []
    )


def test_startup_is_one_connect_exchange() -> None:
    p, state = _parser(), dict[str, object]()
    assert _parse(p, _cols(type="SSL request", length="8"), True, state) == []
    (req,) = _parse(
        p,
        _cols(type="Startup message", parameter_name="user,database", parameter_value="app,shop"),
        True,
        state,
    )
    assert req.attrs == {
        "db.system.name": "postgresql",
        "db.namespace": "shop",
        "db.operation.name": "connect",
    }
    (piece,) = _parse(p, _cols(type="Authentication request"), False, state)
    assert not piece.final
    assert _parse(p, _cols(type="SASLInitialResponse message"), True, state) == []
    (done,) = _parse(
        p,
        _cols(
            type="Authentication request,Parameter status,Backend key data,Ready for query",
            status="Idle",
        ),
        False,
        state,
    )
    assert done.final and done.error_type is None
    (q,) = _parse(p, _cols(type="Simple query", length="13", query="SELECT 1"), True, state)
    assert q.attrs["db.namespace"] == "shop"


def test_errors_notices_and_fatal() -> None:
    p, state = _parser(), dict[str, object]()
    _parse(p, _cols(type="Simple query", length="20", query="SELECT f()"), True, state)
    out = _parse(
        p,
        _cols(
            type="Notice,Row description,Data row,Command completion,Ready for query",
            code="01000",
            severity="WARNING",
            tag="SELECT 1",
            status="Idle",
        ),
        False,
        state,
    )
    assert [(m.final, m.error_type) for m in out] == [(True, None)]
    _parse(p, _cols(type="Simple query", length="20", query="SELECT g()"), True, state)
    (err,) = _parse(p, _cols(type="Error", code="57P01", severity="FATAL"), False, state)
    assert err.final and err.error_type == "57P01"
    assert err.attrs["db.response.status_code"] == "57P01"
    # Nothing left to answer: a stray ReadyForQuery is ignored.
    assert _parse(p, _cols(type="Ready for query", status="Idle"), False, state) == []


def test_named_statement_reused_later_and_closed() -> None:
    p, state = _parser(), dict[str, object]()
    sql = "SELECT name FROM t WHERE id = $1"
    size = str(len(sql) + 8 + len("S_1"))
    (prep,) = _parse(
        p, _cols(type="Parse,Sync", length=f"{size},4", query=sql, statement="S_1"), True, state
    )
    assert prep.attrs["db.operation.name"] == "PREPARE"
    (run,) = _parse(
        p, _cols(type="Bind,Execute,Sync", length="20,9,4", statement="S_1"), True, state
    )
    assert run.attrs["db.query.text"] == sql
    (close_,) = _parse(p, _cols(type="Close,Sync", length="9,4", statement="S_1"), True, state)
    assert close_.attrs["db.operation.name"] == "close"
    (unknown,) = _parse(
        p, _cols(type="Bind,Execute,Sync", length="20,9,4", statement="S_9"), True, state
    )
    assert "db.query.text" not in unknown.attrs


def test_long_batch_cut_from_the_type_column_still_ends_at_its_sync() -> None:
    p, state = _parser(), dict[str, object]()
    sql = "INSERT INTO t VALUES ($1)"
    types = ["Parse", "Bind", "Describe", "Execute"] * 100 + ["Sync"]
    lengths = [_msg("Parse", sql)[1], "20", "6", "9"] * 100 + ["4"]
    type_col = ",".join(types)[:2047]
    query_col = ",".join([sql] * 100)[:2047]
    (req,) = _parse(p, _cols(type=type_col, length=",".join(lengths), query=query_col), True, state)
    assert req.attrs["db.operation.batch.size"] == 100
    assert req.attrs["db.query.text"] == sql
    assert req.attrs["db.operation.name"] == "BATCH INSERT"


def test_hostile_columns_never_raise() -> None:
    rnd = random.Random(5432)
    names = list(FIELDS)
    vocab = [
        "Parse",
        "Bind",
        "Execute",
        "Sync",
        "Simple query",
        "Data row",
        "Ready for query",
        "Error",
        "Command completion",
        "Startup message",
        "Close",
        "Describe",
        "x",
        "",
        ",",
        "\ufffd",
        "9" * 30,
        "-1",
    ]
    p = _parser()
    for _ in range(3000):
        state: dict[str, object] = {}
        for _ in range(4):
            values = {
                f.removeprefix("pgsql."): ",".join(
                    rnd.choice(vocab) for _ in range(rnd.randrange(0, 6))
                )
                for f in names
                if rnd.random() < 0.6
            }
            out = _parse(p, _cols(**values), rnd.choice([True, False, None]), state)
            assert all(isinstance(m, L7Message) for m in out)


def test_text_helpers() -> None:
    assert shown_byte_range("ab\\ncd") == (5, 6)
    assert shown_byte_range("\ufffd\ufffd") == (2, 2)
    assert split_texts(
        "a,b,c", [lambda lo, hi: lo <= 3 <= hi, lambda lo, hi: lo <= 1 <= hi], [3, 1]
    ) == [
        "a,b",
        "c",
    ]
    assert split_texts("a,b", [lambda lo, hi: lo <= 9 <= hi] * 2, [9, 9]) is None
    assert safe_sanitize("SELECT * FROM t WHERE a = 'secr") == "SELECT * FROM t WHERE a = ?"
    assert safe_sanitize("SELECT $$body") == "SELECT ?"
    assert safe_sanitize('SELECT "x" FROM t') == 'SELECT "x" FROM t'
    assert safe_sanitize('SELECT "x" FROM t', double_quoted_literals=True) == "SELECT ? FROM t"
    assert statement_attrs(["SELECT 1", "UPDATE t SET a = 2"], raw=False) == {
        "db.operation.batch.size": 2,
        "db.query.text": "SELECT ?; UPDATE t SET a = ?",
        "db.operation.name": "BATCH",
    }
    assert statement_attrs([None], raw=False) == {}


# -- hostile bytes on the wire ---------------------------------------------


def _pg(kind: bytes, body: bytes) -> bytes:
    return kind + struct.pack("!I", 4 + len(body)) + body


@pytest.mark.capture
def test_random_and_truncated_messages_on_port_5432(tmp_path: Path) -> None:
    rnd = random.Random(1)
    frames: list[bytes] = []
    valid_q = _pg(b"Q", b"SELECT 1\0")
    valid_r = _pg(b"C", b"SELECT 1\0") + _pg(b"Z", b"I")
    for n in range(12):
        c = conn(n, 5432)
        frames += handshake(c)
        frames.append(c.segment(True, PSH | ACK, valid_q))
        frames.append(c.segment(False, PSH | ACK, valid_r))
        choice = n % 4
        if choice == 0:
            payload = rnd.randbytes(rnd.randrange(1, 600))
        elif choice == 1:
            payload = valid_q[:7]  # truncated
        elif choice == 2:
            payload = b"Q" + struct.pack("!I", 0xFFFFFFF0) + b"SELECT"  # absurd length
        else:
            payload = _pg(b"P", b"\xff\xfe\0" + rnd.randbytes(40))  # binary junk in a Parse
        frames.append(c.segment(rnd.random() < 0.5, PSH | ACK, payload))
        frames.append(
            c.segment(False, PSH | ACK, _pg(b"E", b"SERROR\0C42601\0\0") + _pg(b"Z", b"I"))
        )
        frames += close(c)
    records, stats, error = run_pcap(write(tmp_path / "pg.pcap", frames))
    assert error is None
    assert stats.packets == len(frames)
    assert not [k for k in stats.anomalies if k.startswith("parse_error")]
    ok = [r for r in records if r.get("db.query.text") == "SELECT ?"]
    # Every connection's valid query before the junk is still an exchange.
    assert len(ok) == 12
