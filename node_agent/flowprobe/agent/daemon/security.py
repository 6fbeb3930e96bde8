"""Per-policy security settings in the daemon: one security stage per distinct setting.

A policy's ``spec.security`` (compiled into the policy set) says whether its
exchanges go through the WAF and the sensitive-data scan, and with which
paranoia level, thresholds, exclusions and categories. Policies that turn
security on with the same settings and the same export share one
:class:`SecurityStage` (its own thread, CRS instance, alerts to that
export's ``/v1/logs``, metrics and workload names of that export's
telemetry); others get their own.

An exchange selected by several policies is inspected once, with the stage of
the first of them (in the policy engine's order, the one that annotates it)
that turns security on, then goes to every export its policies name; one
selected only by policies with security off is not inspected. The capture
keeps payload for inspection only while some active policy needs it (WAF:
HTTP headers and bodies; DDR: also SQL and Redis values), so with security
off everywhere the tshark columns are exactly the usual ones; exchanges that
are not inspected lose any payload before export.
"""

from __future__ import annotations

import logging
import threading
from collections import Counter
from collections.abc import Callable, Mapping, Sequence

from flowprobe.agent.config import AgentConfig, DdrConfig, SecurityConfig, WafConfig
from flowprobe.agent.export.telemetry import Telemetry
from flowprobe.agent.security import options
from flowprobe.agent.security.payload import strip
from flowprobe.agent.security.stage import SecurityStage
from flowprobe.agent.sessionize.records import Exchange
from flowprobe.api.policyset import CompiledPolicy

log = logging.getLogger("flowprobe.agent.daemon")

Export = Callable[[Exchange], None]


def _stage_key(export_key: str, config: SecurityConfig) -> str:
    return export_key + "\n" + config.model_dump_json()


class PolicySecurity:
    """The stages of the active policies; ``submit`` runs on the capture thread."""

    def __init__(self) -> None:
        # Replaced, never mutated: the capture thread reads them without a lock.
        self.stages: dict[str, SecurityStage] = {}
        self.by_policy: dict[str, SecurityStage] = {}
        self._failed: set[str] = set()

    def sync(
        self,
        active: Sequence[CompiledPolicy],
        telemetry: Mapping[str, Telemetry],
        export_key: Callable[[CompiledPolicy], str],
    ) -> AgentConfig:
        """Stages for ``active`` (kept, started or closed); the capture's base configuration."""
        wanted: dict[str, tuple[CompiledPolicy, SecurityConfig, Telemetry]] = {}
        keys: dict[str, str] = {}
        for p in active:
            config = options.from_policy(p.security) if p.security is not None else None
            sink = telemetry.get(export_key(p))
            if config is None or not config.enabled or sink is None:
                continue
            key = _stage_key(export_key(p), config)
            wanted.setdefault(key, (p, config, sink))
            keys[p.uid] = key
        current = dict(self.stages)
        for key in [k for k in current if k not in wanted]:
            threading.Thread(target=current.pop(key).close, daemon=True).start()
        for key, (p, config, sink) in wanted.items():
            if key in current:
                continue
            agent = AgentConfig(export=sink.config, security=config)
            try:
                current[key] = options.build_stage(agent, sink.submit, sink)
            except Exception as exc:  # WafError, OtlpConfigError, a bad rule exclusion
                if key not in self._failed:
                    log.warning("security of policy %s: %s (not inspected)", p.name, exc)
                self._failed.add(key)
        self._failed &= wanted.keys()
        configs = [wanted[k][1] for k in current]
        self.by_policy = {uid: current[k] for uid, k in keys.items() if k in current}
        self.stages = current
        return AgentConfig(
            security=SecurityConfig(
                waf=WafConfig(enabled=any(c.waf.enabled for c in configs)),
                ddr=DdrConfig(enabled=any(c.ddr.enabled for c in configs)),
            )
        )

    def submit(self, ex: Exchange, policies: Sequence[CompiledPolicy], export: Export) -> None:
        by_policy = self.by_policy
        for p in policies:
            stage = by_policy.get(p.uid)
            if stage is not None:
                stage.submit(ex, export)
                return
        # A capture that keeps payload may outlive the policy that wanted it
        # (make-before-break): nothing uninspected leaves with payload.
        strip(ex.attrs)
        export(ex)

    def totals(self) -> dict[str, int]:
        """What the stages did, summed: inspected, skipped, dropped, error, seen_full."""
        out: Counter[str] = Counter()
        for stage in self.stages.values():
            out.update(stage.totals())
        return dict(out)

    def close(self) -> None:
        for stage in self.stages.values():
            stage.close()
        self.stages = {}
        self.by_policy = {}
