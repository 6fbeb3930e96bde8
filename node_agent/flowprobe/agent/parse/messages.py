"""Typed records that leave the parsers."""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

AttrValue = str | int | float | bool | list[str]

# Payload kept for in-agent inspection only (security/), when it is enabled;
# the security stage removes these attributes before any record, span or
# metric is made of the exchange. Values are tshark's escaped column text.
PAYLOAD_PREFIX = "flowprobe.payload."
PAYLOAD_REQUEST_HEADERS = PAYLOAD_PREFIX + "request.headers"
PAYLOAD_REQUEST_BODY = PAYLOAD_PREFIX + "request.body"
PAYLOAD_RESPONSE_HEADERS = PAYLOAD_PREFIX + "response.headers"
PAYLOAD_RESPONSE_BODY = PAYLOAD_PREFIX + "response.body"
# Statement text before sanitising (SQL) or with its arguments (Redis).
PAYLOAD_QUERY = PAYLOAD_PREFIX + "query"
# Parameter values a client bound to a statement, and the values a server
# returned (PostgreSQL rows, Redis bulk replies: tshark's hex of each value,
# comma-joined, Redis's cut after 36 bytes with "…").
PAYLOAD_QUERY_VALUES = PAYLOAD_PREFIX + "query.values"
PAYLOAD_REPLY_VALUES = PAYLOAD_PREFIX + "reply.values"
# Values a server returned as text (MySQL result rows: tshark's escaped text
# of each value, comma-joined).
PAYLOAD_REPLY_TEXT = PAYLOAD_PREFIX + "reply.text"


@dataclass(slots=True)
class L7Message:
    """One request or response (or a piece of a multi-packet response) seen in a packet.

    ``key`` pairs responses with requests inside one connection: ``None`` means
    first-in first-out (HTTP/1.x, Redis, SQL), otherwise the protocol's own
    identifier (DNS transaction id, HTTP/2 stream id).
    """

    protocol: str
    is_request: bool
    attrs: dict[str, AttrValue] = field(default_factory=dict)
    key: Any = None
    # A response piece that does not end the exchange (PostgreSQL rows before
    # ReadyForQuery, HTTP 100 Continue, gRPC headers before trailers).
    final: bool = True
    error_type: str | None = None
    # HTTP 101 and similar: after this response the connection no longer
    # carries the protocol, so nothing more is parsed on it.
    upgrade: bool = False
    # A complete message that belongs to no exchange (authentication steps,
    # a command the server never answers): it only marks that its side has
    # finished sending, so the next message's start is taken after it.
    control: bool = False

    # Written out, not generated (see the note in sessionize/records.py): one per message.
    def __init__(
        self,
        protocol: str,
        is_request: bool,
        attrs: dict[str, AttrValue] | None = None,
        key: Any = None,
        final: bool = True,
        error_type: str | None = None,
        upgrade: bool = False,
        control: bool = False,
    ) -> None:
        self.protocol = protocol
        self.is_request = is_request
        self.attrs = {} if attrs is None else attrs
        self.key = key
        self.final = final
        self.error_type = error_type
        self.upgrade = upgrade
        self.control = control
