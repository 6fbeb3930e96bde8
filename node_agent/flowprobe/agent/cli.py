"""``flowprobe-agent``: read pcaps or capture live; print exchanges or a summary, or export OTLP."""

from __future__ import annotations

import argparse
import contextlib
import gc
import json
import logging
import signal
import sys
import threading
from collections.abc import Sequence
from pathlib import Path
from typing import BinaryIO

from flowprobe.agent.analyze import options as analyze_options
from flowprobe.agent.capture.rotate import (
    DEFAULT_TSHARK_RSS_LIMIT,
    STOP_DRAIN_S,
    RotatingCapture,
)
from flowprobe.agent.capture.tshark import CaptureError, LiveCapture, Tools, read_sharded
from flowprobe.agent.config import (
    ALL_PROTOCOLS,
    AgentConfig,
    ExportConfig,
    ForensicsConfig,
    OtlpConfig,
)
from flowprobe.agent.export import otlp
from flowprobe.agent.export.jsonl import JsonLinesWriter
from flowprobe.agent.export.naming import RouteTable
from flowprobe.agent.export.selfmetrics import ExportCounters, SelfMetrics
from flowprobe.agent.export.summary import Summary
from flowprobe.agent.export.telemetry import Telemetry
from flowprobe.agent.export.workloads import parse_service_name_rule
from flowprobe.agent.forensics import options as forensics_options
from flowprobe.agent.forensics.endpoint import PcapEndpoint, PcapServer
from flowprobe.agent.forensics.freezer import Forensics
from flowprobe.agent.isolation import options as isolation_options
from flowprobe.agent.isolation.engine import IsolationEngine
from flowprobe.agent.pipeline import Pipeline, Sinks
from flowprobe.agent.security import options as security_options
from flowprobe.agent.security.modsec import WafError
from flowprobe.agent.sessionize.stats import Stats

EXIT_OK, EXIT_BAD_INPUT = 0, 2
log = logging.getLogger("flowprobe.agent")


def _port_rule(text: str) -> tuple[str, int]:
    proto, sep, port = text.partition("=")
    if not sep or proto not in ALL_PROTOCOLS or not port.isdigit() or not 0 < int(port) < 65536:
        raise argparse.ArgumentTypeError(
            f"expected PROTOCOL=PORT with PROTOCOL one of {', '.join(ALL_PROTOCOLS)}, got {text!r}"
        )
    return proto, int(port)


def _service_name_rule(text: str) -> tuple[str, str]:
    try:
        return parse_service_name_rule(text)
    except ValueError as exc:
        raise argparse.ArgumentTypeError(str(exc)) from None


def _route(text: str) -> str:
    try:
        RouteTable([text])
    except ValueError as exc:
        raise argparse.ArgumentTypeError(str(exc)) from None
    return text


def _header(text: str) -> tuple[str, str]:
    key, sep, value = text.partition("=")
    if not sep or not key:
        raise argparse.ArgumentTypeError(f"expected KEY=VALUE, got {text!r}")
    return key, value


def _add_export_options(common: argparse.ArgumentParser) -> None:
    ex = common.add_argument_group(
        "export",
        "OpenTelemetry spans and metrics over OTLP. The standard OTEL_EXPORTER_OTLP_* "
        "variables apply too; a flag wins over its variable. With OTLP on, JSON Lines "
        "are written only with --output (use '-' for stdout).",
    )
    ex.add_argument(
        "--otlp-endpoint",
        metavar="URL",
        help="send spans and metrics here, e.g. http://127.0.0.1:4317 (gRPC) or "
        "http://127.0.0.1:4318 (HTTP; /v1/traces and /v1/metrics are appended)",
    )
    ex.add_argument("--otlp-protocol", choices=otlp.PROTOCOLS, help="default grpc")
    ex.add_argument(
        "--otlp-header",
        action="append",
        type=_header,
        default=[],
        metavar="KEY=VALUE",
        help="request header, e.g. authorization=Bearer... (repeatable)",
    )
    ex.add_argument("--otlp-insecure", action="store_true", default=None, help="gRPC without TLS")
    ex.add_argument("--otlp-ca", metavar="PEM", help="CA certificate to verify the backend")
    ex.add_argument("--otlp-client-cert", metavar="PEM", help="client certificate (mTLS)")
    ex.add_argument("--otlp-client-key", metavar="PEM", help="client key (mTLS)")
    ex.add_argument("--otlp-compression", choices=otlp.COMPRESSIONS)
    ex.add_argument("--otlp-timeout", type=float, metavar="SECONDS", help="per request")
    ex.add_argument(
        "--console-spans",
        action="store_true",
        help="print the spans as OTLP-style JSON lines on stdout instead of sending them",
    )
    ex.add_argument(
        "--service-name",
        action="append",
        type=_service_name_rule,
        default=[],
        metavar="ADDR[:PORT]=NAME",
        help="service.name of the workload at ADDR:PORT (a server) or ADDR (repeatable); "
        "others are named after their address",
    )
    ex.add_argument(
        "--route",
        action="append",
        type=_route,
        default=[],
        metavar="PATTERN",
        help="HTTP route template tried before the id heuristic, e.g. /users/{id}/cart "
        "(repeatable)",
    )
    ex.add_argument(
        "--metrics-port",
        type=int,
        metavar="PORT",
        help="serve the agent's own metrics on http://ADDRESS:PORT/metrics",
    )
    ex.add_argument(
        "--metrics-address", default="0.0.0.0", help="address for --metrics-port (default all)"
    )


