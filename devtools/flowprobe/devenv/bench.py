"""``make bench``: the agent's offline rate against raw tshark on the same pcap, same run.

The reference is tshark dissecting the same file with the same protocols,
preferences and display filter but printing nothing (``-q``): the ceiling of
any design that lets tshark dissect. Figures are medians of ``--runs`` runs.

With export (the default; ``--no-export`` skips it), each run also reads the
file with OTLP export on, to the local collector (``LocalBackends``: collector,
Jaeger, Prometheus on loopback, as ``make backends``), and reports that rate as
a share of the offline rate measured in the same loop. The export run's clock
stops when every span and the last metrics have been accepted by the collector
(``Telemetry.close()``), with queues large enough that nothing is dropped: the
rate is the whole pipeline's, not how fast exchanges can be queued. The
collector and Jaeger run on the same machine and compete for its cores.

The export path's own cost is also measured apart from the capture path and
the collector (``export_cost``): its CPU per exchange on exchanges already
read (a sample of the file's, kept from the first offline run), encoded to
OTLP but not sent. That figure does not move when tshark or the sessionizer
get faster, where the ratio does.

CPU seconds per run are printed too: the agent's (this process), tshark's
(children waited for) and the backends' (``/proc``), with their sum over the
cores as a floor under the wall time: on a 2-core machine the collector and
Jaeger take about as much CPU as the agent's export, which bounds the ratio
whichever process the export runs in.

Bytes on the wire are counted by a TCP proxy (``nsproxy``, in its own process)
between the agent and the collector, on one more export run that is not part of
the timing: TCP payload, i.e. HTTP/2 frames with the gRPC messages, both signals,
without TCP/IP headers. The collector's own metrics count spans and points, not
bytes, at the telemetry level its config uses.
"""

from __future__ import annotations

import argparse
import contextlib
import json
import os
import platform
import resource
import signal
import statistics
import subprocess
import sys
import time
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from opentelemetry.exporter.otlp.proto.common.metrics_encoder import encode_metrics
from opentelemetry.sdk.metrics.export import MetricExporter, MetricExportResult, MetricsData

