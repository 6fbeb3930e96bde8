"""``flowprobe-agent``: read pcaps or capture live, print exchanges or a summary."""

from __future__ import annotations

import argparse
import contextlib
import json
import logging
import signal
import sys
import threading
from collections.abc import Sequence
from pathlib import Path
from typing import BinaryIO

from flowprobe.agent.capture.tshark import CaptureError, LiveCapture, Tools, read_file
from flowprobe.agent.config import ALL_PROTOCOLS, AgentConfig
from flowprobe.agent.export.jsonl import JsonLinesWriter
from flowprobe.agent.export.summary import Summary
from flowprobe.agent.pipeline import Pipeline, Sinks
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
    rd = sub.add_parser("read", parents=[common], help="read pcap/pcapng files (gzip too)")
    rd.add_argument("files", nargs="+")
    cap = sub.add_parser("capture", parents=[common], help="capture live until interrupted")
    cap.add_argument(
        "--interface", "-i", action="append", required=True, help="interface (repeatable) or 'any'"
    )
    cap.add_argument("--filter", "-f", help="BPF capture filter")
    cap.add_argument("--duration", type=float, help="stop after this many seconds")
    return ap


def _config(args: argparse.Namespace) -> AgentConfig:
    ports: dict[str, list[int]] = {}
    for proto, port in args.port:
        ports.setdefault(proto, []).append(port)
    protocols = tuple(p for p in args.protocols.split(",") if p)
    unknown = set(protocols) - set(ALL_PROTOCOLS)
    if unknown:
        raise SystemExit(f"flowprobe-agent: unknown protocol(s): {', '.join(sorted(unknown))}")
    return AgentConfig(protocols=protocols, ports={k: tuple(v) for k, v in ports.items()})


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
    config = _config(args)
    stats = Stats()
    sinks = Sinks()
    summary = Summary()
    out: BinaryIO
    out_file = open(args.output, "wb") if args.output else None  # noqa: SIM115
    out = out_file if out_file is not None else sys.stdout.buffer
    writer = JsonLinesWriter(out, connections=args.connections)
    if args.summary:
        sinks.exchange.append(summary.add)
    if not args.summary or out_file is not None:
        sinks.exchange.append(writer.exchange)
        sinks.connection.append(writer.connection)
    pipeline = Pipeline(config, sinks, stats)
    try:
        tools = Tools.find()
    except CaptureError as exc:
        print(f"flowprobe-agent: {exc}", file=sys.stderr)
        return EXIT_BAD_INPUT
    code = EXIT_OK
    try:
        if args.command == "read":
            code = _read(args.files, tools, pipeline, stats)
        else:
            code = _capture(args, tools, pipeline, stats, summary)
    finally:
        pipeline.finish()
        writer.flush()
        if args.summary:
            summary.render(sys.stdout)
        if out_file is not None:
            out_file.close()
        if stats.anomalies:
            log.info("anomalies: %s", dict(stats.anomalies))
        if args.stats:
            Path(args.stats).write_text(json.dumps(stats.as_dict(), indent=1) + "\n")
    return code


def _read(files: Sequence[str], tools: Tools, pipeline: Pipeline, stats: Stats) -> int:
    with _Progress(stats, sys.stderr.isatty()):
        for path in files:
            try:
                rows = read_file(tools, path, pipeline.tshark_options)
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
    args: argparse.Namespace, tools: Tools, pipeline: Pipeline, stats: Stats, summary: Summary
) -> int:
    try:
        live = LiveCapture(tools, args.interface, pipeline.tshark_options, bpf=args.filter)
    except CaptureError as exc:
        print(f"flowprobe-agent: {exc}", file=sys.stderr)
        return EXIT_BAD_INPUT
    stop = threading.Event()

    def _interrupt(_sig: int, _frame: object) -> None:
        # Stop dumpcap; tshark then drains its pipe and the loop ends cleanly.
        stop.set()
        threading.Thread(target=live.stop, daemon=True).start()

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
    err = live.dumpcap_error() or live.rows.error
    if err and not stop.is_set():
        print(f"flowprobe-agent: {err}", file=sys.stderr)
        return EXIT_BAD_INPUT
    with contextlib.suppress(Exception):
        sys.stdout.flush()
    return EXIT_OK


def main() -> None:
    sys.exit(run())