def build_parser() -> argparse.ArgumentParser:
    ap = argparse.ArgumentParser(prog="flowprobe-agent", description=__doc__)
    sub = ap.add_subparsers(dest="command", required=True)
    common = argparse.ArgumentParser(add_help=False)
    common.add_argument("--output", "-o", help="write JSON Lines here instead of stdout")
    common.add_argument("--summary", action="store_true", help="print a table instead of records")
    common.add_argument(
        "--connections", action="store_true", help="also write L4 connection records"
    )
    common.add_argument(
        "--port",
        action="append",
        type=_port_rule,
        default=[],
        metavar="PROTO=PORT",
        help="a server port of a protocol beyond its defaults (repeatable), e.g. redis=6380",
    )
    common.add_argument(
        "--protocols", default=",".join(ALL_PROTOCOLS), help="comma-separated protocols to parse"
    )
    common.add_argument(
        "--stats", metavar="FILE", help="write the agent's counters as JSON here at exit"
    )
    common.add_argument("--verbose", "-v", action="store_true")
    _add_export_options(common)
    security_options.add_arguments(common)
    analyze_options.add_arguments(common)
    isolation_options.add_arguments(common)
    rd = sub.add_parser("read", parents=[common], help="read pcap/pcapng files (gzip too)")
    rd.add_argument("files", nargs="+")
    rd.add_argument(
        "--shards",
        type=int,
        default=1,
        help="tshark processes dissecting shares of the connections in parallel "
        "(needs tcpdump; one per spare core; default 1)",
    )
    cap = sub.add_parser("capture", parents=[common], help="capture live until interrupted")
    cap.add_argument(
        "--interface", "-i", action="append", required=True, help="interface (repeatable) or 'any'"
    )
    cap.add_argument("--filter", "-f", help="BPF capture filter")
    cap.add_argument("--duration", type=float, help="stop after this many seconds")
    cap.add_argument(
        "--tshark-rss-limit",
        type=int,
        default=DEFAULT_TSHARK_RSS_LIMIT >> 20,
        metavar="MB",
        help="replace tshark (make-before-break) when its memory passes this (default %(default)s)",
    )
    forensics_options.add_arguments(cap)
    forensics_options.add_pcap_command(sub)
    sub.add_parser(
        "daemon",
        help="run on a Kubernetes node, configured by the operator through the environment "
        "(docs/agent-in-cluster.md)",
    ).add_argument("--verbose", "-v", action="store_true")
    return ap


def _config(args: argparse.Namespace) -> AgentConfig:
    ports: dict[str, list[int]] = {}
    for proto, port in args.port:
        ports.setdefault(proto, []).append(port)
    protocols = tuple(p for p in args.protocols.split(",") if p)
    unknown = set(protocols) - set(ALL_PROTOCOLS)
    if unknown:
        raise SystemExit(f"flowprobe-agent: unknown protocol(s): {', '.join(sorted(unknown))}")
    export = ExportConfig(
        otlp=OtlpConfig(
            endpoint=args.otlp_endpoint,
            protocol=args.otlp_protocol,
            headers=dict(args.otlp_header),
            insecure=args.otlp_insecure,
            certificate=args.otlp_ca,
            client_certificate=args.otlp_client_cert,
            client_key=args.otlp_client_key,
            compression=args.otlp_compression,
            timeout_seconds=args.otlp_timeout,
        ),
        console_spans=args.console_spans,
        service_names=dict(args.service_name),
        routes=tuple(args.route),
        metrics_port=args.metrics_port,
        metrics_address=args.metrics_address,
    )
    return AgentConfig(
        protocols=protocols,
        ports={k: tuple(v) for k, v in ports.items()},
        export=export,
        security=security_options.from_args(args),
        anomalies=analyze_options.from_args(args),
        isolation=isolation_options.from_args(args),
        forensics=(
            forensics_options.from_args(args) if args.command == "capture" else ForensicsConfig()
        ),
    )


