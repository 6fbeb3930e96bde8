"""Per-edge baselines on exchange time, and the moments an edge leaves or rejoins them.

Time is cut into intervals of ``interval_seconds`` aligned to the epoch and
shared by every edge; the clock is the exchanges' own timestamps (wall time
only to close intervals while no traffic comes), so a replayed pcap gives
the alerts the live traffic gave. When an interval ends, each edge's figures
in it (exchanges, errors, a latency histogram) are judged against the
edge's baseline, then folded into it:

- rate: exchanges per interval, EWMA, judged once the edge has been seen
  for ``warmup_intervals``; out when above ``baseline * (1 + p)`` (with at
  least ``min_exchanges``) or below ``baseline / (1 + p)`` (when the
  baseline has at least ``min_exchanges``), ``p = rate_change_percent / 100``;
- error ratio and p95 latency: EWMA over the intervals with at least
  ``min_exchanges`` (fewer say little), judged after ``warmup_intervals``
  such intervals; out when the ratio exceeds its baseline by
  ``error_ratio_increase_percent`` points, or p95 exceeds its baseline by
  ``latency_increase_percent`` percent and by ``latency_min_increase_ms``.

The EWMA weight is ``2 / (span_intervals + 1)``: a lasting shift becomes the
new baseline after about ``span_intervals``. An edge out of its baseline on
one measure starts a storm: one :class:`Transition` (``alert``) when it
starts, one (``resolved``, with the count of intervals out) when the edge
has been back for ``quiet_intervals``; intervals out in between are only
counted. Memory: at most ``max_edges`` edges (more are counted as
``untracked``); an edge idle for ``span_intervals`` without a storm is
forgotten.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field
from enum import StrEnum

from flowprobe.agent.config import AnomalyConfig
from flowprobe.agent.sessionize.records import Endpoints

# (client, server, protocol), as the flowprobe.edge.* metrics key an edge.
EdgeKey = tuple[str, str, str]

# Latency histogram: four buckets per doubling (about 19% wide) from 1 µs.
_BUCKETS_PER_OCTAVE = 4


class Kind(StrEnum):
    ERROR_RATIO = "error_ratio"
    LATENCY = "latency"
    RATE_INCREASE = "rate_increase"
    RATE_DECREASE = "rate_decrease"


@dataclass(frozen=True, slots=True)
class Transition:
    """An edge leaving its baseline on one measure (``resolved`` False) or rejoining it.

    ``observed``, ``baseline`` and ``threshold`` are in the measure's unit:
    a ratio (0-1), seconds (p95 latency) or exchanges per second. ``count``
    is how many intervals the storm had out of the baseline so far;
    ``reason`` of a resolved one is ``recovered`` or ``stopped`` (the agent
    stopped during the storm).
    """

    edge: EdgeKey
    kind: Kind
    resolved: bool
    start_us: int
    end_us: int
    observed: float
    baseline: float
    threshold: float
    count: int
    since_us: int
    reason: str = ""


@dataclass(slots=True)
class _Storm:
    since_us: int
    count: int
    last: tuple[float, float, float]  # observed, baseline, threshold of the last interval out
    quiet: int = 0


@dataclass(slots=True)
class _Edge:
    count: int = 0
    errors: int = 0
    latency: dict[int, int] = field(default_factory=dict)  # bucket -> exchanges
    intervals: int = 0
    judged: int = 0
    idle: int = 0
    rate: float = 0.0  # exchanges per interval
    error_ratio: float = 0.0
    p95_s: float = 0.0
    storms: dict[Kind, _Storm] = field(default_factory=dict)
    # The edge's latest exchange (connection, start, end), kept by the analyzer
    # when alerts freeze pcaps: what an alert raised without an exchange of
    # its own edge freezes. It lives and goes with the edge.
    latest: tuple[Endpoints, int, int] | None = None


def bucket(duration_us: int) -> int:
    return int(math.log2(duration_us) * _BUCKETS_PER_OCTAVE) if duration_us > 1 else 0


def p95_seconds(latency: dict[int, int], count: int) -> float:
    """The 95th percentile of a latency histogram: its bucket's geometric middle."""
    rank = math.ceil(0.95 * count)
    seen = 0
    for b in sorted(latency):
        seen += latency[b]
        if seen >= rank:
            return float(2 ** ((b + 0.5) / _BUCKETS_PER_OCTAVE) / 1e6)
    return 0.0


