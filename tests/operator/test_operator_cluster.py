"""The operator as a real process against the local control plane.

kube-controller-manager turns the agent DaemonSet into pods, kube-scheduler
binds them, kwok marks them Running and Ready on fake nodes; the operator only
ever sees the API. Every policy here pins its agents to this module's two
nodes (spec.agent.nodeSelector), so counts do not depend on other tests' nodes.
"""

from __future__ import annotations

import datetime
import json
import time
import uuid
from collections.abc import Iterator
from dataclasses import dataclass
from typing import Any

import pytest

from flowprobe.api import constants
from flowprobe.api.agentreport import report_lease_name
from flowprobe.devenv.cluster import LocalCluster
from tests.operator.clusterkit import ApiProxy, OperatorProcess, wait_until
from tests.operator.conftest import get_json
from tests.operator.support import policy_manifest

pytestmark = pytest.mark.cluster

AGENT = "flowprobe-agent"
EXPORT = {"otlp": {"endpoint": "http://collector.observability:4317"}}
MANAGED = f"{constants.LABEL_MANAGED_BY}={constants.MANAGER}"


@dataclass
class Env:
    cluster: LocalCluster
    id: str
    ns: str
    app_ns: str
    nodes: list[str]
    proxy: ApiProxy
    operator: OperatorProcess

    def kubectl(self, *args: str, **kw: Any) -> str:
        return self.cluster.kubectl(*args, **kw).stdout

    def spec(self, **extra: Any) -> dict[str, Any]:
        return {
            "namespaceSelector": {"matchLabels": {"flowprobe-test": self.id}},
            "podSelector": {"matchLabels": {"app": "web"}},
            "export": EXPORT,
            "agent": {"nodeSelector": {"flowprobe-test": self.id}},
            **extra,
        }

    def apply(self, name: str, spec: dict[str, Any]) -> str:
        full = f"{self.id}-{name}"
        obj = policy_manifest(full, spec, {"flowprobe-test": self.id})
        self.kubectl("apply", "-f", "-", input=json.dumps(obj))
        return full

    def patch(self, name: str, spec: dict[str, Any]) -> None:
        self.kubectl("patch", "probepolicy", name, "--type=merge", "-p", json.dumps({"spec": spec}))

    def delete(self, *names: str) -> None:
        self.kubectl("delete", "probepolicy", *names, "--ignore-not-found", "--wait=true")

    def policy(self, name: str) -> dict[str, Any]:
        result: dict[str, Any] = get_json(self.cluster, "probepolicy", name)
        return result

    def conditions(self, name: str) -> dict[str, tuple[str, str]]:
        status = self.policy(name).get("status") or {}
        return {c["type"]: (c["status"], c["reason"]) for c in status.get("conditions", [])}

    def wait_condition(
        self, name: str, type_: str, status: str, reason: str, timeout: float = 90
    ) -> None:
        try:
            wait_until(
                lambda: self.conditions(name).get(type_) == (status, reason),
                f"{name}: {type_}={status} ({reason})",
                timeout=timeout,
            )
        except AssertionError as exc:
            status_now = self.policy(name).get("status")
            raise AssertionError(
                f"{exc}\nstatus now: {json.dumps(status_now, indent=1)}\n"
                f"operator log:\n{self.operator.log_text()[-3000:]}"
            ) from None

    def agent_objects(self) -> dict[str, list[dict[str, Any]]]:
        out = {}
        for kind in ("daemonset", "configmap", "serviceaccount"):
            out[kind] = get_json(self.cluster, "-n", self.ns, kind, "-l", MANAGED)["items"]
        return out

    def agent_pods(self) -> list[dict[str, Any]]:
        items: list[dict[str, Any]] = get_json(
            self.cluster, "-n", self.ns, "pods", "-l", f"{constants.LABEL_COMPONENT}=agent"
        )["items"]
        return [p for p in items if not p["metadata"].get("deletionTimestamp")]

    def checksum(self) -> str:
        cm = get_json(self.cluster, "-n", self.ns, "configmap", AGENT)
        value: str = cm["metadata"]["annotations"][constants.ANNOTATION_CONFIG_CHECKSUM]
        return value

    def events(self, name: str) -> list[tuple[str, str]]:
        items = get_json(
            self.cluster,
            "-n",
            "default",
            "events",
            "--field-selector",
            f"involvedObject.name={name}",
        )["items"]
        return [(e["type"], e["reason"]) for e in items]

    def ready_agents_on_current_config(self) -> bool:
        pods = self.agent_pods()
        checksum = self.checksum()
        return len(pods) == len(self.nodes) and all(
            p["metadata"]["annotations"].get(constants.ANNOTATION_CONFIG_CHECKSUM) == checksum
            and p.get("status", {}).get("phase") == "Running"
            for p in pods
        )

    def gone(self) -> bool:
        return not any(self.agent_objects().values())


