"""Which traffic the node's agent captures and exports, from the compiled policy set.

Pure apart from reading the shared :class:`ClusterIndex` under its lock.

* **Capture scope** (:class:`CaptureScope`): the BPF filter (the IPs of this
  node's selected pods, narrowed to the policies' ports when every policy
  selecting a pod names ports), the parsers and their extra ports. A change
  of scope restarts the capture (``capture.py`` overlaps old and new).
* **Selection** (:meth:`PolicyEngine.select`): an exchange is exported when a
  pod *on this node* is selected as the server (direction Ingress/Both, port
  allowed) or as the client (Egress/Both); the protocol is one the policy
  parses; and the connection falls in the policy's sample. A client-side
  selection defers to the server's node when the server is a pod selected
  there, so an exchange between two captured nodes is exported once.
* **Rules** (:meth:`PolicyEngine.annotate`): the selecting policy's name and
  both ends' Kubernetes identity as span attributes, its query-text mode and
  redaction patterns.
"""

from __future__ import annotations

import re
import zlib
from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import NamedTuple

from flowprobe.agent.enrich.index import ClusterIndex, Endpoint, PodRecord
from flowprobe.agent.enrich.resolver import pod_attributes
from flowprobe.agent.parse.messages import AttrValue
from flowprobe.agent.sessionize.records import Endpoints, Exchange
from flowprobe.api.policyset import CompiledPolicy
from flowprobe.api.v1alpha1 import (
    Direction,
    HeaderCaptureMode,
    Protocol,
    QueryTextMode,
)

# API protocol -> the agent's parser (gRPC is HTTP/2's parser; TCP has none).
PARSER_OF = {
    Protocol.HTTP: "http",
    Protocol.HTTP2: "http2",
    Protocol.GRPC: "http2",
    Protocol.DNS: "dns",
    Protocol.REDIS: "redis",
    Protocol.POSTGRESQL: "postgresql",
    Protocol.MYSQL: "mysql",
}
# Exchange.protocol -> API protocol.
PROTOCOL_OF = {
    "http": Protocol.HTTP,
    "http2": Protocol.HTTP2,
    "grpc": Protocol.GRPC,
    "dns": Protocol.DNS,
    "redis": Protocol.REDIS,
    "postgresql": Protocol.POSTGRESQL,
    "mysql": Protocol.MYSQL,
}
POLICY_ATTRIBUTE = "flowprobe.policy"
USER_AGENT_ATTRIBUTE = "http.user_agent"
QUERY_TEXT_ATTRIBUTE = "db.query.text"
SERVICES_SUFFIX = "k8s.service.names"
# Attributes redaction patterns apply to: what can carry user data.
_PATTERN_TARGETS = ("url.query", "url.full", "url.path", USER_AGENT_ATTRIBUTE, QUERY_TEXT_ATTRIBUTE)
# Beyond this many addresses the BPF program gets too long to compile
# quickly (and may exceed the kernel's 4096 instructions): capture all of
# the node's inbound traffic and select in the agent instead.
MAX_BPF_HOSTS = 256
# Bound of the per-connection selection memo (cleared when full).
_CHOICES_MAX = 65_536


@dataclass(frozen=True)
class CaptureScope:
    """What the capture needs; equal scopes need no restart."""

    bpf: str | None
    protocols: tuple[str, ...]
    ports: tuple[tuple[str, tuple[int, ...]], ...]
    raw_query_text: bool
    user_agent: bool

    @property
    def empty(self) -> bool:
        return self.bpf is None


NO_CAPTURE = CaptureScope(None, (), (), False, False)


class _Choice(NamedTuple):
    """A connection's selection before sampling, valid for start times in [lo, hi)."""

    policies: tuple[CompiledPolicy, ...]
    deferred: bool
    server: Endpoint | None
    client: Endpoint | None
    lo: int
    hi: int
    # Every policy keeps all connections: no per-exchange sampling check.
    unsampled: bool


@dataclass
class SelectionCounters:
    selected: int = 0
    unselected: int = 0
    sampled_out: int = 0
    deferred: int = 0
    per_policy: dict[str, int] = field(default_factory=dict)


