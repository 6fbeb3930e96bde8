"""Leader election over a coordination.k8s.io Lease, the way client-go does it.

Replicas compete for one Lease in the operator namespace; the holder renews it
every ``retry_period``, the others take over once it has not changed for
``lease_duration`` (measured on their own clock from when they last saw it
change, so clock skew between nodes does not matter). A leader that cannot
renew within ``renew_deadline`` (< lease_duration) stops acting before anyone
else may start, and the process then exits so the kubelet restarts it as a
candidate.

Used instead of kopf peering: kopf attaches a finalizer to every object that
has a timer, and identical replicas with the same peering priority all pause.
"""

from __future__ import annotations

import asyncio
import datetime
import logging
import time
from collections.abc import Awaitable, Callable
from typing import Any

from flowprobe.api.conditions import now_utc
from flowprobe.controller import kube
from flowprobe.controller.config import LeaderElection
from flowprobe.controller.kube import Kube, KubeError

log = logging.getLogger(__name__)


def _micro_time(ts: datetime.datetime) -> str:
    return ts.astimezone(datetime.UTC).strftime("%Y-%m-%dT%H:%M:%S.%fZ")


class LeaderElector:
    def __init__(
        self,
        client: Kube,
        namespace: str,
        settings: LeaderElection,
        identity: str,
        on_change: Callable[[bool], None],
        *,
        clock: Callable[[], datetime.datetime] = now_utc,
        monotonic: Callable[[], float] = time.monotonic,
        sleep: Callable[[float], Awaitable[None]] = asyncio.sleep,
    ) -> None:
        self.kube = client
        self.namespace = namespace
        self.settings = settings
        self.identity = identity
        self._on_change = on_change
        self._clock = clock
        self._monotonic = monotonic
        self._sleep = sleep
        self.is_leader = False
        self._observed: tuple[Any, ...] | None = None
        self._observed_at = 0.0

    async def run(self) -> None:
        """Campaign, then renew; returns once leadership is lost (never while leading)."""
        retry = self.settings.retry_period_seconds
        last_renewal = 0.0
        while True:
            try:
                ok = await self.try_acquire_or_renew()
            except Exception:
                # Counted as a failed renewal: an elector that died while
                # leading would leave this replica acting after others take over.
                log.exception("leader election attempt failed")
                ok = False
            now = self._monotonic()
            if ok:
                last_renewal = now
                if not self.is_leader:
                    self.is_leader = True
                    log.info("became the leader (Lease %s/%s)", self.namespace, self.name)
                    self._on_change(True)
            elif self.is_leader and now - last_renewal > self.settings.renew_deadline_seconds:
                self.is_leader = False
                log.error(
                    "could not renew the leader Lease for %d s; stepping down",
                    self.settings.renew_deadline_seconds,
                )
                self._on_change(False)
                return
            await self._sleep(retry)

    @property
    def name(self) -> str:
        return self.settings.lease_name

    async def try_acquire_or_renew(self) -> bool:
        try:
            lease = await self.kube.get(kube.LEASES, self.name, self.namespace)
        except KubeError as exc:
            log.warning("reading the leader Lease failed: %s", exc)
            return False
        now = self._clock()
        spec_out = {
            "holderIdentity": self.identity,
            "leaseDurationSeconds": self.settings.lease_duration_seconds,
            "renewTime": _micro_time(now),
        }
        if lease is None:
            body = {
                "apiVersion": "coordination.k8s.io/v1",
                "kind": "Lease",
                "metadata": {"name": self.name, "namespace": self.namespace},
                "spec": {**spec_out, "acquireTime": _micro_time(now), "leaseTransitions": 0},
            }
            try:
                await self.kube.create(kube.LEASES, body, self.namespace)
            except KubeError as exc:
                if exc.status != 409:  # 409: another candidate was faster
                    log.warning("creating the leader Lease failed: %s", exc)
                return False
            return True

        spec = lease.get("spec") or {}
        holder = spec.get("holderIdentity") or ""
        record = (holder, spec.get("renewTime"), spec.get("leaseDurationSeconds"))
        if record != self._observed:
            self._observed, self._observed_at = record, self._monotonic()
        duration = spec.get("leaseDurationSeconds") or self.settings.lease_duration_seconds
        expired = self._monotonic() - self._observed_at > duration
        if holder and holder != self.identity and not expired:
            return False

        transitions = int(spec.get("leaseTransitions") or 0)
        taking_over = holder != self.identity
        lease["spec"] = {
            **spec,
            **spec_out,
            "acquireTime": _micro_time(now) if taking_over else spec.get("acquireTime"),
            "leaseTransitions": transitions + 1 if taking_over and holder else transitions,
        }
        try:
            # resourceVersion in the body: a concurrent writer makes this a 409.
            await self.kube.replace(kube.LEASES, lease, self.namespace)
        except KubeError as exc:
            if exc.status != 409:
                log.warning("updating the leader Lease failed: %s", exc)
            return False
        if taking_over:
            log.info("took over the leader Lease from %r", holder or "(released)")
        return True

    async def release(self) -> None:
        """Hand over at once on a clean shutdown instead of after lease_duration."""
        if not self.is_leader:
            return
        self.is_leader = False
        try:
            lease = await self.kube.get(kube.LEASES, self.name, self.namespace)
            if lease is None or (lease.get("spec") or {}).get("holderIdentity") != self.identity:
                return
            lease["spec"] = {
                **lease["spec"],
                "holderIdentity": "",
                "leaseDurationSeconds": 1,
                "renewTime": _micro_time(self._clock()),
            }
            await self.kube.replace(kube.LEASES, lease, self.namespace)
        except KubeError as exc:
            log.warning("releasing the leader Lease failed (others wait for it to expire): %s", exc)
