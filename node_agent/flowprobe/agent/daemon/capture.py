"""The node's capture, restarted make-before-break when its scope changes.

A BPF filter is fixed for the life of a dumpcap, so a new scope (pods came
or went, a policy changed) needs a new capture. The new one is started
while the old one still runs; once dumpcap says it is capturing, the
handover instant ``T`` is taken: the old capture keeps only exchanges that
started before ``T``, the new one only those from ``T`` on, and the old one
lingers ``linger_s`` to finish exchanges in flight, then until its tshark
has read the packets up to that moment. Nothing is lost or counted twice
unless an exchange straddles ``T`` and outlasts the linger.
Each capture has its own pipeline (the parsers and ports may differ).
"""

from __future__ import annotations

import logging
import threading
import time
from collections.abc import Callable, Sequence

from flowprobe.agent.capture.rotate import HANDOVER_MAX_S, STOP_DRAIN_S, RotatingCapture
from flowprobe.agent.capture.tshark import CaptureError, LiveCapture, Tools
from flowprobe.agent.config import AgentConfig, PayloadConfig
from flowprobe.agent.enrich.policy import CaptureScope
from flowprobe.agent.enrich.watch import now_us
from flowprobe.agent.pipeline import Pipeline, Sinks
from flowprobe.agent.sessionize.records import Endpoints, Exchange
from flowprobe.agent.sessionize.stats import Stats

log = logging.getLogger("flowprobe.agent.daemon")


class _Generation:
    def __init__(
        self,
        scope: CaptureScope,
        tools: Tools,
        interfaces: Sequence[str],
        base: AgentConfig,
        sink: Callable[[Exchange], None],
        stats: Stats,
        tls_sink: Callable[[Endpoints, int], None] | None,
    ) -> None:
        self.scope = scope
        self.base = base
        self.lo_us = 0
        self.hi_us: int | None = None
        self.sink = sink
        self.stats = stats
        config = base.model_copy(
            update={
                "protocols": scope.protocols,
                "ports": dict(scope.ports),
                "payload": PayloadConfig(
                    user_agent=scope.user_agent, raw_query_text=scope.raw_query_text
                ),
                "detect_tls": tls_sink is not None,
            }
        )
        sinks = Sinks(exchange=[self._admit], tls=[tls_sink] if tls_sink else [])
        self.pipeline = Pipeline(config, sinks, stats)
        self.started = time.monotonic()
        options = self.pipeline.tshark_options
        # tshark is replaced when its memory grows (capture.rotate).
        self.live = RotatingCapture(
            lambda start_tshark: LiveCapture(
                tools, interfaces, options, bpf=scope.bpf, start_tshark=start_tshark
            )
        )
        self._stop_lock = threading.Lock()
        self._stopped = False
        self.thread = threading.Thread(target=self._run, name="flowprobe-capture", daemon=True)
        self.thread.start()

    def _admit(self, ex: Exchange) -> None:
        if ex.start_us >= self.lo_us and (self.hi_us is None or ex.start_us < self.hi_us):
            self.sink(ex)

    def _run(self) -> None:
        try:
            self.pipeline.feed(self.live)
        except Exception:
            log.exception("capture pipeline failed")
        finally:
            self.pipeline.finish()

    def error(self) -> str | None:
        return self.live.error()

    def stop(self, drain_s: float = 0.0) -> None:
        with self._stop_lock:
            if self._stopped:
                return  # retired and shut down at once: counted once
            self._stopped = True
        self.live.stop(drain_s)
        self.thread.join(15)
        self.stats.tshark_rotations += self.live.rotations
        counts = self.live.capture_counts()
        if counts is not None:
            self.stats.capture_received += counts[0]
            self.stats.capture_dropped += counts[1]


