"""The security stage on its own: findings on the exchange, alerts, metrics, bounds.

The CRS and the detectors are the real ones; the log exporter is the SDK's
in-memory one, the metrics the agent's own aggregation.
"""

from __future__ import annotations

import pytest
from opentelemetry.sdk._logs.export import InMemoryLogRecordExporter
from opentelemetry.sdk.resources import Resource

from flowprobe.agent.config import AgentConfig, DdrConfig, SecurityConfig, WafConfig
from flowprobe.agent.export.metrics import Metrics
from flowprobe.agent.export.workloads import AddressResolver, Workload
from flowprobe.agent.parse.messages import (
    PAYLOAD_QUERY,
    PAYLOAD_REQUEST_BODY,
    PAYLOAD_REQUEST_HEADERS,
)
from flowprobe.agent.pipeline import Pipeline, Sinks
from flowprobe.agent.security.alerts import Alerts
from flowprobe.agent.security.modsec import ModSecurity
from flowprobe.agent.security.options import from_policy
from flowprobe.agent.security.payload import header_lines, unescape
from flowprobe.agent.security.stage import DDR_FIRST_SEEN, WAF_MATCH, SecurityStage
from flowprobe.agent.sessionize.records import Exchange
from flowprobe.api.v1alpha1 import SecuritySpec
from tests.agent.export.fakes import exchange


def _log_exporter() -> InMemoryLogRecordExporter:
    return InMemoryLogRecordExporter()  # type: ignore[no-untyped-call]


ON = SecurityConfig(waf=WafConfig(enabled=True), ddr=DdrConfig(enabled=True))


@pytest.fixture
def crs() -> ModSecurity:
    """An engine for one stage, which closes it."""
    return ModSecurity.with_crs(ON.waf, ON.body_max_bytes)


def _stage(
    crs: ModSecurity, out: list[Exchange], config: SecurityConfig = ON
) -> tuple[SecurityStage, InMemoryLogRecordExporter, Metrics]:
    logs = _log_exporter()
    resource = Resource({"service.name": "flowprobe-agent"})
    metrics = Metrics(resource)
    stage = SecurityStage(
        config,
        out.append,
        AddressResolver({"10.0.0.2:8080": "api"}),
        metrics=metrics,
        alerts=Alerts(logs, resource).start(),
        waf=crs,
    )
    return stage, logs, metrics


def _sums(metrics: Metrics, name: str) -> dict[tuple[tuple[str, object], ...], float]:
    out = {}
    for rm in metrics.collect().resource_metrics:
        for sm in rm.scope_metrics:
            for m in sm.metrics:
                if m.name == name:
                    for p in m.data.data_points:
                        out[tuple(sorted(p.attributes.items()))] = p.value  # type: ignore[union-attr]
    return out


def test_header_lines_and_escapes_are_decoded() -> None:
    column = "Host: api\\r\\n,Accept: text/html, application/json\\r\\n,X-Cut: abc"
    assert header_lines(column) == [
        ("Host", "api"),
        ("Accept", "text/html, application/json"),
        ("X-Cut", "abc"),
    ]
    assert unescape("a\\r\\nb\\tc\\001") == "a\r\nb\tc\x01"


def test_attack_becomes_span_events_alerts_and_metrics(crs: ModSecurity) -> None:
    out: list[Exchange] = []
    stage, logs, metrics = _stage(crs, out)
    ex = exchange(
        attrs={
            "http.request.method": "GET",
            "url.path": "/items",
            "url.query": "id=1%27%20UNION%20SELECT%20password%20FROM%20users--",
            "network.protocol.version": "1.1",
            "http.response.status_code": 200,
            PAYLOAD_REQUEST_HEADERS: "Host: api\\r\\n,User-Agent: curl/8\\r\\n,Accept: */*\\r\\n",
            PAYLOAD_REQUEST_BODY: "",
        }
    )
    stage.start().submit(ex)
    stage.close()
    assert out == [ex]
    assert not [k for k in ex.attrs if k.startswith("flowprobe.payload.")]
    matches = [a for _, n, a in ex.security_events if n == WAF_MATCH]
    assert {a["flowprobe.waf.rule.id"] for a in matches} >= {942100, 949110}
    records = [r.log_record for r in logs.get_finished_logs()]
    assert len(records) == len(matches)
    first = records[0]
    assert first.severity_text == "CRITICAL" and first.event_name == WAF_MATCH
    assert first.attributes is not None
    assert first.attributes["flowprobe.server.service"] == "api"
    assert first.attributes["client.address"] == "10.0.0.1"
    rules = _sums(metrics, "flowprobe.waf.rule.matches")
    assert (
        rules[(("flowprobe.waf.rule.id", "942100"), ("flowprobe.waf.rule.severity", "CRITICAL"))]
        == 1
    )
    edges = _sums(metrics, "flowprobe.waf.edge.matches")
    assert edges[
        (("flowprobe.client.service", "10.0.0.1"), ("flowprobe.server.service", "api"))
    ] == len(matches)
    assert _sums(metrics, "flowprobe.agent.security.exchanges") == {(("result", "inspected"),): 1}


