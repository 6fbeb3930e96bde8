"""The security stage: WAF and sensitive-data inspection between the sessionizer and the sinks.

    capture thread --submit()--> [queue] --security thread--> WAF (ModSecurity + CRS), DDR
                                                          --> downstream sinks (records, OTLP)

With security on, every exchange passes through this stage, in order, so the
records and spans made of it carry its findings. The capture thread only
appends to a deque: while fewer than ``queue_size`` exchanges wait they are
inspected; beyond that they still pass, uninspected (their payload dropped,
counted as ``skipped``), and beyond four times that they are dropped
(``dropped``), as a full export queue would. Capture never waits.

The rule engine runs in C with the GIL released (ctypes), in parallel with
the capture thread; the sensitive-data scan is Python and shares the GIL.
"""

from __future__ import annotations

import logging
import threading
import time
from collections import Counter, deque
from collections.abc import Callable
from dataclasses import dataclass

from flowprobe.agent.config import SecurityConfig
from flowprobe.agent.export import semconv as sc
from flowprobe.agent.export.metrics import EXTERNAL, Instrument, Key, Metrics
from flowprobe.agent.export.naming import RouteTable, endpoint_name
from flowprobe.agent.export.workloads import Workload, WorkloadResolver
from flowprobe.agent.parse.messages import AttrValue
from flowprobe.agent.security.alerts import Alerts
from flowprobe.agent.security.ddr import Finding, Scanner, mask
from flowprobe.agent.security.modsec import HttpTransaction, ModSecurity
from flowprobe.agent.security.payload import Payload, strip, take
from flowprobe.agent.sessionize.records import Exchange

log = logging.getLogger("flowprobe.agent")

WAF_MATCH = "flowprobe.waf.match"
DDR_FIRST_SEEN = "flowprobe.ddr.first_seen"

WAF_RULE_MATCHES = Instrument(
    "flowprobe.waf.rule.matches", "{match}", "WAF (CRS) rule matches, per rule."
)
WAF_EDGE_MATCHES = Instrument(
    "flowprobe.waf.edge.matches", "{match}", "WAF (CRS) rule matches per client -> server edge."
)
DDR_DETECTIONS = Instrument(
    "flowprobe.ddr.detections",
    "{value}",
    "Sensitive values seen, per edge, endpoint and category.",
)
STAGE_EXCHANGES = Instrument(
    "flowprobe.agent.security.exchanges",
    "{exchange}",
    "Exchanges by what the security stage did: inspected, skipped or dropped (queue full), error.",
)

# Edges x categories remembered for first-sighting alerts; beyond this no
# new pair is remembered (and none alerts), counted as seen_full.
MAX_SEEN = 100_000
_POLL_S = 0.05
_REPORT_S = 1.0
_ABORT_S = 10.0


@dataclass(slots=True)
class _Edge:
    """Both ends of an exchange as workloads (None: not observed, named external)."""

    client: Workload | None
    server: Workload | None

    @property
    def client_name(self) -> str:
        return self.client.name if self.client else EXTERNAL

    @property
    def server_name(self) -> str:
        return self.server.name if self.server else EXTERNAL

    @property
    def key(self) -> Key:
        return (
            ("flowprobe.client.service", self.client_name),
            ("flowprobe.server.service", self.server_name),
        )


