"""Leader election over a Lease, against the in-memory API."""

from __future__ import annotations

import copy
import datetime
from typing import Any

import pytest
from pydantic import ValidationError

from flowprobe.controller import kube
from flowprobe.controller.config import LeaderElection
from flowprobe.controller.leader import LeaderElector
from tests.operator.support import NOW, sync
from tests.operator.test_reconcile import FakeKube

NS = "flowprobe-system"
SETTINGS = LeaderElection(lease_name="op")


class Clock:
    def __init__(self) -> None:
        self.mono = 1000.0

    def wall(self) -> datetime.datetime:
        return NOW + datetime.timedelta(seconds=self.mono)

    def advance(self, seconds: float) -> None:
        self.mono += seconds


def _elector(api: FakeKube, clock: Clock, identity: str, changes: list[bool]) -> LeaderElector:
    return LeaderElector(
        api,
        NS,
        SETTINGS,
        identity,
        changes.append,
        clock=clock.wall,
        monotonic=lambda: clock.mono,
    )


def _holder(api: FakeKube) -> str:
    holder: str = api.objects[("leases", NS, "op")]["spec"]["holderIdentity"]
    return holder


@sync
async def test_first_candidate_creates_the_lease_and_renews_it() -> None:
    api, clock = FakeKube(), Clock()
    a = _elector(api, clock, "a", [])
    assert await a.try_acquire_or_renew()
    assert _holder(api) == "a"
    before = api.objects[("leases", NS, "op")]["spec"]["renewTime"]
    clock.advance(2)
    assert await a.try_acquire_or_renew()
    spec = api.objects[("leases", NS, "op")]["spec"]
    assert spec["renewTime"] != before and spec["leaseTransitions"] == 0


@sync
async def test_a_live_leader_keeps_others_out_until_it_goes_silent() -> None:
    api, clock = FakeKube(), Clock()
    a, b = _elector(api, clock, "a", []), _elector(api, clock, "b", [])
    assert await a.try_acquire_or_renew()
    assert not await b.try_acquire_or_renew()
    for _ in range(10):  # a keeps renewing: b never gets in
        clock.advance(2)
        assert await a.try_acquire_or_renew()
        assert not await b.try_acquire_or_renew()
    clock.advance(SETTINGS.lease_duration_seconds - 1)
    assert not await b.try_acquire_or_renew()  # not yet expired from b's point of view
    clock.advance(2)
    assert await b.try_acquire_or_renew()
    assert _holder(api) == "b"
    assert api.objects[("leases", NS, "op")]["spec"]["leaseTransitions"] == 1


@sync
async def test_release_hands_over_immediately() -> None:
    api, clock = FakeKube(), Clock()
    a, b = _elector(api, clock, "a", []), _elector(api, clock, "b", [])
    assert await a.try_acquire_or_renew()
    a.is_leader = True
    assert not await b.try_acquire_or_renew()
    await a.release()
    assert await b.try_acquire_or_renew()


@sync
async def test_racing_candidates_conflict_instead_of_both_winning() -> None:
    api, clock = FakeKube(), Clock()
    a, b = _elector(api, clock, "a", []), _elector(api, clock, "b", [])
    assert await a.try_acquire_or_renew()
    a.is_leader = True
    await a.release()
    # Both read the released Lease before either writes.
    snapshot = copy.deepcopy(api.objects[("leases", NS, "op")])

    async def stale_get(res: kube.Resource, name: str, namespace: str | None = None) -> Any:
        return copy.deepcopy(snapshot)

    api_get = api.get
    api.get = stale_get  # type: ignore[method-assign]
    try:
        assert await b.try_acquire_or_renew()
        assert not await a.try_acquire_or_renew()  # 409 on the stale resourceVersion
    finally:
        api.get = api_get  # type: ignore[method-assign]
    assert _holder(api) == "b"


@sync
async def test_a_leader_that_cannot_renew_steps_down_before_the_lease_expires() -> None:
    api, clock = FakeKube(), Clock()
    changes: list[bool] = []

    async def no_sleep(_: float) -> None:
        clock.advance(SETTINGS.retry_period_seconds)
        if len(changes) == 1:  # leading: from now on the API is unreachable
            api.fail[("get", "leases")] = kube.KubeError("GET", "leases", 0, "connection refused")

    a = LeaderElector(
        api,
        NS,
        SETTINGS,
        "a",
        changes.append,
        clock=clock.wall,
        monotonic=lambda: clock.mono,
        sleep=no_sleep,
    )
    await a.run()
    assert changes == [True, False]
    assert not a.is_leader
    # It gave up within renewDeadline, i.e. before others could take over.
    assert SETTINGS.renew_deadline_seconds < SETTINGS.lease_duration_seconds


def test_timings_must_leave_a_gap() -> None:
    with pytest.raises(ValidationError, match="retryPeriodSeconds < renewDeadlineSeconds"):
        LeaderElection(lease_duration_seconds=10, renew_deadline_seconds=10)
