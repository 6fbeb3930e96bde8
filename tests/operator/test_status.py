"""compute_status() and transition_events(): conditions from observed state."""

from __future__ import annotations

import datetime
from typing import Any

from flowprobe.api.agentreport import AgentNote, AgentReport
from flowprobe.api.conditions import find_condition
from flowprobe.api.v1alpha1 import NodeNoteType, ProbePolicyStatus
from flowprobe.controller.compiler import Verdict, compile_policies, parse_policy
from flowprobe.controller.status import AgentPod, Observation, compute_status, transition_events
from tests.operator.support import NOW, make_config, policy_body

LONG_AGO = NOW - datetime.timedelta(hours=1)


def _verdict(spec: dict[str, Any] | None = None, **config: Any) -> tuple[Verdict, str]:
    comp = compile_policies(
        [parse_policy(policy_body("web", spec))], make_config(**config), previous=None, now=NOW
    )
    return comp.verdicts["web"], comp.policy_set.checksum()


def _pods(checksum: str, *nodes: str, ready: bool = True) -> list[AgentPod]:
    return [
        AgentPod(name=f"agent-{n}", node=n, ready=ready, checksum=checksum, ready_since=LONG_AGO)
        for n in nodes
    ]


def _reports(*nodes: str, notes: list[AgentNote] | None = None) -> dict[str, AgentReport]:
    return {n: AgentReport(node=n, notes=notes or []) for n in nodes}


def _rolled_out(checksum: str, *nodes: str, **fields: Any) -> Observation:
    """The DaemonSet rolled out: a ready agent on the current set per node, each reporting.

    ``fields`` override or add Observation fields.
    """
    return Observation(
        **{
            "now": NOW,
            "checksum": checksum,
            "daemon_set_exists": True,
            "rollout_complete": True,
            "agent_pods": _pods(checksum, *nodes),
            "reports": _reports(*nodes),
            **fields,
        }
    )


def _cond(status: ProbePolicyStatus, type_: str) -> tuple[str, str, str]:
    c = find_condition(status.conditions, type_)
    assert c is not None
    return c.status, c.reason, c.message


def test_all_agents_current_means_ready() -> None:
    verdict, checksum = _verdict()
    obs = _rolled_out(checksum, "n1", "n2", matched_pods={"web": 7})
    st = compute_status(verdict, ProbePolicyStatus(), obs)
    assert _cond(st, "Ready")[:2] == ("True", "AgentsReady")
    assert _cond(st, "Degraded")[:2] == ("False", "AsExpected")
    assert _cond(st, "Expired")[:2] == ("False", "NoTimeLimit")
    assert (st.nodes_desired, st.nodes_ready, st.nodes, st.matched_pods) == (2, 2, "2/2", 7)
    assert st.observed_generation == 1
    assert [c.type for c in st.conditions] == ["Ready", "Degraded", "Expired"]


def test_agents_on_an_old_checksum_are_progressing() -> None:
    verdict, checksum = _verdict()
    obs = _rolled_out(
        checksum,
        "n1",
        "n2",
        rollout_complete=False,
        agent_pods=_pods(checksum, "n1") + _pods("old", "n2"),
    )
    st = compute_status(verdict, ProbePolicyStatus(), obs)
    status, reason, message = _cond(st, "Ready")
    assert (status, reason) == ("False", "AgentsProgressing") and message.startswith("1/2")


def test_no_agent_pods_yet_versus_no_nodes_at_all() -> None:
    verdict, checksum = _verdict()
    starting = Observation(now=NOW, checksum=checksum, daemon_set_exists=True)
    assert _cond(compute_status(verdict, ProbePolicyStatus(), starting), "Ready")[1] == (
        "AgentsProgressing"
    )
    settled = Observation(now=NOW, checksum=checksum, daemon_set_exists=True, rollout_complete=True)
    status, reason, message = _cond(compute_status(verdict, ProbePolicyStatus(), settled), "Ready")
    assert (status, reason) == ("False", "NoAgentNodes") and "nodeSelector" in message


