"""Redis commands and replies from tshark's ``resp`` dissector.

What tshark 4.0 gives, and why this parser counts instead of reading in order:

- Each RESP type is its own field (``resp.array.length``, ``resp.bulk_string.length``,
  ``resp.string``, ``resp.error``, ``resp.integer``…), and a custom column joins
  one field's occurrences with commas. Nested arrays are flattened and the
  order *across* fields is lost: a packet carrying ``+OK`` ``-ERR`` ``:1``
  says "one string, one error, one integer" but not which came first.
- Bulk string values are bytes printed as hex, cut to 36 bytes (a trailing
  "…" marks the cut), and every column stops at 2047 characters.
- The dissector handles RESP2 only: RESP3 types (maps, sets, nulls, doubles…)
  become ``resp.fragment`` lines, and a flag field shows one check mark however
  many there are.
- A top-level element that does not fit in the packet is dissected as far as
  it goes and then reassembled from its start on a later packet: the partial
  part shows up twice. An array cut this way carries
  ``resp.reassembled_in_next_frame``; a cut bulk string adds nothing.

So, per packet:

- Commands (client to server) are flat arrays of bulk strings: walking the
  array lengths over the bulk lengths gives every complete command, and a last
  array with too few bulk strings is the partial one. The command name is the
  first bulk value, the key the second for keyed commands; values past the
  column budget (about 20 SETs with 40-byte values, or 80 short GETs, in one
  packet) are unknown, the command is still counted.
- Replies (server to client): every element is a top-level reply or a child of
  an array, so ``replies = elements - sum(array lengths)``. Exact unless the
  packet ends in a partial array (then a lower bound; the partial reply is
  counted on the packet that completes it), a column hit the 2047-character
  cap, or RESP3-only types are present: then the packet is taken to answer
  every outstanding command (one reply expected: exact; pipelines: counts stay
  right, some end times move to the packet of the last reply).
- Which reply of several in one packet was an error cannot be told. A packet
  with one reply, with errors only, or without errors is exact; otherwise each
  reply of the packet gets ``flowprobe.redis.batch.errors`` (and the error
  codes) and no outcome ``error``.

Records: ``db.system.name`` "redis", ``db.operation.name`` (command, upper
case), ``db.query.text`` (command, subcommand, the key, ``?`` for every other
argument; raw arguments only with ``raw_query_text``, and never for AUTH/HELLO/
ACL/MIGRATE), ``db.response.status_code`` and ``error.type`` (the error's
first word, e.g. ``WRONGTYPE``), ``flowprobe.redis.reply.type`` and
``flowprobe.db.rows`` (array length) when the packet held exactly one reply.

With ``keep_payload`` (sensitive-data detection on), the arguments and the
bulk-string reply values (hex, 36 bytes each at most) also go on the messages
under ``flowprobe.payload.*``, for the security stage only (docs/security.md).
"""

from __future__ import annotations

import re
from collections import deque
from collections.abc import Sequence

from flowprobe.agent.capture.columns import ColumnLayout
from flowprobe.agent.parse.base import (
    column_cut,
    int_occurrences,
    keep_values,
    split_occurrences,
)
from flowprobe.agent.parse.messages import (
    PAYLOAD_QUERY,
    PAYLOAD_REPLY_VALUES,
    AttrValue,
    L7Message,
)

FIELDS = (
    "resp.array.length",
    "resp.bulk_string.length",
    "resp.bulk_string.value",
    "resp.string",
    "resp.error",
    "resp.integer",
    "resp.fragment",
    "resp.reassembled_in_next_frame",
)

# Outstanding commands remembered per connection, the sessionizer's own
# per-flow limit: beyond it both drop the oldest, so they stay in step.
MAX_OUTSTANDING = 1024
# Arguments (or their "?") written per command before the rest is elided.
MAX_ARGS = 16


# Commands whose first argument is a key (the rest are values or options).
def _words(text: str) -> frozenset[str]:
    return frozenset(text.split())


