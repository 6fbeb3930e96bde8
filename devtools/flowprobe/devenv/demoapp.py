"""The demo's "api" workload: HTTP in, Redis and PostgreSQL out.

``GET /orders/<id>`` reads a cache key from Redis and the order row from
PostgreSQL; ``/orders/0`` queries a table that does not exist (a SQL error and
an HTTP 500). Run: ``python -m flowprobe.devenv.demoapp HOST PORT REDIS_IP PG_IP``.
"""

from __future__ import annotations

import sys
import threading
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer

import psycopg
import redis

_local = threading.local()
REDIS_IP = PG_IP = ""


def _clients() -> tuple[redis.Redis, psycopg.Connection[tuple[object, ...]]]:
    if not hasattr(_local, "r"):
        _local.r = redis.Redis(host=REDIS_IP, port=6379)
        _local.pg = psycopg.connect(host=PG_IP, user="postgres", dbname="postgres", autocommit=True)
    return _local.r, _local.pg


class Api(BaseHTTPRequestHandler):
    protocol_version = "HTTP/1.1"
    # Headers and body leave in one write, as real servers do; two small
    # writes would meet Nagle and delayed ACKs and add 40 ms to every call.
    wbufsize = 1 << 16

    def log_message(self, format: str, *args: object) -> None:  # noqa: A002 - stdlib signature
        pass

    def do_GET(self) -> None:
        parts = self.path.strip("/").split("/")
        r, pg = _clients()
        code, body = 200, b"{}"
        if parts[0] == "orders" and len(parts) == 2 and parts[1].isdigit():
            oid = int(parts[1])
            r.incr(f"hits:{oid % 10}")
            cached = r.get(f"order:{oid}")
            try:
                table = "orders" if oid else "missing_table"
                row = pg.execute(
                    f"SELECT id, item, qty FROM {table} WHERE id = %s", (oid,)
                ).fetchone()
                if cached is None:
                    r.set(f"order:{oid}", str(row), ex=60)
                body = str(row).encode()
            except psycopg.Error:
                code, body = 500, b"db error"
        elif parts[0] == "health":
            body = b"ok"
        else:
            code = 404
        self.send_response(code)
        self.send_header("Content-Length", str(len(body)))
        self.end_headers()
        self.wfile.write(body)


def main() -> None:
    global REDIS_IP, PG_IP
    host, port, REDIS_IP, PG_IP = sys.argv[1], int(sys.argv[2]), sys.argv[3], sys.argv[4]
    with psycopg.connect(host=PG_IP, user="postgres", dbname="postgres", autocommit=True) as pg:
        pg.execute("CREATE TABLE IF NOT EXISTS orders (id int primary key, item text, qty int)")
        pg.execute(
            "INSERT INTO orders SELECT g, 'item-' || g, g % 7 FROM generate_series(1, 1000) g "
            "ON CONFLICT DO NOTHING"
        )
    srv = ThreadingHTTPServer((host, port), Api)
    srv.daemon_threads = True
    srv.serve_forever()


if __name__ == "__main__":
    main()
