"""The security stage live: real attacks and real sensitive data between namespace pods.

The agent captures on the node side, as in production; the CRS and the
detectors are the real ones. Every output (records, spans) is checked for
values that should have been masked.
"""

from __future__ import annotations

import json
import subprocess
import sys
import time
from collections.abc import Iterator, Sequence
from pathlib import Path
from typing import Any

import pytest

from flowprobe.devenv.netns import Node, Pod
from flowprobe.devenv.servers import start_http, start_mariadb, start_postgres, start_redis
from tests.agent.helpers import stop_agent

pytestmark = [pytest.mark.capture, pytest.mark.netns, pytest.mark.slow]

# Raw requests, one connection each, so protocol violations reach the wire
# as written. Each names the CRS family it must set off.
ATTACKS: dict[str, tuple[str, bytes]] = {
    "sqli": (
        "942",
        b"GET /items?id=1%27%20UNION%20SELECT%20password%20FROM%20users-- HTTP/1.1\r\n"
        b"Host: api\r\nUser-Agent: curl/8.5\r\nAccept: */*\r\nConnection: close\r\n\r\n",
    ),
    "xss": (
        "941",
        b"GET /search?q=%3Cscript%3Ealert(document.cookie)%3C/script%3E HTTP/1.1\r\n"
        b"Host: api\r\nUser-Agent: curl/8.5\r\nAccept: */*\r\nConnection: close\r\n\r\n",
    ),
    "traversal": (
        "930",
        b"GET /files?name=../../../../etc/passwd HTTP/1.1\r\n"
        b"Host: api\r\nUser-Agent: curl/8.5\r\nAccept: */*\r\nConnection: close\r\n\r\n",
    ),
    "command": (
        "932",
        b"POST /echo HTTP/1.1\r\nHost: api\r\nUser-Agent: curl/8.5\r\nAccept: */*\r\n"
        b"Content-Type: application/x-www-form-urlencoded\r\nContent-Length: 30\r\n"
        b"Connection: close\r\n\r\nhost=127.0.0.1%3Bid%3Buname+-a",
    ),
    "scanner": (
        "913",
        b"GET /admin HTTP/1.1\r\nHost: api\r\nUser-Agent: sqlmap/1.7.2#stable (https://sqlmap.org)"
        b"\r\nAccept: */*\r\nConnection: close\r\n\r\n",
    ),
    "protocol": (
        "920",
        # HTTP/1.1 without a Host header.
        b"GET /nohost HTTP/1.1\r\nUser-Agent: curl/8.5\r\nAccept: */*\r\nConnection: close\r\n\r\n",
    ),
}

SEND = r"""
import socket, sys, json
ip, reqs = sys.argv[1], json.loads(sys.stdin.read())
for raw in reqs:
    s = socket.create_connection((ip, 8080))
    s.sendall(raw.encode("latin-1"))
    while s.recv(65536):
        pass
    s.close()
"""


def _agent(node: Node, out: Path, spans: Path, flags: Sequence[str]) -> subprocess.Popen[bytes]:
    """The agent, once it says it captures (the CRS is loaded before that); spans on stdout."""
    return node.spawn_agent(
        ["-i", "any", "-f", "inbound and tcp", "--output", str(out), "--console-spans", *flags],
        timeout=120,
        stdout=spans.open("wb"),
    )


def _records(path: Path) -> list[dict[str, Any]]:
    return [json.loads(line) for line in path.read_text().splitlines()]


def _captured(
    node: Node, client: Pod, argv: Sequence[str], flags: Sequence[str], tmp_path: Path
) -> tuple[Path, Path]:
    """Records and spans of an agent (``flags``) that saw ``argv`` run in ``client``."""
    out, spans = tmp_path / "x.jsonl", tmp_path / "spans.jsonl"
    agent = _agent(node, out, spans, flags)
    r = client.run([sys.executable, "-c", *argv])
    assert r.returncode == 0, r.stderr
    # The last packets reach the agent before it is told to drain.
    time.sleep(3.0)
    stop_agent(agent)
    return out, spans


def _events(rec: dict[str, Any], name: str) -> list[dict[str, Any]]:
    return [e for e in rec.get("flowprobe.security.events", []) if e["name"] == name]


