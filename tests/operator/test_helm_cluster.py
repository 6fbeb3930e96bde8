"""`helm install` into the local control plane, then the operator under the chart's RBAC.

The operator runs as a local process authenticated with a token of the
chart's operator ServiceAccount, through a recording proxy: a permission the
chart forgot shows up as a refused (403) call, a permission it grants but the
operator never uses shows up as an unused grant. Both fail the test.
"""

from __future__ import annotations

import datetime
import json
import uuid
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import pytest

from flowprobe.api import constants
from flowprobe.api.agentreport import report_lease_name
from flowprobe.devenv.cluster import LocalCluster
from tests.operator.clusterkit import (
    ApiProxy,
    OperatorProcess,
    grants_from,
    rbac_gaps,
    token_kubeconfig,
    wait_until,
)
from tests.operator.conftest import get_json
from tests.operator.support import REPO, policy_manifest

pytestmark = pytest.mark.cluster

CHART = REPO / "charts" / "flowprobe"


@dataclass
class Release:
    cluster: LocalCluster
    id: str
    name: str
    ns: str
    nodes: list[str]

    @property
    def fullname(self) -> str:
        return f"{self.name}-flowprobe"

    @property
    def operator_sa(self) -> str:
        return f"{self.fullname}-operator"

    @property
    def agent(self) -> str:
        return f"{self.fullname}-agent"

    def can_i(self, account: str, *args: str) -> bool:
        proc = self.cluster.kubectl(
            "auth", "can-i", *args, f"--as=system:serviceaccount:{self.ns}:{account}", check=False
        )
        return proc.stdout.strip() == "yes"


@pytest.fixture(scope="module")
def release(crds: LocalCluster) -> Iterator[Release]:
    env_id = uuid.uuid4().hex[:6]
    rel = Release(crds, env_id, f"fp{env_id}", f"fp-helm-{env_id}", [])
    rel.nodes = crds.create_fake_nodes(
        2, prefix=f"fp-helm-{env_id}-", labels={"flowprobe-test": env_id}
    )
    crds.kubectl("create", "namespace", rel.ns)
    crds.helm(
        "install",
        rel.name,
        str(CHART),
        f"--namespace={rel.ns}",
        "--wait",
        "--timeout=3m",
        "--set=agent.defaultExport.endpoint=http://collector.observability:4317",
        "--set=operator.resyncSeconds=5",
        "--set=operator.agentReportGraceSeconds=5",
        # --set-string: an id of six digits (uuid hex can be) would become a number.
        f"--set-string=operator.nodeSelector.flowprobe-test={env_id}",
        timeout=240,
    )
    try:
        yield rel
    finally:
        crds.kubectl("delete", "probepolicy", "-l", f"flowprobe-test={env_id}", check=False)
        crds.helm("uninstall", rel.name, f"--namespace={rel.ns}", "--wait", check=False)
        crds.kubectl("delete", "namespace", rel.ns, "--wait=false", check=False)
        crds.kubectl("delete", "node", *rel.nodes, "--wait=false", check=False)


def test_release_is_deployed_and_helm_test_passes(release: Release) -> None:
    status = json.loads(
        release.cluster.helm(
            "status", release.name, f"--namespace={release.ns}", "-o", "json"
        ).stdout
    )
    assert status["info"]["status"] == "deployed"
    deploy = get_json(release.cluster, "-n", release.ns, "deployment", release.operator_sa)
    assert deploy["status"].get("availableReplicas") == 1
    # kwok completes the test Job's pod; Helm waits for the Job to succeed.
    out = release.cluster.helm(
        "test", release.name, f"--namespace={release.ns}", "--timeout=2m", timeout=180
    )
    assert "Phase:          Succeeded" in out.stdout, out.stdout
    assert (
        "NOTES:" in release.cluster.helm("status", release.name, f"--namespace={release.ns}").stdout
    )


def test_agent_and_operator_rbac_is_least_privilege(release: Release) -> None:
    agent, op, ns = release.agent, release.operator_sa, release.ns
    # What the agent contract (flowprobe.api.agentreport, docs/operator.md) needs ...
    for args in (
        ("list", "pods", "--all-namespaces"),
        ("watch", "pods", "--all-namespaces"),
        ("list", "namespaces"),
        ("watch", "services", "--all-namespaces"),
        ("watch", "endpointslices.discovery.k8s.io", "--all-namespaces"),
        ("watch", "jobs.batch", "--all-namespaces"),
        ("get", "nodes"),
        ("create", "leases.coordination.k8s.io", "-n", ns),
        ("update", "leases.coordination.k8s.io", "-n", ns),
    ):
        assert release.can_i(agent, *args), f"agent cannot {args}"
    # ... and nothing beyond it.
    for args in (
        ("get", "secrets", "-n", ns),
        ("delete", "pods", "-n", ns),
        ("update", "nodes"),
        ("delete", "leases.coordination.k8s.io", "-n", ns),
        ("create", "leases.coordination.k8s.io", "-n", "default"),
        ("list", "probepolicies.flowprobe.io"),
    ):
        assert not release.can_i(agent, *args), f"agent can {args}"
    for args in (
        ("get", "secrets", "-n", ns),
        ("create", "pods", "-n", ns),
        ("patch", "probepolicies.flowprobe.io"),
        ("patch", "daemonsets.apps", "-n", "default"),
        ("create", "rolebindings.rbac.authorization.k8s.io", "-n", ns),
        ("update", "leases.coordination.k8s.io/someone-else", "-n", ns),
    ):
        assert not release.can_i(op, *args), f"operator can {args}"