def test_sensitive_data_is_masked_counted_and_alerted_once_per_edge(crs: ModSecurity) -> None:
    out: list[Exchange] = []
    stage, logs, metrics = _stage(crs, out)
    stage.start()
    for _ in range(2):
        stage.submit(
            exchange(
                protocol="postgresql",
                server=("10.0.0.3", 5432),
                attrs={
                    "db.operation.name": "INSERT",
                    "db.collection.name": "t",
                    "db.query.text": "INSERT INTO t VALUES (?, ?)",
                    PAYLOAD_QUERY: "INSERT INTO t VALUES ('4111111111111111', 'a@example.com')",
                },
            )
        )
    stage.submit(exchange(attrs={"http.request.method": "GET", "url.path": "/u/a@example.com"}))
    stage.close()
    sql1, sql2, http = out
    assert sql1.attrs["flowprobe.ddr.categories"] == ["card", "email"]
    first = {a["flowprobe.ddr.category"] for _, n, a in sql1.security_events if n == DDR_FIRST_SEEN}
    assert first == {"card", "email"}
    assert sql2.security_events == []
    # Exported attributes are masked in place.
    assert http.attrs["url.path"] == "/u/a***@example.com"
    assert "4111111111111111" not in str(sql1.to_dict())
    counts = _sums(metrics, "flowprobe.ddr.detections")
    key = (
        ("flowprobe.client.service", "10.0.0.1"),
        ("flowprobe.ddr.category", "card"),
        ("flowprobe.endpoint", "INSERT t"),
        ("flowprobe.server.service", "10.0.0.3:5432"),
    )
    assert counts[key] == 2
    bodies = [
        str(r.log_record.body)
        for r in logs.get_finished_logs()
        if r.log_record.event_name == DDR_FIRST_SEEN
    ]
    assert "first card data on 10.0.0.1 -> 10.0.0.3:5432" in bodies
    assert len(bodies) == 3  # card and email on the SQL edge, email on the HTTP edge


def test_a_full_queue_passes_exchanges_uninspected_then_drops_never_blocks(
    crs: ModSecurity,
) -> None:
    out: list[Exchange] = []
    config = ON.model_copy(update={"queue_size": 16})
    stage, _logs, metrics = _stage(crs, out, config)
    # Not started: nothing drains, as with a stage that cannot keep up.
    for _ in range(100):
        stage.submit(exchange(attrs={"http.request.method": "GET", PAYLOAD_REQUEST_BODY: "x"}))
    assert stage.overflow == {"skipped": 48, "dropped": 36}
    stage.start()
    stage.close()
    assert len(out) == 64
    assert all(not any(k.startswith("flowprobe.payload.") for k in ex.attrs) for ex in out)
    assert _sums(metrics, "flowprobe.agent.security.exchanges") == {
        (("result", "inspected"),): 16,
        (("result", "skipped"),): 48,
        (("result", "dropped"),): 36,
    }


