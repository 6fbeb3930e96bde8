"""The column layout tshark prints for every packet.

tshark's custom columns with ``-T tabs`` are the cheapest way to get selected
fields out of its dissectors (see docs/capture.md for the measurements), so the
whole agent agrees on one ordered list of fields: the L4 fields every packet
needs first, then each protocol parser's fields.
"""

from __future__ import annotations

from collections.abc import Iterable, Sequence
from dataclasses import dataclass

# L4 fields, in this order, at the start of every row. ``a or b`` is tshark's
# custom-column syntax for "whichever is present", which keeps IPv4/IPv6 and
# TCP/UDP in one column each.
CORE_FIELDS: tuple[str, ...] = (
    "frame.time_epoch",
    "ip.src or ipv6.src",
    "ip.dst or ipv6.dst",
    "tcp.srcport or udp.srcport",
    "tcp.dstport or udp.dstport",
    "tcp.len or udp.length",
    "tcp.flags",
    "tcp.analysis.retransmission or tcp.analysis.fast_retransmission",
    "tcp.analysis.out_of_order",
    "tcp.analysis.zero_window",
    "tcp.analysis.ack_rtt",
    "frame.protocols",
)

# Every column costs tshark about 1 µs per packet, so only what is read is here.
# A TCP packet always has flags; their absence marks UDP.
TS, SRC, DST, SPORT, DPORT, PAYLOAD_LEN, TCP_FLAGS = range(7)
RETRANS, OUT_OF_ORDER, ZERO_WINDOW, ACK_RTT, PROTOCOLS = range(7, 12)


@dataclass(frozen=True)
class ColumnLayout:
    """Field name -> column index, shared by tshark's command line and the parsers."""

    fields: tuple[str, ...]

    @classmethod
    def build(cls, protocol_fields: Iterable[str]) -> ColumnLayout:
        extra: list[str] = []
        for field in protocol_fields:
            if field not in CORE_FIELDS and field not in extra:
                extra.append(field)
        return cls(CORE_FIELDS + tuple(extra))

    def index(self, field: str) -> int:
        return self.fields.index(field)

    def indices(self, fields: Sequence[str]) -> tuple[int, ...]:
        return tuple(self.fields.index(f) for f in fields)

    def tshark_option(self) -> str:
        """The ``gui.column.format`` preference that makes tshark print these columns."""
        parts = []
        for i, field in enumerate(self.fields):
            parts.append(f'"c{i}","%Cus:{field}"')
        return "gui.column.format:" + ",".join(parts)
