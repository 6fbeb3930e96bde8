"""The daemon's analyzers: one per export target that an active policy turns anomalies on for.

Exchanges reach the analyzer through the OTLP sink (Telemetry) of their
export target, so settings are per target: when several active policies
export to the same endpoint, the first by name with ``spec.anomalies.mode:
Detect`` sets them for the traffic of all of them. An analyzer (and its
baselines) is kept across policy changes that leave its settings and its
sink as they were. With forensics on the node, the policy that sets an
analyzer's settings also decides whether its alerts freeze pcaps (its
``spec.forensics.triggers`` has AnomalyAlert).
"""

from __future__ import annotations

import functools
import logging
from collections.abc import Callable, Mapping
from dataclasses import dataclass

from flowprobe.agent.analyze.options import attach, from_policy
from flowprobe.agent.analyze.stage import Analyzer
from flowprobe.agent.config import AnomalyConfig
from flowprobe.agent.export import otlp
from flowprobe.agent.export.telemetry import Telemetry
from flowprobe.agent.parse.messages import AttrValue
from flowprobe.agent.sessionize.records import Endpoints
from flowprobe.api.policyset import CompiledPolicy

log = logging.getLogger("flowprobe.agent.daemon")

# forensics/node.py's NodeForensics.freeze_anomaly: the policy, then stage.Freeze's arguments.
PolicyFreeze = Callable[[str, Endpoints, int, int], Mapping[str, AttrValue]]


@dataclass(frozen=True)
class _Entry:
    config: AnomalyConfig
    telemetry: Telemetry
    analyzer: Analyzer


class PolicyAnalyzers:
    def __init__(self, freeze: PolicyFreeze | None = None) -> None:
        self.freeze = freeze
        self._by_target: dict[str, _Entry] = {}

    def sync(
        self,
        active: list[CompiledPolicy],
        sinks: Mapping[str, Telemetry],
        target_of: Callable[[CompiledPolicy], str],
    ) -> None:
        """Analyzers for the policies now active, on the sinks now open (main thread)."""
        wanted: dict[str, AnomalyConfig] = {}
        owners: dict[str, str] = {}
        for p in sorted(active, key=lambda p: p.name):
            target = target_of(p)
            if p.anomalies is not None and target in sinks and target not in wanted:
                config = from_policy(p.anomalies)
                if config.enabled:
                    wanted[target] = config
                    owners[target] = p.name
        for target, entry in list(self._by_target.items()):
            if wanted.get(target) != entry.config or sinks.get(target) is not entry.telemetry:
                entry.analyzer.detach(entry.telemetry)
                entry.analyzer.close()
                del self._by_target[target]
        for target, config in wanted.items():
            freeze = (
                functools.partial(self.freeze, owners[target]) if self.freeze is not None else None
            )
            kept = self._by_target.get(target)
            if kept is not None:
                # Same settings, perhaps from another policy now: its triggers apply.
                kept.analyzer.freeze = freeze
                continue
            telemetry = sinks[target]
            try:
                analyzer = attach(config, telemetry, live=True, freeze=freeze)
            except (otlp.OtlpConfigError, ValueError) as exc:
                log.warning("anomalies for %s: %s", telemetry.config.otlp.endpoint, exc)
                continue
            self._by_target[target] = _Entry(config, telemetry, analyzer)

    def close(self) -> None:
        for entry in self._by_target.values():
            entry.analyzer.close()
        self._by_target = {}
