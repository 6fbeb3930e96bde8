"""Forensics live: a real dumpcap ring on the node side, real servers in namespace pods,
frozen pcaps opened with tshark, and the pcap endpoint with and without its token."""

from __future__ import annotations

import json
import subprocess
import sys
import threading
import time
from pathlib import Path
from typing import Any

import pytest

from flowprobe.agent.forensics.ring import MAX_PACKET_BYTES, ring_files
from flowprobe.devenv.netns import Node, Pod
from flowprobe.devenv.nsproxy import Forwarder
from tests.agent.export.fakes import FakeGrpcReceiver, attrs
from tests.agent.helpers import check_stream_id, loadgen, stop_agent

pytestmark = [pytest.mark.capture, pytest.mark.netns]

PCAP_PORT = 9611
TOKEN = "s3cret-token-for-the-test"

# One keep-alive connection: an ordinary request, then the given one; then a
# second connection with an ordinary request only (it must not be frozen).
CLIENT = r"""
import socket, sys
ip, path = sys.argv[1], sys.argv[2]
def ask(s, p):
    s.sendall(f"GET {p} HTTP/1.1\r\nHost: api\r\nUser-Agent: curl/8.5\r\nAccept: */*\r\n\r\n".encode())
    buf = b""
    while b"\r\n\r\n" not in buf or not buf.endswith(b"\n"):
        buf += s.recv(65536)
    return buf
s = socket.create_connection((ip, 8080))
ask(s, "/items/1")
ask(s, path)
print(s.getsockname()[1])
s.close()
o = socket.create_connection((ip, 8080))
ask(o, "/items/2")
o.close()
"""


def _agent(node: Node, tmp: Path, *extra: str) -> subprocess.Popen[bytes]:
    token = tmp / "token"
    token.write_text(TOKEN + "\n")
    return node.spawn_agent(
        [
            "-i",
            "any",
            "-f",
            "inbound and tcp port 8080",
            "--output",
            str(tmp / "records.jsonl"),
            "--stats",
            str(tmp / "stats.json"),
            "--forensics",
            "--forensics-dir",
            str(tmp / "forensics"),
            "--pcap-seconds-after",
            "1",
            "--pcap-token-file",
            str(token),
            "--pcap-port",
            str(PCAP_PORT),
            "--pcap-address",
            "127.0.0.1",
            *extra,
        ]
    )


def _records(tmp: Path) -> list[dict[str, Any]]:
    return [json.loads(ln) for ln in (tmp / "records.jsonl").read_text().splitlines()]


def _frozen(tmp: Path) -> list[Path]:
    return sorted((tmp / "forensics" / "frozen").glob("*.pcap"))


def _http_in(pcap: Path) -> list[tuple[str, ...]]:
    """(src port, dst port, method, uri, status) of every HTTP message, as tshark reads them."""
    out = subprocess.run(
        [
            "tshark",
            "-r",
            str(pcap),
            "-n",
            "-d",
            "tcp.port==8080,http",
            "-Y",
            "http",
            "-T",
            "fields",
            "-e",
            "tcp.srcport",
            "-e",
            "tcp.dstport",
            "-e",
            "http.request.method",
            "-e",
            "http.request.uri",
            "-e",
            "http.response.code",
        ],
        capture_output=True,
        text=True,
        check=True,
    ).stdout
    return [tuple(ln.split("\t")) for ln in out.splitlines()]


def _ports_in(pcap: Path) -> set[tuple[str, str]]:
    out = subprocess.run(
        ["tshark", "-r", str(pcap), "-n", "-T", "fields", "-e", "tcp.srcport", "-e", "tcp.dstport"],
        capture_output=True,
        text=True,
        check=True,
    ).stdout
    return {tuple(ln.split("\t")) for ln in out.splitlines()}  # type: ignore[misc]


