"""A second dumpcap writing a ring of pcap files: the last minute or so of the node's capture.

The live path (``dumpcap -w - | tshark``) keeps no packets; this one keeps
them, for a while. dumpcap bounds its own ring (``-b files:N`` deletes the
oldest file as it opens a new one, ``-b filesize``/``-b duration`` close a
file), so the ring costs one more kernel capture and sequential writes to
the page cache, and nothing in Python per packet (docs/forensics.md).

dumpcap writes a file through a buffer it empties only when full or when it
closes the file, so at low rates the newest packets are in memory, not on
disk. Short files (``-b duration``, default 2 s; dumpcap closes them on
time even without traffic) bound that delay, and a cut waits for it.
"""

from __future__ import annotations

import contextlib
import logging
import subprocess
import threading
import time
from collections.abc import Sequence
from pathlib import Path

from flowprobe.agent.capture.tshark import (
    CaptureError,
    Tools,
    _StderrTail,
    explain_dumpcap_error,
    interrupt,
)
from flowprobe.agent.config import ForensicsConfig

log = logging.getLogger("flowprobe.agent.forensics")

RING_PREFIX = "ring-"
# dumpcap writes at most one packet past a file's size limit before it
# rotates; a bound on the ring must allow for it.
MAX_PACKET_BYTES = 65535 + 32


def ring_files(directory: Path) -> list[Path]:
    """Ring files, oldest first (by last write: a file holds packets up to its mtime)."""
    found = []
    for p in directory.glob(f"{RING_PREFIX}*.pcap"):
        with contextlib.suppress(FileNotFoundError):  # rotated away meanwhile
            found.append((p.stat().st_mtime_ns, p))
    return [p for _, p in sorted(found)]


class CaptureRing:
    """One dumpcap ring at a time; restarted when the capture's scope changes.

    Files of an earlier run (a different filter) stay until the newer run's
    files push the total past the ring's bound (``prune``), so a change of
    scope does not erase the minutes before it.
    """

    def __init__(self, tools: Tools, directory: Path, config: ForensicsConfig) -> None:
        if tools.dumpcap is None:
            raise CaptureError(
                "dumpcap not found: install it (Debian/Ubuntu: apt-get install tshark)"
            )
        self.dumpcap = tools.dumpcap
        self.directory = directory
        self.config = config
        self.proc: subprocess.Popen[bytes] | None = None
        self._stderr: _StderrTail | None = None
        self.key: tuple[tuple[str, ...], str | None] | None = None
        self.run = ""
        self.restarts = 0
        self.pruned = 0
        # follow() and stop() run on the caller's thread, check() on the forensics thread.
        self._lock = threading.RLock()
        self.error: str | None = None
        directory.mkdir(parents=True, exist_ok=True)

    def args(self, interfaces: Sequence[str], bpf: str | None, run: str) -> list[str]:
        c = self.config
        args = [self.dumpcap, "-n", "-P", "-s", "65535"]
        if bpf:
            args += ["-f", bpf]
        for iface in interfaces:
            args += ["-i", iface]
        # filesize is in kB; 1000 of them stay under a MiB whether dumpcap
        # counts kB as 1000 or 1024 bytes.
        args += [
            "-b",
            f"filesize:{c.ring_file_mb * 1000}",
            "-b",
            f"files:{c.ring_files}",
            "-b",
            f"duration:{c.ring_file_seconds}",
            "-w",
            str(self.directory / f"{RING_PREFIX}{run}.pcap"),
        ]
        return args

    def follow(self, interfaces: Sequence[str], bpf: str | None) -> None:
        """Capture ``interfaces`` through ``bpf``; a no-op when that is what runs already."""
        key = (tuple(interfaces), bpf)
        with self._lock:
            if key == self.key and self.alive():
                return
            self._stop()
            self._spawn(key)
            self.restarts += 1

    def _spawn(self, key: tuple[tuple[str, ...], str | None]) -> None:
        self.key = key
        # Runs sort by name in start order; dumpcap appends _NNNNN_TIME.
        self.run = f"{time.time_ns():020d}"
        self.proc = subprocess.Popen(
            self.args(key[0], key[1], self.run),
            stdin=subprocess.DEVNULL,
            stdout=subprocess.DEVNULL,
            stderr=subprocess.PIPE,
            start_new_session=True,
        )
        self._stderr = _StderrTail(self.proc.stderr)
        self.error = None

    def alive(self) -> bool:
        return self.proc is not None and self.proc.poll() is None

    def wait_capturing(self, timeout: float) -> bool:
        """Whether dumpcap captures, ``timeout`` seconds at most."""
        tail = self._stderr
        return tail is not None and tail.wait_captures(timeout, self.alive)

    def check(self) -> str | None:
        """dumpcap's reason if the ring died (it is restarted on the next ``follow``)."""
        with self._lock:
            return self._check()

    def _check(self) -> str | None:
        proc = self.proc
        if proc is not None and proc.poll() is not None:
            err = self._stderr.join() if self._stderr is not None else ""
            self.error = explain_dumpcap_error(err) or f"dumpcap exited with {proc.returncode}"
            log.warning("forensics ring: %s", self.error)
            self.proc = None
            self.key = None
        return self.error

    def prune(self) -> int:
        """Delete files of earlier runs (before a change of scope), oldest first, while
        the ring is over its bound; how many went."""
        files = ring_files(self.directory)
        sizes = {p: _size(p) for p in files}
        total = sum(sizes.values())
        current = f"{RING_PREFIX}{self.run}_"
        gone = 0
        for p in files:
            if total <= self.config.ring_bytes:
                break
            if p.name.startswith(current):
                continue  # dumpcap bounds its own run
            with contextlib.suppress(FileNotFoundError):
                p.unlink()
            total -= sizes[p]
            gone += 1
        self.pruned += gone
        return gone

    def stop(self) -> None:
        with self._lock:
            self._stop()

    def _stop(self) -> None:
        proc = self.proc
        self.proc = None
        self.key = None
        if proc is not None:
            interrupt(proc)


def _size(p: Path) -> int:
    try:
        return p.stat().st_size
    except FileNotFoundError:
        return 0
