"""The RBAC accounting used by test_helm_cluster.py finds missing and unused grants."""

from __future__ import annotations

from tests.operator.clusterkit import Call, Grant, grants_from, rbac_call, rbac_gaps


def test_requests_map_to_rbac_verbs() -> None:
    def call(method: str, path: str, query: str = "") -> tuple[str, str, str, str | None]:
        c = rbac_call(method, path, query, 200)
        assert c is not None
        return (c.verb, c.group, c.resource, c.namespace)

    assert call("GET", "/apis/flowprobe.io/v1alpha1/probepolicies") == (
        "list",
        "flowprobe.io",
        "probepolicies",
        None,
    )
    assert call("GET", "/apis/flowprobe.io/v1alpha1/probepolicies", "watch=true") == (
        "watch",
        "flowprobe.io",
        "probepolicies",
        None,
    )
    assert call("PATCH", "/apis/flowprobe.io/v1alpha1/probepolicies/x/status") == (
        "patch",
        "flowprobe.io",
        "probepolicies/status",
        None,
    )
    assert call("DELETE", "/apis/apps/v1/namespaces/ns/daemonsets/a") == (
        "delete",
        "apps",
        "daemonsets",
        "ns",
    )
    assert call("GET", "/api/v1/namespaces") == ("list", "", "namespaces", None)
    assert call("GET", "/api/v1/namespaces/ns") == ("get", "", "namespaces", None)
    assert call("POST", "/api/v1/namespaces/default/events") == ("create", "", "events", "default")
    assert call("PUT", "/apis/coordination.k8s.io/v1/namespaces/ns/leases/l") == (
        "update",
        "coordination.k8s.io",
        "leases",
        "ns",
    )
    assert rbac_call("GET", "/apis/apps/v1", "", 200) is None  # discovery
    assert rbac_call("GET", "/version", "", 200) is None


def _role(kind: str, rules: list[dict[str, list[str]]], ns: str | None = None) -> dict[str, object]:
    meta = {"name": "r", **({"namespace": ns} if ns else {})}
    return {"kind": kind, "metadata": meta, "rules": rules}


def test_missing_and_unused_grants_are_found() -> None:
    grants = grants_from(
        [
            _role(
                "ClusterRole",
                [{"apiGroups": [""], "resources": ["pods"], "verbs": ["list", "watch"]}],
            ),
            _role(
                "Role",
                [
                    {
                        "apiGroups": ["coordination.k8s.io"],
                        "resources": ["leases"],
                        "resourceNames": ["op"],
                        "verbs": ["get"],
                    }
                ],
                "ns",
            ),
        ]
    )
    calls = [
        Call("list", "", "pods", None, None, 200, "GET", "/api/v1/pods"),
        Call("get", "coordination.k8s.io", "leases", "ns", "op", 200, "GET", "..."),
        # Not granted: another Lease, another namespace, and a refused call.
        Call("get", "coordination.k8s.io", "leases", "ns", "other", 200, "GET", "..."),
        Call("list", "", "pods", "elsewhere", None, 403, "GET", "..."),
    ]
    missing, unused = rbac_gaps(grants, calls)
    assert {(c.name, c.status) for c in missing} == {("other", 200), (None, 403)}
    assert unused == {Grant(None, "", "pods", "watch")}


def test_an_apply_that_creates_needs_create_too() -> None:
    grants = grants_from(
        [
            _role(
                "Role",
                [
                    {
                        "apiGroups": ["apps"],
                        "resources": ["daemonsets"],
                        "verbs": ["create", "patch"],
                    }
                ],
                "ns",
            )
        ]
    )
    created = Call("patch", "apps", "daemonsets", "ns", "a", 201, "PATCH", "...")
    updated = Call("patch", "apps", "daemonsets", "ns", "a", 200, "PATCH", "...")
    assert rbac_gaps(grants, [updated])[1] == {Grant("ns", "apps", "daemonsets", "create")}
    assert rbac_gaps(grants, [created, updated]) == (set(), set())