def _check_frozen(
    tmp: Path, client_port: int, uri: str, status: str, trigger: str
) -> dict[str, Any]:
    frozen = _frozen(tmp)
    assert len(frozen) == 1, frozen
    pcap = frozen[0]
    rec = next(r for r in _records(tmp) if r["url.path"] == uri.split("?")[0])
    assert rec["flowprobe.pcap.name"] == pcap.name
    assert rec["flowprobe.pcap.trigger"] == trigger
    assert rec["client.port"] == client_port
    # Only the triggering connection, both directions, the whole exchange:
    # the earlier request on it too (it is inside the window).
    assert _ports_in(pcap) == {(str(client_port), "8080"), ("8080", str(client_port))}
    http = _http_in(pcap)
    assert (str(client_port), "8080", "GET", uri, "") in http
    assert ("8080", str(client_port), "", "", status) in http
    assert (str(client_port), "8080", "GET", "/items/1", "") in http
    check_stream_id(pcap, rec["flowprobe.pcap.stream_id"])
    return rec


def _pcap_cli(node: Node, token_file: Path, *args: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        node.node_cmd(
            [
                sys.executable,
                "-m",
                "flowprobe.agent",
                "pcap",
                "--url",
                f"http://127.0.0.1:{PCAP_PORT}",
                "--token-file",
                str(token_file),
                *args,
            ]
        ),
        capture_output=True,
        text=True,
        timeout=60,
    )


def _ask(client: Pod, server: Pod, path: str) -> int:
    r = client.run([sys.executable, "-c", CLIENT, server.ip, path])
    assert r.returncode == 0, r.stderr
    return int(r.stdout)


def test_a_5xx_freezes_its_connection_and_the_endpoint_serves_it_to_token_holders(
    http_pods: tuple[Node, Pod, Pod], tmp_path: Path
) -> None:
    node, client, server = http_pods
    agent = _agent(node, tmp_path)
    try:
        port = _ask(client, server, "/status/503")
        # The cut is due once dumpcap closed the ring file holding the
        # window's end; the endpoint lists it once it exists.
        listed = _wait_listed(node, tmp_path / "token")
        good = tmp_path / "good.pcap"
        got = _pcap_cli(node, tmp_path / "token", "get", listed[0]["name"], "-o", str(good))
        assert got.returncode == 0, got.stderr
        wrong = tmp_path / "wrong"
        wrong.write_text("not-the-token")
        refused = _pcap_cli(node, wrong, "list")
        assert refused.returncode == 1 and "401" in refused.stderr
        refused = _pcap_cli(node, wrong, "get", listed[0]["name"], "-o", str(tmp_path / "x.pcap"))
        assert refused.returncode == 1 and "401" in refused.stderr
        assert not (tmp_path / "x.pcap").exists() and not (tmp_path / "x.pcap.part").exists()
        # No token at all, and a name that is a path: refused, not found.
        raw = _raw_get(node, "/pcaps", None)
        assert raw.startswith("401")
        assert _raw_get(node, "/pcaps/..%2Frecords.jsonl", TOKEN).startswith("404")
    finally:
        stop_agent(agent)
    _check_frozen(tmp_path, port, "/status/503", "503", "error")
    assert good.read_bytes() == _frozen(tmp_path)[0].read_bytes()
    stats = json.loads((tmp_path / "stats.json").read_text())["forensics"]
    assert stats["frozen"] == 1 and stats.get("failed", 0) == 0


def _wait_listed(node: Node, token: Path, timeout_s: float = 60) -> list[dict[str, Any]]:
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        r = _pcap_cli(node, token, "list")
        assert r.returncode == 0, r.stderr
        entries = [json.loads(ln) for ln in r.stdout.splitlines()]
        if entries:
            return entries
        time.sleep(0.5)
    raise AssertionError("no pcap listed")


RAW_GET = r"""
import sys, urllib.request, urllib.error
req = urllib.request.Request(sys.argv[1])
if len(sys.argv) > 2:
    req.add_header("Authorization", "Bearer " + sys.argv[2])
try:
    r = urllib.request.urlopen(req, timeout=30)
    print(r.status)
except urllib.error.HTTPError as e:
    print(e.code)
"""


