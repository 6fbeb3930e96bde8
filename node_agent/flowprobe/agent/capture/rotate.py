"""Live capture that replaces its tshark before tshark's memory grows too far.

tshark keeps state for every packet it has seen. Its session auto-reset
(``-M``) frees most of it, but not all: in a 10-minute run at 10,000 HTTP
req/s, the lowest RSS after each reset still rose by about 20 MB a minute
(docs/performance.md). So when tshark's RSS passes a limit, a second
``dumpcap | tshark`` starts; once its dumpcap captures, the handover instant T
is taken (dumpcap prints "Capturing on" a moment before it captures, so
LiveCapture.wait_capturing allows for that). The old dumpcap is stopped once
its tshark has read up to T (a row stamped that late, or no row for
``IDLE_S``): under load tshark runs seconds behind the wire, and a dumpcap
stopped earlier takes the packets still in its kernel
buffer with it, uncounted as drops. The new tshark starts only after the old
one exited (two tsharks would hold twice the memory), its dumpcap holding the
packets in the kernel's capture buffer meanwhile, and skips every packet up
to the last one the old capture delivered. All packets go to the same
sessionizer, in order, each once, so connections carry over. What is lost is
what tshark itself needs state for: a message whose segments straddle the
handover.

``stop(drain_s)`` waits the same way for the rows up to the moment of the
call, so an interrupted agent reports what it had captured.
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
# tshark delivering no row for this long has no backlog left to deliver
# (long enough that a busy machine descheduling tshark is not taken for it).
IDLE_S = 1.0
# The longest an old capture may take to catch up with the end of the overlap.
HANDOVER_MAX_S = 30.0
# On SIGINT/SIGTERM, how long tshark may take to read what was captured
# before the signal.
STOP_DRAIN_S = 10.0
# Progress (timestamp of the last row) is noted every this many rows, not on
# every row: parsing the timestamp twice per packet would show on the hot path.
_NOTE_EVERY_ROWS = 100
# _last_row_at of a tshark that has not delivered its first row: starting
# up takes it a second or more, which is not idling.
_WAITING = float("inf")
_CHECK_EVERY_ROWS = 500
_REORDER_US = 1000


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
        # Orders stop() against a handover taking the next capture into use.
        self._lock = threading.Lock()
        # Capture timestamp of the latest row noted, and when it was read.
        self._last_ts_us = 0
        self._last_row_at = time.monotonic()

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

    def stop(self, drain_s: float = 0.0) -> None:
        """Stop capturing; with ``drain_s``, first wait (that long at most) until
        the rows of every packet captured before this call have been read."""
        if drain_s > 0 and not self._stopping.is_set():
            self.wait_caught_up(int(time.time() * 1_000_000), drain_s)
        with self._lock:
            self._stopping.set()
            nxt = self._next
        self.current.stop()
        if nxt is not None:
            nxt.stop()

    def wait_caught_up(self, until_us: int, timeout_s: float) -> bool:
        """Wait until a row stamped ``until_us`` or later was read, or tshark idles."""
        deadline = time.monotonic() + timeout_s
        while True:
            now = time.monotonic()
            if self._last_ts_us >= until_us or now - self._last_row_at >= IDLE_S:
                return True
            if now >= deadline:
                return False
            time.sleep(0.05)

    def _note(self, cols: list[str]) -> None:
        with contextlib.suppress(ValueError, IndexError):
            # The highest, not the latest: `-i any` interleaves CPUs' packets
            # a few µs out of order.
            self._last_ts_us = max(self._last_ts_us, parse_ts_us(cols[c.TS]))
        self._last_row_at = time.monotonic()

    def __iter__(self) -> Iterator[list[str]]:
        n = 0
        rows: Iterator[list[str]] = iter(self.current)
        nxt: LiveCapture | None = None
        while True:
            cols = next(rows, None)
            if cols is None:
                if nxt is None:
                    return
                # The old tshark has delivered everything and exited: only now
                # does the new one start, on the packets its dumpcap held; it
                # skips what the old one delivered.
                self._retire(self.current)
                nxt.start_tshark()
                with self._lock:
                    self.current, self._next = nxt, None
                nxt = None
                self._last_row_at = _WAITING
                self.rotations += 1
                rows = self._after(iter(self.current), self._last_ts_us)
                continue
            n += 1
            if nxt is not None:
                self._note(cols)
            elif n % _NOTE_EVERY_ROWS == 0 or self._last_row_at == _WAITING:
                self._note(cols)
                if (
                    n % _CHECK_EVERY_ROWS == 0
                    and not self._stopping.is_set()
                    and _rss_bytes(self.current.rows.proc.pid) > self.tshark_rss_limit
                ):
                    nxt = self._begin()
            yield cols

    def _begin(self) -> LiveCapture | None:
        # No row is read while the new capture starts: that is not tshark
        # idling, and a stop() meanwhile must still wait for the rows.
        self._last_row_at = _WAITING
        try:
            return self._start_next()
        finally:
            self._last_row_at = time.monotonic()

    def _start_next(self) -> LiveCapture | None:
        try:
            nxt = self._start(False)
        except Exception as exc:  # a failed rotation must not end a working capture
            log.warning("tshark rotation: new capture failed to start: %s", exc)
            return None
        if not nxt.wait_capturing(self.start_timeout_s):
            log.warning("tshark rotation: new capture did not start; keeping the old one")
            nxt.stop()
            return None
        with self._lock:
            if self._stopping.is_set():  # stop() came while the new one started
                nxt.stop()
                return None
            self._next = nxt
        # The new capture captures from here on (wait_capturing allows for
        # dumpcap's settling); it starts after the last packet the old one
        # delivered.
        end_us = int(time.time() * 1_000_000)
        old = self.current

        def end_old() -> None:
            if not self.wait_caught_up(end_us, HANDOVER_MAX_S):
                log.warning(
                    "tshark rotation: old tshark still %.1f s behind after %.0f s; stopping it",
                    (end_us - self._last_ts_us) / 1e6,
                    HANDOVER_MAX_S,
                )
            old.stop()

        threading.Thread(target=end_old, name="flowprobe-handover", daemon=True).start()
        log.info("tshark rotation: tshark passed %d MB", self.tshark_rss_limit >> 20)
        return nxt

    @staticmethod
    def _after(rows: Iterator[list[str]], delivered_us: int) -> Iterator[list[str]]:
        """The new capture's rows past the last one the old capture delivered.

        Checked only until a row is ``_REORDER_US`` past it (``-i any``
        interleaves CPUs' packets by µs, not more): every later packet's
        timestamp would otherwise be parsed twice for the capture's life.
        """
        for cols in rows:
            try:
                ts = parse_ts_us(cols[c.TS])
            except (ValueError, IndexError):
                yield cols
                continue
            if ts <= delivered_us:
                continue  # the old capture delivered it
            yield cols
            if ts > delivered_us + _REORDER_US:
                break
        yield from rows

    def _retire(self, live: LiveCapture) -> None:
        live.stop()
        counts = live.capture_counts()
        if counts is not None:
            self._received += counts[0]
            self._dropped += counts[1]
