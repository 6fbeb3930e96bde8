"""Command-line flags of the analyzer, its settings from a ProbePolicy, and its wiring."""

from __future__ import annotations

import argparse

from flowprobe.agent.analyze.stage import SCOPE, Analyzer, Freeze
from flowprobe.agent.config import AnomalyConfig
from flowprobe.agent.export.telemetry import Telemetry
from flowprobe.agent.security.alerts import open_alerts
from flowprobe.agent.security.options import metrics
from flowprobe.api.v1alpha1 import AnomaliesSpec, AnomalyMode

# flag -> (AnomalyConfig field, metavar, help)
_FLAGS = {
    "--top-n": ("top_n", "N", "members per metric and dimension (0: no top-N)"),
    "--top-n-window": ("top_n_window_seconds", "SECONDS", "sliding window of the top-N"),
    "--anomaly-interval": ("interval_seconds", "SECONDS", "baseline interval"),
    "--anomaly-span": ("span_intervals", "INTERVALS", "EWMA span of the baselines"),
    "--anomaly-warmup": ("warmup_intervals", "INTERVALS", "no alert before this many"),
    "--anomaly-min-exchanges": (
        "min_exchanges",
        "N",
        "judge error ratio and latency only on intervals with this many exchanges",
    ),
    "--anomaly-error-increase": (
        "error_ratio_increase_percent",
        "POINTS",
        "alert when the error ratio exceeds its baseline by this many percentage points",
    ),
    "--anomaly-latency-increase": (
        "latency_increase_percent",
        "PERCENT",
        "alert when p95 latency exceeds its baseline by this percentage ...",
    ),
    "--anomaly-latency-min-increase": (
        "latency_min_increase_ms",
        "MS",
        "... and by at least this many milliseconds",
    ),
    "--anomaly-rate-change": (
        "rate_change_percent",
        "PERCENT",
        "alert when the rate rises above baseline*(1+P/100) or drops below "
        "baseline/(1+P/100); 0: rate not judged",
    ),
    "--anomaly-quiet": (
        "quiet_intervals",
        "INTERVALS",
        "an alert's storm ends after this many intervals back within the baseline",
    ),
}


def add_arguments(parser: argparse.ArgumentParser) -> None:
    group = parser.add_argument_group(
        "anomalies",
        "Top-N talkers as OTLP gauges and per-edge baselines with alerts (OTLP log records "
        "and span events); off by default, needs OTLP or --console-spans (docs/anomalies.md).",
    )
    group.add_argument("--anomalies", action="store_true", help="turn the analysis on")
    defaults = AnomalyConfig()
    for flag, (name, metavar, text) in _FLAGS.items():
        group.add_argument(
            flag,
            type=int,
            default=getattr(defaults, name),
            metavar=metavar,
            help=f"{text} (default %(default)s)",
        )


def from_args(args: argparse.Namespace) -> AnomalyConfig:
    values = {
        name: getattr(args, flag[2:].replace("-", "_")) for flag, (name, _, _) in _FLAGS.items()
    }
    return AnomalyConfig(enabled=args.anomalies, **values)


def from_policy(spec: AnomaliesSpec) -> AnomalyConfig:
    """A ProbePolicy's ``spec.anomalies`` (as compiled for the agents) as agent settings."""
    b, t = spec.baseline, spec.thresholds
    return AnomalyConfig(
        enabled=spec.mode == AnomalyMode.DETECT,
        top_n=spec.top_n.size,
        top_n_window_seconds=spec.top_n.window_seconds,
        interval_seconds=b.interval_seconds,
        span_intervals=b.span_intervals,
        warmup_intervals=b.warmup_intervals,
        min_exchanges=b.min_exchanges,
        error_ratio_increase_percent=t.error_ratio_increase_percent,
        latency_increase_percent=t.latency_increase_percent,
        latency_min_increase_ms=t.latency_min_increase_milliseconds,
        rate_change_percent=t.rate_change_percent,
        quiet_intervals=spec.quiet_intervals,
    )


def attach(
    config: AnomalyConfig, telemetry: Telemetry, live: bool, freeze: Freeze | None = None
) -> Analyzer:
    """An analyzer on ``telemetry``, alerting to its OTLP logs endpoint if it has one
    (raises OtlpConfigError)."""
    alerts = open_alerts(telemetry.config, telemetry, SCOPE)
    return Analyzer(config, alerts, metrics(telemetry), live, freeze).attach(telemetry)
