"""Redis through tshark and the whole pipeline, on pcaps recorded from redis-server and
redis-py (tests/data/record_redis.py), plus the parser on hand-made columns and hostile input."""

from __future__ import annotations

import contextlib
import random
from pathlib import Path
from typing import Any

import pytest

from flowprobe.agent.parse.messages import PAYLOAD_REPLY_VALUES, L7Message
from flowprobe.agent.parse.redis import FIELDS, Outstanding, RedisParser, decode_value
from flowprobe.devenv.pcapgen import ACK, PSH
from tests.agent import helpers
from tests.agent.helpers import DATA, close, conn, handshake, read_pcap, run_pcap, write

REDIS = DATA / "redis"
CLIENT, SERVER = "10.253.0.1", "10.253.0.2"


def _summary(records: list[dict[str, Any]]) -> list[tuple[Any, ...]]:
    return [
        (
            r.get("db.operation.name"),
            r.get("db.query.text"),
            r["flowprobe.outcome"],
            r.get("error.type"),
            r.get("flowprobe.redis.reply.type"),
        )
        for r in records
    ]


@pytest.mark.capture
def test_resp2_commands_one_at_a_time() -> None:
    records = read_pcap(REDIS / "resp2.pcapng")
    assert _summary(records) == [
        ("SET", "SET user:1 ?", "ok", None, "status"),
        ("GET", "GET user:1", "ok", None, "bulk"),
        ("GET", "GET missing", "ok", None, "nil"),
        ("INCRBY", "INCRBY counter ?", "ok", None, "integer"),
        ("RPUSH", "RPUSH list ? ? ?", "ok", None, "integer"),
        ("LRANGE", "LRANGE list ? ?", "ok", None, "array"),
        ("HSET", "HSET user:2 ? ? ? ?", "ok", None, "integer"),
        ("HGETALL", "HGETALL user:2", "ok", None, "array"),
        ("GET", "GET list", "error", "WRONGTYPE", "error"),
        # "ERR unknown command 'FOO', with args beginning with: 'bar'": the
        # comma inside the message does not make two errors.
        ("FOO", "FOO ?", "error", "ERR", "error"),
        ("SET", "SET big ?", "ok", None, "status"),
        ("GET", "GET big", "ok", None, "bulk"),
        ("RPUSH", "RPUSH biglist " + "? " * 16 + "…", "ok", None, "integer"),
        ("LRANGE", "LRANGE biglist ? ?", "ok", None, "array"),
        ("DEL", "DEL user:1 ?", "ok", None, "integer"),
        ("PING", "PING", "ok", None, "status"),
        ("SET", "SET k ? ?", "ok", None, "status"),
        ("SET", "SET k ? ?", "ok", None, "nil"),
    ]
    by_text = {r["db.query.text"]: r for r in records}
    assert by_text["LRANGE list ? ?"]["flowprobe.db.rows"] == 3
    assert by_text["HGETALL user:2"]["flowprobe.db.rows"] == 4
    assert records[8]["db.response.status_code"] == "WRONGTYPE"
    # 5,000 bytes each way: the command and the reply span 4 segments, and
    # each is one exchange timed from its first to its last segment.
    assert by_text["SET big ?"]["flowprobe.request.packets"] == 4
    assert by_text["GET big"]["flowprobe.response.packets"] == 4
    # 800 elements: the command spans 16 segments, the array reply 12, and
    # its element count survives tshark's column cap.
    biglist = by_text["LRANGE biglist ? ?"]
    assert biglist["flowprobe.response.packets"] == 12
    assert biglist["flowprobe.db.rows"] == 800
    assert records[12]["flowprobe.request.packets"] == 16
    assert "flowprobe.tcp.handshake.server_us" in records[0]
    for r in records:
        assert r["db.system.name"] == "redis"
        assert (r["client.address"], r["server.address"], r["server.port"]) == (
            CLIENT,
            SERVER,
            6379,
        )
        assert r["flowprobe.duration_us"] > 0
        assert r["flowprobe.server_response_time_us"] >= 0


@pytest.mark.capture
def test_raw_query_text_is_opt_in() -> None:
    records = read_pcap(REDIS / "resp2.pcapng", payload={"raw_query_text": True})
    texts = [r["db.query.text"] for r in records]
    assert texts[0] == "SET user:1 hello"
    assert texts[6] == "HSET user:2 name alice age 30"
    assert texts[9] == "FOO bar"
    # tshark shows the first 36 bytes of a value.
    assert texts[10] == "SET big " + "x" * 36 + "…"


