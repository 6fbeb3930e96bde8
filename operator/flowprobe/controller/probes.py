"""Liveness: served by kopf at --liveness (the chart uses http://0.0.0.0:8080/healthz)."""

from __future__ import annotations

from typing import Any

import kopf

from flowprobe.controller.startup import runtime


@kopf.on.probe(id="reconciler")
def reconciler_health(memo: kopf.Memo, **_: Any) -> dict[str, Any]:
    # Raises (HTTP 500) only when a run is stuck; API errors are not a
    # reason to restart, they show in policy status instead.
    rt = runtime(memo)
    if rt is None:
        return {"starting": True}
    leader = rt.elector.is_leader if rt.elector else None
    return {**rt.reconciler.health(), "leader": leader}