def _report_lease(ns: str, node: str) -> str:
    now = datetime.datetime.now(datetime.UTC).strftime("%Y-%m-%dT%H:%M:%S.%fZ")
    return json.dumps(
        {
            "apiVersion": "coordination.k8s.io/v1",
            "kind": "Lease",
            "metadata": {
                "name": report_lease_name(node),
                "namespace": ns,
                "labels": {constants.LABEL_COMPONENT: constants.COMPONENT_AGENT_REPORT},
                "annotations": {constants.ANNOTATION_AGENT_REPORT: json.dumps({"node": node})},
            },
            "spec": {"holderIdentity": node, "renewTime": now, "leaseDurationSeconds": 3600},
        }
    )


def _diagnose(operator: OperatorProcess, proxy: ApiProxy) -> str:
    calls = "\n".join(f"{c.status} {c.method} {c.path}" for c in proxy.snapshot()[-20:])
    state = (
        "running" if operator.alive else f"exited with {operator.proc and operator.proc.returncode}"
    )
    return (
        f"operator {state}; log:\n{operator.log_text()[-3000:]}\n"
        f"last of {len(proxy.snapshot())} API calls:\n{calls}"
    )


def test_operator_works_with_exactly_the_chart_rbac(release: Release, tmp_path: Path) -> None:
    cluster, ns = release.cluster, release.ns
    token = cluster.kubectl(
        "create", "token", release.operator_sa, "-n", ns, "--duration=1h"
    ).stdout.strip()
    proxy = ApiProxy(cluster.server, cluster.pki.ca_crt)  # no client cert: the token is all
    proxy.start()
    cm = get_json(cluster, "-n", ns, "configmap", release.operator_sa)
    operator = OperatorProcess(
        tmp_path,
        kubeconfig=token_kubeconfig(tmp_path / "sa.kubeconfig", proxy.url, token),
        namespace=ns,
        config=json.loads(cm["data"]["config.json"]),
    )
    policy = f"{release.id}-rbac"

    def apply(spec: dict[str, object], name: str = policy) -> None:
        obj = policy_manifest(name, spec, {"flowprobe-test": release.id})
        cluster.kubectl("apply", "-f", "-", input=json.dumps(obj))

    def ready(name: str) -> bool:
        st = get_json(cluster, "probepolicy", name).get("status") or {}
        return any(c["type"] == "Ready" and c["status"] == "True" for c in st.get("conditions", []))

    spec: dict[str, object] = {
        "namespaceSelector": {},
        "podSelector": {"matchLabels": {"app": "none"}},
        "agent": {"nodeSelector": {"flowprobe-test": release.id}},
    }
    try:
        operator.start()
        wait_until(lambda: "became the leader" in operator.log_text(), "leadership", timeout=60)
        apply(spec)
        wait_until(
            lambda: ready(policy), f"{policy} Ready\n{_diagnose(operator, proxy)}", timeout=90
        )
        ds = get_json(cluster, "-n", ns, "daemonset", release.agent)
        assert ds["spec"]["template"]["spec"]["serviceAccountName"] == release.agent
        cluster.kubectl("apply", "-f", "-", input=_report_lease(ns, release.nodes[0]))
        apply({**spec, "samplingPercent": 30})
        wait_until(
            lambda: get_json(cluster, "probepolicy", policy)["status"]["observedGeneration"] == 2,
            "the change observed",
        )
        invalid = f"{release.id}-rbac-invalid"
        apply({**spec, "redaction": {"patterns": [{"name": "x", "regex": "("}]}}, invalid)
        wait_until(
            lambda: (
                cluster.kubectl(
                    "get",
                    "events",
                    "-n",
                    "default",
                    "--field-selector",
                    f"involvedObject.name={invalid}",
                ).stdout.count("InvalidSpec")
                > 0
            ),
            "an InvalidSpec event",
        )
        cluster.kubectl("delete", "probepolicy", policy, invalid, "--wait=true")
        wait_until(
            lambda: (
                cluster.kubectl("-n", ns, "get", "daemonset", release.agent, check=False).returncode
                != 0
            ),
            "agents removed with the last policy",
        )
        wait_until(
            lambda: (
                not get_json(
                    cluster, "-n", ns, "leases", "-l", f"{constants.LABEL_COMPONENT}=agent-report"
                )["items"]
            ),
            "report leases removed",
        )
    finally:
        operator.stop()  # releases the leader Lease (get + update)
        proxy.stop()
    assert operator.proc is not None and operator.proc.returncode == 0, operator.log_text()[-3000:]

    roles = [
        get_json(cluster, "clusterrole", release.operator_sa),
        get_json(cluster, "-n", ns, "role", release.operator_sa),
        get_json(cluster, "-n", "default", "role", f"{release.operator_sa}-events"),
    ]
    missing, unused = rbac_gaps(grants_from(roles), proxy.snapshot())
    assert not missing, "calls the chart's RBAC does not allow:\n" + "\n".join(
        sorted(
            f"{c.status} {c.verb} {c.group}/{c.resource} ns={c.namespace} name={c.name}"
            for c in missing
        )
    )
    assert not unused, "grants the operator never used:\n" + "\n".join(
        sorted(f"{g.verb} {g.group}/{g.resource} ns={g.namespace} name={g.name}" for g in unused)
    )