from flowprobe.agent.capture.tshark import Tools, read_file, read_sharded
from flowprobe.agent.cli import tune_gc
from flowprobe.agent.config import AgentConfig, ExportConfig, OtlpConfig
from flowprobe.agent.export import otlp
from flowprobe.agent.export.telemetry import Telemetry
from flowprobe.agent.pipeline import Pipeline, Sinks
from flowprobe.agent.sessionize.records import Exchange
from flowprobe.agent.sessionize.stats import Stats
from flowprobe.devenv.backends import LocalBackends
from flowprobe.devenv.livebench import children_cpu_s, cpu_seconds, tree_pids
from flowprobe.devenv.pcapgen import write_pcap
from flowprobe.devenv.rawtshark import raw_tshark_args

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
    raw = raw_tshark_args(tools, pipeline.tshark_options, str(path))
    t0 = time.perf_counter()
    subprocess.run(raw, check=True, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    return time.perf_counter() - t0


def run_agent(
    tools: Tools, path: Path, shards: int, sample: list[Exchange] | None = None, every: int = 1
) -> tuple[float, int]:
    """Seconds and exchanges of an offline read; every ``every``-th exchange kept in ``sample``."""
    exchanges = 0

    def count(ex: Exchange) -> None:
        nonlocal exchanges
        if sample is not None and exchanges % every == 0:
            sample.append(ex)
        exchanges += 1

    sinks = Sinks(exchange=[count])
    pipeline = Pipeline(AgentConfig(), sinks, Stats())
    t0 = time.perf_counter()
    rows = read_sharded(tools, str(path), pipeline.tshark_options, shards)
    pipeline.feed(rows)
    pipeline.finish()
    return time.perf_counter() - t0, exchanges


def _cpu_s() -> float:
    """This process's CPU seconds (user + system): the agent's Python, without tshark."""
    r = resource.getrusage(resource.RUSAGE_SELF)
    return r.ru_utime + r.ru_stime


@dataclass
class ExportRun:
    seconds: float
    exchanges: int
    cpu_s: float
    spans_exported: int
    spans_dropped: int
    exchanges_dropped: int
    failed_requests: dict[str, int]
    tshark_cpu_s: float
    # The collector, Jaeger and Prometheus, which share the cores in this run.
    backends_cpu_s: float


def run_agent_export(tools: Tools, path: Path, endpoint: str, compression: str) -> ExportRun:
    """``run_agent`` with OTLP export; the clock stops once the collector has everything."""
    exchanges = 0

    def count(_ex: object) -> None:
        nonlocal exchanges
        exchanges += 1

    export = ExportConfig(
        otlp=OtlpConfig(endpoint=endpoint, insecure=True, compression=compression),
        # Lossless: a drop would make the run faster and the figure meaningless.
        queue_size=1_000_000,
        span_queue_size=1_000_000,
        shutdown_timeout_seconds=600,
    )
    stats = Stats()
    spans, metrics = otlp.exporters(export, env={})
    telemetry = Telemetry(export, stats, spans, metrics, wall_clock_release=False)
    pipeline = Pipeline(
        AgentConfig(export=export), Sinks(exchange=[count, telemetry.submit]), stats
    )
    # Before tshark starts, every descendant is a backend (or the counting proxy).
    backends = [pid for pid in tree_pids(os.getpid()) if pid != os.getpid()]
    backends0, children0 = cpu_seconds(backends), children_cpu_s()
    cpu0, t0 = _cpu_s(), time.perf_counter()
    telemetry.start()
    rows = read_file(tools, str(path), pipeline.tshark_options)
    pipeline.feed(rows)
    pipeline.finish()
    telemetry.close()
    c = telemetry.counters
    return ExportRun(
        time.perf_counter() - t0,
        exchanges,
        _cpu_s() - cpu0,
        c.spans_exported,
        sum(c.spans_dropped.values()),
        sum(c.exchanges_dropped.values()),
        dict(c.export_failures),
        children_cpu_s() - children0,
        cpu_seconds(backends) - backends0,
    )


class _Discard:
    """A span sink that only counts what it is given: the export path without a network."""

    def __init__(self) -> None:
        self.requests = 0
        self.bytes = 0

    def export(self, request: bytes) -> bool:
        self.requests += 1
        self.bytes += len(request)
        return True

    def shutdown(self) -> None:
        pass


class _EncodeMetrics(MetricExporter):
    """Encodes metrics as the OTLP metric exporters do (the SDK's encoder), then discards them."""

    def __init__(self) -> None:
        super().__init__()
        self.bytes = 0

    def export(
        self, metrics_data: MetricsData, timeout_millis: float = 10_000, **kwargs: Any
    ) -> MetricExportResult:
        self.bytes += len(encode_metrics(metrics_data).SerializeToString())
        return MetricExportResult.SUCCESS

    def force_flush(self, timeout_millis: float = 10_000) -> bool:
        return True

    def shutdown(self, timeout_millis: float = 30_000, **kwargs: Any) -> None:
        pass


@dataclass
class ExportCost:
    us_per_exchange: float
    exchanges: int
    spans: int
    span_bytes: int


def export_cost(exchanges: list[Exchange]) -> ExportCost:
    """CPU of the export path alone, per exchange, on exchanges already built.

    Everything ``Telemetry`` does for an exchange — workloads, ids, parent
    decision, spans encoded to OTLP protobuf, metrics recorded, requests
    assembled, a final metric collection encoded — but no network (the
    request bytes are counted and dropped): a figure independent of the
    capture path and of the collector. CPU of every thread of this process.
    """
    n = len(exchanges)
    # Lossless, as the export runs: everything queued is encoded.
    config = ExportConfig(queue_size=n + 1, span_queue_size=2 * n + 1, shutdown_timeout_seconds=600)
    sink = _Discard()
    telemetry = Telemetry(config, Stats(), sink, _EncodeMetrics(), wall_clock_release=False)
    cpu0 = _cpu_s()
    telemetry.start()
    for ex in exchanges:
        telemetry.submit(ex)
    telemetry.close()
    cpu = _cpu_s() - cpu0
    return ExportCost(1e6 * cpu / max(n, 1), n, telemetry.counters.spans_exported, sink.bytes)


@contextlib.contextmanager
def counting_proxy(target_port: int) -> Iterator[tuple[int, dict[str, int]]]:
    """A byte-counting forwarder to 127.0.0.1:``target_port`` in its own process.

    Yields its port and a dict filled with ``up``/``down``/``connections`` on exit.
    A separate process, so its copying does not take the measured agent's GIL.
    """
    proc = subprocess.Popen(
        [
            sys.executable,
            "-m",
            "flowprobe.devenv.nsproxy",
            "--listen",
            "127.0.0.1:0",
            "--target",
            f"127.0.0.1:{target_port}",
        ],
        stdout=subprocess.PIPE,
        text=True,
    )
    assert proc.stdout is not None
    counts: dict[str, int] = {}
    try:
        port = int(json.loads(proc.stdout.readline())["port"])
        yield port, counts
    finally:
        proc.send_signal(signal.SIGTERM)
        out, _ = proc.communicate(timeout=30)
        lines = out.strip().splitlines()
        if lines:
            counts.update(json.loads(lines[-1]))


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__)
    ap.add_argument("--http", type=int, default=100_000)
    ap.add_argument("--redis", type=int, default=20_000)
    ap.add_argument("--pg", type=int, default=20_000)
    ap.add_argument("--runs", type=int, default=3)
    ap.add_argument(
        "--shards",
        type=int,
        default=min(2, os.cpu_count() or 1),
        help="the agent's --shards (tshark processes); one tshark is measured too",
    )
    ap.add_argument(
        "--export-sample",
        type=int,
        default=20_000,
        help="exchanges kept from the first offline run for the export-alone figure (0: none)",
    )
    ap.add_argument(
        "--no-export", action="store_true", help="skip the runs with OTLP export to the collector"
    )
    ap.add_argument(
        "--otlp-compression",
        choices=("none", "gzip"),
        default="none",
        help="compression of the export runs (the agent's default is none)",
    )
    args = ap.parse_args()
    # The agent is measured in this process: with the agent's settings.
    tune_gc()
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
    otlp.quiet_sdk_export_logs()
    with contextlib.ExitStack() as stack:
        backends = None
        if not args.no_export:
            # Prometheus at a production-like interval: at the tests' 1 s the
            # collector would re-render thousands of series every second, on
            # the cores the measured agent needs.
            backends = stack.enter_context(LocalBackends(otlp_file=False, scrape_interval="15s"))
        raw_t, agent_t, single_t, agent_cpu, single_cpu, exports, seen = [], [], [], [], [], [], 0
        # Exchanges for the export-only figure, spread over the whole file so
        # the protocol mix is the file's.
        sample: list[Exchange] = []
        for run in range(args.runs):
            raw_t.append(run_raw(tools, pipeline, path))
            cpu0 = _cpu_s()
            t, seen = run_agent(
                tools,
                path,
                args.shards,
                sample if run == 0 and args.export_sample > 0 else None,
                max(1, total // max(1, args.export_sample)),
            )
            agent_cpu.append(_cpu_s() - cpu0)
            agent_t.append(t)
            if args.shards > 1:
                cpu0, children0 = _cpu_s(), children_cpu_s()
                single_t.append(run_agent(tools, path, 1)[0])
                single_cpu.append((_cpu_s() - cpu0, children_cpu_s() - children0))
            if backends is not None:
                exports.append(
                    run_agent_export(tools, path, backends.otlp_grpc, args.otlp_compression)
                )
        wire: tuple[ExportRun, dict[str, int]] | None = None
        if backends is not None:
            with counting_proxy(backends.ports.otlp_grpc) as (port, counts):
                wired = run_agent_export(
                    tools, path, f"http://127.0.0.1:{port}", args.otlp_compression
                )
            wire = wired, counts
    raw, agent = statistics.median(raw_t), statistics.median(agent_t)
    rss_self = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss // 1024
    rss_child = resource.getrusage(resource.RUSAGE_CHILDREN).ru_maxrss // 1024
    print(
        f"raw tshark (same dissection, -q):  {raw:7.2f} s  {total / raw:9.0f} exchanges/s  {packets / raw:9.0f} packets/s"
    )
    if single_t:
        single = statistics.median(single_t)
        print(
            f"flowprobe-agent read --shards 1:   {single:7.2f} s  {total / single:9.0f} exchanges/s  {packets / single:9.0f} packets/s  ({raw / single:.1%} of raw)"
        )
    print(
        f"flowprobe-agent read --shards {args.shards}:   {agent:7.2f} s  {total / agent:9.0f} exchanges/s  {packets / agent:9.0f} packets/s  ({raw / agent:.1%} of raw)"
    )
    # The agent's best setting on this machine in this run: which one wins
    # varies from run to run on a 2-core VM (docs/performance.md).
    settings = [(agent, args.shards)] + ([(single, 1)] if single_t else [])
    best, best_shards = min(settings)
    print(
        f"ratio agent / raw tshark:          {raw / best:7.1%}   (best setting, --shards {best_shards}; exchanges reported: {seen} of {total})"
    )
    if args.runs > 1:
        # Each run's agent against the raw tshark timed just before it: the
        # spread says whether the median is a fluke.
        each = " / ".join(f"{r / a:.1%}" for r, a in zip(raw_t, agent_t, strict=True))
        print(f"  --shards {args.shards} per run:             {each}")
    # Children are tshark and tcpdump, and with export also the backends
    # (Jaeger keeps every span in memory), so the label says which applies.
    largest = "largest child (tshark, or a backend)" if exports else "largest tshark"
    print(f"peak RSS: agent Python {rss_self} MB, {largest} {rss_child} MB")
    if sample:
        costs = [export_cost(sample) for _ in range(args.runs)]
        cost = statistics.median(c.us_per_exchange for c in costs)
        c = costs[-1]
        print(
            f"export alone (no network):         {cost:7.1f} µs CPU/exchange   (spans + metrics "
            f"encoded to OTLP, on {c.exchanges} exchanges already read; "
            f"{c.spans / max(c.exchanges, 1):.2f} spans/exchange, "
            f"{c.span_bytes / max(c.spans, 1):.0f} bytes/span; offline read: "
            f"{1e6 * statistics.median(agent_cpu) / total:.1f} µs CPU/exchange)"
        )
    if exports:
        # The export runs read with one tshark: compare like with like.
        one_tshark = statistics.median(single_t) if single_t else agent
        _report_export(exports, one_tshark, statistics.median(agent_cpu), total, wire, args)
        if single_cpu:
            _report_cpu(exports, single_cpu, one_tshark)


def _report_export(
    exports: list[ExportRun],
    agent_s: float,
    agent_cpu_s: float,
    total: int,
    wire: tuple[ExportRun, dict[str, int]] | None,
    args: argparse.Namespace,
) -> None:
    med = statistics.median(e.seconds for e in exports)
    cpu = statistics.median(e.cpu_s for e in exports)
    last = exports[-1]
    dropped = [e.spans_dropped + e.exchanges_dropped for e in exports]
    failed = [e.failed_requests for e in exports]
    print(
        f"read + OTLP export (gRPC, {args.otlp_compression}): {med:7.2f} s  "
        f"{total / med:9.0f} exchanges/s   (spans exported {last.spans_exported}, "
        f"{last.spans_exported / max(last.exchanges, 1):.2f}/exchange; "
        + ("nothing dropped" if not any(dropped) else f"DROPPED per run: {dropped}")
        + ("" if not any(failed) else f"; failed requests per run: {failed}")
        + ")"
    )
    share = agent_s / med
    verdict = "meets" if share >= 0.7 else "misses"
    print(
        f"export rate / offline rate:        {share:7.1%}   (export costs {1 - share:.1%} of the "
        f"offline rate; target at most 30%: {verdict} it)"
    )
    print(
        f"agent CPU per 1000 exchanges:      {1000 * agent_cpu_s / total:7.3f} s offline, "
        f"{1000 * cpu / total:.3f} s with export (this process: Python threads, not tshark)"
    )
    if wire is not None:
        run, counts = wire
        up, down = counts.get("up", 0), counts.get("down", 0)
        print(
            f"OTLP on the wire:                  {up / total:7.0f} bytes/exchange agent -> "
            f"collector, {down / total:.0f} back ({up / max(run.spans_exported, 1):.0f} "
            f"bytes/span; {up / 1e6:.1f} MB in {counts.get('connections', 0)} connections; "
            "TCP payload counted by a proxy on one more, untimed run)"
        )


def _report_cpu(
    exports: list[ExportRun], single_cpu: list[tuple[float, float]], single_s: float
) -> None:
    """Where the cores went, offline (one tshark) and with export: what bounds the export rate.

    On a machine with few cores, the sum of every process's CPU divided by the
    cores is a floor under the wall time, whatever runs in parallel.
    """
    cores = os.cpu_count() or 1
    agent = statistics.median(a for a, _ in single_cpu)
    tshark = statistics.median(t for _, t in single_cpu)
    print(
        f"CPU s, offline (one tshark):       agent {agent:.1f}, tshark {tshark:.1f}: "
        f"{agent + tshark:.1f} s on {cores} cores in {single_s:.1f} s"
    )
    e_agent = statistics.median(e.cpu_s for e in exports)
    e_tshark = statistics.median(e.tshark_cpu_s for e in exports)
    e_back = statistics.median(e.backends_cpu_s for e in exports)
    e_total = e_agent + e_tshark + e_back
    print(
        f"CPU s, with export:                agent {e_agent:.1f}, tshark {e_tshark:.1f}, "
        f"collector + Jaeger + Prometheus {e_back:.1f}: {e_total:.1f} s, at least "
        f"{e_total / cores:.1f} s of wall time on {cores} cores "
        f"(took {statistics.median(e.seconds for e in exports):.1f} s)"
    )


if __name__ == "__main__":
    main()
