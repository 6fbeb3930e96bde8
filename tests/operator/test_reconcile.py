"""Reconciler against an in-memory API: what it writes, and that it converges.

The same flows run against the real control plane in test_operator_cluster.py;
these are the fast, deterministic versions (and the error paths that are
hard to provoke on a real server).
"""

from __future__ import annotations

import asyncio
import contextlib
import copy
import datetime
import itertools
from typing import Any

import pytest

from flowprobe.api import constants
from flowprobe.controller import kube
from flowprobe.controller.kube import Kube, KubeError, Resource
from flowprobe.controller.reconcile import Reconciler
from tests.operator.support import NOW, make_config, policy_body, sync

NS = "flowprobe-system"
AGENT = "flowprobe-agent"


class FakeKube(Kube):
    """Dict-backed stand-in for the API: enough semantics for the reconciler."""

    def __init__(self) -> None:
        self.objects: dict[tuple[str, str | None, str], dict[str, Any]] = {}
        self.writes: list[tuple[str, str]] = []
        # (verb, plural) of every call, including no-op applies
        self.calls: list[tuple[str, str]] = []
        # (plural, label selector) of every metadata-only list
        self.metadata_lists: list[tuple[str, str | None]] = []
        self.fail: dict[tuple[str, str], KubeError] = {}
        self._rv = itertools.count(100)

    def _key(self, res: Resource, namespace: str | None, name: str) -> tuple[str, str | None, str]:
        return (res.plural, namespace if res.namespaced else None, name)

    def _check(self, verb: str, plural: str) -> None:
        self.calls.append((verb, plural))
        if (verb, plural) in self.fail:
            raise self.fail[(verb, plural)]

    def put(self, res: Resource, obj: dict[str, Any]) -> None:
        meta = obj["metadata"]
        meta.setdefault("uid", f"uid-{meta['name']}")
        meta["resourceVersion"] = str(next(self._rv))
        self.objects[self._key(res, meta.get("namespace"), meta["name"])] = obj

    def items(self, res: Resource) -> list[dict[str, Any]]:
        return [o for (plural, _, _), o in self.objects.items() if plural == res.plural]

    async def get(
        self, res: Resource, name: str, namespace: str | None = None
    ) -> dict[str, Any] | None:
        self._check("get", res.plural)
        obj = self.objects.get(self._key(res, namespace, name))
        return copy.deepcopy(obj) if obj else None

    async def list(
        self,
        res: Resource,
        namespace: str | None = None,
        *,
        label_selector: str | None = None,
        field_selector: str | None = None,
        metadata_only: bool = False,
    ) -> list[dict[str, Any]]:
        self._check("list", res.plural)
        if metadata_only:
            self.metadata_lists.append((res.plural, label_selector))
        want = dict(p.split("=", 1) for p in label_selector.split(",")) if label_selector else {}
        out = []
        for (plural, ns, _), obj in self.objects.items():
            labels = obj["metadata"].get("labels") or {}
            if plural != res.plural or (namespace and ns != namespace):
                continue
            if any(labels.get(k) != v for k, v in want.items()):
                continue
            if field_selector == "status.phase=Running" and (
                obj.get("status", {}).get("phase") != "Running"
            ):
                continue
            by_name = (field_selector or "").removeprefix("metadata.name=")
            if by_name != (field_selector or "") and obj["metadata"]["name"] != by_name:
                continue
            out.append(copy.deepcopy(obj))
        return out

    async def apply(self, obj: Any) -> dict[str, Any]:
        res = kube.resource_of(obj)
        self._check("apply", res.plural)
        old = self.objects.get(
            self._key(res, obj["metadata"]["namespace"], obj["metadata"]["name"])
        )
        new = copy.deepcopy(obj)
        if old is not None:
            stripped = {k: v for k, v in old.items() if k != "status"}
            stripped["metadata"] = {
                k: v
                for k, v in old["metadata"].items()
                if k not in ("resourceVersion", "uid", "generation")
            }
            if stripped == obj:
                return copy.deepcopy(old)  # no-op apply: nothing changes on the server
            new["status"] = old.get("status", {})
            gen = old["metadata"].get("generation", 1)
            new["metadata"]["generation"] = gen + (old.get("spec") != obj.get("spec"))
            new["metadata"]["uid"] = old["metadata"]["uid"]
        else:
            new["metadata"]["generation"] = 1
        self.writes.append(("apply", obj["kind"]))
        self.put(res, new)
        return copy.deepcopy(new)

    async def delete(self, res: Resource, name: str, namespace: str | None = None) -> bool:
        self._check("delete", res.plural)
        found = self.objects.pop(self._key(res, namespace, name), None) is not None
        if found:
            self.writes.append(("delete", res.plural))
        return found

    async def patch_status(
        self, res: Resource, name: str, status: Any, namespace: str | None = None
    ) -> dict[str, Any]:
        self._check("patch_status", res.plural)
        obj = self.objects.get(self._key(res, namespace, name))
        if obj is None:
            raise KubeError("PATCH", name, 404, "not found")
        obj["status"] = copy.deepcopy(dict(status))
        self.writes.append(("status", name))
        return copy.deepcopy(obj)

    async def create(self, res: Resource, obj: Any, namespace: str | None = None) -> dict[str, Any]:
        self._check("create", res.plural)
        new = copy.deepcopy(dict(obj))
        meta = new["metadata"]
        if "generateName" in meta:
            meta["name"] = meta.pop("generateName") + str(next(self._rv))
        if self._key(res, meta.get("namespace"), meta["name"]) in self.objects:
            raise KubeError("POST", meta["name"], 409, "already exists")
        self.put(res, new)
        return copy.deepcopy(new)

    async def replace(
        self, res: Resource, obj: Any, namespace: str | None = None
    ) -> dict[str, Any]:
        self._check("replace", res.plural)
        meta = obj["metadata"]
        current = self.objects.get(self._key(res, meta.get("namespace"), meta["name"]))
        if current is None:
            raise KubeError("PUT", meta["name"], 404, "not found")
        if meta.get("resourceVersion") != current["metadata"]["resourceVersion"]:
            raise KubeError("PUT", meta["name"], 409, "the object has been modified")
        new = copy.deepcopy(dict(obj))
        self.put(res, new)
        return copy.deepcopy(new)