class Baselines:
    def __init__(self, config: AnomalyConfig) -> None:
        self.config = config
        self.interval_us = config.interval_seconds * 1_000_000
        self.alpha = 2 / (config.span_intervals + 1)
        self.edges: dict[EdgeKey, _Edge] = {}
        self.untracked = 0
        self._index: int | None = None  # the open interval

    def observe(
        self, at_us: int, edge: EdgeKey, duration_us: int, failed: bool
    ) -> list[Transition]:
        """Count one exchange; what intervals it closes (by its time) yield.

        A late exchange (older than the open interval) counts in the open one.
        """
        out = self.advance(at_us)
        e = self.edges.get(edge)
        if e is None:
            if len(self.edges) >= self.config.max_edges:
                self.untracked += 1
                return out
            e = self.edges[edge] = _Edge()
        e.count += 1
        if failed:
            e.errors += 1
        b = bucket(duration_us)
        e.latency[b] = e.latency.get(b, 0) + 1
        return out

    def advance(self, now_us: int) -> list[Transition]:
        """Close every interval that ended by ``now_us``."""
        index = now_us // self.interval_us
        if self._index is None:
            self._index = index
        out: list[Transition] = []
        if index <= self._index:
            return out
        # Beyond this many empty intervals every baseline has decayed and
        # every storm ended; closing more would change nothing.
        gap = min(index - self._index, self.config.span_intervals + self.config.quiet_intervals)
        for i in range(gap):
            start = (self._index + i) * self.interval_us
            for key, e in list(self.edges.items()):
                self._close(key, e, start, start + self.interval_us, out)
        self._index = index
        return out

    def stop(self) -> list[Transition]:
        """The storms still open, as resolved with reason ``stopped``."""
        out = []
        end = (self._index or 0) * self.interval_us
        for key, e in self.edges.items():
            for kind, s in e.storms.items():
                observed, baseline, threshold = s.last
                out.append(
                    Transition(
                        key, kind, True, end, end, observed, baseline, threshold, s.count,
                        s.since_us, "stopped",
                    )
                )  # fmt: skip
            e.storms.clear()
        return out

    def _close(self, key: EdgeKey, e: _Edge, start: int, end: int, out: list[Transition]) -> None:
        cfg = self.config
        n = e.count
        hits: dict[Kind, tuple[float, float, float]] = {}
        per_s = 1e6 / self.interval_us
        if cfg.rate_change_percent and e.intervals >= cfg.warmup_intervals:
            factor = 1 + cfg.rate_change_percent / 100
            if n >= cfg.min_exchanges and n > e.rate * factor:
                hits[Kind.RATE_INCREASE] = (n * per_s, e.rate * per_s, e.rate * factor * per_s)
            elif e.rate >= cfg.min_exchanges and n < e.rate / factor:
                hits[Kind.RATE_DECREASE] = (n * per_s, e.rate * per_s, e.rate / factor * per_s)
        a = self.alpha
        if n >= cfg.min_exchanges:
            ratio = e.errors / n
            p95 = p95_seconds(e.latency, n)
            if e.judged >= cfg.warmup_intervals:
                limit = e.error_ratio + cfg.error_ratio_increase_percent / 100
                if ratio >= limit:
                    hits[Kind.ERROR_RATIO] = (ratio, e.error_ratio, limit)
                limit = max(
                    e.p95_s * (1 + cfg.latency_increase_percent / 100),
                    e.p95_s + cfg.latency_min_increase_ms / 1000,
                )
                if p95 > limit:
                    hits[Kind.LATENCY] = (p95, e.p95_s, limit)
            if e.judged:
                e.error_ratio += a * (ratio - e.error_ratio)
                e.p95_s += a * (p95 - e.p95_s)
            else:
                e.error_ratio, e.p95_s = ratio, p95
            e.judged += 1
        e.rate = e.rate + a * (n - e.rate) if e.intervals else float(n)
        e.intervals += 1
        self._storms(key, e, hits, start, end, out)
        e.idle = 0 if n else e.idle + 1
        e.count = e.errors = 0
        e.latency = {}
        if e.idle >= cfg.span_intervals and not e.storms:
            del self.edges[key]

    def _storms(
        self,
        key: EdgeKey,
        e: _Edge,
        hits: dict[Kind, tuple[float, float, float]],
        start: int,
        end: int,
        out: list[Transition],
    ) -> None:
        for kind, figures in hits.items():
            storm = e.storms.get(kind)
            if storm is None:
                e.storms[kind] = _Storm(start, 1, figures)
                out.append(Transition(key, kind, False, start, end, *figures, 1, start))
            else:
                storm.count += 1
                storm.quiet = 0
                storm.last = figures
        for kind, storm in list(e.storms.items()):
            if kind in hits:
                continue
            storm.quiet += 1
            if storm.quiet >= self.config.quiet_intervals:
                del e.storms[kind]
                out.append(
                    Transition(
                        key, kind, True, start, end, *storm.last, storm.count, storm.since_us,
                        "recovered",
                    )
                )  # fmt: skip