KEY_AT_1 = _words(
    """
    APPEND BITCOUNT BITFIELD BITFIELD_RO BITPOS BLMOVE BLMPOP BLPOP BRPOP BRPOPLPUSH
    BZPOPMAX BZPOPMIN COPY DECR DECRBY DEL DUMP EXISTS EXPIRE EXPIREAT EXPIRETIME
    GEOADD GEODIST GEOHASH GEOPOS GEORADIUS GEORADIUSBYMEMBER GEOSEARCH GEOSEARCHSTORE
    GET GETBIT GETDEL GETEX GETRANGE GETSET HDEL HEXISTS HGET HGETALL HINCRBY
    HINCRBYFLOAT HKEYS HLEN HMGET HMSET HRANDFIELD HSCAN HSET HSETNX HSTRLEN HVALS
    INCR INCRBY INCRBYFLOAT LINDEX LINSERT LLEN LMOVE LMPOP LPOP LPOS LPUSH LPUSHX
    LRANGE LREM LSET LTRIM MGET MOVE MSET MSETNX PERSIST PEXPIRE PEXPIREAT PEXPIRETIME
    PFADD PFCOUNT PFMERGE PSETEX PTTL RENAME RENAMENX RESTORE RPOP RPOPLPUSH RPUSH
    RPUSHX SADD SCARD SDIFF SDIFFSTORE SET SETBIT SETEX SETNX SETRANGE SINTER
    SINTERCARD SINTERSTORE SISMEMBER SMEMBERS SMISMEMBER SMOVE SORT SORT_RO SPOP
    SRANDMEMBER SREM SSCAN STRLEN SUBSTR SUNION SUNIONSTORE TOUCH TTL TYPE UNLINK WATCH
    XACK XADD XAUTOCLAIM XCLAIM XDEL XLEN XPENDING XRANGE XREVRANGE XSETID XTRIM ZADD
    ZCARD ZCOUNT ZDIFFSTORE ZINCRBY ZINTERSTORE ZLEXCOUNT ZMPOP ZMSCORE ZPOPMAX ZPOPMIN
    ZRANDMEMBER ZRANGE ZRANGEBYLEX ZRANGEBYSCORE ZRANGESTORE ZRANK ZREM ZREMRANGEBYLEX
    ZREMRANGEBYRANK ZREMRANGEBYSCORE ZREVRANGE ZREVRANGEBYLEX ZREVRANGEBYSCORE
    ZREVRANK ZSCAN ZSCORE ZUNIONSTORE LCS PUBLISH SPUBLISH
    """
)
# Container commands: the subcommand is kept; these take their key after it.
SUBCOMMAND = _words(
    """
    ACL CLIENT CLUSTER COMMAND CONFIG DEBUG FUNCTION LATENCY MEMORY MODULE OBJECT
    PUBSUB SCRIPT SLOWLOG XGROUP XINFO
    """
)
KEY_AFTER_SUBCOMMAND = frozenset({"MEMORY", "OBJECT", "XGROUP", "XINFO"})
# Arguments that are credentials: masked even when raw query text is on.
SECRET_ARGS = frozenset({"ACL", "AUTH", "HELLO", "MIGRATE"})
# One reply per channel argument.
PER_CHANNEL_REPLY = frozenset(
    {"PSUBSCRIBE", "PUNSUBSCRIBE", "SSUBSCRIBE", "SSUNSUBSCRIBE", "SUBSCRIBE", "UNSUBSCRIBE"}
)

_COMMAND_NAME = re.compile(r"^[A-Za-z][A-Za-z0-9_|.-]*$")
# Status replies rarely contain commas, and then with a space after them.
_STATUS_SPLIT = re.compile(r",(?! )")
# An error starts with an upper-case code word ("WRONGTYPE Operation..."); a
# comma inside a message ("unknown command 'x', with args...") is not
# followed by one.
_ERROR_SPLIT = re.compile(r",(?=[A-Z][A-Z0-9_-]*(?: |,|$))")


def decode_value(occurrence: str) -> tuple[bytes, bool] | None:
    """A bulk string value as tshark prints it (hex, "…" after 36 bytes) -> (bytes, was cut)."""
    cut = occurrence.endswith("…")
    text = occurrence[:-1] if cut else occurrence
    try:
        return bytes.fromhex(text), cut
    except ValueError:
        return None


def _text(value: tuple[bytes, bool] | None) -> str:
    if value is None:
        return "?"
    raw, cut = value
    return raw.decode("utf-8", "backslashreplace") + ("…" if cut else "")


def error_code(message: str) -> str:
    word = message.split(" ", 1)[0]
    return word if word else "ERR"


class Outstanding:
    """Per connection: replies still expected, per command in order."""

    __slots__ = ("commands", "replies", "values")

    def __init__(self) -> None:
        self.commands: deque[int] = deque()
        self.replies = 0
        # Reply values (hex) seen in packets that completed no reply yet,
        # kept for inspection until the reply they belong to ends.
        self.values: list[str] = []

    def push(self, replies: int) -> None:
        if len(self.commands) >= MAX_OUTSTANDING:
            self.replies -= self.commands.popleft()
        self.commands.append(replies)
        self.replies += replies

    def pop(self) -> bool:
        """One reply arrived; True when it completes its command (or has none)."""
        if not self.commands:
            return True
        self.replies -= 1
        self.commands[0] -= 1
        if self.commands[0] > 0:
            return False
        self.commands.popleft()
        return True


