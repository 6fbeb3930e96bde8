"""Live capture: real servers in network-namespace pods, the agent capturing on the node side."""

from __future__ import annotations

import json
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

import pytest

from flowprobe.devenv.livebench import nginx_pods, succeeded
from flowprobe.devenv.netns import Node, Pod
from tests.agent.helpers import stop_agent

pytestmark = [pytest.mark.capture, pytest.mark.netns]

CLIENT = r"""
import socket, sys, time, json
ip, delays, n = sys.argv[1], [int(x) for x in sys.argv[2].split(",")], int(sys.argv[3])
s = socket.create_connection((ip, 8080))
s.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
out = []
for ms in [d for d in delays for _ in range(3)]:
    req = f"GET /delay/{ms} HTTP/1.1\r\nHost: api\r\n\r\n".encode()
    t0 = time.monotonic_ns()
    s.sendall(req)
    buf = b""
    while not buf.endswith(b"slept\n"):
        buf += s.recv(65536)
    out.append([ms, (time.monotonic_ns() - t0) // 1000])
for i in range(n):
    s.sendall(f"GET /items/{i} HTTP/1.1\r\nHost: api\r\n\r\n".encode())
    buf = b""
    while not buf.endswith(b"\n}\n") and b'"ok": true' not in buf:
        buf += s.recv(65536)
s.close()
print(json.dumps(out))
"""


def _capture(node: Node, out: Path, *extra: str) -> subprocess.Popen[bytes]:
    return node.spawn_agent(
        ["-i", "any", "-f", "inbound and tcp port 8080", "--output", str(out), *extra]
    )


def test_every_request_reported_once_with_client_measured_durations(
    http_pods: tuple[Node, Pod, Pod], tmp_path: Path
) -> None:
    node, client, server = http_pods
    out = tmp_path / "live.jsonl"
    agent = _capture(node, out)
    delays = [5, 10, 20, 50, 100, 200]
    r = client.run([sys.executable, "-c", CLIENT, server.ip, ",".join(map(str, delays)), "200"])
    assert r.returncode == 0, r.stderr
    time.sleep(1.0)
    stop_agent(agent)
    measured: list[list[int]] = json.loads(r.stdout)
    records: list[dict[str, Any]] = [json.loads(ln) for ln in out.read_text().splitlines()]
    items = [rec for rec in records if rec["url.path"].startswith("/items/")]
    assert sorted(rec["url.path"] for rec in items) == sorted(f"/items/{i}" for i in range(200))
    assert all(rec["http.response.status_code"] == 200 for rec in items)
    slow = [rec for rec in records if rec["url.path"].startswith("/delay/")]
    slow.sort(key=lambda rec: rec["start_time_unix_us"])
    # One record per request, in the order the client sent them.
    assert [int(rec["url.path"].rsplit("/", 1)[1]) for rec in slow] == [ms for ms, _ in measured]
    diffs: dict[int, list[int]] = {}
    for rec, (ms, client_us) in zip(slow, measured, strict=True):
        assert rec["client.address"] == client.ip and rec["server.address"] == server.ip
        assert rec["flowprobe.server_response_time_us"] >= ms * 1000
        diff = client_us - rec["flowprobe.duration_us"]
        # The wire can only be shorter than what the client saw (it adds its own
        # send and wake-up time), never longer.
        assert diff > -1000, (ms, rec["flowprobe.duration_us"], client_us)
        diffs.setdefault(ms, []).append(diff)
    # A busy machine can wake the client late once; of three tries at each
    # delay, the closest agrees with the client within 1 ms.
    for ms, ds in diffs.items():
        assert min(ds) <= 1000, (ms, ds)


def test_capture_interface_missing_is_a_clear_error(tmp_path: Path) -> None:
    r = subprocess.run(
        [sys.executable, "-m", "flowprobe.agent", "capture", "-i", "nosuchif0", "--duration", "5"],
        capture_output=True,
        text=True,
        timeout=60,
    )
    assert r.returncode == 2
    assert "nosuchif0" in r.stderr


def test_tshark_replaced_make_before_break_loses_nothing(
    http_pods: tuple[Node, Pod, Pod], tmp_path: Path
) -> None:
    """A tshark memory limit of 1 MB replaces tshark at every check (each
    500 rows): requests on a kept-alive connection across several
    handovers are each reported once."""
    node, client, server = http_pods
    out, stats = tmp_path / "rot.jsonl", tmp_path / "stats.json"
    agent = _capture(node, out, "--tshark-rss-limit", "1", "--stats", str(stats))
    r = client.run([sys.executable, "-c", CLIENT, server.ip, "5", "1000"])
    assert r.returncode == 0, r.stderr
    time.sleep(1.0)
    stop_agent(agent)
    records = [json.loads(ln) for ln in out.read_text().splitlines()]
    paths = [rec["url.path"] for rec in records if rec["url.path"].startswith("/items/")]
    assert json.loads(stats.read_text())["tshark_rotations"] >= 2
    # At most the message that straddles a handover is lost with its tshark.
    assert len(paths) == len(set(paths))
    rotations = json.loads(stats.read_text())["tshark_rotations"]
    assert len(paths) >= 1000 - rotations


@pytest.mark.parametrize("rss_limit_mb", [None, 1], ids=["interrupt", "rotations"])
def test_burst_faster_than_tshark_is_reported_in_full(
    tmp_path: Path, rss_limit_mb: int | None
) -> None:
    """nginx answers a burst faster than tshark dissects it, so tshark falls
    seconds behind the wire. Interrupting the agent right after the burst, and
    replacing tshark during it, must still report every request that was
    captured: dumpcap is stopped only once tshark has read up to that moment
    (stopping it earlier discards its kernel buffer, uncounted as drops)."""
    with nginx_pods("10.253.4.0/24", "fp-burst-") as (node, client, server, _work):
        out, stats_file = tmp_path / "burst.jsonl", tmp_path / "stats.json"
        extra = ["--tshark-rss-limit", str(rss_limit_mb)] if rss_limit_mb else []
        agent = node.spawn_agent(
            [
                *("-i", "any", "-f", "inbound and tcp port 8080"),
                *("--output", str(out), "--stats", str(stats_file), *extra),
            ]
        )
        r = client.run(
            ["h2load", "--h1", "-n", "20000", "-c", "4", "-t", "1", f"http://{server.ip}:8080/"]
        )
        sent = succeeded(r.stdout)
        assert sent == 20000, r.stdout[-500:]
        stop_agent(agent)  # at once: tshark is still behind
        stats = json.loads(stats_file.read_text())
    assert stats["capture_dropped"] == 0, stats
    reported = len(out.read_text().splitlines())
    if rss_limit_mb:
        assert stats["tshark_rotations"] >= 1, stats
        # At most the message that straddles a handover is lost with its tshark.
        assert reported >= sent - stats["tshark_rotations"], (reported, stats)
    else:
        assert reported == sent, stats
