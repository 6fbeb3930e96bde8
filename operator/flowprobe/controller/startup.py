"""Operator start and stop: kopf settings, configuration, API client, leadership.

Run as ``kopf run -m flowprobe.controller --namespace=<ns> --standalone``
(the chart's Deployment does; docs/operator.md explains every flag).
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import os
import signal
import socket
import uuid
from dataclasses import dataclass, field
from typing import Any

import kopf

from flowprobe.api import constants
from flowprobe.controller.config import OperatorConfig, load_config
from flowprobe.controller.kube import Kube
from flowprobe.controller.leader import LeaderElector
from flowprobe.controller.reconcile import Reconciler

log = logging.getLogger(__name__)

_MEMO_KEY = "runtime"
# How often the resync loop asks for a run; the reconciler turns this into at
# most one run per resyncSeconds (sooner when a policy's time limit passes).
RESYNC_TICK_SECONDS = 5.0


@dataclass
class Runtime:
    config: OperatorConfig
    kube: Kube
    reconciler: Reconciler
    elector: LeaderElector | None = None
    tasks: list[asyncio.Task[None]] = field(default_factory=list)


def runtime(memo: kopf.Memo) -> Runtime | None:
    """The process state built at startup (None while starting)."""
    value = memo.get(_MEMO_KEY)
    return value if isinstance(value, Runtime) else None


@kopf.on.startup()
async def startup(
    settings: kopf.OperatorSettings, memo: kopf.Memo, logger: kopf.Logger, **_: Any
) -> None:
    # Our handlers keep no per-object state; if kopf ever writes any, it goes
    # under our prefix instead of kopf.zalando.org, and into annotations
    # because status has a strict schema.
    settings.persistence.progress_storage = kopf.AnnotationsProgressStorage(
        prefix=constants.KOPF_PREFIX
    )
    settings.persistence.diffbase_storage = kopf.AnnotationsDiffBaseStorage(
        prefix=constants.KOPF_PREFIX, key="last-handled-configuration"
    )
    settings.persistence.finalizer = f"{constants.GROUP}/finalizer"
    # The reconciler posts Events about policy conditions itself; kopf's
    # per-handler events would attach to whichever policy triggered a run.
    settings.posting.enabled = False
    # No watching of CRDs and namespaces: the CRD is installed before the
    # operator starts (Helm crds/), and --namespace names one namespace.
    # This saves cluster-wide list/watch permissions on both.
    settings.scanning.disabled = True
    # Bounded watch requests so that a silently dead connection is noticed.
    settings.watching.server_timeout = 300
    settings.watching.client_timeout = 330
    settings.watching.connect_timeout = 30
    # kopf logs every successful handler run at INFO (one line per watch
    # event); failures are still logged as errors.
    logging.getLogger("kopf.objects").setLevel(logging.WARNING)

    config = load_config()
    client = await Kube.connect()
    reconciler = Reconciler(client, config)
    rt = Runtime(config=config, kube=client, reconciler=reconciler)
    if config.leader_election.enabled:
        identity = f"{socket.gethostname()}_{uuid.uuid4().hex[:8]}"
        rt.elector = LeaderElector(
            client,
            config.namespace,
            config.leader_election,
            identity,
            on_change=lambda leading: _leadership_changed(rt, leading),
        )
        rt.tasks.append(asyncio.create_task(rt.elector.run(), name="leader-election"))
    else:
        _leadership_changed(rt, True)
    rt.tasks.append(asyncio.create_task(reconciler.serve_triggers(), name="triggers"))
    rt.tasks.append(asyncio.create_task(_resync_forever(rt), name="resync"))
    memo[_MEMO_KEY] = rt
    logger.info(
        "flowprobe operator starting: namespace=%s agent=%s leader election=%s",
        config.namespace,
        config.agent.name,
        rt.elector.identity if rt.elector else "off",
    )


def _leadership_changed(rt: Runtime, leading: bool) -> None:
    rt.reconciler.active = leading
    if leading:
        rt.tasks.append(asyncio.create_task(_first_run(rt), name="first-reconcile"))
        return
    # As client-go's users do: a former leader must not act on stale state;
    # exiting lets the kubelet restart it as a fresh candidate.
    log.error("lost leadership; shutting down so that this replica restarts as a candidate")
    os.kill(os.getpid(), signal.SIGTERM)


async def _first_run(rt: Runtime) -> None:
    try:
        await rt.reconciler.request()
    except Exception:
        log.exception("the first reconcile failed; the resync loop retries")


async def _resync_forever(rt: Runtime) -> None:
    interval = rt.config.resync_seconds
    while True:
        await asyncio.sleep(RESYNC_TICK_SECONDS)
        try:
            await rt.reconciler.request(max_age=interval)
        except Exception:
            # Anything unexpected is logged with its traceback and retried on
            # the next tick; it must never stop the loop.
            log.exception("periodic reconcile failed")


@kopf.on.cleanup()
async def cleanup(memo: kopf.Memo, **_: Any) -> None:
    rt = runtime(memo)
    if rt is None:
        return
    await rt.reconciler.stop()
    for task in rt.tasks:
        task.cancel()
    for task in rt.tasks:
        with contextlib.suppress(asyncio.CancelledError):
            await task
    if rt.elector is not None:
        await rt.elector.release()
    await rt.kube.close()
