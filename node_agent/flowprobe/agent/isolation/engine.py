"""Isolation rules on finalised exchanges, and the thread that enforces what they decide.

    capture or security thread --submit()--> rules (a few comparisons) --> [queue]
        --isolation thread--> nft (Enforce) or nothing (DryRun), log record, metric, log line

Matching is cheap and never blocks the caller; ``nft`` runs only on the
isolation thread. A decision for a (source, destination, port) already
blocked and not yet expired is dropped before it is queued, so a flood of
denied requests costs one ``nft`` call per TTL. The node's own addresses,
the API server's and ``protectedCidrs`` are never blocked (counted as
``protected``). Dry-run, the default, changes nothing on the host.
"""

from __future__ import annotations

import fnmatch
import ipaddress
import logging
import re
import threading
import time
from collections import Counter, deque
from collections.abc import Callable, Collection, Iterable, Sequence
from dataclasses import dataclass

from flowprobe.agent.export import semconv as sc
from flowprobe.agent.export.metrics import Instrument, Metrics
from flowprobe.agent.export.workloads import Workload, WorkloadResolver
from flowprobe.agent.isolation.nft import NftError, NftTable
from flowprobe.agent.parse.messages import AttrValue
from flowprobe.agent.security.alerts import Alerts
from flowprobe.agent.security.modsec import SEVERITIES
from flowprobe.agent.security.stage import WAF_MATCH
from flowprobe.agent.sessionize.records import Exchange
from flowprobe.api.v1alpha1 import (
    IsolationMode,
    IsolationPeer,
    IsolationRule,
    IsolationRuleType,
    IsolationSpec,
    WafSeverity,
)

log = logging.getLogger("flowprobe.agent")

ISOLATION_EVENT = "flowprobe.isolation.block"
ISOLATION_ACTIONS = Instrument(
    "flowprobe.isolation.actions",
    "{action}",
    "Isolation decisions by rule and action: blocked, would_block (dry run), protected, failed.",
)
# Edges remembered by DenyNewEdge rules (beyond this, new edges are not
# remembered, counted as edges_full, and so not allowed later either), and
# blocks remembered to drop repeated decisions (expired ones are forgotten).
MAX_EDGES = 100_000
_POLL_S = 0.1
POLL_RULES_S = 0.5
NAMESPACE = "k8s.namespace.name"


@dataclass(frozen=True, slots=True)
class Decision:
    rule: str
    source: str
    destination: str
    port: int
    seconds: int
    at_us: int
    reason: str
    client: Workload | None
    server: Workload | None


def _networks(cidrs: Iterable[str]) -> list[ipaddress.IPv4Network | ipaddress.IPv6Network]:
    # A bare address is its /32 (/128).
    return [ipaddress.ip_network(c, strict=False) for c in cidrs]


class _Peer:
    def __init__(self, peer: IsolationPeer) -> None:
        self.workloads = frozenset(peer.workloads)
        self.namespaces = frozenset(peer.namespaces)
        self.networks = _networks(peer.cidrs)
        self.ports = frozenset(peer.ports)

    def matches(self, end: _End, port: int | None = None) -> bool:
        # Cheapest first: most exchanges fail on the port or the address.
        if self.ports and port not in self.ports:
            return False
        if self.networks:
            ip = end.ip
            if not any(ip in net for net in self.networks):
                return False
        if self.workloads or self.namespaces:
            wl = end.workload
            if self.workloads and (wl is None or wl.name not in self.workloads):
                return False
            if self.namespaces:
                ns = dict(wl.attributes).get(NAMESPACE) if wl is not None else None
                if ns not in self.namespaces:
                    return False
        return True


