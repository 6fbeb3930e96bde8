"""The agent daemon under exactly the chart's agent RBAC: every call allowed, every grant used."""

from __future__ import annotations

import json
import os
import subprocess
import sys
import uuid
from pathlib import Path
from typing import Any

import pytest

from flowprobe.api import constants
from flowprobe.api.agentreport import report_lease_name
from flowprobe.api.policyset import CompiledPolicySet
from flowprobe.devenv.cluster import LocalCluster
from flowprobe.devenv.procs import free_ports
from tests.operator.clusterkit import (
    ApiProxy,
    grants_from,
    rbac_gaps,
    token_kubeconfig,
    wait_until,
)
from tests.operator.support import REPO

pytestmark = pytest.mark.cluster


def test_agent_daemon_uses_exactly_the_chart_agent_rbac(
    local_cluster: LocalCluster, tmp_path: Path
) -> None:
    c = local_cluster
    tid = uuid.uuid4().hex[:6]
    ns, release = f"fp-agent-rbac-{tid}", f"r{tid}"
    sa = f"{release}-flowprobe-agent"
    (node,) = c.create_fake_nodes(1, prefix=f"fp-agent-rbac-{tid}-")
    c.kubectl("create", "namespace", ns)
    rendered = c.helm(
        "template",
        release,
        str(REPO / "charts" / "flowprobe"),
        f"--namespace={ns}",
        "--show-only=templates/rbac-agent.yaml",
        f"--kube-version={c.server_version()}",
    ).stdout
    c.kubectl("apply", "-n", ns, "-f", "-", input=rendered)
    # The operator creates the agents' ServiceAccount; here the test does.
    c.kubectl("create", "serviceaccount", sa, "-n", ns)
    token = c.kubectl("create", "token", sa, "-n", ns, "--duration=1h").stdout.strip()
    proxy = ApiProxy(c.server, c.pki.ca_crt)  # no client cert: the token is all
    proxy.start()
    policies = tmp_path / "policies.json"
    policies.write_text(CompiledPolicySet().to_json())
    port = free_ports(1)[0]
    env = dict(
        os.environ,
        NODE_NAME=node,
        POD_NAMESPACE=ns,
        FLOWPROBE_POLICY_FILE=str(policies),
        FLOWPROBE_HEALTH_PORT=str(port),
        FLOWPROBE_HEALTH_ADDRESS="127.0.0.1",
        FLOWPROBE_REPORT_INTERVAL_SECONDS="1",
        KUBECONFIG=str(token_kubeconfig(tmp_path / "sa.kubeconfig", proxy.url, token)),
    )
    env.pop("KUBERNETES_SERVICE_HOST", None)
    log = tmp_path / "agent.log"
    with log.open("wb") as out:
        agent = subprocess.Popen(
            [sys.executable, "-m", "flowprobe.agent", "daemon"], env=env, stdout=out, stderr=out
        )
    lease_path = f"/apis/coordination.k8s.io/v1/namespaces/{ns}/leases/{report_lease_name(node)}"
    try:

        def renewed_twice() -> bool:
            # A second renewal is a get + update of the Lease the first created.
            return (
                sum(
                    1
                    for call in proxy.snapshot()
                    if call.resource == "leases" and call.verb == "update"
                )
                >= 1
            )

        wait_until(
            renewed_twice, f"report Lease renewed; agent log:\n{log.read_text()}", timeout=60
        )
        lease: dict[str, Any] = c.api("GET", lease_path)
        report = json.loads(lease["metadata"]["annotations"][constants.ANNOTATION_AGENT_REPORT])
        assert report["node"] == node
        assert report["configChecksum"] == CompiledPolicySet().checksum()
    finally:
        agent.terminate()
        agent.wait(30)
        proxy.stop()
    roles = [
        json.loads(c.kubectl("get", "clusterrole", sa, "-o", "json").stdout),
        json.loads(c.kubectl("get", "role", sa, "-n", ns, "-o", "json").stdout),
    ]
    missing, unused = rbac_gaps(grants_from(roles), proxy.snapshot())
    assert not missing, "calls the agent made without a grant:\n" + "\n".join(map(str, missing))
    assert not unused, "grants the agent never used:\n" + "\n".join(map(str, unused))
    c.kubectl("delete", "namespace", ns, "--wait=false")
    c.kubectl("delete", "clusterrole,clusterrolebinding", sa, "--wait=false")
    c.kubectl("delete", "node", node, "--wait=false")
