"""Live capture that replaces its tshark before tshark's memory grows too far.

tshark keeps state for every packet it has seen. Its session auto-reset
(``-M``) frees most of it, but not all: in a 10-minute run at 10,000 HTTP
req/s, the lowest RSS after each reset still rose by about 20 MB a minute
(docs/performance.md). So when tshark's RSS passes a limit, a second
``dumpcap | tshark`` starts; once its dumpcap captures, the handover instant T
is taken: the old capture's packets before T and the new one's from T on go
to the same sessionizer, in that order, so every packet counts once and
connections carry over. The old capture runs a moment past T to deliver its
last packets; the new tshark starts only after the old one exited (two
tsharks would hold twice the memory), its dumpcap holding the packets in the
kernel's capture buffer meanwhile. What is lost is what tshark itself needs
state for: a message whose segments straddle T.
"""

from __future__ import annotations

import contextlib
import logging
import os
import threading
import time
from collections.abc import Callable, Iterator

from flowprobe.agent.capture import columns as c
from flowprobe.agent.capture.columns import parse_ts_us
from flowprobe.agent.capture.tshark import LiveCapture

log = logging.getLogger("flowprobe.agent.capture")

DEFAULT_TSHARK_RSS_LIMIT = 250 * 1024 * 1024
# How long the old capture keeps delivering after the handover instant.
HANDOVER_GRACE_S = 1.0
_CHECK_EVERY_ROWS = 500


def _rss_bytes(pid: int) -> int:
    try:
        with open(f"/proc/{pid}/statm") as f:
            return int(f.read().split()[1]) * os.sysconf("SC_PAGE_SIZE")
    except (OSError, ValueError, IndexError):
        return 0


class RotatingCapture:
    """Rows of ``start()``'s captures, one after the other (see module docstring)."""

    def __init__(
        self,
        start: Callable[[bool], LiveCapture],
        tshark_rss_limit: int = DEFAULT_TSHARK_RSS_LIMIT,
        start_timeout_s: float = 30.0,
    ) -> None:
        self._start = start
        self.tshark_rss_limit = tshark_rss_limit
        self.start_timeout_s = start_timeout_s
        self.current = start(True)
        self._next: LiveCapture | None = None
        self.rotations = 0
        self._received = 0
        self._dropped = 0
        self._stopping = threading.Event()

    def wait_capturing(self, timeout: float) -> bool:
        return self.current.wait_capturing(timeout)

    def capturing(self) -> bool:
        return self.current.capturing()

    def alive(self) -> bool:
        return self.current.dumpcap.poll() is None

    def error(self) -> str | None:
        return self.current.dumpcap_error() or self.current.rows.error

    def capture_counts(self) -> tuple[int, int] | None:
        counts = self.current.capture_counts()
        if counts is None:
            return None
        return self._received + counts[0], self._dropped + counts[1]

    def stop(self) -> None:
        self._stopping.set()
        self.current.stop()
        nxt = self._next
        if nxt is not None:
            nxt.stop()

    def __iter__(self) -> Iterator[list[str]]:
        n = 0
        rows: Iterator[list[str]] = iter(self.current)
        handover: tuple[LiveCapture, int] | None = None
        while True:
            cols = next(rows, None)
            if cols is None:
                if handover is None:
                    return
                # The old tshark has delivered everything and exited: only now
                # does the new one start, on the packets its dumpcap held.
                nxt, handover_us = handover
                handover = None
                self._retire(self.current)
                nxt.start_tshark()
                self.current, self._next = nxt, None
                self.rotations += 1
                rows = self._after(iter(nxt), handover_us)
                continue
            n += 1
            if handover is not None:
                with contextlib.suppress(ValueError, IndexError):
                    if parse_ts_us(cols[c.TS]) >= handover[1]:
                        continue  # the new capture delivers it
            elif (
                n % _CHECK_EVERY_ROWS == 0
                and not self._stopping.is_set()
                and _rss_bytes(self.current.rows.proc.pid) > self.tshark_rss_limit
            ):
                handover = self._begin()
            yield cols

    def _begin(self) -> tuple[LiveCapture, int] | None:
        try:
            nxt = self._start(False)
        except Exception as exc:  # a failed rotation must not end a working capture
            log.warning("tshark rotation: new capture failed to start: %s", exc)
            return None
        if not nxt.wait_capturing(self.start_timeout_s):
            log.warning("tshark rotation: new capture did not start; keeping the old one")
            nxt.stop()
            return None
        self._next = nxt
        handover_us = int(time.time() * 1_000_000)
        # The old capture delivers what it saw before the handover, then ends.
        timer = threading.Timer(HANDOVER_GRACE_S, self.current.stop)
        timer.daemon = True
        timer.start()
        log.info("tshark rotation: tshark passed %d MB", self.tshark_rss_limit >> 20)
        return nxt, handover_us

    @staticmethod
    def _after(rows: Iterator[list[str]], handover_us: int) -> Iterator[list[str]]:
        for cols in rows:
            with contextlib.suppress(ValueError, IndexError):
                if parse_ts_us(cols[c.TS]) < handover_us:
                    continue  # the old capture delivered it
            yield cols

    def _retire(self, live: LiveCapture) -> None:
        live.stop()
        counts = live.capture_counts()
        if counts is not None:
            self._received += counts[0]
            self._dropped += counts[1]
