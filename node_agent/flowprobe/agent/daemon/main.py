"""The agent's Kubernetes mode: policies in, enriched spans out, status back to the operator.

Configured only through the environment the operator's DaemonSet sets
(``flowprobe.api.constants.ENV_*``; docs/operator.md, "Agent contract"), plus
``FLOWPROBE_CAPTURE_INTERFACES`` (default ``any``) and, outside a pod,
``KUBECONFIG``. One loop ticks every ``TICK_S``: it follows the policy file
(the ConfigMap volume is updated in place; no restart), the node's labels and
the pods on the node, switches the capture when its scope changes, keeps one
OTLP sink per distinct export target, prunes the cluster index and renews
the report Lease.
"""

from __future__ import annotations

import datetime
import logging
import os
import signal
import threading
import time
from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from flowprobe.agent.analyze.policies import PolicyAnalyzers
from flowprobe.agent.capture.tshark import CaptureError, Tools
from flowprobe.agent.config import AgentConfig, ExportConfig, OtlpConfig
from flowprobe.agent.daemon.capture import CaptureSwitcher
from flowprobe.agent.daemon.report import HealthServer, LeaseReporter, TlsSightings
from flowprobe.agent.daemon.security import PolicySecurity
from flowprobe.agent.enrich.index import ClusterIndex
from flowprobe.agent.enrich.kubeapi import KubeApi, load_configuration
from flowprobe.agent.enrich.policy import NO_CAPTURE, CaptureScope, PolicyEngine
from flowprobe.agent.enrich.resolver import KubernetesResolver
from flowprobe.agent.enrich.watch import Watcher, now_us
from flowprobe.agent.export import otlp
from flowprobe.agent.export.telemetry import Telemetry
from flowprobe.agent.forensics.node import NodeForensics
from flowprobe.agent.isolation.daemon import DaemonIsolation
from flowprobe.agent.sessionize.records import Endpoints, Exchange
from flowprobe.agent.sessionize.stats import Stats
from flowprobe.api import constants
from flowprobe.api.agentreport import MAX_REPORT_NOTES, AgentNote, AgentReport
from flowprobe.api.policyset import CompiledExport, CompiledPolicy, CompiledPolicySet
from flowprobe.api.v1alpha1 import NodeNoteType, OtlpProtocol

log = logging.getLogger("flowprobe.agent.daemon")

TICK_S = 0.5
NODE_LABELS_EVERY_S = 30.0
PRUNE_EVERY_S = 5.0
# Liveness fails when the main loop has not ticked for this long.
STUCK_S = 60.0
ENV_CAPTURE_INTERFACES = "FLOWPROBE_CAPTURE_INTERFACES"
ENV_HEALTH_ADDRESS = "FLOWPROBE_HEALTH_ADDRESS"


class SettingsError(ValueError):
    pass


@dataclass(frozen=True)
class Settings:
    node: str
    namespace: str
    pod: str
    policy_file: Path
    health_address: str
    health_port: int
    report_interval_s: float
    interfaces: tuple[str, ...]
    kubeconfig: str | None

    @classmethod
    def from_env(cls, env: Mapping[str, str]) -> Settings:
        node = env.get(constants.ENV_NODE_NAME)
        if not node:
            raise SettingsError(f"{constants.ENV_NODE_NAME} is not set (the downward API sets it)")
        try:
            port = int(env.get(constants.ENV_HEALTH_PORT, "9477"))
            interval = float(env.get(constants.ENV_REPORT_INTERVAL, "15"))
        except ValueError as exc:
            raise SettingsError(str(exc)) from None
        if interval <= 0:
            raise SettingsError(f"{constants.ENV_REPORT_INTERVAL} must be positive")
        return cls(
            node=node,
            namespace=env.get(constants.ENV_POD_NAMESPACE) or "default",
            pod=env.get(constants.ENV_POD_NAME) or f"flowprobe-agent-{node}",
            policy_file=Path(env.get(constants.ENV_POLICY_FILE) or constants.POLICY_FILE),
            health_address=env.get(ENV_HEALTH_ADDRESS) or "0.0.0.0",
            health_port=port,
            report_interval_s=interval,
            interfaces=tuple(i for i in (env.get(ENV_CAPTURE_INTERFACES) or "any").split(",") if i),
            kubeconfig=env.get("KUBECONFIG") or None,
        )


