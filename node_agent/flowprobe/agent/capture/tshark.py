"""Run tshark (and dumpcap for live capture) and hand back one column list per packet.

pyshark is the capture front: it finds tshark and dumpcap, checks tshark's
version and lists interfaces. Per-packet work stays out of pyshark's object
model (10-150x slower than the dissection itself, see docs/capture.md):
tshark dissects and prints only the columns the parsers read, and live capture
reads ``dumpcap -w -`` from a pipe so nothing is spooled to disk.
"""

from __future__ import annotations

import contextlib
import os
import queue
import re
import shutil
import signal
import subprocess
import threading
import time
from collections import deque
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass
from pathlib import Path

from pyshark.tshark import tshark as pyshark_tshark

from flowprobe.agent.capture.columns import ColumnLayout

# Dissectors whose output the agent never reads but which cost tshark time on
# common payloads (JSON bodies alone cost about 25%, see docs/capture.md).
DISABLED_PROTOCOLS = ("json", "xml", "media", "png", "image-jfif", "image-gif", "data-text-lines")

CAPTURE_BUFFER_MB = 32


class CaptureError(Exception):
    """tshark or dumpcap could not run or read the input; the message says why."""


@dataclass(frozen=True)
class Tools:
    tshark: str
    dumpcap: str | None
    version: str

    @classmethod
    def find(cls) -> Tools:
        """Locate tshark (``FLOWPROBE_TSHARK`` overrides pyshark's search) and dumpcap."""
        override = os.environ.get("FLOWPROBE_TSHARK")
        if override and not os.path.exists(override):
            raise CaptureError(
                f"tshark not found at {override}: install it (Debian/Ubuntu: apt-get install tshark)"
            )
        try:
            tshark = pyshark_tshark.get_process_path(tshark_path=override)
        except pyshark_tshark.TSharkNotFoundException as exc:
            raise CaptureError(
                "tshark not found: install it (Debian/Ubuntu: apt-get install tshark)"
            ) from exc
        if not os.access(tshark, os.X_OK):
            raise CaptureError(f"tshark at {tshark} is not executable")
        dumpcap = shutil.which("dumpcap") or (
            str(Path(tshark).with_name("dumpcap"))
            if Path(tshark).with_name("dumpcap").exists()
            else None
        )
        version = str(pyshark_tshark.get_tshark_version(tshark))
        return cls(tshark=tshark, dumpcap=dumpcap, version=version)


@dataclass
class TsharkOptions:
    layout: ColumnLayout
    # tshark's -M (AgentConfig.session_reset_packets says why).
    session_reset_packets: int
    # tshark "decode as" rules, e.g. ("tcp.port==6380", "resp").
    decode_as: Sequence[tuple[str, str]] = ()

    def tshark_args(self, tools: Tools, source: str, live: bool = False) -> list[str]:
        args = [
            tools.tshark,
            "-n",
            "-Q",
            "-r",
            source,
            "-M",
            str(self.session_reset_packets),
            "-T",
            "tabs",
            # The built-in time column as seconds since the epoch.
            "-t",
            "e",
            "-o",
            self.layout.tshark_option(),
            # Reassembled messages are what the parsers want.
            "-o",
            "tcp.desegment_tcp_streams:TRUE",
            "-o",
            "tcp.analyze_sequence_numbers:TRUE",
            "-o",
            "tcp.calculate_timestamps:FALSE",
            "-Y",
            "tcp or udp",
        ]
        for proto in DISABLED_PROTOCOLS:
            args += ["--disable-protocol", proto]
        for selector, proto in self.decode_as:
            args += ["-d", f"{selector},{proto}"]
        if live:
            # Hand each row over at once instead of when stdio's 4 KB buffer
            # fills, which could take minutes on a quiet node. Not when
            # reading files (also through a pipe, sharded): a write per row
            # cost tshark 30-70% more CPU on the bench pcap.
            args.append("-l")
        return args


def dumpcap_args(
    tools: Tools, interfaces: Sequence[str], bpf: str | None, snaplen: int
) -> list[str]:
    if tools.dumpcap is None:
        raise CaptureError("dumpcap not found: install it (Debian/Ubuntu: apt-get install tshark)")
    # Not -q: dumpcap's closing lines carry the received/dropped counts.
    # A 32 MB kernel buffer (default 2) rides out bursts and a tshark
    # replacement (RotatingCapture) without drops.
    args = [tools.dumpcap, "-s", str(snaplen), "-B", str(CAPTURE_BUFFER_MB)]
    if bpf:
        # A filter before the first -i applies to every interface.
        args += ["-f", bpf]
    for iface in interfaces:
        args += ["-i", iface]
    args += ["-w", "-"]
    return args


