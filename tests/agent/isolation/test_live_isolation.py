"""Micro-isolation live: the agent blocks through real nftables in the node namespace.

Pods are network namespaces routed through the node namespace (forward
path), as on a Kubernetes node; the agent runs there, as a DaemonSet pod on
the host network would. Every test also checks that a table someone else
made is left exactly as it was.
"""

from __future__ import annotations

import json
import os
import signal
import sys
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

from flowprobe.agent.isolation.engine import ISOLATION_EVENT
from flowprobe.agent.isolation.nft import TABLE
from flowprobe.devenv.netns import Node, Pod
from flowprobe.devenv.nsproxy import Forwarder
from flowprobe.devenv.servers import start_http
from tests.agent.export.fakes import FakeGrpcReceiver, attrs
from tests.agent.helpers import stop_agent
from tests.operator.clusterkit import wait_until

pytestmark = [pytest.mark.capture, pytest.mark.netns, pytest.mark.slow]

# One request on a fresh connection: the status, or the error's name.
REQUEST = r"""
import http.client, sys
ip, method, path = sys.argv[1:4]
try:
    c = http.client.HTTPConnection(ip, 8080, timeout=5)
    c.request(method, path, b"x" if method == "POST" else None)
    r = c.getresponse(); r.read(); print(r.status)
except OSError as exc:
    print(type(exc).__name__)
"""
FOREIGN = """table inet someone_else {
  chain forward {
    type filter hook forward priority filter; policy accept;
    ip saddr 192.0.2.1 drop
  }
}
"""
NO_ADMIN = {"name": "no-admin", "type": "DenyRequest", "methods": ["POST"], "paths": ["/admin*"]}
DENY_ADMIN: dict[str, Any] = {"mode": "Enforce", "blockSeconds": 600, "rules": [NO_ADMIN]}


def request(pod: Pod, server: Pod, method: str = "GET", path: str = "/orders/1") -> str:
    r = pod.run([sys.executable, "-c", REQUEST, server.ip, method, path], timeout=30)
    assert r.returncode == 0, r.stderr
    return r.stdout.strip()


def nft(node: Node, *args: str) -> str:
    return node.exec_node(["nft", *args]).stdout


def blocks(node: Node) -> set[tuple[str, str, int]] | None:
    """The agent's blocked triples; None when its table does not exist."""
    tables = json.loads(nft(node, "-j", "list", "tables", "inet"))["nftables"]
    if not any(t.get("table", {}).get("name") == TABLE for t in tables):
        return None
    data = json.loads(nft(node, "-j", "list", "set", "inet", TABLE, "block4"))["nftables"]
    return {
        tuple(e["elem"]["val"]["concat"])
        for item in data
        for e in item.get("set", {}).get("elem", [])
    }


@pytest.fixture
def pods(tmp_path: Path) -> Iterator[tuple[Node, Pod, Pod, Pod]]:
    """A node (with a foreign nftables table) and two clients of an ``api`` pod."""
    with Node(subnet="10.253.7.0/24") as node:
        c1, c2 = node.add_pod("c1"), node.add_pod("c2")
        api = node.add_pod("api")
        start_http(api, 8080)
        (tmp_path / "foreign.nft").write_text(FOREIGN)
        nft(node, "-f", str(tmp_path / "foreign.nft"))
        foreign = nft(node, "-j", "list", "table", "inet", "someone_else")
        yield node, c1, c2, api
        assert nft(node, "-j", "list", "table", "inet", "someone_else") == foreign


def start(node: Node, tmp_path: Path, rules: dict[str, Any], *flags: str) -> Any:
    path = tmp_path / "rules.json"
    path.write_text(json.dumps(rules))
    return node.spawn_agent(
        [
            "-i",
            "any",
            "-f",
            "inbound and tcp",
            "--output",
            str(tmp_path / "x.jsonl"),
            "--isolation-rules",
            str(path),
            "--stats",
            str(tmp_path / "stats.json"),
            *flags,
        ],
        timeout=120,
    )