def test_attacks_set_off_their_crs_family_and_benign_traffic_nothing(
    http_pods: tuple[Node, Pod, Pod], tmp_path: Path
) -> None:
    node, client, api = http_pods
    api_ip = api.ip
    out, spans = tmp_path / "x.jsonl", tmp_path / "spans.jsonl"
    agent = _agent(node, out, spans, ["--waf"])
    raw = [req.decode("latin-1") for _, req in ATTACKS.values()]
    r = client.run([sys.executable, "-c", SEND, api_ip], input=json.dumps(raw))
    assert r.returncode == 0, r.stderr
    # The demo's benign load, against the same server.
    r = client.run(
        [
            sys.executable,
            "-m",
            "flowprobe.devenv.loadgen",
            "--target",
            api_ip,
            "--requests",
            "200",
            "--rate",
            "400",
        ]
    )
    assert r.returncode == 0, r.stderr
    time.sleep(1.0)
    stop_agent(agent)
    records = _records(out)
    by_path = {
        rec["url.path"]: rec for rec in records if not rec["url.path"].startswith("/orders/")
    }
    for name, (family, request) in ATTACKS.items():
        path = request.split(b" ")[1].split(b"?")[0].decode()
        matches = _events(by_path[path], "flowprobe.waf.match")
        families = {str(m["flowprobe.waf.rule.id"])[:3] for m in matches}
        assert family in families, (name, families)
        for m in matches:
            assert m["flowprobe.waf.rule.severity"]
            assert len(m["flowprobe.waf.matched_data"]) <= 64
    benign = [rec for rec in records if rec["url.path"].startswith("/orders/")]
    assert len(benign) == 200
    assert not [rec for rec in benign if "flowprobe.security.events" in rec]
    # The payload kept for inspection never reaches an output.
    text = out.read_text() + spans.read_text()
    assert "flowprobe.payload." not in text
    # The spans carry the same findings as events.
    span_events = [
        e["name"]
        for line in spans.read_text().splitlines()
        for e in json.loads(line)["span"].get("events", [])
    ]
    assert span_events.count("flowprobe.waf.match") >= len(ATTACKS)


CUSTOMERS = [
    {
        "name": "Ada",
        "email": "ada.lovelace@example.com",
        "card": "4111 1111 1111 1111",
        "iban": "DE89370400440532013000",
        "ssn": "078-05-1120",
        "phone": "+44 20 7946 0958",
    },
    {
        "name": "Grace",
        "email": "grace@example.org",
        "card": "5500005555555559",
        "iban": "GB82WEST12345698765432",
        "ssn": "219-09-9999",
        "phone": "+1 415-555-2671",
    },
]
# Same shapes, failing the checks: bad Luhn, bad IBAN checksum, never-issued SSN.
LOOK_ALIKES = {"ref": "4111111111111112", "acct": "DE89370400440532013001", "num": "666-12-3456"}
SECRETS = [
    "4111 1111 1111 1111",
    "4111111111111111",
    "5500005555555559",
    "DE89370400440532013000",
    "GB82WEST12345698765432",
    "078-05-1120",
    "219-09-9999",
    "ada.lovelace@example.com",
    "7946 0958",
    "bob@example.net",
    "42 68 53 00",
]

FRONTEND = r"""
import http.client, json, sys
ip, customers, look = sys.argv[1], json.loads(sys.argv[2]), json.loads(sys.argv[3])
c = http.client.HTTPConnection(ip, 8080, timeout=10)
def call(method, path, doc=None):
    body = json.dumps(doc).encode() if doc is not None else None
    c.request(method, path, body, {"Content-Type": "application/json"} if body else {})
    r = c.getresponse(); return r.status, r.read()
ids = [json.loads(call("POST", "/customers", cu)[1])["id"] for cu in customers]
for i in ids:
    call("GET", f"/customers/{i}")
call("POST", "/contacts", {"email": "bob@example.net", "phone": "+33 1 42 68 53 00"})
call("POST", "/notes", look)
"""


@pytest.fixture
def ddr_pods(tmp_path: Path) -> Iterator[tuple[Node, Pod, Pod, Pod]]:
    with Node(subnet="10.254.7.0/24") as node:
        frontend = node.add_pod("frontend")
        api = node.add_pod("api")
        pg = node.add_pod("postgres")
        start_postgres(pg, tmp_path / "pg")
        start_http(api, 8080, "flowprobe.devenv.secapp", pg.ip)
        yield node, frontend, api, pg


