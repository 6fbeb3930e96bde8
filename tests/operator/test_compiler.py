"""ProbePolicy objects -> CompiledPolicySet and per-policy verdicts."""

from __future__ import annotations

import datetime
from decimal import Decimal
from typing import Any

import pytest

from flowprobe.api.policyset import CompiledPolicySet
from flowprobe.api.v1alpha1 import Reason
from flowprobe.controller.compiler import (
    Compilation,
    Unparseable,
    compile_policies,
    parse_policy,
    parse_quantity,
)
from flowprobe.controller.config import OperatorConfig
from tests.operator.support import NOW, make_config, policy_body


def _compile(
    *bodies: dict[str, Any],
    config: OperatorConfig | None = None,
    previous: CompiledPolicySet | None = None,
    now: datetime.datetime = NOW,
) -> Compilation:
    return compile_policies(
        [parse_policy(b) for b in bodies], config or make_config(), previous=previous, now=now
    )


def _spec(**extra: Any) -> dict[str, Any]:
    return {"namespaceSelector": {"matchLabels": {"team": "a"}}, **extra}


def test_minimal_policy_uses_the_default_export() -> None:
    comp = _compile(policy_body("web"))
    (entry,) = comp.policy_set.policies
    assert entry.export.endpoint == "http://otel-collector.observability:4317"
    assert entry.not_after is None
    assert [o.name for o in comp.owners] == ["web"]
    assert comp.verdicts["web"].errors == [] and comp.secrets == []


def test_security_settings_reach_the_agents_only_when_set() -> None:
    security = {"waf": {"mode": "DetectionOnly"}, "sensitiveData": {"mode": "Detect"}}
    comp = _compile(policy_body("web"), policy_body("api", spec=_spec(security=security)))
    entries = {p.name: p for p in comp.policy_set.policies}
    assert entries["web"].security is None
    api = entries["api"].security
    assert api is not None and api.waf.mode == "DetectionOnly"
    assert '"security"' in comp.policy_set.to_json()
    assert CompiledPolicySet.from_json(comp.policy_set.to_json()) == comp.policy_set


def test_anomaly_settings_reach_the_agents_only_when_on() -> None:
    anomalies = {"mode": "Detect", "baseline": {"intervalSeconds": 5}}
    off = {"mode": "Off", "topN": {"size": 3}}
    comp = _compile(
        policy_body("web", spec=_spec(anomalies=off)),
        policy_body("api", spec=_spec(anomalies=anomalies)),
    )
    entries = {p.name: p for p in comp.policy_set.policies}
    assert entries["web"].anomalies is None
    api = entries["api"].anomalies
    assert api is not None and api.baseline.interval_seconds == 5 and api.top_n.size == 10
    assert CompiledPolicySet.from_json(comp.policy_set.to_json()) == comp.policy_set


def test_isolation_rules_reach_the_agents_only_when_set() -> None:
    rule = {"name": "no-admin", "type": "DenyRequest", "paths": ["/admin/*"]}
    isolation = {"mode": "Enforce", "rules": [rule]}
    comp = _compile(policy_body("web"), policy_body("api", spec=_spec(isolation=isolation)))
    entries = {p.name: p for p in comp.policy_set.policies}
    assert entries["web"].isolation is None
    api = entries["api"].isolation
    assert api is not None and api.mode == "Enforce" and api.rules[0].paths == ["/admin/*"]
    text = comp.policy_set.to_json()
    assert '"isolation"' in text and '"from"' in text
    assert CompiledPolicySet.from_json(text) == comp.policy_set


def test_without_any_export_endpoint_the_policy_is_not_applied() -> None:
    config = make_config(defaultExport=None)
    comp = _compile(policy_body("web"), config=config)
    assert comp.empty
    (issue,) = comp.verdicts["web"].errors
    assert issue.reason == Reason.NO_EXPORT_ENDPOINT
    assert "spec.export.otlp.endpoint" in issue.message


def test_bad_redaction_regex_is_reported_and_does_not_affect_others() -> None:
    bad = policy_body("bad", _spec(redaction={"patterns": [{"name": "card", "regex": "([0-9"}]}))
    comp = _compile(bad, policy_body("good"))
    assert [p.name for p in comp.policy_set.policies] == ["good"]
    (issue,) = comp.verdicts["bad"].errors
    assert issue.reason == Reason.INVALID_SPEC and "patterns[card].regex" in issue.message


