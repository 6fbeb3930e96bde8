"""Freeze the ring's packets of one connection into a named pcap when something goes wrong.

    capture thread: observe(exchange) -> trigger? -> name now, on the exchange
    export process thread: freeze_anomaly(connection) <- analyze/ (an anomaly alert)
    forensics thread: once the window has passed -> cut the ring -> frozen/NAME

The exchange carries the pcap's name (``flowprobe.pcap.name``) and its
connection's Community ID (``flowprobe.pcap.stream_id``) as it leaves for
the exporters, so the span points at a file that appears
``seconds_after`` (plus a second for dumpcap to write) later. Triggers on
one connection while its cut is pending share that cut (its window grows);
beyond ``max_per_minute`` cuts a trigger is only counted.
"""

from __future__ import annotations

import base64
import contextlib
import hashlib
import ipaddress
import logging
import secrets
import shutil
import struct
import subprocess
import tempfile
import threading
import time
from collections import Counter, deque
from collections.abc import Collection, Sequence
from dataclasses import dataclass
from pathlib import Path

from flowprobe.agent.capture.tshark import CaptureError, Tools
from flowprobe.agent.config import ForensicsConfig, ForensicsTrigger
from flowprobe.agent.forensics.ring import CaptureRing, ring_files
from flowprobe.agent.forensics.store import PcapStore
from flowprobe.agent.parse.messages import AttrValue
from flowprobe.agent.sessionize.records import Endpoints, Exchange, Outcome

log = logging.getLogger("flowprobe.agent.forensics")

PCAP_NAME = "flowprobe.pcap.name"
PCAP_STREAM_ID = "flowprobe.pcap.stream_id"
PCAP_TRIGGER = "flowprobe.pcap.trigger"

# After a window ends, its last packets take a moment to reach the ring (the
# kernel's capture buffer, dumpcap's own); the cut waits this long.
_GRACE_S = 1.0
_IDLE_S = 1.0
_OUTCOMES: dict[Outcome, ForensicsTrigger] = {
    Outcome.ERROR: "error",
    Outcome.RESET: "reset",
    Outcome.TIMEOUT: "timeout",
}
# Only what the 4-tuple filter needs is dissected while cutting: the ring
# holds every protocol the node carries, and dissecting it all costs ~3x.
_CUT_PROTOCOLS = "frame,eth,ethertype,sll,vlan,ip,ipv6,tcp,udp"
_PROTO_NUMBERS = {"tcp": 6, "udp": 17}


def community_id(ep: Endpoints) -> str:
    """The connection's Community ID v1 (seed 0), as Zeek, Suricata and Wireshark compute it.

    ``tshark --enable-protocol communityid -Y 'communityid == "..."'`` finds
    the connection in any capture, not only in the frozen pcap.
    """
    a, b = ipaddress.ip_address(ep.client_address), ipaddress.ip_address(ep.server_address)
    pa, pb = ep.client_port, ep.server_port
    if (a.packed, pa) > (b.packed, pb):
        a, b, pa, pb = b, a, pb, pa
    proto = _PROTO_NUMBERS.get(ep.transport, 0)
    data = struct.pack("!H", 0) + a.packed + b.packed + struct.pack("!BBHH", proto, 0, pa, pb)
    return "1:" + base64.b64encode(hashlib.sha1(data, usedforsecurity=False).digest()).decode()


def display_filter(ep: Endpoints) -> str:
    """tshark display filter for both directions of one connection."""
    l3 = "ipv6" if ":" in ep.client_address else "ip"
    l4 = ep.transport if ep.transport in _PROTO_NUMBERS else "tcp"

    def way(sa: str, sp: int, da: str, dp: int) -> str:
        return f"({l3}.src=={sa} && {l4}.srcport=={sp} && {l3}.dst=={da} && {l4}.dstport=={dp})"

    return (
        way(ep.client_address, ep.client_port, ep.server_address, ep.server_port)
        + " || "
        + way(ep.server_address, ep.server_port, ep.client_address, ep.client_port)
    )


def _tool(tools: Tools, name: str) -> str:
    found = shutil.which(name) or str(Path(tools.tshark).with_name(name))
    if not Path(found).exists():
        raise CaptureError(f"{name} not found: install it (Debian/Ubuntu: apt-get install tshark)")
    return found


@dataclass
class _Cut:
    name: str
    endpoints: Endpoints
    trigger: str
    start_us: int
    end_us: int


