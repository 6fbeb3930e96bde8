"""The chart: CRDs identical to crds/, lint, golden renders, config and RBAC wiring."""

from __future__ import annotations

import json
import subprocess
from pathlib import Path
from typing import Any

import pytest
import yaml

from flowprobe.controller.config import OperatorConfig
from flowprobe.devenv import toolchain
from tests.operator.support import DATA, REPO, check_golden

CHART = REPO / "charts" / "flowprobe"
SCENARIOS = sorted(
    p.name.removesuffix("-values.yaml") for p in (CHART / "ci").glob("*-values.yaml")
)
KUBE_VERSION = toolchain.read_versions()["KUBE_VERSION"]


def test_chart_crds_are_byte_identical_to_crds_dir() -> None:
    source = sorted(p.name for p in (REPO / "crds").glob("*.yaml"))
    shipped = sorted(p.name for p in (CHART / "crds").glob("*.yaml"))
    assert shipped == source, "run `make crds-sync`"
    for name in source:
        assert (CHART / "crds" / name).read_bytes() == (REPO / "crds" / name).read_bytes(), (
            f"charts/flowprobe/crds/{name} differs from crds/{name}: run `make crds-sync`"
        )


def test_there_are_scenarios() -> None:
    assert len(SCENARIOS) >= 3, SCENARIOS


def _helm(tmp_path: Path, *args: str, check: bool = True) -> subprocess.CompletedProcess[str]:
    helm = toolchain.ensure_binary("helm")
    env = {
        "HOME": str(tmp_path),
        "PATH": "/usr/bin:/bin",
        "HELM_CACHE_HOME": str(tmp_path / "cache"),
        "HELM_CONFIG_HOME": str(tmp_path / "config"),
        "HELM_DATA_HOME": str(tmp_path / "data"),
    }
    proc = subprocess.run(
        [str(helm), *args], capture_output=True, text=True, env=env, check=False, timeout=120
    )
    if check and proc.returncode != 0:
        raise AssertionError(f"helm {' '.join(args)} failed:\n{proc.stdout}\n{proc.stderr}")
    return proc


def render(tmp_path: Path, scenario: str, namespace: str = "flowprobe-system") -> str:
    return _helm(
        tmp_path,
        "template",
        "fp",
        str(CHART),
        f"--namespace={namespace}",
        f"--values={CHART / 'ci' / f'{scenario}-values.yaml'}",
        f"--kube-version={KUBE_VERSION}",
    ).stdout


def _objects(text: str) -> list[dict[str, Any]]:
    return [d for d in yaml.safe_load_all(text) if d]


@pytest.mark.cluster
@pytest.mark.parametrize("scenario", SCENARIOS)
def test_helm_lint(tmp_path: Path, scenario: str) -> None:
    out = _helm(
        tmp_path,
        "lint",
        "--strict",
        str(CHART),
        f"--values={CHART / 'ci' / f'{scenario}-values.yaml'}",
        f"--kube-version={KUBE_VERSION}",
    ).stdout
    assert "0 chart(s) failed" in out


@pytest.mark.cluster
@pytest.mark.parametrize("scenario", SCENARIOS)
def test_helm_template_golden(tmp_path: Path, scenario: str) -> None:
    check_golden(DATA / "helm" / f"{scenario}.yaml", render(tmp_path, scenario))


@pytest.mark.cluster
@pytest.mark.parametrize("scenario", SCENARIOS)
def test_rendered_config_is_what_the_operator_reads(tmp_path: Path, scenario: str) -> None:
    objs = _objects(render(tmp_path, scenario))
    (cm,) = [o for o in objs if o["kind"] == "ConfigMap"]
    config = OperatorConfig.model_validate(json.loads(cm["data"]["config.json"]))
    assert config.namespace == "flowprobe-system"
    by_kind: dict[str, list[dict[str, Any]]] = {}
    for o in objs:
        by_kind.setdefault(o["kind"], []).append(o)
    # The agent RBAC is bound to the ServiceAccount name the operator will create.
    agent_bindings = [
        b
        for b in by_kind.get("RoleBinding", []) + by_kind.get("ClusterRoleBinding", [])
        if b["metadata"]["name"] == config.agent.name
    ]
    if any(o["kind"] == "ClusterRole" for o in objs):
        assert len(agent_bindings) == 2
        for b in agent_bindings:
            assert b["subjects"] == [
                {
                    "kind": "ServiceAccount",
                    "name": config.agent.name,
                    "namespace": "flowprobe-system",
                }
            ]
    # Leader election: the Role grants get/update on exactly the configured Lease.
    (deployment,) = by_kind["Deployment"]
    args = deployment["spec"]["template"]["spec"]["containers"][0]["args"]
    assert "--standalone" in args and "--module=flowprobe.controller" in args
    if config.leader_election.enabled:
        role = next(r for r in by_kind["Role"] if r["metadata"]["name"].endswith("-operator"))
        named = [r for r in role["rules"] if r.get("resourceNames")]
        assert named == [
            {
                "apiGroups": ["coordination.k8s.io"],
                "resources": ["leases"],
                "resourceNames": [config.leader_election.lease_name],
                "verbs": ["get", "update"],
            }
        ]
    else:
        assert deployment["spec"]["strategy"]["type"] == "Recreate"
        assert deployment["spec"]["replicas"] == 1


@pytest.mark.cluster
def test_every_object_has_the_standard_labels(tmp_path: Path) -> None:
    for obj in _objects(render(tmp_path, "default")):
        labels = obj["metadata"].get("labels") or {}
        for key in (
            "app.kubernetes.io/name",
            "app.kubernetes.io/instance",
            "app.kubernetes.io/managed-by",
            "helm.sh/chart",
        ):
            assert key in labels, f"{obj['kind']}/{obj['metadata']['name']} lacks {key}"


@pytest.mark.cluster
@pytest.mark.parametrize(
    ("values", "message"),
    [
        (["--set", "bogus=1"], "additional properties 'bogus' not allowed"),
        (["--set", "operator.replicaCount=2"], "additional properties 'replicaCount' not allowed"),
        (["--set", "operator.image.pullPolicy=Sometimes"], "pullPolicy"),
        (["--set", "agent.defaultExport.endpoint=collector:4317"], "endpoint"),
        (["--set", "operator.resyncSeconds=1"], "resyncSeconds"),
    ],
)
def test_values_schema_refuses_mistakes(tmp_path: Path, values: list[str], message: str) -> None:
    proc = _helm(tmp_path, "lint", str(CHART), *values, check=False)
    assert proc.returncode != 0
    assert message in proc.stdout + proc.stderr


@pytest.mark.cluster
def test_default_policy_is_a_valid_probepolicy(tmp_path: Path) -> None:
    from flowprobe.api.v1alpha1 import ProbePolicy

    objs = _objects(render(tmp_path, "defaultpolicy"))
    (policy,) = [o for o in objs if o["kind"] == "ProbePolicy"]
    parsed = ProbePolicy.model_validate(policy)
    assert parsed.spec.time_limit is not None and parsed.spec.sampling_percent == 50
