"""The contract every protocol parser fulfils."""

from __future__ import annotations

from collections.abc import Sequence
from typing import Protocol

from flowprobe.agent.capture.columns import ColumnLayout
from flowprobe.agent.parse.messages import L7Message


class Parser(Protocol):
    """Turns one packet's tshark columns into L7 messages.

    ``name`` is the protocol's name in records and configuration; ``tshark_name``
    the dissector (for decode-as and enabling); ``fields`` the tshark fields it
    reads; tshark_name is also its protocol field.
    """

    name: str
    tshark_name: str
    default_ports: tuple[int, ...]
    # Transports the protocol runs over; decode-as rules are made for each.
    transports: tuple[str, ...]
    fields: tuple[str, ...]
    # Whether the fields may share tshark columns with other protocols' fields
    # (see ColumnLayout.build): true unless a packet can carry this protocol
    # together with another one the agent parses.
    shares_columns: bool

    def bind(self, layout: ColumnLayout) -> None:
        """Resolve column indices once, before the first packet."""

    def parse(
        self, cols: Sequence[str], from_client: bool | None, state: dict[str, object]
    ) -> list[L7Message]:
        """Messages in this packet. ``state`` is per-connection scratch space."""
        ...


def split_occurrences(value: str) -> list[str]:
    """tshark joins repeated fields with commas; an empty column has none."""
    return value.split(",") if value else []


def int_occurrences(value: str) -> list[int]:
    return [int(v) for v in split_occurrences(value)]


# tshark 4.0 cuts every custom column at 2047 bytes (COL_MAX_LEN, 2048 with the
# terminating NUL), silently: a column that long may have lost occurrences,
# and its last one may be cut short (docs/capture.md).
COLUMN_LIMIT = 2047


def column_cut(value: str, margin: int = 0) -> bool:
    """Whether tshark may have cut this column: its bytes reach the limit, or
    come within ``margin`` of it (some columns stop a few bytes early)."""
    limit = COLUMN_LIMIT - margin
    # The character count first: fewer than limit/4 cannot make limit bytes.
    return len(value) >= limit // 4 and len(value.encode()) >= limit


def occurrences(value: str, margin: int = 0) -> list[str]:
    """``split_occurrences``, without the last one if the column was cut.

    At the cut tshark may leave half an occurrence, glued to the one before
    (``...,75,767`` for 75, 76, 77).
    """
    items = split_occurrences(value)
    if items and column_cut(value, margin):
        items.pop()
    return items


# Characters of values (result rows, replies, bound parameters) kept per
# request or response for in-agent inspection, whatever its size.
MAX_VALUES_CHARS = 8192


def keep_values(kept: list[str], column: str) -> None:
    """Add a segment's values to ``kept`` up to MAX_VALUES_CHARS in all."""
    room = MAX_VALUES_CHARS - sum(len(v) for v in kept)
    if room > 0:
        kept.append(column[:room])