@pytest.mark.capture
def test_pipelines_pair_every_reply_in_order() -> None:
    records = read_pcap(REDIS / "pipeline.pcapng")
    assert len(records) == 1 + 50 + 50 + 300 + 5 + 4
    assert all(r["flowprobe.outcome"] == "ok" for r in records)
    first = records[1:51]
    assert [r["db.query.text"] for r in first] == (
        [f"SET p:{i} ?" for i in range(20)]
        + [f"GET p:{i}" for i in range(20)]
        + ["INCRBY p:counter ?"] * 10
    )
    # 50 commands in one write (1.6 KB: two segments), 50 replies in one.
    assert len({r["start_time_unix_us"] for r in first}) == 2
    assert len({r["end_time_unix_us"] for r in first}) == 1
    assert all("flowprobe.redis.batch.errors" not in r for r in first)
    # One WRONGTYPE among 50 replies in one segment: which one is not in
    # tshark's columns, so every reply of the batch says so instead.
    second = records[51:101]
    assert [r["db.operation.name"] for r in second] == ["GET"] * 49 + ["INCRBY"]
    for r in second:
        assert r["flowprobe.redis.batch.errors"] == 1
        assert r["flowprobe.redis.batch.replies"] == 50
        assert r["flowprobe.redis.batch.error_codes"] == ["WRONGTYPE"]
    # 300 commands over 11 segments, each ending inside a command that the
    # next segment completes.
    third = records[101:401]
    assert [r["db.query.text"] for r in third] == [f"SET bulk:{i:04d} ?" for i in range(300)]
    assert len({r["start_time_unix_us"] for r in third}) > 5
    # MULTI/EXEC: every command answered (+OK, +QUEUED x3, then EXEC's array).
    tx = records[401:406]
    assert [r["db.operation.name"] for r in tx] == ["MULTI", "SET", "INCRBY", "LRANGE", "EXEC"]
    failed_tx = records[406:]
    assert [r["db.operation.name"] for r in failed_tx] == ["MULTI", "SET", "INCRBY", "EXEC"]
    assert all(r["flowprobe.redis.batch.errors"] == 1 for r in failed_tx)


@pytest.mark.capture
def test_resp3_replies_tshark_cannot_dissect_still_pair() -> None:
    records = read_pcap(REDIS / "resp3.pcapng")
    assert [(r["db.operation.name"], r["flowprobe.outcome"]) for r in records] == [
        ("HELLO", "ok"),
        ("CLIENT", "error"),  # redis-py 8 asks for maintenance notifications
        ("HSET", "ok"),
        ("HGETALL", "ok"),
        ("SADD", "ok"),
        ("SMEMBERS", "ok"),
        ("GET", "ok"),
        ("HGET", "error"),
        *[("GET", "ok")] * 10,
    ]
    assert records[0]["db.query.text"] == "HELLO ?"
    assert records[7]["error.type"] == "WRONGTYPE"
    # Ten RESP3 nulls in one segment: tshark shows one fragment flag, the
    # ten outstanding commands take the segment as their answer.
    assert len({r["end_time_unix_us"] for r in records[8:]}) == 1


@pytest.mark.capture
def test_custom_port_needs_decode_as() -> None:
    records, stats, error = run_pcap(REDIS / "port.pcapng")
    assert error is None and records == []
    assert stats.anomalies["undecoded_payload.redis"] == 0  # 6380 is not a redis port yet
    records = read_pcap(REDIS / "port.pcapng", ports={"redis": (6380,)})
    assert [(r["db.query.text"], r["server.port"]) for r in records] == [
        ("SET a ?", 6380),
        ("GET a", 6380),
        ("INCRBY a ?", 6380),
    ]


@pytest.mark.capture
def test_garbage_and_truncated_commands_against_a_real_server() -> None:
    records, stats, error = run_pcap(REDIS / "garbage.pcapng")
    assert error is None
    assert [(r.get("db.operation.name"), r["flowprobe.outcome"]) for r in records] == [
        ("GET", "ok"),
        # Random bytes after "*1\r\n$4\r\nPI": Redis answers each garbage line
        # with an error; the first pairs with the command tshark saw.
        (None, "error"),
    ]
    assert stats.anomalies["response_without_request.redis"] == 1
    # The cut SET never completed: payload on the port that never parsed.
    assert stats.anomalies["undecoded_payload.redis"] == 1


# -- hand-made columns ------------------------------------------------------


def hx(*values: str | bytes) -> str:
    return ",".join((v if isinstance(v, bytes) else v.encode()).hex() for v in values)


