"""Shared test helpers: run the real pipeline (tshark included) over a pcap."""

from __future__ import annotations

from pathlib import Path
from typing import Any

from flowprobe.agent.capture.tshark import Tools, read_file
from flowprobe.agent.config import AgentConfig
from flowprobe.agent.pipeline import Pipeline, Sinks
from flowprobe.agent.sessionize.stats import Stats
from flowprobe.devenv.pcapgen import ACK, FIN, SYN, Conn, write_frames

DATA = Path(__file__).resolve().parent.parent / "data"


def run_pcap(
    path: str | Path, connections: bool = False, **config: Any
) -> tuple[list[dict[str, Any]], Stats, str | None]:
    """Exchanges (and connections, if asked) as dicts, the stats, and tshark's error if any."""
    records: list[dict[str, Any]] = []
    sinks = Sinks()
    sinks.exchange.append(lambda ex: records.append(ex.to_dict()))
    if connections:
        sinks.connection.append(lambda conn: records.append(conn.to_dict()))
    stats = Stats()
    pipeline = Pipeline(AgentConfig(**config), sinks, stats)
    rows = read_file(Tools.find(), str(path), pipeline.tshark_options)
    pipeline.feed(rows)
    pipeline.finish()
    return records, stats, rows.error


def read_pcap(path: str | Path, **config: Any) -> list[dict[str, Any]]:
    """Exchange records of a pcap read through tshark and the whole pipeline."""
    records, _stats, error = run_pcap(path, **config)
    assert error is None, error
    return records


# Synthetic pcaps: frames built with flowprobe.devenv.pcapgen, 1 ms apart.


def write(path: Path, frames: list[bytes]) -> Path:
    with path.open("wb") as f:
        write_frames(f, ((1_700_000_000_000_000 + i * 1000, fr) for i, fr in enumerate(frames)))
    return path


def conn(n: int = 1, port: int = 8080) -> Conn:
    return Conn(cip=bytes([10, 9, 0, n]), sip=bytes([10, 9, 1, 1]), cport=40000 + n, sport=port)


def handshake(c: Conn) -> list[bytes]:
    return [c.segment(True, SYN), c.segment(False, SYN | ACK), c.segment(True, ACK)]


def close(c: Conn) -> list[bytes]:
    return [c.segment(True, FIN | ACK), c.segment(False, FIN | ACK), c.segment(True, ACK)]


# A minimal HTTP exchange for synthetic pcaps.
REQ = b"GET /x HTTP/1.1\r\nHost: a\r\n\r\n"
RESP = b"HTTP/1.1 200 OK\r\nContent-Length: 2\r\n\r\nok"