def test_out_of_time_at_close_the_rest_passes_uninspected(crs: ModSecurity) -> None:
    out: list[Exchange] = []
    stage = SecurityStage(ON, out.append, AddressResolver(), waf=crs)
    for _ in range(200):
        stage.submit(exchange(attrs={"http.request.method": "GET", PAYLOAD_REQUEST_BODY: "x"}))
    stage.start()
    # Each CRS pass takes milliseconds: 200 cannot be done in one.
    stage.close(timeout_s=0.001)
    totals = stage.totals()
    assert len(out) == 200 and totals["skipped"] >= 1
    assert totals["inspected"] + totals["skipped"] == 200
    assert all(not any(k.startswith("flowprobe.payload.") for k in ex.attrs) for ex in out)


def test_a_failing_downstream_is_counted_and_the_stage_goes_on(crs: ModSecurity) -> None:
    seen: list[Exchange] = []

    def flaky(ex: Exchange) -> None:
        seen.append(ex)
        if len(seen) == 1:
            raise RuntimeError("sink broke")

    stage = SecurityStage(ON, flaky, AddressResolver(), waf=crs)
    stage.start()
    for _ in range(3):
        stage.submit(exchange())
    stage.close()
    assert len(seen) == 3 and stage.counts["error"] == 1


def test_workload_attributes_name_both_ends_in_alerts(crs: ModSecurity) -> None:
    class K8s:
        def server(self, address: str, port: int, at_us: int = 0) -> Workload | None:
            return Workload("api", (("k8s.pod.name", "api-7d9"),))

        def client(self, address: str, at_us: int = 0) -> Workload | None:
            return None  # outside the cluster

    logs = _log_exporter()
    stage = SecurityStage(ON, lambda ex: None, K8s(), alerts=Alerts(logs, Resource({})).start())
    stage.start().submit(
        exchange(attrs={"http.request.method": "GET", "url.path": "/a@example.com"})
    )
    stage.close()
    (record,) = logs.get_finished_logs()
    attrs = record.log_record.attributes or {}
    assert attrs["flowprobe.server.k8s.pod.name"] == "api-7d9"
    assert attrs["flowprobe.client.service"] == "external"


def test_security_off_leaves_the_tshark_columns_as_they_were() -> None:
    http = ("http.request.line", "http.response.line", "http.file_data")
    values = ("pgsql.val.data", "mysql.row.text")

    def layout(config: AgentConfig) -> tuple[str, ...]:
        return Pipeline(config, Sinks()).layout.fields

    def columns(config: AgentConfig) -> str:
        # A column may hold several fields ("a or b"): look at the text.
        return " ".join(layout(config))

    default = columns(AgentConfig())
    on = columns(AgentConfig(security=ON))
    assert not [f for f in (*http, *values) if f in default]
    assert all(f in on for f in (*http, *values))
    # Values only matter to the sensitive-data scan.
    waf_only = AgentConfig(security=SecurityConfig(waf=WafConfig(enabled=True)))
    assert not [f for f in values if f in columns(waf_only)]
    # They ride in columns the layout has anyway: only HTTP's are new.
    ddr_only = AgentConfig(security=SecurityConfig(ddr=DdrConfig(enabled=True)))
    assert len(layout(ddr_only)) == len(layout(AgentConfig())) + len(http)


def test_alerts_queue_is_bounded() -> None:
    logs = _log_exporter()
    alerts = Alerts(logs, Resource({}), queue_size=4)
    for i in range(10):
        alerts.emit("e", i, "WARNING", "b", {})
    assert alerts.counts["dropped"] == 6
    alerts.start()
    alerts.close()
    assert len(logs.get_finished_logs()) == 4 and alerts.counts["exported"] == 4


def test_a_policys_security_spec_becomes_agent_settings() -> None:
    spec = SecuritySpec.model_validate(
        {
            "waf": {
                "mode": "DetectionOnly",
                "paranoiaLevel": 2,
                "excludedRules": ["942100-942199"],
            },
            "sensitiveData": {"mode": "Detect", "categories": ["CardNumber", "IBAN"]},
            "bodyMaxBytes": 512,
        }
    )
    config = from_policy(spec)
    assert config.waf.enabled and config.waf.paranoia_level == 2
    assert config.waf.excluded_rules == ("942100-942199",)
    assert config.ddr.enabled and config.ddr.categories == ("card", "iban")
    assert config.body_max_bytes == 512
    assert not from_policy(SecuritySpec()).enabled
    assert from_policy(SecuritySpec()).waf.excluded_rules == WafConfig().excluded_rules
