"""Records tests/data/dns/*.pcapng: a small dnspython server (UDP and TCP) and clients in pods.

Run as root from the repository root::

    PYTHONPATH=operator:node_agent:devtools python3 tests/data/record_dns.py

The same file is the server (``serve``) and the client (``client SCENARIO``) run
inside the pods. Each scenario's expected records are asserted in
tests/agent/parse/test_dns.py.

The zone (``svc.test.``):

    a        A     10.1.0.1, 10.1.0.2
    v6       AAAA  fd00::1
    alias    CNAME a.svc.test.   (an A query also gets a's addresses)
    slow     A     10.1.0.9      answered after 300 ms
    retry    A     10.1.0.7      the first query is ignored, the retry answered
    fail     -     SERVFAIL
    drop     -     never answered
    other    -     NXDOMAIN
"""

from __future__ import annotations

import socket
import struct
import sys
import threading
import time
from pathlib import Path

OUT = Path(__file__).resolve().parent / "dns"
ZONE = "svc.test."
CUSTOM_PORT = 5300


def answer(wire: bytes, seen: set[tuple[int, str]]) -> tuple[bytes | None, float]:
    """The response to one query and how long to wait before sending it."""
    import dns.flags
    import dns.message
    import dns.rcode
    import dns.rdatatype
    import dns.rrset

    q = dns.message.from_wire(wire)
    r = dns.message.make_response(q)
    r.flags |= dns.flags.AA
    qname = q.question[0].name
    qtype = q.question[0].rdtype
    label = qname.to_text().removesuffix("." + ZONE)
    a_records = {"a": ["10.1.0.1", "10.1.0.2"], "slow": ["10.1.0.9"], "retry": ["10.1.0.7"]}
    delay = 0.0
    if label == "drop":
        return None, 0.0
    if label == "retry" and (q.id, label) not in seen:
        seen.add((q.id, label))
        return None, 0.0
    if label == "slow":
        delay = 0.3
    if label == "fail":
        r.set_rcode(dns.rcode.SERVFAIL)
    elif label == "alias":
        target = "a." + ZONE
        r.answer.append(dns.rrset.from_text(qname, 30, "IN", "CNAME", target))
        if qtype == dns.rdatatype.A:
            r.answer.append(dns.rrset.from_text(target, 30, "IN", "A", *a_records["a"]))
    elif label in a_records and qtype == dns.rdatatype.A:
        r.answer.append(dns.rrset.from_text(qname, 30, "IN", "A", *a_records[label]))
    elif label == "v6" and qtype == dns.rdatatype.AAAA:
        r.answer.append(dns.rrset.from_text(qname, 30, "IN", "AAAA", "fd00::1"))
    elif label not in (*a_records, "v6"):
        r.set_rcode(dns.rcode.NXDOMAIN)
    return r.to_wire(), delay


def serve(ip: str, ports: list[int]) -> None:
    # Imported before the first query, or the first answers wait for it.
    import dns.message
    import dns.rrset

    answer(dns.message.make_query("warm." + ZONE, "A").to_wire(), set())
    dns.rrset.from_text("a." + ZONE, 30, "IN", "A", "10.0.0.1")
    seen: set[tuple[int, str]] = set()
    lock = threading.Lock()

    def udp(port: int) -> None:
        sock = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
        sock.bind((ip, port))

        def reply(data: bytes, peer: tuple[str, int]) -> None:
            with lock:
                out, delay = answer(data, seen)
            if out is not None:
                time.sleep(delay)
                sock.sendto(out, peer)

        while True:
            data, peer = sock.recvfrom(65535)
            threading.Thread(target=reply, args=(data, peer), daemon=True).start()

    def tcp_conn(conn: socket.socket) -> None:
        buf = b""
        while True:
            chunk = conn.recv(65535)
            if not chunk:
                break
            buf += chunk
            # RFC 7766: several length-prefixed queries may share a segment;
            # answer them in order, all replies in one write.
            replies = b""
            while len(buf) >= 2 and len(buf) >= 2 + struct.unpack("!H", buf[:2])[0]:
                n = struct.unpack("!H", buf[:2])[0]
                with lock:
                    out, delay = answer(buf[2 : 2 + n], seen)
                buf = buf[2 + n :]
                if out is not None:
                    time.sleep(delay)
                    replies += struct.pack("!H", len(out)) + out
            if replies:
                conn.sendall(replies)
        conn.close()

    def tcp(port: int) -> None:
        srv = socket.socket()
        srv.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        srv.bind((ip, port))
        srv.listen(16)
        while True:
            conn, _ = srv.accept()
            threading.Thread(target=tcp_conn, args=(conn,), daemon=True).start()

    for port in ports:
        threading.Thread(target=udp, args=(port,), daemon=True).start()
        threading.Thread(target=tcp, args=(port,), daemon=True).start()
    while True:
        time.sleep(3600)