def _web_deployment(env_id: str, ns: str, replicas: int) -> dict[str, Any]:
    return {
        "apiVersion": "apps/v1",
        "kind": "Deployment",
        "metadata": {"name": "web", "namespace": ns},
        "spec": {
            "replicas": replicas,
            "selector": {"matchLabels": {"app": "web"}},
            "template": {
                "metadata": {"labels": {"app": "web"}},
                "spec": {
                    "nodeSelector": {"flowprobe-test": env_id},
                    # Never pulled: kwok only pretends to run containers.
                    "containers": [{"name": "web", "image": "registry.invalid/web:1"}],
                },
            },
        },
    }


@pytest.fixture(scope="module")
def env(crds: LocalCluster, tmp_path_factory: pytest.TempPathFactory) -> Iterator[Env]:
    cluster = crds
    env_id = uuid.uuid4().hex[:6]
    ns, app_ns = f"fp-op-{env_id}", f"fp-app-{env_id}"
    workdir = tmp_path_factory.mktemp("operator")
    nodes = cluster.create_fake_nodes(
        2, prefix=f"fp-op-{env_id}-", labels={"flowprobe-test": env_id}
    )
    cluster.kubectl("create", "namespace", ns)
    cluster.kubectl("create", "namespace", app_ns)
    cluster.kubectl("label", "namespace", app_ns, f"flowprobe-test={env_id}")
    cluster.kubectl("apply", "-f", "-", input=json.dumps(_web_deployment(env_id, app_ns, 3)))
    # The operator talks to the API through the recording proxy (as the admin
    # here; test_helm_cluster.py runs it as the chart's ServiceAccount).
    proxy = ApiProxy(
        cluster.server, cluster.pki.ca_crt, (cluster.pki.admin_crt, cluster.pki.admin_key)
    )
    proxy.start()
    kubeconfig = workdir / "proxy.kubeconfig"
    kubeconfig.write_text(
        json.dumps(
            {
                "apiVersion": "v1",
                "kind": "Config",
                "clusters": [{"name": "p", "cluster": {"server": proxy.url}}],
                "users": [{"name": "u", "user": {}}],
                "contexts": [{"name": "p", "context": {"cluster": "p", "user": "u"}}],
                "current-context": "p",
            }
        )
    )
    operator = OperatorProcess(
        workdir,
        kubeconfig=kubeconfig,
        namespace=ns,
        config={"namespace": ns, "resyncSeconds": 5, "agentReportGraceSeconds": 5},
    )
    operator.start()
    env = Env(cluster, env_id, ns, app_ns, nodes, proxy, operator)
    try:
        yield env
    finally:
        cluster.kubectl(
            "delete", "probepolicy", "-l", f"flowprobe-test={env_id}", "--wait=true", check=False
        )
        if operator.alive:
            wait_until(env.gone, "agent objects removed after the test policies", timeout=60)
        operator.stop()
        proxy.stop()
        cluster.kubectl("delete", "namespace", ns, app_ns, "--wait=false", check=False)
        cluster.kubectl("delete", "node", *nodes, "--wait=false", check=False)


@pytest.fixture(autouse=True)
def _operator_survives(env: Env) -> Iterator[None]:
    yield
    # Errors may be logged (they are reported in status); exiting is a failure.
    assert env.operator.alive, f"the operator exited:\n{env.operator.log_text()[-5000:]}"


