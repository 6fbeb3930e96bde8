"""Observed state -> ProbePolicy status (conditions, counts, node notes) and Events.

Pure functions; reconcile.py gathers the ``Observation`` and writes the result.
Conditions:

- Ready: the policy is compiled into the agents' set and every agent that
  should apply it is ready and runs the current set (checksum on its pod).
- Degraded: the policy is applied, but something limits it: conflicting agent
  settings, a failed apply, agents that do not report, or agent-reported
  problems (no capture interface, TLS traffic).
- Expired: spec.timeLimit has passed; the agents stopped applying it.
"""

from __future__ import annotations

import datetime
from collections.abc import Sequence
from dataclasses import dataclass, field

from flowprobe.api import constants
from flowprobe.api.agentreport import AgentReport
from flowprobe.api.conditions import Condition, ConditionStatus, find_condition, set_condition
from flowprobe.api.v1alpha1 import (
    MAX_AGENT_INTERFACES,
    MAX_AGENT_STATUSES,
    MAX_NODE_NOTES,
    AgentStatus,
    NodeNote,
    NodeNoteType,
    ProbePolicyStatus,
    Reason,
)
from flowprobe.controller.compiler import Issue, Verdict

TRUE, FALSE = ConditionStatus.TRUE, ConditionStatus.FALSE

# Which problem names Degraded when there are several (most actionable first).
_DEGRADED_ORDER = [
    Reason.RECONCILE_FAILED,
    Reason.AGENT_SETTINGS_CONFLICT,
    Reason.CAPTURE_INTERFACE_MISSING,
    Reason.AGENTS_NOT_REPORTING,
    Reason.TLS_NOT_VISIBLE,
]
_NOTE_REASON = {
    NodeNoteType.CAPTURE_INTERFACE_MISSING: Reason.CAPTURE_INTERFACE_MISSING,
    NodeNoteType.TLS_NOT_VISIBLE: Reason.TLS_NOT_VISIBLE,
    NodeNoteType.AGENT_NOT_REPORTING: Reason.AGENTS_NOT_REPORTING,
}
_NOTE_SUMMARY = {
    NodeNoteType.CAPTURE_INTERFACE_MISSING: "no capture interface on",
    NodeNoteType.TLS_NOT_VISIBLE: "TLS traffic the agents cannot parse on",
    NodeNoteType.AGENT_NOT_REPORTING: "no report from the agents on",
}
# Ready=False reasons that need a human (Warning Events); the others are transient.
_WARNING_READY_REASONS = {
    Reason.INVALID_SPEC,
    Reason.NO_EXPORT_ENDPOINT,
    Reason.RECONCILE_FAILED,
    Reason.AGENTS_UNAVAILABLE,
    Reason.NO_AGENT_NODES,
}


@dataclass(frozen=True)
class AgentPod:
    name: str
    node: str
    ready: bool
    # flowprobe.io/config-checksum of the pod's template: which set it runs.
    checksum: str
    # When the pod last became Ready; the report grace period counts from here.
    ready_since: datetime.datetime | None = None


@dataclass(frozen=True)
class Observation:
    now: datetime.datetime
    checksum: str
    daemon_set_exists: bool = False
    # DaemonSet controller caught up with the spec and created every pod on
    # the current template (status.updatedNumberScheduled == desired).
    rollout_complete: bool = False
    agent_pods: Sequence[AgentPod] = ()
    # Labels of nodes running agents; needed only when a policy has a node selector.
    node_labels: dict[str, dict[str, str]] = field(default_factory=dict)
    # Fresh reports only, by node.
    reports: dict[str, AgentReport] = field(default_factory=dict)
    matched_pods: dict[str, int] = field(default_factory=dict)
    # Why the last apply of the agent objects failed, if it did.
    reconcile_error: str | None = None
    report_grace: datetime.timedelta = datetime.timedelta(seconds=60)


@dataclass(frozen=True)
class EventSpec:
    type: str  # Normal | Warning
    reason: str
    message: str


def _fmt(ts: datetime.datetime) -> str:
    return ts.astimezone(datetime.UTC).strftime("%Y-%m-%dT%H:%M:%SZ")