def _reconciler(api: FakeKube, **config: Any) -> Reconciler:
    rec = Reconciler(api, make_config(**config), clock=lambda: NOW, debounce=0)
    rec.active = True
    return rec


def _add_policy(api: FakeKube, name: str, spec: dict[str, Any] | None = None) -> None:
    api.put(kube.PROBEPOLICIES, policy_body(name, spec))


def _run_agents(api: FakeKube, *nodes: str) -> None:
    """Play kube-controller-manager and kubelet: pods for the current template, Ready."""
    ds = api.objects[("daemonsets", NS, AGENT)]
    template = ds["spec"]["template"]
    for key in [k for k in api.objects if k[0] == "pods"]:
        del api.objects[key]
    for node in nodes:
        api.put(
            kube.PODS,
            {
                "metadata": {
                    "name": f"{AGENT}-{node}",
                    "namespace": NS,
                    "labels": template["metadata"]["labels"],
                    "annotations": template["metadata"]["annotations"],
                },
                "spec": {"nodeName": node},
                "status": {
                    "phase": "Running",
                    "conditions": [
                        {
                            "type": "Ready",
                            "status": "True",
                            "lastTransitionTime": "2026-01-01T00:29:59Z",
                        }
                    ],
                },
            },
        )
        api.put(
            kube.LEASES,
            {
                "metadata": {
                    "name": f"flowprobe-report-{node}",
                    "namespace": NS,
                    "labels": {constants.LABEL_COMPONENT: constants.COMPONENT_AGENT_REPORT},
                    "annotations": {constants.ANNOTATION_AGENT_REPORT: f'{{"node": "{node}"}}'},
                },
                "spec": {"renewTime": "2026-01-01T00:29:50.000000Z", "leaseDurationSeconds": 45},
            },
        )
    n = len(nodes)
    ds["status"] = {
        "observedGeneration": ds["metadata"]["generation"],
        "desiredNumberScheduled": n,
        "updatedNumberScheduled": n,
        "numberReady": n,
    }