def test_policy_lifecycle(env: Env) -> None:
    name = env.apply("life", env.spec())
    try:
        env.wait_condition(name, "Ready", "True", "AgentsReady")
        status = env.policy(name)["status"]
        assert (status["nodes"], status["nodesDesired"], status["observedGeneration"]) == (
            "2/2",
            2,
            1,
        )
        objs = env.agent_objects()
        assert [len(objs[k]) for k in ("daemonset", "configmap", "serviceaccount")] == [1, 1, 1]
        (ds,) = objs["daemonset"]
        assert [o["name"] for o in ds["metadata"]["ownerReferences"]] == [name]
        pod_spec = ds["spec"]["template"]["spec"]
        assert pod_spec["hostNetwork"] is True and pod_spec["serviceAccountName"] == AGENT
        assert sorted(p["spec"]["nodeName"] for p in env.agent_pods()) == sorted(env.nodes)
        policies = json.loads(objs["configmap"][0]["data"][constants.POLICY_SET_KEY])["policies"]
        assert [p["name"] for p in policies] == [name]

        # Matched pods: the Deployment's 3 pods once kwok runs them.
        wait_until(lambda: env.policy(name)["status"].get("matchedPods") == 3, "matchedPods == 3")
        # kwok pods run no agent: after the grace period they count as silent.
        env.wait_condition(name, "Degraded", "True", "AgentsNotReporting")
        notes = env.policy(name)["status"]["nodeNotes"]
        assert sorted(n["node"] for n in notes) == sorted(env.nodes)
        assert {"AgentNotReporting"} == {n["type"] for n in notes}
        assert ("Normal", "AgentsReady") in env.events(name)
        assert ("Warning", "AgentsNotReporting") in env.events(name)
        meta = env.policy(name)["metadata"]
        assert not meta.get("finalizers")
        assert not any("kopf" in k for k in (meta.get("annotations") or {}))

        # A spec change recompiles the set and rolls every agent onto it.
        before = env.checksum()
        env.patch(name, {"samplingPercent": 50})
        wait_until(lambda: env.checksum() != before, "a new compiled set")
        wait_until(env.ready_agents_on_current_config, "agents rolled to the new set", timeout=120)
        env.wait_condition(name, "Ready", "True", "AgentsReady")
        assert env.policy(name)["status"]["observedGeneration"] == 2
        cm = get_json(env.cluster, "-n", env.ns, "configmap", AGENT)
        assert (
            json.loads(cm["data"][constants.POLICY_SET_KEY])["policies"][0]["samplingPercent"] == 50
        )
    finally:
        env.delete(name)
    wait_until(env.gone, "DaemonSet, ConfigMap and ServiceAccount removed with the last policy")


def test_drift_is_repaired(env: Env) -> None:
    name = env.apply("drift", env.spec())
    try:
        env.wait_condition(name, "Ready", "True", "AgentsReady")
        uid = env.agent_objects()["daemonset"][0]["metadata"]["uid"]
        env.kubectl("-n", env.ns, "delete", "daemonset", AGENT, "--wait=true")
        wait_until(
            lambda: (
                [d["metadata"]["uid"] for d in env.agent_objects()["daemonset"]] not in ([], [uid])
            ),
            "the deleted DaemonSet recreated",
        )
        env.kubectl(
            "-n",
            env.ns,
            "patch",
            "daemonset",
            AGENT,
            "--type=json",
            "-p",
            '[{"op": "replace", "path": "/spec/template/spec/hostNetwork", "value": false}]',
        )

        def host_network() -> bool:
            ds = get_json(env.cluster, "-n", env.ns, "daemonset", AGENT)
            return bool(ds["spec"]["template"]["spec"].get("hostNetwork"))

        wait_until(host_network, "hostNetwork restored")
        env.kubectl(
            "-n",
            env.ns,
            "patch",
            "configmap",
            AGENT,
            "--type=merge",
            "-p",
            '{"data": {"policies.json": "{}"}}',
        )
        wait_until(
            lambda: (
                name
                in get_json(env.cluster, "-n", env.ns, "configmap", AGENT)["data"]["policies.json"]
            ),
            "the compiled set restored",
        )
        env.wait_condition(name, "Ready", "True", "AgentsReady")
    finally:
        env.delete(name)
    wait_until(env.gone, "agent objects removed")


def test_unmanaged_policy_is_left_alone(env: Env) -> None:
    name = env.apply("paused", env.spec(samplingPercent=10))
    try:
        env.wait_condition(name, "Ready", "True", "AgentsReady")

        def sampling() -> int:
            cm = get_json(env.cluster, "-n", env.ns, "configmap", AGENT)
            value: int = json.loads(cm["data"][constants.POLICY_SET_KEY])["policies"][0][
                "samplingPercent"
            ]
            return value

        env.patch(name, {"managementState": "Unmanaged", "samplingPercent": 90})
        time.sleep(1)  # a run already under way when the patch landed may still finish
        status = env.policy(name)["status"]
        # Several resync periods (resyncSeconds is 5 here): nothing moves.
        deadline = time.monotonic() + 12
        while time.monotonic() < deadline:
            assert sampling() == 10
            assert env.policy(name)["status"] == status
        env.patch(name, {"managementState": "Managed"})
        wait_until(lambda: sampling() == 90, "the policy applied again once Managed")
        wait_until(
            lambda: env.policy(name)["status"]["observedGeneration"] == 3, "status caught up"
        )
    finally:
        env.delete(name)
    wait_until(env.gone, "agent objects removed")


