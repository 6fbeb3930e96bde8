"""Records tests/data/grpc/*.pcapng: a real gRPC server and client, and plain h2c, in pods.

Run as root from the repository root: ``python tests/data/record_grpc.py`` (needs grpcio,
h2 and curl with HTTP/2). The same file is also the servers and the gRPC client,
started inside the pods as ``record_grpc.py serve-grpc|serve-h2c|client ...``.
Each file's scenario and expected counts are asserted in tests/agent/parse/test_http2.py.

The gRPC service uses generic handlers with raw bytes (no codegen):
``/flowprobe.test.Echo/Unary`` echoes (``big:N`` answers N bytes), ``/Stream`` sends
N messages (``fail-after:N`` aborts with RESOURCE_EXHAUSTED after N), ``/Fail``
aborts with NOT_FOUND, ``/Crash`` raises (UNKNOWN), ``/Slow`` sleeps (or answers
DEADLINE_EXCEEDED when the caller's deadline is shorter than the sleep).
"""

from __future__ import annotations

import sys
import time
from collections.abc import Sequence
from pathlib import Path
from typing import Any, cast

OUT = Path(__file__).resolve().parent / "grpc"
GRPC_PORT = 50051
H2C_PORT = 8081
SERVICE = "flowprobe.test.Echo"


def serve_grpc(ip: str, port: int) -> None:
    import threading
    from concurrent import futures

    import grpc

    # All 100 concurrent calls answer at once, so the server writes many
    # streams' frames into the same segments.
    barrier = threading.Barrier(100)

    def unary(req: bytes, ctx: grpc.ServicerContext) -> bytes:
        if req.startswith(b"together "):
            barrier.wait(timeout=10)
        if req.startswith(b"big:"):
            return b"r" * int(req[4:20].split(b":")[0])
        return b"echo:" + req

    def stream(req: bytes, ctx: grpc.ServicerContext):  # type: ignore[no-untyped-def]
        if req.startswith(b"fail-after:"):
            for i in range(int(req[11:])):
                yield f"item {i}".encode()
            ctx.abort(grpc.StatusCode.RESOURCE_EXHAUSTED, "quota used up")
        for i in range(int(req or b"5")):
            yield f"item {i}".encode()

    def fail(req: bytes, ctx: grpc.ServicerContext) -> bytes:
        # A comma in grpc-message: header values must not be split on commas.
        ctx.abort(grpc.StatusCode.NOT_FOUND, "item 42 not found, try another")

    def crash(req: bytes, ctx: grpc.ServicerContext) -> bytes:
        raise RuntimeError("boom")

    def slow(req: bytes, ctx: grpc.ServicerContext) -> bytes:
        remaining = ctx.time_remaining()
        if remaining is not None and remaining < float(req):
            # Give up before the client's deadline, as servers that propagate
            # deadlines do: the status then comes from the server, not a race.
            time.sleep(max(0.0, remaining - 0.15))
            ctx.abort(grpc.StatusCode.DEADLINE_EXCEEDED, "would miss the deadline")
        time.sleep(float(req))
        return b"late"

    handler = grpc.method_handlers_generic_handler(
        SERVICE,
        {
            "Unary": grpc.unary_unary_rpc_method_handler(unary),
            "Stream": grpc.unary_stream_rpc_method_handler(stream),
            "Fail": grpc.unary_unary_rpc_method_handler(fail),
            "Crash": grpc.unary_unary_rpc_method_handler(crash),
            "Slow": grpc.unary_unary_rpc_method_handler(slow),
        },
    )
    server = grpc.server(futures.ThreadPoolExecutor(max_workers=128))
    server.add_generic_rpc_handlers((handler,))
    server.add_insecure_port(f"{ip}:{port}")
    server.start()
    server.wait_for_termination()


def serve_h2c(ip: str, port: int) -> None:
    """HTTP/2 with prior knowledge, one thread per connection (the h2 library)."""
    import socket
    import threading

    import h2.config
    import h2.connection
    import h2.events

    def respond(conn: h2.connection.H2Connection, sid: int, headers: dict[str, str]) -> None:
        path, method = headers.get(":path", "/"), headers.get(":method", "GET")
        parts = path.split("?")[0].strip("/").split("/")
        status, body = 200, b'{"ok": true}\n'
        if parts[0] == "status" and len(parts) > 1:
            status, body = int(parts[1]), f"status {parts[1]}\n".encode()
        elif parts[0] == "big":
            body = b"b" * int(parts[1])
        elif parts[0] == "echo":
            body = headers.get("body", "").encode()
        hdrs = [(":status", str(status)), ("content-length", str(len(body)))]
        hdrs.append(("content-type", "text/plain"))
        if method == "HEAD" or not body:
            conn.send_headers(sid, hdrs, end_stream=True)
            return
        conn.send_headers(sid, hdrs)
        while body:
            size = min(len(body), conn.max_outbound_frame_size, conn.local_flow_control_window(sid))
            conn.send_data(sid, body[:size], end_stream=size == len(body))
            body = body[size:]

    def handle(sock: socket.socket) -> None:
        cfg = h2.config.H2Configuration(client_side=False, header_encoding="utf-8")
        conn = h2.connection.H2Connection(config=cfg)
        conn.initiate_connection()
        sock.sendall(conn.data_to_send())
        requests: dict[int, dict[str, str]] = {}
        while True:
            data = sock.recv(65536)
            if not data:
                break
            for ev in conn.receive_data(data):
                if isinstance(ev, h2.events.RequestReceived):
                    requests[ev.stream_id] = dict(ev.headers)  # type: ignore[arg-type]
                elif isinstance(ev, h2.events.DataReceived):
                    conn.acknowledge_received_data(ev.flow_controlled_length, ev.stream_id)
                    req = requests.setdefault(ev.stream_id, {})
                    req["body"] = req.get("body", "") + ev.data.decode()
                elif isinstance(ev, h2.events.StreamEnded):
                    respond(conn, ev.stream_id, requests.pop(ev.stream_id, {}))
            sock.sendall(conn.data_to_send())
        sock.close()

    srv = socket.create_server((ip, port))
    while True:
        s, _ = srv.accept()
        threading.Thread(target=handle, args=(s,), daemon=True).start()


