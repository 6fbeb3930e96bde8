"""A small HTTP/1.1 server with the behaviours the probe must handle.

Routes: ``/delay/<ms>`` (answers after that many milliseconds), ``/status/<code>``,
``/chunked`` (chunked transfer encoding), ``/upgrade`` (101 then raw bytes),
``/echo`` (POST body back; honours ``Expect: 100-continue``), ``/silent``
(never answers; the connection stays open), ``/items/<id>`` and anything else (200).
Threaded, keep-alive, and it handles pipelined requests in order as HTTP/1.1
requires. Run with ``python -m flowprobe.devenv.httpapp HOST PORT``.
"""

from __future__ import annotations

import sys
import threading
import time
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer


class Handler(BaseHTTPRequestHandler):
    protocol_version = "HTTP/1.1"
    server_version = "flowprobe-test/1"

    def log_message(self, format: str, *args: object) -> None:  # noqa: A002 - stdlib signature
        pass

    def _send(self, code: int, body: bytes = b"", ctype: str = "text/plain") -> None:
        self.send_response(code)
        self.send_header("Content-Type", ctype)
        self.send_header("Content-Length", str(len(body)))
        self.end_headers()
        if self.command != "HEAD":
            self.wfile.write(body)

    def do_HEAD(self) -> None:
        self.do_GET()

    def do_GET(self) -> None:
        parts = self.path.split("?")[0].strip("/").split("/")
        route = parts[0]
        if route == "delay" and len(parts) > 1:
            time.sleep(int(parts[1]) / 1000)
            self._send(200, b"slept\n")
        elif route == "status" and len(parts) > 1:
            self._send(int(parts[1]), f"status {parts[1]}\n".encode())
        elif route == "chunked":
            self.send_response(200)
            self.send_header("Transfer-Encoding", "chunked")
            self.end_headers()
            for i in range(5):
                chunk = f"chunk {i}\n".encode() * 50
                self.wfile.write(f"{len(chunk):x}\r\n".encode() + chunk + b"\r\n")
                self.wfile.flush()
            self.wfile.write(b"0\r\n\r\n")
        elif route == "upgrade":
            self.send_response(101)
            self.send_header("Upgrade", "flowprobe-raw")
            self.send_header("Connection", "Upgrade")
            self.end_headers()
            self.wfile.write(b"\x00\x01raw bytes after upgrade, not HTTP\r\n\r\n")
            self.wfile.flush()
            self.close_connection = True
        elif route == "silent":
            time.sleep(3600)
        else:
            self._send(200, b'{"ok": true}\n', "application/json")

    def do_POST(self) -> None:
        length = int(self.headers.get("Content-Length", "0"))
        body = self.rfile.read(length)
        self._send(200, body)

    do_PUT = do_POST
    do_DELETE = do_GET


def serve(host: str, port: int) -> ThreadingHTTPServer:
    server = ThreadingHTTPServer((host, port), Handler)
    server.daemon_threads = True
    threading.Thread(target=server.serve_forever, daemon=True).start()
    return server


if __name__ == "__main__":
    srv = ThreadingHTTPServer((sys.argv[1], int(sys.argv[2])), Handler)
    srv.daemon_threads = True
    srv.serve_forever()
