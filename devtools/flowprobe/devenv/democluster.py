"""``make demo-cluster``: the agent in a cluster, from ``kubectl apply`` to Jaeger.

A local control plane with one kwok node, the operator, Jaeger and the
collector, a small shop (web Deployment, client, Redis cache, and an
unselected pair) whose pods are network namespaces with kwok's pod IPs, and
``flowprobe-agent daemon`` for the node (docs/agent-in-cluster.md). A
ProbePolicy selects web, client and cache; traffic runs until Ctrl-C or
``--duration``; spans appear in Jaeger with both sides' Kubernetes identity.
"""

from __future__ import annotations

import argparse
import contextlib
import json
import os
import subprocess
import sys
import tempfile
import time
from collections.abc import Sequence
from pathlib import Path
from typing import Any

from flowprobe.api import constants
from flowprobe.devenv.agentnode import AgentNode
from flowprobe.devenv.backends import LocalBackends, Ports
from flowprobe.devenv.cluster import LocalCluster
from flowprobe.devenv.servers import ensure_root, start_http, start_redis

REPO = Path(__file__).resolve().parents[3]
NS, APP = "flowprobe-system", "shop"


def _pod(
    name: str, node: str, labels: dict[str, str], port: tuple[int, str] | None = None
) -> dict[str, Any]:
    container: dict[str, Any] = {"name": "main", "image": "registry.invalid/app:1"}
    if port:
        container["ports"] = [{"containerPort": port[0], "name": port[1]}]
    spec = {"nodeName": node, "containers": [container]}
    if name == "web":
        return {
            "apiVersion": "apps/v1",
            "kind": "Deployment",
            "metadata": {"name": name, "namespace": APP},
            "spec": {
                "replicas": 1,
                "selector": {"matchLabels": labels},
                "template": {"metadata": {"labels": labels}, "spec": spec},
            },
        }
    return {
        "apiVersion": "v1",
        "kind": "Pod",
        "metadata": {"name": name, "namespace": APP, "labels": labels},
        "spec": spec,
    }


def _policy(endpoint: str) -> dict[str, Any]:
    return {
        "apiVersion": constants.API_VERSION,
        "kind": constants.KIND,
        "metadata": {"name": "shop"},
        "spec": {
            "namespaceSelector": {"matchLabels": {"flowprobe.io/capture": "enabled"}},
            "podSelector": {
                "matchExpressions": [
                    {"key": "app", "operator": "In", "values": ["web", "client", "cache"]}
                ]
            },
            "protocols": ["HTTP", "Redis"],
            "export": {"otlp": {"endpoint": endpoint}},
        },
    }


def run(duration: float | None) -> None:
    ensure_root()
    with contextlib.ExitStack() as stack:
        work = Path(
            stack.enter_context(tempfile.TemporaryDirectory(prefix="flowprobe-demo-cluster-"))
        )
        cluster = stack.enter_context(LocalCluster(work / "cluster"))
        print(f"control plane up: export KUBECONFIG={cluster.kubeconfig}", flush=True)
        (node,) = cluster.create_fake_nodes(1, prefix="demo-node-")
        cluster.kubectl("apply", "--server-side", "-f", str(REPO / "crds"))
        cluster.kubectl(
            "wait", "--for=condition=Established", f"crd/{constants.CRD_NAME}", "--timeout=60s"
        )
        cluster.kubectl("create", "namespace", NS)
        cluster.kubectl("create", "namespace", APP)
        cluster.kubectl("label", "namespace", APP, "flowprobe.io/capture=enabled")
        pods = {
            "web": _pod("web", node, {"app": "web"}, (8080, "http")),
            "client": _pod("client", node, {"app": "client"}),
            "cache": _pod("cache", node, {"app": "cache"}, (6379, "redis")),
            "other": _pod("other", node, {"app": "other"}, (8080, "http")),
        }
        cluster.kubectl(
            "apply",
            "-f",
            "-",
            input=json.dumps({"apiVersion": "v1", "kind": "List", "items": list(pods.values())}),
        )

        def ips() -> dict[str, str]:
            items = cluster.api("GET", f"/api/v1/namespaces/{APP}/pods")["items"]
            return {
                ("web" if p["metadata"]["name"].startswith("web-") else p["metadata"]["name"]): p[
                    "status"
                ]["podIP"]
                for p in items
                if p.get("status", {}).get("podIP")
            }

        cluster.wait_for(lambda: len(ips()) == len(pods), "the shop's pods get IPs")
        addr = ips()
        ports = Ports() if not Ports().busy() else Ports.free()
        backends = stack.enter_context(LocalBackends(work / "backends", ports=ports))
        env = dict(os.environ, KUBECONFIG=str(cluster.kubeconfig), FLOWPROBE_NAMESPACE=NS)
        config = work / "operator.json"
        config.write_text(json.dumps({"namespace": NS, "resyncSeconds": 5}))
        env["FLOWPROBE_OPERATOR_CONFIG"] = str(config)
        with (work / "operator.log").open("wb") as log:
            operator = subprocess.Popen(
                [
                    sys.executable,
                    "-m",
                    "kopf",
                    "run",
                    "--module=flowprobe.controller",
                    f"--namespace={NS}",
                    "--standalone",
                ],
                env=env,
                stdout=log,
                stderr=subprocess.STDOUT,
            )
        stack.callback(operator.wait, 30)
        stack.callback(operator.terminate)
        an = stack.enter_context(
            AgentNode(cluster, node, NS, work, otlp_endpoints=(backends.otlp_grpc,))
        )
        ns_pods = {name: an.add_pod(name, ip) for name, ip in addr.items()}
        start_http(ns_pods["web"], 8080)
        start_http(ns_pods["other"], 8080)
        start_redis(ns_pods["cache"], work)
        an.start_agent()
        cluster.kubectl("apply", "-f", "-", input=json.dumps(_policy(backends.otlp_grpc)))
        print(
            "pods: " + ", ".join(f"{n}={ip}" for n, ip in addr.items()) + "\n"
            f"ProbePolicy 'shop' selects web, client and cache (not 'other').\n"
            f"Jaeger:   {backends.jaeger_query_url}  (services web, client; "
            "span attributes flowprobe.client.k8s.* / flowprobe.server.k8s.*)\n"
            f"kubectl:  KUBECONFIG={cluster.kubeconfig} kubectl get pp; "
            f"kubectl -n {NS} get lease -o yaml\n"
            f"agent:    {an.health_url}/readyz, log {an.log}\n"
            "traffic runs until Ctrl-C" + (f" or {duration:.0f} s" if duration else ""),
            flush=True,
        )
        deadline = time.monotonic() + duration if duration else None
        try:
            while deadline is None or time.monotonic() < deadline:
                ns_pods["client"].run(
                    ["curl", "-s", "-o", "/dev/null", f"http://{addr['web']}:8080/items/7"]
                )
                ns_pods["web"].run(["redis-cli", "-h", addr["cache"], "INCR", "visits"])
                ns_pods["client"].run(
                    ["curl", "-s", "-o", "/dev/null", f"http://{addr['other']}:8080/"]
                )
                time.sleep(0.5)
        except KeyboardInterrupt:
            pass
        status, body = an.readiness()
        print(
            f"agent /readyz {status}: {json.dumps(body.get('exchanges'))}, filter {body.get('filter')!r}"
        )


def main(argv: Sequence[str] | None = None) -> int:
    ap = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    ap.add_argument("--duration", type=float, help="stop after this many seconds (default: Ctrl-C)")
    args = ap.parse_args(argv)
    run(args.duration)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