def test_export_secrets_become_mounted_paths() -> None:
    otlp = {
        "endpoint": "https://otlp.example.com:4317",
        "headersSecretRef": {"name": "otlp-auth"},
        "tls": {"caSecretRef": {"name": "otlp-ca", "key": "bundle.pem"}, "serverName": "otlp"},
    }
    comp = _compile(policy_body("web", _spec(export={"otlp": otlp})))
    export = comp.policy_set.policies[0].export
    assert export.headers_dir == "/etc/flowprobe/secrets/otlp-auth"
    assert export.ca_file == "/etc/flowprobe/secrets/otlp-ca/bundle.pem"
    assert export.server_name == "otlp"
    assert comp.secrets == ["otlp-auth", "otlp-ca"]


def test_time_limits_expire_policies() -> None:
    in_time = policy_body("soon", _spec(timeLimit={"durationSeconds": 3600}))
    past = policy_body("past", _spec(timeLimit={"endTime": "2025-12-31T00:00:00Z"}))
    comp = _compile(in_time, past)
    assert [p.name for p in comp.policy_set.policies] == ["soon"]
    assert comp.policy_set.policies[0].not_after == datetime.datetime(
        2026, 1, 1, 1, 0, tzinfo=datetime.UTC
    )
    assert comp.verdicts["past"].expired and comp.verdicts["past"].compiled is None
    later = _compile(in_time, now=NOW + datetime.timedelta(hours=1))
    assert later.empty and later.verdicts["soon"].expired


def test_unmanaged_policies_keep_their_last_compiled_entry() -> None:
    before = _compile(policy_body("web", _spec(samplingPercent=10)))
    changed = policy_body("web", _spec(samplingPercent=90, managementState="Unmanaged"))
    comp = _compile(changed, previous=before.policy_set)
    assert comp.policy_set.policies[0].sampling_percent == 10
    assert "web" not in comp.verdicts  # no status is written for it
    assert [o.name for o in comp.owners] == ["web"]


def test_unmanaged_without_a_previous_entry_is_not_applied() -> None:
    comp = _compile(policy_body("web", _spec(managementState="Unmanaged")))
    assert comp.empty


def test_unmanaged_entry_of_a_recreated_object_is_dropped() -> None:
    before = _compile(policy_body("web"))
    recreated = policy_body("web", _spec(managementState="Unmanaged"), uid="another-uid")
    assert _compile(recreated, previous=before.policy_set).empty


def test_unmanaged_entry_past_its_time_limit_is_dropped() -> None:
    before = _compile(policy_body("web", _spec(timeLimit={"durationSeconds": 3600})))
    paused = policy_body("web", _spec(managementState="Unmanaged"))
    later = NOW + datetime.timedelta(hours=2)
    assert _compile(paused, previous=before.policy_set, now=later).empty


def test_unparseable_objects_are_reported() -> None:
    body = policy_body("old", {"namespaceSelector": {}, "samplingPercent": "lots"})
    parsed = parse_policy(body)
    assert isinstance(parsed, Unparseable)
    assert "samplingPercent" in parsed.message
    comp = _compile(body, policy_body("web"))
    assert comp.verdicts["old"].errors[0].reason == Reason.INVALID_SPEC
    assert [p.name for p in comp.policy_set.policies] == ["web"]


def test_the_oldest_policy_wins_agent_image_and_priority() -> None:
    old = policy_body(
        "old",
        _spec(agent={"image": "reg/agent:1", "priorityClassName": "high"}),
        creationTimestamp="2025-01-01T00:00:00Z",
    )
    young = policy_body("young", _spec(agent={"image": "reg/agent:2"}))
    same = policy_body("same", _spec(agent={"image": "reg/agent:1"}))
    comp = _compile(young, old, same)
    assert comp.agent.image == "reg/agent:1"
    assert comp.agent.priority_class_name == "high"
    (warning,) = comp.verdicts["young"].warnings
    assert warning.reason == Reason.AGENT_SETTINGS_CONFLICT
    assert "'old'" in warning.message and "reg/agent:2" in warning.message
    assert comp.verdicts["same"].warnings == []
    # Still applied: a conflict degrades, it does not disable.
    assert {p.name for p in comp.policy_set.policies} == {"old", "young", "same"}


