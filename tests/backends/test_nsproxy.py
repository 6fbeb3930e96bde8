"""The demo's bridge between network namespaces: bytes arrive intact and are counted."""

from __future__ import annotations

import socket
import threading
from collections.abc import Iterator

import pytest

from flowprobe.devenv.netns import Node
from flowprobe.devenv.nsproxy import Forwarder, in_netns


@pytest.fixture
def echo() -> Iterator[int]:
    """A TCP server on 127.0.0.1 that sends back what it gets, upper-cased."""
    srv = socket.create_server(("127.0.0.1", 0))

    def serve() -> None:
        while True:
            try:
                conn, _ = srv.accept()
            except OSError:
                return
            with conn:
                while data := conn.recv(65536):
                    conn.sendall(data.upper())

    threading.Thread(target=serve, daemon=True).start()
    yield srv.getsockname()[1]
    srv.close()


def roundtrip(sock: socket.socket, payload: bytes) -> bytes:
    sock.sendall(payload)
    sock.shutdown(socket.SHUT_WR)
    got = b""
    while data := sock.recv(65536):
        got += data
    return got


def test_forwards_and_counts_both_directions(echo: int) -> None:
    payload = b"otlp" * 100_000
    with Forwarder(("127.0.0.1", 0), ("127.0.0.1", echo)) as fwd:
        with socket.create_connection(("127.0.0.1", fwd.port)) as s:
            assert roundtrip(s, payload) == payload.upper()
        assert fwd.bytes_up == fwd.bytes_down == len(payload)
        assert fwd.connections == 1


def test_a_target_that_is_down_closes_the_client() -> None:
    with socket.create_server(("127.0.0.1", 0)) as s:
        dead = s.getsockname()[1]
    with (
        Forwarder(("127.0.0.1", 0), ("127.0.0.1", dead)) as fwd,
        socket.create_connection(("127.0.0.1", fwd.port)) as c,
    ):
        c.settimeout(10)
        assert c.recv(1) == b""
        assert fwd.connections == 0


@pytest.mark.netns
def test_listens_in_another_namespace_and_connects_in_ours(echo: int) -> None:
    with (
        Node(subnet="10.253.0.0/24") as node,
        Forwarder(("127.0.0.1", 0), ("127.0.0.1", echo), listen_netns=node.netns) as fwd,
    ):
        # Our own loopback has nothing on that port...
        with socket.socket() as probe:
            assert probe.connect_ex(("127.0.0.1", fwd.port)) != 0
        # ...the node namespace's loopback reaches our echo server.
        with in_netns(node.netns):
            inside = socket.create_connection(("127.0.0.1", fwd.port))
        with inside:
            assert roundtrip(inside, b"spans") == b"SPANS"