def export_config(export: CompiledExport) -> ExportConfig:
    """The agent's export settings for a policy's compiled export."""
    headers: dict[str, str] = {}
    if export.headers_dir:
        # A mounted Secret: one file per header; ..data and friends are the
        # volume's own bookkeeping.
        for f in sorted(Path(export.headers_dir).iterdir()):
            if f.is_file() and not f.name.startswith("."):
                headers[f.name] = f.read_text().strip()
    return ExportConfig(
        otlp=OtlpConfig(
            endpoint=export.endpoint,
            protocol="grpc" if export.protocol == OtlpProtocol.GRPC else "http/protobuf",
            headers=headers,
            certificate=export.ca_file,
            timeout_seconds=export.timeout_seconds,
            server_name=export.server_name,
            insecure_skip_verify=export.insecure_skip_verify,
        )
    )


def active_policies(
    policy_set: CompiledPolicySet | None,
    node_labels: dict[str, str] | None,
    now: datetime.datetime,
) -> list[CompiledPolicy]:
    """The policies this node applies now (none until the node's labels are known)."""
    if policy_set is None or node_labels is None:
        return []
    return [
        p
        for p in policy_set.policies
        if p.applies_to_node(node_labels) and (p.not_after is None or now < p.not_after)
    ]


def _export_key(policy: CompiledPolicy) -> str:
    return policy.export.model_dump_json()


