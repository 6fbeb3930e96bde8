"""Connections and request/response pairing, driven by tshark's per-packet rows.

Every packet updates its connection's counters; packets that carry an L7
message are handed to that protocol's parser, and responses are paired with
pending requests (FIFO, or by the protocol's key). Timing comes only from
capture timestamps: an exchange starts at the first segment of its request and
ends at the last segment of its response.
"""

from __future__ import annotations

from collections import deque
from collections.abc import Callable, Iterable, Sequence
from dataclasses import dataclass, field
from typing import Any

from flowprobe.agent.capture import columns as c
from flowprobe.agent.capture.columns import ColumnLayout, parse_ts_us
from flowprobe.agent.parse.base import Parser
from flowprobe.agent.parse.messages import AttrValue, L7Message
from flowprobe.agent.sessionize.records import Connection, Endpoints, Exchange, Outcome, TcpFigures
from flowprobe.agent.sessionize.stats import Stats

SYN, ACK, FIN, RST = 0x002, 0x010, 0x001, 0x004

# Indices into a flow's counter list. Packets and bytes are per side (a, b);
# the rest count both directions together.
PKT_A, PKT_B, BYTES_A, BYTES_B, RETRANS, OOO, ZWIN, NSYN, NFIN, NRST, RTT_N, RTT_SUM, RTT_MAX = (
    range(13)
)
DPKT_A, DPKT_B = 13, 14  # packets carrying payload, per side
N_COUNTERS = 15
MAX_EVENTS_PER_FLOW = 64
MAX_PENDING_PER_FLOW = 1024
# tshark's TLS dissector (its TCP heuristic finds TLS on any port).
TLS_PROTOCOL = "tls"


@dataclass
class SessionConfig:
    response_timeout_us: int = 30_000_000
    tcp_idle_timeout_us: int = 300_000_000
    udp_idle_timeout_us: int = 30_000_000
    closed_grace_us: int = 5_000_000
    max_flows: int = 200_000
    # Server ports per protocol name, used to decide which side is the server
    # when the handshake was not seen.
    server_ports: dict[int, str] = field(default_factory=dict)


@dataclass(slots=True)
class Pending:
    msg: L7Message
    client_side: int
    start_us: int
    request_end_us: int
    snapshot: list[int]
    event_mark: int
    request_bytes: int = 0
    request_packets: int = 0
    response_bytes: int = 0
    response_packets: int = 0
    response_start_us: int | None = None
    response_attrs: dict[str, AttrValue] | None = None

    # Written out, not generated (see the note in records.py): one per exchange.
    def __init__(
        self,
        msg: L7Message,
        client_side: int,
        start_us: int,
        request_end_us: int,
        snapshot: list[int],
        event_mark: int,
        request_bytes: int = 0,
        request_packets: int = 0,
        response_bytes: int = 0,
        response_packets: int = 0,
        response_start_us: int | None = None,
        response_attrs: dict[str, AttrValue] | None = None,
    ) -> None:
        self.msg = msg
        self.client_side = client_side
        self.start_us = start_us
        self.request_end_us = request_end_us
        self.snapshot = snapshot
        self.event_mark = event_mark
        self.request_bytes = request_bytes
        self.request_packets = request_packets
        self.response_bytes = response_bytes
        self.response_packets = response_packets
        self.response_start_us = response_start_us
        self.response_attrs = response_attrs


