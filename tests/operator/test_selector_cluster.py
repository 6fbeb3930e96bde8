"""The API server selects the same pods with ``LabelSelector.to_query()`` as ``matches()`` does.

The operator counts matched pods by asking the API server with the policy's
pod selector; this checks the query syntax against the real parser.
"""

from __future__ import annotations

import json
import uuid
from typing import Any

import pytest

from flowprobe.api.v1alpha1 import LabelSelector
from flowprobe.devenv.cluster import LocalCluster
from tests.operator.conftest import get_json

pytestmark = pytest.mark.cluster

LABELS = {
    "web-a": {"app": "web", "tier": "a", "team": "t"},
    "web-b": {"app": "web", "tier": "b", "zone": "y"},
    "web-canary": {"app": "web", "tier": "a", "canary": "1", "team": "t"},
    "web-x": {"app": "web", "tier": "a", "zone": "x", "team": "t"},
    "db": {"app": "db", "example.com/role": "primary"},
    "bare": {},
}
SELECTORS: list[dict[str, Any]] = [
    {},
    {"matchLabels": {"app": "web"}},
    {"matchLabels": {"example.com/role": "primary"}},
    {"matchExpressions": [{"key": "tier", "operator": "In", "values": ["a", "b"]}]},
    {"matchExpressions": [{"key": "zone", "operator": "NotIn", "values": ["x"]}]},
    {"matchExpressions": [{"key": "team", "operator": "Exists"}]},
    {"matchExpressions": [{"key": "canary", "operator": "DoesNotExist"}]},
    {
        "matchLabels": {"app": "web"},
        "matchExpressions": [
            {"key": "tier", "operator": "In", "values": ["a"]},
            {"key": "canary", "operator": "DoesNotExist"},
            {"key": "zone", "operator": "NotIn", "values": ["x", "z"]},
        ],
    },
]


@pytest.fixture(scope="module")
def pods_ns(local_cluster: LocalCluster) -> Any:
    ns = f"fp-sel-{uuid.uuid4().hex[:6]}"
    pods = [
        {
            "apiVersion": "v1",
            "kind": "Pod",
            "metadata": {"name": name, "namespace": ns, "labels": labels},
            # Never scheduled (no node matches): only the labels matter here.
            "spec": {
                "nodeSelector": {"flowprobe-test": "none"},
                "containers": [{"name": "c", "image": "registry.invalid/c:1"}],
            },
        }
        for name, labels in LABELS.items()
    ]
    local_cluster.kubectl("create", "namespace", ns)
    local_cluster.kubectl(
        "apply", "-f", "-", input=json.dumps({"apiVersion": "v1", "kind": "List", "items": pods})
    )
    yield ns
    local_cluster.kubectl("delete", "namespace", ns, "--wait=false", check=False)


@pytest.mark.parametrize("raw", SELECTORS, ids=[json.dumps(s) for s in SELECTORS])
def test_the_api_server_agrees_with_matches(
    local_cluster: LocalCluster, pods_ns: str, raw: dict[str, Any]
) -> None:
    sel = LabelSelector.model_validate(raw)
    query = sel.to_query()
    assert query is not None
    found = get_json(local_cluster, "-n", pods_ns, "pods", "-l", query)["items"]
    expected = sorted(name for name, labels in LABELS.items() if sel.matches(labels))
    assert sorted(p["metadata"]["name"] for p in found) == expected