def _conditions(api: FakeKube, name: str) -> dict[str, tuple[str, str]]:
    obj = api.objects[("probepolicies", None, name)]
    return {c["type"]: (c["status"], c["reason"]) for c in obj["status"]["conditions"]}


def _events(api: FakeKube) -> list[tuple[str, str, str]]:
    return [(e["involvedObject"]["name"], e["type"], e["reason"]) for e in api.items(kube.EVENTS)]


@sync
async def test_policies_become_agents_and_ready_status() -> None:
    api = FakeKube()
    rec = _reconciler(api)
    _add_policy(api, "web")
    _add_policy(api, "dns", {"namespaceSelector": {}, "protocols": ["DNS"]})
    result = await rec.reconcile_once()
    assert result.applied and result.error is None
    for res in (kube.DAEMONSETS, kube.CONFIGMAPS, kube.SERVICEACCOUNTS):
        (obj,) = api.items(res)
        assert [o["name"] for o in obj["metadata"]["ownerReferences"]] == ["dns", "web"]
    assert _conditions(api, "web")["Ready"] == ("False", "AgentsProgressing")

    _run_agents(api, "n1", "n2")
    await rec.reconcile_once()
    assert _conditions(api, "web") == {
        "Ready": ("True", "AgentsReady"),
        "Degraded": ("False", "AsExpected"),
        "Expired": ("False", "NoTimeLimit"),
    }
    status = api.objects[("probepolicies", None, "web")]["status"]
    assert (status["nodes"], status["observedGeneration"]) == ("2/2", 1)
    assert ("web", "Normal", "AgentsReady") in _events(api)


@sync
async def test_a_second_run_writes_nothing() -> None:
    api = FakeKube()
    rec = _reconciler(api)
    _add_policy(api, "web")
    await rec.reconcile_once()
    _run_agents(api, "n1")
    await rec.reconcile_once()
    writes, events = len(api.writes), len(_events(api))
    await rec.reconcile_once()
    assert len(api.writes) == writes and len(_events(api)) == events


@sync
async def test_drift_is_repaired() -> None:
    api = FakeKube()
    rec = _reconciler(api)
    _add_policy(api, "web")
    await rec.reconcile_once()
    ds = api.objects[("daemonsets", NS, AGENT)]
    ds["spec"]["template"]["spec"]["hostNetwork"] = False
    del api.objects[("configmaps", NS, AGENT)]
    await rec.reconcile_once()
    assert api.objects[("daemonsets", NS, AGENT)]["spec"]["template"]["spec"]["hostNetwork"] is True
    assert ("configmaps", NS, AGENT) in api.objects


@sync
async def test_last_policy_gone_removes_agents_and_reports() -> None:
    api = FakeKube()
    rec = _reconciler(api)
    _add_policy(api, "web")
    await rec.reconcile_once()
    _run_agents(api, "n1")
    del api.objects[("probepolicies", None, "web")]
    result = await rec.reconcile_once()
    assert not result.applied
    for res in (kube.DAEMONSETS, kube.CONFIGMAPS, kube.SERVICEACCOUNTS, kube.LEASES):
        assert api.items(res) == []


@sync
async def test_invalid_and_expired_policies_alone_mean_no_agents() -> None:
    api = FakeKube()
    rec = _reconciler(api, defaultExport=None)
    _add_policy(api, "noexport")
    _add_policy(
        api, "old", {"namespaceSelector": {}, "timeLimit": {"endTime": "2025-01-01T00:00:00Z"}}
    )
    await rec.reconcile_once()
    assert api.items(kube.DAEMONSETS) == []
    assert _conditions(api, "noexport")["Ready"] == ("False", "NoExportEndpoint")
    assert _conditions(api, "old")["Expired"] == ("True", "EndTimeReached")
    assert ("noexport", "Warning", "NoExportEndpoint") in _events(api)


