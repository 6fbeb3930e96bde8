"""Records tests/data/mysql/*.pcapng from a real MariaDB server and three real clients.

Run as root from the repository root: ``python tests/data/record_mysql.py``
(needs Debian's mariadb-server and mariadb-client, ``pip install pymysql
mysql-connector-python``). The server runs in one network-namespace pod with
TLS off, the clients in another; dumpcap captures on the node side. pymysql
speaks the classic protocol with EOF packets; MySQL Connector/Python asks for
CLIENT_DEPRECATE_EOF and uses server-side prepared statements; the mariadb
command-line client is libmariadb. Each file's scenario and expected counts
are asserted in tests/agent/parse/test_mysql.py.
"""

from __future__ import annotations

import tempfile
from pathlib import Path

from flowprobe.devenv.netns import Node, record_pcap, run_or_exit
from flowprobe.devenv.servers import start_mariadb

OUT = Path(__file__).resolve().parent / "mysql"

CLIENT = r"""
import sys
ip, port, scenario = sys.argv[1], int(sys.argv[2]), sys.argv[3]
KW = dict(host=ip, port=port, user="app", password="flowprobe-secret", database="shop")

if scenario == "setup":
    import pymysql
    c = pymysql.connect(**KW, autocommit=True)
    cur = c.cursor()
    cur.execute("DROP TABLE IF EXISTS items, orders")
    cur.execute("CREATE TABLE items (id INT PRIMARY KEY, name VARCHAR(64) NOT NULL, price DECIMAL(8,2))")
    cur.execute(
        "INSERT INTO items SELECT seq, CONCAT('item-', seq), seq * 1.5 FROM seq_1_to_300"
    )
    c.close()

elif scenario == "queries":
    import pymysql
    from pymysql.constants import CLIENT
    c = pymysql.connect(**KW, autocommit=True, client_flag=CLIENT.MULTI_STATEMENTS)
    cur = c.cursor()
    cur.execute("CREATE TABLE orders (id INT PRIMARY KEY, item_id INT, qty INT)")
    cur.execute("INSERT INTO orders VALUES (1, 1, 2), (2, 5, 1), (3, 7, 4)")
    cur.execute("SELECT id, name, price FROM items ORDER BY id")
    assert len(cur.fetchall()) == 300
    # 1200 rows over several segments; more packets than one column lists.
    cur.execute("SELECT a.id, b.id, a.name FROM items a JOIN items b ON b.id <= 4 ORDER BY a.id, b.id")
    assert len(cur.fetchall()) == 1200
    cur.execute("SELECT id, name FROM items WHERE name = 'item-7, or not'")
    cur.execute("UPDATE items SET price = 2.50 WHERE id <= 12")
    try:
        cur.execute("SELECT * FROM missing_table")
    except pymysql.err.ProgrammingError:
        pass
    cur.execute("SELECT 1; SELECT 2, 3")
    while cur.nextset():
        pass
    c.select_db("shop")
    c.ping(reconnect=False)
    cur.execute("DELETE FROM orders WHERE id > 1")
    # Longer than tshark's 2047-byte column: cut inside the literal.
    cur.execute("SELECT COUNT(*) FROM items WHERE name <> '" + "s3cr3t" * 400 + "'")
    c.close()

elif scenario == "prepared":
    import mysql.connector
    c = mysql.connector.connect(**KW, ssl_disabled=True, autocommit=True, use_pure=True)
    cur = c.cursor(prepared=True)
    for i in (1, 2, 3):
        cur.execute("SELECT id, name, price FROM items WHERE id = %s", (i,))
        cur.fetchall()
    cur.execute("SELECT id, name FROM items WHERE id < %s", (100,))
    assert len(cur.fetchall()) == 99
    cur.execute("UPDATE items SET price = %s WHERE id = %s", ("3.25", 4))
    try:
        cur.execute("SELECT * FROM nope WHERE id = %s", (1,))
    except mysql.connector.Error:
        pass
    try:
        cur.execute("INSERT INTO items (id, name) VALUES (%s, %s)", (1, "dup"))
    except mysql.connector.Error:
        pass
    cur.close()
    plain = c.cursor()
    plain.execute("SELECT COUNT(*) FROM items")
    plain.fetchall()
    c.close()

elif scenario == "deprecate_eof":
    # No Python driver at hand asks for CLIENT_DEPRECATE_EOF (MySQL 8 drivers
    # do), so this speaks the protocol itself: result sets then end with an OK
    # packet whose header is 0xFE instead of two EOF packets.
    import hashlib, socket
    s = socket.create_connection((ip, port))
    def recvn(n):
        b = b""
        while len(b) < n:
            d = s.recv(n - len(b))
            assert d, "closed"
            b += d
        return b
    def read():
        h = recvn(4)
        return recvn(int.from_bytes(h[:3], "little"))
    def send(seq, payload):
        s.sendall(len(payload).to_bytes(3, "little") + bytes([seq]) + payload)
    def lenenc(p, i):
        c = p[i]
        if c < 0xFB: return c, i + 1
        n = {0xFC: 2, 0xFD: 3, 0xFE: 8}[c]
        return int.from_bytes(p[i + 1:i + 1 + n], "little"), i + 1 + n
    def ok_status(p):
        _, i = lenenc(p, 1)
        _, i = lenenc(p, i)
        return int.from_bytes(p[i:i + 2], "little")
    def results():
        rows = 0
        while True:
            p = read()
            if p[0] == 0x00:
                more = ok_status(p) & 8
            elif p[0] == 0xFF:
                return rows, int.from_bytes(p[1:3], "little")
            else:
                ncols, _ = lenenc(p, 0)
                for _ in range(ncols):
                    read()
                while True:
                    p = read()
                    if p[0] == 0xFE and len(p) < 0xFFFFFF:
                        more = ok_status(p) & 8
                        break
                    rows += 1
            if not more:
                return rows, 0
    g = read()
    i = g.index(0, 1) + 1 + 4
    salt = g[i:i + 8]
    i += 8 + 1 + 2 + 1 + 2 + 2 + 1 + 10
    salt += g[i:i + 12]
    h1 = hashlib.sha1(KW["password"].encode()).digest()
    h3 = hashlib.sha1(salt + hashlib.sha1(h1).digest()).digest()
    auth = bytes(a ^ b for a, b in zip(h1, h3))
    caps = 1 | 8 | 0x200 | 0x2000 | 0x8000 | (1 << 16) | (1 << 17) | (1 << 18) | (1 << 19) | (1 << 24)
    login = caps.to_bytes(4, "little") + (1 << 24).to_bytes(4, "little") + bytes([45]) + bytes(23)
    login += b"app\0" + bytes([len(auth)]) + auth + b"shop\0" + b"mysql_native_password\0"
    send(1, login)
    assert read()[0] == 0x00, "login failed"
    def query(q):
        send(0, b"\x03" + q.encode())
        return results()
    assert query("SELECT id, name FROM items WHERE id <= 40") == (40, 0)
    assert query("UPDATE items SET price = 4.50 WHERE id IN (9, 10)") == (0, 0)
    assert query("SELECT * FROM missing_table")[1] == 1146
    assert query("SELECT 1; SELECT 2, 3") == (2, 0)
    send(0, b"\x16" + b"SELECT id, name FROM items WHERE id < ?")
    p = read()
    assert p[0] == 0x00, p
    stmt = p[1:5]
    ncols = int.from_bytes(p[5:7], "little")
    nparams = int.from_bytes(p[7:9], "little")
    for _ in range(ncols + nparams):
        read()
    send(0, b"\x17" + stmt + b"\x00" + (1).to_bytes(4, "little") + b"\x00\x01\x08\x00" + (6).to_bytes(8, "little"))
    assert results() == (5, 0)
    send(0, b"\x19" + stmt)
    send(0, b"\x0e")
    assert read()[0] == 0x00
    send(0, b"\x01")
    s.close()

elif scenario == "altport":
    import pymysql
    c = pymysql.connect(**KW, autocommit=True)
    cur = c.cursor()
    cur.execute("SELECT id, name FROM items WHERE id <= 20")
    cur.execute("UPDATE items SET price = 7.00 WHERE id = 8")
    c.close()
"""