# dumpcap says "Capturing on" a moment before its capture takes effect:
# packets sent right after the line were missed in about half the tries on
# loopback, none after 0.1 s (dumpcap 4.0.17). A capture counts as started
# this long after the line.
CAPTURE_SETTLE_S = 0.5


class _StderrTail:
    """Drains a process's stderr so it can never block, keeping the last lines."""

    def __init__(self, stream: object, lines: int = 20) -> None:
        self.lines: deque[str] = deque(maxlen=lines)
        # Set on dumpcap's "Capturing on ..." line: its interfaces are open.
        self.capturing = threading.Event()
        self._capturing_at = 0.0
        self._thread = threading.Thread(target=self._run, args=(stream,), daemon=True)
        self._thread.start()

    def _run(self, stream: object) -> None:
        for raw in iter(stream.readline, b""):  # type: ignore[attr-defined]
            line = raw.decode("utf-8", "replace").rstrip()
            if line and "Running as user" not in line:
                self.lines.append(line)
            if line.startswith("Capturing on"):
                self._capturing_at = time.monotonic()
                self.capturing.set()

    def captures(self) -> bool:
        """dumpcap said "Capturing on" at least CAPTURE_SETTLE_S ago."""
        return self.capturing.is_set() and time.monotonic() - self._capturing_at >= CAPTURE_SETTLE_S

    def wait_captures(self, timeout: float, alive: Callable[[], bool]) -> bool:
        """Whether dumpcap captures within ``timeout`` seconds while ``alive()``."""
        deadline = time.monotonic() + timeout
        while alive() and time.monotonic() < deadline:
            if self.capturing.wait(0.1):
                time.sleep(max(0.0, self._capturing_at + CAPTURE_SETTLE_S - time.monotonic()))
                return alive()
        return self.captures()

    def join(self) -> str:
        self._thread.join(timeout=2)
        return "\n".join(self.lines)


def split_row(raw: bytes) -> list[str]:
    """One line of tshark's ``-T tabs`` output as its columns."""
    return raw.decode("utf-8", "replace").rstrip("\n").split("\t")


class TsharkRows:
    """Iterate tshark's rows; after iteration, ``error`` holds a one-line reason or None."""

    def __init__(self, args: Sequence[str], stdin: int | None = None) -> None:
        self.args = list(args)
        self.error: str | None = None
        self.returncode: int | None = None
        self.proc = subprocess.Popen(
            self.args,
            stdin=stdin if stdin is not None else subprocess.DEVNULL,
            stdout=subprocess.PIPE,
            stderr=subprocess.PIPE,
            bufsize=1 << 20,
            start_new_session=True,
        )
        self._stderr = _StderrTail(self.proc.stderr)

    def __iter__(self) -> Iterator[list[str]]:
        assert self.proc.stdout is not None
        for raw in self.proc.stdout:
            yield split_row(raw)
        self.finish()

    def finish(self) -> None:
        """Wait for tshark to end after its output was read; set ``error``."""
        self.returncode = self.proc.wait()
        tail = self._stderr.join()
        if self.returncode != 0 or "cut short" in tail or "appears to be damaged" in tail:
            self.error = _summarise(tail) or f"tshark exited with {self.returncode}"

    def stop(self) -> None:
        if self.proc.poll() is None:
            with contextlib.suppress(ProcessLookupError):
                os.killpg(self.proc.pid, signal.SIGTERM)
            try:
                self.proc.wait(timeout=5)
            except subprocess.TimeoutExpired:
                os.killpg(self.proc.pid, signal.SIGKILL)
                self.proc.wait()


def _summarise(stderr: str) -> str:
    lines = [ln.strip() for ln in stderr.splitlines() if ln.strip()]
    for ln in lines:
        if ln.startswith("tshark:") or "cut short" in ln or "isn't a capture file" in ln:
            return ln.removeprefix("tshark: ")
    return lines[-1] if lines else ""


def read_file(tools: Tools, path: str, options: TsharkOptions) -> TsharkRows:
    """Rows of an offline pcap/pcapng file (gzip-compressed too: tshark reads it as is)."""
    _check_readable(path)
    return TsharkRows(options.tshark_args(tools, path))


