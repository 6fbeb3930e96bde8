"""The daemon's forensics: policies set up a real dumpcap ring on loopback, their own
triggers freeze real connections, and the health server serves the pcaps to token holders."""

from __future__ import annotations

import json
import socket
import subprocess
import time
import urllib.error
import urllib.request
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

from flowprobe.agent.capture.tshark import Tools
from flowprobe.agent.daemon.report import HealthServer
from flowprobe.agent.forensics.freezer import (
    PCAP_NAME,
    PCAP_STREAM_ID,
    PCAP_TRIGGER,
    community_id,
)
from flowprobe.agent.forensics.node import NodeForensics
from flowprobe.agent.sessionize.records import Endpoints, Outcome
from flowprobe.devenv.httpapp import serve
from flowprobe.devenv.k8sobjects import policy
from tests.agent.export.fakes import exchange
from tests.operator.clusterkit import wait_until

pytestmark = pytest.mark.capture


@pytest.fixture
def node(tmp_path: Path) -> Iterator[NodeForensics]:
    (tmp_path / "token").write_text("tok\n")
    nf = NodeForensics(Tools.find(), str(tmp_path / "forensics"), str(tmp_path / "token"))
    try:
        yield nf
    finally:
        nf.close()


def _get(url: str, token: str | None) -> tuple[int, bytes]:
    req = urllib.request.Request(url)
    if token is not None:
        req.add_header("Authorization", f"Bearer {token}")
    try:
        with urllib.request.urlopen(req, timeout=10) as resp:
            return resp.status, resp.read()
    except urllib.error.HTTPError as exc:
        return exc.code, b""


def _request_503(port: int) -> tuple[int, int, int]:
    """A real 503 on loopback: (client port, start µs, end µs)."""
    start = time.time_ns() // 1000
    with socket.create_connection(("127.0.0.1", port)) as s:
        s.sendall(b"GET /status/503 HTTP/1.1\r\nHost: x\r\nConnection: close\r\n\r\n")
        while s.recv(65536):
            pass
        client_port = s.getsockname()[1]
    return client_port, start, time.time_ns() // 1000


def test_policies_set_up_the_ring_and_their_own_triggers_freeze(
    node: NodeForensics, tmp_path: Path
) -> None:
    server = serve("127.0.0.1", 0)
    port = server.server_address[1]
    timeouts_only: dict[str, Any] = {
        "mode": "Enabled",
        "triggers": ["Timeout"],
        "secondsAfter": 0,
        "ring": {"files": 8, "fileSizeMegabytes": 1},
    }
    errors: dict[str, Any] = {"mode": "Enabled", "triggers": ["ServerError"]}
    a, b = policy("a", forensics=timeouts_only), policy("b", forensics=errors)
    health = HealthServer("127.0.0.1", 0, lambda: (True, {}), lambda: (True, {}), node.handle)
    health.start()
    base = f"http://127.0.0.1:{health.port}"
    try:
        node.apply([a, b], ["lo"], f"tcp port {port}")
        current = node.current
        assert current is not None and current.ring.wait_capturing(10)
        # The oldest policy's bounds apply on the node.
        assert current.config.ring_files == 8 and current.config.seconds_after == 0
        client_port, start, end = _request_503(port)
        ex = exchange(
            client=("127.0.0.1", client_port),
            server=("127.0.0.1", port),
            start_us=start,
            end_us=end,
            outcome=Outcome.ERROR,
        )
        node.observe(ex, [a])
        assert PCAP_NAME not in ex.attrs  # a freezes on timeouts only
        node.observe(ex, [a, b])
        name = ex.attrs[PCAP_NAME]
        assert isinstance(name, str)
        wait_until(
            lambda: _get(f"{base}/pcaps", "tok")[1].count(name.encode()) == 1,
            f"the pcap to be listed ({node.totals()})",
            timeout=30,
        )
        status, body = _get(f"{base}/pcaps/{name}", "tok")
        assert status == 200 and body[:4] in (b"\xd4\xc3\xb2\xa1", b"\x4d\x3c\xb2\xa1")
        assert _get(f"{base}/pcaps", None)[0] == 401
        assert _get(f"{base}/pcaps/{name}", "wrong")[0] == 401
        assert _get(f"{base}/healthz", None)[0] == 200
        # A new capture scope restarts the ring; the same one does not.
        node.apply([a, b], ["lo"], f"tcp port {port}")
        assert current.ring.restarts == 1
        node.apply([a, b], ["lo"], f"tcp port {port} or tcp port 1")
        assert node.current is current and current.ring.restarts == 2
        # No policy enables forensics any more: the ring stops, /pcaps is gone.
        node.apply([policy("c")], ["lo"], f"tcp port {port}")
        assert node.totals() is None
        assert _get(f"{base}/pcaps", "tok")[0] == 404
        wait_until(lambda: not current.ring.alive(), "the ring to stop", timeout=30)
        stats = json.loads(json.dumps(current.totals()))
        assert stats["frozen"] == 1
    finally:
        health.stop()
        server.shutdown()


def test_anomaly_alerts_freeze_only_for_policies_with_the_anomaly_trigger(
    node: NodeForensics,
) -> None:
    server = serve("127.0.0.1", 0)
    port = server.server_address[1]
    on = policy("a", forensics={"mode": "Enabled", "triggers": ["AnomalyAlert"]})
    off = policy("b", forensics={"mode": "Enabled", "triggers": ["ServerError"]})
    try:
        node.apply([on, off], ["lo"], f"tcp port {port}")
        current = node.current
        assert current is not None and current.ring.wait_capturing(10)
        client_port, start, end = _request_503(port)
        ep = Endpoints("tcp", "127.0.0.1", client_port, "127.0.0.1", port)
        assert node.freeze_anomaly("b", ep, start, end) == {}
        assert node.freeze_anomaly("gone", ep, start, end) == {}
        pcap = node.freeze_anomaly("a", ep, start, end)
        assert pcap[PCAP_TRIGGER] == "anomaly" and pcap[PCAP_STREAM_ID] == community_id(ep)
        frozen = current.store.directory / str(pcap[PCAP_NAME])
        wait_until(
            lambda: (node.totals() or {}).get("frozen") == 1,
            f"the pcap to be cut ({node.totals()})",
            timeout=30,
        )
        ports = subprocess.run(
            ["tshark", "-r", str(frozen), "-n", "-T", "fields", "-e", "tcp.port"],
            capture_output=True,
            text=True,
            check=True,
        ).stdout.split()
        assert ports and set(ports) == {f"{client_port},{port}", f"{port},{client_port}"}
        assert (node.totals() or {})["triggered"] == 1
    finally:
        server.shutdown()