def _port_allowed(policy: CompiledPolicy, port: int, port_name: str | None) -> bool:
    if not policy.ports:
        return True
    return any(r.port == port or (r.name is not None and r.name == port_name) for r in policy.ports)


def _in_sample(policy: CompiledPolicy, ex: Exchange) -> bool:
    if policy.sampling_percent >= 100:
        return True
    ep = ex.endpoints
    # Per connection, so a sampled connection keeps all its exchanges.
    key = f"{ep.client_address}|{ep.client_port}|{ep.server_address}|{ep.server_port}"
    return zlib.crc32(key.encode()) % 100 < policy.sampling_percent


class PolicyEngine:
    def __init__(self, index: ClusterIndex, node: str) -> None:
        self.index = index
        self.node = node
        self.policies: tuple[CompiledPolicy, ...] = ()
        # Each policy with the Exchange.protocol values it parses.
        self._with_protocols: list[tuple[CompiledPolicy, frozenset[str]]] = []
        self.counters = SelectionCounters()
        self._selected: dict[tuple[str, str], bool] = {}
        self._admitted: dict[str, bool] = {}
        self._generation = -1
        self._side_attrs: dict[tuple[str, str, str | None], tuple[tuple[str, AttrValue], ...]] = {}
        # (client ip, server ip, server port, protocol) -> the selection:
        # exchanges of one connection repeat it, so both ends are resolved
        # and every policy checked once per connection, not per exchange.
        self._choices: dict[tuple[str, str, int, str | None], _Choice] = {}
        self._patterns: dict[str, list[tuple[re.Pattern[str], str]]] = {}

    def set_policies(self, policies: Sequence[CompiledPolicy]) -> None:
        patterns: dict[str, list[tuple[re.Pattern[str], str]]] = {}
        for p in policies:
            compiled = []
            for rule in p.redaction.patterns:
                try:
                    compiled.append((re.compile(rule.regex), rule.replacement))
                except re.error:
                    # The operator reports InvalidSpec for these; never crash here.
                    continue
            patterns[p.name] = compiled
        with self.index.lock:  # the capture thread selects meanwhile
            self.policies = tuple(sorted(policies, key=lambda p: p.name))
            self._with_protocols = [
                (p, frozenset(k for k, v in PROTOCOL_OF.items() if v in p.protocols))
                for p in self.policies
            ]
            self._patterns = patterns
            # Answers derived from the old policies (selections here, the
            # resolvers' admitted pods) are keyed on the index generation:
            # _check_generation drops them at their next use.
            self.index.invalidate()

    # -- selection --------------------------------------------------------

    def _check_generation(self) -> None:
        # Pods or namespace labels changed: cached answers may be wrong now.
        if self.index.generation != self._generation:
            self._selected.clear()
            self._admitted.clear()
            self._side_attrs.clear()
            self._choices.clear()
            self._generation = self.index.generation

    def selects(self, policy: CompiledPolicy, pod: PodRecord) -> bool:
        """Caller holds the index lock."""
        self._check_generation()
        key = (policy.uid, pod.uid)
        hit = self._selected.get(key)
        if hit is None:
            ns_labels = self.index.namespace_labels.get(pod.namespace)
            hit = (
                ns_labels is not None
                and policy.namespace_selector.matches(ns_labels)
                and policy.pod_selector.matches(pod.labels)
            )
            self._selected[key] = hit
        return hit

    def selects_any(self, pod: PodRecord) -> bool:
        """Whether any policy selects ``pod`` (the resolver's ``admit``)."""
        with self.index.lock:
            self._check_generation()
            hit = self._admitted.get(pod.uid)
            if hit is None:
                hit = self._admitted[pod.uid] = any(self.selects(p, pod) for p in self.policies)
            return hit

    def _as_server(self, policy: CompiledPolicy, ep: Endpoint | None, port: int) -> bool:
        return (
            ep is not None
            and policy.direction != Direction.EGRESS
            and _port_allowed(policy, port, ep.port_name)
            and self.selects(policy, ep.pod)
        )

    def _as_client(
        self, policy: CompiledPolicy, ep: Endpoint | None, server: Endpoint | None, port: int
    ) -> bool:
        return (
            ep is not None
            and policy.direction != Direction.INGRESS
            and _port_allowed(policy, port, server.port_name if server else None)
            and self.selects(policy, ep.pod)
        )

    def _choose(self, ep: Endpoints, protocol: str | None, at_us: int) -> _Choice:
        """The policies selecting the connection from this node before sampling
        (``protocol`` None: whatever it carries). Caller holds the index lock."""
        if self.index.generation != self._generation:
            self._check_generation()
        key = (ep.client_address, ep.server_address, ep.server_port, protocol)
        hit = self._choices.get(key)
        if hit is not None and hit.lo <= at_us < hit.hi:
            return hit
        port = ep.server_port
        server, s_lo, s_hi = self.index.lookup(ep.server_address, port, at_us)
        client, c_lo, c_hi = self.index.lookup(ep.client_address, -1, at_us)
        local_server = server is not None and server.pod.node == self.node
        local_client = client is not None and client.pod.node == self.node
        deferred = False
        chosen: list[CompiledPolicy] = []
        for policy, protocols in self._with_protocols:
            if protocol is not None and protocol not in protocols:
                continue
            if local_server and self._as_server(policy, server, port):
                chosen.append(policy)
            elif local_client and self._as_client(policy, client, server, port):
                if not local_server and self._selected_remotely(server, port):
                    deferred = True
                    continue
                chosen.append(policy)
        if len(self._choices) >= _CHOICES_MAX:
            self._choices.clear()
        hit = _Choice(
            tuple(chosen),
            deferred,
            server,
            client,
            max(s_lo, c_lo),
            min(s_hi, c_hi),
            all(p.sampling_percent >= 100 for p in chosen),
        )
        self._choices[key] = hit
        return hit

    def select(self, ex: Exchange) -> tuple[list[CompiledPolicy], Endpoint | None, Endpoint | None]:
        """The policies that export ``ex`` from this node, and both resolved ends."""
        with self.index.lock:
            choice = self._choose(ex.endpoints, ex.protocol, ex.start_us)
        c = self.counters
        if not choice.policies:
            if choice.deferred:
                c.deferred += 1
            else:
                c.unselected += 1
            return [], choice.server, choice.client
        sampled = (
            list(choice.policies)
            if choice.unsampled
            else [p for p in choice.policies if _in_sample(p, ex)]
        )
        if not sampled:
            c.sampled_out += 1
            return [], choice.server, choice.client
        c.selected += 1
        for p in sampled:
            c.per_policy[p.name] = c.per_policy.get(p.name, 0) + 1
        return sampled, choice.server, choice.client

    def encrypted(self, ep: Endpoints, at_us: int) -> tuple[list[str], str]:
        """For a connection carrying TLS: the policies that would export its
        traffic from this node, and the connection as ``client -> server:port``."""
        with self.index.lock:
            choice = self._choose(ep, None, at_us)
        if not choice.policies:
            return [], ""
        where = (
            f"{_describe(choice.client, ep.client_address)} -> "
            f"{_describe(choice.server, ep.server_address)}:{ep.server_port}"
        )
        return [p.name for p in choice.policies], where

    def _selected_remotely(self, server: Endpoint | None, port: int) -> bool:
        return server is not None and any(self._as_server(p, server, port) for p in self.policies)

    # -- rules ------------------------------------------------------------

    def _side(self, role: str, ep: Endpoint) -> tuple[tuple[str, AttrValue], ...]:
        key = (role, ep.pod.uid, ep.container)
        attrs = self._side_attrs.get(key)
        if attrs is None:
            prefix = f"flowprobe.{role}."
            out: list[tuple[str, AttrValue]] = [
                (prefix + k, v) for k, v in pod_attributes(self.index, ep)
            ]
            services = self.index.services_of(ep.pod)
            if services:
                out.append((prefix + SERVICES_SUFFIX, services))
            attrs = self._side_attrs[key] = tuple(out)
        return attrs

    def annotate(
        self,
        ex: Exchange,
        policy: CompiledPolicy,
        server: Endpoint | None,
        client: Endpoint | None,
    ) -> None:
        """Apply the selecting policy's rules to ``ex`` (in place) and name both ends."""
        attrs = ex.attrs
        attrs[POLICY_ATTRIBUTE] = policy.name
        with self.index.lock:
            if server is not None:
                attrs.update(self._side("server", server))
            if client is not None:
                attrs.update(self._side("client", client))
        if policy.redaction.query_text == QueryTextMode.OMITTED:
            attrs.pop(QUERY_TEXT_ATTRIBUTE, None)
        if policy.payload.headers.mode == HeaderCaptureMode.NONE:
            attrs.pop(USER_AGENT_ATTRIBUTE, None)
        for pattern, replacement in self._patterns.get(policy.name, ()):
            for key in _PATTERN_TARGETS:
                value = attrs.get(key)
                if isinstance(value, str):
                    attrs[key] = pattern.sub(replacement, value)

    # -- capture scope ----------------------------------------------------

    def scope(self) -> CaptureScope:
        if not self.policies:
            return NO_CAPTURE
        hosts: dict[str, set[int] | None] = {}
        protocols: set[str] = set()
        ports: dict[str, set[int]] = {}
        for p in self.policies:
            protocols.update(PARSER_OF[x] for x in p.protocols if x in PARSER_OF)
        with self.index.lock:
            local = self.index.pods_on_node(self.node)
            for pod in local:
                if pod.host_network:
                    continue
                for p in self.policies:
                    if not self.selects(p, pod):
                        continue
                    numbers = self._port_numbers(p, pod, ports)
                    for ip in pod.ips:
                        if numbers is None or hosts.get(ip, set()) is None:
                            hosts[ip] = None
                        else:
                            have = hosts.setdefault(ip, set())
                            assert have is not None
                            have.update(numbers)
        if not hosts:
            return NO_CAPTURE
        raw = all(p.redaction.query_text == QueryTextMode.RAW for p in self.policies)
        user_agent = any(p.payload.headers.mode != HeaderCaptureMode.NONE for p in self.policies)
        return CaptureScope(
            bpf=_bpf(hosts),
            protocols=tuple(sorted(protocols)),
            ports=tuple(sorted((k, tuple(sorted(v))) for k, v in ports.items())),
            raw_query_text=raw,
            user_agent=user_agent,
        )

    @staticmethod
    def _port_numbers(
        policy: CompiledPolicy, pod: PodRecord, decode: dict[str, set[int]]
    ) -> set[int] | None:
        """The pod's ports the policy names (None: all); collects decode-as rules."""
        if not policy.ports:
            return None
        by_name = {name: port for port, (_, name) in pod.ports.items() if name}
        out: set[int] = set()
        for rule in policy.ports:
            number = rule.port if rule.port is not None else by_name.get(rule.name or "")
            if number is None:
                continue
            out.add(number)
            parser = PARSER_OF.get(rule.protocol) if rule.protocol else None
            if parser:
                decode.setdefault(parser, set()).add(number)
        return out


def _describe(end: Endpoint | None, address: str) -> str:
    return f"{end.pod.namespace}/{end.pod.name}" if end is not None else address


def _bpf(hosts: dict[str, set[int] | None]) -> str:
    if len(hosts) > MAX_BPF_HOSTS:
        return "inbound"
    clauses = []
    for ip, ports in sorted(hosts.items()):
        if ports is None:
            clauses.append(f"host {ip}")
        elif ports:
            alts = " or ".join(f"port {p}" for p in sorted(ports))
            clauses.append(f"(host {ip} and ({alts}))")
    if not clauses:
        return "inbound and not ip"
    # inbound: on the "any" interface each packet between two local pods is
    # seen twice (leaving one veth, entering the other); only once inbound.
    return f"inbound and ({' or '.join(clauses)})"
