"""Smoke test: the local control plane behaves like a small real cluster."""

from __future__ import annotations

import json
import uuid
from typing import Any

import pytest
from tests.agent.enrich.kubekit import running_pods

from flowprobe.devenv import toolchain
from flowprobe.devenv.cluster import LocalCluster

pytestmark = pytest.mark.cluster


def _get_json(cluster: LocalCluster, *args: str) -> Any:
    return json.loads(cluster.kubectl("get", *args, "-o", "json").stdout)


def _deployment(ns: str, nodes: list[str]) -> dict[str, Any]:
    # Pinned to this test's nodes: other tests may add nodes to the shared cluster.
    pin = {"key": "kubernetes.io/hostname", "operator": "In", "values": nodes}
    affinity = {
        "nodeAffinity": {
            "requiredDuringSchedulingIgnoredDuringExecution": {
                "nodeSelectorTerms": [{"matchExpressions": [pin]}]
            }
        }
    }
    return {
        "apiVersion": "apps/v1",
        "kind": "Deployment",
        "metadata": {"name": "web", "namespace": ns},
        "spec": {
            "replicas": 2,
            "selector": {"matchLabels": {"app": "web"}},
            "template": {
                "metadata": {"labels": {"app": "web"}},
                "spec": {
                    # Never pulled: nothing runs containers here.
                    "containers": [{"name": "web", "image": "registry.invalid/web:1"}],
                    "affinity": affinity,
                },
            },
        },
    }


def test_local_cluster_smoke(local_cluster: LocalCluster) -> None:
    versions = toolchain.read_versions()

    # Version ldflags made it into the server (Helm kubeVersion checks need it).
    version = json.loads(local_cluster.kubectl("version", "-o", "json").stdout)
    assert version["serverVersion"]["gitVersion"] == f"v{versions['KUBE_VERSION']}"
    assert version["clientVersion"]["gitVersion"] == f"v{versions['KUBECTL_VERSION']}"

    # kwok marks its fake nodes Ready.
    nodes = local_cluster.create_fake_nodes(2, prefix=f"smoke-{uuid.uuid4().hex[:6]}-")
    for name in nodes:
        node = _get_json(local_cluster, "node", name)
        ready = [c for c in node["status"]["conditions"] if c["type"] == "Ready"]
        assert ready and ready[0]["status"] == "True", node["status"]

    # Deployment -> ReplicaSet -> Pods needs kube-controller-manager, binding to
    # a node needs kube-scheduler, phase Running and a podIP come from kwok.
    ns = f"smoke-{uuid.uuid4().hex[:8]}"
    local_cluster.kubectl("create", "namespace", ns)
    try:
        local_cluster.kubectl("apply", "-f", "-", input=json.dumps(_deployment(ns, nodes)))
        local_cluster.wait_for(
            lambda: len(running_pods(local_cluster, ns)) == 2,
            "2 Running pods with a podIP",
            timeout=90,
        )
        pods = list(running_pods(local_cluster, ns).values())
        assert {p["spec"]["nodeName"] for p in pods} <= set(nodes)
        assert len({p["status"]["podIP"] for p in pods}) == 2
        for p in pods:
            # Admitted with the namespace's default ServiceAccount (made by kcm).
            assert p["spec"]["serviceAccountName"] == "default"
            assert all(c["ready"] for c in p["status"]["containerStatuses"])
    finally:
        local_cluster.kubectl("delete", "namespace", ns, "--wait=false", check=False)
        local_cluster.kubectl("delete", "node", *nodes, "--wait=false", check=False)
