"""From `kubectl apply` of a ProbePolicy to spans in Jaeger, on the real local control plane.

The operator runs as a process; the agent runs as ``flowprobe-agent daemon``
in a network namespace playing the kwok node, whose pods are namespaces with
the IPs kwok gave them, running real HTTP and Redis servers.
"""

from __future__ import annotations

import datetime
import json
import time
import uuid
from collections.abc import Callable
from pathlib import Path
from typing import Any

import pytest

from flowprobe.api import constants
from flowprobe.api.agentreport import report_lease_name
from flowprobe.devenv.agentnode import AgentNode
from flowprobe.devenv.backends import LocalBackends, attributes_of, spans_of
from flowprobe.devenv.cluster import LocalCluster
from flowprobe.devenv.netns import Pod
from flowprobe.devenv.servers import start_http, start_redis, start_tls
from tests.agent.enrich import kubekit as kk
from tests.agent.export.fakes import self_signed
from tests.operator.clusterkit import OperatorProcess, wait_until
from tests.operator.conftest import crds  # noqa: F401 - the CRD fixture

pytestmark = [pytest.mark.cluster, pytest.mark.netns, pytest.mark.slow]


def _curl(pod: Pod, url: str, times: int = 3) -> None:
    for _ in range(times):
        pod.run(["curl", "-s", "-o", "/dev/null", "--max-time", "5", url])


def _redis(pod: Pod, host: str, *cmd: str) -> None:
    pod.run(["redis-cli", "-h", host, *cmd])


class Shop:
    def __init__(
        self, cluster: LocalCluster, backends: LocalBackends, an: AgentNode, ns: str, policy: str
    ) -> None:
        self.cluster, self.backends, self.an, self.ns, self.policy = (
            cluster,
            backends,
            an,
            ns,
            policy,
        )
        self.pods: dict[str, Pod] = {}
        self.meta: dict[str, dict[str, Any]] = {}

    def spans(self, service: str, since: datetime.datetime) -> list[dict[str, Any]]:
        end = datetime.datetime.now(datetime.UTC) + datetime.timedelta(minutes=1)
        return spans_of(self.backends.jaeger_traces(service, since, end, num_traces=500))

    def wait_spans(
        self,
        service: str,
        since: datetime.datetime,
        match: Callable[[dict[str, Any]], bool],
        what: str,
        traffic: Callable[[], None] | None = None,
        timeout: float = 60,
    ) -> list[dict[str, Any]]:
        found: list[dict[str, Any]] = []

        def check() -> bool:
            if traffic is not None:
                traffic()
            found[:] = [s for s in self.spans(service, since) if match(s)]
            return bool(found)

        wait_until(check, f"{what}; agent log:\n{self.an.log_text()[-4000:]}", timeout=timeout)
        return found


def attrs(span: dict[str, Any]) -> dict[str, Any]:
    return attributes_of(span.get("attributes", []))


