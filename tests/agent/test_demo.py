"""`make demo` end to end: frontend -> api -> redis/postgres, frontend -> dns, captured live.
Every call the load generator and the api made is reported exactly once."""

from __future__ import annotations

from collections import Counter
from pathlib import Path

import pytest

from flowprobe.devenv.demo import run_demo

pytestmark = [pytest.mark.capture, pytest.mark.netns, pytest.mark.slow]


def test_demo_reports_every_call_of_every_protocol_once(tmp_path: Path) -> None:
    requests = 300
    sent, records = run_demo(requests, 150, tmp_path / "demo.jsonl", dns_lookups=50)
    ex = [r for r in records if r["flowprobe.record"] == "exchange"]
    http = [r for r in ex if r["flowprobe.protocol"] == "http"]
    assert Counter(str(r["http.response.status_code"]) for r in http) == Counter(sent["http"])
    assert all(
        r["http.request.method"] == "GET" and r["url.path"].startswith("/orders/") for r in http
    )
    # The api makes one SELECT per request (orders, or missing_table for id 0).
    selects = [
        r
        for r in ex
        if r["flowprobe.protocol"] == "postgresql" and r["db.operation.name"] == "SELECT"
    ]
    assert len(selects) == requests
    assert {r["db.query.text"] for r in selects} <= {
        "SELECT id, item, qty FROM orders WHERE id = $1",
        "SELECT id, item, qty FROM missing_table WHERE id = $1",
    }
    failed = [r for r in selects if r["flowprobe.outcome"] == "error"]
    assert len(failed) == sent["http"].get("500", 0)
    assert all(r["db.response.status_code"] == "42P01" for r in failed)
    redis_ops = Counter(r["db.operation.name"] for r in ex if r["flowprobe.protocol"] == "redis")
    assert redis_ops["INCRBY"] == requests and redis_ops["GET"] == requests
    dns = [r for r in ex if r["flowprobe.protocol"] == "dns"]
    assert Counter(r["flowprobe.dns.response_code"] for r in dns) == Counter(sent["dns"])
    # Connection records exist for every flow, and client/server roles are right.
    conns = [r for r in records if r["flowprobe.record"] == "connection"]
    assert {c["server.port"] for c in conns} >= {8080, 6379, 5432, 53}