def test_defaults_apply_when_no_policy_sets_agent_fields() -> None:
    comp = _compile(policy_body("web"))
    assert comp.agent.image == "flowprobe/agent:0.1.0"
    assert comp.agent.node_selector_terms is None
    assert [t.operator for t in comp.agent.tolerations] == ["Exists"]
    assert comp.agent.resources.requests is not None
    assert comp.agent.resources.requests.cpu == "100m"


def test_resources_take_the_largest_value_and_limits_follow_requests() -> None:
    a = policy_body("a", _spec(agent={"resources": {"requests": {"cpu": "250m", "memory": "1Gi"}}}))
    b = policy_body("b", _spec(agent={"resources": {"requests": {"cpu": 2}}}))
    comp = _compile(a, b)
    res = comp.agent.resources
    assert res.requests is not None and res.limits is not None
    assert (res.requests.cpu, res.requests.memory) == ("2", "1Gi")
    # Default limits (1 CPU, 512Mi) would be below the requests.
    assert (res.limits.cpu, res.limits.memory) == ("2", "1Gi")


def test_tolerations_are_the_union_of_what_policies_ask_for() -> None:
    gpu = {"key": "gpu", "operator": "Exists", "effect": "NoSchedule"}
    a = policy_body("a", _spec(agent={"tolerations": [gpu]}))
    b = policy_body("b", _spec(agent={"tolerations": [gpu]}))
    assert [t.key for t in _compile(a, b).agent.tolerations] == ["gpu"]
    # A policy without tolerations brings the default (tolerate everything).
    ops = {(t.key, t.operator) for t in _compile(a, policy_body("c")).agent.tolerations}
    assert ops == {("gpu", "Exists"), (None, "Exists")}


def test_node_selectors_are_ored_and_an_unrestricted_policy_means_every_node() -> None:
    a = policy_body("a", _spec(agent={"nodeSelector": {"pool": "x"}}))
    b = policy_body("b", _spec(agent={"nodeSelector": {"pool": "y", "zone": "1"}}))
    b2 = policy_body("b2", _spec(agent={"nodeSelector": {"zone": "1", "pool": "y"}}))
    comp = _compile(a, b, b2)
    assert comp.agent.node_selector_terms == [{"pool": "x"}, {"pool": "y", "zone": "1"}]
    assert comp.policy_set.get("a") is not None
    assert comp.policy_set.get("a").node_selector == {"pool": "x"}  # type: ignore[union-attr]
    assert _compile(a, policy_body("c")).agent.node_selector_terms is None


def test_the_compiled_set_is_independent_of_input_order() -> None:
    bodies = [policy_body(n, _spec(samplingPercent=i + 1)) for i, n in enumerate("cab")]
    first = _compile(*bodies)
    second = _compile(*reversed(bodies))
    assert [p.name for p in first.policy_set.policies] == ["a", "b", "c"]
    assert first.policy_set.to_json() == second.policy_set.to_json()
    assert first.policy_set.checksum() == second.policy_set.checksum()
    assert CompiledPolicySet.from_json(first.policy_set.to_json()) == first.policy_set


@pytest.mark.parametrize(
    ("text", "value"),
    [
        ("100m", Decimal("0.1")),
        ("1", Decimal(1)),
        ("1.5", Decimal("1.5")),
        ("512Mi", Decimal(512 * 2**20)),
        ("1G", Decimal(10**9)),
        ("2e3", Decimal(2000)),
        ("1Ki", Decimal(1024)),
    ],
)
def test_parse_quantity(text: str, value: Decimal) -> None:
    assert parse_quantity(text) == value


@pytest.mark.parametrize("text", ["", "abc", "1Xi", "1..2"])
def test_parse_quantity_refuses_garbage(text: str) -> None:
    with pytest.raises(ValueError, match="not a quantity"):
        parse_quantity(text)
