"""Two operator replicas never work at the same time (leader election on a Lease)."""

from __future__ import annotations

import json
import time
import uuid
from collections.abc import Iterator
from pathlib import Path

import pytest

from flowprobe.devenv.cluster import LocalCluster
from tests.operator.clusterkit import ApiProxy, OperatorProcess, wait_until
from tests.operator.conftest import get_json
from tests.operator.support import policy_manifest

pytestmark = pytest.mark.cluster

READ_VERBS = {"get", "list", "watch"}


class Replica:
    def __init__(self, cluster: LocalCluster, workdir: Path, ns: str, name: str) -> None:
        self.proxy = ApiProxy(
            cluster.server, cluster.pki.ca_crt, (cluster.pki.admin_crt, cluster.pki.admin_key)
        )
        self.proxy.start()
        kubeconfig = workdir / f"{name}.kubeconfig"
        kubeconfig.write_text(
            json.dumps(
                {
                    "apiVersion": "v1",
                    "kind": "Config",
                    "clusters": [{"name": "p", "cluster": {"server": self.proxy.url}}],
                    "users": [{"name": "u", "user": {}}],
                    "contexts": [{"name": "p", "context": {"cluster": "p", "user": "u"}}],
                    "current-context": "p",
                }
            )
        )
        self.operator = OperatorProcess(
            workdir,
            kubeconfig=kubeconfig,
            namespace=ns,
            config={"namespace": ns, "resyncSeconds": 5},
            name=name,
        )

    def leading(self) -> bool:
        return "became the leader" in self.operator.log_text()

    def writes(self) -> list[tuple[str, str]]:
        return [(c.verb, c.resource) for c in self.proxy.snapshot() if c.verb not in READ_VERBS]

    def close(self) -> None:
        self.operator.stop()
        self.proxy.stop()


@pytest.fixture
def replicas(
    crds: LocalCluster, tmp_path: Path
) -> Iterator[tuple[LocalCluster, str, str, Replica, Replica]]:
    env_id = uuid.uuid4().hex[:6]
    ns = f"fp-le-{env_id}"
    crds.kubectl("create", "namespace", ns)
    nodes = crds.create_fake_nodes(1, prefix=f"fp-le-{env_id}-", labels={"flowprobe-test": env_id})
    a, b = Replica(crds, tmp_path, ns, "a"), Replica(crds, tmp_path, ns, "b")
    try:
        yield crds, ns, env_id, a, b
    finally:
        crds.kubectl("delete", "probepolicy", "-l", f"flowprobe-test={env_id}", check=False)
        time.sleep(2)  # let the leader remove the agents
        a.close()
        b.close()
        crds.kubectl("delete", "namespace", ns, "--wait=false", check=False)
        crds.kubectl("delete", "node", *nodes, "--wait=false", check=False)


def _policy(env_id: str, sampling: int) -> str:
    spec = {
        "namespaceSelector": {},
        "samplingPercent": sampling,
        "export": {"otlp": {"endpoint": "http://collector:4317"}},
        "agent": {"nodeSelector": {"flowprobe-test": env_id}},
    }
    return json.dumps(policy_manifest(f"{env_id}-le", spec, {"flowprobe-test": env_id}))


def test_one_leader_standby_takes_over(
    replicas: tuple[LocalCluster, str, str, Replica, Replica],
) -> None:
    cluster, ns, env_id, a, b = replicas

    def sampling() -> int | None:
        cm = cluster.kubectl(
            "-n", ns, "get", "configmap", "flowprobe-agent", "-o", "json", check=False
        )
        if cm.returncode:
            return None
        value: int = json.loads(json.loads(cm.stdout)["data"]["policies.json"])["policies"][0][
            "samplingPercent"
        ]
        return value

    a.operator.start()
    wait_until(a.leading, "replica a to lead")
    b.operator.start()
    wait_until(lambda: b.operator.health()[0] == 200, "replica b up")
    cluster.kubectl("apply", "-f", "-", input=_policy(env_id, 10))
    wait_until(lambda: sampling() == 10, "the leader to apply the policy")
    time.sleep(5)
    assert not b.leading()
    assert b.writes() == [], "the standby wrote to the API"
    assert ("patch", "daemonsets") in a.writes()
    assert b.operator.health()[1]["reconciler"]["leader"] is False

    # Crash (no release): b takes over once the Lease is stale.
    started = time.monotonic()
    a.operator.kill()
    wait_until(b.leading, "replica b to take over", timeout=60)
    took = time.monotonic() - started
    assert took >= 10, f"took over after {took:.1f} s, before the Lease could expire"
    cluster.kubectl("apply", "-f", "-", input=_policy(env_id, 20))
    wait_until(lambda: sampling() == 20, "the new leader to reconcile")
    lease = get_json(cluster, "-n", ns, "lease", "flowprobe-operator")["spec"]
    assert lease["leaseTransitions"] == 1

    # Clean shutdown releases the Lease: the standby takes over at once.
    a.operator.start()
    time.sleep(4)
    assert a.operator.log_text().count("became the leader") == 1  # only the first run
    started = time.monotonic()
    b.operator.stop()
    wait_until(lambda: a.operator.log_text().count("became the leader") == 2, "a to lead again")
    assert time.monotonic() - started < 10