class SecurityStage:
    def __init__(
        self,
        config: SecurityConfig,
        downstream: Callable[[Exchange], None],
        resolver: WorkloadResolver,
        routes: RouteTable | None = None,
        metrics: Metrics | None = None,
        alerts: Alerts | None = None,
        waf: ModSecurity | None = None,
    ) -> None:
        self.config = config
        self.downstream = downstream
        self.resolver = resolver
        self.routes = routes or RouteTable()
        self.metrics = metrics
        self.alerts = alerts
        self.waf = waf
        self.scanner = Scanner(config.ddr.categories) if config.ddr.enabled else None
        # Written by the capture thread only (skipped, dropped) and by the
        # security thread only (everything else).
        self.overflow: Counter[str] = Counter()
        self.counts: Counter[str] = Counter()
        self._reported: Counter[str] = Counter()
        self._seen: set[tuple[str, str, str]] = set()
        self._queue: deque[tuple[Exchange, bool, Callable[[Exchange], None]]] = deque()
        self._hard_cap = 4 * config.queue_size
        self._closing = threading.Event()
        self._abort = threading.Event()
        self._thread = threading.Thread(target=self._run, name="flowprobe-security", daemon=True)
        self._failed = False

    # -- capture thread ---------------------------------------------------

    def submit(self, ex: Exchange, then: Callable[[Exchange], None] | None = None) -> None:
        """Queue ``ex`` for inspection; ``then`` (default: ``downstream``) gets it afterwards."""
        queued = len(self._queue)
        then = then or self.downstream
        if queued < self.config.queue_size:
            self._queue.append((ex, True, then))
        elif queued < self._hard_cap:
            strip(ex.attrs)
            self.overflow["skipped"] += 1
            self._queue.append((ex, False, then))
        else:
            self.overflow["dropped"] += 1

    # -- lifecycle --------------------------------------------------------

    def start(self) -> SecurityStage:
        self._thread.start()
        return self

    def close(self, timeout_s: float = 60.0) -> None:
        """Inspect and hand on what is queued, then stop. Out of time, what is left
        is handed on uninspected (counted as skipped)."""
        self._closing.set()
        if self._thread.ident is not None:
            self._thread.join(timeout_s)
        if self._thread.is_alive():
            self._abort.set()
            # Handing on without inspecting is quick.
            self._thread.join(_ABORT_S)
        if self._thread.is_alive():
            # Still inside the engine or a sink: freeing the engine now could
            # crash the process; it goes with it.
            log.warning("security: the stage did not stop in time; exiting without it")
            return
        self._report_counts()
        if self.waf is not None:
            self.waf.close()
        if self.alerts is not None:
            self.alerts.close()

    # -- security thread --------------------------------------------------

    def _run(self) -> None:
        queue = self._queue
        next_report = time.monotonic() + _REPORT_S
        while True:
            if queue:
                ex, inspect, then = queue.popleft()
                if inspect and self._abort.is_set():
                    strip(ex.attrs)
                    self.counts["skipped"] += 1
                elif inspect:
                    self._inspect_safely(ex)
                try:
                    then(ex)
                except Exception:
                    self._fail_once("handing an exchange on failed")
                # A busy stage still reports its counts now and then.
                if time.monotonic() >= next_report:
                    self._report_counts()
                    next_report = time.monotonic() + _REPORT_S
                continue
            self._report_counts()
            if self._closing.is_set():
                return
            self._closing.wait(_POLL_S)

    def _fail_once(self, what: str) -> None:
        self.counts["error"] += 1
        if not self._failed:
            self._failed = True
            log.exception("security: %s (further failures are only counted)", what)

    def _inspect_safely(self, ex: Exchange) -> None:
        try:
            self.inspect(ex)
        except Exception:
            strip(ex.attrs)
            self._fail_once("inspecting an exchange failed")

    def inspect(self, ex: Exchange) -> None:
        """WAF and sensitive-data inspection of one exchange; findings land on it."""
        payload = take(ex.attrs, self.config.body_max_bytes)
        ep = ex.endpoints
        edge = _Edge(
            self.resolver.client(ep.client_address, ex.start_us),
            self.resolver.server(ep.server_address, ep.server_port, ex.start_us),
        )
        if self.waf is not None and ex.protocol == "http" and sc.HTTP_REQUEST_METHOD in ex.attrs:
            self._waf(ex, payload, edge)
        if self.scanner is not None:
            self._ddr(ex, payload, edge)
        self.counts["inspected"] += 1

    def _context(self, ex: Exchange, edge: _Edge) -> dict[str, AttrValue]:
        """Who talked to whom, for alerts: addresses, workload names and their attributes."""
        ep = ex.endpoints
        out: dict[str, AttrValue] = {
            sc.CLIENT_ADDRESS: ep.client_address,
            sc.CLIENT_PORT: ep.client_port,
            sc.SERVER_ADDRESS: ep.server_address,
            sc.SERVER_PORT: ep.server_port,
            "flowprobe.protocol": ex.protocol,
        }
        out["flowprobe.endpoint"] = endpoint_name(ex, self.routes)
        out.update(edge.key)
        for side, wl in (("client", edge.client), ("server", edge.server)):
            if wl is not None:
                out.update({f"flowprobe.{side}.{k}": v for k, v in wl.attributes})
        return out

    def _waf(self, ex: Exchange, payload: Payload, edge: _Edge) -> None:
        assert self.waf is not None
        a = ex.attrs
        ep = ex.endpoints
        query = a.get(sc.URL_QUERY)
        status = a.get(sc.HTTP_RESPONSE_STATUS_CODE)
        hits = self.waf.inspect(
            HttpTransaction(
                ep.client_address,
                ep.client_port,
                ep.server_address,
                ep.server_port,
                method=str(a[sc.HTTP_REQUEST_METHOD]),
                uri=str(a.get(sc.URL_PATH) or "/")
                + (f"?{query}" if isinstance(query, str) else ""),
                version=str(a.get(sc.NETWORK_PROTOCOL_VERSION, "1.1")),
                request_headers=payload.request_headers,
                request_body=payload.request_body.encode(),
                status=status if isinstance(status, int) else None,
                response_headers=payload.response_headers,
                response_body=payload.response_body.encode(),
            )
        )
        if not hits:
            return
        context = self._context(ex, edge) if self.alerts is not None else {}
        cap = self.config.matched_data_max_chars
        for hit in hits:
            # Rules 95x and later look at the response.
            at = ex.end_us if hit.rule_id >= 950000 else ex.request_end_us
            attrs: dict[str, AttrValue] = {
                "flowprobe.waf.rule.id": hit.rule_id,
                "flowprobe.waf.rule.message": hit.message,
                "flowprobe.waf.rule.severity": hit.severity,
                "flowprobe.waf.rule.tags": list(hit.tags),
                # Masked before it is cut, so a cut cannot expose part of a value.
                "flowprobe.waf.matched_data": mask(hit.data)[:cap],
            }
            ex.security_events.append((at, WAF_MATCH, attrs))
            if self.metrics is not None:
                rule = (
                    ("flowprobe.waf.rule.id", str(hit.rule_id)),
                    ("flowprobe.waf.rule.severity", hit.severity),
                )
                self.metrics.count(WAF_RULE_MATCHES, rule)
                self.metrics.count(WAF_EDGE_MATCHES, edge.key)
            if self.alerts is not None:
                self.alerts.emit(
                    WAF_MATCH,
                    at,
                    hit.severity or "WARNING",
                    f"WAF rule {hit.rule_id}: {hit.message}",
                    {**attrs, **context},
                )
        a["flowprobe.waf.matches"] = sum(1 for h in hits if not h.evaluation)

    def _ddr(self, ex: Exchange, payload: Payload, edge: _Edge) -> None:
        assert self.scanner is not None
        scan = self.scanner.scan
        found: list[tuple[str, Finding]] = []
        # What the records and spans carry is masked in place: a card number
        # in a URL or (raw) query text must not leave either.
        attrs = ex.attrs
        for key, value in list(attrs.items()):
            if isinstance(value, str) and value:
                hits = scan(value)
                if hits:
                    attrs[key] = mask(value, hits)
                    found += ((key, f) for f in hits)
        for where, text in payload.texts():
            found += ((where, f) for f in scan(text))
        if not found:
            return
        categories = Counter(f.category for _, f in found)
        attrs["flowprobe.ddr.categories"] = sorted(categories)
        endpoint = endpoint_name(ex, self.routes)
        if self.metrics is not None:
            for category, n in categories.items():
                series = (
                    *edge.key,
                    ("flowprobe.endpoint", endpoint),
                    ("flowprobe.ddr.category", category),
                )
                self.metrics.count(DDR_DETECTIONS, series, n)
        names = (edge.client_name, edge.server_name)
        context: dict[str, AttrValue] | None = None
        for where, f in found:
            seen = (*names, f.category)
            if seen in self._seen:
                continue
            if len(self._seen) >= MAX_SEEN:
                self.counts["seen_full"] += 1
                continue
            self._seen.add(seen)
            event: dict[str, AttrValue] = {
                "flowprobe.ddr.category": f.category,
                "flowprobe.ddr.location": where,
                "flowprobe.ddr.sample": f.masked,
            }
            ex.security_events.append((ex.start_us, DDR_FIRST_SEEN, event))
            if self.alerts is not None:
                if context is None:
                    context = self._context(ex, edge)
                self.alerts.emit(
                    DDR_FIRST_SEEN,
                    ex.start_us,
                    "WARNING",
                    f"first {f.category} data on {names[0]} -> {names[1]}",
                    {**event, **context},
                )

    def totals(self) -> dict[str, int]:
        """What the stage did so far: inspected, skipped, dropped, error, seen_full."""
        return dict(Counter(dict(self.overflow)) + self.counts)

    def _report_counts(self) -> None:
        """Counter deltas into the metrics (the security thread is their only writer there)."""
        if self.metrics is None:
            return
        for result, n in self.totals().items():
            delta = n - self._reported[result]
            if delta:
                self.metrics.count(STAGE_EXCHANGES, (("result", result),), delta)
                self._reported[result] = n