def query(name: str, rdtype: str, qid: int) -> bytes:
    import dns.message

    q = dns.message.make_query(name + "." + ZONE, rdtype)
    q.id = qid
    return bytes(q.to_wire())


def client(scenario: str, ip: str) -> None:
    query("warm", "A", 0)  # dnspython imported before the clock matters
    if scenario == "udp":
        # One socket, seven queries in flight at once; "slow" is answered last,
        # so responses come back out of query order.
        sock = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
        sock.bind(("0.0.0.0", 40053))
        sock.settimeout(2)
        batch = [
            ("a", "A", 0x1001),
            ("slow", "A", 0x1002),
            ("v6", "AAAA", 0x1003),
            ("alias", "A", 0x1004),
            ("alias", "CNAME", 0x1005),
            ("other", "A", 0x1006),
            ("fail", "A", 0x1007),
        ]
        for name, rdtype, qid in batch:
            sock.sendto(query(name, rdtype, qid), (ip, 53))
        for _ in batch:
            sock.recvfrom(65535)
        # A query the server never answers.
        sock.sendto(query("drop", "A", 0x1008), (ip, 53))
        time.sleep(0.3)
        # A lost query retried with the same id after 200 ms.
        retry = query("retry", "A", 0x1009)
        sock.sendto(retry, (ip, 53))
        time.sleep(0.2)
        sock.sendto(retry, (ip, 53))
        sock.recvfrom(65535)
    elif scenario == "tcp":
        # Three queries in one write on one connection, then a second
        # connection with one query.
        conn = socket.create_connection((ip, 53))
        wires = [query("a", "A", 0x2001), query("other", "A", 0x2002), query("v6", "AAAA", 0x2003)]
        conn.sendall(b"".join(struct.pack("!H", len(w)) + w for w in wires))
        _read_tcp(conn, len(wires))
        conn.close()
        conn = socket.create_connection((ip, 53))
        w = query("alias", "CNAME", 0x2004)
        conn.sendall(struct.pack("!H", len(w)) + w)
        _read_tcp(conn, 1)
        conn.close()
    elif scenario == "port":
        # The same server on a port tshark does not know as DNS.
        sock = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
        sock.settimeout(2)
        sock.sendto(query("a", "A", 0x3001), (ip, CUSTOM_PORT))
        sock.recvfrom(65535)
        conn = socket.create_connection((ip, CUSTOM_PORT))
        w = query("v6", "AAAA", 0x3002)
        conn.sendall(struct.pack("!H", len(w)) + w)
        _read_tcp(conn, 1)
        conn.close()
    else:
        raise SystemExit(f"unknown scenario {scenario}")


def _read_tcp(conn: socket.socket, count: int) -> None:
    conn.settimeout(2)
    buf = b""
    while count:
        while len(buf) < 2 or len(buf) < 2 + struct.unpack("!H", buf[:2])[0]:
            chunk = conn.recv(65535)
            if not chunk:
                return
            buf += chunk
        buf = buf[2 + struct.unpack("!H", buf[:2])[0] :]
        count -= 1


def main() -> None:
    from flowprobe.devenv.netns import Node, record_pcap, run_or_exit

    OUT.mkdir(parents=True, exist_ok=True)
    me = str(Path(__file__).resolve())
    with Node(subnet="10.252.0.0/24") as node:
        cli = node.add_pod("client")
        srv = node.add_pod("dns")
        srv.spawn([sys.executable, me, "serve", srv.ip, "53", str(CUSTOM_PORT)])
        srv.wait_port(53)
        srv.wait_port(CUSTOM_PORT)
        for scenario in ("udp", "tcp", "port"):
            with record_pcap(node, OUT / f"{scenario}.pcapng", "inbound and (udp or tcp)"):
                run_or_exit(cli, [sys.executable, me, "client", scenario, srv.ip], scenario)


if __name__ == "__main__":
    if len(sys.argv) > 1 and sys.argv[1] == "serve":
        serve(sys.argv[2], [int(p) for p in sys.argv[3:]])
    elif len(sys.argv) > 1 and sys.argv[1] == "client":
        client(sys.argv[2], sys.argv[3])
    else:
        main()