def test_sensitive_records_detected_on_their_edges_masked_and_linked(
    ddr_pods: tuple[Node, Pod, Pod, Pod], tmp_path: Path
) -> None:
    node, frontend, api, pg = ddr_pods
    out, spans = _captured(
        node,
        frontend,
        [FRONTEND, api.ip, json.dumps(CUSTOMERS), json.dumps(LOOK_ALIKES)],
        ["--ddr", "--waf"],
        tmp_path,
    )
    records = _records(out)
    every = {"card", "iban", "national_id", "email", "phone"}

    def on_edge(client_ip: str, server_ip: str) -> list[dict[str, Any]]:
        return [
            rec
            for rec in records
            if rec["client.address"] == client_ip and rec["server.address"] == server_ip
        ]

    http = on_edge(frontend.ip, api.ip)
    posts = [rec for rec in http if rec.get("url.path") == "/customers"]
    gets = [rec for rec in http if str(rec.get("url.path", "")).startswith("/customers/")]
    assert len(posts) == 2 and len(gets) == 2
    for rec in posts + gets:
        assert every <= set(rec["flowprobe.ddr.categories"]), rec
    first_http = {
        e["flowprobe.ddr.category"]
        for rec in http
        for e in _events(rec, "flowprobe.ddr.first_seen")
    }
    assert every <= first_http
    # Each category alerts once per edge: the second record brings nothing new.
    assert not _events(posts[1], "flowprobe.ddr.first_seen")

    sql = on_edge(api.ip, pg.ip)
    inserts = [
        rec for rec in sql if str(rec.get("db.query.text", "")).startswith("INSERT INTO customers")
    ]
    assert len(inserts) == 2
    for rec in inserts:
        assert every <= set(rec["flowprobe.ddr.categories"]), rec
    first_sql = {
        e["flowprobe.ddr.category"] for rec in sql for e in _events(rec, "flowprobe.ddr.first_seen")
    }
    assert every <= first_sql

    # Values that travel apart from the SQL text: Bind parameters (the
    # contact) and the rows a SELECT returns (the customers).
    contacts = [rec for rec in sql if "contacts" in str(rec.get("db.query.text", ""))]
    assert contacts and {"email", "phone"} <= set(contacts[0]["flowprobe.ddr.categories"])
    selects = [rec for rec in sql if str(rec.get("db.query.text", "")).startswith("SELECT")]
    assert selects and all(every <= set(rec["flowprobe.ddr.categories"]) for rec in selects)

    # Look-alikes that fail the checks are not flagged, on either edge.
    notes = [rec for rec in http if rec.get("url.path") == "/notes"]
    note_sql = [rec for rec in sql if "notes" in str(rec.get("db.query.text", ""))]
    assert notes and note_sql
    for rec in notes + note_sql:
        assert "flowprobe.ddr.categories" not in rec, rec

    # Masked everywhere: records and spans.
    text = out.read_text() + spans.read_text()
    for secret in SECRETS:
        assert secret not in text, secret
    assert "************1111" in text

    # Lineage: each POST and the INSERT it caused are one trace.
    # --console-spans prints OTLP/JSON: kind 2 is SERVER, ids in hex.
    span_list = [json.loads(line)["span"] for line in spans.read_text().splitlines()]
    server_posts = [
        s for s in span_list if s["kind"] == "SPAN_KIND_SERVER" and s["name"] == "POST /customers"
    ]
    insert_spans = [s for s in span_list if s["name"].startswith("INSERT")]
    customers_inserts = [s for s in insert_spans if "customers" in s["name"]]
    assert len(server_posts) == 2 and len(customers_inserts) == 2
    assert {s["traceId"] for s in server_posts} == {s["traceId"] for s in customers_inserts}
    post_ids = {s["spanId"] for s in server_posts}
    assert {s["parentSpanId"] for s in customers_inserts} <= post_ids


# The same kind of records stored in MariaDB and Redis and read back: the
# values reach the wire only in result rows and replies (the SELECT's and
# GET's text names none of them).
STORED = [
    {"email": "ada.lovelace@example.com", "card": "4111 1111 1111 1111", "iban": "DE89370400440532013000"},
    {"email": "grace@example.org", "card": "5500005555555559", "iban": "GB82WEST12345698765432"},
]  # fmt: skip
STORED_SECRETS = [v for row in STORED for v in row.values()]