@pytest.mark.usefixtures("crds")
def test_policy_to_jaeger_with_churn_policy_changes_and_apiserver_restart(
    local_cluster: LocalCluster, tmp_path: Path
) -> None:
    c = local_cluster
    tid = uuid.uuid4().hex[:6]
    ns, app = f"fp-e2e-{tid}", f"shop-{tid}"
    (node,) = c.create_fake_nodes(1, prefix=f"fp-e2e-{tid}-", labels={"flowprobe-e2e": tid})
    kk.apply(c, kk.namespace(ns), kk.namespace(app, {"capture": tid}))
    kk.apply(
        c,
        kk.deployment(app, "web", node, {"app": "web"}, ports=[(8080, "http")]),
        kk.bare_pod(app, "client", node, {"app": "client"}),
        kk.bare_pod(app, "cache", node, {"app": "cache"}, ports=[(6379, "redis")]),
        kk.bare_pod(app, "other", node, {"app": "other"}, ports=[(8080, "http")]),
        kk.bare_pod(app, "other-client", node, {"app": "other-client"}),
    )
    c.wait_for(lambda: len(kk.running_pods(c, app)) == 5, "5 shop pods Running with IPs")
    running = kk.running_pods(c, app)
    by_role = {("web" if n.startswith("web-") else n): p for n, p in running.items()}
    ip = {role: p["status"]["podIP"] for role, p in by_role.items()}
    web_pod = next(n for n in running if n.startswith("web-"))

    operator = OperatorProcess(
        tmp_path,
        kubeconfig=c.kubeconfig,
        namespace=ns,
        config={"namespace": ns, "resyncSeconds": 5, "agentReportGraceSeconds": 10},
    )
    with (
        LocalBackends() as backends,
        AgentNode(c, node, ns, tmp_path, otlp_endpoints=(backends.otlp_grpc,)) as an,
    ):
        operator.start()
        shop = Shop(c, backends, an, ns, f"shop-{tid}")
        pods = {role: an.add_pod(role, ip[role]) for role in ip}
        start_http(pods["web"], 8080)
        start_http(pods["other"], 8080)
        start_redis(pods["cache"], tmp_path)
        an.start_agent()
        policy: dict[str, Any] = {
            "apiVersion": constants.API_VERSION,
            "kind": constants.KIND,
            "metadata": {"name": shop.policy},
            "spec": {
                "namespaceSelector": {"matchLabels": {"capture": tid}},
                "podSelector": {
                    "matchExpressions": [
                        {"key": "app", "operator": "In", "values": ["web", "client"]}
                    ]
                },
                "protocols": ["HTTP"],
                "export": {"otlp": {"endpoint": backends.otlp_grpc}},
                "agent": {"nodeSelector": {"flowprobe-e2e": tid}},
                "anomalies": {"mode": "Detect", "topN": {"size": 5}},
            },
        }
        # A second policy that selects nothing here keeps the agents (and
        # their ConfigMap) when the first one is deleted at the end.
        idle = json.loads(json.dumps(policy))
        idle["metadata"]["name"] = f"idle-{tid}"
        idle["spec"]["podSelector"] = {"matchLabels": {"app": "none"}}
        t0 = datetime.datetime.now(datetime.UTC)
        c.kubectl(
            "apply",
            "-f",
            "-",
            input=json.dumps({"apiVersion": "v1", "kind": "List", "items": [policy, idle]}),
        )

        def agent_filter() -> str:
            status, body = an.readiness()
            return str(body.get("filter")) if status == 200 else ""

        wait_until(
            lambda: f"host {ip['web']}" in agent_filter(),
            f"agent capturing web; agent log:\n{an.log_text()[-3000:]}\noperator log:\n{operator.log_text()[-2000:]}",
            timeout=90,
        )
        assert f"host {ip['client']}" in agent_filter()
        assert ip["other"] not in agent_filter() and ip["cache"] not in agent_filter()
        print(
            f"\npolicy applied -> agent capturing: {(datetime.datetime.now(datetime.UTC) - t0).total_seconds():.1f} s"
        )

        # -- selected pods, both sides named ----------------------------------
        def shop_traffic() -> None:
            _curl(pods["client"], f"http://{ip['web']}:8080/items/1")
            _curl(pods["other-client"], f"http://{ip['other']}:8080/items/2")

        server_spans = shop.wait_spans(
            "web",
            t0,
            lambda s: s.get("kind") == 2 or str(s.get("kind")).endswith("SERVER"),
            "web SERVER spans",
            shop_traffic,
        )
        span = server_spans[0]
        res, a = span["resource"], attrs(span)
        assert res["k8s.namespace.name"] == app
        assert res["k8s.pod.name"] == web_pod
        assert res["k8s.pod.uid"] == by_role["web"]["metadata"]["uid"]
        assert res["k8s.node.name"] == node
        assert res["k8s.deployment.name"] == "web"
        assert res["k8s.container.name"] == "main"
        assert a["flowprobe.policy"] == shop.policy
        assert a["flowprobe.client.k8s.pod.name"] == "client"
        assert a["flowprobe.client.k8s.pod.uid"] == by_role["client"]["metadata"]["uid"]
        assert a["flowprobe.server.k8s.deployment.name"] == "web"
        client_spans = shop.wait_spans("client", t0, lambda s: True, "client CLIENT spans")
        assert client_spans[0]["resource"]["k8s.pod.name"] == "client"
        # Unselected pods: absent.
        services = backends.jaeger_services()
        assert "other" not in services and "other-client" not in services, services
        # spec.anomalies: the daemon ranks what it exports (top-N gauges, docs/anomalies.md).
        top = (
            'flowprobe_top_requests{flowprobe_top_dimension="server.workload", '
            'flowprobe_top_member="web"}'
        )
        wait_until(
            lambda: bool(backends.prom_query(top)),
            f"top-N gauges in Prometheus; agent log:\n{an.log_text()[-3000:]}",
            timeout=90,
        )

        # -- policy change: add Redis and the cache ---------------------------
        policy["spec"]["protocols"] = ["HTTP", "Redis"]
        policy["spec"]["podSelector"]["matchExpressions"][0]["values"].append("cache")
        t_change = time.monotonic()
        c.kubectl("apply", "-f", "-", input=json.dumps(policy))
        wait_until(
            lambda: f"host {ip['cache']}" in agent_filter(),
            "agent follows the policy change",
            timeout=30,
        )
        print(f"policy change -> capture follows: {time.monotonic() - t_change:.1f} s")

        t1 = datetime.datetime.now(datetime.UTC)
        redis_spans = shop.wait_spans(
            "web",
            t1,
            lambda s: attrs(s).get("db.system.name") == "redis",
            "web's Redis CLIENT spans",
            lambda: _redis(pods["web"], ip["cache"], "SET", "k", "v"),
        )
        assert attrs(redis_spans[0])["flowprobe.server.k8s.pod.name"] == "cache"

        # -- churn: a new pod with the cache's IP -----------------------------
        t_deleted = datetime.datetime.now(datetime.UTC)
        c.kubectl("delete", "pod", "-n", app, "cache", "--wait=true")
        kk.apply(c, kk.bare_pod(app, "cache2", node, {"app": "cache"}, ports=[(6379, "redis")]))
        c.wait_for(lambda: "cache2" in kk.running_pods(c, app), "cache2 Running")
        if kk.running_pods(c, app)["cache2"]["status"]["podIP"] != ip["cache"]:
            # kwok hands out the lowest free IP; another test may have freed a lower one.
            kk.set_pod_running(c, app, "cache2", ip["cache"])
        shop.wait_spans(
            "web",
            t_deleted,
            lambda s: attrs(s).get("flowprobe.server.k8s.pod.name") == "cache2",
            "Redis spans naming cache2",
            lambda: _redis(pods["web"], ip["cache"], "GET", "k"),
        )
        for s in shop.spans("web", t1):
            sa = attrs(s)
            if sa.get("db.system.name") != "redis":
                continue
            started = int(s["startTimeUnixNano"]) / 1e9
            name = sa.get("flowprobe.server.k8s.pod.name")
            if started < t_deleted.timestamp():
                assert name == "cache", (name, started)
            else:
                assert name in ("cache2", None), (name, started)

        # -- API server restart: capture goes on, watches resume --------------
        c.restart_apiserver()
        t2 = datetime.datetime.now(datetime.UTC)
        shop.wait_spans(
            "web",
            t2,
            lambda s: attrs(s).get("flowprobe.client.k8s.pod.name") == "client",
            "spans after the API server restart",
            lambda: _curl(pods["client"], f"http://{ip['web']}:8080/items/3", 1),
        )
        # A pod created after the restart reaches the agent's watch.
        kk.apply(c, kk.bare_pod(app, "late", node, {"app": "client"}))
        c.wait_for(lambda: "late" in kk.running_pods(c, app), "late Running")
        late_ip = kk.running_pods(c, app)["late"]["status"]["podIP"]
        wait_until(
            lambda: f"host {late_ip}" in agent_filter(),
            "agent sees a pod created after the restart",
            timeout=60,
        )

        # -- the operator's view: agents Ready, reporting, nothing degraded ----
        def conditions() -> dict[str, str]:
            pp = c.api("GET", f"/apis/{constants.API_VERSION}/{constants.PLURAL}/{shop.policy}")
            return {x["type"]: x["reason"] for x in (pp.get("status") or {}).get("conditions", [])}

        wait_until(
            lambda: (
                conditions().get("Ready") == "AgentsReady"
                and conditions().get("Degraded") == "AsExpected"
            ),
            f"policy Ready, not degraded; operator log:\n{operator.log_text()[-3000:]}",
            timeout=60,
        )

        # -- the report Lease the operator reads ------------------------------
        lease = c.api(
            "GET", f"/apis/coordination.k8s.io/v1/namespaces/{ns}/leases/{report_lease_name(node)}"
        )
        report = json.loads(lease["metadata"]["annotations"][constants.ANNOTATION_AGENT_REPORT])
        assert report["node"] == node and report["ready"] is True
        assert report["configChecksum"]
        renewed = datetime.datetime.fromisoformat(lease["spec"]["renewTime"].replace("Z", "+00:00"))
        assert renewed > t2

        # -- the report on the policy: per-node fields, then TLS it cannot read --
        def status() -> dict[str, Any]:
            pp = c.api("GET", f"/apis/{constants.API_VERSION}/{constants.PLURAL}/{shop.policy}")
            return pp.get("status") or {}

        wait_until(
            lambda: any(
                a["node"] == node and a["ready"] and a["interfaces"]
                for a in status().get("agents", [])
            ),
            f"the node's report on the policy; status: {status()}",
            timeout=60,
        )
        _, cert_pem, key_pem = self_signed(tmp_path, ("web.shop.test",))
        (tmp_path / "tls.crt").write_bytes(cert_pem)
        (tmp_path / "tls.key").write_bytes(key_pem)
        start_tls(pods["web"], tmp_path / "tls.crt", tmp_path / "tls.key", 8443)

        def tls_noted() -> bool:
            r = pods["client"].run(["curl", "-skf", f"https://{ip['web']}:8443/"])
            assert r.returncode == 0, r.stderr
            return conditions().get("Degraded") == "TLSNotVisible"

        wait_until(
            tls_noted,
            f"Degraded=TLSNotVisible; status: {status()}\nagent log:\n{an.log_text()[-2000:]}",
            timeout=90,
        )
        (note,) = [n for n in status()["nodeNotes"] if n["type"] == "TLSNotVisible"]
        assert note["node"] == node
        assert f"{app}/client -> {app}/{web_pod}:8443" in note["message"]

        # -- delete the policy: capture stops ---------------------------------
        t_delete = time.monotonic()
        c.kubectl("delete", "probepolicy", shop.policy, "--wait=true")
        wait_until(
            lambda: (
                an.readiness()[1].get("policies") == [f"idle-{tid}"]
                and an.readiness()[1].get("filter") is None
            ),
            "capture stops with the policy gone",
            timeout=30,
        )
        print(f"policy deleted -> capture stopped: {time.monotonic() - t_delete:.1f} s")
        c.kubectl("delete", "probepolicy", f"idle-{tid}", "--wait=true")
    operator.stop()
    c.kubectl("delete", "namespace", app, ns, "--wait=false")
    c.kubectl("delete", "node", node, "--wait=false")
