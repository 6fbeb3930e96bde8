"""A counting TCP forwarder, optionally across network namespaces.

The demo's agent runs in the node namespace, whose loopback is not the
machine's: the collector on 127.0.0.1:4317 is unreachable from there, and the
agent's ``/metrics`` is unreachable from Prometheus. A :class:`Forwarder`
listens in one namespace and connects in another, so neither side needs a
route or an address in the other's namespace, and nothing is added to the
machine's own network. It also counts the bytes it copies each way, which is
what the benchmark reports as OTLP bytes on the wire.

A socket belongs to the namespace of the thread that created it, whatever
thread uses it later, so the listening socket is created after a per-thread
``setns(2)`` and the outgoing ones after another; the calling thread is
switched back at once.

Library use::

    with Forwarder(("127.0.0.1", 4317), ("127.0.0.1", 4317), listen_netns="fp1a2b-node"):
        ...   # inside fp1a2b-node, 127.0.0.1:4317 now reaches the machine's collector

Command line (the benchmark runs it as a separate process so its copying
does not compete with the measured agent for the GIL)::

    python -m flowprobe.devenv.nsproxy --listen 127.0.0.1:0 --target 127.0.0.1:4317
    # prints {"port": N}, then {"up": .., "down": .., "connections": ..} on SIGTERM/SIGINT
"""

from __future__ import annotations

import argparse
import contextlib
import ctypes
import json
import os
import signal
import socket
import sys
import threading
from collections.abc import Iterator
from types import TracebackType
from typing import Self

CLONE_NEWNET = 0x40000000
_CHUNK = 1 << 16


class NetnsSwitchError(OSError):
    """setns(2) failed (not root, or the namespace does not exist)."""


def _setns(fd: int) -> None:
    libc = ctypes.CDLL(None, use_errno=True)
    if libc.setns(fd, CLONE_NEWNET) != 0:
        err = ctypes.get_errno()
        raise NetnsSwitchError(err, f"setns: {os.strerror(err)}")


@contextlib.contextmanager
def in_netns(name: str | None) -> Iterator[None]:
    """Run the block (this thread only) in the named namespace (``ip netns`` name)."""
    if name is None:
        yield
        return
    own = os.open("/proc/thread-self/ns/net", os.O_RDONLY)
    try:
        target = os.open(f"/run/netns/{name}", os.O_RDONLY)
        try:
            _setns(target)
        finally:
            os.close(target)
        try:
            yield
        finally:
            _setns(own)
    finally:
        os.close(own)


def _addr(text: str) -> tuple[str, int]:
    host, _, port = text.rpartition(":")
    return host or "127.0.0.1", int(port)


