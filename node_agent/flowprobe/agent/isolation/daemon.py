"""Micro-isolation in the agent's Kubernetes mode: the active policies' ``isolation`` rules.

Each policy's rules apply to the exchanges that policy selects, and are
named ``policy/rule``. Decisions are reported (log records, metrics) through
the export target of the first policy, by name, that has rules: one agent
has one nftables table whatever the number of policies. The API server is
protected by the address the agent talks to and by the in-cluster Service
address (``KUBERNETES_SERVICE_HOST``); the node's addresses are read again
whenever the rules change.
"""

from __future__ import annotations

import ipaddress
import logging
import os
import socket
import threading
from collections.abc import Callable, Sequence
from urllib.parse import urlsplit

from flowprobe.agent.enrich.index import ClusterIndex
from flowprobe.agent.enrich.resolver import KubernetesResolver
from flowprobe.agent.export.otlp import OtlpConfigError
from flowprobe.agent.export.telemetry import Telemetry
from flowprobe.agent.isolation.engine import IsolationEngine
from flowprobe.agent.isolation.nft import host_addresses
from flowprobe.agent.security.alerts import open_alerts
from flowprobe.agent.security.options import metrics
from flowprobe.agent.sessionize.records import Exchange
from flowprobe.api.policyset import CompiledPolicy
from flowprobe.api.v1alpha1 import IsolationSpec

log = logging.getLogger("flowprobe.agent.daemon")


def api_server_addresses(url: str, service_host: str | None) -> list[str]:
    """The API server's addresses: the URL's host (resolved if a name) and the Service's."""
    out = [service_host] if service_host else []
    host = urlsplit(url).hostname
    if not host:
        return out
    try:
        out.append(str(ipaddress.ip_address(host)))
    except ValueError:
        try:
            out += sorted({str(info[4][0]) for info in socket.getaddrinfo(host, None)})
        except OSError as exc:
            log.warning("isolation: cannot resolve the API server %s to protect it: %s", host, exc)
    return out


class DaemonIsolation:
    def __init__(self, index: ClusterIndex, api_url: str) -> None:
        self.engine = IsolationEngine(
            KubernetesResolver(index),
            protected=api_server_addresses(api_url, os.environ.get("KUBERNETES_SERVICE_HOST")),
        )
        # None until the first sync, which also removes a table a crashed agent left.
        self._specs: list[tuple[str, IsolationSpec]] | None = None
        # Read by the capture thread without a lock; replaced whole.
        self._scopes: frozenset[str] = frozenset()
        self._reporter: Telemetry | None = None

    def submit(self, ex: Exchange, policies: Sequence[CompiledPolicy]) -> None:
        scopes = self._scopes
        if scopes:
            self.engine.submit(ex, [p.name for p in policies if p.name in scopes])

    def sync(
        self,
        active: Sequence[CompiledPolicy],
        telemetry_of: Callable[[CompiledPolicy], Telemetry | None],
    ) -> None:
        """Apply the active policies' rules (a change lifts every block)."""
        with_rules = sorted((p for p in active if p.isolation is not None), key=lambda p: p.name)
        specs = [(p.name, p.isolation) for p in with_rules if p.isolation is not None]
        reporter = telemetry_of(with_rules[0]) if with_rules else None
        if reporter is not self._reporter:
            self._reporter = reporter
            old = self.engine.alerts
            try:
                self.engine.alerts = (
                    open_alerts(reporter.config, reporter) if reporter is not None else None
                )
            except OtlpConfigError as exc:
                log.warning("isolation: no log records: %s", exc)
                self.engine.alerts = None
            self.engine.metrics = metrics(reporter)
            if old is not None:
                threading.Thread(target=old.close, daemon=True).start()
        if specs == self._specs:
            return
        self._specs = specs
        self.engine.configure(specs, host_addresses())
        self._scopes = frozenset(name for name, _ in specs)
        if specs and not self.engine.started:
            self.engine.start()

    def close(self) -> None:
        self._scopes = frozenset()
        self.engine.close()
