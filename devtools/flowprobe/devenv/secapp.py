"""An "api" workload that stores customer records in PostgreSQL, for the security tests and bench.

``POST /customers`` (JSON) inserts a row and answers it back with its id;
``GET /customers/<id>`` reads one; ``POST /contacts`` stores an e-mail and a
phone; ``POST /notes`` stores free text. The customer insert goes out with
its literals in the SQL text (psycopg's client-side binding, Django's
default); the rest with bound parameters (psycopg's default), so values
travel in Bind messages and come back in DataRows.
Run: ``python -m flowprobe.devenv.secapp HOST PORT PG_IP``.
"""

from __future__ import annotations

import json
import sys
import threading
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from typing import Any

import psycopg

_local = threading.local()
PG_IP = ""
COLUMNS = ("name", "email", "card", "iban", "ssn", "phone")


def _db() -> psycopg.Connection[Any]:
    if not hasattr(_local, "pg"):
        _local.pg = psycopg.connect(
            host=PG_IP,
            user="postgres",
            dbname="postgres",
            autocommit=True,
            cursor_factory=psycopg.ClientCursor,
        )
    return _local.pg  # type: ignore[no-any-return]


class Api(BaseHTTPRequestHandler):
    protocol_version = "HTTP/1.1"
    # Headers and body in one write (see demoapp).
    wbufsize = 1 << 16

    def log_message(self, format: str, *args: object) -> None:  # noqa: A002 - stdlib signature
        pass

    def _answer(self, code: int, doc: object) -> None:
        body = json.dumps(doc).encode()
        self.send_response(code)
        self.send_header("Content-Type", "application/json")
        self.send_header("Content-Length", str(len(body)))
        self.end_headers()
        self.wfile.write(body)

    def do_POST(self) -> None:
        doc = json.loads(self.rfile.read(int(self.headers.get("Content-Length", "0"))) or b"{}")
        pg = _db()
        if self.path == "/customers":
            row = pg.execute(
                "INSERT INTO customers (name, email, card, iban, ssn, phone) "
                "VALUES (%s, %s, %s, %s, %s, %s) RETURNING id",
                [str(doc.get(c, "")) for c in COLUMNS],
            ).fetchone()
            assert row is not None
            self._answer(201, {"id": row[0], **doc})
        elif self.path == "/contacts":
            psycopg.Cursor(pg).execute(
                "INSERT INTO contacts (email, phone) VALUES (%s, %s)",
                (str(doc.get("email", "")), str(doc.get("phone", ""))),
            )
            self._answer(201, {"stored": True})
        elif self.path == "/notes":
            psycopg.Cursor(pg).execute("INSERT INTO notes (body) VALUES (%s)", (json.dumps(doc),))
            self._answer(201, {"stored": True})
        else:
            self._answer(404, {})

    def do_GET(self) -> None:
        parts = self.path.strip("/").split("/")
        if parts[0] == "customers" and len(parts) == 2 and parts[1].isdigit():
            row = (
                psycopg.Cursor(_db())
                .execute(
                    "SELECT name, email, card, iban, ssn, phone FROM customers WHERE id = %s",
                    (int(parts[1]),),
                )
                .fetchone()
            )
            self._answer(200 if row else 404, dict(zip(COLUMNS, row, strict=True)) if row else {})
        elif parts[0] == "health":
            self._answer(200, {"ok": True})
        else:
            self._answer(404, {})


def main() -> None:
    global PG_IP
    host, port, PG_IP = sys.argv[1], int(sys.argv[2]), sys.argv[3]
    with psycopg.connect(host=PG_IP, user="postgres", dbname="postgres", autocommit=True) as pg:
        pg.execute(
            "CREATE TABLE IF NOT EXISTS customers (id serial primary key, name text, email text, "
            "card text, iban text, ssn text, phone text)"
        )
        pg.execute("CREATE TABLE IF NOT EXISTS notes (id serial primary key, body text)")
        pg.execute(
            "CREATE TABLE IF NOT EXISTS contacts (id serial primary key, email text, phone text)"
        )
    srv = ThreadingHTTPServer((host, port), Api)
    srv.daemon_threads = True
    srv.serve_forever()


if __name__ == "__main__":
    main()