def read_sharded(
    tools: Tools, path: str, options: TsharkOptions, shards: int
) -> TsharkRows | ShardedRows:
    """``read_file``, or with ``shards`` > 1 and a file that is not compressed,
    that many tshark processes, each dissecting its share of the connections."""
    _check_readable(path)
    if shards > 1:
        with open(path, "rb") as f:
            compressed = f.read(2) == b"\x1f\x8b"
        if not compressed:
            return ShardedRows(tools, path, options, shards)
    return TsharkRows(options.tshark_args(tools, path))


def _check_readable(path: str) -> None:
    if not os.path.exists(path):
        raise CaptureError(f"{path}: no such file")
    if not os.access(path, os.R_OK):
        raise CaptureError(f"{path}: permission denied")


def shard_filter(shard: int, shards: int) -> str:
    """The BPF filter of one of ``shards`` shares of the traffic.

    Both directions of a connection land in the same share: the hash adds the
    two IPv4 addresses and the two ports (a sum does not care about
    direction); the ports are halved so that a client whose address and port
    both count up (as generated captures do) does not cancel out. Share 0 is
    everything the others do not take (IPv6, fragments, other protocols), so
    nothing is lost.
    """

    def share(k: int) -> str:
        return " or ".join(
            f"({l4} and (ip[12:4] + ip[16:4] + (({l4}[0:2] + {l4}[2:2]) >> 1)) % {shards} = {k})"
            for l4 in ("tcp", "udp")
        )

    if shard == 0:
        return f"not ({' or '.join(share(k) for k in range(1, shards))})"
    return share(shard)


class ShardedRows:
    """``tcpdump -r FILE -w - SHARE | tshark -r -`` per share, read in parallel.

    tshark dissects on one core; with more cores, shares of the connections
    (``shard_filter``) go to separate tshark processes. tcpdump selects a
    share with a BPF filter for a fraction of what tshark spends per packet.
    Rows come in batches tagged with their share, because each share needs its
    own sessionizer: the shares advance through capture time at their own pace.
    """

    def __init__(self, tools: Tools, path: str, options: TsharkOptions, shards: int) -> None:
        tcpdump = shutil.which("tcpdump") or "/usr/bin/tcpdump"
        if not os.access(tcpdump, os.X_OK):
            raise CaptureError(
                "tcpdump not found: install it (Debian/Ubuntu: apt-get install tcpdump)"
            )
        self.shards = shards
        self.error: str | None = None
        self.splitters: list[subprocess.Popen[bytes]] = []
        self.rows: list[TsharkRows] = []
        for k in range(shards):
            # Nanosecond output keeps the timestamps of pcapng files as they
            # are; tshark's RTTs would otherwise differ by a microsecond.
            splitter = subprocess.Popen(
                [
                    tcpdump,
                    "--time-stamp-precision=nano",
                    "-r",
                    path,
                    "-w",
                    "-",
                    shard_filter(k, shards),
                ],
                stdout=subprocess.PIPE,
                stderr=subprocess.PIPE,
                start_new_session=True,
            )
            assert splitter.stdout is not None
            self.rows.append(
                TsharkRows(options.tshark_args(tools, "-"), stdin=splitter.stdout.fileno())
            )
            splitter.stdout.close()
            self.splitters.append(splitter)
        self._splitter_err = [_StderrTail(p.stderr) for p in self.splitters]

    def batches(self) -> Iterator[tuple[int, list[bytes]]]:
        """(share, raw tshark lines) as the shares produce them."""
        batches: queue.Queue[tuple[int, list[bytes] | None]] = queue.Queue(maxsize=64)

        def pump(k: int) -> None:
            stdout = self.rows[k].proc.stdout
            assert stdout is not None
            for lines in iter(lambda: stdout.readlines(1 << 16), []):
                batches.put((k, lines))
            batches.put((k, None))

        readers = [
            threading.Thread(target=pump, args=(k,), daemon=True) for k in range(self.shards)
        ]
        for t in readers:
            t.start()
        running = self.shards
        while running:
            k, lines = batches.get()
            if lines is None:
                running -= 1
            else:
                yield k, lines
        for k, rows in enumerate(self.rows):
            rows.finish()
            splitter_rc = self.splitters[k].wait()
            tail = self._splitter_err[k].join()
            if splitter_rc != 0 or "truncated" in tail:
                self.error = self.error or _summarise(tail) or f"tcpdump exited with {splitter_rc}"
            self.error = self.error or rows.error

    def stop(self) -> None:
        for splitter in self.splitters:
            if splitter.poll() is None:
                with contextlib.suppress(ProcessLookupError):
                    os.killpg(splitter.pid, signal.SIGTERM)
        for rows in self.rows:
            rows.stop()


