"""``make bench``: the agent's offline rate against raw tshark on the same pcap, same run.

The reference is tshark dissecting the same file with the same protocols,
preferences and display filter but printing nothing (``-q``): the ceiling of
any design that lets tshark dissect. Figures are medians of ``--runs`` runs.
"""

from __future__ import annotations

import argparse
import os
import platform
import resource
import statistics
import subprocess
import time
from pathlib import Path

from flowprobe.agent.capture.tshark import Tools, read_file
from flowprobe.agent.config import AgentConfig
from flowprobe.agent.pipeline import Pipeline, Sinks
from flowprobe.agent.sessionize.stats import Stats
from flowprobe.devenv.pcapgen import write_pcap

CACHE = Path(os.environ.get("FLOWPROBE_CACHE", Path.home() / ".cache" / "flowprobe")) / "bench"


def bench_pcap(http: int, redis: int, pg: int) -> tuple[Path, int]:
    CACHE.mkdir(parents=True, exist_ok=True)
    path = CACHE / f"mix-h{http}-r{redis}-p{pg}.pcap"
    if not path.exists():
        tmp = path.with_suffix(".tmp")
        with tmp.open("wb") as f:
            write_pcap(f, {"http": http, "redis": redis, "postgresql": pg})
        tmp.rename(path)
    packets = int(
        subprocess.run(
            ["capinfos", "-c", "-M", "-T", "-r", str(path)], capture_output=True, text=True
        ).stdout.split()[-1]
    )
    return path, packets


def run_raw(tools: Tools, pipeline: Pipeline, path: Path) -> float:
    args = pipeline.tshark_options.tshark_args(tools, str(path))
    # Same dissection, no output: drop the column layout and print nothing.
    i = args.index("-T")
    raw = [*args[:i], "-q", *args[i + 4 :]]
    t0 = time.perf_counter()
    subprocess.run(raw, check=True, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    return time.perf_counter() - t0


def run_agent(tools: Tools, path: Path) -> tuple[float, int]:
    exchanges = 0

    def count(_ex: object) -> None:
        nonlocal exchanges
        exchanges += 1

    sinks = Sinks(exchange=[count])
    pipeline = Pipeline(AgentConfig(), sinks, Stats())
    t0 = time.perf_counter()
    rows = read_file(tools, str(path), pipeline.tshark_options)
    pipeline.feed(rows)
    pipeline.finish()
    return time.perf_counter() - t0, exchanges


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__)
    ap.add_argument("--http", type=int, default=100_000)
    ap.add_argument("--redis", type=int, default=20_000)
    ap.add_argument("--pg", type=int, default=20_000)
    ap.add_argument("--runs", type=int, default=3)
    args = ap.parse_args()
    tools = Tools.find()
    path, packets = bench_pcap(args.http, args.redis, args.pg)
    total = args.http + args.redis + args.pg
    print(
        f"machine: {platform.node()} {os.cpu_count()} cores, {platform.python_implementation()} "
        f"{platform.python_version()}, tshark {tools.version}"
    )
    print(
        f"pcap: {path.name}: {packets} packets, {total} exchanges ({args.http} HTTP, "
        f"{args.redis} Redis, {args.pg} PostgreSQL)"
    )
    pipeline = Pipeline(AgentConfig(), Sinks(), Stats())
    raw_t, agent_t, seen = [], [], 0
    for _ in range(args.runs):
        raw_t.append(run_raw(tools, pipeline, path))
        t, seen = run_agent(tools, path)
        agent_t.append(t)
    raw, agent = statistics.median(raw_t), statistics.median(agent_t)
    rss_self = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss // 1024
    rss_child = resource.getrusage(resource.RUSAGE_CHILDREN).ru_maxrss // 1024
    print(
        f"raw tshark (same dissection, -q):  {raw:7.2f} s  {total / raw:9.0f} exchanges/s  {packets / raw:9.0f} packets/s"
    )
    print(
        f"flowprobe-agent read:              {agent:7.2f} s  {total / agent:9.0f} exchanges/s  {packets / agent:9.0f} packets/s"
    )
    print(
        f"ratio agent / raw tshark:          {raw / agent:7.1%}   (exchanges reported: {seen} of {total})"
    )
    print(f"peak RSS: agent Python {rss_self} MB, largest tshark {rss_child} MB")


if __name__ == "__main__":
    main()