def client(ip: str, port: int, scenario: str) -> None:
    import grpc

    with grpc.insecure_channel(f"{ip}:{port}") as ch:
        grpc.channel_ready_future(ch).result(timeout=5)

        def rpc(kind: str, method: str) -> Any:
            # Raw bytes in and out (no serializers): the stubs can't type that.
            return getattr(ch, kind)(f"/{SERVICE}/{method}")

        def call(method: str, req: bytes, timeout: float = 5) -> bytes:
            return cast(bytes, rpc("unary_unary", method)(req, timeout=timeout))

        def expect_error(
            method: str, req: bytes, code: grpc.StatusCode, timeout: float = 5
        ) -> None:
            try:
                call(method, req, timeout)
            except grpc.RpcError as exc:
                assert exc.code() == code, exc
            else:
                raise AssertionError(f"{method} did not fail")

        if scenario == "unary":
            for i in range(5):
                assert call("Unary", f"hello {i}".encode()) == f"echo:hello {i}".encode()
                time.sleep(0.02)
        elif scenario == "streaming":
            stream = rpc("unary_stream", "Stream")
            assert len(list(stream(b"10", timeout=5))) == 10
            assert len(list(stream(b"3", timeout=5))) == 3
            got = []
            try:
                for m in stream(b"fail-after:2", timeout=5):
                    got.append(m)
            except grpc.RpcError as exc:
                assert exc.code() == grpc.StatusCode.RESOURCE_EXHAUSTED
            assert len(got) == 2
        elif scenario == "errors":
            expect_error("Fail", b"42", grpc.StatusCode.NOT_FOUND)
            expect_error("Crash", b"", grpc.StatusCode.UNKNOWN)
            expect_error("Missing", b"", grpc.StatusCode.UNIMPLEMENTED)
            assert call("Unary", b"ok") == b"echo:ok"
        elif scenario == "deadline":
            expect_error("Slow", b"0.5", grpc.StatusCode.DEADLINE_EXCEEDED, timeout=0.4)
            # The client gives up: RST_STREAM(CANCEL) and no answer ever.
            fut = rpc("unary_unary", "Slow").future(b"0.3", timeout=5)
            time.sleep(0.1)
            fut.cancel()
            time.sleep(0.4)
            assert call("Unary", b"after") == b"echo:after"
        elif scenario == "concurrent":
            unary = rpc("unary_unary", "Unary")
            futs = [unary.future(f"together {i}".encode(), timeout=10) for i in range(100)]
            assert sorted(f.result() for f in futs) == sorted(
                f"echo:together {i}".encode() for i in range(100)
            )
        elif scenario == "large":
            # 10 KB up, 30 KB down: several DATA frames, frames across segments.
            assert call("Unary", b"big:30000:" + b"q" * 10000) == b"r" * 30000
        else:
            raise SystemExit(f"unknown scenario {scenario}")
    time.sleep(0.1)


# Over 16 KB even after HPACK's Huffman coding, which shrinks repeated letters.
FILLER = "".join(chr(0x21 + (i * 7919) % 90) for i in range(20000)).replace(",", ";")


