"""Command-line flags of the security stage, and the stage built from the agent configuration."""

from __future__ import annotations

import argparse
import re
from collections.abc import Callable

from flowprobe.agent.config import AgentConfig, DdrConfig, SecurityConfig, WafConfig
from flowprobe.agent.export.metrics import Metrics
from flowprobe.agent.export.naming import RouteTable
from flowprobe.agent.export.telemetry import Telemetry
from flowprobe.agent.export.workloads import AddressResolver, WorkloadResolver
from flowprobe.agent.security import ddr
from flowprobe.agent.security.alerts import open_alerts
from flowprobe.agent.security.ddr import CATEGORIES
from flowprobe.agent.security.modsec import ModSecurity
from flowprobe.agent.security.stage import SecurityStage
from flowprobe.agent.sessionize.records import Exchange
from flowprobe.api.v1alpha1 import (
    SecuritySpec,
    SensitiveDataCategory,
    SensitiveDataMode,
    WafMode,
)

_RULE = re.compile(r"^[0-9]{1,9}(-[0-9]{1,9})?$")


def _rule(text: str) -> str:
    if not _RULE.match(text):
        raise argparse.ArgumentTypeError(
            f"expected a rule id or range (942100-942199), got {text!r}"
        )
    return text


def add_arguments(parser: argparse.ArgumentParser) -> None:
    sec = parser.add_argument_group(
        "security",
        "WAF detection (ModSecurity + OWASP CRS, detection only) and sensitive-data detection "
        "on the captured traffic; both off by default (docs/security.md).",
    )
    waf_defaults = WafConfig()
    sec.add_argument("--waf", action="store_true", help="run the CRS over HTTP/1 exchanges")
    sec.add_argument(
        "--waf-paranoia-level", type=int, choices=(1, 2, 3, 4), default=waf_defaults.paranoia_level
    )
    for way, rule in (("inbound", 949110), ("outbound", 959100)):
        sec.add_argument(
            f"--waf-{way}-threshold",
            type=int,
            default=getattr(waf_defaults, f"{way}_anomaly_threshold"),
            metavar="SCORE",
            help=f"CRS {way} anomaly score threshold (rule {rule})",
        )
    sec.add_argument(
        "--waf-exclude-rule",
        action="append",
        type=_rule,
        metavar="ID[-ID]",
        help=f"remove a CRS rule or range (repeatable; default {','.join(waf_defaults.excluded_rules)})",
    )
    sec.add_argument(
        "--waf-exclude-tag", action="append", default=[], metavar="TAG", help="remove rules by tag"
    )
    sec.add_argument("--ddr", action="store_true", help="detect sensitive data (masked)")
    sec.add_argument(
        "--ddr-category",
        action="append",
        choices=CATEGORIES,
        default=[],
        help="only these categories (repeatable; default all)",
    )
    sec.add_argument(
        "--security-body-max-bytes",
        type=int,
        default=SecurityConfig().body_max_bytes,
        metavar="N",
        help="inspect at most this much of each body",
    )


def from_args(args: argparse.Namespace) -> SecurityConfig:
    waf_kwargs: dict[str, object] = {}
    if args.waf_exclude_rule is not None:
        waf_kwargs["excluded_rules"] = tuple(args.waf_exclude_rule)
    return SecurityConfig(
        waf=WafConfig(
            enabled=args.waf,
            paranoia_level=args.waf_paranoia_level,
            inbound_anomaly_threshold=args.waf_inbound_threshold,
            outbound_anomaly_threshold=args.waf_outbound_threshold,
            excluded_tags=tuple(args.waf_exclude_tag),
            **waf_kwargs,
        ),
        ddr=DdrConfig(enabled=args.ddr, categories=tuple(args.ddr_category)),
        body_max_bytes=args.security_body_max_bytes,
    )


# The policy's CamelCase enum values -> the detectors' category names.
_CATEGORIES = {
    SensitiveDataCategory.CARD_NUMBER: ddr.CARD,
    SensitiveDataCategory.IBAN: ddr.IBAN,
    SensitiveDataCategory.EMAIL: ddr.EMAIL,
    SensitiveDataCategory.PHONE: ddr.PHONE,
    SensitiveDataCategory.NATIONAL_ID: ddr.NATIONAL_ID,
    SensitiveDataCategory.JWT: ddr.JWT,
    SensitiveDataCategory.API_KEY: ddr.API_KEY,
    SensitiveDataCategory.PRIVATE_KEY: ddr.PRIVATE_KEY,
    SensitiveDataCategory.PASSWORD: ddr.PASSWORD,
}


def from_policy(spec: SecuritySpec) -> SecurityConfig:
    """A ProbePolicy's ``spec.security`` (as compiled for the agents) as agent settings."""
    waf = spec.waf
    return SecurityConfig(
        waf=WafConfig(
            enabled=waf.mode == WafMode.DETECTION_ONLY,
            paranoia_level=waf.paranoia_level,
            inbound_anomaly_threshold=waf.inbound_anomaly_threshold,
            outbound_anomaly_threshold=waf.outbound_anomaly_threshold,
            excluded_rules=tuple(waf.excluded_rules),
            excluded_tags=tuple(waf.excluded_tags),
        ),
        ddr=DdrConfig(
            enabled=spec.sensitive_data.mode == SensitiveDataMode.DETECT,
            categories=tuple(_CATEGORIES[c] for c in spec.sensitive_data.categories),
        ),
        body_max_bytes=spec.body_max_bytes,
    )


def build_stage(
    config: AgentConfig, downstream: Callable[[Exchange], None], telemetry: Telemetry | None
) -> SecurityStage:
    """The stage, with OTLP alerts when OTLP is configured (raises WafError, OtlpConfigError)."""
    sec = config.security
    export = config.export
    waf = ModSecurity.with_crs(sec.waf, sec.body_max_bytes) if sec.waf.enabled else None
    return SecurityStage(
        sec,
        downstream,
        resolver(config, telemetry),
        RouteTable(export.routes),
        metrics(telemetry),
        open_alerts(export, telemetry),
        waf,
    ).start()


def metrics(telemetry: Telemetry | None) -> Metrics | None:
    """The agent's metrics, when they are exported."""
    if telemetry is not None and telemetry.metric_exporter is not None:
        return telemetry.metrics
    return None


def resolver(config: AgentConfig, telemetry: Telemetry | None) -> WorkloadResolver:
    """Who is at each end: the sink's resolver, or names from the configuration."""
    if telemetry is not None:
        return telemetry.resolver
    return AddressResolver(config.export.service_names)