LAYOUT = helpers.layout(FIELDS)


def _cols(**values: str) -> list[str]:
    return helpers.columns(FIELDS, **values)


def _parser(raw: bool = False) -> RedisParser:
    return helpers.bound(RedisParser(raw_query_text=raw))


def _command(*args: str | bytes) -> dict[str, str]:
    return {
        "resp__array__length": str(len(args)),
        "resp__bulk_string__length": ",".join(
            str(len(a if isinstance(a, bytes) else a.encode())) for a in args
        ),
        "resp__bulk_string__value": hx(*(a for a in args if a)),
    }


def _pipeline(*commands: tuple[str | bytes, ...], **extra: str) -> list[str]:
    parts = [_command(*c) for c in commands]
    merged = {
        k: ",".join(p[k] for p in parts if p[k])
        for k in ("resp__array__length", "resp__bulk_string__length", "resp__bulk_string__value")
    }
    return _cols(**merged, **extra)


def _texts(messages: list[L7Message]) -> list[Any]:
    return [m.attrs.get("db.query.text") for m in messages]


def test_pipelined_commands_and_the_partial_last_one() -> None:
    p = _parser()
    state: dict[str, object] = {}
    cols = _pipeline(("SET", "a", "1"), ("GET", "a"), ("DEL", "a", "b"))
    # The last array is cut after its first bulk string: tshark flags it and
    # dissects it again, whole, on a later packet.
    cols[LAYOUT.index("resp.array.length")] += ",3"
    cols[LAYOUT.index("resp.bulk_string.length")] += ",3"
    cols[LAYOUT.index("resp.bulk_string.value")] += "," + hx("SET")
    cols[LAYOUT.index("resp.reassembled_in_next_frame")] = "✓"
    assert _texts(p.parse(cols, True, state)) == ["SET a ?", "GET a", "DEL a ?"]
    # An array header alone at the end of a packet carries no flag.
    cols = _pipeline(("PING",))
    cols[LAYOUT.index("resp.array.length")] += ",2"
    assert _texts(p.parse(cols, True, state)) == ["PING"]
    conn = state["redis"]
    assert isinstance(conn, Outstanding) and list(conn.commands) == [1, 1, 1, 1]


def test_empty_arguments_keep_values_aligned() -> None:
    # An empty bulk string has a length but no value occurrence.
    cols = _pipeline(("SET", "", "v"), ("GET", "k"))
    assert _texts(_parser(raw=True).parse(cols, True, {})) == ["SET  v", "GET k"]


def test_long_keys_are_marked_cut_and_secrets_never_leave() -> None:
    cols = _cols(
        resp__array__length="2",
        resp__bulk_string__length="3,100",
        resp__bulk_string__value=hx("GET") + "," + ("6b" * 36) + "…",
    )
    (msg,) = _parser().parse(cols, True, {})
    assert msg.attrs["db.query.text"] == "GET " + "k" * 36 + "…"
    raw = _parser(raw=True)
    for command in (("AUTH", "hunter2"), ("HELLO", "3", "AUTH", "default", "hunter2")):
        (m,) = raw.parse(_pipeline(command), True, {})
        assert "hunter2" not in str(m.attrs["db.query.text"])
    (m,) = raw.parse(_pipeline(("CONFIG", "GET", "maxmemory")), True, {})
    assert m.attrs["db.query.text"] == "CONFIG GET maxmemory"
    (m,) = _parser().parse(_pipeline(("OBJECT", "encoding", "user:7")), True, {})
    assert m.attrs["db.query.text"] == "OBJECT ENCODING user:7"


def test_values_beyond_the_column_cap_are_counted_without_names() -> None:
    commands = [("SET", f"key:{i:03d}", "v" * 40) for i in range(40)]
    cols = _pipeline(*commands)
    i_val = LAYOUT.index("resp.bulk_string.value")
    cols[i_val] = cols[i_val][:2047]  # tshark stops at 2047 characters
    messages = _parser().parse(cols, True, {})
    assert len(messages) == 40
    named = [m for m in messages if "db.operation.name" in m.attrs]
    assert 5 < len(named) < 40
    assert _texts(named) == [f"SET key:{i:03d} ?" for i in range(len(named))]


def test_capped_length_column_falls_back_to_the_partial_flag() -> None:
    cols = _pipeline(*[("GET", "k")] * 700)
    assert len(cols[LAYOUT.index("resp.bulk_string.length")]) > 2047
    cols[LAYOUT.index("resp.bulk_string.length")] = cols[LAYOUT.index("resp.bulk_string.length")][
        :2047
    ]
    assert len(_parser().parse(cols, True, {})) == 700
    cols[LAYOUT.index("resp.reassembled_in_next_frame")] = "✓"
    assert len(_parser().parse(cols, True, {})) == 699


