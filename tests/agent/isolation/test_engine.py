"""Rule matching and reporting of the isolation engine, with an in-memory table.

The real nftables path is covered by test_live_isolation.py; these check the
decisions (which rule, which triple, how often), the log records and the
guards against blocking protected addresses, fast and without root.
"""

from __future__ import annotations

import time
from typing import Any

import pytest
from opentelemetry.sdk._logs.export import InMemoryLogRecordExporter
from opentelemetry.sdk.resources import Resource
from pydantic import ValidationError

from flowprobe.agent.export.workloads import AddressResolver
from flowprobe.agent.isolation.engine import ISOLATION_EVENT, IsolationEngine
from flowprobe.agent.isolation.nft import NftTable
from flowprobe.agent.security.alerts import Alerts
from flowprobe.agent.security.stage import WAF_MATCH
from flowprobe.api.v1alpha1 import IsolationSpec, ProbePolicySpec
from tests.agent.export.fakes import exchange
from tests.operator.clusterkit import wait_until

NOW_US = int(time.time() * 1_000_000)
CLIENT, OTHER, SERVER = "10.0.0.1", "10.0.0.9", "10.0.0.2"


class MemoryTable(NftTable):
    """Records what would be sent to nft."""

    def __init__(self) -> None:
        super().__init__()
        self.up = False
        # What is blocked now, and every block ever made.
        self.blocked: list[tuple[str, str, int, int]] = []
        self.history: list[tuple[str, str, int, int]] = []

    def replace(self) -> None:
        self.up, self.blocked = True, []

    def delete(self) -> None:
        self.up, self.blocked = False, []

    def exists(self) -> bool:
        return self.up

    def block(self, source: str, destination: str, port: int, seconds: int) -> None:
        self.blocked.append((source, destination, port, seconds))
        self.history.append((source, destination, port, seconds))


def _engine(
    rules: list[dict[str, Any]], mode: str = "Enforce", **spec: Any
) -> tuple[IsolationEngine, MemoryTable, InMemoryLogRecordExporter]:
    table = MemoryTable()
    logs = InMemoryLogRecordExporter()  # type: ignore[no-untyped-call]
    alerts = Alerts(logs, Resource.create({"service.name": "flowprobe-agent"})).start()
    engine = IsolationEngine(
        AddressResolver({f"{SERVER}:8080": "api", CLIENT: "frontend"}),
        table,
        alerts=alerts,
        protected=["192.0.2.0/24"],
    )
    engine.configure(
        [("", IsolationSpec.model_validate({"mode": mode, "rules": rules, **spec}))],
        host_addresses=["10.0.0.254"],
    )
    return engine.start(), table, logs


def _http(client: str, method: str, path: str, server: str = SERVER) -> Any:
    return exchange(
        client=(client, 40000),
        server=(server, 8080),
        start_us=NOW_US,
        attrs={"http.request.method": method, "url.path": path},
    )


def _drain(engine: IsolationEngine) -> None:
    """Stop the engine (it enforces what is queued first)."""
    engine.close()


def test_deny_request_blocks_matching_method_and_path_once_per_ttl() -> None:
    rule = {
        "name": "no-admin",
        "type": "DenyRequest",
        "from": {"workloads": ["frontend"]},
        "to": {"workloads": ["api"], "ports": [8080]},
        "methods": ["POST", "DELETE"],
        "paths": ["/admin/*"],
        "blockSeconds": 30,
    }
    engine, table, logs = _engine([rule])
    engine.submit(_http(CLIENT, "GET", "/admin/users"))  # method not denied
    engine.submit(_http(CLIENT, "POST", "/orders"))  # path not denied
    engine.submit(_http(OTHER, "POST", "/admin/users"))  # another workload
    engine.submit(_http(CLIENT, "POST", "/admin/users"))
    engine.submit(_http(CLIENT, "DELETE", "/admin/x/y"))  # same triple, already blocked
    _drain(engine)
    assert table.history == [(CLIENT, SERVER, 8080, 30)]
    assert engine.totals() == {"blocked": 1, "already_blocked": 1}
    (record,) = [r.log_record for r in logs.get_finished_logs()]
    assert record.event_name == ISOLATION_EVENT
    attrs = dict(record.attributes or {})
    assert attrs["flowprobe.isolation.rule"] == "no-admin"
    assert attrs["flowprobe.isolation.action"] == "blocked"
    assert attrs["flowprobe.isolation.reason"] == "POST /admin/users"
    assert attrs["client.address"] == CLIENT and attrs["server.port"] == 8080
    assert attrs["flowprobe.client.service"] == "frontend"
    # Stopping removes the table.
    assert not table.up