def test_unready_agents_after_the_rollout_are_unavailable() -> None:
    verdict, checksum = _verdict()
    obs = _rolled_out(
        checksum,
        "n1",
        agent_pods=_pods(checksum, "n1") + _pods(checksum, "n2", ready=False),
    )
    assert _cond(compute_status(verdict, ProbePolicyStatus(), obs), "Ready")[:2] == (
        "False",
        "AgentsUnavailable",
    )


def test_invalid_policy_says_why() -> None:
    verdict, checksum = _verdict(
        {"namespaceSelector": {}, "redaction": {"patterns": [{"name": "p", "regex": "("}]}}
    )
    st = compute_status(verdict, ProbePolicyStatus(), Observation(now=NOW, checksum=checksum))
    status, reason, message = _cond(st, "Ready")
    assert (status, reason) == ("False", "InvalidSpec")
    assert "spec.redaction.patterns[p].regex" in message
    assert _cond(st, "Degraded")[:2] == ("False", "InvalidSpec")
    assert st.nodes == "0/0"


def test_expired_policy() -> None:
    verdict, checksum = _verdict(
        {"namespaceSelector": {}, "timeLimit": {"endTime": "2025-12-31T23:00:00Z"}}
    )
    st = compute_status(verdict, ProbePolicyStatus(), Observation(now=NOW, checksum=checksum))
    assert _cond(st, "Ready")[:2] == ("False", "Expired")
    status, reason, message = _cond(st, "Expired")
    assert (status, reason) == ("True", "EndTimeReached") and "2025-12-31T23:00:00Z" in message
    assert st.expires_at == datetime.datetime(2025, 12, 31, 23, tzinfo=datetime.UTC)


def test_time_limit_in_the_future() -> None:
    verdict, checksum = _verdict({"namespaceSelector": {}, "timeLimit": {"durationSeconds": 3600}})
    st = compute_status(verdict, ProbePolicyStatus(), Observation(now=NOW, checksum=checksum))
    assert _cond(st, "Expired") == (
        "False",
        "WithinTimeLimit",
        "capture stops at 2026-01-01T01:00:00Z",
    )


def test_silent_agents_degrade_after_the_grace_period_only() -> None:
    verdict, checksum = _verdict()
    fresh = AgentPod(name="agent-n2", node="n2", ready=True, checksum=checksum, ready_since=NOW)
    obs = _rolled_out(checksum, agent_pods=[*_pods(checksum, "n1"), fresh])
    st = compute_status(verdict, ProbePolicyStatus(), obs)
    assert _cond(st, "Ready")[0] == "True"  # not reporting is degraded, not unready
    assert _cond(st, "Degraded")[:2] == ("True", "AgentsNotReporting")
    (note,) = st.node_notes
    assert (note.node, note.type) == ("n1", NodeNoteType.AGENT_NOT_REPORTING)


def test_agent_notes_for_this_policy_or_the_node_are_shown() -> None:
    verdict, checksum = _verdict()
    notes = [
        AgentNote(type=NodeNoteType.TLS_NOT_VISIBLE, message="443 is TLS", policy="web"),
        AgentNote(type=NodeNoteType.TLS_NOT_VISIBLE, message="other", policy="other"),
        AgentNote(type=NodeNoteType.CAPTURE_INTERFACE_MISSING, message="no cni0"),
    ]
    obs = _rolled_out(checksum, "n1", reports=_reports("n1", notes=notes))
    st = compute_status(verdict, ProbePolicyStatus(), obs)
    assert [(n.type, n.message) for n in st.node_notes] == [
        (NodeNoteType.CAPTURE_INTERFACE_MISSING, "no cni0"),
        (NodeNoteType.TLS_NOT_VISIBLE, "443 is TLS"),
    ]
    status, reason, message = _cond(st, "Degraded")
    assert (status, reason) == ("True", "CaptureInterfaceMissing")
    assert "TLS traffic the agents cannot parse on n1" in message