def _raw_get(node: Node, path: str, token: str | None) -> str:
    argv = [sys.executable, "-c", RAW_GET, f"http://127.0.0.1:{PCAP_PORT}{path}"]
    if token is not None:
        argv.append(token)
    return node.exec_node(argv).stdout.strip()


@pytest.mark.slow
def test_a_waf_alert_freezes_its_connection(
    http_pods: tuple[Node, Pod, Pod], tmp_path: Path
) -> None:
    node, client, server = http_pods
    agent = _agent(node, tmp_path, "--waf", "--pcap-triggers", "alert")
    try:
        # A 5xx is not a trigger here.
        _ask(client, server, "/status/500")
        uri = "/items?id=1%27%20UNION%20SELECT%20password%20FROM%20users--"
        port = _ask(client, server, uri)
        # Listed: the agent has seen everything up to the attack.
        _wait_listed(node, tmp_path / "token")
    finally:
        stop_agent(agent)
    rec = _check_frozen(tmp_path, port, uri, "200", "alert")
    assert any(e["name"] == "flowprobe.waf.match" for e in rec["flowprobe.security.events"])
    assert not any(
        "flowprobe.pcap.name" in r for r in _records(tmp_path) if r["url.path"] != "/items"
    )


ANOMALY_RATE = 30
ANOMALY_FLAGS = [
    "--pcap-triggers", "anomaly",
    "--anomalies",
    "--anomaly-interval", "1",
    "--anomaly-warmup", "3",
    "--anomaly-span", "10",
    "--anomaly-min-exchanges", "10",
]  # fmt: skip


@pytest.mark.slow
def test_an_anomaly_alert_freezes_the_connection_of_the_exchange_that_raised_it(
    http_pods: tuple[Node, Pod, Pod], tmp_path: Path
) -> None:
    node, client, server = http_pods
    receiver = FakeGrpcReceiver()
    try:
        with Forwarder(
            ("127.0.0.1", receiver.port), ("127.0.0.1", receiver.port), listen_netns=node.netns
        ):
            otlp = f"http://127.0.0.1:{receiver.port}"
            agent = _agent(node, tmp_path, "--otlp-endpoint", otlp, *ANOMALY_FLAGS)
            try:
                # Steady for longer than the warm-up, then half of the requests
                # fail; the shifted load starts before the steady one ends, so
                # the rate has no gap (nor a step the rate rule would judge).
                steady = threading.Thread(
                    target=loadgen, args=(client, server.ip, 9, ANOMALY_RATE, "/items/{n}", 4)
                )
                steady.start()
                time.sleep(6.0)
                loadgen(client, server.ip, 4, ANOMALY_RATE, "/status/500,/items/{n}", 4)
                steady.join()
                _wait_listed(node, tmp_path / "token")
            finally:
                stop_agent(agent)
        records = receiver.received.log_records()
        spans = [attrs(span.attributes) for _, span in receiver.received.spans()]
        events = [
            attrs(e.attributes)
            for _, span in receiver.received.spans()
            for e in span.events
            if e.name == "flowprobe.anomaly"
        ]
    finally:
        receiver.stop()
    alerts = [a for name, a in records if name == "flowprobe.anomaly"]
    alert = next(a for a in alerts if a["flowprobe.anomaly.kind"] == "error_ratio")
    name = alert["flowprobe.pcap.name"]
    assert alert["flowprobe.pcap.trigger"] == "anomaly" and "-anomaly-" in name
    # The span event and both spans of the exchange that raised it name the pcap.
    assert any(e.get("flowprobe.pcap.name") == name for e in events)
    raised = [a for a in spans if a.get("flowprobe.pcap.name") == name]
    assert raised and all(a["flowprobe.pcap.trigger"] == "anomaly" for a in raised)
    assert {a["flowprobe.pcap.stream_id"] for a in raised} == {alert["flowprobe.pcap.stream_id"]}
    client_port = next(a["client.port"] for a in raised if "client.port" in a)
    uri = next(a["url.path"] for a in raised)
    # tshark opens it; it holds that connection only, with the exchange in it.
    pcap = tmp_path / "forensics" / "frozen" / name
    assert pcap in _frozen(tmp_path)
    assert _ports_in(pcap) == {(str(client_port), "8080"), ("8080", str(client_port))}
    assert (str(client_port), "8080", "GET", uri, "") in _http_in(pcap)
    check_stream_id(pcap, alert["flowprobe.pcap.stream_id"])
    stats = json.loads((tmp_path / "stats.json").read_text())
    assert stats["anomalies"]["alerts"] == len(alerts)
    assert stats["forensics"]["frozen"] >= 1 and stats["forensics"].get("failed", 0) == 0


