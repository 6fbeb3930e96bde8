"""Wires the stages: tshark rows -> parsers -> sessionizer -> sinks.

The only module that knows every stage.
"""

from __future__ import annotations

from collections.abc import Callable, Iterable
from dataclasses import dataclass, field

from flowprobe.agent.capture.columns import ColumnLayout
from flowprobe.agent.capture.tshark import ShardedRows, TsharkOptions, split_row
from flowprobe.agent.config import AgentConfig
from flowprobe.agent.parse.base import Parser
from flowprobe.agent.parse.registry import build_parsers
from flowprobe.agent.sessionize.records import Connection, Endpoints, Exchange
from flowprobe.agent.sessionize.sessionizer import TLS_PROTOCOL, SessionConfig, Sessionizer
from flowprobe.agent.sessionize.stats import Stats


@dataclass
class Sinks:
    exchange: list[Callable[[Exchange], None]] = field(default_factory=list)
    connection: list[Callable[[Connection], None]] = field(default_factory=list)
    # A connection carrying TLS (AgentConfig.detect_tls), at its first TLS packet.
    tls: list[Callable[[Endpoints, int], None]] = field(default_factory=list)

    def on_exchange(self, ex: Exchange) -> None:
        for fn in self.exchange:
            fn(ex)

    def on_connection(self, conn: Connection) -> None:
        for fn in self.connection:
            fn(conn)

    def on_tls(self, endpoints: Endpoints, ts_us: int) -> None:
        for fn in self.tls:
            fn(endpoints, ts_us)


class Pipeline:
    def __init__(self, config: AgentConfig, sinks: Sinks, stats: Stats | None = None) -> None:
        self.config = config
        self.stats = stats or Stats()
        self.parsers: list[Parser] = build_parsers(config)
        own = [f for p in self.parsers if not p.shares_columns for f in p.fields]
        shared = [p.fields for p in self.parsers if p.shares_columns]
        protocols = [p.tshark_name for p in self.parsers]
        if config.detect_tls:
            protocols.append(TLS_PROTOCOL)
        self.layout = ColumnLayout.build(own, shared, protocols)
        for p in self.parsers:
            p.bind(self.layout)
        server_ports: dict[int, str] = {}
        decode_as: list[tuple[str, str]] = []
        for p in self.parsers:
            # Decode-as for the defaults too: tshark registers no port for some
            # protocols (h2c has none; gRPC's 50051 is only a convention).
            for port in (*p.default_ports, *config.ports.get(p.name, ())):
                server_ports[port] = p.name
                for transport in p.transports:
                    rule = (f"{transport}.port=={port}", p.tshark_name)
                    if rule not in decode_as:
                        decode_as.append(rule)
        self.tshark_options = TsharkOptions(
            layout=self.layout,
            decode_as=decode_as,
            session_reset_packets=config.session_reset_packets,
        )
        self._session_config = SessionConfig(
            response_timeout_us=config.response_timeout_seconds * 1_000_000,
            server_ports=server_ports,
        )
        self.sinks = sinks
        # One per share of a sharded read (see ShardedRows); the first serves
        # everything else.
        self.sessionizers = [self._sessionizer()]

    def _sessionizer(self) -> Sessionizer:
        return Sessionizer(
            self.parsers,
            self.layout,
            self.sinks.on_exchange,
            self.sinks.on_connection,
            self._session_config,
            self.stats,
            on_tls=self.sinks.on_tls if self.config.detect_tls else None,
        )

    def feed(self, rows: Iterable[list[str]] | ShardedRows) -> None:
        if isinstance(rows, ShardedRows):
            self._feed_shards(rows)
            return
        process = self.sessionizers[0].process
        for cols in rows:
            process(cols)

    def _feed_shards(self, rows: ShardedRows) -> None:
        while len(self.sessionizers) < rows.shards:
            self.sessionizers.append(self._sessionizer())
        processes = [s.process for s in self.sessionizers]
        for shard, lines in rows.batches():
            process = processes[shard]
            for raw in lines:
                process(split_row(raw))

    def finish(self) -> None:
        for sessionizer in self.sessionizers:
            sessionizer.finish()
