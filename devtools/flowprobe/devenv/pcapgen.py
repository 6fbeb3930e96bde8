"""Synthetic pcaps for benchmarks: many keep-alive TCP connections with real
protocol bytes (HTTP/1.1, Redis RESP, PostgreSQL simple query), handshakes and
FINs, written with the standard library so any size can be made in seconds."""

from __future__ import annotations

import struct
from collections.abc import Iterable, Iterator
from dataclasses import dataclass
from typing import BinaryIO

ETH = b"\x02\x00\x00\x00\x00\x01\x02\x00\x00\x00\x00\x02\x08\x00"
SYN, ACK, PSH, FIN = 0x02, 0x10, 0x08, 0x01


def _csum(data: bytes) -> int:
    if len(data) % 2:
        data += b"\0"
    s = sum(struct.unpack(f"!{len(data) // 2}H", data))
    while s >> 16:
        s = (s & 0xFFFF) + (s >> 16)
    return int(~s & 0xFFFF)


@dataclass
class Conn:
    cip: bytes
    sip: bytes
    cport: int
    sport: int
    cseq: int = 1000
    sseq: int = 5000

    def segment(self, from_client: bool, flags: int, payload: bytes = b"") -> bytes:
        src, dst = (self.cip, self.sip) if from_client else (self.sip, self.cip)
        sp, dp = (self.cport, self.sport) if from_client else (self.sport, self.cport)
        seq, ack = (self.cseq, self.sseq) if from_client else (self.sseq, self.cseq)
        tcp = struct.pack(
            "!HHIIBBHHH", sp, dp, seq, ack if flags & ACK else 0, 5 << 4, flags, 65535, 0, 0
        )
        ip = struct.pack(
            "!BBHHHBBH4s4s", 0x45, 0, 20 + len(tcp) + len(payload), 0, 0x4000, 64, 6, 0, src, dst
        )
        ip = ip[:10] + struct.pack("!H", _csum(ip)) + ip[12:]
        advance = len(payload) + (1 if flags & (SYN | FIN) else 0)
        if from_client:
            self.cseq += advance
        else:
            self.sseq += advance
        return ETH + ip + tcp + payload


def http_pair(i: int) -> tuple[bytes, bytes]:
    req = f"GET /api/orders/{i} HTTP/1.1\r\nHost: api\r\nUser-Agent: bench\r\n\r\n".encode()
    body = b'{"id": %d, "item": "widget", "qty": 3}' % i
    status = b"500 Internal Server Error" if i % 100 == 0 else b"200 OK"
    resp = (
        b"HTTP/1.1 "
        + status
        + b"\r\nContent-Type: text/plain\r\nContent-Length: %d\r\n\r\n" % len(body)
        + body
    )
    return req, resp


def redis_pair(i: int) -> tuple[bytes, bytes]:
    key = f"order:{i}".encode()
    if i % 2:
        return b"*2\r\n$3\r\nGET\r\n$%d\r\n%s\r\n" % (len(key), key), b"$6\r\nwidget\r\n"
    return b"*3\r\n$3\r\nSET\r\n$%d\r\n%s\r\n$1\r\n1\r\n" % (len(key), key), b"+OK\r\n"


def pg_pair(i: int) -> tuple[bytes, bytes]:
    sql = f"SELECT id, item FROM orders WHERE id = {i}".encode() + b"\0"
    query = b"Q" + struct.pack("!I", 4 + len(sql)) + sql

    def msg(kind: bytes, body: bytes) -> bytes:
        return kind + struct.pack("!I", 4 + len(body)) + body

    field = b"id\0" + struct.pack("!IhIhih", 0, 0, 23, 4, -1, 0)
    row = struct.pack("!h", 1) + struct.pack("!i", len(str(i))) + str(i).encode()
    resp = (
        msg(b"T", struct.pack("!h", 1) + field)
        + msg(b"D", row)
        + msg(b"C", b"SELECT 1\0")
        + msg(b"Z", b"I")
    )
    return query, resp


PAIRS = {"http": (8080, http_pair), "redis": (6379, redis_pair), "postgresql": (5432, pg_pair)}


def packets(counts: dict[str, int], per_conn: int = 50) -> Iterator[tuple[int, bytes]]:
    """(timestamp µs, frame) for ``counts[proto]`` exchanges of each protocol, interleaved."""
    ts = 1_700_000_000_000_000
    n_conn = 0
    queues = {p: n for p, n in counts.items() if n}
    while queues:
        for proto in list(queues):
            port, make = PAIRS[proto]
            n_conn += 1
            c = Conn(
                cip=bytes([10, 1, (n_conn >> 8) & 0xFF, n_conn & 0xFF]),
                sip=bytes([10, 2, 0, list(PAIRS).index(proto) + 1]),
                cport=20000 + n_conn % 40000,
                sport=port,
            )
            yield ts, c.segment(True, SYN)
            ts += 50
            yield ts, c.segment(False, SYN | ACK)
            ts += 30
            yield ts, c.segment(True, ACK)
            todo = min(per_conn, queues[proto])
            for k in range(todo):
                req, resp = make(queues[proto] - k)
                ts += 100
                yield ts, c.segment(True, PSH | ACK, req)
                ts += 400
                yield ts, c.segment(False, PSH | ACK, resp)
                ts += 20
                yield ts, c.segment(True, ACK)
            queues[proto] -= todo
            if not queues[proto]:
                del queues[proto]
            ts += 10
            yield ts, c.segment(True, FIN | ACK)
            ts += 10
            yield ts, c.segment(False, FIN | ACK)
            ts += 10
            yield ts, c.segment(True, ACK)


def write_frames(out: BinaryIO, frames: Iterable[tuple[int, bytes]]) -> int:
    """A classic pcap (Ethernet, µs timestamps) of (timestamp µs, frame) pairs."""
    out.write(struct.pack("<IHHiIII", 0xA1B2C3D4, 2, 4, 0, 0, 65535, 1))
    n = 0
    for ts, frame in frames:
        out.write(
            struct.pack("<IIII", ts // 1_000_000, ts % 1_000_000, len(frame), len(frame)) + frame
        )
        n += 1
    return n


def write_pcap(out: BinaryIO, counts: dict[str, int]) -> int:
    return write_frames(out, packets(counts))