def test_unrealisable_policies_say_why_in_status(env: Env) -> None:
    pinned = {"nodeSelector": {"flowprobe-test": env.id}}
    # Created first: its image wins.
    older = env.apply("img-old", env.spec(agent={**pinned, "image": "a/agent:1"}))
    env.wait_condition(older, "Ready", "True", "AgentsReady")
    # creationTimestamp has one-second resolution, and policies created in the
    # same second are ordered by name ("…-img-new" first): the younger one must
    # be created in a later second, however fast the older became Ready.
    created = datetime.datetime.fromisoformat(env.policy(older)["metadata"]["creationTimestamp"])
    wait_until(
        lambda: datetime.datetime.now(datetime.UTC) >= created + datetime.timedelta(seconds=1),
        "the second after the older policy's creation",
    )
    younger = env.apply("img-new", env.spec(agent={**pinned, "image": "b/agent:2"}))
    assert env.policy(younger)["metadata"]["creationTimestamp"] > created.strftime(
        "%Y-%m-%dT%H:%M:%SZ"
    )
    bad_regex = env.apply(
        "regex", env.spec(redaction={"patterns": [{"name": "card", "regex": "([0-9]{16}"}]})
    )
    expired = env.apply("expired", env.spec(timeLimit={"endTime": "2020-01-01T00:00:00Z"}))
    no_export = env.apply("noexport", {k: v for k, v in env.spec().items() if k != "export"})
    soon = env.apply("soon", env.spec(timeLimit={"durationSeconds": 60}))
    try:
        env.wait_condition(bad_regex, "Ready", "False", "InvalidSpec")
        cond = next(
            c for c in env.policy(bad_regex)["status"]["conditions"] if c["type"] == "Ready"
        )
        assert "spec.redaction.patterns[card].regex does not compile" in cond["message"]
        assert ("Warning", "InvalidSpec") in env.events(bad_regex)

        env.wait_condition(expired, "Expired", "True", "EndTimeReached")
        env.wait_condition(expired, "Ready", "False", "Expired")
        env.wait_condition(no_export, "Ready", "False", "NoExportEndpoint")

        env.wait_condition(younger, "Degraded", "True", "AgentSettingsConflict")
        env.wait_condition(older, "Ready", "True", "AgentsReady")
        (ds,) = env.agent_objects()["daemonset"]
        assert ds["spec"]["template"]["spec"]["containers"][0]["image"] == "a/agent:1"
        compiled = json.loads(env.agent_objects()["configmap"][0]["data"][constants.POLICY_SET_KEY])
        assert sorted(p["name"] for p in compiled["policies"]) == sorted([older, younger, soon])

        # A time limit passing: the policy says so and leaves the compiled set.
        env.wait_condition(soon, "Expired", "False", "WithinTimeLimit")
        env.wait_condition(soon, "Expired", "True", "EndTimeReached", timeout=120)
        compiled = json.loads(env.agent_objects()["configmap"][0]["data"][constants.POLICY_SET_KEY])
        assert soon not in [p["name"] for p in compiled["policies"]]
    finally:
        env.delete(bad_regex, expired, no_export, older, younger, soon)
    wait_until(env.gone, "agent objects removed")


def _lease(env: Env, node: str, notes: list[dict[str, Any]], **report: Any) -> dict[str, Any]:
    now = datetime.datetime.now(datetime.UTC).strftime("%Y-%m-%dT%H:%M:%S.%fZ")
    return {
        "apiVersion": "coordination.k8s.io/v1",
        "kind": "Lease",
        "metadata": {
            "name": report_lease_name(node),
            "namespace": env.ns,
            "labels": {constants.LABEL_COMPONENT: constants.COMPONENT_AGENT_REPORT},
            "annotations": {
                constants.ANNOTATION_AGENT_REPORT: json.dumps(
                    {"node": node, "notes": notes, **report}
                )
            },
        },
        "spec": {"holderIdentity": f"agent-{node}", "renewTime": now, "leaseDurationSeconds": 3600},
    }