@sync
async def test_unmanaged_policy_status_is_left_alone() -> None:
    api = FakeKube()
    rec = _reconciler(api)
    _add_policy(api, "web")
    await rec.reconcile_once()
    before = copy.deepcopy(api.objects[("probepolicies", None, "web")]["status"])
    pol = api.objects[("probepolicies", None, "web")]
    pol["spec"] = {"namespaceSelector": {}, "samplingPercent": 1, "managementState": "Unmanaged"}
    pol["metadata"]["generation"] = 2
    await rec.reconcile_once()
    assert api.objects[("probepolicies", None, "web")]["status"] == before
    cm = api.objects[("configmaps", NS, AGENT)]
    assert '"samplingPercent": 100' in cm["data"]["policies.json"]


@sync
async def test_api_errors_end_up_in_status_not_in_a_crash() -> None:
    api = FakeKube()
    rec = _reconciler(api)
    _add_policy(api, "web")
    api.fail[("apply", "daemonsets")] = KubeError("PATCH", "/apis/apps/...", 403, "forbidden")
    result = await rec.reconcile_once()
    assert result.error is not None and "forbidden" in result.error
    assert _conditions(api, "web")["Ready"] == ("False", "ReconcileFailed")
    assert ("web", "Warning", "ReconcileFailed") in _events(api)
    del api.fail[("apply", "daemonsets")]
    await rec.reconcile_once()
    assert api.items(kube.DAEMONSETS)


@sync
async def test_concurrent_requests_share_runs() -> None:
    api = FakeKube()
    rec = _reconciler(api)
    _add_policy(api, "web")
    runs = 0
    original = rec.reconcile_once

    async def counting() -> Any:
        nonlocal runs
        runs += 1
        await asyncio.sleep(0.01)
        return await original()

    rec.reconcile_once = counting  # type: ignore[method-assign]
    await asyncio.gather(*(rec.request() for _ in range(20)))
    assert 1 <= runs <= 2
    before = runs
    await rec.request(max_age=60)  # periodic resync right after a run: skipped
    assert runs == before
    await rec.request()
    assert runs == before + 1


@sync
async def test_time_limits_override_the_resync_interval() -> None:
    api = FakeKube()
    now = [NOW]
    rec = Reconciler(api, make_config(), clock=lambda: now[0], debounce=0)
    rec.active = True
    _add_policy(
        api, "web", {"namespaceSelector": {}, "timeLimit": {"endTime": "2026-01-01T00:31:00Z"}}
    )
    await rec.request()
    assert api.items(kube.DAEMONSETS)
    now[0] = NOW + datetime.timedelta(minutes=2)
    await rec.request(max_age=3600)
    assert api.items(kube.DAEMONSETS) == []
    assert _conditions(api, "web")["Expired"] == ("True", "EndTimeReached")


@sync
async def test_a_standby_replica_does_nothing() -> None:
    api = FakeKube()
    rec = _reconciler(api)
    rec.active = False
    _add_policy(api, "web")
    await rec.request()
    assert api.writes == []


