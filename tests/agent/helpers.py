"""Shared test helpers: the real pipeline (tshark included) over a pcap, the agent as a
subprocess, parsers on hand-made columns and synthetic pcaps."""

from __future__ import annotations

import functools
import json
import os
import signal
import subprocess
import sys
from collections.abc import Sequence
from pathlib import Path
from typing import Any, TypeVar

from flowprobe.agent.capture.columns import ColumnLayout
from flowprobe.agent.capture.tshark import Tools, read_file
from flowprobe.agent.config import AgentConfig
from flowprobe.agent.parse.base import Parser
from flowprobe.agent.parse.messages import L7Message
from flowprobe.agent.pipeline import Pipeline, Sinks
from flowprobe.agent.sessionize.stats import Stats
from flowprobe.devenv.netns import Pod
from flowprobe.devenv.pcapgen import ACK, FIN, PSH, SYN, Conn, write_frames

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


def agent(*args: str, env: dict[str, str] | None = None) -> subprocess.CompletedProcess[str]:
    """``flowprobe-agent ARGS`` as a subprocess, run to completion (two minutes at most)."""
    return subprocess.run(
        [sys.executable, "-m", "flowprobe.agent", *args],
        capture_output=True,
        text=True,
        timeout=120,
        env=env,
    )


def stop_agent(agent: subprocess.Popen[bytes], timeout: float = 120) -> None:
    """Interrupt a live agent (``Node.spawn_agent``): it must drain and exit 0."""
    os.killpg(agent.pid, signal.SIGINT)
    assert agent.wait(timeout=timeout) == 0


def read_pcap(path: str | Path, **config: Any) -> list[dict[str, Any]]:
    """Exchange records of a pcap read through tshark and the whole pipeline."""
    records, _stats, error = run_pcap(path, **config)
    assert error is None, error
    return records


def db_summary(records: list[dict[str, Any]]) -> list[tuple[Any, ...]]:
    """Operation, query text, outcome, rows, affected rows, status of each database record."""
    return [
        (
            r.get("db.operation.name"),
            r.get("db.query.text"),
            r["flowprobe.outcome"],
            r.get("flowprobe.db.rows"),
            r.get("flowprobe.db.affected_rows"),
            r.get("db.response.status_code"),
        )
        for r in records
    ]


def check_db_records(
    records: list[dict[str, Any]], system: str, namespace: str, peers: tuple[str, str], port: int
) -> None:
    """What every record of a recorded database pcap carries; ``peers`` is (client, server)."""
    for r in records:
        assert r["flowprobe.protocol"] == system
        assert r["db.system.name"] == system
        assert r["db.namespace"] == namespace
        assert (r["client.address"], r["server.address"], r["server.port"]) == (*peers, port)
        assert r["flowprobe.duration_us"] > 0
        assert r["start_time_unix_us"] < r["end_time_unix_us"]
        assert r["flowprobe.server_response_time_us"] >= 0
        assert r["flowprobe.response.packets"] >= 1
        if r["flowprobe.outcome"] == "error":
            assert r["error.type"] == r["db.response.status_code"]
        else:
            assert "error.type" not in r


# Parsers on hand-made tshark columns.

P = TypeVar("P", bound=Parser)


@functools.cache
def layout(fields: tuple[str, ...]) -> ColumnLayout:
    return ColumnLayout.build(fields)


def bound(parser: P) -> P:
    """``parser`` bound to the layout of its own fields, the one ``columns`` fills."""
    parser.bind(layout(parser.fields))
    return parser


def columns(fields: tuple[str, ...], prefix: str = "", **values: str) -> list[str]:
    """One packet's columns in the layout of ``fields``: each keyword is a field
    name after ``prefix`` with ``__`` for ``.``; the other columns are empty."""
    lay = layout(fields)
    cols = [""] * len(lay.fields)
    for name, value in values.items():
        cols[lay.index(prefix + name.replace("__", "."))] = value
    return cols


def exchange_messages(
    parser: Parser, cols: Sequence[str], to_server: bool | None, state: dict[str, object]
) -> list[L7Message]:
    """The parser's messages that take part in exchanges (not mere boundary marks)."""
    return [m for m in parser.parse(cols, to_server, state) if not getattr(m, "control", False)]


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


def one_exchange(c: Conn, request: bytes, response: bytes) -> list[bytes]:
    """A whole connection carrying one request and its response, each in one segment."""
    return [
        *handshake(c),
        c.segment(True, ACK | PSH, request),
        c.segment(False, ACK | PSH, response),
        *close(c),
    ]


# A minimal HTTP exchange for synthetic pcaps.
REQ = b"GET /x HTTP/1.1\r\nHost: a\r\n\r\n"
RESP = b"HTTP/1.1 200 OK\r\nContent-Length: 2\r\n\r\nok"


def loadgen(pod: Pod, target: str, seconds: int, rate: int, paths: str, connections: int) -> Any:
    """``flowprobe.devenv.loadgen`` from ``pod`` to ``target``:8080 at ``rate`` a second
    for ``seconds``; its JSON summary."""
    r = pod.run(
        [
            sys.executable, "-m", "flowprobe.devenv.loadgen",
            "--target", target,
            "--requests", str(rate * seconds),
            "--rate", str(rate),
            "--connections", str(connections),
            "--paths", paths,
        ]
    )  # fmt: skip
    assert r.returncode == 0, r.stderr
    return json.loads(r.stdout)


def check_stream_id(pcap: Path, stream_id: str) -> None:
    """The stream id is the connection's Community ID, as Wireshark computes it: every
    packet of the pcap has it."""
    hits = subprocess.run(
        [
            "tshark",
            "-r",
            str(pcap),
            "-n",
            "--enable-protocol",
            "communityid",
            "-Y",
            f'communityid == "{stream_id}"',
        ],
        capture_output=True,
        text=True,
        check=True,
    ).stdout.splitlines()
    assert hits and len(hits) == len(_frames(pcap))


def _frames(pcap: Path) -> list[str]:
    return subprocess.run(
        ["tshark", "-r", str(pcap), "-n"], capture_output=True, text=True, check=True
    ).stdout.splitlines()