def stats(tmp_path: Path) -> dict[str, int]:
    report: dict[str, int] = json.loads((tmp_path / "stats.json").read_text())["isolation"]
    return report


def test_denied_request_blocks_its_client_until_ttl_rule_change_and_removal(
    pods: tuple[Node, Pod, Pod, Pod], tmp_path: Path
) -> None:
    node, c1, c2, api = pods
    rules = {**DENY_ADMIN, "blockSeconds": 3}
    agent = start(node, tmp_path, rules, "--isolation-protect", c2.ip)
    assert blocks(node) == set()
    assert request(c1, api) == "200"
    assert request(c1, api, "POST", "/admin/users") == "200"
    wait_until(lambda: blocks(node) == {(c1.ip, api.ip, 8080)}, "the block", interval=0.1)
    assert request(c1, api) == "ConnectionRefusedError"
    # Other clients keep working; a protected one breaking the rule is not blocked.
    assert request(c2, api) == "200"
    assert request(c2, api, "POST", "/admin") == "200"
    assert request(c2, api) == "200"
    # The TTL lifts the block (the kernel removes the element).
    wait_until(lambda: blocks(node) == set(), "the TTL", interval=0.1)
    assert request(c1, api) == "200"

    # A rule change lifts the blocks of the old rules at once.
    assert request(c1, api, "POST", "/admin") == "200"
    wait_until(lambda: blocks(node) == {(c1.ip, api.ip, 8080)}, "the second block", interval=0.1)
    changed = {**DENY_ADMIN, "rules": [{**NO_ADMIN, "paths": ["/debug/*"]}]}
    (tmp_path / "rules.json").write_text(json.dumps(changed))
    wait_until(lambda: blocks(node) == set(), "the rule change", interval=0.1)
    assert request(c1, api) == "200"
    assert request(c1, api, "POST", "/admin") == "200"
    assert request(c1, api) == "200"
    # Removing the rules removes the table.
    (tmp_path / "rules.json").unlink()
    wait_until(lambda: blocks(node) is None, "the table's removal", interval=0.1)
    stop_agent(agent)
    counts = stats(tmp_path)
    assert counts["blocked"] == 2 and counts["protected"] == 1, counts


def test_dry_run_blocks_nothing_but_reports(
    pods: tuple[Node, Pod, Pod, Pod], tmp_path: Path
) -> None:
    node, c1, _c2, api = pods
    rules = {k: v for k, v in DENY_ADMIN.items() if k != "mode"}  # DryRun is the default
    receiver = FakeGrpcReceiver()
    try:
        # The receiver listens on the machine's loopback; the agent reaches it from the node.
        with Forwarder(
            ("127.0.0.1", 0), ("127.0.0.1", receiver.port), listen_netns=node.netns
        ) as fwd:
            otlp = ["--otlp-endpoint", f"http://127.0.0.1:{fwd.port}", "--otlp-insecure"]
            agent = start(node, tmp_path, rules, *otlp)
            assert request(c1, api, "POST", "/admin") == "200"
            for _ in range(3):
                assert request(c1, api) == "200"
                assert request(c1, api, "POST", "/admin") == "200"
            assert blocks(node) is None
            stop_agent(agent)
    finally:
        receiver.stop()
    counts = stats(tmp_path)
    # One report per (client, server, port) and TTL; the repeats are only counted.
    assert counts["would_block"] == 1 and counts.get("blocked", 0) == 0, counts
    assert counts["already_blocked"] >= 1, counts
    records = [
        lr
        for req in receiver.received.logs
        for rl in req.resource_logs
        for sl in rl.scope_logs
        for lr in sl.log_records
        if lr.event_name == ISOLATION_EVENT
    ]
    assert len(records) == 1
    got = attrs(records[0].attributes)
    assert got["flowprobe.isolation.action"] == "would_block"
    assert got["flowprobe.isolation.mode"] == "DryRun"
    assert (got["client.address"], got["server.address"], got["server.port"]) == (
        c1.ip,
        api.ip,
        8080,
    )
    assert "flowprobe.isolation.actions" in receiver.received.metric_names()