class LiveCapture:
    """``dumpcap -w - | tshark -r -``: dumpcap holds the capture privileges and
    drops nothing into a temporary file; tshark only dissects.

    With ``start_tshark=False`` only dumpcap starts; its packets wait in the
    pipe and the kernel's capture buffer until ``start_tshark()`` (the
    RotatingCapture starts a new tshark only after the old one exited, so that
    two tsharks never hold memory at once).
    """

    def __init__(
        self,
        tools: Tools,
        interfaces: Sequence[str],
        options: TsharkOptions,
        bpf: str | None = None,
        snaplen: int = 65535,
        start_tshark: bool = True,
    ) -> None:
        self.dumpcap = subprocess.Popen(
            dumpcap_args(tools, interfaces, bpf, snaplen),
            stdout=subprocess.PIPE,
            stderr=subprocess.PIPE,
            start_new_session=True,
        )
        self._dumpcap_err = _StderrTail(self.dumpcap.stderr)
        self._tshark_args = options.tshark_args(tools, "-", live=True)
        self._rows: TsharkRows | None = None
        if start_tshark:
            self.start_tshark()

    def start_tshark(self) -> None:
        assert self.dumpcap.stdout is not None
        self._rows = TsharkRows(self._tshark_args, stdin=self.dumpcap.stdout.fileno())
        # tshark owns the read end now; keeping ours open would hide EOF.
        self.dumpcap.stdout.close()

    @property
    def rows(self) -> TsharkRows:
        if self._rows is None:
            raise RuntimeError("tshark has not been started")
        return self._rows

    def __iter__(self) -> Iterator[list[str]]:
        yield from self.rows
        if self.dumpcap.poll() not in (None, 0):
            self.rows.error = explain_dumpcap_error(self._dumpcap_err.join()) or self.rows.error

    def capturing(self) -> bool:
        """dumpcap captures (it said so on stderr, CAPTURE_SETTLE_S ago)."""
        return self._dumpcap_err.captures()

    def wait_capturing(self, timeout: float) -> bool:
        """Whether dumpcap captures within ``timeout`` seconds; from then on no
        packet is lost to the agent's own start-up."""
        return self._dumpcap_err.wait_captures(timeout, lambda: self.dumpcap.poll() is None)

    def capture_counts(self) -> tuple[int, int] | None:
        """(received, dropped) from dumpcap's closing report, once it has exited."""
        if self.dumpcap.poll() is None:
            return None
        return dumpcap_counts(self._dumpcap_err.join())

    def dumpcap_error(self) -> str | None:
        if self.dumpcap.poll() not in (None, 0):
            return explain_dumpcap_error(self._dumpcap_err.join())
        return None

    def stop(self) -> None:
        interrupt(self.dumpcap)
        if self._rows is None:
            return
        # tshark ends by itself once dumpcap's pipe closes; give it time to
        # flush its last rows before forcing it.
        try:
            self._rows.proc.wait(timeout=10)
        except subprocess.TimeoutExpired:
            self._rows.stop()


def interrupt(proc: subprocess.Popen[bytes]) -> None:
    """SIGINT a dumpcap's process group (it then closes its output cleanly and reports
    its counts); SIGKILL after five seconds."""
    if proc.poll() is None:
        with contextlib.suppress(ProcessLookupError):
            os.killpg(proc.pid, signal.SIGINT)
        try:
            proc.wait(timeout=5)
        except subprocess.TimeoutExpired:
            os.killpg(proc.pid, signal.SIGKILL)
            proc.wait()


_DROPS = re.compile(r"received/dropped on interface '[^']*': (\d+)/(\d+)")


def dumpcap_counts(stderr: str) -> tuple[int, int] | None:
    """(received, dropped) summed over the interfaces of dumpcap's closing report."""
    counts = [(int(m.group(1)), int(m.group(2))) for m in _DROPS.finditer(stderr)]
    if not counts:
        return None
    return sum(r for r, _ in counts), sum(d for _, d in counts)


def explain_dumpcap_error(stderr: str) -> str:
    text = " ".join(stderr.split())
    if "permission" in text.lower() or "Operation not permitted" in text:
        return (
            "dumpcap has no capture permission: run as root or grant it CAP_NET_RAW and "
            f"CAP_NET_ADMIN (setcap cap_net_raw,cap_net_admin+eip $(which dumpcap)). dumpcap said: {text}"
        )
    if "No such device" in text or "doesn't exist" in text:
        return f"capture interface not found: {text}"
    return text