class Daemon:
    def __init__(self, settings: Settings, tools: Tools, api: KubeApi) -> None:
        self.settings = settings
        self.api = api
        self.stats = Stats()
        self.index = ClusterIndex()
        self.watcher = Watcher(api, self.index)
        self.engine = PolicyEngine(self.index, settings.node)
        self.tls = TlsSightings()
        self.switcher = CaptureSwitcher(
            tools,
            settings.interfaces,
            AgentConfig(),
            self.on_exchange,
            self.stats,
            tls_sink=self.on_tls,
        )
        self.reporter = LeaseReporter(
            api, settings.namespace, settings.node, settings.pod, settings.report_interval_s
        )
        self.forensics = NodeForensics(tools)
        self.health = HealthServer(
            settings.health_address,
            settings.health_port,
            self.liveness,
            self.readiness,
            self.forensics.handle,
        )
        self.stop_event = threading.Event()
        self.isolation = DaemonIsolation(self.index, api.base)
        # Replaced, never mutated: the capture thread reads it without a lock.
        self.telemetry: dict[str, Telemetry] = {}
        self.analyzers = PolicyAnalyzers(self.forensics.freeze_anomaly)
        self.security = PolicySecurity()
        self.policy_set: CompiledPolicySet | None = None
        self.policy_error: str | None = None
        self._policy_text: str | None = None
        self.node_labels: dict[str, str] | None = None
        self._active: tuple[str, ...] | None = None
        self._scope_generation = -1
        self._scope: CaptureScope = NO_CAPTURE
        self._last_tick = time.monotonic()
        self._rate: tuple[float, int, dict[str, int]] = (time.monotonic(), 0, {})
        self.exchanges_per_second = 0.0
        self.policy_rates: dict[str, float] = {}

    # -- capture thread ---------------------------------------------------

    def on_exchange(self, ex: Exchange) -> None:
        try:
            policies, server, client = self.engine.select(ex)
            if not policies:
                return
            self.engine.annotate(ex, policies[0], server, client)
        except Exception as exc:
            # A bug on one exchange must not end the capture thread.
            self.stats.anomaly("enrichment_error", repr(exc))
            return
        telemetry = self.telemetry
        keys = dict.fromkeys(_export_key(p) for p in policies)

        def export(ex: Exchange) -> None:
            # After inspection: the SecurityAlert trigger and BlockOnWafMatch rules
            # act on the WAF's findings. Forensics first: it names the pcap on the
            # exchange before anything reads it.
            try:
                self.forensics.observe(ex, policies)
                self.isolation.submit(ex, policies)
            except Exception as exc:
                # Without a security stage this runs on the capture thread: a bug
                # must cost the pcap or the block, not the capture or the span.
                self.stats.anomaly("forensics_isolation_error", repr(exc))
            for key in keys:
                sink = telemetry.get(key)
                if sink is not None:
                    sink.submit(ex)

        # Through the first selecting policy's security stage, if any.
        self.security.submit(ex, policies, export)

    def on_tls(self, endpoints: Endpoints, ts_us: int) -> None:
        try:
            policies, where = self.engine.encrypted(endpoints, ts_us)
        except Exception as exc:
            self.stats.anomaly("enrichment_error", repr(exc))
            return
        if policies:
            self.tls.add(policies, where, time.monotonic())

    # -- main loop --------------------------------------------------------

    def run(self) -> None:
        self.health.start()
        self.watcher.start()
        next_labels = next_prune = next_report = 0.0
        try:
            while not self.stop_event.is_set():
                now = time.monotonic()
                self._last_tick = now
                if now >= next_labels:
                    self._read_node_labels()
                    next_labels = now + NODE_LABELS_EVERY_S
                changed = self._read_policies()
                self._apply(changed)
                if now >= next_prune:
                    with self.index.lock:
                        self.index.prune(now_us())
                    next_prune = now + PRUNE_EVERY_S
                if now >= next_report:
                    self._update_rate(now)
                    self.reporter.report(self.report())
                    next_report = now + self.settings.report_interval_s
                self.stop_event.wait(TICK_S)
        finally:
            self.shutdown()

    def shutdown(self) -> None:
        self.switcher.stop()
        self.isolation.close()
        self.forensics.close()
        self.security.close()
        for t in self.telemetry.values():
            t.close()
        self.telemetry = {}
        self.analyzers.close()
        self.watcher.stop()
        self.health.stop()

    def _read_node_labels(self) -> None:
        try:
            node = self.api.request("GET", f"/api/v1/nodes/{self.settings.node}")
        except Exception as exc:  # API down: keep the labels we have
            log.debug("reading node labels: %s", exc)
            return
        labels = node.get("metadata", {}).get("labels") or {}
        if labels != self.node_labels:
            self.node_labels = labels
            self._active = None  # re-evaluate node selectors

    def _read_policies(self) -> bool:
        try:
            text = self.settings.policy_file.read_text()
        except OSError as exc:
            if self.policy_error is None:
                log.warning("policy file: %s", exc)
            self.policy_error = str(exc)
            return False
        if text == self._policy_text:
            return False
        self._policy_text = text
        try:
            self.policy_set = CompiledPolicySet.from_json(text)
        except ValueError as exc:
            # Keep applying the last good set; the operator validated this
            # one, so this is a version skew or a damaged file.
            self.policy_error = " ".join(str(exc).split())[:500]
            log.warning("policy file unreadable, keeping the previous set: %s", self.policy_error)
            return False
        self.policy_error = None
        log.info(
            "policy set %s: %d policies",
            self.policy_set.checksum()[:12],
            len(self.policy_set.policies),
        )
        return True

    def _apply(self, policies_changed: bool) -> None:
        active = active_policies(
            self.policy_set, self.node_labels, datetime.datetime.now(datetime.UTC)
        )
        ids = tuple(f"{p.uid}/{p.generation}" for p in active)
        if policies_changed or ids != self._active:
            self._active = ids
            self.engine.set_policies(active)
            self._sync_exports(active)
            self.analyzers.sync(active, self.telemetry, _export_key)
            self.isolation.sync(active, lambda p: self.telemetry.get(_export_key(p)))
            # A new capture when the payload the stages need changes.
            self.switcher.base = self.security.sync(active, self.telemetry, _export_key)
            self._scope_generation = -1
        gen = self.index.generation
        if gen != self._scope_generation:
            self._scope_generation = gen
            self._scope = self.engine.scope()
        # Every tick: a dead capture is noticed and, after a pause, restarted.
        self.switcher.check()
        self.switcher.switch(self._scope)
        scope = self.switcher.scope
        self.forensics.apply(
            self.engine.policies, self.settings.interfaces, scope.bpf if scope else None
        )

    def _sync_exports(self, active: list[CompiledPolicy]) -> None:
        wanted = {_export_key(p): p.export for p in active}
        current = dict(self.telemetry)
        for key in [k for k in current if k not in wanted]:
            threading.Thread(target=current.pop(key).close, daemon=True).start()
        for key, export in wanted.items():
            if key in current:
                continue
            try:
                config = export_config(export)
                spans, metrics = otlp.exporters(config)
                resolver = KubernetesResolver(
                    self.index,
                    [(a.key, a.value) for a in export.resource_attributes],
                    admit=self.engine.selects_any,
                )
                current[key] = Telemetry(
                    config, self.stats, spans, metrics, resolver=resolver
                ).start()
            except (OSError, ValueError) as exc:
                log.warning("export to %s: %s", export.endpoint, exc)
        self.telemetry = current

    # -- status -----------------------------------------------------------

    def _update_rate(self, now: float) -> None:
        t0, n0, per0 = self._rate
        n = self.engine.counters.selected
        per = dict(self.engine.counters.per_policy)
        if now > t0:
            self.exchanges_per_second = (n - n0) / (now - t0)
            active = {p.name for p in self.engine.policies}
            self.policy_rates = {
                name: round((count - per0.get(name, 0)) / (now - t0), 3)
                for name, count in per.items()
                if name in active
            }
        self._rate = (now, n, per)

    def report(self) -> AgentReport:
        notes: list[AgentNote] = []
        if self.switcher.error:
            notes.append(
                AgentNote(
                    type=NodeNoteType.CAPTURE_INTERFACE_MISSING,
                    message=self.switcher.error[:1000],
                )
            )
        notes += self.tls.notes(time.monotonic(), MAX_REPORT_NOTES - len(notes))
        checksum = self.policy_set.checksum() if self.policy_set is not None else ""
        return AgentReport(
            node=self.settings.node,
            config_checksum=checksum,
            notes=notes,
            ready=self.readiness()[0],
            interfaces=list(self.settings.interfaces) if self.switcher.alive() else [],
            exchanges_per_second=round(self.exchanges_per_second, 3),
            capture_drops=self.stats.capture_dropped,
            policy_exchanges_per_second=self.policy_rates,
        )

    def liveness(self) -> tuple[bool, dict[str, Any]]:
        since = time.monotonic() - self._last_tick
        return since < STUCK_S, {"secondsSinceLastTick": round(since, 1)}

    def readiness(self) -> tuple[bool, dict[str, Any]]:
        scope = self.switcher.scope
        capturing = self.switcher.alive()
        ready = (
            self.watcher.synced()
            and self.policy_set is not None
            and (capturing or scope is None)
            and self.switcher.error is None
        )
        c = self.engine.counters
        return ready, {
            "synced": self.watcher.synced(),
            "policies": [p.name for p in self.engine.policies],
            "policyError": self.policy_error,
            "capturing": capturing,
            "filter": scope.bpf if scope else None,
            "captureSwitches": self.switcher.switches,
            "lastCaptureStartSeconds": self.switcher.last_start_s,
            "captureError": self.switcher.error,
            "exchanges": {
                "selected": c.selected,
                "unselected": c.unselected,
                "sampledOut": c.sampled_out,
                "deferred": c.deferred,
            },
            "packets": self.stats.packets,
            "index": self.index.sizes(),
            "reports": self.reporter.reports,
            "isolation": self.isolation.engine.totals(),
            "forensics": self.forensics.totals(),
            "security": self.security.totals(),
        }


def run_daemon(env: Mapping[str, str] | None = None) -> int:
    env = os.environ if env is None else env
    try:
        settings = Settings.from_env(env)
        tools = Tools.find()
        api = KubeApi(load_configuration(settings.kubeconfig))
    except (SettingsError, CaptureError) as exc:
        print(f"flowprobe-agent daemon: {exc}")
        return 2
    except Exception as exc:  # kubeconfig problems come as several types
        print(f"flowprobe-agent daemon: Kubernetes API configuration: {exc}")
        return 2
    otlp.quiet_sdk_export_logs()
    daemon = Daemon(settings, tools, api)

    def _stop(_sig: int, _frame: object) -> None:
        daemon.stop_event.set()

    signal.signal(signal.SIGTERM, _stop)
    signal.signal(signal.SIGINT, _stop)
    log.info(
        "agent on node %s: health on %s:%d, policies from %s",
        settings.node,
        settings.health_address,
        daemon.health.port,
        settings.policy_file,
    )
    daemon.run()
    return 0
