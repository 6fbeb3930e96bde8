"""Status conditions with the semantics of ``apimeta.SetStatusCondition``.

A condition list is a map keyed by ``type``. Setting a condition replaces its
reason, message and observedGeneration, but ``lastTransitionTime`` moves only
when ``status`` flips, so "Ready since" stays meaningful across re-reconciles.
"""

from __future__ import annotations

import datetime
from collections.abc import Sequence
from enum import StrEnum
from typing import Annotated

from pydantic import BaseModel, ConfigDict, Field
from pydantic.alias_generators import to_camel

# Same bounds as metav1.Condition, so a status the API server would refuse
# never leaves the operator.
_REASON_PATTERN = r"^[A-Za-z]([A-Za-z0-9_,:]*[A-Za-z0-9_])?$"
MAX_MESSAGE = 32768


class ConditionStatus(StrEnum):
    TRUE = "True"
    FALSE = "False"
    UNKNOWN = "Unknown"


class Condition(BaseModel):
    model_config = ConfigDict(
        alias_generator=to_camel, populate_by_name=True, extra="forbid", frozen=True
    )

    type: Annotated[str, Field(min_length=1, max_length=316)]
    status: ConditionStatus
    reason: Annotated[str, Field(min_length=1, max_length=1024, pattern=_REASON_PATTERN)]
    message: Annotated[str, Field(max_length=MAX_MESSAGE)] = ""
    observed_generation: Annotated[int, Field(ge=0)] | None = None
    last_transition_time: datetime.datetime


def now_utc() -> datetime.datetime:
    """Current time at the API's precision (RFC 3339 seconds)."""
    return datetime.datetime.now(datetime.UTC).replace(microsecond=0)


def find_condition(conditions: Sequence[Condition], type_: str) -> Condition | None:
    return next((c for c in conditions if c.type == type_), None)


def set_condition(
    conditions: Sequence[Condition],
    type_: str,
    status: ConditionStatus,
    reason: str,
    message: str = "",
    *,
    observed_generation: int | None = None,
    now: datetime.datetime | None = None,
) -> list[Condition]:
    """Return ``conditions`` with ``type_`` set; the input is not modified.

    A new condition gets ``now`` as its transition time; an existing one keeps
    its transition time unless the status changes. Order is preserved and a
    new type is appended, so repeated reconciles give byte-identical output.
    """
    if len(message) > MAX_MESSAGE:
        message = message[: MAX_MESSAGE - 3] + "..."
    old = find_condition(conditions, type_)
    transition = now or now_utc()
    if old is not None and old.status == status:
        transition = old.last_transition_time
    new = Condition(
        type=type_,
        status=status,
        reason=reason,
        message=message,
        observed_generation=observed_generation,
        last_transition_time=transition,
    )
    if old is None:
        return [*conditions, new]
    return [new if c.type == type_ else c for c in conditions]


def is_true(conditions: Sequence[Condition], type_: str) -> bool:
    found = find_condition(conditions, type_)
    return found is not None and found.status == ConditionStatus.TRUE
