"""The column layout tshark prints for every packet.

tshark's columns with ``-T tabs`` are the cheapest way to get selected fields
out of its dissectors (see docs/capture.md for the measurements), so the whole
agent agrees on one ordered list of columns: the L4 columns every packet needs
first, then each protocol parser's fields.

What a column costs tshark was measured per packet: a built-in column (time,
addresses, ports) almost nothing, because the dissectors fill it anyway; a
custom column about 0.13 µs for every field it names, present in the packet or
not, and ``frame.protocols`` three times that. So the L4 columns are built-ins
where one exists, and the protocol of a packet is told by which parser's
fields it carries, not by ``frame.protocols``.
"""

from __future__ import annotations

from collections.abc import Iterable, Sequence
from dataclasses import dataclass
from functools import cached_property

# L4 columns, in this order, at the start of every row. Entries starting with
# "%" are tshark's built-in column formats (unresolved time/address/port; the
# time format is set with ``-t e``); the others are fields, where ``a or b`` is
# tshark's custom-column syntax for "whichever is present". A fast
# retransmission carries tcp.analysis.retransmission as well.
CORE_COLUMNS: tuple[str, ...] = (
    "%t",
    "%uns",
    "%uS",
    "%und",
    "%uD",
    "tcp.len or udp.length",
    "tcp.flags",
    "tcp.analysis.retransmission",
    "tcp.analysis.out_of_order",
    "tcp.analysis.zero_window",
    "tcp.analysis.ack_rtt",
)

# A TCP packet always has flags; their absence marks UDP. Source and
# destination are not adjacent on purpose: tshark puts an arrow between
# adjacent source and destination columns. It also pads short addresses with
# spaces, so SRC and DST need stripping.
TS, SRC, SPORT, DST, DPORT, PAYLOAD_LEN, TCP_FLAGS = range(7)
RETRANS, OUT_OF_ORDER, ZERO_WINDOW, ACK_RTT = range(7, 11)


def parse_ts_us(s: str) -> int:
    """tshark's epoch time column (``-t e``) in µs, cut (not rounded) to the µs."""
    # Nine decimals for nanosecond captures, six for microsecond ones: their
    # digits joined make one int(), ~100 ns a row cheaper than two.
    n = len(s)
    if n > 10 and s[n - 10] == ".":
        return int(s[: n - 10] + s[n - 9 : n - 3])
    if n > 7 and s[n - 7] == ".":
        return int(s[: n - 7] + s[n - 6 :])
    sec, _, frac = s.partition(".")
    return int(sec) * 1_000_000 + int((frac + "000000")[:6])


@dataclass(frozen=True)
class ColumnLayout:
    """Column -> index, shared by tshark's command line and the parsers.

    Each entry of ``fields`` is one tshark column: a built-in format, a field,
    or several fields joined with ``or`` that never occur in the same packet.
    """

    fields: tuple[str, ...]

    @classmethod
    def build(
        cls,
        protocol_fields: Iterable[str] = (),
        shared: Iterable[Sequence[str]] = (),
        protocols: Iterable[str] = (),
    ) -> ColumnLayout:
        """Core columns; a column per protocol in ``protocols`` (its tshark
        name, which tshark prints as a check mark when the packet carries the
        protocol); a column per field of ``protocol_fields``; then the fields
        of the ``shared`` groups, where the i-th fields of all groups share the
        i-th column. Groups are the fields of protocols that never share a
        packet, so each such column holds one protocol's value at most, and a
        column costs tshark more than the fields in it.
        """
        columns = list(CORE_COLUMNS)
        placed = set(CORE_COLUMNS)
        for field in (*protocols, *protocol_fields):
            if field not in placed:
                columns.append(field)
                placed.add(field)
        slots: list[list[str]] = []
        for group in shared:
            fresh = [f for f in dict.fromkeys(group) if f not in placed]
            placed.update(fresh)
            for i, field in enumerate(fresh):
                if i == len(slots):
                    slots.append([])
                slots[i].append(field)
        return cls(tuple(columns) + tuple(" or ".join(slot) for slot in slots))

    @cached_property
    def _column_of(self) -> dict[str, int]:
        """Each column's expression and each field in it -> the column."""
        out: dict[str, int] = {}
        for i, column in enumerate(self.fields):
            out[column] = i
            for f in column.split(" or "):
                out[f] = i
        return out

    def index(self, field: str) -> int:
        try:
            return self._column_of[field]
        except KeyError:
            raise ValueError(f"{field!r} is in no column") from None

    def indices(self, fields: Sequence[str]) -> tuple[int, ...]:
        return tuple(self.index(f) for f in fields)

    def tshark_option(self) -> str:
        """The ``gui.column.format`` preference that makes tshark print these columns."""
        parts = []
        for i, column in enumerate(self.fields):
            spec = column if column.startswith("%") else f"%Cus:{column}"
            parts.append(f'"c{i}","{spec}"')
        return "gui.column.format:" + ",".join(parts)