class RedisParser:
    name = "redis"
    tshark_name = "resp"
    default_ports: tuple[int, ...] = (6379,)
    transports: tuple[str, ...] = ("tcp",)
    shares_columns = True
    fields: tuple[str, ...] = FIELDS

    def __init__(self, raw_query_text: bool = False, keep_payload: bool = False) -> None:
        self.raw_query_text = raw_query_text
        self.keep_payload = keep_payload
        self._idx: tuple[int, ...] = ()

    def bind(self, layout: ColumnLayout) -> None:
        self._idx = layout.indices(FIELDS)

    def parse(
        self, cols: Sequence[str], to_server: bool | None, state: dict[str, object]
    ) -> list[L7Message]:
        if to_server is None:
            # Commands and array replies look alike; without a side nothing
            # can be paired.
            return []
        conn = state.get("redis")
        if not isinstance(conn, Outstanding):
            conn = state["redis"] = Outstanding()
        if to_server:
            return self._commands(cols, conn)
        return self._replies(cols, conn)

    # -- client to server -------------------------------------------------

    def _commands(self, cols: Sequence[str], conn: Outstanding) -> list[L7Message]:
        i_arr, i_blen, i_bval, *_rest, i_partial = self._idx
        arrays = [
            a for a in int_occurrences(cols[i_arr]) if a > 0
        ]  # *0 and *-1 are ignored by Redis
        if not arrays:
            return []
        lens_col, vals_col = cols[i_blen], cols[i_bval]
        lens = int_occurrences(lens_col)
        values = split_occurrences(vals_col)
        if column_cut(vals_col, 80) and values:
            values.pop()  # possibly cut mid-value
        if column_cut(lens_col, 24):
            # Bulk lengths are incomplete: take every array as complete but
            # the one tshark flagged as continued in a later packet.
            spans: list[tuple[int, int]] = []
            pos = 0
            for a in arrays:
                spans.append((pos, a))
                pos += a
            if cols[i_partial]:
                spans.pop()
        else:
            spans = []
            pos = 0
            for a in arrays:
                if pos + a > len(lens):
                    break  # the partial command, dissected again later
                spans.append((pos, a))
                pos += a
        # Values exist only for non-empty bulk strings.
        value_at: list[int] = []
        v = 0
        for n in lens:
            value_at.append(v if n > 0 else -1)
            if n > 0:
                v += 1

        def value(k: int) -> tuple[bytes, bool] | None:
            if k >= len(value_at):
                return None
            if value_at[k] < 0:
                return (b"", False) if lens[k] == 0 else None
            return decode_value(values[value_at[k]]) if value_at[k] < len(values) else None

        out: list[L7Message] = []
        for start, argc in spans:
            attrs: dict[str, AttrValue] = {
                "db.system.name": "redis",
                "network.protocol.name": "redis",
            }
            name_v = value(start)
            name = _text(name_v).upper() if name_v is not None else None
            replies = 1
            if name is not None and _COMMAND_NAME.match(name):
                attrs["db.operation.name"] = name
                args = [value(start + k) for k in range(1, argc)]
                attrs["db.query.text"] = self._query_text(name, args)
                if self.keep_payload and name not in SECRET_ARGS:
                    # For in-agent inspection only (security/ removes it).
                    attrs[PAYLOAD_QUERY] = " ".join(_text(a) for a in args[:MAX_ARGS])
                if name in PER_CHANNEL_REPLY and argc > 1:
                    replies = argc - 1
            conn.push(replies)
            out.append(L7Message("redis", True, attrs))
        return out

    def _query_text(self, name: str, args: list[tuple[bytes, bool] | None]) -> str:
        parts = [name]
        rest = args
        if name in SUBCOMMAND and args:
            sub = _text(args[0]).upper()
            parts.append(sub if _COMMAND_NAME.match(sub) else "?")
            rest = args[1:]
            if name in KEY_AFTER_SUBCOMMAND and rest:
                parts.append(_text(rest[0]))
                rest = rest[1:]
        elif name in KEY_AT_1 and args:
            parts.append(_text(args[0]))
            rest = args[1:]
        if self.raw_query_text and name not in SECRET_ARGS:
            parts.extend(_text(a) for a in rest[:MAX_ARGS])
        else:
            parts.extend("?" for _ in rest[:MAX_ARGS])
        if len(rest) > MAX_ARGS:
            parts.append("…")
        return " ".join(parts)

    # -- server to client -------------------------------------------------

    def _replies(self, cols: Sequence[str], conn: Outstanding) -> list[L7Message]:
        i_arr, i_blen, i_bval, i_str, i_err, i_int, i_frag, i_partial = self._idx
        outstanding = conn.replies
        arr_col, blen_col, str_col, err_col, int_col = (
            cols[i_arr],
            cols[i_blen],
            cols[i_str],
            cols[i_err],
            cols[i_int],
        )
        arrays = int_occurrences(arr_col)
        n_bulk = len(split_occurrences(blen_col))
        n_int = len(split_occurrences(int_col))
        statuses = _STATUS_SPLIT.split(str_col) if str_col else []
        errors = _ERROR_SPLIT.split(err_col) if err_col else []
        partial = bool(cols[i_partial])
        unknown_types = bool(cols[i_frag])
        cut = (
            column_cut(arr_col, 24)
            or column_cut(blen_col, 24)
            or column_cut(int_col, 24)
            or column_cut(str_col, 80)
            or column_cut(err_col, 80)
        )
        elements = len(arrays) + n_bulk + n_int + len(statuses) + len(errors)
        raw = elements - sum(a for a in arrays if a > 0)
        exact = not (partial or unknown_types or cut)
        if exact:
            count = max(raw, 0)
        elif partial:
            # The partial reply answers an outstanding command itself.
            count = 0 if unknown_types or cut else min(max(raw, 0), max(outstanding - 1, 0))
        else:
            count = outstanding or max(raw, 0)

        attrs_each: list[dict[str, AttrValue]] = [{} for _ in range(count)]
        errs: list[str | None] = [None] * count
        # One reply in the packet: its type is whatever the packet holds (an
        # array if any array is there). A capped column only hides the
        # array's elements.
        single = count == 1 and (
            (exact and raw == 1) or (cut and not partial and not unknown_types and outstanding == 1)
        )
        if single:
            only = attrs_each[0]
            if arrays:
                only["flowprobe.redis.reply.type"] = "array" if arrays[0] >= 0 else "nil"
                only["flowprobe.db.rows"] = max(arrays[0], 0)
            elif errors:
                errs[0] = error_code(errors[0])
                only["flowprobe.redis.reply.type"] = "error"
            elif statuses:
                only["flowprobe.redis.reply.type"] = "status"
            elif n_int:
                only["flowprobe.redis.reply.type"] = "integer"
            elif n_bulk:
                first = split_occurrences(blen_col)[0]
                only["flowprobe.redis.reply.type"] = "nil" if first.startswith("-") else "bulk"
        elif errors and count:
            if not arrays and len(errors) == count and exact:
                errs = [error_code(e) for e in errors]
            else:
                codes: list[str] = sorted({error_code(e) for e in errors})
                for a in attrs_each:
                    a["flowprobe.redis.batch.replies"] = count
                    a["flowprobe.redis.batch.errors"] = len(errors)
                    a["flowprobe.redis.batch.error_codes"] = codes

        if self.keep_payload and cols[i_bval]:
            _attach_values(conn, attrs_each, blen_col, cols[i_bval], exact and not arrays)

        out: list[L7Message] = []
        for attrs, err in zip(attrs_each, errs, strict=True):
            # Replies beyond the commands seen (capture started mid-connection,
            # pushes) still go out: the sessionizer counts them as anomalies.
            if not conn.pop():
                continue  # a further confirmation of a multi-channel SUBSCRIBE
            if err is not None:
                attrs["db.response.status_code"] = err
            out.append(L7Message("redis", False, attrs, error_type=err))
        return out


def _attach_values(
    conn: Outstanding,
    replies: list[dict[str, AttrValue]],
    lens_col: str,
    values_col: str,
    flat: bool,
) -> None:
    """Put the packet's bulk values (hex) on the replies they belong to, for inspection.

    ``flat``: every reply of the packet is one element (no arrays, nothing
    cut), so only bulk replies have a length, in order, and the n-th non-empty
    one has the n-th value; with as many lengths as replies, all are bulk.
    Otherwise the column does not say which value is
    whose: they all go to the last reply of the packet, or wait in ``conn``
    for the reply a later packet completes.
    """
    lens = split_occurrences(lens_col)
    values = split_occurrences(values_col)
    if flat and not conn.values and len(lens) == len(replies):
        v = 0
        for attrs, n in zip(replies, lens, strict=True):
            if n not in ("0", "-1") and v < len(values):
                attrs[PAYLOAD_REPLY_VALUES] = values[v]
                v += 1
        return
    keep_values(conn.values, values_col)
    if replies:
        replies[-1][PAYLOAD_REPLY_VALUES] = ",".join(conn.values)
        conn.values = []
