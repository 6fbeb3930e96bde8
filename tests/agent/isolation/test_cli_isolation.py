"""``flowprobe-agent read --isolation-rules``: decisions on a replayed capture, bad rules refused."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from flowprobe.devenv.pcapgen import Conn
from tests.agent.helpers import agent, conn, one_exchange, write

pytestmark = pytest.mark.capture

RESP = b"HTTP/1.1 200 OK\r\nContent-Length: 2\r\n\r\n{}"


def _pcap(tmp_path: Path) -> Path:
    frames: list[bytes] = []
    # Clients 10.9.0.1, .2, .3 and .2 again (another connection).
    requests = [(conn(1), b"/orders/1"), (conn(2), b"/admin/users"), (conn(3), b"/admin/keys")]
    requests.append((Conn(bytes([10, 9, 0, 2]), bytes([10, 9, 1, 1]), 40100, 8080), b"/admin/x"))
    for c, path in requests:
        req = b"POST " + path + b" HTTP/1.1\r\nHost: api\r\nContent-Length: 0\r\n\r\n"
        frames += one_exchange(c, req, RESP)
    return write(tmp_path / "admin.pcap", frames)


def test_replayed_capture_is_judged_but_never_enforced(tmp_path: Path) -> None:
    rules = tmp_path / "rules.json"
    rule = {"name": "no-admin", "type": "DenyRequest", "methods": ["POST"], "paths": ["/admin/*"]}
    # Enforce in the file, but a pcap replay only reports (the host is not touched).
    rules.write_text(json.dumps({"mode": "Enforce", "rules": [rule]}))
    stats = tmp_path / "stats.json"
    r = agent("read", str(_pcap(tmp_path)), "--isolation-rules", str(rules), "--stats", str(stats))
    assert r.returncode == 0, r.stderr
    # The last request repeats a (client, server, port) already judged.
    assert json.loads(stats.read_text())["isolation"] == {"would_block": 2, "already_blocked": 1}
    assert "isolation: would_block" in r.stderr and "rule no-admin: POST /admin/users" in r.stderr


@pytest.mark.parametrize(
    ("content", "message"),
    [
        ("{", "Expecting property name"),
        ('{"rules": [{"name": "r", "type": "DenyRequest"}]}', "needs methods or paths"),
        ('{"mode": "Block", "rules": []}', "mode"),
    ],
)
def test_bad_rules_file_is_refused(tmp_path: Path, content: str, message: str) -> None:
    rules = tmp_path / "rules.json"
    rules.write_text(content)
    r = agent("read", "x.pcap", "--isolation-rules", str(rules))
    assert r.returncode == 2 and message in r.stderr, r.stderr
