"""Thin kopf handlers: parse what the event carries, then trigger a reconciler run.

All policies share one set of agent objects, so there is nothing per-policy
to create, update or delete: every handler is a trigger for the level-based
run in reconcile.py (docs/operator.md, "Reconcile design"). Event handlers
keep no state on the objects; kopf's create/update/delete handlers would add
annotations, and its timers a finalizer on every ProbePolicy, which is why
the periodic resync is a plain task (startup.py) instead.
"""

from __future__ import annotations

from typing import Any

import kopf

from flowprobe.api import constants
from flowprobe.api.v1alpha1 import ObjectMeta
from flowprobe.controller.startup import runtime

_AGENT_OBJECTS = {
    constants.LABEL_MANAGED_BY: constants.MANAGER,
    constants.LABEL_COMPONENT: constants.COMPONENT_AGENT,
}


@kopf.on.event(constants.GROUP, constants.VERSION, constants.PLURAL)
async def policy_event(event: kopf.RawEvent, memo: kopf.Memo, **_: Any) -> None:
    rt = runtime(memo)
    meta = ObjectMeta.model_validate(event["object"]["metadata"])
    if rt is not None and rt.reconciler.policy_changed(event["type"], meta.uid, meta.generation):
        rt.reconciler.trigger()


@kopf.on.event("apps/v1", "daemonsets", labels=_AGENT_OBJECTS)
@kopf.on.event("v1", "configmaps", labels=_AGENT_OBJECTS)
@kopf.on.event("v1", "serviceaccounts", labels=_AGENT_OBJECTS)
async def agent_object_event(
    event: kopf.RawEvent, resource: kopf.Resource, memo: kopf.Memo, **_: Any
) -> None:
    rt = runtime(memo)
    if rt is not None and rt.reconciler.child_changed(
        event["type"], resource.kind or "", dict(event["object"])
    ):
        rt.reconciler.trigger()
