"""render(): golden files under tests/data/render/ plus the properties that matter."""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import pytest
import yaml

from flowprobe.api import constants
from flowprobe.controller.compiler import compile_policies, parse_policy
from flowprobe.controller.config import OperatorConfig
from flowprobe.controller.render import AgentObjects, render
from tests.operator.support import DATA, NOW, check_golden, make_config, policy_body


def _render(bodies: list[dict[str, Any]], config: OperatorConfig) -> AgentObjects:
    comp = compile_policies([parse_policy(b) for b in bodies], config, previous=None, now=NOW)
    return render(comp, config)


def _merged_policies() -> list[dict[str, Any]]:
    return [
        policy_body(
            "payments",
            {
                "namespaceSelector": {"matchLabels": {"team": "payments"}},
                "podSelector": {
                    "matchExpressions": [{"key": "app", "operator": "In", "values": ["api"]}]
                },
                "protocols": ["HTTP", "PostgreSQL"],
                "ports": [{"port": 8080, "protocol": "HTTP"}, {"name": "pg"}],
                "samplingPercent": 25,
                "timeLimit": {"endTime": "2026-06-01T00:00:00Z"},
                "payload": {"headers": {"mode": "Allowlist", "include": ["x-request-id"]}},
                "redaction": {"patterns": [{"name": "card", "regex": r"\b\d{16}\b"}]},
                "export": {
                    "otlp": {
                        "endpoint": "https://otlp.example.com:4317",
                        "headersSecretRef": {"name": "otlp-auth"},
                        "tls": {"caSecretRef": {"name": "otlp-ca"}},
                    },
                    "resourceAttributes": [{"key": "deployment.environment.name", "value": "prod"}],
                },
                "agent": {
                    "image": "registry.example.com/flowprobe/agent:0.2.0",
                    "nodeSelector": {"pool": "payments"},
                    "resources": {"requests": {"cpu": "500m"}, "limits": {"memory": "1Gi"}},
                    "tolerations": [
                        {"key": "dedicated", "value": "payments", "effect": "NoSchedule"}
                    ],
                    "priorityClassName": "flowprobe-agent",
                },
            },
            creationTimestamp="2025-12-01T00:00:00Z",
        ),
        policy_body(
            "dns",
            {
                "namespaceSelector": {},
                "protocols": ["DNS"],
                "direction": "Egress",
                "agent": {"image": "another/agent:9", "nodeSelector": {"pool": "general"}},
            },
        ),
    ]


SCENARIOS: dict[str, tuple[Callable[[], list[dict[str, Any]]], dict[str, Any]]] = {
    "minimal": (lambda: [policy_body("web")], {}),
    "merged": (
        _merged_policies,
        {"agent": {"imagePullSecrets": ["regcred"], "healthPort": 19477}},
    ),
    "nonroot": (lambda: [policy_body("web")], {"agent": {"runAsNonRoot": True}}),
}


@pytest.mark.parametrize("scenario", sorted(SCENARIOS))
def test_render_golden(scenario: str) -> None:
    bodies, overrides = SCENARIOS[scenario]
    objs = _render(bodies(), make_config(**overrides))
    text = yaml.safe_dump_all(objs.in_apply_order(), sort_keys=False, width=100)
    check_golden(DATA / "render" / f"{scenario}.yaml", text)


def _container(objs: AgentObjects) -> dict[str, Any]:
    (container,) = objs.daemon_set["spec"]["template"]["spec"]["containers"]
    c: dict[str, Any] = container
    return c


