"""The cluster index and the resolver on plain event sequences (no API server)."""

from __future__ import annotations

from flowprobe.agent.enrich.index import (
    ENDPOINTSLICES,
    JOBS,
    NAMESPACES,
    PODS,
    SERVICES,
    ClusterIndex,
)
from flowprobe.agent.enrich.resolver import KubernetesResolver
from flowprobe.devenv.k8sobjects import endpoint_slice, job, namespace, pod, service

S = 1_000_000  # µs


def test_ip_reuse_attributes_each_exchange_to_the_pod_holding_the_ip_then() -> None:
    idx = ClusterIndex()
    old = pod("cart-1", "10.244.0.7", labels={"app.kubernetes.io/name": "cart"})
    idx.apply(PODS, "ADDED", old, 100 * S)
    idx.apply(PODS, "MODIFIED", pod("cart-1", "10.244.0.7", terminating=True), 150 * S)
    # The new pod gets the IP before the old pod's DELETED event arrives.
    new = pod("search-1", "10.244.0.7")
    idx.apply(PODS, "ADDED", new, 160 * S)
    idx.apply(PODS, "DELETED", old, 165 * S)

    def at(t: int) -> str | None:
        p = idx.pod_at("10.244.0.7", t * S)
        return p.name if p else None

    assert at(90) == "cart-1"  # before the first known tenant: that tenant
    assert at(120) == "cart-1"
    assert at(159) == "cart-1"
    assert at(161) == "search-1"  # although cart-1 was not yet deleted
    assert at(170) == "search-1"
    idx.apply(PODS, "DELETED", new, 200 * S)
    assert at(199) == "search-1"
    assert at(201) is None  # nobody holds the IP now


def test_deleted_pods_are_kept_for_the_retention_then_pruned() -> None:
    idx = ClusterIndex(retention_seconds=60, max_deleted=2)
    for i in range(4):
        p = pod(f"p{i}", f"10.0.0.{i}")
        idx.apply(PODS, "ADDED", p, 0)
        idx.apply(PODS, "DELETED", p, (10 + i) * S)
    # Bounded: only the two most recent deleted pods are kept.
    assert idx.prune(20 * S) == 2
    assert idx.pod_at("10.0.0.1", 5 * S) is None
    assert idx.pod_at("10.0.0.3", 5 * S) is not None
    assert idx.prune(100 * S) == 2
    assert idx.sizes()["deleted_pods"] == 0 and not idx.pods


def test_relist_deletes_what_the_list_no_longer_has_and_keeps_tenancy() -> None:
    idx = ClusterIndex()
    a, b = pod("a", "10.0.0.1"), pod("b", "10.0.0.2")
    idx.replace(PODS, [a, b], 10 * S)
    idx.replace(PODS, [a], 50 * S)  # b went while the watch was down
    pa = idx.pod_at("10.0.0.1", 11 * S)
    assert pa is not None and pa.start_us == 10 * S  # unchanged pod keeps its start
    pb = idx.pods["uid-b"]
    assert pb.end_us == 50 * S
    assert idx.pod_at("10.0.0.2", 60 * S) is None


def test_workloads_from_owners() -> None:
    idx = ClusterIndex()
    idx.apply(JOBS, "ADDED", job("report-29000000", cronjob="report"), 0)
    cases = {
        "web": (
            ("ReplicaSet", "web-5d9c7b"),
            {"pod-template-hash": "5d9c7b"},
            ("Deployment", "web"),
        ),
        "bare-rs": (("ReplicaSet", "bare-rs"), {}, ("ReplicaSet", "bare-rs")),
        "db-0": (("StatefulSet", "db"), {}, ("StatefulSet", "db")),
        "agent": (("DaemonSet", "agent"), {}, ("DaemonSet", "agent")),
        "report": (("Job", "report-29000000"), {}, ("CronJob", "report")),
        "oneoff": (("Job", "oneoff"), {}, ("Job", "oneoff")),
    }
    for i, (name, (owner, labels, _)) in enumerate(cases.items()):
        idx.apply(PODS, "ADDED", pod(name, f"10.1.0.{i}", owner=owner, labels=labels), 0)
    idx.apply(PODS, "ADDED", pod("naked", "10.1.1.1"), 0)
    for name, (_, _, want) in cases.items():
        assert idx.workload(idx.pods[f"uid-{name}"]) == want, name
    assert idx.workload(idx.pods["uid-naked"]) is None