class _End:
    """One end of an exchange; its parsed address and workload are looked up once, if needed."""

    __slots__ = ("_ip", "_looked_up", "_resolve", "_workload", "address")

    def __init__(self, address: str, resolve: Callable[[], Workload | None]) -> None:
        self.address = address
        self._resolve = resolve
        self._ip: ipaddress.IPv4Address | ipaddress.IPv6Address | None = None
        self._workload: Workload | None = None
        self._looked_up = False

    @property
    def ip(self) -> ipaddress.IPv4Address | ipaddress.IPv6Address:
        if self._ip is None:
            self._ip = ipaddress.ip_address(self.address)
        return self._ip

    @property
    def workload(self) -> Workload | None:
        if not self._looked_up:
            self._workload = self._resolve()
            self._looked_up = True
        return self._workload


def _path_regex(patterns: list[str]) -> re.Pattern[str] | None:
    """Glob patterns (``*`` crosses ``/``) as one regular expression."""
    if not patterns:
        return None
    return re.compile("|".join(f"(?:{fnmatch.translate(p)})" for p in patterns))


class _Rule:
    def __init__(
        self, scope: str, spec: IsolationSpec, rule: IsolationRule, started_us: int
    ) -> None:
        # Rules of several policies share the engine: "policy/rule" names them.
        self.scope = scope
        self.name = f"{scope}/{rule.name}" if scope else rule.name
        self.mode = spec.mode
        self.type = rule.type
        self.source = _Peer(rule.source)
        self.to = _Peer(rule.to)
        self.methods = frozenset(str(m) for m in rule.methods)
        self.paths = _path_regex(rule.paths)
        self.seconds = rule.block_seconds or spec.block_seconds
        self.learn_until_us = started_us + (rule.learning_seconds or 0) * 1_000_000
        self.min_rank = SEVERITIES.index((rule.min_severity or WafSeverity.CRITICAL).upper())
        self.edges: set[tuple[str, str]] = set()


