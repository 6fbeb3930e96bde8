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