LOAD = r"""
import socket, sys, time
ip, n, rate = sys.argv[1], int(sys.argv[2]), int(sys.argv[3])
body = b"x" * 40000
t0 = time.monotonic()
for i in range(n):
    # Paced: the ring must outlast the agent's delay in reporting an
    # exchange on a machine shared with other jobs (docs/forensics.md).
    time.sleep(max(0.0, t0 + i / rate - time.monotonic()))
    s = socket.create_connection((ip, 8080))
    if i % 10 == 0:
        s.sendall(b"GET /status/503 HTTP/1.1\r\nHost: api\r\nConnection: close\r\n\r\n")
    else:
        s.sendall(f"POST /echo HTTP/1.1\r\nHost: api\r\nContent-Length: {len(body)}\r\nConnection: close\r\n\r\n".encode() + body)
    while s.recv(65536):
        pass
    s.close()
"""


@pytest.mark.slow
def test_ring_and_frozen_pcaps_stay_within_their_bounds_under_sustained_load(
    http_pods: tuple[Node, Pod, Pod], tmp_path: Path
) -> None:
    node, client, server = http_pods
    files, file_mb = 6, 4
    agent = _agent(
        node,
        tmp_path,
        "--ring-files",
        str(files),
        "--ring-file-mb",
        str(file_mb),
        "--pcap-max-files",
        "1",
        "--pcap-max-per-minute",
        "4",
        "--pcap-seconds-after",
        "0",
    )
    ring = tmp_path / "forensics" / "ring"
    bound = files * ((file_mb << 20) + MAX_PACKET_BYTES)
    seen: list[tuple[int, int]] = []
    stop = threading.Event()

    def sample() -> None:
        while not stop.wait(0.05):
            sizes = [_size(p) for p in ring_files(ring)]
            seen.append((len(sizes), sum(sizes)))

    sampler = threading.Thread(target=sample)
    sampler.start()
    try:
        # 600 x ~80 kB on the wire at 50 a second: twice the ring.
        r = client.run([sys.executable, "-c", LOAD, server.ip, "600", "50"])
        assert r.returncode == 0, r.stderr
    finally:
        stop.set()
        sampler.join()
        stop_agent(agent)
    stats = json.loads((tmp_path / "stats.json").read_text())["forensics"]
    print(f"ring samples {len(seen)}, largest {max(b for _, b in seen)} B of {bound} B; {stats}")
    assert seen and max(b for _, b in seen) <= bound
    # The ring turned over (dumpcap's sequence numbers went past the file count).
    assert max(int(p.name.split("_")[1]) for p in ring_files(ring)) > files
    # Four cuts a minute, the rest counted; one pcap kept, the older evicted.
    assert stats["suppressed"] == stats["triggered"] - 4
    assert stats["frozen"] + stats.get("empty", 0) + stats.get("failed", 0) == 4
    frozen = _frozen(tmp_path)
    assert len(frozen) <= 1
    assert stats["evicted"] == stats["frozen"] - len(frozen)


def _size(p: Path) -> int:
    try:
        return p.stat().st_size
    except FileNotFoundError:
        return 0