def _replies(p: RedisParser, state: dict[str, object], **values: str) -> list[L7Message]:
    return p.parse(_cols(**values), False, state)


def _outstanding(p: RedisParser, n: int) -> dict[str, object]:
    state: dict[str, object] = {}
    p.parse(_pipeline(*[("GET", "k")] * n), True, state)
    return state


def test_reply_count_is_elements_minus_array_children() -> None:
    p = _parser()
    # +OK +QUEUED +QUEUED *2[+OK *3[$1 $1 $1]] :5 $-1
    state = _outstanding(p, 6)
    replies = _replies(
        p,
        state,
        resp__string="OK,QUEUED,QUEUED,OK",
        resp__array__length="2,3",
        resp__bulk_string__length="1,1,1,-1",
        resp__integer="5",
    )
    assert len(replies) == 6
    assert all(m.error_type is None for m in replies)
    conn = state["redis"]
    assert isinstance(conn, Outstanding) and not conn.commands and conn.replies == 0


def test_single_reply_types_and_errors() -> None:
    p = _parser()
    cases: list[tuple[dict[str, str], str, str | None]] = [
        ({"resp__string": "OK"}, "status", None),
        ({"resp__error": "WRONGTYPE Operation against a key"}, "error", "WRONGTYPE"),
        (
            {"resp__error": "ERR unknown command 'x', with args beginning with: 'a,b'"},
            "error",
            "ERR",
        ),
        ({"resp__integer": "-2"}, "integer", None),
        ({"resp__bulk_string__length": "-1"}, "nil", None),
        ({"resp__bulk_string__length": "5", "resp__bulk_string__value": hx("hello")}, "bulk", None),
        ({"resp__array__length": "-1"}, "nil", None),
        ({"resp__array__length": "0"}, "array", None),
    ]
    for values, kind, err in cases:
        (m,) = _replies(p, _outstanding(p, 1), **values)
        assert m.attrs["flowprobe.redis.reply.type"] == kind, values
        assert m.error_type == err
        if err:
            assert m.attrs["db.response.status_code"] == err


def test_errors_in_a_batch() -> None:
    p = _parser()
    two_errors = _replies(
        p, _outstanding(p, 2), resp__error="ERR wrong, very wrong,NOSCRIPT No matching script"
    )
    assert [m.error_type for m in two_errors] == ["ERR", "NOSCRIPT"]
    mixed = _replies(p, _outstanding(p, 3), resp__string="OK,OK", resp__error="WRONGTYPE x")
    assert [m.error_type for m in mixed] == [None, None, None]
    assert all(m.attrs["flowprobe.redis.batch.errors"] == 1 for m in mixed)


def test_partial_array_reply_waits_for_the_packet_that_completes_it() -> None:
    p = _parser()
    state = _outstanding(p, 1)
    # *800 cut after 300 elements; tshark flags the array.
    assert (
        _replies(
            p,
            state,
            resp__array__length="800",
            resp__bulk_string__length=",".join(["14"] * 300),
            resp__reassembled_in_next_frame="✓",
        )
        == []
    )
    (done,) = _replies(
        p, state, resp__array__length="800", resp__bulk_string__length=",".join(["14"] * 800)
    )
    assert done.attrs["flowprobe.db.rows"] == 800  # the length column was capped, not the array


def test_reply_values_go_to_their_reply_only_when_kept() -> None:
    reply = PAYLOAD_REPLY_VALUES
    off = _parser()
    (m,) = _replies(
        off,
        _outstanding(off, 1),
        resp__bulk_string__length="5",
        resp__bulk_string__value=hx("hello"),
    )
    assert reply not in m.attrs
    p = helpers.bound(RedisParser(keep_payload=True))
    # $5 $-1 $0 $3 :1 in one packet.
    replies = _replies(
        p,
        _outstanding(p, 5),
        resp__bulk_string__length="5,-1,0,3",
        resp__bulk_string__value=hx("hello", "abc"),
        resp__integer="1",
    )
    # Which value is whose cannot be told with an integer among them: all go
    # to the packet's last reply.
    assert [m.attrs.get(reply) for m in replies] == [None] * 4 + [hx("hello", "abc")]
    flat = _replies(
        p,
        _outstanding(p, 3),
        resp__bulk_string__length="5,-1,3",
        resp__bulk_string__value=hx("hello", "abc"),
    )
    assert [m.attrs.get(reply) for m in flat] == [hx("hello"), None, hx("abc")]
    # A partial array's values wait for the packet that completes it.
    state = _outstanding(p, 1)
    first = _replies(
        p,
        state,
        resp__array__length="3",
        resp__bulk_string__length="1,1",
        resp__bulk_string__value=hx("a", "b"),
        resp__reassembled_in_next_frame="✓",
    )
    assert first == []
    (done,) = _replies(
        p,
        state,
        resp__array__length="3",
        resp__bulk_string__length="1,1,1",
        resp__bulk_string__value=hx("a", "b", "c"),
    )
    assert done.attrs[reply] == hx("a", "b") + "," + hx("a", "b", "c")


