"""Top-N talkers over a sliding window, on exchange time.

The window is ``slots`` equal slots aligned to the epoch; each slot holds,
per member (a client address, a workload name), the six figures of
:data:`METRICS`. The window slides a slot at a time: a slot leaves it once
it is wholly older than the window, so what is ranked covers between
``window - slot`` and ``window`` of traffic. Time is what the caller says
(exchange timestamps; wall time only to age an idle window), so a replayed
pcap ranks as the live traffic did.

Memory is bounded: at most ``max_members`` members per slot; an exchange of
a member beyond that is not ranked (counted in :attr:`SlidingTopN.overflow`).
Ranking sums each member over the slots, O(members x slots), once per
metric export, never per exchange.
"""

from __future__ import annotations

import heapq
from collections import deque
from collections.abc import Sequence

# The figures of each exchange, in this order; latency is ranked by its mean.
METRICS = ("requests", "errors", "bytes", "latency", "retransmits", "resets")
REQUESTS, ERRORS, BYTES, LATENCY, RETRANSMITS, RESETS = range(len(METRICS))

Ranking = list[tuple[str, float]]


class SlidingTopN:
    def __init__(self, size: int, window_us: int, slots: int = 6, max_members: int = 5000) -> None:
        self.size = size
        self.window_us = window_us
        self.slot_us = max(1, window_us // slots)
        self.slots = slots
        self.max_members = max_members
        self.overflow = 0
        # (slot index, member -> figures), oldest first.
        self._slots: deque[tuple[int, dict[str, list[float]]]] = deque()

    def add(self, at_us: int, member: str, figures: Sequence[float]) -> None:
        """Count one exchange of ``member``; a late one (earlier than the newest
        slot) counts in the newest slot."""
        idx = at_us // self.slot_us
        slots = self._slots
        if not slots or idx > slots[-1][0]:
            slots.append((idx, {}))
            self._expire(idx)
        members = slots[-1][1]
        v = members.get(member)
        if v is None:
            if len(members) >= self.max_members:
                self.overflow += 1
                return
            v = members[member] = [0.0] * len(METRICS)
        # Unrolled: this runs three times per exchange.
        v[0] += figures[0]
        v[1] += figures[1]
        v[2] += figures[2]
        v[3] += figures[3]
        v[4] += figures[4]
        v[5] += figures[5]

    def _expire(self, idx: int) -> None:
        slots = self._slots
        while slots and slots[0][0] <= idx - self.slots:
            slots.popleft()

    def ranking(self, now_us: int) -> dict[str, Ranking]:
        """Per metric, the top ``size`` members with their value over the window
        ending at ``now_us`` (largest first, ties by name; zeros are not ranked)."""
        self._expire(now_us // self.slot_us)
        totals: dict[str, list[float]] = {}
        for _, members in self._slots:
            for member, v in members.items():
                t = totals.get(member)
                if t is None:
                    totals[member] = list(v)
                else:
                    for i, x in enumerate(v):
                        t[i] += x
        out: dict[str, Ranking] = {}
        for i, metric in enumerate(METRICS):
            if i == LATENCY:
                values = [(t[LATENCY] / t[REQUESTS], m) for m, t in totals.items() if t[REQUESTS]]
            else:
                values = [(t[i], m) for m, t in totals.items() if t[i]]
            top = heapq.nsmallest(self.size, values, key=lambda vm: (-vm[0], vm[1]))
            out[metric] = [(m, v) for v, m in top]
        return out