def test_restart_after_a_crash_leaves_no_stale_rules(
    pods: tuple[Node, Pod, Pod, Pod], tmp_path: Path
) -> None:
    node, c1, c2, api = pods
    # Workloads by the names the standalone agent gives them (--service-name).
    named = {**NO_ADMIN, "from": {"workloads": ["frontend"]}, "to": {"workloads": ["api"]}}
    rules = {**DENY_ADMIN, "rules": [named]}
    names = ["--service-name", f"{c1.ip}=frontend", "--service-name", f"{api.ip}:8080=api"]
    agent = start(node, tmp_path, rules, *names)
    assert request(c2, api, "POST", "/admin") == "200"  # not the frontend
    assert request(c1, api, "POST", "/admin") == "200"
    wait_until(lambda: blocks(node) == {(c1.ip, api.ip, 8080)}, "the block", interval=0.1)
    os.killpg(agent.pid, signal.SIGKILL)
    agent.wait()
    # A crash cannot clean up: the block outlives the agent ...
    assert blocks(node) == {(c1.ip, api.ip, 8080)}
    assert request(c1, api) == "ConnectionRefusedError"
    # ... until the next agent starts, which begins with an empty table.
    agent = start(node, tmp_path, rules, *names)
    assert blocks(node) == set()
    assert request(c1, api) == "200"
    assert request(c2, api) == "200"
    stop_agent(agent)
    assert blocks(node) is None


def test_critical_crs_match_blocks_the_source(
    pods: tuple[Node, Pod, Pod, Pod], tmp_path: Path
) -> None:
    node, c1, c2, api = pods
    rules = {
        "mode": "Enforce",
        "rules": [{"name": "crs-critical", "type": "BlockOnWafMatch", "minSeverity": "Critical"}],
    }
    agent = start(node, tmp_path, rules, "--waf")
    sqli = "/items?id=1%27%20UNION%20SELECT%20password%20FROM%20users--"
    assert request(c2, api, "GET", "/orders/7") == "200"
    request(c1, api, "GET", sqli)
    wait_until(lambda: blocks(node) == {(c1.ip, api.ip, 8080)}, "the block", interval=0.1)
    assert request(c1, api) == "ConnectionRefusedError"
    assert request(c2, api) == "200"
    stop_agent(agent)
    assert blocks(node) is None
    assert stats(tmp_path)["blocked"] == 1


def test_new_edge_after_learning_is_blocked(
    pods: tuple[Node, Pod, Pod, Pod], tmp_path: Path
) -> None:
    node, c1, c2, api = pods
    learning_s = 15
    rule = {"name": "edges", "type": "DenyNewEdge", "learningSeconds": learning_s}
    rules = {"mode": "Enforce", "rules": [{**rule, "to": {"ports": [8080]}}]}
    agent = start(node, tmp_path, rules)
    # The window opened before the agent said it captures: it ends before this.
    learning_ends = time.monotonic() + learning_s
    assert request(c1, api) == "200"  # learned
    # The feature is a time window: nothing to poll until it has passed.
    time.sleep(max(0.0, learning_ends - time.monotonic()) + 0.5)
    assert request(c1, api) == "200"
    assert request(c2, api) == "200"  # a new edge: reported and blocked after the exchange
    wait_until(lambda: blocks(node) == {(c2.ip, api.ip, 8080)}, "the block", interval=0.1)
    assert request(c2, api) == "ConnectionRefusedError"
    assert request(c1, api) == "200"
    stop_agent(agent)
    assert stats(tmp_path) == {"blocked": 1}
