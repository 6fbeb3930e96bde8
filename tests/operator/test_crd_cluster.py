"""`kubectl apply` refuses wrong ProbePolicies, saying what to fix.

Each case is applied for real (no dry run) against the API server built from
Go modules; the CRD alone (schema + CEL) must refuse it with a message naming
the field. Policies that are valid for the schema but cannot be realised are
covered in test_operator_cluster.py (reported in status).
"""

from __future__ import annotations

import json
from typing import Any

import pytest

from flowprobe.devenv.cluster import LocalCluster
from tests.operator.conftest import get_json
from tests.operator.support import policy_manifest

pytestmark = pytest.mark.cluster

OK: dict[str, Any] = {"namespaceSelector": {}}
INVALID: dict[str, tuple[dict[str, Any], str]] = {
    "missing namespaceSelector": ({}, "spec.namespaceSelector: Required value"),
    "sampling below 1": (
        {**OK, "samplingPercent": 0},
        "spec.samplingPercent in body should be greater than or equal to 1",
    ),
    "sampling above 100": (
        {**OK, "samplingPercent": 150},
        "spec.samplingPercent in body should be less than or equal to 100",
    ),
    "direction not CamelCase": (
        {**OK, "direction": "ingress"},
        'Unsupported value: "ingress": supported values: "Ingress", "Egress", "Both"',
    ),
    "unknown protocol": ({**OK, "protocols": ["HTTP", "FTP"]}, 'Unsupported value: "FTP"'),
    "no protocols": (
        {**OK, "protocols": []},
        "spec.protocols in body should have at least 1 items",
    ),
    "port and name": (
        {**OK, "ports": [{"port": 80, "name": "http"}]},
        "set exactly one of port or name in each spec.ports entry",
    ),
    "port out of range": (
        {**OK, "ports": [{"port": 70000}]},
        "spec.ports[0].port in body should be less than or equal to 65535",
    ),
    "port protocol not enabled": (
        {**OK, "protocols": ["HTTP"], "ports": [{"port": 6379, "protocol": "Redis"}]},
        "every spec.ports[].protocol must also be listed in spec.protocols",
    ),
    "too many ports": (
        {**OK, "ports": [{"port": p} for p in range(1, 40)]},
        "spec.ports: Too many: 39: must have at most 32 items",
    ),
    "bad port name": (
        {**OK, "ports": [{"name": "HTTP_PORT"}]},
        "spec.ports[0].name in body should match",
    ),
    "end time and duration": (
        {**OK, "timeLimit": {"endTime": "2030-01-01T00:00:00Z", "durationSeconds": 600}},
        "set exactly one of spec.timeLimit.endTime or spec.timeLimit.durationSeconds",
    ),
    "end time not a time": (
        {**OK, "timeLimit": {"endTime": "tomorrow"}},
        "spec.timeLimit.endTime in body must be of type date-time",
    ),
    "duration too short": (
        {**OK, "timeLimit": {"durationSeconds": 5}},
        "spec.timeLimit.durationSeconds in body should be greater than or equal to 60",
    ),
    "allowlist without headers": (
        {**OK, "payload": {"headers": {"mode": "Allowlist"}}},
        "spec.payload.headers.include lists the headers to capture; it is required with mode Allowlist",
    ),
    "body cap too large": (
        {**OK, "payload": {"bodies": {"mode": "All", "maxBytes": 1000000}}},
        "spec.payload.bodies.maxBytes in body should be less than or equal to 65536",
    ),
    "bodies without an HTTP protocol": (
        {**OK, "protocols": ["DNS"], "payload": {"bodies": {"mode": "All"}}},
        "spec.payload.bodies.mode All needs HTTP, HTTP2 or GRPC in spec.protocols",
    ),
    "endpoint without scheme": (
        {**OK, "export": {"otlp": {"endpoint": "collector:4317"}}},
        "spec.export.otlp.endpoint must be an http:// or https:// URL with a host",
    ),
    "tls on an http endpoint": (
        {
            **OK,
            "export": {"otlp": {"endpoint": "http://c:4317", "tls": {"insecureSkipVerify": True}}},
        },
        "spec.export.otlp.tls applies only to https:// endpoints",
    ),
    "skip verify and a CA": (
        {
            **OK,
            "export": {
                "otlp": {
                    "endpoint": "https://c:4317",
                    "tls": {"insecureSkipVerify": True, "caSecretRef": {"name": "ca"}},
                }
            },
        },
        "caSecretRef is pointless with insecureSkipVerify true",
    ),
    "k8s resource attribute": (
        {**OK, "export": {"resourceAttributes": [{"key": "k8s.pod.name", "value": "x"}]}},
        "resourceAttributes keys must not start with k8s.",
    ),
    "duplicate resource attribute": (
        {
            **OK,
            "export": {
                "resourceAttributes": [{"key": "a", "value": "1"}, {"key": "a", "value": "2"}]
            },
        },
        'spec.export.resourceAttributes[1]: Duplicate value: {"key":"a"}',
    ),
    "Exists toleration with a value": (
        {**OK, "agent": {"tolerations": [{"key": "k", "operator": "Exists", "value": "v"}]}},
        "a toleration with operator Exists must not have a value",
    ),
    "requests above limits": (
        {**OK, "agent": {"resources": {"requests": {"cpu": "2"}, "limits": {"cpu": "500m"}}}},
        "spec.agent.resources.requests.cpu must not exceed limits.cpu",
    ),
    "not a quantity": (
        {**OK, "agent": {"resources": {"requests": {"memory": "lots"}}}},
        "must be a resource quantity such as 100m, 1, 256Mi or 1Gi",
    ),
    "unknown field": ({**OK, "samplingRate": 5}, 'unknown field "spec.samplingRate"'),
    "unknown management state": (
        {**OK, "managementState": "Paused"},
        'Unsupported value: "Paused": supported values: "Managed", "Unmanaged"',
    ),
    "In without values": (
        {"namespaceSelector": {"matchExpressions": [{"key": "a", "operator": "In"}]}},
        "values must be non-empty for In and NotIn",
    ),
    "bad label key": (
        {"namespaceSelector": {"matchLabels": {"bad key!": "x"}}},
        "matchLabels keys must be label keys",
    ),
    "waf without HTTP": (
        {**OK, "protocols": ["DNS"], "security": {"waf": {"mode": "DetectionOnly"}}},
        "spec.security.waf.mode DetectionOnly needs HTTP in spec.protocols",
    ),
    "paranoia level above 4": (
        {**OK, "security": {"waf": {"mode": "DetectionOnly", "paranoiaLevel": 5}}},
        "spec.security.waf.paranoiaLevel in body should be less than or equal to 4",
    ),
    "unknown sensitive-data category": (
        {**OK, "security": {"sensitiveData": {"mode": "Detect", "categories": ["DNA"]}}},
        'Unsupported value: "DNA"',
    ),
    "top-N above 50": (
        {**OK, "anomalies": {"mode": "Detect", "topN": {"size": 51}}},
        "spec.anomalies.topN.size in body should be less than or equal to 50",
    ),
    "unknown anomalies mode": (
        {**OK, "anomalies": {"mode": "Block"}},
        'Unsupported value: "Block": supported values: "Off", "Detect"',
    ),
    "forensics window longer than the ring": (
        {
            **OK,
            "forensics": {
                "mode": "Enabled",
                "secondsBefore": 100,
                "ring": {"files": 2, "fileDurationSeconds": 50},
            },
        },
        "secondsBefore + secondsAfter must be shorter than the ring",
    ),
    "unknown forensics trigger": (
        {**OK, "forensics": {"mode": "Enabled", "triggers": ["ClientError"]}},
        'Unsupported value: "ClientError"',
    ),
    "duplicate redaction rule": (
        {
            **OK,
            "redaction": {"patterns": [{"name": "a", "regex": "x"}, {"name": "a", "regex": "y"}]},
        },
        'spec.redaction.patterns[1]: Duplicate value: {"name":"a"}',
    ),
    "isolation deny request without methods or paths": (
        {**OK, "isolation": {"rules": [{"name": "r", "type": "DenyRequest"}]}},
        "a DenyRequest rule needs methods or paths",
    ),
    "isolation new edge without learning": (
        {**OK, "isolation": {"rules": [{"name": "r", "type": "DenyNewEdge"}]}},
        "learningSeconds is required with type DenyNewEdge",
    ),
    "isolation waf rule without waf": (
        {**OK, "isolation": {"rules": [{"name": "r", "type": "BlockOnWafMatch"}]}},
        "isolation rules of type BlockOnWafMatch need spec.security.waf.mode DetectionOnly",
    ),
    "isolation bad cidr": (
        {
            **OK,
            "isolation": {
                "rules": [{"name": "r", "type": "DenyNewEdge", "learningSeconds": 0}],
                "protectedCidrs": ["10.0.0.0/33"],
            },
        },
        "every entry must be an IP address or a CIDR",
    ),
    "isolation no rules": (
        {**OK, "isolation": {"rules": []}},
        "spec.isolation.rules in body should have at least 1 items",
    ),
}