def test_dry_run_reports_without_touching_the_table() -> None:
    engine, table, logs = _engine(
        [{"name": "r", "type": "DenyRequest", "paths": ["/*"]}], mode="DryRun"
    )
    engine.submit(_http(CLIENT, "GET", "/x"))
    _drain(engine)
    assert not table.up and table.blocked == []
    assert engine.totals() == {"would_block": 1}
    (record,) = logs.get_finished_logs()
    assert dict(record.log_record.attributes or {})["flowprobe.isolation.action"] == "would_block"


def test_node_api_server_and_protected_addresses_are_never_blocked() -> None:
    rule = {"name": "r", "type": "DenyRequest", "paths": ["/*"]}
    engine, table, _logs = _engine([rule], protectedCidrs=["10.0.1.0/24"])
    engine.submit(_http("10.0.0.254", "GET", "/"))  # the node's own address
    engine.submit(_http("192.0.2.7", "GET", "/"))  # --isolation-protect / API server
    engine.submit(_http("10.0.1.3", "GET", "/"))  # protectedCidrs
    engine.submit(_http(CLIENT, "GET", "/", server="10.0.0.254"))  # towards the node
    _drain(engine)
    assert table.blocked == []
    assert engine.totals() == {"protected": 4}


def test_new_edge_after_learning_and_waf_severity() -> None:
    rules: list[dict[str, Any]] = [
        {"name": "edges", "type": "DenyNewEdge", "learningSeconds": 60, "to": {"ports": [8080]}},
        {"name": "crs", "type": "BlockOnWafMatch", "minSeverity": "Critical"},
    ]
    engine, table, _logs = _engine(rules)
    learned = _http(CLIENT, "GET", "/")
    engine.submit(learned)
    # Exchange times are capture times; the learning window starts at configure().
    later = int(time.time() * 1_000_000) + 120_000_000
    known = _http(CLIENT, "GET", "/")
    known.start_us = later
    new = _http(OTHER, "GET", "/")
    new.start_us = later
    engine.submit(known)
    engine.submit(new)
    warning = _http("10.0.0.3", "GET", "/")
    warning.security_events.append((NOW_US, WAF_MATCH, {"flowprobe.waf.rule.severity": "WARNING"}))
    critical = _http("10.0.0.4", "GET", "/")
    critical.security_events.append(
        (
            NOW_US,
            WAF_MATCH,
            {"flowprobe.waf.rule.severity": "CRITICAL", "flowprobe.waf.rule.id": 942100},
        )
    )
    engine.submit(warning)
    engine.submit(critical)
    _drain(engine)
    assert {b[0] for b in table.history} == {OTHER, "10.0.0.4"}


def test_rule_change_lifts_blocks_and_rules_are_scoped_per_policy() -> None:
    engine, table, _logs = _engine([{"name": "r", "type": "DenyRequest", "paths": ["/*"]}])
    engine.submit(_http(CLIENT, "GET", "/"))
    wait_until(lambda: table.blocked, "the block", timeout=10, interval=0.01)
    spec = IsolationSpec.model_validate(
        {"mode": "Enforce", "rules": [{"name": "r", "type": "DenyRequest", "paths": ["/a"]}]}
    )
    engine.configure([("p1", spec)])
    assert table.up and table.blocked == []
    engine.submit(_http(CLIENT, "GET", "/a"), scopes=["p2"])  # another policy's exchange
    engine.submit(_http(OTHER, "GET", "/a"), scopes=["p1"])
    _drain(engine)
    assert [b[0] for b in table.history] == [CLIENT, OTHER]


@pytest.mark.parametrize(
    ("rule", "message"),
    [
        ({"name": "r", "type": "DenyRequest"}, "needs methods or paths"),
        ({"name": "r", "type": "DenyNewEdge"}, "learningSeconds is required"),
        ({"name": "r", "type": "DenyNewEdge", "learningSeconds": 1, "paths": ["/"]}, "only to"),
        (
            {"name": "r", "type": "DenyRequest", "paths": ["/"], "minSeverity": "Error"},
            "minSeverity",
        ),
        ({"name": "r", "type": "DenyRequest", "paths": ["/"], "from": {"cidrs": ["x"]}}, "x"),
    ],
)
def test_bad_rules_are_refused(rule: dict[str, Any], message: str) -> None:
    with pytest.raises(ValidationError, match=message):
        IsolationSpec.model_validate({"rules": [rule]})


def test_waf_rules_need_the_waf() -> None:
    spec = {
        "namespaceSelector": {},
        "isolation": {"rules": [{"name": "r", "type": "BlockOnWafMatch"}]},
    }
    with pytest.raises(ValidationError, match=r"need security\.waf\.mode DetectionOnly"):
        ProbePolicySpec.model_validate(spec)
    ProbePolicySpec.model_validate({**spec, "security": {"waf": {"mode": "DetectionOnly"}}})