def _apply_leases(env: Env, leases: list[dict[str, Any]]) -> None:
    env.kubectl(
        "apply", "-f", "-", input=json.dumps({"apiVersion": "v1", "kind": "List", "items": leases})
    )


def test_agent_reports_become_node_notes(env: Env) -> None:
    name = env.apply("reports", env.spec())
    first, second = sorted(env.nodes)
    try:
        env.wait_condition(name, "Ready", "True", "AgentsReady")
        leases = [
            _lease(env, first, [{"type": "CaptureInterfaceMissing", "message": "no veth found"}]),
            _lease(
                env,
                second,
                [{"type": "TLSNotVisible", "message": "port 443 is TLS", "policy": name}],
                ready=True,
                interfaces=["any"],
                captureDrops=2,
                policyExchangesPerSecond={name: 41.7},
            ),
        ]
        _apply_leases(env, leases)
        env.wait_condition(name, "Degraded", "True", "CaptureInterfaceMissing")
        status = env.policy(name)["status"]
        notes = {(n["node"], n["type"]) for n in status["nodeNotes"]}
        assert notes == {(first, "CaptureInterfaceMissing"), (second, "TLSNotVisible")}
        # The report fields survive the API server's schema (nothing pruned).
        assert status["agents"] == [
            {
                "node": first,
                "ready": False,
                "interfaces": [],
                "exchangesPerSecond": 0,
                "captureDrops": 0,
            },
            {
                "node": second,
                "ready": True,
                "interfaces": ["any"],
                "exchangesPerSecond": 42,
                "captureDrops": 2,
            },
        ]
        assert (status["exchangesPerSecond"], status["captureDrops"]) == (42, 2)
        wide = env.kubectl("get", "probepolicy", name, "-o", "wide")
        assert "RATE" in wide and " 42 " in wide

        quiet = [_lease(env, first, []), _lease(env, second, [])]
        _apply_leases(env, quiet)
        env.wait_condition(name, "Degraded", "False", "AsExpected")
        assert ("Normal", "AsExpected") in env.events(name)
    finally:
        env.delete(name)
    wait_until(env.gone, "agent objects removed")
    wait_until(
        lambda: (
            not get_json(
                env.cluster,
                "-n",
                env.ns,
                "leases",
                "-l",
                f"{constants.LABEL_COMPONENT}=agent-report",
            )["items"]
        ),
        "report Leases removed with the agents",
    )


def test_restart_in_the_middle_of_a_reconcile_converges(env: Env) -> None:
    # Stop the operator exactly between applying the ConfigMap and the DaemonSet.
    ds_path = f"/apis/apps/v1/namespaces/{env.ns}/daemonsets/{AGENT}"
    gate = env.proxy.hold(lambda method, path: method == "PATCH" and path == ds_path, drop=True)
    name = env.apply("restart", env.spec())
    try:
        assert gate.arrived.wait(60), "the operator never tried to apply the DaemonSet"
        objs = env.agent_objects()
        assert (len(objs["configmap"]), len(objs["daemonset"])) == (1, 0)
        env.operator.kill()
        env.proxy.gates.remove(gate)
        gate.release()
        env.operator.start()
        env.wait_condition(name, "Ready", "True", "AgentsReady")
        objs = env.agent_objects()
        assert [len(objs[k]) for k in ("daemonset", "configmap", "serviceaccount")] == [1, 1, 1]
        wait_until(env.ready_agents_on_current_config, "one agent per node on the current set")
        assert len(env.agent_pods()) == 2
    finally:
        env.delete(name)
    wait_until(env.gone, "agent objects removed")


def test_liveness_endpoint_and_json_logs(env: Env) -> None:
    code, body = env.operator.health()
    assert code == 200 and "reconciler" in body, body
    records = env.operator.log_records()
    assert records and all({"message", "severity", "timestamp"} <= r.keys() for r in records)
    assert not [
        r
        for r in records
        if r.get("severity") in ("error", "critical") and "Traceback" in r.get("message", "")
    ]


def test_operator_wrote_only_what_it_owns(env: Env) -> None:
    writes = {
        (c.verb, c.resource, c.namespace)
        for c in env.proxy.snapshot()
        if c.verb not in ("get", "list", "watch")
    }
    allowed_ns = {env.ns, "default", None}
    assert all(ns in allowed_ns for _, _, ns in writes), writes
    assert ("patch", "probepolicies", None) not in writes  # never touches specs or metadata
