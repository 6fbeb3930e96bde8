"""Benchmark of the agent's Kubernetes caches: memory, lookup cost per exchange, relist time.

A synthetic cluster in the shape the API serves it (default 10,000 pods in
200 namespaces behind 2,000 Services, Deployment-owned through ReplicaSets,
five labels and two containers each) is fed to a :class:`ClusterIndex`
exactly as the watcher feeds it. Printed, not asserted (docs/performance.md):

* cache memory: Python allocations the index holds (tracemalloc), the input
  dicts freed;
* lookup cost: what the daemon adds per exchange — policy selection with both
  ends resolved, the span attributes of both ends, and the exporter's two
  resource lookups — in µs of CPU time, and as a share of an offline
  exchange rate (printed with the load average);
* relist: the time to converge after a relist (410 Gone / reconnect) of
  every pod, and the first full sync.

    python -m flowprobe.devenv.enrichbench [--pods N --services N --offline-rate R]
"""

from __future__ import annotations

import argparse
import gc
import json
import os
import random
import time
import tracemalloc
from typing import Any

from flowprobe.agent.capture.tshark import Tools
from flowprobe.agent.enrich.index import (
    ENDPOINTSLICES,
    NAMESPACES,
    PODS,
    SERVICES,
    ClusterIndex,
)
from flowprobe.agent.enrich.policy import PolicyEngine
from flowprobe.agent.enrich.resolver import KubernetesResolver
from flowprobe.agent.sessionize.records import Endpoints, Exchange, Outcome
from flowprobe.api.policyset import CompiledPolicy
from flowprobe.devenv.bench import bench_pcap, run_agent
from flowprobe.devenv.k8sobjects import endpoint_slice, policy, service


def measured_offline_rate() -> float:
    """Exchanges/s of the agent's offline read (two tshark shards on two cores,
    its fastest setting, so the share below is the strictest), measured now on
    the benchmark's smaller generated pcap: a reference from the same run."""
    tools = Tools.find()
    path, _ = bench_pcap(20_000, 4_000, 4_000)
    seconds, exchanges = run_agent(tools, path, min(2, os.cpu_count() or 1))
    return exchanges / seconds


def _ip(i: int) -> str:
    return f"10.{64 + i // 65536}.{(i // 256) % 256}.{i % 256}"


