"""Command-line flags of micro-isolation, and the engine built from the agent configuration."""

from __future__ import annotations

import argparse
import ipaddress
import json
import logging
import os
from pathlib import Path

from flowprobe.agent.config import AgentConfig, IsolationConfig
from flowprobe.agent.export.telemetry import Telemetry
from flowprobe.agent.isolation.engine import IsolationEngine
from flowprobe.agent.isolation.nft import host_addresses
from flowprobe.agent.security.alerts import open_alerts
from flowprobe.agent.security.options import metrics, resolver
from flowprobe.api.v1alpha1 import IsolationSpec

log = logging.getLogger("flowprobe.agent")


def _address(text: str) -> str:
    try:
        ipaddress.ip_network(text, strict=False)
    except ValueError as exc:
        raise argparse.ArgumentTypeError(str(exc)) from None
    return text


def add_arguments(parser: argparse.ArgumentParser) -> None:
    iso = parser.add_argument_group(
        "isolation",
        "Block sources that break rules, through nftables in this network namespace "
        "(table inet flowprobe); off by default, dry run unless the rules say Enforce "
        "(docs/isolation.md).",
    )
    iso.add_argument(
        "--isolation-rules",
        metavar="FILE",
        help="JSON file with a ProbePolicy's spec.isolation (mode, blockSeconds, rules); "
        "re-read while running, emptied or removed turns isolation off",
    )
    iso.add_argument(
        "--isolation-protect",
        action="append",
        type=_address,
        default=[],
        metavar="ADDR[/LEN]",
        help="never block this address or network (repeatable), on top of the node's own "
        "addresses and $KUBERNETES_SERVICE_HOST",
    )


def from_args(args: argparse.Namespace) -> IsolationConfig:
    return IsolationConfig(file=args.isolation_rules, protected=tuple(args.isolation_protect))


def parse_rules(text: str, origin: str) -> IsolationSpec | None:
    """The rules in ``text``; None when it is empty (raises ValueError when it is bad)."""
    if not text.strip():
        return None
    try:
        return IsolationSpec.model_validate(json.loads(text))
    except ValueError as exc:  # json's and pydantic's errors are both ValueErrors
        raise ValueError(f"{origin}: {' '.join(str(exc).split())}") from None


def _read(path: Path) -> str:
    """The file's text; a missing file reads as empty (isolation off)."""
    try:
        return path.read_text()
    except FileNotFoundError:
        return ""


def _scoped(spec: IsolationSpec | None) -> list[tuple[str, IsolationSpec]]:
    # Standalone there is one set of rules, named as written.
    return [("", spec)] if spec is not None else []


def build_engine(
    config: AgentConfig, telemetry: Telemetry | None, enforce: bool
) -> IsolationEngine:
    """The engine, following ``config.isolation.file`` (raises ValueError, OSError,
    OtlpConfigError); ``enforce`` False runs every rule as DryRun."""
    iso = config.isolation
    assert iso.file is not None
    path = Path(iso.file)
    protected = list(iso.protected)
    api_server = os.environ.get("KUBERNETES_SERVICE_HOST")
    if api_server:
        protected.append(api_server)
    # Bad rules at start-up are the user's mistake, refused at once.
    last = _read(path)
    spec = parse_rules(last, iso.file)
    engine = IsolationEngine(
        resolver(config, telemetry),
        metrics=metrics(telemetry),
        alerts=open_alerts(config.export, telemetry),
        protected=protected,
        enforce=enforce,
    )
    engine.configure(_scoped(spec), host_addresses())

    def poll() -> None:
        nonlocal last
        try:
            text = _read(path)
            if text == last:
                return
            last = text
            rules = parse_rules(text, str(path))
        except (OSError, ValueError) as exc:
            engine.counts["rules_invalid"] += 1
            log.warning("isolation: keeping the previous rules: %s", exc)
            return
        engine.configure(_scoped(rules), host_addresses())

    engine.poll = poll
    return engine.start()