@sync
async def test_ready_waits_until_every_agent_pod_exists() -> None:
    api = FakeKube()
    rec = _reconciler(api)
    _add_policy(api, "web")
    await rec.reconcile_once()
    _run_agents(api, "n1")
    ds = api.objects[("daemonsets", NS, AGENT)]
    # The DaemonSet controller has created one of two pods; the one there is ready.
    ds["status"].update(desiredNumberScheduled=2, updatedNumberScheduled=1)
    await rec.reconcile_once()
    assert _conditions(api, "web")["Ready"] == ("False", "AgentsProgressing")

    # Both created, the second not bound yet: it counts for its node from the
    # DaemonSet controller's node affinity.
    ds["status"].update(updatedNumberScheduled=2)
    template = ds["spec"]["template"]["metadata"]
    pinned = {
        "requiredDuringSchedulingIgnoredDuringExecution": {
            "nodeSelectorTerms": [
                {"matchFields": [{"key": "metadata.name", "operator": "In", "values": ["n2"]}]}
            ]
        }
    }
    api.put(
        kube.PODS,
        {
            "metadata": {
                "name": f"{AGENT}-n2",
                "namespace": NS,
                "labels": template["labels"],
                "annotations": template["annotations"],
            },
            "spec": {"affinity": {"nodeAffinity": pinned}},
            "status": {"phase": "Pending"},
        },
    )
    await rec.reconcile_once()
    assert _conditions(api, "web")["Ready"] == ("False", "AgentsUnavailable")
    assert api.objects[("probepolicies", None, "web")]["status"]["nodes"] == "1/2"

    _run_agents(api, "n1", "n2")
    await rec.reconcile_once()
    assert _conditions(api, "web")["Ready"] == ("True", "AgentsReady")


def _app_pod(api: FakeKube, ns: str, name: str, labels: dict[str, str]) -> None:
    api.put(
        kube.PODS,
        {
            "metadata": {"name": name, "namespace": ns, "labels": labels},
            "status": {"phase": "Running"},
        },
    )


@sync
async def test_matched_pods_are_counted_by_selector_in_the_background_when_due() -> None:
    api = FakeKube()
    rec = _reconciler(api)
    for ns, labels in (("shop", {"capture": "yes"}), ("other", {})):
        api.put(kube.NAMESPACES, {"metadata": {"name": ns, "labels": labels}})
    spec = {
        "namespaceSelector": {"matchLabels": {"capture": "yes"}},
        "podSelector": {"matchLabels": {"app": "web"}},
    }
    _add_policy(api, "web", spec)
    _add_policy(api, "web2", spec)

    def pod_lists() -> list[str | None]:
        return [sel for plural, sel in api.metadata_lists if plural == "pods"]

    def matched() -> int | None:
        status = api.objects[("probepolicies", None, "web")].get("status") or {}
        count: int | None = status.get("matchedPods")
        return count

    async def run() -> None:
        """One run, then the count it started, then the run that count triggers."""
        await rec.reconcile_once()
        if rec.counting is not None:
            await rec.counting
        if rec._dirty.is_set():
            await rec.reconcile_once()

    await rec.reconcile_once()
    assert rec.counting is not None  # the run did not wait for the count
    await rec.counting
    # One list for both policies, filtered by the API server.
    assert pod_lists() == ["app=web"]

    _run_agents(api, "n1")
    for ns in ("shop", "other"):
        _app_pod(api, ns, "web-1", {"app": "web"})
        _app_pod(api, ns, "db-1", {"app": "db"})
    await run()  # as for an agent event: the counts are reused
    assert len(pod_lists()) == 1 and matched() == 0

    api.objects[("probepolicies", None, "web2")]["metadata"]["generation"] = 2
    await run()  # a spec changed: counted again, and the new count written
    assert len(pod_lists()) == 2 and matched() == 1

    _app_pod(api, "shop", "web-2", {"app": "web"})
    assert rec._counted_at is not None
    rec._counted_at -= rec.config.resync_seconds  # as old as the resync interval
    await run()
    assert len(pod_lists()) == 3 and matched() == 2

    api.fail[("list", "namespaces")] = KubeError("GET", "/api/v1/namespaces", 500, "timeout")
    rec._counted_at -= rec.config.resync_seconds
    await rec.reconcile_once()
    assert rec.counting is not None
    await rec.counting  # a failed count keeps the old one; it does not fail the run
    assert matched() == 2


