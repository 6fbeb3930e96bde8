"""The payload the parsers kept for inspection, taken off the exchange and decoded.

tshark prints strings escaped: ``\\r``, ``\\n``, ``\\t`` and other control
bytes as ``\\ooo`` (octal); header lines end in an escaped CRLF and are
joined by commas; invalid UTF-8 becomes U+FFFD and a NUL byte ends the
text. So binary bodies arrive damaged, text bodies intact (a literal
backslash followed by ``n`` in a body cannot be told from an escaped
newline), and a column stops at 2047 characters.
"""

from __future__ import annotations

import re
from dataclasses import dataclass, field

from flowprobe.agent.parse.messages import (
    PAYLOAD_PREFIX,
    PAYLOAD_QUERY,
    PAYLOAD_QUERY_VALUES,
    PAYLOAD_REPLY_TEXT,
    PAYLOAD_REPLY_VALUES,
    PAYLOAD_REQUEST_BODY,
    PAYLOAD_REQUEST_HEADERS,
    PAYLOAD_RESPONSE_BODY,
    PAYLOAD_RESPONSE_HEADERS,
    AttrValue,
)

_ESCAPE = re.compile(r"\\(?:[0-7]{3}|[nrtabfv])")
_NAMED = {"n": "\n", "r": "\r", "t": "\t", "a": "\a", "b": "\b", "f": "\f", "v": "\v"}
_LINE_END = "\\r\\n"


def unescape(text: str) -> str:
    if "\\" not in text:
        return text
    return _ESCAPE.sub(
        lambda m: _NAMED[m.group()[1]] if len(m.group()) == 2 else chr(int(m.group()[1:], 8)),
        text,
    )


def header_lines(column: str) -> list[tuple[str, str]]:
    """``Host: a\\r\\n,Accept: */*\\r\\n`` as [("Host", "a"), ("Accept", "*/*")].

    Values may contain commas themselves; each line ends with an escaped
    CRLF, which is what separates them. A line cut at the column limit is kept.
    """
    out: list[tuple[str, str]] = []
    for line in column.split(_LINE_END + ","):
        line = line.removesuffix(_LINE_END)
        name, sep, value = line.partition(":")
        if sep and name:
            out.append((name.strip(), unescape(value.strip())))
    return out


def hex_values(column: str) -> str:
    """tshark's comma-joined hex of each value (``616263,31``) as text, one value a line.

    A value cut at a column or size limit loses its odd last digit, and the
    "…" tshark puts after the first 36 bytes of some byte fields.
    """
    out = []
    for item in column.split(","):
        item = item.removesuffix("…")
        try:
            out.append(bytes.fromhex(item[: len(item) - len(item) % 2]).decode("utf-8", "replace"))
        except ValueError:
            continue
    return "\n".join(out)


@dataclass(slots=True)
class Payload:
    request_headers: list[tuple[str, str]] = field(default_factory=list)
    request_body: str = ""
    response_headers: list[tuple[str, str]] = field(default_factory=list)
    response_body: str = ""
    query: str = ""
    query_values: str = ""
    reply_values: str = ""

    def texts(self) -> list[tuple[str, str]]:
        """(where, text) of every part, for the sensitive-data scan."""
        out = [(f"request.header.{k.lower()}", v) for k, v in self.request_headers]
        out += [("request.body", self.request_body), ("query", self.query)]
        out.append(("query.values", self.query_values))
        out += [(f"response.header.{k.lower()}", v) for k, v in self.response_headers]
        out += [("response.body", self.response_body), ("reply.values", self.reply_values)]
        return [(where, text) for where, text in out if text]


def strip(attrs: dict[str, AttrValue]) -> None:
    """Remove the payload without decoding it (an exchange that is not inspected)."""
    for key in [k for k in attrs if k.startswith(PAYLOAD_PREFIX)]:
        del attrs[key]


def take(attrs: dict[str, AttrValue], body_max: int) -> Payload:
    """Remove the payload attributes from ``attrs`` and decode them."""

    def pop(key: str) -> str:
        value = attrs.pop(key, "")
        return value if isinstance(value, str) else ""

    return Payload(
        request_headers=header_lines(pop(PAYLOAD_REQUEST_HEADERS)),
        request_body=unescape(pop(PAYLOAD_REQUEST_BODY))[:body_max],
        response_headers=header_lines(pop(PAYLOAD_RESPONSE_HEADERS)),
        response_body=unescape(pop(PAYLOAD_RESPONSE_BODY))[:body_max],
        query=pop(PAYLOAD_QUERY),
        query_values=hex_values(pop(PAYLOAD_QUERY_VALUES)),
        reply_values="\n".join(
            t
            for t in (hex_values(pop(PAYLOAD_REPLY_VALUES)), unescape(pop(PAYLOAD_REPLY_TEXT)))
            if t
        ),
    )