class IsolationEngine:
    def __init__(
        self,
        resolver: WorkloadResolver,
        table: NftTable | None = None,
        metrics: Metrics | None = None,
        alerts: Alerts | None = None,
        protected: Iterable[str] = (),
        poll: Callable[[], None] | None = None,
        enforce: bool = True,
    ) -> None:
        self.resolver = resolver
        self.table = table or NftTable()
        self.metrics = metrics
        self.alerts = alerts
        self.counts: Counter[str] = Counter()
        # Called on the isolation thread every POLL_RULES_S (the CLI re-reads its file).
        self.poll = poll
        # False: every rule runs as DryRun and the host's nftables are never
        # touched (replaying a capture file must not block live traffic).
        self.enforce = enforce
        self._static_protected = _networks(protected)
        self._protected = list(self._static_protected)
        # Replaced whole by configure(): submit() reads it without a lock.
        self._rules: list[_Rule] = []
        self._until: dict[tuple[str, str, int], float] = {}
        self._queue: deque[Decision] = deque()
        self._lock = threading.Lock()
        self._table_up = False
        self._closing = threading.Event()
        self._thread = threading.Thread(target=self._run, name="flowprobe-isolation", daemon=True)
        self._failed = False

    # -- configuration (any thread) -----------------------------------------

    def configure(
        self, specs: Sequence[tuple[str, IsolationSpec]], host_addresses: Iterable[str] = ()
    ) -> None:
        """New rules, as (scope, spec) pairs (scope: the policy's name, "" standalone).

        Every block made under the previous rules is lifted: the table is
        rebuilt empty, or removed when no rule enforces.
        """
        with self._lock:
            now_us = int(time.time() * 1_000_000)
            self._protected = self._static_protected + _networks(host_addresses)
            for _scope, spec in specs:
                self._protected += _networks(spec.protected_cidrs)
            rules = [
                _Rule(scope, spec, rule, now_us) for scope, spec in specs for rule in spec.rules
            ]
            if not self.enforce:
                for r in rules:
                    r.mode = IsolationMode.DRY_RUN
            self._until = {}
            self._queue.clear()
            self._rules = rules
            enforce = any(r.mode == IsolationMode.ENFORCE for r in rules)
            try:
                if enforce:
                    self.table.replace()
                elif self._table_up or (self.enforce and self.table.exists()):
                    self.table.delete()
                self._table_up = enforce
            except NftError as exc:
                self._fail_once(f"setting up the nftables table failed: {exc}")
        modes = sorted({str(r.mode) for r in self._rules})
        log.info("isolation: %d rule(s) %s", len(self._rules), "/".join(modes) or "off")

    # -- capture / security thread -------------------------------------------

    def submit(self, ex: Exchange, scopes: Collection[str] | None = None) -> None:
        """Evaluate ``ex`` against the rules (of ``scopes`` only, when given)."""
        rules = self._rules
        if scopes is not None:
            rules = [r for r in rules if r.scope in scopes]
        if not rules:
            return
        try:
            self._evaluate(ex, rules)
        except Exception:
            self._fail_once("evaluating an exchange failed")

    def _evaluate(self, ex: Exchange, rules: list[_Rule]) -> None:
        ep = ex.endpoints
        at = ex.start_us
        resolver = self.resolver
        client = _End(ep.client_address, lambda: resolver.client(ep.client_address, at))
        server = _End(
            ep.server_address, lambda: resolver.server(ep.server_address, ep.server_port, at)
        )
        for rule in rules:
            # What the exchange carries is checked before who made it (cheaper);
            # a new edge is only learned between matching peers.
            new_edge = rule.type == IsolationRuleType.DENY_NEW_EDGE
            reason = None if new_edge else self._reason(rule, ex)
            if not new_edge and reason is None:
                continue
            if not (rule.source.matches(client) and rule.to.matches(server, ep.server_port)):
                continue
            if new_edge:
                reason = self._new_edge(rule, ex, client, server)
            if reason is None:
                continue
            key = (ep.client_address, ep.server_address, ep.server_port)
            now = time.monotonic()
            until = self._until
            if until.get(key, 0.0) > now:
                self.counts["already_blocked"] += 1
                return
            if len(until) >= MAX_EDGES:
                for k in [k for k, t in until.items() if t <= now]:
                    del until[k]
            until[key] = now + rule.seconds
            self._queue.append(
                Decision(
                    rule.name, *key, rule.seconds, at, reason, client.workload, server.workload
                )
            )
            return

    def _reason(self, rule: _Rule, ex: Exchange) -> str | None:
        """Why a DenyRequest or BlockOnWafMatch rule fires on ``ex``, or None."""
        a = ex.attrs
        if rule.type == IsolationRuleType.DENY_REQUEST:
            method = a.get(sc.HTTP_REQUEST_METHOD)
            if method is None or (rule.methods and method not in rule.methods):
                return None
            path = str(a.get(sc.URL_PATH) or "/")
            if rule.paths is not None and not rule.paths.match(path):
                return None
            return f"{method} {path}"
        for _at, name, attrs in ex.security_events:
            if name != WAF_MATCH:
                continue
            severity = str(attrs.get("flowprobe.waf.rule.severity", "")).upper()
            if severity in SEVERITIES and SEVERITIES.index(severity) <= rule.min_rank:
                return f"WAF rule {attrs.get('flowprobe.waf.rule.id')} ({severity})"
        return None

    def _new_edge(self, rule: _Rule, ex: Exchange, client: _End, server: _End) -> str | None:
        """Why a DenyNewEdge rule fires: an edge first seen after learning; or None."""
        cw, sw = client.workload, server.workload
        edge = (
            cw.name if cw else client.address,
            sw.name if sw else f"{server.address}:{ex.endpoints.server_port}",
        )
        if edge in rule.edges:
            return None
        if ex.start_us < rule.learn_until_us:
            if len(rule.edges) < MAX_EDGES:
                rule.edges.add(edge)
            else:
                self.counts["edges_full"] += 1
            return None
        return f"new edge {edge[0]} -> {edge[1]}"

    # -- lifecycle ----------------------------------------------------------

    @property
    def started(self) -> bool:
        return self._thread.ident is not None

    def start(self) -> IsolationEngine:
        self._thread.start()
        return self

    def close(self, timeout_s: float = 10.0) -> None:
        """Enforce what is queued, then lift every block: the table goes with the agent."""
        self._closing.set()
        if self._thread.ident is not None:
            self._thread.join(timeout_s)
        with self._lock:
            self._rules = []
            try:
                if self._table_up:
                    self.table.delete()
                    self._table_up = False
            except NftError as exc:
                self._fail_once(f"removing the nftables table failed: {exc}")
        if self.alerts is not None:
            self.alerts.close()

    def totals(self) -> dict[str, int]:
        return dict(self.counts)

    # -- isolation thread ---------------------------------------------------

    def _run(self) -> None:
        queue = self._queue
        next_poll = 0.0
        while True:
            if self.poll is not None and time.monotonic() >= next_poll:
                next_poll = time.monotonic() + POLL_RULES_S
                try:
                    self.poll()
                except Exception:
                    self._fail_once("reading the rules failed")
            if queue:
                try:
                    decision = queue.popleft()
                except IndexError:  # cleared by configure() meanwhile
                    continue
                try:
                    self._enforce(decision)
                except Exception:
                    self._fail_once("enforcing a decision failed")
                continue
            if self._closing.is_set():
                return
            self._closing.wait(_POLL_S)

    def _protects(self, address: str) -> bool:
        ip = ipaddress.ip_address(address)
        return any(ip in net for net in self._protected)

    def _enforce(self, d: Decision) -> None:
        with self._lock:
            rule = next((r for r in self._rules if r.name == d.rule), None)
            if rule is None:
                return  # the rules changed since the decision
            if self._protects(d.source) or self._protects(d.destination):
                action = "protected"
            elif rule.mode == IsolationMode.DRY_RUN:
                action = "would_block"
            else:
                try:
                    self.table.block(d.source, d.destination, d.port, d.seconds)
                    action = "blocked"
                except (NftError, ValueError) as exc:
                    self._fail_once(f"blocking failed: {exc}")
                    action = "failed"
        self.counts[action] += 1
        target = f"{d.destination}:{d.port}"
        log.warning(
            "isolation: %s %s -> %s for %ds (rule %s: %s)",
            action,
            d.source,
            target,
            d.seconds,
            d.rule,
            d.reason,
        )
        if self.metrics is not None:
            self.metrics.count(
                ISOLATION_ACTIONS,
                (("flowprobe.isolation.rule", d.rule), ("flowprobe.isolation.action", action)),
            )
        if self.alerts is not None:
            attrs: dict[str, AttrValue] = {
                "flowprobe.isolation.rule": d.rule,
                "flowprobe.isolation.action": action,
                "flowprobe.isolation.mode": str(rule.mode),
                "flowprobe.isolation.reason": d.reason,
                "flowprobe.isolation.block_seconds": d.seconds,
                sc.CLIENT_ADDRESS: d.source,
                sc.SERVER_ADDRESS: d.destination,
                sc.SERVER_PORT: d.port,
            }
            for side, wl in (("client", d.client), ("server", d.server)):
                if wl is not None:
                    attrs[f"flowprobe.{side}.service"] = wl.name
                    attrs.update({f"flowprobe.{side}.{k}": v for k, v in wl.attributes})
            self.alerts.emit(
                ISOLATION_EVENT,
                d.at_us,
                "WARNING" if action in ("blocked", "would_block") else "NOTICE",
                f"isolation {action}: {d.source} -> {target} (rule {d.rule}: {d.reason})",
                attrs,
            )

    def _fail_once(self, what: str) -> None:
        self.counts["error"] += 1
        if not self._failed:
            self._failed = True
            log.error("isolation: %s (further failures are only counted)", what)