@sync
async def test_triggers_coalesce_into_at_most_one_pending_run() -> None:
    api = FakeKube()
    rec = _reconciler(api)
    _add_policy(api, "web")
    runs = 0
    original = rec.reconcile_once
    started, release = asyncio.Event(), asyncio.Event()

    async def slow() -> Any:
        nonlocal runs
        runs += 1
        started.set()
        await release.wait()
        return await original()

    rec.reconcile_once = slow  # type: ignore[method-assign]
    server = asyncio.create_task(rec.serve_triggers())
    rec.trigger()
    await started.wait()
    for _ in range(50):  # a burst of events while the first run is going on
        rec.trigger()
    release.set()
    for _ in range(20):
        await asyncio.sleep(0)
    server.cancel()
    with contextlib.suppress(asyncio.CancelledError):
        await server
    assert runs == 2
    assert api.items(kube.DAEMONSETS)


def test_event_filters() -> None:
    rec = _reconciler(FakeKube())
    assert rec.policy_changed(None, "u1", 1)
    assert not rec.policy_changed("MODIFIED", "u1", 1)  # status-only update
    assert rec.policy_changed("MODIFIED", "u1", 2)
    assert rec.policy_changed("DELETED", "u1", 2)
    cm = {"metadata": {"name": AGENT, "resourceVersion": "5"}}
    assert rec.child_changed("MODIFIED", "DaemonSet", cm)  # status matters
    assert rec.child_changed("MODIFIED", "ConfigMap", cm)
    rec._applied["ConfigMap"] = "5"
    assert not rec.child_changed("MODIFIED", "ConfigMap", cm)  # our own write echoed
    assert rec.child_changed("DELETED", "ConfigMap", cm)


def _watch(api: FakeKube, rec: Reconciler) -> None:
    """Deliver the agent objects as they are now, as kopf's watch handlers do."""
    for res, kind in (
        (kube.SERVICEACCOUNTS, "ServiceAccount"),
        (kube.CONFIGMAPS, "ConfigMap"),
        (kube.DAEMONSETS, "DaemonSet"),
    ):
        obj = api.objects.get((res.plural, NS, AGENT))
        if obj is None:
            rec.child_changed("DELETED", kind, {"metadata": {"name": AGENT}})
        else:
            rec.child_changed("MODIFIED", kind, copy.deepcopy(obj))


def _agent_writes(api: FakeKube) -> list[tuple[str, str]]:
    agent_plurals = ("daemonsets", "configmaps", "serviceaccounts")
    return [c for c in api.calls if c[0] != "list" and c[0] != "get" and c[1] in agent_plurals]


@sync
async def test_a_run_for_daemonset_status_only_applies_nothing() -> None:
    api = FakeKube()
    rec = _reconciler(api)
    _add_policy(api, "web")
    first = await rec.reconcile_once()
    assert not first.in_sync and _agent_writes(api) == [
        ("apply", "serviceaccounts"),
        ("apply", "configmaps"),
        ("apply", "daemonsets"),
    ]
    _watch(api, rec)  # the watch delivers our own writes
    # The DaemonSet controller and kubelets at work: a status update (new
    # resourceVersion, same generation), delivered by the watch.
    _run_agents(api, "n1", "n2")
    api.put(kube.DAEMONSETS, api.objects[("daemonsets", NS, AGENT)])
    _watch(api, rec)
    api.calls.clear()
    result = await rec.reconcile_once()
    assert result.in_sync and result.applied
    # No apply, and the DaemonSet's status came from the watch event, not a read.
    assert _agent_writes(api) == []
    assert ("list", "daemonsets") not in api.calls
    assert _conditions(api, "web")["Ready"] == ("True", "AgentsReady")

    api.calls.clear()
    again = await rec.reconcile_once()
    assert again.in_sync
    assert [c for c in api.calls if c[0] not in ("list", "get")] == []  # no write at all


