"""set_condition() follows apimeta.SetStatusCondition."""

from __future__ import annotations

import datetime

from flowprobe.api.conditions import (
    Condition,
    ConditionStatus,
    find_condition,
    is_true,
    set_condition,
)

T0 = datetime.datetime(2026, 1, 1, tzinfo=datetime.UTC)
T1 = T0 + datetime.timedelta(minutes=5)
TRUE, FALSE = ConditionStatus.TRUE, ConditionStatus.FALSE


def test_new_condition_is_appended_with_now() -> None:
    conds = set_condition([], "Ready", FALSE, "AgentsProgressing", "0/2", now=T0)
    assert conds == [
        Condition(
            type="Ready",
            status=FALSE,
            reason="AgentsProgressing",
            message="0/2",
            last_transition_time=T0,
        )
    ]


def test_same_status_keeps_transition_time_but_updates_the_rest() -> None:
    conds = set_condition([], "Ready", FALSE, "AgentsProgressing", "0/2", now=T0)
    conds = set_condition(
        conds, "Ready", FALSE, "AgentsUnavailable", "1/2", observed_generation=3, now=T1
    )
    (ready,) = conds
    assert ready.last_transition_time == T0
    assert (ready.reason, ready.message, ready.observed_generation) == (
        "AgentsUnavailable",
        "1/2",
        3,
    )


def test_status_flip_moves_transition_time() -> None:
    conds = set_condition([], "Ready", FALSE, "AgentsProgressing", now=T0)
    conds = set_condition(conds, "Ready", TRUE, "AgentsReady", now=T1)
    assert conds[0].last_transition_time == T1
    assert is_true(conds, "Ready")


def test_other_conditions_and_order_are_untouched() -> None:
    conds = set_condition([], "Ready", TRUE, "AgentsReady", now=T0)
    conds = set_condition(conds, "Degraded", FALSE, "AsExpected", now=T0)
    before = list(conds)
    conds = set_condition(conds, "Ready", FALSE, "AgentsUnavailable", now=T1)
    assert [c.type for c in conds] == ["Ready", "Degraded"]
    assert conds[1] is before[1]
    assert before[0].status == TRUE  # the input list is not modified


def test_repeated_identical_sets_are_stable() -> None:
    conds = set_condition([], "Expired", FALSE, "NoTimeLimit", "x", now=T0)
    again = set_condition(conds, "Expired", FALSE, "NoTimeLimit", "x", now=T1)
    assert again == conds


def test_find_and_is_true_on_missing_type() -> None:
    assert find_condition([], "Ready") is None
    assert not is_true([], "Ready")


def test_huge_messages_are_cut_to_the_api_limit() -> None:
    (cond,) = set_condition([], "Ready", FALSE, "InvalidSpec", "x" * 40000, now=T0)
    assert len(cond.message) == 32768 and cond.message.endswith("...")


def test_serialises_like_metav1_condition() -> None:
    (cond,) = set_condition([], "Ready", TRUE, "AgentsReady", "ok", observed_generation=2, now=T0)
    assert cond.model_dump(mode="json", by_alias=True) == {
        "type": "Ready",
        "status": "True",
        "reason": "AgentsReady",
        "message": "ok",
        "observedGeneration": 2,
        "lastTransitionTime": "2026-01-01T00:00:00Z",
    }