class Flow:
    __slots__ = (
        "_endpoints",
        "a_addr",
        "a_port",
        "ack_us",
        "b_addr",
        "b_port",
        "client_side",
        "closed_us",
        "counters",
        "decoded",
        "events",
        "exchanges",
        "fin_sides",
        "first_us",
        "handshake_reported",
        "last_us",
        "msg_snap",
        "msg_start",
        "parser",
        "pending",
        "state",
        "syn_us",
        "synack_us",
        "tls",
        "transport",
        "upgraded",
    )

    def __init__(self, transport: str, a_addr: str, a_port: int, b_addr: str, b_port: int, ts: int):
        self.transport = transport
        self.a_addr, self.a_port, self.b_addr, self.b_port = a_addr, a_port, b_addr, b_port
        self.client_side: int | None = None
        self._endpoints: list[Endpoints | None] = [None, None]
        self.counters = [0] * N_COUNTERS
        self.syn_us: int | None = None
        self.synack_us: int | None = None
        self.ack_us: int | None = None
        self.handshake_reported = False
        self.msg_start: list[int | None] = [None, None]
        self.msg_snap: list[list[int] | None] = [None, None]
        self.pending: dict[Any, deque[Pending]] = {}
        self.parser: tuple[Parser, int] | None = None
        self.state: dict[str, object] = {}
        # Whether the parser found a message on it (an L4-only flow otherwise).
        self.decoded = False
        self.exchanges = 0
        self.first_us = ts
        self.last_us = ts
        self.fin_sides = 0
        self.closed_us: int | None = None
        self.upgraded = False
        self.tls = False
        self.events: deque[tuple[int, str]] = deque(maxlen=MAX_EVENTS_PER_FLOW)

    def endpoints(self, client_side: int) -> Endpoints:
        # Every exchange of the connection shares one (immutable) object.
        ep = self._endpoints[client_side]
        if ep is None:
            if client_side == 0:
                ep = Endpoints(self.transport, self.a_addr, self.a_port, self.b_addr, self.b_port)
            else:
                ep = Endpoints(self.transport, self.b_addr, self.b_port, self.a_addr, self.a_port)
            self._endpoints[client_side] = ep
        return ep

    def n_pending(self) -> int:
        return sum(len(q) for q in self.pending.values())

    def handshake(self) -> tuple[int | None, int | None]:
        server = client = None
        if self.syn_us is not None and self.synack_us is not None:
            server = self.synack_us - self.syn_us
            if self.ack_us is not None:
                client = self.ack_us - self.synack_us
        return server, client


def figures(now: list[int], snap: list[int], client_side: int) -> TcpFigures:
    # Whole-connection figures count every packet; exchanges overwrite these
    # with their own messages' segments.
    a, b = (PKT_A, PKT_B) if client_side == 0 else (PKT_B, PKT_A)
    ba, bb = (BYTES_A, BYTES_B) if client_side == 0 else (BYTES_B, BYTES_A)
    rtt_n = now[RTT_N] - snap[RTT_N]
    return TcpFigures(
        client_packets=now[a] - snap[a],
        server_packets=now[b] - snap[b],
        client_bytes=now[ba] - snap[ba],
        server_bytes=now[bb] - snap[bb],
        retransmits=now[RETRANS] - snap[RETRANS],
        out_of_order=now[OOO] - snap[OOO],
        zero_window=now[ZWIN] - snap[ZWIN],
        syn=now[NSYN] - snap[NSYN],
        fin=now[NFIN] - snap[NFIN],
        rst=now[NRST] - snap[NRST],
        rtt_samples=rtt_n,
        rtt_sum_us=now[RTT_SUM] - snap[RTT_SUM],
        # A running maximum cannot be differenced; the connection's maximum
        # so far is the honest upper bound.
        rtt_max_us=now[RTT_MAX] if rtt_n else 0,
    )