@sync
async def test_drift_is_repaired_after_runs_that_skipped_the_apply() -> None:
    api = FakeKube()
    rec = _reconciler(api)
    _add_policy(api, "web")
    await rec.reconcile_once()
    _watch(api, rec)
    assert (await rec.reconcile_once()).in_sync
    ds_key = ("daemonsets", NS, AGENT)

    # Someone edits the pod template: a new generation.
    ds = api.objects[ds_key]
    ds["spec"]["template"]["spec"]["hostNetwork"] = False
    ds["metadata"]["generation"] += 1
    api.put(kube.DAEMONSETS, ds)
    _watch(api, rec)
    assert not (await rec.reconcile_once()).in_sync
    assert api.objects[ds_key]["spec"]["template"]["spec"]["hostNetwork"] is True
    _watch(api, rec)
    assert (await rec.reconcile_once()).in_sync

    # ... or a label (metadata: the generation stays).
    del api.objects[ds_key]["metadata"]["labels"][constants.LABEL_PART_OF]
    api.put(kube.DAEMONSETS, api.objects[ds_key])
    _watch(api, rec)
    assert not (await rec.reconcile_once()).in_sync
    assert constants.LABEL_PART_OF in api.objects[ds_key]["metadata"]["labels"]
    _watch(api, rec)

    # ... or deletes the ConfigMap, or the DaemonSet.
    for key in (("configmaps", NS, AGENT), ds_key):
        del api.objects[key]
        _watch(api, rec)
        assert not (await rec.reconcile_once()).in_sync
        assert key in api.objects
        _watch(api, rec)
        assert (await rec.reconcile_once()).in_sync

    # A changed policy set is applied even though nothing drifted.
    api.objects[("probepolicies", None, "web")]["spec"]["samplingPercent"] = 10
    api.objects[("probepolicies", None, "web")]["metadata"]["generation"] = 2
    assert not (await rec.reconcile_once()).in_sync
    assert (
        '"samplingPercent": 10' in api.objects[("configmaps", NS, AGENT)]["data"]["policies.json"]
    )


def test_runs_wait_for_policy_bursts_and_are_spaced(monkeypatch: pytest.MonkeyPatch) -> None:
    waits: list[float] = []
    real_sleep = asyncio.sleep

    async def recording_sleep(delay: float) -> None:
        waits.append(delay)
        await real_sleep(0)

    monkeypatch.setattr(asyncio, "sleep", recording_sleep)

    async def scenario() -> None:
        api = FakeKube()
        rec = Reconciler(api, make_config(), clock=lambda: NOW, debounce=0.2)
        rec.active = True
        _add_policy(api, "web")
        rec.child_changed("MODIFIED", "DaemonSet", {"metadata": {"name": AGENT}})
        await rec.request()
        assert waits == []  # DaemonSet status after a quiet moment: the run starts at once
        await rec.request()
        assert len(waits) == 1 and 0 < waits[0] <= 0.2  # spaced from the previous start
        rec._last_started = None  # as if that run were long ago
        rec.policy_changed("ADDED", "uid-web", 1)
        await rec.request()
        assert len(waits) == 2 and 0 < waits[1] <= 0.2  # a burst of policies may follow

    asyncio.run(scenario())


@sync
async def test_a_failed_apply_is_retried_by_the_next_resync_tick() -> None:
    api = FakeKube()
    rec = _reconciler(api)
    _add_policy(api, "web")
    api.fail[("apply", "daemonsets")] = KubeError("PATCH", "/apis/apps/...", 500, "etcd timeout")
    await rec.request()
    assert _conditions(api, "web")["Degraded"] == ("True", "ReconcileFailed")
    del api.fail[("apply", "daemonsets")]
    await rec.request(max_age=3600)  # not skipped as fresh: the last run failed
    assert api.items(kube.DAEMONSETS)
    assert _conditions(api, "web")["Degraded"][1] != "ReconcileFailed"


@pytest.fixture(autouse=True)
def _no_real_sleep(monkeypatch: pytest.MonkeyPatch) -> None:
    # Retries of the real client never run here; keep the suite instant anyway.
    monkeypatch.setattr(kube, "_RETRY_DELAYS", ())