def compute_status(
    verdict: Verdict, previous: ProbePolicyStatus, obs: Observation
) -> ProbePolicyStatus:
    gen = verdict.generation
    conds: list[Condition] = list(previous.conditions)

    def put(type_: str, status: ConditionStatus, reason: Reason, message: str) -> None:
        nonlocal conds
        conds = set_condition(
            conds, type_, status, reason, message, observed_generation=gen, now=obs.now
        )

    desired = ready = 0
    notes: list[NodeNote] = []
    agents: list[AgentStatus] = []
    if verdict.errors:
        first = verdict.errors[0]
        put(constants.CONDITION_READY, FALSE, first.reason, _join(verdict.errors))
        put(
            constants.CONDITION_DEGRADED,
            FALSE,
            first.reason,
            "not applied, so not degraded: see the Ready condition",
        )
    elif verdict.expired or verdict.compiled is None:
        ends = _fmt(verdict.ends_at) if verdict.ends_at else "its time limit"
        put(
            constants.CONDITION_READY,
            FALSE,
            Reason.EXPIRED,
            f"capture stopped at {ends} (spec.timeLimit); extend the limit or delete the policy",
        )
        put(constants.CONDITION_DEGRADED, FALSE, Reason.EXPIRED, "not capturing: expired")
    else:
        compiled = verdict.compiled
        pods = [
            p for p in obs.agent_pods if compiled.applies_to_node(obs.node_labels.get(p.node, {}))
        ]
        desired = len(pods)
        current = [p for p in pods if p.ready and p.checksum == obs.checksum]
        ready = len(current)
        put(constants.CONDITION_READY, *_readiness(obs, desired, ready, pods))
        issues = list(verdict.warnings)
        if obs.reconcile_error:
            issues.append(Issue(Reason.RECONCILE_FAILED, obs.reconcile_error))
        notes = _node_notes(verdict.name, current, obs)
        agents = _agents(verdict.name, pods, obs)
        issues += _note_issues(notes)
        if issues:
            issues.sort(key=lambda i: _DEGRADED_ORDER.index(i.reason))
            put(constants.CONDITION_DEGRADED, TRUE, issues[0].reason, _join(issues))
        else:
            put(
                constants.CONDITION_DEGRADED,
                FALSE,
                Reason.AS_EXPECTED,
                f"no problems reported by {ready} agent(s)",
            )

    if verdict.expired:
        assert verdict.ends_at is not None
        put(
            constants.CONDITION_EXPIRED,
            TRUE,
            Reason.END_TIME_REACHED,
            f"spec.timeLimit passed at {_fmt(verdict.ends_at)}; the agents stopped applying it",
        )
    elif verdict.ends_at is not None:
        put(
            constants.CONDITION_EXPIRED,
            FALSE,
            Reason.WITHIN_TIME_LIMIT,
            f"capture stops at {_fmt(verdict.ends_at)}",
        )
    else:
        put(constants.CONDITION_EXPIRED, FALSE, Reason.NO_TIME_LIMIT, "spec.timeLimit is not set")

    return ProbePolicyStatus(
        observed_generation=gen,
        conditions=conds,
        nodes_desired=desired,
        nodes_ready=ready,
        nodes=f"{ready}/{desired}",
        matched_pods=obs.matched_pods.get(verdict.name, 0),
        expires_at=verdict.ends_at,
        node_notes=notes[:MAX_NODE_NOTES],
        agents=agents[:MAX_AGENT_STATUSES],
        exchanges_per_second=sum(a.exchanges_per_second for a in agents),
        capture_drops=sum(a.capture_drops for a in agents),
    )


