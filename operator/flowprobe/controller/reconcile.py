"""Level-based reconciliation of all ProbePolicies into one set of agent objects.

Every policy feeds the same DaemonSet and ConfigMap, so there is no per-policy
reconcile: any relevant change (a policy event, a change to the agent objects,
the periodic resync) requests one run of ``reconcile_once``, which

1. lists all ProbePolicies and parses them (pydantic);
2. compiles them (compiler.py), keeping Unmanaged policies' frozen entries;
3. renders the ServiceAccount, ConfigMap and DaemonSet (render.py) and applies
   them with server-side apply, or deletes them when nothing is left to apply;
   a run that renders what the last apply wrote, while the watched objects
   are still what it produced (``_in_sync``), writes nothing;
4. observes agent pods and agent reports, takes the matched-pod counts last
   taken in the background (``_matched_pods``), and writes each Managed
   policy's status (status.py), posting Events on transitions.

Watch events only ``trigger()``: a flag, not a queue, so however many events
arrive while a run is pending or going on, they cause at most one more run.
Callers that must see a run happen (startup, resync, tests) ``request()``
one; concurrent requests share it, and a run that starts after a request or
trigger covers it. Each step is idempotent, so a run cut short (operator
killed mid-way) is completed by the next one.
"""

from __future__ import annotations

import asyncio
import contextlib
import datetime
import logging
import socket
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import Any

from pydantic import ValidationError

from flowprobe.api import constants
from flowprobe.api.agentreport import AgentReport, lease_is_fresh
from flowprobe.api.conditions import ConditionStatus, now_utc
from flowprobe.api.policyset import CompiledPolicySet
from flowprobe.api.v1alpha1 import LabelSelector, ProbePolicy, ProbePolicyStatus
from flowprobe.controller import kube
from flowprobe.controller.compiler import (
    Compilation,
    Unparseable,
    Verdict,
    compile_policies,
    parse_policy,
)
from flowprobe.controller.config import OperatorConfig
from flowprobe.controller.kube import Kube, KubeError
from flowprobe.controller.render import AgentObjects, render, selector_labels
from flowprobe.controller.status import (
    AgentPod,
    EventSpec,
    Observation,
    compute_status,
    transition_events,
)

log = logging.getLogger(__name__)

# A run taking longer than this is stuck (hung connection, deadlock): the
# liveness probe fails and the kubelet restarts the operator.
STUCK_AFTER_SECONDS = 600.0


def _selector(labels: dict[str, str]) -> str:
    return ",".join(f"{k}={v}" for k, v in sorted(labels.items()))


def _node_of(pod: dict[str, Any]) -> str | None:
    """The node an agent pod runs on or, until the scheduler binds it, is meant for."""
    spec = pod.get("spec") or {}
    if spec.get("nodeName"):
        return str(spec["nodeName"])
    # The DaemonSet controller pins each pod to its node with a required
    # node affinity on metadata.name; counting unbound pods by it keeps a
    # policy from looking Ready while some of its agents are not even placed.
    affinity = (spec.get("affinity") or {}).get("nodeAffinity") or {}
    required = affinity.get("requiredDuringSchedulingIgnoredDuringExecution") or {}
    for term in required.get("nodeSelectorTerms") or []:
        for field in term.get("matchFields") or []:
            if field.get("key") == "metadata.name" and field.get("values"):
                return str(field["values"][0])
    return None


def _parse_time(value: Any) -> datetime.datetime | None:
    if not value:
        return None
    try:
        return datetime.datetime.fromisoformat(str(value).replace("Z", "+00:00"))
    except ValueError:
        return None


@dataclass(frozen=True)
class RunResult:
    policies: int
    applied: bool
    error: str | None
    # The agent objects were already as rendered: no apply was sent.
    in_sync: bool = False


@dataclass(frozen=True)
class _LastApply:
    """What the last complete apply wrote and what the server made of it (the
    ServiceAccount's and ConfigMap's resourceVersions: ``Reconciler._applied``)."""

    objects: AgentObjects
    # uid and generation of the DaemonSet: its status updates change the
    # resourceVersion, a spec change or a re-creation changes these.
    daemon_set: tuple[str, int]