INIT_SQL = (
    "CREATE DATABASE IF NOT EXISTS shop; "
    "CREATE USER IF NOT EXISTS 'app'@'%' IDENTIFIED BY 'flowprobe-secret'; "
    "GRANT ALL ON shop.* TO 'app'@'%';"
)


def main() -> None:
    OUT.mkdir(parents=True, exist_ok=True)
    with (
        tempfile.TemporaryDirectory(prefix="flowprobe-mysql-") as tmp,
        Node(subnet="10.252.2.0/24") as node,
    ):
        client = node.add_pod("myclient")
        server = node.add_pod("mariadb")
        # A second server on another port for the altport scenario.
        for port in (3306, 3307):
            start_mariadb(server, Path(tmp) / str(port), port, INIT_SQL)

        def run(port: int, scenario: str) -> None:
            run_or_exit(client, ["python3", "-c", CLIENT, server.ip, str(port), scenario], scenario)

        def cli(port: int) -> None:
            r = client.run(
                [
                    "mariadb",
                    "--no-defaults",
                    "--skip-ssl",
                    f"--host={server.ip}",
                    f"--port={port}",
                    "--user=app",
                    "--password=flowprobe-secret",
                    "shop",
                    "-e",
                    "SELECT id, name FROM items WHERE id <= 5; "
                    "UPDATE items SET price = 1.00 WHERE id = 6; "
                    "SELECT 1 FROM missing_table",
                ]
            )
            # The last statement fails on purpose.
            if "1146" not in r.stderr:
                raise SystemExit(f"cli: {r.stderr}")

        run(3306, "setup")
        run(3307, "setup")
        for port, scenario in (
            (3306, "queries"),
            (3306, "prepared"),
            (3306, "cli"),
            (3306, "deprecate_eof"),
            (3307, "altport"),
        ):
            with record_pcap(node, OUT / f"{scenario}.pcapng", f"inbound and tcp port {port}"):
                if scenario == "cli":
                    cli(port)
                else:
                    run(port, scenario)


if __name__ == "__main__":
    main()