def test_agent_pod_is_hardened_and_captures_from_the_host_network() -> None:
    objs = _render([policy_body("web")], make_config())
    pod = objs.daemon_set["spec"]["template"]["spec"]
    c = _container(objs)
    assert pod["hostNetwork"] is True and pod["dnsPolicy"] == "ClusterFirstWithHostNet"
    sc = c["securityContext"]
    assert sc["capabilities"] == {"drop": ["ALL"], "add": ["NET_ADMIN", "NET_RAW"]}
    assert sc["readOnlyRootFilesystem"] is True and sc["allowPrivilegeEscalation"] is False
    assert sc["privileged"] is False
    assert pod["securityContext"]["seccompProfile"] == {"type": "RuntimeDefault"}
    env = {e["name"]: e for e in c["env"]}
    assert env["NODE_NAME"]["valueFrom"]["fieldRef"]["fieldPath"] == "spec.nodeName"
    assert env["FLOWPROBE_POLICY_FILE"]["value"] == constants.POLICY_FILE
    assert c["livenessProbe"]["httpGet"]["path"] == "/healthz"
    assert c["readinessProbe"]["httpGet"]["path"] == "/readyz"
    assert set(c["resources"]) == {"requests", "limits"}
    assert pod["tolerations"] == [{"operator": "Exists"}]
    assert "affinity" not in pod


def test_non_root_mode_trades_uid_0_for_file_capabilities() -> None:
    objs = _render([policy_body("web")], make_config(agent={"runAsNonRoot": True}))
    pod = objs.daemon_set["spec"]["template"]["spec"]
    assert pod["securityContext"]["runAsNonRoot"] is True
    assert pod["securityContext"]["runAsUser"] == 65532
    assert _container(objs)["securityContext"]["allowPrivilegeEscalation"] is True


def test_config_changes_roll_the_agents_and_nothing_else_does() -> None:
    config = make_config()

    def checksum(objs: AgentObjects) -> str:
        ann = objs.daemon_set["spec"]["template"]["metadata"]["annotations"]
        value: str = ann[constants.ANNOTATION_CONFIG_CHECKSUM]
        return value

    base = _render([policy_body("web")], config)
    assert checksum(base) == checksum(_render([policy_body("web")], config))
    changed = _render([policy_body("web", {"namespaceSelector": {}, "samplingPercent": 5})], config)
    assert checksum(changed) != checksum(base)
    assert base.config_map["metadata"]["annotations"][
        constants.ANNOTATION_CONFIG_CHECKSUM
    ] == checksum(base)


def test_every_active_policy_owns_the_agent_objects() -> None:
    objs = _render(_merged_policies(), make_config())
    for obj in objs.in_apply_order():
        owners = obj["metadata"]["ownerReferences"]
        assert [o["name"] for o in owners] == ["dns", "payments"]
        assert not any(o["controller"] for o in owners)


def test_forensics_mounts_its_volume_and_token_only_while_a_policy_enables_it() -> None:
    off = _render([policy_body("web")], make_config())
    assert "forensics" not in off.config_map["data"][constants.POLICY_SET_KEY]
    names = {v["name"] for v in off.daemon_set["spec"]["template"]["spec"]["volumes"]}
    assert not {"forensics", "forensics-token"} & names
    on = _render(
        [
            policy_body("web"),
            policy_body(
                "pcaps",
                spec={
                    "namespaceSelector": {},
                    "forensics": {
                        "mode": "Enabled",
                        "ring": {"files": 8, "fileSizeMegabytes": 10},
                        "maxFrozenMegabytes": 50,
                    },
                },
            ),
        ],
        make_config(agent={"forensicsTokenSecret": "pcap-token"}),
    )
    volumes = {v["name"]: v for v in on.daemon_set["spec"]["template"]["spec"]["volumes"]}
    # Ring and pcaps (80 + 50 MiB) plus room for the cut being written.
    assert volumes["forensics"]["emptyDir"] == {"sizeLimit": "194Mi"}
    secret = volumes["forensics-token"]["secret"]
    assert secret["secretName"] == "pcap-token" and secret["optional"] is True
    mounts = {m["name"]: m for m in _container(on)["volumeMounts"]}
    assert mounts["forensics"]["mountPath"] == constants.FORENSICS_DIR
    assert mounts["forensics-token"] == {
        "name": "forensics-token",
        "mountPath": constants.FORENSICS_TOKEN_DIR,
        "readOnly": True,
    }
    compiled = on.config_map["data"][constants.POLICY_SET_KEY]
    assert '"mode": "Enabled"' in compiled and '"maxFrozenMegabytes": 50' in compiled
