"""Records tests/data/http/*.pcapng from a real HTTP/1.1 server and client in network namespaces.

Run as root from the repository root: ``python tests/data/record_http.py``.
Each file's scenario and expected counts are asserted in tests/agent/parse/test_http1.py.
"""

from __future__ import annotations

from pathlib import Path

from flowprobe.devenv.netns import Node, record_pcap, run_or_exit
from flowprobe.devenv.servers import start_http

OUT = Path(__file__).resolve().parent / "http"
PORT = 8080


CLIENT = r"""
import socket, sys, time
ip, port, scenario = sys.argv[1], int(sys.argv[2]), sys.argv[3]
def conn():
    s = socket.create_connection((ip, port)); s.settimeout(5); return s
def drain(s, until=b"", t=1.0):
    s.settimeout(t); data = b""
    try:
        while True:
            d = s.recv(65536)
            if not d: break
            data += d
            if until and data.count(until) >= 1 and data.endswith(until): pass
    except socket.timeout:
        pass
    return data
if scenario == "keepalive":
    s = conn()
    for i in range(10):
        s.sendall(f"GET /items/{i} HTTP/1.1\r\nHost: api\r\n\r\n".encode()); time.sleep(0.02)
    drain(s); s.close()
elif scenario == "pipelined":
    s = conn()
    s.sendall(b"GET /a HTTP/1.1\r\nHost: api\r\n\r\nGET /b HTTP/1.1\r\nHost: api\r\n\r\nHEAD /c HTTP/1.1\r\nHost: api\r\n\r\n")
    drain(s); s.close()
elif scenario == "features":
    s = conn()
    s.sendall(b"GET /chunked HTTP/1.1\r\nHost: api\r\n\r\n"); drain(s, t=0.5)
    s.sendall(b"POST /echo HTTP/1.1\r\nHost: api\r\nContent-Length: 11\r\nExpect: 100-continue\r\n\r\n")
    drain(s, t=0.3); s.sendall(b"hello world"); drain(s, t=0.5)
    s.sendall(b"HEAD /items/7 HTTP/1.1\r\nHost: api\r\n\r\n"); drain(s, t=0.5)
    s.sendall(b"GET /status/503 HTTP/1.1\r\nHost: api\r\n\r\n"); drain(s, t=0.5)
    s.sendall(b"GET /status/404 HTTP/1.1\r\nHost: api\r\n\r\n"); drain(s, t=0.5)
    s.sendall(b"GET /upgrade HTTP/1.1\r\nHost: api\r\nUpgrade: flowprobe-raw\r\nConnection: Upgrade\r\n\r\n"); drain(s, t=0.5)
    s.close()
elif scenario == "delays":
    s = conn()
    for ms in (5, 20, 50, 100, 200):
        t0 = time.monotonic()
        s.sendall(f"GET /delay/{ms} HTTP/1.1\r\nHost: api\r\n\r\n".encode())
        buf = b""
        while b"slept" not in buf:
            buf += s.recv(65536)
        print(ms, round((time.monotonic() - t0) * 1e6), flush=True)
    s.close()
elif scenario == "noresponse":
    s = conn()
    s.sendall(b"GET /items/1 HTTP/1.1\r\nHost: api\r\n\r\n"); drain(s, t=0.3)
    s.sendall(b"GET /silent HTTP/1.1\r\nHost: api\r\n\r\n"); time.sleep(0.5)
    s.close()
    s = conn()
    s.sendall(b"GET /silent HTTP/1.1\r\nHost: api\r\n\r\n"); time.sleep(0.3)
    s.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, b"\x01\x00\x00\x00\x00\x00\x00\x00")
    s.close()  # linger 0 -> RST
"""


def main() -> None:
    OUT.mkdir(parents=True, exist_ok=True)
    with Node(subnet="10.251.0.0/24") as node:
        client = node.add_pod("client")
        server = node.add_pod("api")
        start_http(server, PORT)
        for scenario in ("keepalive", "pipelined", "features", "delays", "noresponse"):
            with record_pcap(node, OUT / f"{scenario}.pcapng", f"inbound and tcp port {PORT}"):
                out = run_or_exit(
                    client, ["python3", "-c", CLIENT, server.ip, str(PORT), scenario], scenario
                )
                if out:
                    (OUT / f"{scenario}.client.txt").write_text(out)


if __name__ == "__main__":
    main()
