"""Isolation in the daemon: per-policy scopes, API server protection, stale tables, removal."""

from __future__ import annotations

from typing import Any

from flowprobe.agent.enrich.index import ClusterIndex
from flowprobe.agent.isolation.daemon import DaemonIsolation, api_server_addresses
from flowprobe.devenv.k8sobjects import policy
from tests.agent.export.fakes import exchange
from tests.agent.isolation.test_engine import MemoryTable
from tests.operator.clusterkit import wait_until


def _http(client: str) -> Any:
    return exchange(
        client=(client, 40000),
        server=("10.244.0.9", 8080),
        attrs={"http.request.method": "POST", "url.path": "/admin"},
    )


def test_api_server_addresses() -> None:
    assert api_server_addresses("https://10.0.0.1:6443", "10.96.0.1") == ["10.96.0.1", "10.0.0.1"]
    assert "127.0.0.1" in api_server_addresses("https://localhost:6443", None)
    assert api_server_addresses("https://[fd00::1]:6443", None) == ["fd00::1"]


def test_policies_rules_apply_to_their_exchanges_and_go_with_them() -> None:
    iso = DaemonIsolation(ClusterIndex(), "https://10.0.0.1:6443")
    table = MemoryTable()
    table.up = True  # left by a crashed agent
    iso.engine.table = table
    iso.sync([policy("plain")], lambda p: None)
    assert not table.exists()  # the first sync removes it, rules or not
    rule = {"name": "no-admin", "type": "DenyRequest", "paths": ["/admin"]}
    guarded = policy("guarded", isolation={"mode": "Enforce", "rules": [rule]})
    plain = policy("plain")
    iso.sync([guarded, plain], lambda p: None)
    assert table.exists()
    iso.submit(_http("10.244.0.5"), [plain])  # not selected by the policy with rules
    iso.submit(_http("10.0.0.1"), [guarded])  # the API server
    iso.submit(_http("10.244.0.6"), [plain, guarded])
    wait_until(
        lambda: sum(iso.engine.totals().values()) >= 2, "two decisions", timeout=10, interval=0.01
    )
    iso.sync([plain], lambda p: None)  # rules gone: the table goes
    assert not table.exists()
    iso.close()
    assert table.history == [("10.244.0.6", "10.244.0.9", 8080, 300)]
    totals = iso.engine.totals()
    assert totals == {"protected": 1, "blocked": 1}, totals