def _readiness(
    obs: Observation, desired: int, ready: int, pods: Sequence[AgentPod]
) -> tuple[ConditionStatus, Reason, str]:
    if obs.reconcile_error and not obs.daemon_set_exists:
        return (
            FALSE,
            Reason.RECONCILE_FAILED,
            f"the agent DaemonSet could not be created: {obs.reconcile_error}",
        )
    # Only a finished rollout says that the pods seen are all there will be:
    # while the DaemonSet controller is still creating them, the first few
    # may all be ready.
    if obs.rollout_complete and desired and ready == desired:
        return TRUE, Reason.AGENTS_READY, f"{ready}/{desired} agents apply the current policy set"
    if not obs.rollout_complete or any(p.checksum != obs.checksum for p in pods):
        return (
            FALSE,
            Reason.AGENTS_PROGRESSING,
            f"{ready}/{desired} agents apply the current policy set; the rollout is in progress",
        )
    if not desired:
        return (
            FALSE,
            Reason.NO_AGENT_NODES,
            "no agent runs on a node where this policy applies: check spec.agent.nodeSelector, "
            "spec.agent.tolerations and the nodes' taints",
        )
    return (
        FALSE,
        Reason.AGENTS_UNAVAILABLE,
        f"{ready}/{desired} agents ready; see `kubectl get pods -l "
        f"{constants.LABEL_COMPONENT}={constants.COMPONENT_AGENT}` in the operator namespace",
    )


def _node_notes(policy: str, current: Sequence[AgentPod], obs: Observation) -> list[NodeNote]:
    notes: list[NodeNote] = []
    for pod in current:
        report = obs.reports.get(pod.node)
        if report is None:
            since = pod.ready_since or obs.now
            if obs.now - since >= obs.report_grace:
                notes.append(
                    NodeNote(
                        node=pod.node,
                        type=NodeNoteType.AGENT_NOT_REPORTING,
                        message=f"agent {pod.name} is ready but has not reported since "
                        f"{_fmt(since)} (Lease in the operator namespace)",
                    )
                )
            continue
        for note in report.notes:
            if note.policy in (None, policy):
                notes.append(NodeNote(node=pod.node, type=note.type, message=note.message[:1024]))
    notes.sort(key=lambda n: (n.node, n.type, n.message))
    return notes


def _agents(policy: str, pods: Sequence[AgentPod], obs: Observation) -> list[AgentStatus]:
    """The fresh reports of the nodes where the policy applies, by node name."""
    out = []
    for node in sorted({p.node for p in pods}):
        report = obs.reports.get(node)
        if report is None:
            continue
        out.append(
            AgentStatus(
                node=node,
                ready=report.ready,
                interfaces=[i[:64] for i in report.interfaces[:MAX_AGENT_INTERFACES]],
                exchanges_per_second=round(report.policy_exchanges_per_second.get(policy, 0.0)),
                capture_drops=max(0, report.capture_drops),
            )
        )
    return out


def _note_issues(notes: Sequence[NodeNote]) -> list[Issue]:
    issues = []
    for note_type in NodeNoteType:
        nodes = sorted({n.node for n in notes if n.type == note_type})
        if nodes:
            shown = ", ".join(nodes[:5]) + (f" and {len(nodes) - 5} more" if len(nodes) > 5 else "")
            issues.append(Issue(_NOTE_REASON[note_type], f"{_NOTE_SUMMARY[note_type]} {shown}"))
    return issues


def _join(issues: Sequence[Issue]) -> str:
    return "; ".join(i.message for i in issues)


def transition_events(old: Sequence[Condition], new: Sequence[Condition]) -> list[EventSpec]:
    """Events for condition changes worth telling a human about (not every re-check)."""
    events: list[EventSpec] = []
    for cond in new:
        before = find_condition(old, cond.type)
        if before is not None and (before.status, before.reason) == (cond.status, cond.reason):
            continue
        if cond.type == constants.CONDITION_READY:
            warn = cond.status != TRUE and cond.reason in _WARNING_READY_REASONS
            events.append(EventSpec("Warning" if warn else "Normal", cond.reason, cond.message))
        elif cond.type == constants.CONDITION_DEGRADED:
            if cond.status == TRUE:
                events.append(EventSpec("Warning", cond.reason, cond.message))
            elif before is not None and before.status == TRUE:
                events.append(EventSpec("Normal", cond.reason, cond.message))
        elif cond.type == constants.CONDITION_EXPIRED and cond.status == TRUE:
            events.append(EventSpec("Normal", cond.reason, cond.message))
    return events