def _includes(live: dict[str, Any], rendered: dict[str, Any]) -> bool:
    """Whether live metadata still carries the labels, annotations and owners we render.

    Metadata edits do not change a DaemonSet's generation, so this is how an
    edited label or annotation is noticed without applying.
    """
    for key in ("labels", "annotations"):
        have = live.get(key) or {}
        if any(have.get(k) != v for k, v in (rendered.get(key) or {}).items()):
            return False
    return bool(live.get("ownerReferences") == rendered.get("ownerReferences"))


class Reconciler:
    def __init__(
        self,
        client: Kube,
        config: OperatorConfig,
        *,
        clock: Callable[[], datetime.datetime] = now_utc,
        debounce: float = 0.2,
    ) -> None:
        self.kube = client
        self.config = config
        self._clock = clock
        self._debounce = debounce
        self._lock = asyncio.Lock()
        # Set by trigger(), cleared when a run starts: "something changed since".
        self._dirty = asyncio.Event()
        self._requested = 0
        self._completed = 0
        self._last_success_started: float | None = None
        self._last_started: float | None = None
        self._busy_since: float | None = None
        # metadata.generation per policy uid as of the last event: status-only
        # updates (mostly our own) do not need a run.
        self._generations: dict[str, int] = {}
        # resourceVersion our last apply produced, per kind: echoes of our own
        # writes do not need a run.
        self._applied: dict[str, str] = {}
        self._last_apply: _LastApply | None = None
        # The latest state of each agent object from the watch, by kind
        # (absent: deleted or not seen yet). Runs triggered by DaemonSet
        # status compare it with _last_apply instead of applying again, and
        # take the DaemonSet status from it.
        self._watched: dict[str, dict[str, Any]] = {}
        # When the last policy event arrived: runs wait for a burst of them.
        self._policy_event_at: float | None = None
        self._instance = socket.gethostname()
        # Only the leader reconciles; a standby (or a replica that just lost
        # the lease) ignores every request.
        self.active = False
        # Earliest time limit among the applied policies: the resync does not
        # wait for resyncSeconds to mark a policy Expired and drop it.
        self._next_deadline: datetime.datetime | None = None
        # Matched-pod counts, for which policies (uid, generation) and since
        # when, and the background task taking the next count.
        self._counts: dict[str, int] = {}
        self.counting: asyncio.Task[None] | None = None
        self._counted_key: frozenset[tuple[str, int]] | None = None
        self._counted_at: float | None = None

    # -- triggers -------------------------------------------------------------

    def policy_changed(self, event_type: str | None, uid: str, generation: int) -> bool:
        """Whether a ProbePolicy watch event may change anything we derive."""
        if event_type != "DELETED" and self._generations.get(uid) == generation:
            return False
        if event_type == "DELETED":
            self._generations.pop(uid, None)
        else:
            self._generations[uid] = generation
        self._policy_event_at = time.monotonic()
        return True

    def child_changed(self, event_type: str | None, kind: str, obj: dict[str, Any]) -> bool:
        """Record an agent object's watch event; whether it needs a run.

        Drift, deletion and DaemonSet status need one; echoes of our own
        applies do not.
        """
        if event_type == "DELETED":
            self._watched.pop(kind, None)
            return True
        self._watched[kind] = obj
        if kind == "DaemonSet":
            return True
        return self._applied.get(kind) != str(obj["metadata"].get("resourceVersion", ""))

    def trigger(self) -> None:
        """Ask for a run without waiting for it (watch handlers; see serve_triggers)."""
        self._dirty.set()

    async def serve_triggers(self) -> None:
        """Turn triggers into runs, one after the other, until cancelled.

        A handler that awaited its run would hold kopf's worker for that
        object and, with one run per event, a DaemonSet rollout (one status
        update per batch of pods) would queue a run per update; here every
        event that lands before a run starts is covered by that run.
        """
        while True:
            await self._dirty.wait()
            if not self.active:
                self._dirty.clear()
                continue
            try:
                await self.request()
            except Exception:
                # Logged with its traceback; the next event or the resync retries.
                log.exception("reconcile failed")

    async def request(self, *, max_age: float = 0.0) -> None:
        """Run a reconcile that starts after this call (shared with concurrent callers).

        ``max_age`` > 0 (periodic resync): do nothing if a successful run
        started less than ``max_age`` seconds ago.
        """
        if not self.active:
            return
        self._requested += 1
        ticket = self._requested
        async with self._lock:
            if self._completed >= ticket or not self.active:
                return
            last = self._last_success_started
            fresh = last is not None and time.monotonic() - last < max_age
            if max_age and fresh and not self._deadline_passed():
                return
            await self._settle()
            covered = self._requested
            self._dirty.clear()
            started = time.monotonic()
            self._busy_since = self._last_started = started
            try:
                result = await self.reconcile_once()
            finally:
                self._busy_since = None
            # A failed apply is retried by the next resync tick, not after
            # resyncSeconds: until then its ReconcileFailed hides the rest.
            if result.error is None:
                self._last_success_started = started
            self._completed = covered

    async def _settle(self) -> None:
        """Wait until ``debounce`` after the last policy event and the last run's start.

        After a policy event, so that a burst of them (kubectl apply -f dir/)
        lands in one run: a set compiled in two runs would roll the agents
        twice. After the last start, so that DaemonSet status events during a
        rollout (triggers coalesce into at most one pending run) do not run
        back to back, each listing every agent pod while the control plane
        is busy creating them. A trigger after a quiet moment (the status
        update after the last agent turned Ready) runs at once.
        """
        now = time.monotonic()
        since = [t for t in (self._policy_event_at, self._last_started) if t is not None]
        wait = max((self._debounce - (now - t) for t in since), default=0.0)
        if wait > 0:
            await asyncio.sleep(wait)

    def _deadline_passed(self) -> bool:
        return self._next_deadline is not None and self._clock() >= self._next_deadline

    def health(self) -> dict[str, Any]:
        """For the liveness probe: raises if a run has been going on for too long."""
        busy = None if self._busy_since is None else time.monotonic() - self._busy_since
        if busy is not None and busy > STUCK_AFTER_SECONDS:
            raise RuntimeError(f"reconcile running for {busy:.0f} s; assuming it is stuck")
        last = self._last_success_started
        return {
            "active": self.active,
            "busySeconds": None if busy is None else round(busy, 1),
            "secondsSinceLastSuccess": None if last is None else round(time.monotonic() - last, 1),
        }

    # -- one run ----------------------------------------------------------------

    async def reconcile_once(self) -> RunResult:
        now = self._clock()
        bodies, live_cm = await asyncio.gather(
            self.kube.list(kube.PROBEPOLICIES),
            self.kube.get(kube.CONFIGMAPS, self.config.agent.name, self.config.namespace),
        )
        parsed = [parse_policy(b) for b in bodies]
        comp = compile_policies(parsed, self.config, previous=self._previous_set(live_cm), now=now)

        limits = [p.not_after for p in comp.policy_set.policies if p.not_after is not None]
        self._next_deadline = min(limits, default=None)

        error: str | None = None
        daemon_set: dict[str, Any] | None = None
        in_sync = False
        try:
            if comp.empty:
                await self._remove_agents()
            else:
                objects = render(comp, self.config)
                daemon_set = self._in_sync(objects)
                in_sync = daemon_set is not None
                if daemon_set is None:
                    daemon_set = await self._apply(objects)
        except KubeError as exc:
            error = f"{exc.method} {exc.path} failed: {exc.message}"
            log.error("applying the agent objects failed: %s", error)
            daemon_set = await self._get_daemon_set()

        obs = await self._observe(comp, parsed, daemon_set, error, now)
        await self._write_statuses(bodies, parsed, comp, obs)
        return RunResult(
            policies=len(parsed),
            applied=not comp.empty and error is None,
            error=error,
            in_sync=in_sync,
        )

    def _previous_set(self, live_cm: dict[str, Any] | None) -> CompiledPolicySet | None:
        if live_cm is None:
            return None
        text = (live_cm.get("data") or {}).get(constants.POLICY_SET_KEY)
        if not text:
            return None
        try:
            return CompiledPolicySet.from_json(text)
        except ValidationError as exc:
            # Only Unmanaged policies lose their frozen entry; Managed ones are recompiled.
            log.warning("ignoring unreadable policy set in the agent ConfigMap: %s", exc)
            return None

    def _in_sync(self, objects: AgentObjects) -> dict[str, Any] | None:
        """The watched DaemonSet if applying ``objects`` would change nothing, else None.

        True when the last complete apply wrote these very objects and the
        watch shows them as that apply left them: ServiceAccount and
        ConfigMap at its resourceVersion, the DaemonSet at its uid and
        generation with our metadata. Any edit, deletion or re-creation
        breaks this, and so does a watch that has not yet delivered our own
        write (then the run applies, as it would without this check).
        """
        last = self._last_apply
        if last is None or last.objects != objects:
            return None
        for kind in ("ServiceAccount", "ConfigMap"):
            seen = self._watched.get(kind)
            if seen is None or seen["metadata"].get("resourceVersion") != self._applied[kind]:
                return None
        ds = self._watched.get("DaemonSet")
        if ds is None:
            return None
        meta = ds["metadata"]
        if (meta.get("uid"), meta.get("generation")) != last.daemon_set:
            return None
        if not _includes(meta, objects.daemon_set["metadata"]):
            return None
        return ds

    async def _apply(self, objects: AgentObjects) -> dict[str, Any]:
        self._last_apply = None  # until all three are written
        # The ServiceAccount and ConfigMap do not depend on each other; the
        # DaemonSet comes last, since its pods need both (a pod whose
        # ServiceAccount is missing is refused, and the DaemonSet controller
        # backs off).
        first = await asyncio.gather(
            self.kube.apply(objects.service_account),
            self.kube.apply(objects.config_map),
            return_exceptions=True,
        )
        for result in first:
            if isinstance(result, BaseException):
                raise result
            self._note_applied(result)
        daemon_set = self._note_applied(await self.kube.apply(objects.daemon_set))
        ds_meta = daemon_set["metadata"]
        self._last_apply = _LastApply(
            objects=objects,
            daemon_set=(str(ds_meta.get("uid", "")), int(ds_meta.get("generation", 0))),
        )
        return daemon_set

    def _note_applied(self, result: dict[str, Any]) -> dict[str, Any]:
        self._applied[result["kind"]] = str(result["metadata"].get("resourceVersion", ""))
        return result

    async def _get_daemon_set(self) -> dict[str, Any] | None:
        # A list by name, not a get: kopf's watch already needs `list`, and this
        # failure path alone would not justify an extra `get` permission.
        try:
            found = await self.kube.list(
                kube.DAEMONSETS,
                self.config.namespace,
                field_selector=f"metadata.name={self.config.agent.name}",
            )
        except KubeError:
            return None
        return found[0] if found else None

    async def _remove_agents(self) -> None:
        ns, name = self.config.namespace, self.config.agent.name
        removed = False
        for res in (kube.DAEMONSETS, kube.CONFIGMAPS, kube.SERVICEACCOUNTS):
            removed |= await self.kube.delete(res, name, ns)
        self._applied.clear()
        self._last_apply = None
        for lease in await self._report_leases():
            await self.kube.delete(kube.LEASES, lease["metadata"]["name"], ns)
        if removed:
            log.info("no active ProbePolicy left: removed the agent DaemonSet and its objects")

    # -- observation ------------------------------------------------------------

    async def _observe(
        self,
        comp: Compilation,
        parsed: Sequence[ProbePolicy | Unparseable],
        daemon_set: dict[str, Any] | None,
        error: str | None,
        now: datetime.datetime,
    ) -> Observation:
        ns = self.config.namespace
        checksum = comp.policy_set.checksum()
        pods: list[AgentPod] = []
        reports: dict[str, AgentReport] = {}
        node_labels: dict[str, dict[str, str]] = {}
        rollout_complete = False
        if daemon_set is not None:
            spec_gen = daemon_set["metadata"].get("generation")
            st = daemon_set.get("status") or {}
            rollout_complete = st.get("observedGeneration") == spec_gen and st.get(
                "updatedNumberScheduled", 0
            ) == st.get("desiredNumberScheduled", 0)
            # Independent reads: concurrent, so a run under a busy API server
            # waits for the slowest, not for their sum.
            pod_items, leases, nodes = await asyncio.gather(
                self.kube.list(
                    kube.PODS, ns, label_selector=_selector(selector_labels(self.config))
                ),
                self._report_leases(),
                self._node_metadata(comp),
            )
            pods = self._agent_pods(pod_items)
            reports = self._reports(leases, now)
            node_labels = {n["metadata"]["name"]: n["metadata"].get("labels") or {} for n in nodes}
        managed = [p for p in parsed if isinstance(p, ProbePolicy) and p.managed]
        return Observation(
            now=now,
            checksum=checksum,
            daemon_set_exists=daemon_set is not None,
            rollout_complete=rollout_complete,
            agent_pods=pods,
            node_labels=node_labels,
            reports=reports,
            matched_pods=self._matched_pods(managed),
            reconcile_error=error,
            report_grace=datetime.timedelta(seconds=self.config.agent_report_grace_seconds),
        )

    async def _node_metadata(self, comp: Compilation) -> list[dict[str, Any]]:
        # Node labels matter only for policies with a node selector.
        if not any(p.node_selector for p in comp.policy_set.policies):
            return []
        return await self.kube.list(kube.NODES, metadata_only=True)

    @staticmethod
    def _agent_pods(items: list[dict[str, Any]]) -> list[AgentPod]:
        pods = []
        for pod in items:
            meta = pod["metadata"]
            node = _node_of(pod)
            if meta.get("deletionTimestamp") or not node:
                continue
            ready: dict[str, Any] = next(
                (
                    c
                    for c in (pod.get("status") or {}).get("conditions") or []
                    if c.get("type") == "Ready"
                ),
                {},
            )
            pods.append(
                AgentPod(
                    name=meta["name"],
                    node=node,
                    ready=ready.get("status") == ConditionStatus.TRUE
                    and (pod.get("status") or {}).get("phase") == "Running",
                    checksum=(meta.get("annotations") or {}).get(
                        constants.ANNOTATION_CONFIG_CHECKSUM, ""
                    ),
                    ready_since=_parse_time(ready.get("lastTransitionTime")),
                )
            )
        return sorted(pods, key=lambda p: p.node)

    async def _report_leases(self) -> list[dict[str, Any]]:
        return await self.kube.list(
            kube.LEASES,
            self.config.namespace,
            label_selector=f"{constants.LABEL_COMPONENT}={constants.COMPONENT_AGENT_REPORT}",
        )

    @staticmethod
    def _reports(leases: list[dict[str, Any]], now: datetime.datetime) -> dict[str, AgentReport]:
        reports: dict[str, AgentReport] = {}
        for lease in leases:
            spec = lease.get("spec") or {}
            if not lease_is_fresh(
                _parse_time(spec.get("renewTime")), spec.get("leaseDurationSeconds"), now
            ):
                continue
            raw = (lease["metadata"].get("annotations") or {}).get(
                constants.ANNOTATION_AGENT_REPORT
            )
            if not raw:
                continue
            try:
                report = AgentReport.model_validate_json(raw)
            except ValidationError as exc:
                log.warning(
                    "ignoring unreadable agent report %s: %s", lease["metadata"]["name"], exc
                )
                continue
            reports[report.node] = report
        return reports

    def _matched_pods(self, policies: Sequence[ProbePolicy]) -> dict[str, int]:
        """Matched-pod counts as last taken; a new count starts in the background when due.

        Counting lists pods, by far the biggest answer on a large cluster, and
        no watch says when app pods change. So counts are taken again only
        when the set of policies or a spec changed, or when they are
        resyncSeconds old; and never inside a run: a count under a busy API
        server can take seconds, and a run that waited for it would hold up
        the status of everything else (Ready after a rollout). A finished
        count that changed anything triggers a run that writes it.
        """
        key = frozenset((p.metadata.uid, p.metadata.generation) for p in policies)
        # Ages from the start of the run, the time the resync goes by, so
        # that every periodic run finds the counts due.
        run_started = self._busy_since if self._busy_since is not None else time.monotonic()
        last = self._counted_at
        fresh = last is not None and run_started - last < self.config.resync_seconds
        idle = self.counting is None or self.counting.done()
        if (key != self._counted_key or not fresh) and idle:
            self.counting = asyncio.create_task(
                self._recount(key, run_started, list(policies)), name="count-matched-pods"
            )
        return self._counts

    async def _recount(
        self, key: frozenset[tuple[str, int]], started: float, policies: list[ProbePolicy]
    ) -> None:
        try:
            counts = await self._count_matched_pods(policies)
        except KubeError as exc:
            # The old counts stay; the next run starts another count.
            log.warning("counting matched pods failed: %s", exc)
            return
        changed = counts != self._counts
        self._counted_key, self._counted_at, self._counts = key, started, counts
        if changed:
            self.trigger()

    async def stop(self) -> None:
        """Cancel a count in progress (operator shutdown)."""
        self.active = False
        if self.counting is not None:
            self.counting.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await self.counting

    async def _count_matched_pods(self, policies: Sequence[ProbePolicy]) -> dict[str, int]:
        if not policies:
            return {}
        namespaces = {
            n["metadata"]["name"]: n["metadata"].get("labels") or {}
            for n in await self.kube.list(kube.NAMESPACES, metadata_only=True)
        }
        # The API server filters by the pod selector, so a run reads only the
        # pods a policy could match; metadata only, since labels and the
        # namespace are all that matching needs. Policies with the same pod
        # selector share one list.
        by_selector: dict[str, list[dict[str, Any]]] = {}
        counts = {}
        for pol in policies:
            ns_sel: LabelSelector = pol.spec.namespace_selector
            selected = {name for name, labels in namespaces.items() if ns_sel.matches(labels)}
            query = pol.spec.pod_selector.to_query()
            if query is None or not selected:
                counts[pol.name] = 0
                continue
            if query not in by_selector:
                by_selector[query] = await self.kube.list(
                    kube.PODS,
                    label_selector=query or None,
                    field_selector="status.phase=Running",
                    metadata_only=True,
                )
            counts[pol.name] = sum(
                1
                for p in by_selector[query]
                if p["metadata"].get("namespace") in selected
                and not p["metadata"].get("deletionTimestamp")
            )
        return counts

    # -- status and events -----------------------------------------------------

    async def _write_statuses(
        self,
        bodies: Sequence[dict[str, Any]],
        parsed: Sequence[ProbePolicy | Unparseable],
        comp: Compilation,
        obs: Observation,
    ) -> None:
        writes = []
        for body, pol in zip(bodies, parsed, strict=True):
            if isinstance(pol, ProbePolicy) and not pol.managed:
                continue  # Unmanaged: status is left exactly as it is
            previous = pol.status if isinstance(pol, ProbePolicy) else _status_of(body)
            new = compute_status(comp.verdicts[pol.name], previous, obs)
            if new.to_api() != previous.to_api():
                writes.append(self._write_status(comp.verdicts[pol.name], previous, new, obs.now))
        # One round trip for all policies, not one after the other.
        await asyncio.gather(*writes)

    async def _write_status(
        self,
        verdict: Verdict,
        previous: ProbePolicyStatus,
        new: ProbePolicyStatus,
        now: datetime.datetime,
    ) -> None:
        try:
            await self.kube.patch_status(kube.PROBEPOLICIES, verdict.name, new.to_api())
        except KubeError as exc:
            if not exc.not_found:  # deleted meanwhile: nothing to report on
                log.error("writing the status of ProbePolicy %s failed: %s", verdict.name, exc)
            return
        for event in transition_events(previous.conditions, new.conditions):
            await self._post_event(verdict.name, verdict.uid, event, now)

    async def _post_event(
        self, name: str, uid: str, event: EventSpec, now: datetime.datetime
    ) -> None:
        stamp = now.strftime("%Y-%m-%dT%H:%M:%SZ")
        body = {
            "apiVersion": "v1",
            "kind": "Event",
            "metadata": {
                "generateName": f"{name}.",
                "namespace": self.config.events_namespace,
                "labels": {constants.LABEL_MANAGED_BY: constants.MANAGER},
            },
            "involvedObject": {
                "apiVersion": constants.API_VERSION,
                "kind": constants.KIND,
                "name": name,
                "uid": uid,
            },
            "type": event.type,
            "reason": event.reason,
            "message": event.message[:1024],
            "firstTimestamp": stamp,
            "lastTimestamp": stamp,
            "count": 1,
            "source": {"component": constants.MANAGER},
            "reportingComponent": f"{constants.GROUP}/operator",
            "reportingInstance": self._instance,
        }
        try:
            await self.kube.create(kube.EVENTS, body, self.config.events_namespace)
        except KubeError as exc:
            # Events are best effort; the condition already says it.
            log.warning("posting event %s for ProbePolicy %s failed: %s", event.reason, name, exc)


def _status_of(body: dict[str, Any]) -> ProbePolicyStatus:
    try:
        return ProbePolicyStatus.model_validate(body.get("status") or {})
    except ValidationError:
        return ProbePolicyStatus()