class _Progress:
    """Counts on stderr every two seconds while a long read runs, if stderr is a terminal."""

    def __init__(self, stats: Stats, enabled: bool) -> None:
        self.stats = stats
        self.enabled = enabled
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, daemon=True)

    def __enter__(self) -> _Progress:
        if self.enabled:
            self._thread.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self._stop.set()
        if self.enabled:
            self._thread.join()
            sys.stderr.write("\r\033[K")

    def _run(self) -> None:
        while not self._stop.wait(2.0):
            s = self.stats
            sys.stderr.write(f"\r{s.packets} packets, {s.exchanges} exchanges")
            sys.stderr.flush()


class _LiveTable:
    """Redraws the summary each second on a terminal while capturing."""

    def __init__(self, summary: Summary, stats: Stats) -> None:
        self.summary, self.stats = summary, stats
        self._stop = threading.Event()
        self._lock = threading.Lock()
        self._thread = threading.Thread(target=self._run, daemon=True)

    def start(self) -> None:
        self._thread.start()

    def stop(self) -> None:
        self._stop.set()
        self._thread.join()

    def _run(self) -> None:
        while not self._stop.wait(1.0):
            sys.stdout.write("\033[H\033[2J")
            s = self.stats
            sys.stdout.write(
                f"flowprobe live: {s.packets} packets, {s.exchanges} exchanges, "
                f"{sum(s.anomalies.values())} anomalies\n\n"
            )
            self.summary.render(sys.stdout, top=15)
            sys.stdout.flush()


