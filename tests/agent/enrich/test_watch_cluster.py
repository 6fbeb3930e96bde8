"""The watcher and index against the real local control plane (kwok gives pods IPs)."""

from __future__ import annotations

import time
from typing import Any

import pytest

from flowprobe.agent.enrich.index import ClusterIndex
from flowprobe.agent.enrich.resolver import KubernetesResolver
from flowprobe.agent.enrich.watch import Watcher, now_us
from flowprobe.devenv.cluster import LocalCluster
from tests.agent.enrich import kubekit as kk

pytestmark = pytest.mark.cluster


def test_watcher_resolves_workloads_services_ip_reuse_and_survives_apiserver_restart(
    local_cluster: LocalCluster,
) -> None:
    c = local_cluster
    ns = kk.unique("enrich")
    (node,) = c.create_fake_nodes(1, prefix=f"{ns}-kwok-")
    manual = f"{ns}-manual"
    kk.manual_node(c, manual)
    kk.apply(c, kk.namespace(ns, {"team": "shop"}))
    kk.apply(
        c,
        kk.deployment(ns, "web", node, {"app": "web"}, ports=[(8080, "http")]),
        kk.service(ns, "web", {"app": "web"}, 8080),
        {
            "apiVersion": "batch/v1",
            "kind": "CronJob",
            "metadata": {"name": "report", "namespace": ns},
            "spec": {
                "schedule": "0 0 1 1 *",
                "suspend": True,
                "jobTemplate": {
                    "spec": {"template": {"spec": {**kk.pod_spec(node), "restartPolicy": "Never"}}}
                },
            },
        },
    )
    cron_uid = c.api("GET", f"/apis/batch/v1/namespaces/{ns}/cronjobs/report")["metadata"]["uid"]
    # What the CronJob controller does when the schedule fires.
    kk.apply(
        c,
        {
            "apiVersion": "batch/v1",
            "kind": "Job",
            "metadata": {
                "name": "report-29000000",
                "namespace": ns,
                "ownerReferences": [
                    {
                        "apiVersion": "batch/v1",
                        "kind": "CronJob",
                        "name": "report",
                        "uid": cron_uid,
                        "controller": True,
                    }
                ],
            },
            # On the manual node: kwok would complete a Job's pod at once.
            "spec": {"template": {"spec": {**kk.pod_spec(manual), "restartPolicy": "Never"}}},
        },
    )
    c.wait_for(lambda: len(kk.running_pods(c, ns)) == 1, "web pod Running")

    def job_pods() -> list[dict[str, Any]]:
        return c.api("GET", f"/api/v1/namespaces/{ns}/pods?labelSelector=job-name")["items"]  # type: ignore[no-any-return]

    c.wait_for(lambda: bool(job_pods()), "the job's pod")
    job_pod = job_pods()[0]["metadata"]
    kk.set_pod_running(c, ns, job_pod["name"], "10.99.0.3")

    index = ClusterIndex()
    watcher = Watcher(kk.api_for(c), index, watch_timeout_s=30).start()
    try:
        assert watcher.wait_synced(30), {r: s.last_error for r, s in watcher.status.items()}
        resolver = KubernetesResolver(index)
        pods = kk.running_pods(c, ns)
        web = next(p for n, p in pods.items() if n.startswith("web-"))

        def eventually(check: object, what: str) -> None:
            c.wait_for(lambda: bool(check() if callable(check) else check), what, timeout=30)

        def web_services() -> list[str]:
            with index.lock:
                rec = index.pods.get(web["metadata"]["uid"])
                return index.services_of(rec) if rec else []

        # EndpointSlices come from kcm once the pod is Ready.
        eventually(lambda: web_services() == ["web"], "web's EndpointSlice")
        wl = resolver.server(web["status"]["podIP"], 8080, now_us())
        assert wl is not None
        attrs = dict(wl.attributes)
        assert wl.name == "web"
        assert attrs["k8s.deployment.name"] == "web"
        assert attrs["k8s.namespace.name"] == ns
        assert attrs["k8s.node.name"] == node
        assert attrs["k8s.pod.uid"] == web["metadata"]["uid"]
        assert attrs["k8s.container.name"] == "main"
        job_wl = resolver.client("10.99.0.3", now_us())
        assert job_wl is not None and dict(job_wl.attributes)["k8s.cronjob.name"] == "report"
        assert dict(job_wl.attributes)["k8s.pod.uid"] == job_pod["uid"]
        assert index.namespace_labels[ns] == {"team": "shop", "kubernetes.io/metadata.name": ns}
        svc_ip = c.api("GET", f"/api/v1/namespaces/{ns}/services/web")["spec"]["clusterIP"]
        svc_wl = resolver.server(svc_ip, 8080, now_us())
        assert svc_wl is not None and dict(svc_wl.attributes)["k8s.service.name"] == "web"

        # IP reuse: a pod deleted, another given the same IP.
        ip = "10.99.0.7"
        kk.apply(c, kk.bare_pod(ns, "old", manual))
        kk.set_pod_running(c, ns, "old", ip)
        eventually(
            lambda: (p := index.pod_at(ip, now_us())) is not None and p.name == "old", "old pod"
        )
        t_old = now_us()
        time.sleep(0.05)
        kk.force_delete(c, ns, "old")
        kk.apply(c, kk.bare_pod(ns, "new", manual))
        kk.set_pod_running(c, ns, "new", ip)
        eventually(
            lambda: (p := index.pod_at(ip, now_us())) is not None and p.name == "new", "new pod"
        )
        old_then = index.pod_at(ip, t_old)
        assert old_then is not None and old_then.name == "old"

        # API server restart: the watches reconnect and resume.
        before = {r: s.reconnects + s.lists for r, s in watcher.status.items()}
        c.restart_apiserver()
        kk.apply(c, kk.bare_pod(ns, "after-restart", node))
        eventually(
            lambda: any(p.name == "after-restart" and p.ips for p in index.pods.values()),
            "a pod created after the restart",
        )
        after = {r: s.reconnects + s.lists for r, s in watcher.status.items()}
        assert after["pods"] > before["pods"]
        assert index.counters.bad_objects == 0
    finally:
        watcher.stop()
        c.kubectl("delete", "namespace", ns, "--wait=false")
        c.kubectl("delete", "node", manual, node, "--wait=false")