DB_CLIENT = r"""
import json, sys
import pymysql, redis
db_ip, redis_ip, rows, look = sys.argv[1], sys.argv[2], json.loads(sys.argv[3]), json.loads(sys.argv[4])
c = pymysql.connect(host=db_ip, user="app", password="pw", database="shop", autocommit=True)
cur = c.cursor()
cur.execute("CREATE TABLE customers (email VARCHAR(64), card VARCHAR(32), iban VARCHAR(40))")
cur.execute("CREATE TABLE notes (ref VARCHAR(32), acct VARCHAR(40))")
cur.executemany("INSERT INTO customers VALUES (%s, %s, %s)", [list(r.values()) for r in rows])
cur.execute("INSERT INTO notes VALUES (%s, %s)", (look["ref"], look["acct"]))
cur.execute("SELECT email, card, iban FROM customers ORDER BY email")
assert len(cur.fetchall()) == len(rows)
cur.execute("SELECT ref, acct FROM notes")
assert len(cur.fetchall()) == 1
c.close()
# RESP2: RESP3's null and map replies are types tshark 4.0 does not know.
r = redis.Redis(host=redis_ip, protocol=2, socket_timeout=5)
for i, row in enumerate(rows):
    r.hset(f"customer:{i}", mapping=row)
    r.set(f"card:{i}", row["card"])
    r.set(f"mail:{i}", row["email"])
r.set("note", look["ref"])
r.set("acct", look["acct"])
r.hgetall("customer:0")
r.get("card:1")
# One segment, three replies: each value goes to its own GET.
p = r.pipeline(transaction=False)
p.get("mail:0"); p.get("missing"); p.get("card:0")
p.execute()
r.get("note")
r.get("acct")
"""


@pytest.fixture
def db_pods(tmp_path: Path) -> Iterator[tuple[Node, Pod, Pod, Pod]]:
    with Node(subnet="10.254.16.0/24") as node:
        app, db, cache = (node.add_pod(name) for name in ("app", "mariadb", "redis"))
        start_mariadb(
            db,
            tmp_path / "db",
            init_sql="CREATE DATABASE shop; CREATE USER 'app'@'%' IDENTIFIED BY 'pw'; "
            "GRANT ALL ON shop.* TO 'app'@'%';",
        )
        start_redis(cache, tmp_path)
        yield node, app, db, cache


def test_sensitive_values_in_mysql_rows_and_redis_replies_detected_and_masked(
    db_pods: tuple[Node, Pod, Pod, Pod], tmp_path: Path
) -> None:
    node, app, db, cache = db_pods
    argv = [DB_CLIENT, db.ip, cache.ip, json.dumps(STORED), json.dumps(LOOK_ALIKES)]
    out, spans = _captured(node, app, argv, ["--ddr"], tmp_path)
    records = _records(out)
    stored = {"card", "iban", "email"}

    def on(server: Pod, query: str) -> list[dict[str, Any]]:
        return [
            rec
            for rec in records
            if rec["client.address"] == app.ip
            and rec["server.address"] == server.ip
            and rec.get("db.query.text") == query
        ]

    def categories(recs: list[dict[str, Any]]) -> list[set[str]]:
        assert recs
        return [set(rec.get("flowprobe.ddr.categories", ())) for rec in recs]

    # MySQL text result rows.
    assert categories(on(db, "SELECT email, card, iban FROM customers ORDER BY email")) == [stored]
    assert categories(on(db, "SELECT ref, acct FROM notes")) == [set()]
    first_db = {
        e["flowprobe.ddr.category"]
        for rec in records
        if rec["server.address"] == db.ip
        for e in _events(rec, "flowprobe.ddr.first_seen")
    }
    assert stored <= first_db

    # Redis replies: an array, a bulk string, and three replies in one segment.
    assert categories(on(cache, "HGETALL customer:0")) == [stored]
    assert categories(on(cache, "GET card:1")) == [{"card"}]
    assert categories(on(cache, "GET mail:0")) == [{"email"}]
    assert categories(on(cache, "GET missing")) == [set()]
    assert categories(on(cache, "GET card:0")) == [{"card"}]
    # Look-alikes failing the checks (bad Luhn, bad IBAN checksum), read back.
    assert categories(on(cache, "GET note")) == [set()]
    assert categories(on(cache, "GET acct")) == [set()]

    text = out.read_text() + spans.read_text()
    assert "flowprobe.payload." not in text
    for secret in STORED_SECRETS:
        assert secret not in text, secret