def run(argv: Sequence[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    logging.basicConfig(
        level=logging.DEBUG if args.verbose else logging.WARNING,
        format="flowprobe-agent: %(levelname)s %(message)s",
    )
    if args.command == "daemon":
        # Imported here: the Kubernetes client adds start-up time `read` does not need.
        from flowprobe.agent.daemon.main import run_daemon

        # Its status is in the log: INFO unless --verbose asks for more.
        logging.getLogger().setLevel(logging.DEBUG if args.verbose else logging.INFO)
        return run_daemon()
    if args.command == "pcap":
        return forensics_options.run_pcap(args)
    try:
        config = _config(args)
    except ValueError as exc:  # pydantic's ValidationError is one
        print(f"flowprobe-agent: {' '.join(str(exc).split())}", file=sys.stderr)
        return EXIT_BAD_INPUT
    if not args.verbose:
        otlp.quiet_sdk_export_logs()
    stats = Stats()
    sinks = Sinks()
    summary = Summary(routes=RouteTable(config.export.routes))
    try:
        telemetry = _telemetry(config.export, stats, live=args.command == "capture")
    except (otlp.OtlpConfigError, ValueError) as exc:
        print(f"flowprobe-agent: {exc}", file=sys.stderr)
        return EXIT_BAD_INPUT
    analyzer = None
    if config.anomalies.enabled:
        if telemetry is None:
            print(
                "flowprobe-agent: --anomalies needs --otlp-endpoint (or --console-spans)",
                file=sys.stderr,
            )
            return EXIT_BAD_INPUT
        try:
            analyzer = analyze_options.attach(
                config.anomalies, telemetry, live=args.command == "capture"
            )
        except otlp.OtlpConfigError as exc:
            print(f"flowprobe-agent: {exc}", file=sys.stderr)
            return EXIT_BAD_INPUT
    out: BinaryIO
    to_stdout = args.output in (None, "-")
    out_file = None if to_stdout else open(args.output, "wb")  # noqa: SIM115
    out = out_file if out_file is not None else sys.stdout.buffer
    writer = JsonLinesWriter(out, connections=args.connections)
    if args.summary:
        sinks.exchange.append(summary.add)
    # Records go to stdout unless something else already uses it (the
    # summary) or they go elsewhere (OTLP): then only when asked for.
    if args.output is not None or (not args.summary and telemetry is None):
        sinks.exchange.append(writer.exchange)
        sinks.connection.append(writer.connection)
    self_metrics: SelfMetrics | None = None
    if telemetry is not None:
        sinks.exchange.append(telemetry.submit)
    isolation: IsolationEngine | None = None
    if config.isolation.file is not None:
        # After the security stage, when there is one: it sees the WAF's findings.
        try:
            isolation = isolation_options.build_engine(
                config, telemetry, enforce=args.command == "capture"
            )
        except (otlp.OtlpConfigError, ValueError, OSError) as exc:
            print(f"flowprobe-agent: {exc}", file=sys.stderr)
            return EXIT_BAD_INPUT
        sinks.exchange.append(isolation.submit)
    try:
        tools = Tools.find()
    except CaptureError as exc:
        print(f"flowprobe-agent: {exc}", file=sys.stderr)
        return EXIT_BAD_INPUT
    forensics: Forensics | None = None
    if config.forensics.enabled:
        try:
            forensics = Forensics(tools, config.forensics)
        except (CaptureError, OSError) as exc:
            print(f"flowprobe-agent: forensics: {exc}", file=sys.stderr)
            return EXIT_BAD_INPUT
        # First: the pcap's name must be on the exchange before any sink reads it.
        sinks.exchange.insert(0, forensics.observe)
        if analyzer is not None:
            analyzer.freeze = forensics.freeze_anomaly
    stage = None
    if config.security.enabled:
        # Every sink gets the exchanges after inspection, from the stage's thread.
        downstream = Sinks(exchange=list(sinks.exchange))
        try:
            stage = security_options.build_stage(config, downstream.on_exchange, telemetry)
        except (WafError, otlp.OtlpConfigError, ValueError) as exc:
            print(f"flowprobe-agent: {exc}", file=sys.stderr)
            return EXIT_BAD_INPUT
        sinks.exchange[:] = [stage.submit]
    pipeline = Pipeline(config, sinks, stats)
    try:
        if telemetry is not None:
            telemetry.start()
        elif config.export.metrics_port is not None:
            self_metrics = SelfMetrics(stats, ExportCounters())
            self_metrics.serve(config.export.metrics_port, config.export.metrics_address)
    except OSError as exc:
        print(f"flowprobe-agent: --metrics-port: {exc}", file=sys.stderr)
        return EXIT_BAD_INPUT
    code = EXIT_OK
    pcap_server: PcapServer | None = None
    try:
        try:
            if forensics is not None:
                pcap_server = _start_forensics(forensics, args)
        except (CaptureError, OSError) as exc:  # the ring's dumpcap, or --pcap-port taken
            print(f"flowprobe-agent: forensics: {exc}", file=sys.stderr)
            code = EXIT_BAD_INPUT
        else:
            if args.command == "read":
                code = _read(args.files, tools, pipeline, stats, max(1, args.shards))
            else:
                code = _capture(args, tools, pipeline, stats, summary)
    finally:
        pipeline.finish()
        if stage is not None:
            stage.close()
        if isolation is not None:
            isolation.close()
        if forensics is not None:
            forensics.close()
        if pcap_server is not None:
            pcap_server.stop()
        if telemetry is not None:
            telemetry.close()
        if analyzer is not None:
            analyzer.close()
        if self_metrics is not None:
            self_metrics.stop()
        writer.flush()
        if args.summary:
            summary.render(sys.stdout)
        if out_file is not None:
            out_file.close()
        if stats.anomalies:
            log.info("anomalies: %s", dict(stats.anomalies))
        if args.stats:
            report = stats.as_dict()
            if stage is not None:
                report["security"] = stage.totals()
            if analyzer is not None:
                report["anomalies"] = analyzer.totals()
            if isolation is not None:
                report["isolation"] = isolation.totals()
            if forensics is not None:
                report["forensics"] = forensics.totals()
            Path(args.stats).write_text(json.dumps(report, indent=1) + "\n")
    return code


def _start_forensics(forensics: Forensics, args: argparse.Namespace) -> PcapServer | None:
    """The ring on the capture's interfaces and filter, capturing before the live
    capture starts; and the pcap endpoint when --pcap-port is given."""
    forensics.follow(args.interface, args.filter)
    if not forensics.ring.wait_capturing(timeout=30):
        raise CaptureError(forensics.ring.check() or "the ring's dumpcap did not start capturing")
    forensics.start()
    if args.pcap_port is None:
        return None
    endpoint = PcapEndpoint(forensics.store, forensics.config.token_file)
    return PcapServer(endpoint, args.pcap_address, args.pcap_port).start()


def _telemetry(export: ExportConfig, stats: Stats, live: bool) -> Telemetry | None:
    """The OTLP (or console) sink, or None when neither is configured."""
    span_exporter, metric_exporter = otlp.exporters(export)
    if span_exporter is None and metric_exporter is None:
        return None
    interval = otlp.metric_interval(export)
    if interval != export.metric_interval_seconds:
        export = export.model_copy(update={"metric_interval_seconds": interval})
    return Telemetry(
        export,
        stats,
        span_exporter,
        metric_exporter,
        # Replaying a file, wall time says nothing about capture time.
        wall_clock_release=live,
    )


def _read(files: Sequence[str], tools: Tools, pipeline: Pipeline, stats: Stats, shards: int) -> int:
    with _Progress(stats, sys.stderr.isatty()):
        for path in files:
            try:
                rows = read_sharded(tools, path, pipeline.tshark_options, shards)
            except CaptureError as exc:
                print(f"flowprobe-agent: {exc}", file=sys.stderr)
                return EXIT_BAD_INPUT
            pipeline.feed(rows)
            if rows.error:
                # Whatever was read before the damage has been reported.
                print(f"flowprobe-agent: {path}: {rows.error}", file=sys.stderr)
                return EXIT_BAD_INPUT
    return EXIT_OK


def _capture(
    args: argparse.Namespace,
    tools: Tools,
    pipeline: Pipeline,
    stats: Stats,
    summary: Summary,
) -> int:
    try:
        live = RotatingCapture(
            lambda start_tshark: LiveCapture(
                tools,
                args.interface,
                pipeline.tshark_options,
                bpf=args.filter,
                start_tshark=start_tshark,
            ),
            tshark_rss_limit=args.tshark_rss_limit << 20,
        )
    except CaptureError as exc:
        print(f"flowprobe-agent: {exc}", file=sys.stderr)
        return EXIT_BAD_INPUT
    if live.wait_capturing(timeout=30):
        print(f"flowprobe-agent: capturing on {', '.join(args.interface)}", file=sys.stderr)
    else:
        print("flowprobe-agent: dumpcap has not started capturing after 30 s", file=sys.stderr)
    stop = threading.Event()

    def _interrupt(_sig: int, _frame: object) -> None:
        # Stop dumpcap once tshark has read what it captured up to now; tshark
        # then drains its pipe and the loop ends cleanly.
        stop.set()
        threading.Thread(target=live.stop, args=(STOP_DRAIN_S,), daemon=True).start()

    previous = signal.signal(signal.SIGINT, _interrupt)
    signal.signal(signal.SIGTERM, _interrupt)
    table = _LiveTable(summary, stats) if args.summary and sys.stdout.isatty() else None
    if table:
        table.start()
    timer = None
    if args.duration:
        timer = threading.Timer(args.duration, _interrupt, args=(0, None))
        timer.daemon = True
        timer.start()
    try:
        pipeline.feed(live)
    finally:
        if timer:
            timer.cancel()
        if table:
            table.stop()
        live.stop()
        signal.signal(signal.SIGINT, previous)
    counts = live.capture_counts()
    if counts is not None:
        stats.capture_received, stats.capture_dropped = counts
    stats.tshark_rotations = live.rotations
    err = live.error()
    if err and not stop.is_set():
        print(f"flowprobe-agent: {err}", file=sys.stderr)
        return EXIT_BAD_INPUT
    with contextlib.suppress(Exception):
        sys.stdout.flush()
    return EXIT_OK


# Python's cyclic garbage collector. What the agent allocates per packet is
# freed at once by reference counting and barely counts (5 young collections
# for the bench's 436,800 rows); what waits for export does. Exporting 20,000
# exchanges in the bench's process (which holds 140,000) ran 307 young, 28
# middle and 1 full collection at the default 700/10/10, 0.24 s, the full one
# walking every object held; here 8 young and 1 middle, 0.10 s. The export
# path's CPU per exchange went from 56 to 47 µs (docs/performance.md,
# 2026-11-29, later).
GC_THRESHOLDS = (20_000, 20, 20)


def tune_gc() -> None:
    """GC settings of the agent process: ``main`` and the in-process bench call it."""
    # What imports made lives as long as the process: no collection need walk it.
    gc.freeze()
    gc.set_threshold(*GC_THRESHOLDS)


def main() -> None:
    tune_gc()
    sys.exit(run())
