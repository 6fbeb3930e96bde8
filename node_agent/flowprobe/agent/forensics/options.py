"""Command-line flags of forensics, and ``flowprobe-agent pcap list|get``."""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path
from typing import get_args

from flowprobe.agent.config import ForensicsConfig, ForensicsTrigger
from flowprobe.agent.forensics.endpoint import FetchError, fetch, fetch_list

TRIGGERS: tuple[str, ...] = get_args(ForensicsTrigger)
DEFAULT_URL = "http://127.0.0.1:9477"


def _triggers(text: str) -> tuple[str, ...]:
    found = tuple(t for t in text.split(",") if t)
    unknown = set(found) - set(TRIGGERS)
    if unknown or not found:
        raise argparse.ArgumentTypeError(
            f"expected a comma-separated list of {', '.join(TRIGGERS)}, got {text!r}"
        )
    return found


def add_arguments(parser: argparse.ArgumentParser) -> None:
    d = ForensicsConfig()
    g = parser.add_argument_group(
        "forensics",
        "A dumpcap ring of the capture, cut into a pcap of the connection when an exchange "
        "fails or raises a security alert, or an anomaly alert fires (with --anomalies); "
        "served on --pcap-port to bearer-token holders (docs/forensics.md). Off by default.",
    )
    g.add_argument("--forensics", action="store_true", help="keep the ring and freeze pcaps")
    g.add_argument(
        "--forensics-dir",
        default=d.directory,
        metavar="DIR",
        help="ring and pcaps (default %(default)s)",
    )
    g.add_argument(
        "--ring-files",
        type=int,
        default=d.ring_files,
        metavar="N",
        help="files in the ring (default %(default)s)",
    )
    g.add_argument(
        "--ring-file-mb",
        type=int,
        default=d.ring_file_mb,
        metavar="MB",
        help="size of each (default %(default)s)",
    )
    g.add_argument(
        "--ring-file-seconds",
        type=int,
        default=d.ring_file_seconds,
        metavar="S",
        help="a ring file is closed after this long (default %(default)s)",
    )
    g.add_argument(
        "--pcap-seconds-before",
        type=int,
        default=d.seconds_before,
        metavar="S",
        help="packets kept before the exchange began (default %(default)s)",
    )
    g.add_argument(
        "--pcap-seconds-after",
        type=int,
        default=d.seconds_after,
        metavar="S",
        help="and after it ended (default %(default)s)",
    )
    g.add_argument(
        "--pcap-max-mb",
        type=int,
        default=d.max_frozen_mb,
        metavar="MB",
        help="frozen pcaps in total; the oldest go (default %(default)s)",
    )
    g.add_argument("--pcap-max-files", type=int, default=d.max_frozen_files, metavar="N")
    g.add_argument("--pcap-max-per-minute", type=int, default=d.max_per_minute, metavar="N")
    g.add_argument(
        "--pcap-triggers",
        type=_triggers,
        default=d.triggers,
        metavar="LIST",
        help=f"any of {','.join(TRIGGERS)} (default all)",
    )
    g.add_argument(
        "--pcap-token-file",
        metavar="FILE",
        help="bearer token the pcap endpoint requires (without one it refuses everyone)",
    )
    g.add_argument("--pcap-port", type=int, metavar="PORT", help="serve /pcaps here")
    g.add_argument(
        "--pcap-address", default="0.0.0.0", help="address for --pcap-port (default all)"
    )


def from_args(args: argparse.Namespace) -> ForensicsConfig:
    return ForensicsConfig(
        enabled=args.forensics,
        directory=args.forensics_dir,
        ring_files=args.ring_files,
        ring_file_mb=args.ring_file_mb,
        ring_file_seconds=args.ring_file_seconds,
        seconds_before=args.pcap_seconds_before,
        seconds_after=args.pcap_seconds_after,
        max_frozen_mb=args.pcap_max_mb,
        max_frozen_files=args.pcap_max_files,
        max_per_minute=args.pcap_max_per_minute,
        triggers=args.pcap_triggers,
        token_file=args.pcap_token_file,
    )


def add_pcap_command(sub: argparse._SubParsersAction[argparse.ArgumentParser]) -> None:
    pcap = sub.add_parser("pcap", help="list or fetch an agent's frozen pcaps (docs/forensics.md)")
    pcap.add_argument(
        "--url",
        default=DEFAULT_URL,
        help="the agent's endpoint: the daemon's health port or capture's --pcap-port (default %(default)s)",
    )
    pcap.add_argument("--token-file", required=True, metavar="FILE", help="the bearer token")
    pcap.add_argument("--verbose", "-v", action="store_true")
    verbs = pcap.add_subparsers(dest="verb", required=True)
    verbs.add_parser("list", help="name, size and time of each pcap (JSON lines)")
    get = verbs.add_parser("get", help="download one pcap")
    get.add_argument("name")
    get.add_argument(
        "--output",
        "-o",
        metavar="FILE",
        help="default: NAME in the current directory; '-' for stdout",
    )


def run_pcap(args: argparse.Namespace) -> int:
    try:
        token = Path(args.token_file).read_text().strip()
    except OSError as exc:
        print(f"flowprobe-agent pcap: {exc}", file=sys.stderr)
        return 2
    try:
        if args.verb == "list":
            for entry in fetch_list(args.url, token):
                print(json.dumps(entry))
            return 0
        target = args.output or Path(args.name).name
        if target == "-":
            fetch(args.url, token, args.name, sys.stdout.buffer)
        else:
            _save(args.url, token, args.name, Path(target))
    except FetchError as exc:
        print(f"flowprobe-agent pcap: {exc}", file=sys.stderr)
        return 1
    return 0


def _save(url: str, token: str, name: str, target: Path) -> None:
    """Download to ``target`` through a temporary file, so a failure leaves nothing half-written."""
    tmp = target.with_name(target.name + ".part")
    try:
        with tmp.open("wb") as out:
            fetch(url, token, name, out)
    except BaseException:
        tmp.unlink(missing_ok=True)
        raise
    tmp.replace(target)