class Forensics:
    """The ring, the pending cuts and the thread that makes them (docs/forensics.md)."""

    def __init__(self, tools: Tools, config: ForensicsConfig) -> None:
        self.config = config
        self.tools = tools
        self.editcap = _tool(tools, "editcap")
        self.mergecap = _tool(tools, "mergecap")
        root = Path(config.directory)
        self.ring = CaptureRing(tools, root / "ring", config)
        self.store = PcapStore(root / "frozen", config)
        self._work = root / "work"
        self._work.mkdir(parents=True, exist_ok=True)
        # triggered, merged (joined a pending cut), suppressed (rate), frozen,
        # empty (no packets left in the ring), failed; written under _lock or
        # by the forensics thread only.
        self.counts: Counter[str] = Counter()
        self._pending: dict[Endpoints, _Cut] = {}
        self._recent: deque[float] = deque()
        self._lock = threading.Lock()
        self._wake = threading.Event()
        self._closing = threading.Event()
        self._thread = threading.Thread(target=self._run, name="flowprobe-forensics", daemon=True)
        self._failed = False

    # -- capture thread ---------------------------------------------------

    def trigger(self, ex: Exchange, triggers: Collection[str]) -> str | None:
        """Which of ``triggers`` this exchange sets off, if any."""
        if ex.security_events and "alert" in triggers:
            return "alert"
        t = _OUTCOMES.get(ex.outcome)
        return t if t is not None and t in triggers else None

    def observe(self, ex: Exchange, triggers: Collection[str] | None = None) -> None:
        """Freeze the exchange's connection if it sets off a trigger; name the pcap on it."""
        reason = self.trigger(ex, self.config.triggers if triggers is None else triggers)
        if reason is None:
            return
        ex.attrs.update(self.pcap_attributes(ex.endpoints, ex.start_us, ex.end_us, reason))

    def freeze_anomaly(
        self,
        ep: Endpoints,
        start_us: int,
        end_us: int,
        triggers: Collection[str] | None = None,
    ) -> dict[str, AttrValue]:
        """The analyzer's hook (analyze/stage.py): an anomaly alert's connection, frozen
        when the ``anomaly`` trigger is on (``triggers``, as in :meth:`observe`)."""
        if "anomaly" not in (self.config.triggers if triggers is None else triggers):
            return {}
        return self.pcap_attributes(ep, start_us, end_us, "anomaly")

    def pcap_attributes(
        self, ep: Endpoints, start_us: int, end_us: int, reason: str
    ) -> dict[str, AttrValue]:
        """:meth:`freeze`, as the attributes that name the pcap (none when suppressed)."""
        name = self.freeze(ep, start_us, end_us, reason)
        if name is None:
            return {}
        return {PCAP_NAME: name, PCAP_STREAM_ID: community_id(ep), PCAP_TRIGGER: reason}

    def freeze(self, ep: Endpoints, start_us: int, end_us: int, reason: str) -> str | None:
        """Schedule a cut of ``ep``'s packets around [start, end]; the pcap's name,
        or None when the rate limit suppressed it. Any alert source may call this."""
        with self._lock:
            self.counts["triggered"] += 1
            cut = self._pending.get(ep)
            if cut is not None:
                cut.start_us = min(cut.start_us, start_us)
                cut.end_us = max(cut.end_us, end_us)
                self.counts["merged"] += 1
                return cut.name
            now = time.monotonic()
            while self._recent and now - self._recent[0] > 60:
                self._recent.popleft()
            if len(self._recent) >= self.config.max_per_minute:
                self.counts["suppressed"] += 1
                return None
            self._recent.append(now)
            stamp = time.strftime("%Y%m%dT%H%M%SZ", time.gmtime(end_us / 1e6))
            name = f"{stamp}-{reason}-{secrets.token_hex(4)}.pcap"
            self._pending[ep] = _Cut(name, ep, reason, start_us, end_us)
            log.debug(
                "freeze %s: %.3f s after the exchange ended", name, time.time() - end_us / 1e6
            )
        self._wake.set()
        return name

    # -- lifecycle --------------------------------------------------------

    def follow(self, interfaces: Sequence[str], bpf: str | None) -> None:
        """Keep the ring on this capture (restarts dumpcap only when it changes)."""
        self.ring.follow(interfaces, bpf)

    def start(self) -> Forensics:
        self._thread.start()
        return self

    def close(self, timeout_s: float = 60.0) -> None:
        """Stop the ring, then cut everything pending from what it holds."""
        self.ring.stop()
        self._closing.set()
        self._wake.set()
        if self._thread.ident is not None:
            self._thread.join(timeout_s)

    # -- forensics thread -------------------------------------------------

    def _due(self, cut: _Cut) -> float:
        # By then dumpcap has closed (and so written) the file holding ``hi``.
        return self._hi(cut) + self.config.ring_file_seconds + _GRACE_S

    def _run(self) -> None:
        while True:
            closing = self._closing.is_set()
            now = time.time()
            with self._lock:
                # Out of _pending before cutting: a trigger during the cut
                # starts a new one rather than stretching a window already cut.
                ready = [c for c in self._pending.values() if closing or self._due(c) <= now]
                for cut in ready:
                    del self._pending[cut.endpoints]
                wait = min((self._due(c) - now for c in self._pending.values()), default=_IDLE_S)
            for cut in ready:
                self._cut_safely(cut)
            if closing:
                return
            self.ring.check()
            self.ring.prune()
            self._wake.wait(max(0.05, min(wait, _IDLE_S)))
            self._wake.clear()

    def _cut_safely(self, cut: _Cut) -> None:
        try:
            self.counts[self.cut(cut)] += 1
        except (OSError, subprocess.SubprocessError, CaptureError) as exc:
            self.counts["failed"] += 1
            if not self._failed:
                self._failed = True
                log.warning(
                    "forensics: cutting %s failed: %s (further failures are only counted)",
                    cut.name,
                    exc,
                )

    def _lo(self, cut: _Cut) -> float:
        return cut.start_us / 1e6 - self.config.seconds_before

    def _hi(self, cut: _Cut) -> float:
        return cut.end_us / 1e6 + self.config.seconds_after

    def cut(self, cut: _Cut) -> str:
        """Write ``cut``'s pcap from the ring files that cover its window: "frozen" or "empty"."""
        lo, hi = self._lo(cut), self._hi(cut)
        files = []
        for f in ring_files(self.ring.directory):
            with contextlib.suppress(FileNotFoundError):
                if f.stat().st_mtime >= lo:
                    files.append(f)
        with tempfile.TemporaryDirectory(dir=self._work) as tmp:
            # editcap selects by time without dissecting (cheap); a file
            # dumpcap is still writing ends in a partial packet, which
            # editcap reports and skips.
            parts = []
            for i, f in enumerate(files):
                part = Path(tmp, f"part{i:03d}.pcap")
                _run(
                    [
                        self.editcap,
                        "-F",
                        "pcap",
                        "-A",
                        f"{lo:.6f}",
                        "-B",
                        f"{hi:.6f}",
                        str(f),
                        str(part),
                    ]
                )
                if part.exists() and part.stat().st_size > 24:
                    parts.append(part)
            log.debug(
                "cut %s: window %.3f-%.3f, %d of %d ring files hold packets in it",
                cut.name,
                lo,
                hi,
                len(parts),
                len(files),
            )
            if not parts:
                return "empty"
            window = Path(tmp, "window.pcap")
            if len(parts) == 1:
                window = parts[0]
            else:
                _run(
                    [self.mergecap, "-a", "-F", "pcap", "-w", str(window), *map(str, parts)],
                    check=True,
                )
            out = Path(tmp, cut.name)
            _run(
                [
                    self.tools.tshark,
                    "-n",
                    "-Q",
                    "-r",
                    str(window),
                    "--disable-protocol",
                    "ALL",
                    "--enable-protocol",
                    _CUT_PROTOCOLS,
                    "-Y",
                    display_filter(cut.endpoints),
                    "-F",
                    "pcap",
                    "-w",
                    str(out),
                ],
                check=True,
            )
            if not out.exists() or out.stat().st_size <= 24:
                log.debug("cut %s: no packet of %s in the window", cut.name, cut.endpoints)
                return "empty"
            self.store.add(out, cut.name)
        return "frozen"

    def totals(self) -> dict[str, int]:
        """What forensics did so far, plus the store's evictions and the ring's prunes."""
        out = dict(self.counts)
        out["evicted"] = self.store.counts["evicted"]
        out["ring_pruned"] = self.ring.pruned
        return out


def _run(args: list[str], check: bool = False) -> None:
    # Own session: a Ctrl-C for the agent must not kill a cut its close still waits for.
    proc = subprocess.run(
        args, stdin=subprocess.DEVNULL, capture_output=True, timeout=120, start_new_session=True
    )
    if check and proc.returncode != 0:
        text = " ".join(proc.stderr.decode("utf-8", "replace").split())
        raise subprocess.SubprocessError(
            f"{Path(args[0]).name} exited with {proc.returncode}: {text[:300]}"
        )
