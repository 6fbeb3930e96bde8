"""The records the sessionizer emits: one per exchange, one per finished connection.

Field names follow the OpenTelemetry semantic conventions where one exists;
flowprobe's own network figures carry a ``flowprobe.`` prefix. docs/records.md
describes every field.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from enum import StrEnum
from typing import Any

from flowprobe.agent.parse.messages import AttrValue

# The records made per packet or per exchange write their __init__ out instead
# of letting @dataclass generate it: mypyc compiles the methods a class
# defines, but a generated __init__ runs as interpreted code, about six times
# slower (190 against 30 ns for four fields), and that was an eighth of the
# agent's Python time. dataclass keeps a written __init__ and still provides
# the rest (fields, eq, repr); tests/agent/test_records.py checks that each
# written __init__ matches its fields.


class Outcome(StrEnum):
    OK = "ok"
    ERROR = "error"
    NO_RESPONSE = "no_response"
    RESET = "reset"
    TIMEOUT = "timeout"


@dataclass(slots=True, frozen=True)
class Endpoints:
    transport: str
    client_address: str
    client_port: int
    server_address: str
    server_port: int

    def write(self, out: dict[str, Any]) -> None:
        out["network.transport"] = self.transport
        out["client.address"] = self.client_address
        out["client.port"] = self.client_port
        out["server.address"] = self.server_address
        out["server.port"] = self.server_port


@dataclass(slots=True)
class TcpFigures:
    """Counts on the connection between the start and the end of an exchange."""

    client_packets: int = 0
    server_packets: int = 0
    client_bytes: int = 0
    server_bytes: int = 0
    retransmits: int = 0
    out_of_order: int = 0
    zero_window: int = 0
    syn: int = 0
    fin: int = 0
    rst: int = 0
    rtt_samples: int = 0
    rtt_sum_us: int = 0
    rtt_max_us: int = 0

    # Written out, not generated (see the note above Outcome): one per exchange.
    def __init__(
        self,
        client_packets: int = 0,
        server_packets: int = 0,
        client_bytes: int = 0,
        server_bytes: int = 0,
        retransmits: int = 0,
        out_of_order: int = 0,
        zero_window: int = 0,
        syn: int = 0,
        fin: int = 0,
        rst: int = 0,
        rtt_samples: int = 0,
        rtt_sum_us: int = 0,
        rtt_max_us: int = 0,
    ) -> None:
        self.client_packets = client_packets
        self.server_packets = server_packets
        self.client_bytes = client_bytes
        self.server_bytes = server_bytes
        self.retransmits = retransmits
        self.out_of_order = out_of_order
        self.zero_window = zero_window
        self.syn = syn
        self.fin = fin
        self.rst = rst
        self.rtt_samples = rtt_samples
        self.rtt_sum_us = rtt_sum_us
        self.rtt_max_us = rtt_max_us

    def write(
        self,
        out: dict[str, Any],
        tcp: bool,
        handshake_server_us: int | None,
        handshake_client_us: int | None,
    ) -> None:
        """The record fields of these figures (and of the handshake, when seen)."""
        if handshake_server_us is not None:
            out["flowprobe.tcp.handshake.server_us"] = handshake_server_us
        if handshake_client_us is not None:
            out["flowprobe.tcp.handshake.client_us"] = handshake_client_us
        out["flowprobe.request.packets"] = self.client_packets
        out["flowprobe.response.packets"] = self.server_packets
        out["flowprobe.request.bytes"] = self.client_bytes
        out["flowprobe.response.bytes"] = self.server_bytes
        if not tcp:
            return
        out["flowprobe.tcp.retransmits"] = self.retransmits
        out["flowprobe.tcp.out_of_order"] = self.out_of_order
        out["flowprobe.tcp.zero_window"] = self.zero_window
        out["flowprobe.tcp.syn"] = self.syn
        out["flowprobe.tcp.fin"] = self.fin
        out["flowprobe.tcp.rst"] = self.rst
        if self.rtt_samples:
            out["flowprobe.tcp.rtt.samples"] = self.rtt_samples
            out["flowprobe.tcp.rtt.mean_us"] = self.rtt_sum_us // self.rtt_samples
            out["flowprobe.tcp.rtt.max_us"] = self.rtt_max_us


@dataclass(slots=True)
class Exchange:
    protocol: str
    endpoints: Endpoints
    start_us: int
    end_us: int
    request_end_us: int
    response_start_us: int | None
    outcome: Outcome
    attrs: dict[str, AttrValue] = field(default_factory=dict)
    error_type: str | None = None
    figures: TcpFigures = field(default_factory=TcpFigures)
    handshake_server_us: int | None = None
    handshake_client_us: int | None = None
    # Events on the connection during the exchange (retransmits, zero windows,
    # resets) as (timestamp µs, name); the exporter turns them into span events.
    events: list[tuple[int, str]] = field(default_factory=list)
    # Findings of the security stage (security/, off by default; values are
    # masked) and anomaly alerts (analyze/, added on the export thread before
    # the spans are built; a record written earlier may lack them):
    # (timestamp µs, name, attributes), span events with attributes.
    security_events: list[tuple[int, str, dict[str, AttrValue]]] = field(default_factory=list)

    # Written out, not generated (see the note above Outcome): one per exchange.
    def __init__(
        self,
        protocol: str,
        endpoints: Endpoints,
        start_us: int,
        end_us: int,
        request_end_us: int,
        response_start_us: int | None,
        outcome: Outcome,
        attrs: dict[str, AttrValue] | None = None,
        error_type: str | None = None,
        figures: TcpFigures | None = None,
        handshake_server_us: int | None = None,
        handshake_client_us: int | None = None,
        events: list[tuple[int, str]] | None = None,
        security_events: list[tuple[int, str, dict[str, AttrValue]]] | None = None,
    ) -> None:
        self.protocol = protocol
        self.endpoints = endpoints
        self.start_us = start_us
        self.end_us = end_us
        self.request_end_us = request_end_us
        self.response_start_us = response_start_us
        self.outcome = outcome
        self.attrs = {} if attrs is None else attrs
        self.error_type = error_type
        self.figures = TcpFigures() if figures is None else figures
        self.handshake_server_us = handshake_server_us
        self.handshake_client_us = handshake_client_us
        self.events = [] if events is None else events
        self.security_events = [] if security_events is None else security_events

    @property
    def duration_us(self) -> int:
        return self.end_us - self.start_us

    @property
    def server_response_time_us(self) -> int | None:
        if self.response_start_us is None:
            return None
        return max(0, self.response_start_us - self.request_end_us)

    def to_dict(self) -> dict[str, Any]:
        ep = self.endpoints
        out: dict[str, Any] = {
            "flowprobe.record": "exchange",
            "flowprobe.protocol": self.protocol,
            "start_time_unix_us": self.start_us,
            "end_time_unix_us": self.end_us,
            "flowprobe.duration_us": self.duration_us,
            "flowprobe.outcome": self.outcome.value,
        }
        ep.write(out)
        out.update(self.attrs)
        if self.error_type is not None:
            out["error.type"] = self.error_type
        srt = self.server_response_time_us
        if srt is not None:
            out["flowprobe.server_response_time_us"] = srt
        self.figures.write(
            out, ep.transport == "tcp", self.handshake_server_us, self.handshake_client_us
        )
        if self.events:
            out["flowprobe.events"] = [{"time_unix_us": t, "name": n} for t, n in self.events]
        if self.security_events:
            out["flowprobe.security.events"] = [
                {"time_unix_us": t, "name": n, **a} for t, n, a in self.security_events
            ]
        return out


@dataclass(slots=True)
class Connection:
    """An L4 record for every TCP/UDP flow, whatever it carried."""

    endpoints: Endpoints
    start_us: int
    end_us: int
    figures: TcpFigures
    protocols: list[str]
    exchanges: int
    handshake_server_us: int | None
    handshake_client_us: int | None
    close_reason: str

    def to_dict(self) -> dict[str, Any]:
        ep = self.endpoints
        out: dict[str, Any] = {
            "flowprobe.record": "connection",
            "start_time_unix_us": self.start_us,
            "end_time_unix_us": self.end_us,
            "flowprobe.duration_us": self.end_us - self.start_us,
        }
        ep.write(out)
        out["flowprobe.protocols"] = self.protocols
        out["flowprobe.exchanges"] = self.exchanges
        out["flowprobe.connection.close_reason"] = self.close_reason
        self.figures.write(
            out, ep.transport == "tcp", self.handshake_server_us, self.handshake_client_us
        )
        return out
