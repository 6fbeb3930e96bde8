"""What an agent tells the operator about its node, and where.

Each agent keeps one ``coordination.k8s.io/v1`` Lease in its own namespace,
named ``report_lease_name(node)`` and labelled
``app.kubernetes.io/component=agent-report``. It renews ``spec.renewTime``
every ``FLOWPROBE_REPORT_INTERVAL_SECONDS`` with
``spec.leaseDurationSeconds`` = 3 intervals, and stores an ``AgentReport``
as JSON in the ``flowprobe.io/agent-report`` annotation. A Lease is the
Kubernetes idiom for a per-node heartbeat (kubelet does the same), needs only
namespaced RBAC, and keeps agent chatter out of ProbePolicy objects, which
only the operator writes.
"""

from __future__ import annotations

import datetime
import hashlib
from typing import Annotated

from pydantic import BaseModel, ConfigDict, Field
from pydantic.alias_generators import to_camel

from flowprobe.api.v1alpha1 import NodeNoteType

REPORT_LEASE_PREFIX = "flowprobe-report-"
MAX_REPORT_NOTES = 32
_MAX_NAME = 253


class _Model(BaseModel):
    # extra="ignore": a newer agent may report more than this operator knows.
    model_config = ConfigDict(
        alias_generator=to_camel, populate_by_name=True, extra="ignore", frozen=True
    )


class AgentNote(_Model):
    type: NodeNoteType
    message: Annotated[str, Field(max_length=1024)]
    # None: about the node as a whole (e.g. no capture interface).
    policy: str | None = None


class AgentReport(_Model):
    node: str
    # CompiledPolicySet.checksum() of the set the agent is applying.
    config_checksum: str = ""
    notes: Annotated[list[AgentNote], Field(max_length=MAX_REPORT_NOTES)] = []
    # What the agent sees, shown per node in each ProbePolicy's status.agents.
    ready: bool = False
    interfaces: list[str] = []
    exchanges_per_second: float = 0.0
    capture_drops: int = 0
    # Exported exchanges per second by policy name.
    policy_exchanges_per_second: dict[str, float] = {}


def report_lease_name(node: str) -> str:
    """Lease name for ``node``; node names are DNS subdomains, so the prefix keeps it valid."""
    name = REPORT_LEASE_PREFIX + node
    if len(name) <= _MAX_NAME:
        return name
    digest = hashlib.sha256(node.encode()).hexdigest()[:16]
    return f"{name[: _MAX_NAME - 17].rstrip('.-')}-{digest}"


def lease_is_fresh(
    renew_time: datetime.datetime | None, duration_seconds: int | None, now: datetime.datetime
) -> bool:
    if renew_time is None or not duration_seconds:
        return False
    return renew_time + datetime.timedelta(seconds=duration_seconds) > now
