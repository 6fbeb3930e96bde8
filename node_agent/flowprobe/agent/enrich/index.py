"""The cluster as the agent needs it: who held which IP when, and what runs there.

Pure: the index only applies Kubernetes objects (as the API's JSON dicts) that
the watcher (``watch.py``) hands it, with the time it saw them, so every rule
here is tested with plain event sequences.

**IP reuse.** Each IP keeps a timeline of the pods that held it, ordered by
when the agent first saw the pod with that IP. Two pods never hold one IP at
once (hostNetwork pods aside, indexed apart), so a newer holder ends the older
one's tenancy even if the older pod's DELETED event comes later (the kubelet
frees the IP at sandbox teardown, before the final delete). An exchange is
attributed to the newest holder that had the IP at the exchange's start
time; deleted pods stay ``retention_us`` (bounded by ``max_deleted``) so that
exchanges still in the pipeline when their pod goes are attributed right.

**Workloads.** A ReplicaSet owner created by a Deployment is recognised by
the Deployment controller's naming convention (ReplicaSet name =
``<deployment>-<pod-template-hash>`` and the pod carries that hash label),
which saves watching every ReplicaSet (ten revisions per Deployment by
default). Jobs are watched (metadata only) because a CronJob's Job name is
not reliably recognisable.
"""

from __future__ import annotations

import bisect
import sys
import threading
from collections import deque
from collections.abc import Iterable, Mapping
from dataclasses import dataclass, field
from typing import Any, NamedTuple

Obj = Mapping[str, Any]

# Resource kinds the index follows (the watcher's names).
PODS, SERVICES, ENDPOINTSLICES, JOBS, NAMESPACES = (
    "pods",
    "services",
    "endpointslices",
    "jobs",
    "namespaces",
)
RESOURCES = (PODS, SERVICES, ENDPOINTSLICES, JOBS, NAMESPACES)

_SERVICE_NAME_LABEL = "kubernetes.io/service-name"
_MIN, _MAX = -(2**63), 2**63
_MEMO_MAX = 65_536
_TEMPLATE_HASH_LABEL = "pod-template-hash"


def _s(text: str) -> str:
    # Namespaces, nodes, label keys and owner names repeat across thousands
    # of pods: one copy each.
    return sys.intern(text)


def _start_us(pod: PodRecord) -> int:
    return pod.start_us


@dataclass(slots=True, eq=False)
class PodRecord:
    uid: str
    namespace: str
    name: str
    node: str
    ips: tuple[str, ...]
    host_network: bool
    labels: dict[str, str]
    # containerPort -> (container name, port name or "")
    ports: dict[int, tuple[str, str]]
    containers: tuple[str, ...]
    owner_kind: str
    owner_name: str
    # When the agent first saw the pod with its IP, and when it saw it go.
    start_us: int
    end_us: int | None = None
    terminating: bool = False

    @property
    def alive(self) -> bool:
        return self.end_us is None


@dataclass(frozen=True, slots=True)
class ServiceRecord:
    uid: str
    namespace: str
    name: str
    cluster_ips: tuple[str, ...]


class Endpoint(NamedTuple):
    """An exchange end resolved to a pod (and, for a server, its container port)."""

    pod: PodRecord
    container: str | None
    port_name: str | None


@dataclass(slots=True)
class _Slice:
    namespace: str
    service: str
    pods: frozenset[str]  # pod uids


@dataclass
class IndexCounters:
    events: dict[str, int] = field(default_factory=dict)
    bad_objects: int = 0
    pruned: int = 0


