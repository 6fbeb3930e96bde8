"""Shared test helpers: run the real pipeline (tshark included) over a pcap."""

from __future__ import annotations

from pathlib import Path
from typing import Any

from flowprobe.agent.capture.tshark import Tools, read_file
from flowprobe.agent.config import AgentConfig
from flowprobe.agent.pipeline import Pipeline, Sinks
from flowprobe.agent.sessionize.stats import Stats

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
