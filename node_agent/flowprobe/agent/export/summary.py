"""The ``--summary`` table: per client -> server edge and per endpoint."""

from __future__ import annotations

import math
from collections import Counter
from dataclasses import dataclass, field
from typing import TextIO

from flowprobe.agent.export.naming import RouteTable, endpoint_name
from flowprobe.agent.sessionize.records import Exchange, Outcome

_GROWTH = math.log(1.02)


@dataclass
class LatencyHistogram:
    """Log-bucketed (2% wide) so memory stays bounded however long the capture runs."""

    buckets: Counter[int] = field(default_factory=Counter)
    count: int = 0

    def add(self, us: int) -> None:
        self.buckets[int(math.log(max(us, 1)) / _GROWTH)] += 1
        self.count += 1

    def quantile(self, q: float) -> float:
        """Upper edge of the bucket holding the q-quantile, in µs."""
        if not self.count:
            return 0.0
        rank = q * self.count
        seen = 0
        for idx in sorted(self.buckets):
            seen += self.buckets[idx]
            if seen >= rank:
                return math.exp((idx + 1) * _GROWTH)
        return math.exp((max(self.buckets) + 1) * _GROWTH)


@dataclass
class Row:
    count: int = 0
    errors: int = 0
    retransmits: int = 0
    bytes: int = 0
    latency: LatencyHistogram = field(default_factory=LatencyHistogram)

    def add(self, ex: Exchange) -> None:
        self.count += 1
        if ex.outcome is not Outcome.OK:
            self.errors += 1
        self.retransmits += ex.figures.retransmits
        self.bytes += ex.figures.client_bytes + ex.figures.server_bytes
        self.latency.add(ex.duration_us)


@dataclass
class Summary:
    edges: dict[tuple[str, str, str], Row] = field(default_factory=dict)
    endpoints: dict[tuple[str, str, str], Row] = field(default_factory=dict)
    max_rows: int = 10_000
    overflow: int = 0
    routes: RouteTable = field(default_factory=RouteTable)

    def add(self, ex: Exchange) -> None:
        ep = ex.endpoints
        server = f"{ep.server_address}:{ep.server_port}"
        self._row(self.edges, (ep.client_address, server, ex.protocol)).add(ex)
        self._row(self.endpoints, (server, ex.protocol, endpoint_name(ex, self.routes))).add(ex)

    def _row(self, table: dict[tuple[str, str, str], Row], key: tuple[str, str, str]) -> Row:
        row = table.get(key)
        if row is None:
            if len(table) >= self.max_rows:
                self.overflow += 1
                key = ("(other)", "", "")
                row = table.get(key)
            if row is None:
                row = table[key] = Row()
        return row

    def render(self, out: TextIO, top: int = 30) -> None:
        def ms(us: float) -> str:
            return f"{us / 1000:.2f}"

        head = f"{'count':>8} {'errors':>7} {'p50 ms':>9} {'p95 ms':>9} {'p99 ms':>9} {'retx':>6} {'bytes':>11}"

        def line(row: Row) -> str:
            lat = row.latency
            return (
                f"{row.count:>8} {row.errors:>7} {ms(lat.quantile(0.5)):>9} {ms(lat.quantile(0.95)):>9} "
                f"{ms(lat.quantile(0.99)):>9} {row.retransmits:>6} {row.bytes:>11}"
            )

        out.write(f"{'EDGE (client -> server)':<48} {'proto':<10} {head}\n")
        for (client, server, proto), row in sorted(self.edges.items(), key=lambda kv: -kv[1].count)[
            :top
        ]:
            out.write(f"{client + ' -> ' + server:<48} {proto:<10} {line(row)}\n")
        out.write(f"\n{'ENDPOINT':<48} {'proto':<10} {head}\n")
        for (server, proto, name), row in sorted(
            self.endpoints.items(), key=lambda kv: -kv[1].count
        )[:top]:
            label = f"{server} {name}"
            out.write(f"{label[:48]:<48} {proto:<10} {line(row)}\n")
