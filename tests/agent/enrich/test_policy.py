"""Policy selection, rules and capture scope on plain objects."""

from __future__ import annotations

from typing import Any

from flowprobe.agent.enrich.index import NAMESPACES, PODS, ClusterIndex
from flowprobe.agent.enrich.policy import MAX_BPF_HOSTS, PolicyEngine
from flowprobe.agent.enrich.resolver import KubernetesResolver
from flowprobe.agent.sessionize.records import Exchange
from flowprobe.devenv.k8sobjects import namespace, pod, policy
from tests.agent.export.fakes import exchange

T = 1_700_000_000_000_000


def cluster() -> ClusterIndex:
    idx = ClusterIndex()
    idx.apply(NAMESPACES, "ADDED", namespace("shop", {"capture": "on"}), 0)
    idx.apply(NAMESPACES, "ADDED", namespace("other", {}), 0)
    objs = [
        pod("web", "10.0.0.1", labels={"app": "web"}, ports={"web": [(8080, "http")]}),
        pod("redis", "10.0.0.2", labels={"app": "redis"}, ports={"redis": [(6379, "resp")]}),
        pod("batch", "10.0.0.3", namespace="other"),
        pod(
            "remote",
            "10.0.1.1",
            node="node-b",
            labels={"app": "remote"},
            ports={"r": [(8080, "http")]},
        ),
    ]
    for o in objs:
        idx.apply(PODS, "ADDED", o, T - 10_000_000)
    return idx


def chosen(engine: PolicyEngine, **kw: Any) -> list[str]:
    return [p.name for p in engine.select(exchange(start_us=T, **kw))[0]]


def test_selection_by_namespace_pod_direction_port_and_protocol() -> None:
    eng = PolicyEngine(cluster(), "node-a")
    eng.set_policies(
        [
            policy("all"),
            policy("web-in", podSelector={"matchLabels": {"app": "web"}}, direction="Ingress"),
            policy(
                "named-port", ports=[{"name": "resp", "protocol": "Redis"}], protocols=["Redis"]
            ),
        ]
    )
    web_to_redis = {"client": ("10.0.0.1", 40000), "server": ("10.0.0.2", 6379)}
    assert chosen(eng, protocol="redis", attrs={}, **web_to_redis) == ["all", "named-port"]
    # web as a server: all three would, but named-port's port/protocol do not match.
    assert chosen(eng, client=("10.0.0.3", 5000), server=("10.0.0.1", 8080)) == ["all", "web-in"]
    # batch (namespace not selected) calling outside: nobody.
    assert chosen(eng, client=("10.0.0.3", 5000), server=("192.0.2.1", 80)) == []
    # HTTP2 is not among "all"'s protocols.
    assert chosen(eng, protocol="http2", client=("10.0.0.3", 5000), server=("10.0.0.1", 8080)) == []
    assert eng.counters.unselected == 2


def test_client_side_defers_to_the_servers_node() -> None:
    eng = PolicyEngine(cluster(), "node-a")
    eng.set_policies([policy("all")])
    # web (node-a) calls remote (node-b), selected there: node-b's agent exports it.
    assert chosen(eng, client=("10.0.0.1", 40000), server=("10.0.1.1", 8080)) == []
    assert eng.counters.deferred == 1
    # web calls the outside world: exported here.
    assert chosen(eng, client=("10.0.0.1", 40000), server=("192.0.2.1", 443)) == ["all"]
    # The agent on node-b sees remote's SERVER side.
    other = PolicyEngine(eng.index, "node-b")
    other.set_policies([policy("all")])
    assert chosen(other, client=("10.0.0.1", 40000), server=("10.0.1.1", 8080)) == ["all"]


def test_sampling_is_per_connection() -> None:
    eng = PolicyEngine(cluster(), "node-a")
    eng.set_policies([policy("half", samplingPercent=50)])
    kept = {
        port: bool(chosen(eng, client=("10.0.0.3", port), server=("10.0.0.1", 8080)))
        for port in range(40000, 40400)
    }
    assert 120 < sum(kept.values()) < 280
    # The same connection always gets the same answer.
    for port, was in list(kept.items())[:50]:
        assert bool(chosen(eng, client=("10.0.0.3", port), server=("10.0.0.1", 8080))) == was


