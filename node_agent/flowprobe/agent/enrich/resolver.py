"""Exchange ends as Kubernetes workloads: the ``WorkloadResolver`` the exporter uses in a cluster.

Resource attributes follow the OTel Kubernetes resource conventions
(``k8s.namespace.name``, ``k8s.pod.name``, ``k8s.pod.uid``, ``k8s.node.name``,
``k8s.container.name``, ``k8s.<workload>.name``); ``service.name`` is the
pod's ``app.kubernetes.io/name`` label, else its workload's name, else the
pod's; ``service.instance.id`` is ``<namespace>.<pod>.<container>`` as the
service conventions advise for Kubernetes. Addresses that are no pod (the
node, the outside world) resolve to None; a Service ClusterIP (traffic seen
before kube-proxy's DNAT) resolves to the Service. With ``admit``, pods it
refuses (those no policy selects) resolve to None too: they get no span of
their own and appear only as the peer of a selected pod.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence

from flowprobe.agent.enrich.index import ClusterIndex, Endpoint, PodRecord, ServiceRecord
from flowprobe.agent.export.workloads import Workload
from flowprobe.agent.parse.messages import AttrValue

K8S_NAMESPACE_NAME = "k8s.namespace.name"
K8S_POD_NAME = "k8s.pod.name"
K8S_POD_UID = "k8s.pod.uid"
K8S_NODE_NAME = "k8s.node.name"
K8S_CONTAINER_NAME = "k8s.container.name"
K8S_SERVICE_NAME = "k8s.service.name"
K8S_SERVICE_UID = "k8s.service.uid"
SERVICE_INSTANCE_ID = "service.instance.id"
APP_NAME_LABEL = "app.kubernetes.io/name"
# Controller kind -> resource attribute; other kinds (custom controllers) get none.
WORKLOAD_ATTRIBUTE = {
    "Deployment": "k8s.deployment.name",
    "ReplicaSet": "k8s.replicaset.name",
    "StatefulSet": "k8s.statefulset.name",
    "DaemonSet": "k8s.daemonset.name",
    "Job": "k8s.job.name",
    "CronJob": "k8s.cronjob.name",
    "ReplicationController": "k8s.replicationcontroller.name",
}


def pod_attributes(index: ClusterIndex, ep: Endpoint) -> list[tuple[str, AttrValue]]:
    pod = ep.pod
    attrs: list[tuple[str, AttrValue]] = [
        (K8S_NAMESPACE_NAME, pod.namespace),
        (K8S_POD_NAME, pod.name),
        (K8S_POD_UID, pod.uid),
    ]
    if pod.node:
        attrs.append((K8S_NODE_NAME, pod.node))
    if ep.container:
        attrs.append((K8S_CONTAINER_NAME, ep.container))
    if pod.owner_kind == "ReplicaSet":
        attrs.append((WORKLOAD_ATTRIBUTE["ReplicaSet"], pod.owner_name))
    wl = index.workload(pod)
    if wl is not None and wl[0] in WORKLOAD_ATTRIBUTE and wl[0] != "ReplicaSet":
        attrs.append((WORKLOAD_ATTRIBUTE[wl[0]], wl[1]))
    return attrs


def service_name(index: ClusterIndex, ep: Endpoint) -> str:
    label = ep.pod.labels.get(APP_NAME_LABEL)
    if label:
        return label
    wl = index.workload(ep.pod)
    return wl[1] if wl is not None else ep.pod.name


class KubernetesResolver:
    """Pods and Services by address and time; ``extra`` attributes go on every resource."""

    def __init__(
        self,
        index: ClusterIndex,
        extra: Sequence[tuple[str, AttrValue]] = (),
        admit: Callable[[PodRecord], bool] | None = None,
        max_cache: int = 16_384,
    ) -> None:
        self.index = index
        self.extra = tuple(extra)
        self.admit = admit
        # Shared Workload objects keep resources shared; cleared when full.
        self._cache: dict[tuple[str, str | None], Workload] = {}
        self._max = max_cache
        # (address, port) -> (resource, lo, hi, a pod holds it): the index's
        # tenancy window with ``admit`` applied, dropped when the generation
        # changes (pods, namespaces, the policy set). Services are looked up
        # apart: they do not change the generation.
        self._ends: dict[tuple[str, int], tuple[Workload | None, int, int, bool]] = {}
        self._ends_generation = -1

    def _pod(self, ep: Endpoint) -> Workload | None:
        if self.admit is not None and not self.admit(ep.pod):
            return None
        key = (ep.pod.uid, ep.container)
        wl = self._cache.get(key)
        if wl is None:
            attrs = pod_attributes(self.index, ep)
            instance = f"{ep.pod.namespace}.{ep.pod.name}"
            if ep.container:
                instance += f".{ep.container}"
            attrs.append((SERVICE_INSTANCE_ID, instance))
            if len(self._cache) >= self._max:
                self._cache.clear()
            wl = self._cache[key] = Workload(service_name(self.index, ep), (*attrs, *self.extra))
        return wl

    def _service(self, svc: ServiceRecord) -> Workload:
        key = (svc.uid, None)
        wl = self._cache.get(key)
        if wl is None:
            attrs: tuple[tuple[str, AttrValue], ...] = (
                (K8S_NAMESPACE_NAME, svc.namespace),
                (K8S_SERVICE_NAME, svc.name),
                (K8S_SERVICE_UID, svc.uid),
            )
            wl = self._cache[key] = Workload(svc.name, (*attrs, *self.extra))
        return wl

    def _end(self, address: str, port: int, at_us: int) -> tuple[Workload | None, bool]:
        """Caller holds the index lock."""
        index = self.index
        if self._ends_generation != index.generation:
            self._ends.clear()
            self._ends_generation = index.generation
        key = (address, port)
        hit = self._ends.get(key)
        if hit is None or not hit[1] <= at_us < hit[2]:
            ep, lo, hi = index.lookup(address, port, at_us)
            if len(self._ends) >= self._max:
                self._ends.clear()
            hit = self._ends[key] = (
                self._pod(ep) if ep is not None else None,
                lo,
                hi,
                ep is not None,
            )
        return hit[0], hit[3]

    def server(self, address: str, port: int, at_us: int = 0) -> Workload | None:
        with self.index.lock:
            wl, found = self._end(address, port, at_us)
            if found:
                return wl
            svc = self.index.service_at(address)
            return self._service(svc) if svc is not None else None

    def client(self, address: str, at_us: int = 0) -> Workload | None:
        with self.index.lock:
            return self._end(address, -1, at_us)[0]