def test_resp3_fragments_answer_every_outstanding_command() -> None:
    p = _parser()
    state = _outstanding(p, 3)
    replies = _replies(p, state, resp__fragment="✓", resp__bulk_string__length="2,2")
    assert len(replies) == 3
    assert "flowprobe.redis.reply.type" not in replies[0].attrs


def test_subscribe_confirmations_close_one_exchange() -> None:
    p = _parser()
    state: dict[str, object] = {}
    p.parse(_pipeline(("SUBSCRIBE", "a", "b", "c")), True, state)
    one = _replies(
        p,
        state,
        resp__array__length="3,3,3",
        resp__bulk_string__length="9,1,9,1,9,1",
        resp__integer="1,2,3",
    )
    assert len(one) == 1
    # Messages pushed later have no command: the sessionizer counts them.
    assert len(_replies(p, state, resp__array__length="3", resp__bulk_string__length="7,1,2")) == 1


def test_no_side_no_messages_and_odd_input_never_raises_unexpected() -> None:
    p = _parser()
    assert p.parse(_pipeline(("GET", "k")), None, {}) == []
    assert p.parse(_cols(), True, {}) == []
    assert p.parse(_cols(), False, {}) == []
    assert decode_value("zz") is None
    (m,) = p.parse(
        _cols(
            resp__array__length="1", resp__bulk_string__length="2", resp__bulk_string__value="zz"
        ),
        True,
        {},
    )
    assert "db.operation.name" not in m.attrs
    with pytest.raises(ValueError):
        p.parse(_cols(resp__array__length="x"), True, {})
    rnd = random.Random(6379)
    alphabet = "0123456789-,abcdefOK ERR✓…"
    n = len(LAYOUT.fields)
    state: dict[str, object] = {}
    for _ in range(5000):
        cols = [
            "".join(rnd.choice(alphabet) for _ in range(rnd.randrange(0, 20))) for _ in range(n)
        ]
        with contextlib.suppress(ValueError, IndexError, KeyError):
            p.parse(cols, rnd.choice([True, False, None]), state)
    conn = state["redis"]
    assert isinstance(conn, Outstanding) and len(conn.commands) <= 1024
    assert conn.replies == sum(conn.commands)


# -- hostile traffic through tshark -------------------------------------------


@pytest.mark.capture
def test_lost_segment_and_random_bytes_on_the_redis_port(tmp_path: Path) -> None:
    rnd = random.Random(1)
    a, b, c = conn(1, 6379), conn(2, 6379), conn(3, 6379)
    frames = [*handshake(a), a.segment(True, PSH | ACK, b"*2\r\n$3\r\nGET\r\n$1\r\nk\r\n")]
    # A 3,000-byte bulk reply whose middle segment was never captured.
    reply = b"$3000\r\n" + b"x" * 3000 + b"\r\n"
    frames.append(a.segment(False, PSH | ACK, reply[:1000]))
    a.segment(False, PSH | ACK, reply[1000:2000])  # lost
    frames += [a.segment(False, PSH | ACK, reply[2000:]), *close(a)]
    # Random bytes both ways.
    frames += handshake(b)
    for _ in range(10):
        frames.append(
            b.segment(rnd.random() < 0.5, PSH | ACK, rnd.randbytes(rnd.randrange(1, 900)))
        )
    frames += close(b)
    # A reply with no command before it (capture started mid-connection).
    frames += [c.segment(False, PSH | ACK, b"+OK\r\n:1\r\n"), *close(c)]
    records, stats, error = run_pcap(write(tmp_path / "r.pcap", frames))
    assert error is None
    assert stats.packets == len(frames)
    got = [(r["client.port"], r.get("db.operation.name"), r["flowprobe.outcome"]) for r in records]
    assert got[0] == (40001, "GET", "no_response")
    assert stats.anomalies["response_without_request.redis"] >= 2