class CaptureSwitcher:
    def __init__(
        self,
        tools: Tools,
        interfaces: Sequence[str],
        base: AgentConfig,
        sink: Callable[[Exchange], None],
        stats: Stats,
        linger_s: float = 2.0,
        start_timeout_s: float = 10.0,
        tls_sink: Callable[[Endpoints, int], None] | None = None,
    ) -> None:
        self.tools = tools
        self.interfaces = list(interfaces)
        self.base = base
        self.sink = sink
        self.tls_sink = tls_sink
        self.stats = stats
        self.linger_s = linger_s
        self.start_timeout_s = start_timeout_s
        self.current: _Generation | None = None
        self.switches = 0
        # Seconds from starting a dumpcap to its "Capturing on" (the
        # overlap a switch needs), and how long a switch had no capture at
        # all (only when a new dumpcap did not start in time).
        self.last_start_s: float | None = None
        self.gap_s_total = 0.0
        self.error: str | None = None
        self.retry_s = 30.0
        self._failed: CaptureScope | None = None
        self._retry_at = 0.0
        self._retiring: set[_Generation] = set()

    @property
    def scope(self) -> CaptureScope | None:
        return self.current.scope if self.current else None

    def switch(self, scope: CaptureScope) -> None:
        cur = self.current
        if cur is not None and cur.scope == scope and cur.base == self.base:
            return
        if self._failed == scope and time.monotonic() < self._retry_at:
            return  # the same capture failed moments ago: do not respawn on every pod event
        old = self.current
        if scope.empty:
            self.current = None
            if old is not None:
                old.hi_us = now_us()
                self._retire(old)
            return
        try:
            new = _Generation(
                scope, self.tools, self.interfaces, self.base, self.sink, self.stats, self.tls_sink
            )
        except (CaptureError, OSError) as exc:
            self._fail(scope, str(exc))
            return
        deadline = new.started + self.start_timeout_s
        while not new.live.capturing() and new.error() is None and time.monotonic() < deadline:
            time.sleep(0.01)
        err = new.error()
        if err is not None:
            new.stop()
            self._fail(scope, err)
            return
        self.error = None
        self._failed = None
        self.last_start_s = time.monotonic() - new.started
        if not new.live.capturing():
            # Took over without proof that dumpcap captures: a possible gap.
            log.warning(
                "capture: dumpcap silent after %.0f s; switching anyway", self.start_timeout_s
            )
            self.gap_s_total += self.start_timeout_s
        handover = now_us()
        new.lo_us = handover
        self.current = new
        self.switches += 1
        if old is not None:
            old.hi_us = handover
            self._retire(old)
        log.info(
            "capture %d: filter %r, parsers %s (dumpcap ready in %.2f s)",
            self.switches,
            scope.bpf,
            ",".join(scope.protocols),
            self.last_start_s,
        )

    def _fail(self, scope: CaptureScope, error: str) -> None:
        if error != self.error:
            log.warning("capture with filter %r failed: %s", scope.bpf, error)
        self.error = error
        self._failed = scope
        self._retry_at = time.monotonic() + self.retry_s

    def _retire(self, gen: _Generation) -> None:
        self._retiring.add(gen)

        def later() -> None:
            time.sleep(self.linger_s)
            end_us = (gen.hi_us or now_us()) + int(self.linger_s * 1_000_000)
            gen.live.wait_caught_up(end_us, HANDOVER_MAX_S)
            gen.stop()
            self._retiring.discard(gen)

        threading.Thread(target=later, name="flowprobe-capture-retire", daemon=True).start()

    def check(self) -> None:
        """A capture that died (interface gone, dumpcap killed) becomes an error, retried later."""
        cur = self.current
        if cur is not None and not cur.live.alive():
            self.current = None
            cur.stop()
            self._fail(cur.scope, cur.error() or "dumpcap exited")

    def alive(self) -> bool:
        return self.current is not None and self.current.live.alive()

    def stop(self) -> None:
        """Stop capturing once the packets captured so far have been read."""
        if self.current is not None:
            self.current.stop(STOP_DRAIN_S)
            self.current = None
        # Captures still lingering after a switch would outlive the agent.
        for gen in list(self._retiring):
            gen.stop()
