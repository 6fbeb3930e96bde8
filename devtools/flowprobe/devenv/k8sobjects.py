"""Kubernetes objects as the API serves them (JSON dicts), for the enrichment tests and enrichbench."""

from __future__ import annotations

from typing import Any

from flowprobe.api.policyset import CompiledPolicy


def pod(
    name: str,
    ip: str | None,
    *,
    uid: str | None = None,
    namespace: str = "shop",
    node: str = "node-a",
    labels: dict[str, str] | None = None,
    owner: tuple[str, str] | None = None,
    ports: dict[str, list[tuple[int, str]]] | None = None,
    host_network: bool = False,
    phase: str = "Running",
    terminating: bool = False,
) -> dict[str, Any]:
    """``ports``: container name -> [(containerPort, port name)]; default one container ``main``."""
    meta: dict[str, Any] = {
        "name": name,
        "namespace": namespace,
        "uid": uid or f"uid-{name}",
        "labels": labels or {},
    }
    if owner:
        meta["ownerReferences"] = [
            {"kind": owner[0], "name": owner[1], "controller": True, "uid": f"uid-{owner[1]}"}
        ]
    if terminating:
        meta["deletionTimestamp"] = "2026-01-01T00:00:00Z"
    containers = [
        {
            "name": c,
            "ports": [
                {"containerPort": p, "name": n} if n else {"containerPort": p} for p, n in ps
            ],
        }
        for c, ps in (ports or {"main": []}).items()
    ]
    status: dict[str, Any] = {"phase": phase}
    if ip:
        status["podIP"] = ip
        status["podIPs"] = [{"ip": ip}]
    return {
        "metadata": meta,
        "spec": {"nodeName": node, "hostNetwork": host_network, "containers": containers},
        "status": status,
    }


def service(
    name: str, cluster_ip: str, namespace: str = "shop", uid: str | None = None
) -> dict[str, Any]:
    return {
        "metadata": {"name": name, "namespace": namespace, "uid": uid or f"uid-svc-{name}"},
        "spec": {"clusterIP": cluster_ip, "clusterIPs": [cluster_ip]},
    }


def endpoint_slice(
    name: str,
    service_name: str,
    pods: list[dict[str, Any]],
    namespace: str = "shop",
    uid: str | None = None,
) -> dict[str, Any]:
    return {
        "metadata": {
            "name": name,
            "namespace": namespace,
            "uid": uid or f"uid-eps-{name}",
            "labels": {"kubernetes.io/service-name": service_name},
        },
        "endpoints": [
            {
                "addresses": [p["status"]["podIP"]],
                "targetRef": {
                    "kind": "Pod",
                    "name": p["metadata"]["name"],
                    "uid": p["metadata"]["uid"],
                },
            }
            for p in pods
        ],
    }


def job(name: str, cronjob: str | None = None, namespace: str = "shop") -> dict[str, Any]:
    meta: dict[str, Any] = {"name": name, "namespace": namespace, "uid": f"uid-job-{name}"}
    if cronjob:
        meta["ownerReferences"] = [{"kind": "CronJob", "name": cronjob, "controller": True}]
    return {"metadata": meta}


def namespace(name: str, labels: dict[str, str] | None = None) -> dict[str, Any]:
    return {"metadata": {"name": name, "uid": f"uid-ns-{name}", "labels": labels or {}}}


def policy(name: str, **spec: Any) -> CompiledPolicy:
    """A compiled policy selecting namespaces labelled capture=on; ``spec`` overrides (camelCase)."""
    base: dict[str, Any] = {
        "name": name,
        "uid": f"uid-{name}",
        "generation": 1,
        "namespaceSelector": {"matchLabels": {"capture": "on"}},
        "podSelector": {},
        "direction": "Both",
        "protocols": ["HTTP", "Redis", "DNS", "PostgreSQL"],
        "samplingPercent": 100,
        "payload": {},
        "redaction": {},
        "export": {"endpoint": "http://collector:4317", "protocol": "Grpc", "timeoutSeconds": 10},
    }
    base.update(spec)
    return CompiledPolicy.model_validate(base)
