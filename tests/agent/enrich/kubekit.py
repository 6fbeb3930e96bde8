"""Objects on the real local control plane for the enrichment and daemon tests."""

from __future__ import annotations

import json
import uuid
from typing import Any

from flowprobe.agent.enrich.kubeapi import KubeApi, load_configuration
from flowprobe.devenv.cluster import LocalCluster


def unique(prefix: str) -> str:
    return f"{prefix}-{uuid.uuid4().hex[:6]}"


def api_for(cluster: LocalCluster) -> KubeApi:
    return KubeApi(load_configuration(cluster.kubeconfig))


def apply(cluster: LocalCluster, *objs: dict[str, Any]) -> None:
    cluster.kubectl(
        "apply",
        "-f",
        "-",
        input=json.dumps({"apiVersion": "v1", "kind": "List", "items": list(objs)}),
    )


def namespace(name: str, labels: dict[str, str] | None = None) -> dict[str, Any]:
    return {
        "apiVersion": "v1",
        "kind": "Namespace",
        "metadata": {"name": name, "labels": labels or {}},
    }


def pod_spec(node: str, ports: list[tuple[int, str]] | None = None) -> dict[str, Any]:
    return {
        "nodeName": node,
        "containers": [
            {
                "name": "main",
                # Never pulled: nothing runs containers here.
                "image": "registry.invalid/app:1",
                "ports": [{"containerPort": p, "name": n} for p, n in ports or []],
            }
        ],
    }


def bare_pod(
    ns: str,
    name: str,
    node: str,
    labels: dict[str, str] | None = None,
    ports: list[tuple[int, str]] | None = None,
) -> dict[str, Any]:
    return {
        "apiVersion": "v1",
        "kind": "Pod",
        "metadata": {"name": name, "namespace": ns, "labels": labels or {}},
        "spec": pod_spec(node, ports),
    }


def deployment(
    ns: str,
    name: str,
    node: str,
    labels: dict[str, str],
    ports: list[tuple[int, str]] | None = None,
    replicas: int = 1,
) -> dict[str, Any]:
    return {
        "apiVersion": "apps/v1",
        "kind": "Deployment",
        "metadata": {"name": name, "namespace": ns},
        "spec": {
            "replicas": replicas,
            "selector": {"matchLabels": labels},
            "template": {"metadata": {"labels": labels}, "spec": pod_spec(node, ports)},
        },
    }


def service(ns: str, name: str, selector: dict[str, str], port: int) -> dict[str, Any]:
    return {
        "apiVersion": "v1",
        "kind": "Service",
        "metadata": {"name": name, "namespace": ns},
        "spec": {"selector": selector, "ports": [{"port": port, "targetPort": port}]},
    }


def running_pods(cluster: LocalCluster, ns: str) -> dict[str, dict[str, Any]]:
    """Running pods of ``ns`` with an IP, by name."""
    pods = cluster.api("GET", f"/api/v1/namespaces/{ns}/pods")["items"]
    return {
        p["metadata"]["name"]: p
        for p in pods
        if p.get("status", {}).get("phase") == "Running"
        and p["status"].get("podIP")
        and not p["metadata"].get("deletionTimestamp")
    }


def manual_node(cluster: LocalCluster, name: str) -> None:
    """A node no kwok manages: its pods' status (and so their IPs) is set by the test,
    the only way to hand a new pod a chosen, just-freed IP."""
    cluster.api(
        "POST",
        "/api/v1/nodes",
        {
            "apiVersion": "v1",
            "kind": "Node",
            "metadata": {"name": name, "labels": {"kubernetes.io/hostname": name}},
        },
    )


def set_pod_running(cluster: LocalCluster, ns: str, name: str, ip: str) -> None:
    """What a kubelet would report: Running with ``ip``."""
    path = f"/api/v1/namespaces/{ns}/pods/{name}/status"
    pod = cluster.api("GET", path)
    pod["status"] = {
        **pod.get("status", {}),
        "phase": "Running",
        "podIP": ip,
        "podIPs": [{"ip": ip}],
        "hostIP": "127.0.0.1",
        "startTime": pod["metadata"]["creationTimestamp"],
        "conditions": [{"type": "Ready", "status": "True"}],
    }
    cluster.api("PUT", path, pod)


def force_delete(cluster: LocalCluster, ns: str, name: str) -> None:
    # No kubelet on a manual node confirms termination: grace period 0.
    cluster.kubectl("delete", "pod", "-n", ns, name, "--grace-period=0", "--force", "--wait=false")