def _apply(cluster: LocalCluster, name: str, spec: dict[str, Any]) -> tuple[int, str]:
    manifest = json.dumps(policy_manifest(name, spec))
    proc = cluster.kubectl("apply", "-f", "-", input=manifest, check=False)
    return proc.returncode, proc.stderr + proc.stdout


@pytest.mark.parametrize("case", sorted(INVALID))
def test_invalid_policy_is_refused_with_a_clear_message(crds: LocalCluster, case: str) -> None:
    spec, message = INVALID[case]
    name = "invalid-" + "-".join(case.lower().split())[:40].strip("-")
    code, output = _apply(crds, name, spec)
    assert code != 0, f"{case}: accepted\n{output}"
    assert message in output, f"{case}: unexpected message:\n{output}"
    assert crds.kubectl("get", "probepolicy", name, check=False).returncode != 0


def test_defaults_are_filled_in_and_columns_printed(crds: LocalCluster) -> None:
    code, output = _apply(crds, "crd-defaults", {"namespaceSelector": {}})
    assert code == 0, output
    try:
        spec = get_json(crds, "probepolicy", "crd-defaults")["spec"]
        assert spec["managementState"] == "Managed"
        assert spec["payload"]["headers"] == {"mode": "None", "maxBytes": 4096}
        assert spec["redaction"]["queryText"] == "Sanitized"
        assert spec["security"]["waf"]["mode"] == "Off"
        assert spec["security"]["waf"]["excludedRules"] == ["920350"]
        assert spec["security"]["sensitiveData"] == {"mode": "Off"}
        anomalies = spec["anomalies"]
        assert anomalies["mode"] == "Off" and anomalies["quietIntervals"] == 3
        assert anomalies["topN"] == {"size": 10, "windowSeconds": 60}
        assert anomalies["baseline"]["intervalSeconds"] == 10
        assert anomalies["thresholds"]["rateChangePercent"] == 300
        header = crds.kubectl("get", "pp", "crd-defaults").stdout.splitlines()[0].split()
        assert header == ["NAME", "READY", "NODES", "PODS", "AGE"]
        # The category lists it next to other flowprobe kinds.
        assert "crd-defaults" in crds.kubectl("get", "probes").stdout
    finally:
        crds.kubectl("delete", "probepolicy", "crd-defaults", "--wait=false")


def test_isolation_defaults_are_filled_in(crds: LocalCluster) -> None:
    rules = [
        {"name": "admin", "type": "DenyRequest", "paths": ["/admin/*"], "to": {"ports": [8080]}},
        {"name": "crs", "type": "BlockOnWafMatch", "minSeverity": "Critical"},
        {"name": "edges", "type": "DenyNewEdge", "learningSeconds": 600},
    ]
    spec = {
        "namespaceSelector": {},
        "security": {"waf": {"mode": "DetectionOnly"}},
        "isolation": {"rules": rules},
    }
    code, output = _apply(crds, "crd-isolation", spec)
    assert code == 0, output
    try:
        got = get_json(crds, "probepolicy", "crd-isolation")["spec"]["isolation"]
        assert got["mode"] == "DryRun" and got["blockSeconds"] == 300
        assert got["rules"][0]["from"] == {} and got["rules"][0]["to"] == {"ports": [8080]}
    finally:
        crds.kubectl("delete", "probepolicy", "crd-isolation", "--wait=false")