class Sessionizer:
    def __init__(
        self,
        parsers: Iterable[Parser],
        layout: ColumnLayout,
        on_exchange: Callable[[Exchange], None],
        on_connection: Callable[[Connection], None] | None = None,
        config: SessionConfig | None = None,
        stats: Stats | None = None,
        on_tls: Callable[[Endpoints, int], None] | None = None,
    ) -> None:
        self.config = config or SessionConfig()
        # The TLS column, when the layout has one and someone listens.
        self._tls = layout.index(TLS_PROTOCOL) if on_tls is not None else None
        self.on_tls = on_tls or (lambda _e, _t: None)
        self.stats = stats or Stats()
        # Each parser with its protocol's column, filled in when the packet
        # carries the protocol (see ColumnLayout.build).
        self.parsers = [(p, layout.index(p.tshark_name)) for p in parsers]
        self.on_exchange = on_exchange
        self.on_connection = on_connection or (lambda _c: None)
        self.flows: dict[tuple[str, str, int, str, int], Flow] = {}
        self.now_us = 0
        self._next_sweep_us = 0

    # -- per packet -------------------------------------------------------

    def process(self, cols: Sequence[str]) -> None:
        """Feed one tshark row. Malformed rows are counted, never raised."""
        try:
            self._process(cols)
        except (ValueError, IndexError) as exc:
            self.stats.anomaly("malformed_row", f"{exc!r} in {list(cols)[:8]}")

    def _process(self, cols: Sequence[str]) -> None:
        self.stats.packets += 1
        ts = parse_ts_us(cols[c.TS])
        if ts > self.now_us:
            self.now_us = ts
        if ts >= self._next_sweep_us:
            self.sweep(ts)
            self._next_sweep_us = ts + 1_000_000
        sport_s, dport_s = cols[c.SPORT], cols[c.DPORT]
        if not sport_s or not dport_s:
            # Not TCP or UDP (ICMP, ARP, fragments): nothing to pair.
            self.stats.anomaly("non_transport_packet")
            return
        src, dst = cols[c.SRC].strip(), cols[c.DST].strip()
        sport, dport = int(sport_s), int(dport_s)
        flags_s = cols[c.TCP_FLAGS]
        transport = "tcp" if flags_s else "udp"
        if src < dst or (src == dst and sport <= dport):
            key = (transport, src, sport, dst, dport)
            side = 0
        else:
            key = (transport, dst, dport, src, sport)
            side = 1
        flags = int(flags_s, 16) if flags_s else 0
        flow = self.flows.get(key)
        if (
            flow is not None
            and flags & SYN
            and not flags & ACK
            and flow.syn_us is not None
            and (flow.closed_us is not None or flow.exchanges or flow.n_pending())
        ):
            # Port reuse: the old connection is over.
            self._close(flow, key, ts, "reused")
            flow = None
        if flow is None:
            if len(self.flows) >= self.config.max_flows:
                self._evict_oldest()
            flow = Flow(transport, key[1], key[2], key[3], key[4], ts)
            self.flows[key] = flow
        flow.last_us = ts
        ctr = flow.counters
        payload = int(cols[c.PAYLOAD_LEN] or 0)
        if transport == "udp":
            payload = max(0, payload - 8)
        retrans = bool(cols[c.RETRANS])
        if payload and flow.msg_start[side] is None and not retrans:
            flow.msg_start[side] = ts
            flow.msg_snap[side] = ctr.copy()
        ctr[PKT_A + side] += 1
        rtt = cols[c.ACK_RTT]
        if rtt:
            rtt_us = int(float(rtt) * 1_000_000)
            ctr[RTT_N] += 1
            ctr[RTT_SUM] += rtt_us
            if rtt_us > ctr[RTT_MAX]:
                ctr[RTT_MAX] = rtt_us
        if retrans:
            ctr[RETRANS] += 1
            flow.events.append((ts, "tcp.retransmission"))
        if cols[c.OUT_OF_ORDER]:
            ctr[OOO] += 1
            flow.events.append((ts, "tcp.out_of_order"))
        if cols[c.ZERO_WINDOW]:
            ctr[ZWIN] += 1
            flow.events.append((ts, "tcp.zero_window"))
        if flags == ACK and not payload:
            # A pure ACK, a third or more of all packets, is done here.
            if flow.ack_us is None and flow.synack_us is not None and side == flow.client_side:
                flow.ack_us = ts
            return
        if payload:
            ctr[BYTES_A + side] += payload
            ctr[DPKT_A + side] += 1
        if flags:
            self._tcp_flags(flow, side, flags, ts)
        if payload and not flow.upgraded and not retrans:
            self._l7(flow, side, cols, ts, sport, dport)
        if flags & RST:
            self._close(flow, key, ts, "reset")
        elif flow.fin_sides == 3 and flow.closed_us is None:
            self._close(flow, key, ts, "fin")

    def _tcp_flags(self, flow: Flow, side: int, flags: int, ts: int) -> None:
        ctr = flow.counters
        if flags & SYN:
            ctr[NSYN] += 1
            if flags & ACK:
                if flow.synack_us is None:
                    flow.synack_us = ts
            elif flow.syn_us is None:
                flow.syn_us = ts
                flow.client_side = side
        elif (
            flags & ACK
            and flow.synack_us is not None
            and flow.ack_us is None
            and side == flow.client_side
        ):
            flow.ack_us = ts
        if flags & FIN:
            ctr[NFIN] += 1
            flow.fin_sides |= 1 << side
        if flags & RST:
            ctr[NRST] += 1
            flow.events.append((ts, "tcp.reset"))

    def _server_side(self, flow: Flow, side: int, sport: int, dport: int) -> bool | None:
        """Is this packet going to the server? None when nothing tells."""
        if flow.client_side is not None:
            return side == flow.client_side
        sp = self.config.server_ports
        if dport in sp and sport not in sp:
            return True
        if sport in sp and dport not in sp:
            return False
        return None

    def _l7(
        self, flow: Flow, side: int, cols: Sequence[str], ts: int, sport: int, dport: int
    ) -> None:
        # A connection carries one protocol: the first parser whose protocol
        # the packet carries decides it. Segments of a message still being
        # reassembled carry none.
        known = flow.parser
        for parser, present in self.parsers if known is None else (known,):
            if cols[present]:
                flow.parser = (parser, present)
                break
        else:
            # No parser's protocol: only here is TLS looked for, so parsed
            # connections pay nothing for it.
            if self._tls is not None and not flow.tls and cols[self._tls]:
                flow.tls = True
                # The first TLS record is the client's hello unless the
                # handshake said otherwise.
                client = flow.client_side if flow.client_side is not None else side
                self.on_tls(flow.endpoints(client), ts)
            return
        to_server = self._server_side(flow, side, sport, dport)
        try:
            messages = parser.parse(cols, to_server, flow.state)
        except (ValueError, IndexError, KeyError) as exc:
            self.stats.anomaly(f"parse_error.{parser.name}", repr(exc))
            return
        if not messages:
            return
        flow.decoded = True
        start = flow.msg_start[side] or ts
        snap = flow.msg_snap[side] or flow.counters.copy()
        flow.msg_start[side] = None
        flow.msg_snap[side] = None
        # The message's own segments; messages sharing a segment share them.
        n = 1 if len(messages) == 1 else (sum(1 for m in messages if not m.control) or 1)
        size = (
            (flow.counters[BYTES_A + side] - snap[BYTES_A + side]) // n,
            (flow.counters[DPKT_A + side] - snap[DPKT_A + side]) // n or 1,
        )
        for msg in messages:
            if msg.control:
                start = ts
                continue
            if msg.is_request:
                self._request(flow, side, msg, start, ts, snap, size)
            else:
                self._response(flow, side, msg, start, ts, size)
            start = ts
            if msg.upgrade:
                flow.upgraded = True

    def _request(
        self,
        flow: Flow,
        side: int,
        msg: L7Message,
        start: int,
        ts: int,
        snap: list[int],
        size: tuple[int, int],
    ) -> None:
        if flow.client_side is None:
            flow.client_side = side
        queue = flow.pending.get(msg.key)
        if queue is None:
            queue = flow.pending[msg.key] = deque()
        if len(queue) >= MAX_PENDING_PER_FLOW:
            old = queue.popleft()
            self.stats.anomaly("pending_overflow", msg.protocol)
            self._emit(flow, old, old.request_end_us, Outcome.NO_RESPONSE, None)
        mark = flow.events[-1][0] if flow.events else 0
        queue.append(Pending(msg, side, start, ts, snap, mark, size[0], size[1]))

    def _response(
        self, flow: Flow, side: int, msg: L7Message, start: int, ts: int, size: tuple[int, int]
    ) -> None:
        queue = flow.pending.get(msg.key)
        if not queue:
            # An interim response (HTTP 100 Continue) legitimately precedes the
            # request's last segment, which is when the dissector reports it.
            if msg.final:
                self.stats.anomaly(f"response_without_request.{msg.protocol}")
            return
        pending = queue[0]
        if pending.client_side == side:
            self.stats.anomaly(f"response_from_client.{msg.protocol}")
            return
        if pending.response_start_us is None:
            pending.response_start_us = start
        pending.response_bytes += size[0]
        pending.response_packets += size[1]
        if pending.response_attrs is None:
            pending.response_attrs = dict(msg.attrs)
        else:
            pending.response_attrs.update(msg.attrs)
        if msg.error_type is not None:
            pending.msg.error_type = msg.error_type
        if not msg.final:
            return
        queue.popleft()
        if not queue:
            del flow.pending[msg.key]
        outcome = Outcome.ERROR if pending.msg.error_type is not None else Outcome.OK
        self._emit(flow, pending, ts, outcome, pending.msg.error_type)

    # -- records ----------------------------------------------------------

    def _emit(
        self, flow: Flow, p: Pending, end_us: int, outcome: Outcome, error_type: str | None
    ) -> None:
        attrs = dict(p.msg.attrs)
        if p.response_attrs:
            attrs.update(p.response_attrs)
        ex = Exchange(
            protocol=p.msg.protocol,
            endpoints=flow.endpoints(p.client_side),
            start_us=p.start_us,
            end_us=max(end_us, p.request_end_us),
            request_end_us=p.request_end_us,
            response_start_us=p.response_start_us,
            outcome=outcome,
            attrs=attrs,
            error_type=error_type,
            figures=figures(flow.counters, p.snapshot, p.client_side),
        )
        f = ex.figures
        f.client_bytes, f.client_packets = p.request_bytes, p.request_packets
        f.server_bytes, f.server_packets = p.response_bytes, p.response_packets
        if not flow.handshake_reported and flow.syn_us is not None:
            flow.handshake_reported = True
            ex.handshake_server_us, ex.handshake_client_us = flow.handshake()
        if flow.events:
            ex.events = [e for e in flow.events if p.start_us <= e[0] <= ex.end_us]
        flow.exchanges += 1
        self.stats.exchanges += 1
        self.on_exchange(ex)

    def _flush_pending(self, flow: Flow, outcome: Outcome, end_us: int | None = None) -> None:
        for queue in flow.pending.values():
            for p in queue:
                err = "connection_reset" if outcome is Outcome.RESET else outcome.value
                self._emit(
                    flow, p, end_us if end_us is not None else p.request_end_us, outcome, err
                )
        flow.pending.clear()

    def _close(self, flow: Flow, key: tuple[str, str, int, str, int], ts: int, reason: str) -> None:
        if flow.closed_us is not None:
            return
        flow.closed_us = ts
        self._flush_pending(flow, Outcome.RESET if reason == "reset" else Outcome.NO_RESPONSE, ts)
        if not flow.decoded and (flow.counters[BYTES_A] or flow.counters[BYTES_B]):
            proto = self.config.server_ports.get(flow.b_port) or self.config.server_ports.get(
                flow.a_port
            )
            if proto is not None:
                # Payload on a protocol's port that never parsed as that protocol.
                self.stats.anomaly(f"undecoded_payload.{proto}")
        client_side = flow.client_side if flow.client_side is not None else 0
        server_hs, client_hs = flow.handshake()
        conn = Connection(
            endpoints=flow.endpoints(client_side),
            start_us=flow.first_us,
            end_us=ts,
            figures=figures(flow.counters, [0] * N_COUNTERS, client_side),
            protocols=[flow.parser[0].name] if flow.decoded and flow.parser else [],
            exchanges=flow.exchanges,
            handshake_server_us=server_hs,
            handshake_client_us=client_hs,
            close_reason=reason,
        )
        self.stats.connections += 1
        self.on_connection(conn)
        if reason == "reused":
            del self.flows[key]

    def _evict_oldest(self) -> None:
        key = min(self.flows, key=lambda k: self.flows[k].last_us)
        flow = self.flows[key]
        self.stats.anomaly("flow_table_full")
        self._close(flow, key, flow.last_us, "evicted")
        self.flows.pop(key, None)

    def sweep(self, now_us: int) -> None:
        """Time out requests and idle connections; called as capture time advances."""
        cfg = self.config
        dead: list[tuple[str, str, int, str, int]] = []
        for key, flow in self.flows.items():
            if flow.closed_us is not None:
                if now_us - flow.closed_us > cfg.closed_grace_us:
                    dead.append(key)
                continue
            for qkey in list(flow.pending):
                queue = flow.pending[qkey]
                while queue and now_us - queue[0].request_end_us > cfg.response_timeout_us:
                    p = queue.popleft()
                    self._emit(flow, p, now_us, Outcome.TIMEOUT, "timeout")
                if not queue:
                    del flow.pending[qkey]
            idle = cfg.tcp_idle_timeout_us if flow.transport == "tcp" else cfg.udp_idle_timeout_us
            if now_us - flow.last_us > idle:
                self._close(flow, key, flow.last_us, "idle")
                dead.append(key)
        for key in dead:
            self.flows.pop(key, None)

    def finish(self) -> None:
        """End of input: every open request and connection is reported."""
        for key, flow in list(self.flows.items()):
            if flow.closed_us is None:
                self._close(flow, key, flow.last_us, "capture_end")
        self.flows.clear()