def client_h2c(ip: str, port: int) -> None:
    """Several streams on one connection (curl 7.88 fails to reuse h2c connections)."""
    import socket

    import h2.config
    import h2.connection
    import h2.events

    def connection() -> tuple[socket.socket, h2.connection.H2Connection]:
        sock = socket.create_connection((ip, port), timeout=5)
        conn = h2.connection.H2Connection(h2.config.H2Configuration(header_encoding="utf-8"))
        conn.initiate_connection()
        sock.sendall(conn.data_to_send())
        return sock, conn

    def send(
        conn: h2.connection.H2Connection, path: str, extra: Sequence[tuple[str, str]] = ()
    ) -> int:
        sid: int = conn.get_next_available_stream_id()
        headers = [(":method", "GET"), (":path", path), (":scheme", "http")]
        headers += [(":authority", f"{ip}:{port}"), ("user-agent", "flowprobe-h2-test"), *extra]
        conn.send_headers(sid, headers, end_stream=True)
        return sid

    def wait(sock: socket.socket, conn: h2.connection.H2Connection, sids: set[int]) -> None:
        while sids:
            sock.sendall(conn.data_to_send())
            data = sock.recv(65536)
            assert data, "server closed"
            for ev in conn.receive_data(data):
                if isinstance(ev, h2.events.DataReceived):
                    conn.acknowledge_received_data(ev.flow_controlled_length, ev.stream_id)
                elif isinstance(ev, h2.events.StreamEnded):
                    sids.discard(ev.stream_id)
        sock.sendall(conn.data_to_send())

    sock, conn = connection()
    for path in ("/items/1", "/status/404", "/status/503", "/big/20000"):
        wait(sock, conn, {send(conn, path)})
    # A header block larger than a frame: HEADERS then CONTINUATION.
    wait(sock, conn, {send(conn, "/items/continued", [("x-filler", FILLER)])})
    conn.close_connection()
    sock.sendall(conn.data_to_send())
    sock.close()
    sock, conn = connection()
    wait(sock, conn, {send(conn, f"/items/p{i}") for i in range(10)})
    conn.close_connection()
    sock.sendall(conn.data_to_send())
    sock.close()


def most_streams_in_one_segment(path: Path, port: int) -> tuple[int, int]:
    """The most streams one client segment and one server segment carry, by tshark."""
    import subprocess

    out = subprocess.run(
        [
            *("tshark", "-r", str(path), "-d", f"tcp.port=={port},http2", "-T", "fields"),
            *("-E", "occurrence=a", "-e", "tcp.srcport", "-e", "http2.streamid"),
        ],
        capture_output=True,
        text=True,
        check=True,
    ).stdout
    client = server = 0
    for line in out.splitlines():
        sport, _, sids = line.partition("\t")
        streams = len(set(sids.split(",")) - {"0"}) if sids else 0
        if sport == str(port):
            server = max(server, streams)
        else:
            client = max(client, streams)
    return client, server


def record(node: object, cl: object, srv_ip: str, scenario: str, me: str) -> Path:
    from flowprobe.devenv.netns import Node, Pod, record_pcap, run_or_exit

    assert isinstance(node, Node) and isinstance(cl, Pod)
    path = OUT / f"{scenario}.pcapng"
    port = H2C_PORT if scenario == "h2c" else GRPC_PORT
    with record_pcap(node, path, f"inbound and tcp port {port}"):
        if scenario == "h2c":
            run_or_exit(cl, [sys.executable, me, "client-h2c", srv_ip, str(port)], scenario)
            base = f"http://{srv_ip}:{port}"
            # curl, one request per connection.
            for args in (["-d", "hello, h2c", f"{base}/echo"], ["-I", f"{base}/items/2"]):
                run_or_exit(cl, ["curl", "-sS", "--http2-prior-knowledge", *args], f"curl {args}")
        else:
            run_or_exit(cl, [sys.executable, me, "client", srv_ip, str(port), scenario], scenario)
    return path


def main() -> None:
    from flowprobe.devenv.netns import Node

    OUT.mkdir(parents=True, exist_ok=True)
    me = str(Path(__file__).resolve())
    with Node(subnet="10.252.0.0/24") as node:
        cl = node.add_pod("client")
        srv = node.add_pod("grpc")
        srv.spawn([sys.executable, me, "serve-grpc", srv.ip, str(GRPC_PORT)])
        srv.spawn([sys.executable, me, "serve-h2c", srv.ip, str(H2C_PORT)])
        srv.wait_port(GRPC_PORT)
        srv.wait_port(H2C_PORT)
        scenarios = ["unary", "streaming", "errors", "deadline", "concurrent", "large", "h2c"]
        for scenario in sys.argv[1:] or scenarios:
            for _attempt in range(10):
                path = record(node, cl, srv.ip, scenario, me)
                # How much client and server batch their writes depends on
                # thread timing; keep a recording where segments carry many
                # streams, the case the parser must untangle (and 15 requests'
                # header values overflow tshark's 2047-byte column).
                if scenario != "concurrent":
                    break
                client, server = most_streams_in_one_segment(path, GRPC_PORT)
                if client >= 15 and server >= 10:
                    break
            else:
                raise SystemExit("no recording had 15 requests and 10 replies in one segment")


if __name__ == "__main__":
    if len(sys.argv) > 1 and sys.argv[1] == "serve-grpc":
        serve_grpc(sys.argv[2], int(sys.argv[3]))
    elif len(sys.argv) > 1 and sys.argv[1] == "serve-h2c":
        serve_h2c(sys.argv[2], int(sys.argv[3]))
    elif len(sys.argv) > 1 and sys.argv[1] == "client-h2c":
        client_h2c(sys.argv[2], int(sys.argv[3]))
    elif len(sys.argv) > 1 and sys.argv[1] == "client":
        client(sys.argv[2], int(sys.argv[3]), sys.argv[4])
    else:
        main()
