"""Records tests/data/postgres/*.pcapng from a real PostgreSQL 15 server and psycopg 3 client.

Run as root from the repository root: ``python tests/data/record_postgres.py``
(needs Debian's postgresql-15 and ``pip install 'psycopg[binary]'``). The server
runs in one network-namespace pod, the client in another; dumpcap captures on
the node side. Authentication is SCRAM-SHA-256 and the client asks for TLS
(``sslmode=prefer``) which the server refuses, so every connection's start-up
carries SSLRequest, StartupMessage and the SASL round trips the parser must
not turn into exchanges. Each file's scenario and expected counts are asserted
in tests/agent/parse/test_postgres.py.
"""

from __future__ import annotations

import tempfile
from pathlib import Path

from flowprobe.devenv.netns import Node, record_pcap, run_or_exit
from flowprobe.devenv.servers import start_postgres

OUT = Path(__file__).resolve().parent / "postgres"
PASSWORD = "flowprobe-secret"

CLIENT = r"""
import sys, psycopg
ip, port, scenario = sys.argv[1], sys.argv[2], sys.argv[3]
dsn = f"host={ip} port={port} user=postgres password=flowprobe-secret dbname=postgres"

def connect():
    return psycopg.connect(dsn, autocommit=True, sslmode="prefer")

if scenario == "setup":
    with connect() as c:
        c.execute("DROP TABLE IF EXISTS items, orders")
        c.execute("CREATE TABLE items (id int PRIMARY KEY, name text NOT NULL, price numeric)")
        c.execute("INSERT INTO items SELECT g, 'item-' || g, g * 1.5 FROM generate_series(1, 300) g")

elif scenario == "simple":
    # No parameters: psycopg sends a simple Query message.
    with connect() as c:
        c.execute("CREATE TABLE orders (id int PRIMARY KEY, item_id int, qty int)")
        c.execute("INSERT INTO orders SELECT g, g % 300 + 1, g % 7 FROM generate_series(1, 500) g")
        rows = c.execute("SELECT id, item_id, qty FROM orders ORDER BY id").fetchall()
        assert len(rows) == 500, len(rows)
        c.execute("SELECT count(*) FROM items WHERE name = 'item-7'").fetchall()
        c.execute("UPDATE items SET price = 2.5 WHERE id = 3")
        try:
            c.execute("SELECT * FROM missing_table")
        except psycopg.errors.UndefinedTable:
            pass
        c.execute("SELECT 1; SELECT 2, 3")
        c.execute("DELETE FROM orders WHERE id > 490")
        # tshark escapes newlines and tabs in the column; non-ASCII stays UTF-8.
        c.execute("SELECT id,\n\tname\nFROM items\nWHERE name = 'ünï\\code, x' OR id = 4").fetchall()
        # Longer than tshark's 2047-byte column: cut inside the literal.
        c.execute("SELECT count(*) FROM items WHERE name <> '" + "s3cr3t" * 400 + "'").fetchall()
    # A transaction: BEGIN, a statement, COMMIT are three round trips.
    with psycopg.connect(dsn, sslmode="prefer") as c:
        c.execute("INSERT INTO orders VALUES (1000, 1, 1)")
        c.commit()
    try:
        psycopg.connect(dsn.replace("flowprobe-secret", "wrong"), sslmode="disable")
    except psycopg.OperationalError:
        pass

elif scenario == "extended":
    with connect() as c:
        rows = c.execute("SELECT id, name FROM items WHERE id < %s", (50,)).fetchall()
        assert len(rows) == 49
        # A named prepared statement: Parse once, then Bind/Execute by name.
        for i in (1, 2, 3):
            c.execute("SELECT name, price FROM items WHERE id = %s", (i,), prepare=True).fetchall()
        c.execute("INSERT INTO items (id, name, price) VALUES (%s, %s, %s)", (1001, "new, item", 9.5))
        try:
            c.execute("SELECT * FROM nope WHERE id = %s", (1,))
        except psycopg.errors.UndefinedTable:
            pass
        try:
            c.execute("INSERT INTO items (id, name) VALUES (%s, %s)", (1, "dup"))
        except psycopg.errors.UniqueViolation:
            pass
        c.execute("UPDATE items SET price = %s WHERE id > %s", (1.25, 290))

elif scenario == "pipeline":
    with connect() as c:
        cur = c.cursor()
        # executemany runs in pipeline mode: every row's Bind/Execute, one Sync.
        cur.executemany(
            "INSERT INTO items (id, name, price) VALUES (%s, %s, %s)",
            [(2000 + i, f"batch-{i}", i) for i in range(5)],
        )
        # Three Syncs sent back to back before any result is read.
        with c.pipeline() as p:
            c.execute("SELECT id FROM items WHERE id <= %s", (10,))
            p.sync()
            c.execute("UPDATE items SET price = %s WHERE id = %s", (3.5, 4))
            p.sync()
            c.execute("SELECT * FROM nope WHERE id = %s", (1,))
            try:
                p.sync()
            except psycopg.errors.UndefinedTable:
                pass
        c.execute("SELECT count(*) FROM items").fetchall()
    # libpq's own pipeline: three queries and two Syncs leave in one segment.
    pg = psycopg.pq.PGconn.connect(dsn.encode() + b" sslmode=disable")
    assert pg.status == psycopg.pq.ConnStatus.OK, pg.error_message
    pg.enter_pipeline_mode()
    pg.send_query_params(b"SELECT id, name FROM items WHERE id = $1", [b"1"])
    pg.send_query_params(b"SELECT name, price FROM items WHERE id IN ($1, $2)", [b"2", b"3"])
    pg.pipeline_sync()
    pg.send_query_params(b"UPDATE items SET name = $1 WHERE id = $2", [b"x, y", b"5"])
    pg.pipeline_sync()
    # A driver-style batch: 80 INSERTs and one Sync in one segment, more
    # messages than tshark's 2047-byte type column can list.
    for i in range(80):
        pg.send_query_params(
            b"INSERT INTO items (id, name) VALUES ($1, $2)", [str(3000 + i).encode(), b"bulk"]
        )
    pg.pipeline_sync()
    syncs = 0
    while syncs < 3:
        res = pg.get_result()
        if res is not None and res.status == psycopg.pq.ExecStatus.PIPELINE_SYNC:
            syncs += 1
    pg.exit_pipeline_mode()
    pg.finish()

elif scenario == "altport":
    with connect() as c:
        c.execute("SELECT id, name FROM items WHERE id <= 20").fetchall()
        c.execute("SELECT name FROM items WHERE id = %s", (5,)).fetchall()
"""


def main() -> None:
    OUT.mkdir(parents=True, exist_ok=True)
    with (
        tempfile.TemporaryDirectory(prefix="flowprobe-pg-") as tmp,
        Node(subnet="10.252.1.0/24") as node,
    ):
        client = node.add_pod("pgclient")
        server = node.add_pod("postgres")
        # A second cluster on another port for the altport scenario.
        for port in (5432, 5433):
            start_postgres(server, Path(tmp) / str(port), port, password=PASSWORD)

        def run(port: int, scenario: str) -> None:
            run_or_exit(client, ["python3", "-c", CLIENT, server.ip, str(port), scenario], scenario)

        run(5432, "setup")
        run(5433, "setup")
        for port, scenario in (
            (5432, "simple"),
            (5432, "extended"),
            (5432, "pipeline"),
            (5433, "altport"),
        ):
            with record_pcap(node, OUT / f"{scenario}.pcapng", f"inbound and tcp port {port}"):
                run(port, scenario)


if __name__ == "__main__":
    main()