def test_failed_apply_degrades_a_running_policy_and_blocks_a_new_one() -> None:
    verdict, checksum = _verdict()
    running = _rolled_out(checksum, "n1", reconcile_error="PATCH ... forbidden")
    st = compute_status(verdict, ProbePolicyStatus(), running)
    assert _cond(st, "Degraded")[:2] == ("True", "ReconcileFailed")
    new = Observation(now=NOW, checksum=checksum, reconcile_error="forbidden")
    assert _cond(compute_status(verdict, ProbePolicyStatus(), new), "Ready")[:2] == (
        "False",
        "ReconcileFailed",
    )


def test_node_selector_limits_the_counted_agents() -> None:
    verdict, checksum = _verdict(
        {"namespaceSelector": {}, "agent": {"nodeSelector": {"pool": "a"}}}
    )
    obs = _rolled_out(
        checksum,
        "n1",
        "n2",
        "n3",
        node_labels={"n1": {"pool": "a"}, "n2": {"pool": "b"}, "n3": {"pool": "a"}},
    )
    st = compute_status(verdict, ProbePolicyStatus(), obs)
    assert st.nodes == "2/2"


def test_recomputing_keeps_transition_times_and_emits_no_events() -> None:
    verdict, checksum = _verdict()
    obs = _rolled_out(checksum, "n1")
    first = compute_status(verdict, ProbePolicyStatus(), obs)
    later = Observation(**{**obs.__dict__, "now": NOW + datetime.timedelta(minutes=10)})
    second = compute_status(verdict, first, later)
    assert second == first
    assert transition_events(first.conditions, second.conditions) == []


def test_events_on_transitions() -> None:
    verdict, checksum = _verdict()
    progressing = Observation(now=NOW, checksum=checksum, daemon_set_exists=True)
    first = compute_status(verdict, ProbePolicyStatus(), progressing)
    events = transition_events([], first.conditions)
    assert [(e.type, e.reason) for e in events] == [("Normal", "AgentsProgressing")]
    ready = _rolled_out(checksum, "n1")
    second = compute_status(verdict, first, ready)
    assert [(e.type, e.reason) for e in transition_events(first.conditions, second.conditions)] == [
        ("Normal", "AgentsReady")
    ]
    bad, _ = _verdict(
        {"namespaceSelector": {}, "redaction": {"patterns": [{"name": "p", "regex": "["}]}}
    )
    third = compute_status(bad, second, ready)
    kinds = [(e.type, e.reason) for e in transition_events(second.conditions, third.conditions)]
    assert ("Warning", "InvalidSpec") in kinds


def test_agent_reports_are_shown_per_node_with_this_policys_rate() -> None:
    verdict, checksum = _verdict()
    reports = {
        "n1": AgentReport(
            node="n1",
            ready=True,
            interfaces=["any"],
            exchanges_per_second=40.0,
            capture_drops=3,
            policy_exchanges_per_second={"web": 12.6, "other": 27.4},
        ),
        "n2": AgentReport(node="n2", ready=False),
    }
    # n3 has not reported: no entry (AgentNotReporting covers it after the grace).
    obs = _rolled_out(checksum, "n2", "n1", "n3", reports=reports)
    st = compute_status(verdict, ProbePolicyStatus(), obs)
    assert [(a.node, a.ready, a.interfaces, a.exchanges_per_second) for a in st.agents] == [
        ("n1", True, ["any"], 13),
        ("n2", False, [], 0),
    ]
    assert (st.exchanges_per_second, st.capture_drops) == (13, 3)
    api = st.to_api()
    assert api["agents"][0] == {
        "node": "n1",
        "ready": True,
        "interfaces": ["any"],
        "exchangesPerSecond": 13,
        "captureDrops": 3,
    }
    assert api["exchangesPerSecond"] == 13