class ClusterIndex:
    def __init__(self, retention_seconds: float = 300.0, max_deleted: int = 20_000) -> None:
        self.retention_us = int(retention_seconds * 1_000_000)
        self.max_deleted = max_deleted
        self.pods: dict[str, PodRecord] = {}
        # ip -> holders ordered by start_us (non-hostNetwork pods only)
        self._by_ip: dict[str, list[PodRecord]] = {}
        # (host ip, port) -> holders, for hostNetwork pods
        self._host_ports: dict[tuple[str, int], list[PodRecord]] = {}
        self._deleted: deque[PodRecord] = deque()
        self.services: dict[str, ServiceRecord] = {}
        self._service_ips: dict[str, ServiceRecord] = {}
        self._slices: dict[str, _Slice] = {}
        # pod uid -> {(namespace, service): number of slices naming it}
        self._pod_services: dict[str, dict[tuple[str, str], int]] = {}
        self._job_owner: dict[tuple[str, str], str] = {}
        self._job_uids: dict[str, tuple[str, str]] = {}
        self._ns_uids: dict[str, str] = {}
        self.namespace_labels: dict[str, dict[str, str]] = {}
        self.counters = IndexCounters()
        # The watcher threads write, the capture and export threads read.
        self.lock = threading.RLock()
        # Bumped on every change that can alter policy selection or lookups
        # (pods, namespace labels).
        self.generation = 0
        self._memo: dict[tuple[str, int], tuple[Endpoint | None, int, int]] = {}
        self._memo_generation = 0

    # -- applying objects -------------------------------------------------

    def apply(self, resource: str, event: str, obj: Obj, now_us: int) -> None:
        """One watch event (``ADDED``/``MODIFIED``/``DELETED``) seen at ``now_us``."""
        c = self.counters.events
        c[resource] = c.get(resource, 0) + 1
        try:
            uid = obj["metadata"]["uid"]
            if event == "DELETED":
                self._delete(resource, uid, now_us)
            else:
                self._upsert(resource, uid, obj, now_us)
        except (KeyError, TypeError, ValueError, AttributeError):
            # A malformed object must not take the agent down; counted.
            self.counters.bad_objects += 1

    def replace(self, resource: str, items: Iterable[Obj], now_us: int) -> None:
        """A full list (first sync or a relist after 410 Gone / a reconnect):
        upsert every item and delete what the list no longer has."""
        seen: set[str] = set()
        for obj in items:
            try:
                seen.add(obj["metadata"]["uid"])
            except (KeyError, TypeError):
                self.counters.bad_objects += 1
                continue
            self.apply(resource, "ADDED", obj, now_us)
        for uid in [u for u in self._known(resource) if u not in seen]:
            self._delete(resource, uid, now_us)

    def _known(self, resource: str) -> list[str]:
        if resource == PODS:
            return [u for u, p in self.pods.items() if p.alive]
        if resource == SERVICES:
            return list(self.services)
        if resource == ENDPOINTSLICES:
            return list(self._slices)
        if resource == JOBS:
            return list(self._job_uids)
        return list(self._ns_uids)

    def _upsert(self, resource: str, uid: str, obj: Obj, now_us: int) -> None:
        meta = obj["metadata"]
        if resource == PODS:
            self._upsert_pod(uid, obj, now_us)
        elif resource == SERVICES:
            self._upsert_service(uid, obj)
        elif resource == ENDPOINTSLICES:
            self._upsert_slice(uid, obj)
        elif resource == JOBS:
            key = (_s(meta["namespace"]), meta["name"])
            self._job_uids[uid] = key
            cron = next(
                (
                    o["name"]
                    for o in meta.get("ownerReferences") or ()
                    if o.get("kind") == "CronJob"
                ),
                None,
            )
            if cron:
                self._job_owner[key] = _s(cron)
            else:
                self._job_owner.pop(key, None)
        elif resource == NAMESPACES:
            self._ns_uids[uid] = meta["name"]
            labels = {_s(k): v for k, v in (meta.get("labels") or {}).items()}
            if self.namespace_labels.get(meta["name"]) != labels:
                self.namespace_labels[_s(meta["name"])] = labels
                self.generation += 1

    def _delete(self, resource: str, uid: str, now_us: int) -> None:
        if resource == PODS:
            pod = self.pods.get(uid)
            if pod is not None and pod.alive:
                pod.end_us = now_us
                self._deleted.append(pod)
                self.generation += 1
        elif resource == SERVICES:
            svc = self.services.pop(uid, None)
            if svc is not None:
                for ip in svc.cluster_ips:
                    if self._service_ips.get(ip) is svc:
                        del self._service_ips[ip]
        elif resource == ENDPOINTSLICES:
            self._set_slice(uid, None)
        elif resource == JOBS:
            key = self._job_uids.pop(uid, None)
            if key is not None:
                self._job_owner.pop(key, None)
        elif resource == NAMESPACES:
            name = self._ns_uids.pop(uid, None)
            if name is not None and self.namespace_labels.pop(name, None) is not None:
                self.generation += 1

    def _upsert_pod(self, uid: str, obj: Obj, now_us: int) -> None:
        meta, spec, status = obj["metadata"], obj.get("spec") or {}, obj.get("status") or {}
        ips = tuple(p["ip"] for p in status.get("podIPs") or () if p.get("ip"))
        if not ips and status.get("podIP"):
            ips = (status["podIP"],)
        old = self.pods.get(uid)
        if status.get("phase") in ("Succeeded", "Failed"):
            # A finished pod's IP is released: its tenancy ends as if deleted.
            self._delete(PODS, uid, now_us)
            return
        if (
            old is not None
            and old.alive
            and old.ips == ips
            and old.labels == (meta.get("labels") or {})
        ):
            old.terminating = bool(meta.get("deletionTimestamp"))
            old.node = _s(spec.get("nodeName") or old.node)
            return
        ports: dict[int, tuple[str, str]] = {}
        containers: list[str] = []
        for c in spec.get("containers") or ():
            cname = _s(c["name"])
            containers.append(cname)
            for p in c.get("ports") or ():
                if p.get("protocol", "TCP") in ("TCP", "UDP", "SCTP") and p.get("containerPort"):
                    ports.setdefault(int(p["containerPort"]), (cname, p.get("name") or ""))
        owner = next(
            (o for o in meta.get("ownerReferences") or () if o.get("controller")),
            None,
        )
        rec = PodRecord(
            uid=uid,
            namespace=_s(meta["namespace"]),
            name=meta["name"],
            node=_s(spec.get("nodeName") or ""),
            ips=ips,
            host_network=bool(spec.get("hostNetwork")),
            labels={_s(k): v for k, v in (meta.get("labels") or {}).items()},
            ports=ports,
            containers=tuple(containers),
            owner_kind=_s(owner["kind"]) if owner else "",
            owner_name=_s(owner["name"]) if owner else "",
            # A pod keeping its IP keeps its tenancy start across updates and relists.
            start_us=old.start_us if old is not None and old.alive and old.ips == ips else now_us,
            terminating=bool(meta.get("deletionTimestamp")),
        )
        if old is not None:
            self._unindex(old)
        self.pods[uid] = rec
        self._index(rec)
        self.generation += 1

    def _slots(self, pod: PodRecord) -> list[list[PodRecord]]:
        if pod.host_network:
            return [
                self._host_ports.setdefault((ip, port), []) for ip in pod.ips for port in pod.ports
            ]
        return [self._by_ip.setdefault(ip, []) for ip in pod.ips]

    def _index(self, pod: PodRecord) -> None:
        for holders in self._slots(pod):
            bisect.insort(holders, pod, key=lambda p: p.start_us)

    def _unindex(self, pod: PodRecord) -> None:
        table: dict[Any, list[PodRecord]]
        keys: list[Any]
        if pod.host_network:
            table, keys = self._host_ports, [(ip, port) for ip in pod.ips for port in pod.ports]
        else:
            table, keys = self._by_ip, list(pod.ips)
        for key in keys:
            holders = table.get(key)
            if holders is None:
                continue
            holders[:] = [p for p in holders if p is not pod]
            if not holders:
                del table[key]

    def _upsert_service(self, uid: str, obj: Obj) -> None:
        meta, spec = obj["metadata"], obj.get("spec") or {}
        ips = tuple(
            ip for ip in spec.get("clusterIPs") or [spec.get("clusterIP")] if ip and ip != "None"
        )
        self._delete(SERVICES, uid, 0)
        svc = ServiceRecord(uid, _s(meta["namespace"]), _s(meta["name"]), ips)
        self.services[uid] = svc
        for ip in ips:
            self._service_ips[ip] = svc

    def _upsert_slice(self, uid: str, obj: Obj) -> None:
        meta = obj["metadata"]
        service = (meta.get("labels") or {}).get(_SERVICE_NAME_LABEL)
        if not service:
            self._set_slice(uid, None)
            return
        pods = frozenset(
            ref["uid"]
            for ep in obj.get("endpoints") or ()
            if (ref := ep.get("targetRef")) and ref.get("kind") == "Pod" and ref.get("uid")
        )
        self._set_slice(uid, _Slice(_s(meta["namespace"]), _s(service), pods))

    def _set_slice(self, uid: str, new: _Slice | None) -> None:
        old = self._slices.pop(uid, None)
        if old is not None:
            for pod in old.pods:
                counts = self._pod_services.get(pod)
                if counts is None:
                    continue
                key = (old.namespace, old.service)
                counts[key] -= 1
                if counts[key] <= 0:
                    del counts[key]
                if not counts:
                    del self._pod_services[pod]
        if new is not None:
            self._slices[uid] = new
            key = (new.namespace, new.service)
            for pod in new.pods:
                counts = self._pod_services.setdefault(pod, {})
                counts[key] = counts.get(key, 0) + 1

    # -- housekeeping -----------------------------------------------------

    def prune(self, now_us: int) -> int:
        """Forget deleted pods older than the retention or beyond ``max_deleted``."""
        n = 0
        deleted = self._deleted
        while deleted:
            pod = deleted[0]
            end = pod.end_us if pod.end_us is not None else now_us
            if len(deleted) <= self.max_deleted and now_us - end <= self.retention_us:
                break
            deleted.popleft()
            if self.pods.get(pod.uid) is pod:
                del self.pods[pod.uid]
            self._unindex(pod)
            n += 1
        if n:
            self.generation += 1
        self.counters.pruned += n
        return n

    # -- lookups ----------------------------------------------------------

    @staticmethod
    def _tenancy(holders: list[PodRecord] | None, at_us: int) -> tuple[PodRecord | None, int, int]:
        """The holder at ``at_us`` and the window [lo, hi) in which that answer holds."""
        if not holders:
            return None, _MIN, _MAX
        # Newest holder that had the IP by at_us; before the first known
        # holder, that one (the agent knows of no earlier tenant).
        i = bisect.bisect_right(holders, at_us, key=_start_us)
        if i == 0:
            pod, lo, nxt = holders[0], _MIN, 1
        else:
            pod, lo, nxt = holders[i - 1], holders[i - 1].start_us, i
        hi = holders[nxt].start_us if nxt < len(holders) else _MAX
        if pod.end_us is not None:
            if at_us > pod.end_us:
                return None, pod.end_us + 1, hi
            hi = min(hi, pod.end_us + 1)
        return pod, lo, hi

    def pod_at(self, ip: str, at_us: int) -> PodRecord | None:
        return self._tenancy(self._by_ip.get(ip), at_us)[0]

    def lookup(self, ip: str, port: int, at_us: int) -> tuple[Endpoint | None, int, int]:
        """The end at (ip, port) at ``at_us`` (port -1: a client) and the window
        [lo, hi) the answer holds in, valid while ``generation`` is unchanged.
        Memoised per (ip, port); the memo is dropped whenever pods change."""
        if self._memo_generation != self.generation:
            self._memo.clear()
            self._memo_generation = self.generation
        key = (ip, port)
        hit = self._memo.get(key)
        if hit is not None and hit[1] <= at_us < hit[2]:
            return hit
        pod, lo, hi = self._tenancy(self._by_ip.get(ip), at_us)
        if pod is None and port >= 0:
            pod, lo2, hi2 = self._tenancy(self._host_ports.get((ip, port)), at_us)
            lo, hi = max(lo, lo2), min(hi, hi2)
        ep: Endpoint | None = None
        if pod is not None:
            if port >= 0:
                container, port_name = pod.ports.get(port, (None, ""))
                if container is None and len(pod.containers) == 1:
                    container = pod.containers[0]
                ep = Endpoint(pod, container, port_name or None)
            else:
                ep = Endpoint(pod, pod.containers[0] if len(pod.containers) == 1 else None, None)
        if len(self._memo) >= _MEMO_MAX:
            self._memo.clear()
        hit = self._memo[key] = (ep, lo, hi)
        return hit

    def server(self, ip: str, port: int, at_us: int) -> Endpoint | None:
        return self.lookup(ip, port, at_us)[0]

    def client(self, ip: str, at_us: int) -> Endpoint | None:
        # A hostNetwork client is indistinguishable from the node itself: None.
        return self.lookup(ip, -1, at_us)[0]

    def invalidate(self) -> None:
        """Drop every answer memoised against ``generation`` (e.g. the policy set changed)."""
        self.generation += 1

    def service_at(self, ip: str) -> ServiceRecord | None:
        """The Service whose ClusterIP this is (traffic captured before DNAT)."""
        return self._service_ips.get(ip)

    def services_of(self, pod: PodRecord) -> list[str]:
        return sorted(name for _, name in self._pod_services.get(pod.uid, {}))

    def workload(self, pod: PodRecord) -> tuple[str, str] | None:
        """(kind, name) of the pod's top-level controller, or None for a bare pod."""
        kind, name = pod.owner_kind, pod.owner_name
        if not kind:
            return None
        if kind == "ReplicaSet":
            h = pod.labels.get(_TEMPLATE_HASH_LABEL)
            if h and name.endswith("-" + h):
                return ("Deployment", name[: -len(h) - 1])
        elif kind == "Job":
            cron = self._job_owner.get((pod.namespace, name))
            if cron:
                return ("CronJob", cron)
        return (kind, name)

    def pods_on_node(self, node: str) -> list[PodRecord]:
        return [p for p in self.pods.values() if p.alive and p.node == node and p.ips]

    def sizes(self) -> dict[str, int]:
        return {
            "pods": sum(1 for p in self.pods.values() if p.alive),
            "deleted_pods": len(self._deleted),
            "services": len(self.services),
            "endpointslices": len(self._slices),
            "jobs": len(self._job_owner),
            "namespaces": len(self.namespace_labels),
        }