def test_resolver_names_pods_services_and_ports() -> None:
    idx = ClusterIndex()
    web = pod(
        "web-5d9c7b-x1",
        "10.244.0.5",
        owner=("ReplicaSet", "web-5d9c7b"),
        labels={"pod-template-hash": "5d9c7b"},
        ports={"app": [(8080, "http")], "sidecar": [(9090, "metrics")]},
    )
    idx.apply(PODS, "ADDED", web, 1 * S)
    idx.apply(SERVICES, "ADDED", service("web", "10.0.0.10"), 1 * S)
    idx.apply(ENDPOINTSLICES, "ADDED", endpoint_slice("web-abc", "web", [web]), 1 * S)
    r = KubernetesResolver(idx, extra=(("deployment.environment.name", "test"),))

    wl = r.server("10.244.0.5", 8080, 2 * S)
    assert wl is not None
    attrs = dict(wl.attributes)
    assert wl.name == "web"
    assert attrs == {
        "k8s.namespace.name": "shop",
        "k8s.pod.name": "web-5d9c7b-x1",
        "k8s.pod.uid": "uid-web-5d9c7b-x1",
        "k8s.node.name": "node-a",
        "k8s.container.name": "app",
        "k8s.replicaset.name": "web-5d9c7b",
        "k8s.deployment.name": "web",
        "service.instance.id": "shop.web-5d9c7b-x1.app",
        "deployment.environment.name": "test",
    }
    sidecar = r.server("10.244.0.5", 9090, 2 * S)
    assert sidecar is not None and dict(sidecar.attributes)["k8s.container.name"] == "sidecar"
    # Two containers: a client's container is unknown.
    client = r.client("10.244.0.5", 2 * S)
    assert client is not None and "k8s.container.name" not in dict(client.attributes)
    assert idx.services_of(idx.pods["uid-web-5d9c7b-x1"]) == ["web"]
    # A ClusterIP (seen before DNAT) is the Service; the outside world is nobody.
    svc = r.server("10.0.0.10", 80, 2 * S)
    assert svc is not None and svc.name == "web"
    assert dict(svc.attributes)["k8s.service.name"] == "web"
    assert r.server("192.0.2.1", 80, 2 * S) is None
    assert r.client("192.0.2.1", 2 * S) is None
    # Endpoint slice gone: no service any more.
    idx.apply(ENDPOINTSLICES, "DELETED", endpoint_slice("web-abc", "web", [web]), 3 * S)
    assert idx.services_of(idx.pods["uid-web-5d9c7b-x1"]) == []


def test_host_network_pods_resolve_by_port_only() -> None:
    idx = ClusterIndex()
    idx.apply(
        PODS,
        "ADDED",
        pod("node-exporter", "192.168.1.10", host_network=True, ports={"exp": [(9100, "metrics")]}),
        0,
    )
    idx.apply(
        PODS,
        "ADDED",
        pod("coredns", "192.168.1.10", host_network=True, ports={"dns": [(53, "dns")]}),
        0,
    )
    a = idx.server("192.168.1.10", 9100, S)
    b = idx.server("192.168.1.10", 53, S)
    assert a is not None and a.pod.name == "node-exporter" and a.port_name == "metrics"
    assert b is not None and b.pod.name == "coredns"
    assert idx.server("192.168.1.10", 22, S) is None  # the node's own sshd
    assert idx.client("192.168.1.10", S) is None  # which pod? unknowable


def test_bad_objects_are_counted_not_raised() -> None:
    idx = ClusterIndex()
    idx.apply(PODS, "ADDED", {"metadata": {}}, 0)
    idx.apply(PODS, "ADDED", {"metadata": {"uid": "x"}, "spec": "nonsense"}, 0)
    idx.replace(SERVICES, [{"nope": 1}], 0)
    idx.apply(NAMESPACES, "ADDED", namespace("shop", {"team": "a"}), 0)
    assert idx.counters.bad_objects == 3
    assert idx.namespace_labels == {"shop": {"team": "a"}}


def test_finished_pods_release_their_ip() -> None:
    idx = ClusterIndex()
    idx.apply(PODS, "ADDED", pod("job-1", "10.0.0.9", phase="Running"), 1 * S)
    idx.apply(PODS, "MODIFIED", pod("job-1", "10.0.0.9", phase="Succeeded"), 5 * S)
    idx.apply(PODS, "ADDED", pod("next", "10.0.0.9"), 6 * S)
    p = idx.pod_at("10.0.0.9", 7 * S)
    assert p is not None and p.name == "next"
    before = idx.pod_at("10.0.0.9", 3 * S)
    assert before is not None and before.name == "job-1"
    idx.apply(PODS, "MODIFIED", pod("job-1", "10.0.0.9", phase="Succeeded"), 8 * S)
    assert idx.pods["uid-job-1"].end_us == 5 * S