class Forwarder:
    """Copies every connection accepted at ``listen`` to a new one to ``target``.

    ``listen_netns`` / ``target_netns`` are ``ip netns`` names; ``None`` is
    the namespace of the calling process. Port 0 picks a free port
    (:attr:`port` after :meth:`start`).
    """

    def __init__(
        self,
        listen: tuple[str, int],
        target: tuple[str, int],
        *,
        listen_netns: str | None = None,
        target_netns: str | None = None,
    ) -> None:
        self.listen = listen
        self.target = target
        self.listen_netns = listen_netns
        self.target_netns = target_netns
        self.port = listen[1]
        self._lock = threading.Lock()
        self._up = 0
        self._down = 0
        self._connections = 0
        self._server: socket.socket | None = None
        self._open: set[socket.socket] = set()
        self._closed = threading.Event()

    # -- counters

    @property
    def bytes_up(self) -> int:
        """Bytes copied from accepted clients to the target (e.g. OTLP requests)."""
        with self._lock:
            return self._up

    @property
    def bytes_down(self) -> int:
        """Bytes copied back to the clients (e.g. OTLP responses)."""
        with self._lock:
            return self._down

    @property
    def connections(self) -> int:
        with self._lock:
            return self._connections

    def counts(self) -> dict[str, int]:
        with self._lock:
            return {"up": self._up, "down": self._down, "connections": self._connections}

    # -- lifecycle

    def start(self) -> Self:
        with in_netns(self.listen_netns):
            srv = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
        srv.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        try:
            srv.bind(self.listen)
            srv.listen(64)
        except OSError:
            srv.close()
            raise
        self.port = int(srv.getsockname()[1])
        self._server = srv
        threading.Thread(target=self._accept_loop, name="nsproxy-accept", daemon=True).start()
        return self

    def close(self) -> None:
        self._closed.set()
        srv, self._server = self._server, None
        if srv is not None:
            # shutdown() wakes the thread blocked in accept(); close() alone does not.
            with contextlib.suppress(OSError):
                srv.shutdown(socket.SHUT_RDWR)
            srv.close()
        with self._lock:
            conns = list(self._open)
        for s in conns:
            with contextlib.suppress(OSError):
                s.shutdown(socket.SHUT_RDWR)

    def __enter__(self) -> Self:
        return self.start()

    def __exit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        self.close()

    # -- copying

    def _accept_loop(self) -> None:
        srv = self._server
        assert srv is not None
        while not self._closed.is_set():
            try:
                client, _ = srv.accept()
            except OSError:
                return
            try:
                with in_netns(self.target_netns):
                    upstream = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
            except OSError:
                client.close()
                continue
            try:
                upstream.settimeout(5.0)
                upstream.connect(self.target)
                upstream.settimeout(None)
            except OSError:
                # Target down (a stopped collector): refuse as the target would.
                client.close()
                upstream.close()
                continue
            for s in (client, upstream):
                s.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
            with self._lock:
                self._connections += 1
                self._open.update((client, upstream))
            pair = _Pair(self, client, upstream)
            threading.Thread(target=pair.copy, args=(client, upstream, True), daemon=True).start()
            threading.Thread(target=pair.copy, args=(upstream, client, False), daemon=True).start()

    def _count(self, n: int, up: bool) -> None:
        with self._lock:
            if up:
                self._up += n
            else:
                self._down += n

    def _forget(self, *socks: socket.socket) -> None:
        with self._lock:
            self._open.difference_update(socks)


class _Pair:
    """Two sockets copied both ways; closed when both directions ended."""

    def __init__(self, owner: Forwarder, a: socket.socket, b: socket.socket) -> None:
        self.owner = owner
        self.a, self.b = a, b
        self._left = 2
        self._lock = threading.Lock()

    def copy(self, src: socket.socket, dst: socket.socket, up: bool) -> None:
        try:
            while True:
                data = src.recv(_CHUNK)
                if not data:
                    break
                dst.sendall(data)
                self.owner._count(len(data), up)
        except OSError:
            pass
        finally:
            # Pass the half-close on (HTTP/2 and gRPC end with one), and
            # release both sockets when the second direction ends.
            with contextlib.suppress(OSError):
                dst.shutdown(socket.SHUT_WR)
            with self._lock:
                self._left -= 1
                last = self._left == 0
            if last:
                self.owner._forget(self.a, self.b)
                self.a.close()
                self.b.close()


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(prog="python -m flowprobe.devenv.nsproxy", description=__doc__)
    ap.add_argument("--listen", type=_addr, required=True, metavar="HOST:PORT")
    ap.add_argument("--target", type=_addr, required=True, metavar="HOST:PORT")
    ap.add_argument("--listen-netns", metavar="NAME")
    ap.add_argument("--target-netns", metavar="NAME")
    args = ap.parse_args(argv)
    done = threading.Event()

    def _stop(_sig: int, _frame: object) -> None:
        done.set()

    signal.signal(signal.SIGTERM, _stop)
    signal.signal(signal.SIGINT, _stop)
    with Forwarder(
        args.listen, args.target, listen_netns=args.listen_netns, target_netns=args.target_netns
    ) as fwd:
        print(json.dumps({"port": fwd.port}), flush=True)
        while not done.wait(0.5):
            pass
        counts = fwd.counts()
    print(json.dumps(counts), flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