def test_annotate_names_both_ends_and_applies_the_policys_rules() -> None:
    idx = cluster()
    eng = PolicyEngine(idx, "node-a")
    p = policy(
        "strict",
        redaction={"queryText": "Omitted", "patterns": [{"name": "tok", "regex": "tok=[a-z0-9]+"}]},
    )
    eng.set_policies([p])
    ex = exchange(
        client=("10.0.0.1", 40000),
        server=("10.0.0.2", 6379),
        attrs={"url.query": "a=1&tok=abc123", "db.query.text": "GET ?", "http.user_agent": "curl"},
    )
    policies, server, client = eng.select(ex)
    eng.annotate(ex, policies[0], server, client)
    a = ex.attrs
    assert a["flowprobe.policy"] == "strict"
    assert a["flowprobe.server.k8s.pod.name"] == "redis"
    assert a["flowprobe.client.k8s.pod.name"] == "web"
    assert a["flowprobe.client.k8s.namespace.name"] == "shop"
    assert a["flowprobe.server.k8s.pod.uid"] == "uid-redis"
    assert a["url.query"] == "a=1&[REDACTED]"
    assert "db.query.text" not in a and "http.user_agent" not in a


def test_scope_follows_selected_pods_and_ports() -> None:
    idx = cluster()
    eng = PolicyEngine(idx, "node-a")
    assert eng.scope().empty
    eng.set_policies([policy("all")])
    s = eng.scope()
    assert s.bpf == "inbound and (host 10.0.0.1 or host 10.0.0.2)"
    assert s.protocols == ("dns", "http", "postgresql", "redis")
    eng.set_policies(
        [policy("named", ports=[{"name": "resp", "protocol": "Redis"}, {"port": 8080}])]
    )
    s = eng.scope()
    assert (
        s.bpf
        == "inbound and ((host 10.0.0.1 and (port 8080)) or (host 10.0.0.2 and (port 6379 or port 8080)))"
    )
    assert s.ports == (("redis", (6379,)),)
    # A pod goes: the scope changes; many pods: no host list.
    idx.apply(PODS, "DELETED", pod("web", "10.0.0.1"), T)
    eng.set_policies([policy("all")])
    assert eng.scope().bpf == "inbound and (host 10.0.0.2)"
    for i in range(MAX_BPF_HOSTS + 1):
        idx.apply(PODS, "ADDED", pod(f"p{i}", f"10.2.{i // 250}.{i % 250}"), T)
    assert eng.scope().bpf == "inbound"


def test_unselected_pods_get_no_resource_of_their_own() -> None:
    idx = cluster()
    eng = PolicyEngine(idx, "node-a")
    eng.set_policies([policy("web", podSelector={"matchLabels": {"app": "web"}})])
    r = KubernetesResolver(idx, admit=eng.selects_any)
    assert r.client("10.0.0.1", T) is not None
    assert r.server("10.0.0.2", 6379, T) is None  # redis: only web's peer


def test_memoised_selection_follows_ip_reuse_and_policy_changes() -> None:
    idx = cluster()
    eng = PolicyEngine(idx, "node-a")
    eng.set_policies([policy("web", podSelector={"matchLabels": {"app": "web"}})])
    r = KubernetesResolver(idx, admit=eng.selects_any)
    client, server = ("10.0.0.3", 5000), ("10.0.0.1", 8080)

    def at(start_us: int) -> Exchange:
        return exchange(start_us=start_us, client=client, server=server)

    before = eng.select(at(T))
    assert [p.name for p in before[0]] == ["web"]
    assert r.server("10.0.0.1", 8080, T) is not None
    # web goes; a pod no policy selects gets its IP. The same connection
    # tuple is memoised, but exchanges after the handover belong to the new
    # pod and those before still to web.
    idx.apply(PODS, "DELETED", pod("web", "10.0.0.1", labels={"app": "web"}), T + 1_000)
    idx.apply(PODS, "ADDED", pod("new", "10.0.0.1", labels={"app": "new"}), T + 2_000)
    after = eng.select(at(T + 3_000))
    assert after[0] == [] and after[1] is not None and after[1].pod.name == "new"
    again = eng.select(at(T))
    assert again[1] is not None and again[1].pod.name == "web"
    assert r.server("10.0.0.1", 8080, T + 3_000) is None  # new: not selected
    # A policy change alone (no pod event) reaches the resolver's memo too.
    eng.set_policies([policy("new", podSelector={"matchLabels": {"app": "new"}})])
    wl = r.server("10.0.0.1", 8080, T + 3_000)
    assert wl is not None and dict(wl.attributes)["k8s.pod.name"] == "new"
    assert [p.name for p in eng.select(at(T + 3_000))[0]] == ["new"]