def cluster(
    pods: int, services: int, nodes: int = 100, namespaces: int = 200
) -> dict[str, list[dict[str, Any]]]:
    rnd = random.Random(7)
    out: dict[str, list[dict[str, Any]]] = {
        PODS: [],
        SERVICES: [],
        ENDPOINTSLICES: [],
        NAMESPACES: [],
    }
    for n in range(namespaces):
        out[NAMESPACES].append(
            {
                "metadata": {
                    "name": f"ns-{n}",
                    "uid": f"ns-{n}",
                    "labels": {"team": f"t{n % 7}", "kubernetes.io/metadata.name": f"ns-{n}"},
                }
            }
        )
    per_service = max(1, pods // max(1, services))
    for i in range(pods):
        svc = i // per_service
        ns = f"ns-{svc % namespaces}"
        app = f"app-{svc}"
        h = f"{svc:x}5d9c7b"
        out[PODS].append(
            {
                "metadata": {
                    "name": f"{app}-{h}-{i:05x}",
                    "namespace": ns,
                    "uid": f"pod-{i}",
                    "resourceVersion": str(i),
                    "creationTimestamp": "2026-11-27T00:00:00Z",
                    "labels": {
                        "app": app,
                        "app.kubernetes.io/name": app,
                        "app.kubernetes.io/part-of": "shop",
                        "version": "v1",
                        "pod-template-hash": h,
                    },
                    "ownerReferences": [
                        {
                            "apiVersion": "apps/v1",
                            "kind": "ReplicaSet",
                            "name": f"{app}-{h}",
                            "uid": f"rs-{svc}",
                            "controller": True,
                        }
                    ],
                },
                "spec": {
                    "nodeName": f"node-{rnd.randrange(nodes)}",
                    "containers": [
                        {
                            "name": "app",
                            "image": "registry.invalid/app:1",
                            "ports": [{"containerPort": 8080, "name": "http", "protocol": "TCP"}],
                        },
                        {
                            "name": "sidecar",
                            "image": "registry.invalid/proxy:1",
                            "ports": [
                                {"containerPort": 9090, "name": "metrics", "protocol": "TCP"}
                            ],
                        },
                    ],
                },
                "status": {
                    "phase": "Running",
                    "podIP": _ip(i),
                    "podIPs": [{"ip": _ip(i)}],
                    "hostIP": "192.168.0.1",
                    "startTime": "2026-11-27T00:00:00Z",
                },
            }
        )
    for s in range(services):
        ns = f"ns-{s % namespaces}"
        ip = f"10.0.{s // 256}.{s % 256}"
        out[SERVICES].append(service(f"app-{s}", ip, ns, uid=f"svc-{s}"))
        members = out[PODS][s * per_service : (s + 1) * per_service]
        out[ENDPOINTSLICES].append(
            endpoint_slice(f"app-{s}-x", f"app-{s}", members, ns, uid=f"eps-{s}")
        )
    return out


def _policy() -> CompiledPolicy:
    return policy(
        "bench",
        namespaceSelector={"matchLabels": {"team": "t1"}},
        podSelector={"matchExpressions": [{"key": "version", "operator": "In", "values": ["v1"]}]},
        protocols=["HTTP"],
    )


def run(pods: int, services: int, lookups: int, offline_rate: float) -> dict[str, Any]:
    gc.collect()
    tracemalloc.start()
    index = ClusterIndex()
    objs = cluster(pods, services)
    t0 = time.perf_counter()
    for resource in (NAMESPACES, PODS, SERVICES, ENDPOINTSLICES):
        index.replace(resource, objs[resource], 1_000_000)
    first_sync_s = time.perf_counter() - t0
    ips = [p["status"]["podIP"] for p in objs[PODS]]
    relist_items = objs[PODS]
    del objs
    gc.collect()
    cache_mb = tracemalloc.get_traced_memory()[0] / 2**20
    # The relist's input is alive here; measure the index without it.
    t0 = time.perf_counter()
    index.replace(PODS, relist_items, 2_000_000)
    relist_s = time.perf_counter() - t0
    del relist_items
    gc.collect()
    tracemalloc.stop()

    # Every pod on the agent's node and a policy selecting a share of them.
    node = "node-1"
    engine = PolicyEngine(index, node)
    engine.set_policies([_policy()])
    resolver = KubernetesResolver(index, admit=engine.selects_any)
    local = [p.ips[0] for p in index.pods_on_node(node)]
    rnd = random.Random(1)
    exchanges = [
        Exchange(
            protocol="http",
            endpoints=Endpoints("tcp", rnd.choice(ips), 40000 + i % 20000, rnd.choice(local), 8080),
            start_us=3_000_000 + i,
            end_us=3_000_100 + i,
            request_end_us=3_000_010 + i,
            response_start_us=3_000_090 + i,
            outcome=Outcome.OK,
        )
        for i in range(lookups)
    ]

    def enrich() -> tuple[float, int]:
        # CPU time of this process: other load on the machine does not count.
        t0 = time.process_time()
        selected = 0
        for ex in exchanges:
            chosen, server, client = engine.select(ex)
            if chosen:
                selected += 1
                engine.annotate(ex, chosen[0], server, client)
            ep = ex.endpoints
            resolver.client(ep.client_address, ex.start_us)
            resolver.server(ep.server_address, ep.server_port, ex.start_us)
        return (time.process_time() - t0) / lookups * 1e6, selected

    # Cold: every cache empty (right after a sync); warm: the same pods
    # again, as on a node whose pods keep talking to the same peers.
    cold_us, selected = enrich()
    per_exchange_us, _ = enrich()
    share = per_exchange_us * offline_rate / 1e6
    return {
        "pods": pods,
        "services": services,
        "cache_mb": round(cache_mb, 1),
        "first_sync_s": round(first_sync_s, 3),
        "relist_pods_s": round(relist_s, 3),
        "lookup_us_per_exchange_cold": round(cold_us, 2),
        "lookup_us_per_exchange": round(per_exchange_us, 2),
        "selected_share": round(selected / lookups, 3),
        "offline_rate": offline_rate,
        "enrichment_share_of_offline": round(share, 4),
        "load_average": [round(x, 2) for x in os.getloadavg()],
    }


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    ap.add_argument("--pods", type=int, default=10_000)
    ap.add_argument("--services", type=int, default=2_000)
    ap.add_argument("--lookups", type=int, default=50_000)
    ap.add_argument(
        "--offline-rate",
        type=float,
        help="exchanges/s of `flowprobe-agent read` (default: measured in this run)",
    )
    args = ap.parse_args(argv)
    if args.offline_rate is None:
        args.offline_rate = measured_offline_rate()
    result = run(args.pods, args.services, args.lookups, args.offline_rate)
    print(json.dumps(result, indent=1))
    print(
        f"enrichment: {result['lookup_us_per_exchange']} µs per exchange = "
        f"{100 * result['enrichment_share_of_offline']:.1f}% of the offline rate "
        f"({args.offline_rate:.0f} exchanges/s; acceptance ≤ 10%); "
        f"cache {result['cache_mb']} MB for {args.pods} pods / {args.services} services (≤ 100 MB); "
        f"relist of every pod {result['relist_pods_s']} s"
    )
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
