"""Operator configuration: one JSON file whose keys are the chart's values.

The chart renders ``values.agent`` and friends into a ConfigMap mounted at
``$FLOWPROBE_OPERATOR_CONFIG``; key names and nesting are those of
values.yaml, so a value means the same thing in both places.
"""

from __future__ import annotations

import json
import os
from pathlib import Path
from typing import Annotated, Literal, Self

from pydantic import BaseModel, ConfigDict, Field, model_validator
from pydantic.alias_generators import to_camel

from flowprobe.api.v1alpha1 import OtlpExport, ResourceList, ResourceRequirements, Toleration

ENV_CONFIG = "FLOWPROBE_OPERATOR_CONFIG"
ENV_NAMESPACE = "FLOWPROBE_NAMESPACE"


class _Model(BaseModel):
    model_config = ConfigDict(
        alias_generator=to_camel, populate_by_name=True, extra="forbid", frozen=True
    )


class AgentDefaults(_Model):
    """Agent DaemonSet settings; a policy's spec.agent overrides them (see render.py)."""

    # Name of the DaemonSet, its ConfigMap and ServiceAccount. The chart binds
    # the agent's RBAC to a ServiceAccount of this name.
    name: Annotated[str, Field(min_length=1, max_length=52)] = "flowprobe-agent"
    image: str = "flowprobe/agent:0.1.0"
    image_pull_policy: Literal["Always", "IfNotPresent", "Never"] = "IfNotPresent"
    image_pull_secrets: list[str] = []
    # hostNetwork: the port is opened on every node; pick one nothing else uses.
    health_port: Annotated[int, Field(ge=1024, le=65535)] = 9477
    report_interval_seconds: Annotated[int, Field(ge=5, le=300)] = 15
    resources: ResourceRequirements = ResourceRequirements(
        requests=ResourceList(cpu="100m", memory="128Mi"),
        limits=ResourceList(cpu="1", memory="512Mi"),
    )
    # Tolerate every taint so the agent runs on every node, control plane included.
    tolerations: list[Toleration] = [Toleration(operator="Exists")]
    node_selector: dict[str, str] = {}
    priority_class_name: str | None = None
    # False: uid 0 with only NET_RAW and NET_ADMIN, which works everywhere.
    # True: uid 65532; capture then relies on file capabilities on dumpcap,
    # which need allowPrivilegeEscalation (no_new_privs blocks them).
    run_as_non_root: bool = False
    # Secret (key "token") holding the bearer token of the agents' pcap
    # endpoint; mounted only while a policy enables forensics. Missing: the
    # endpoint refuses everyone.
    forensics_token_secret: Annotated[str, Field(min_length=1, max_length=253)] = (
        "flowprobe-forensics-token"
    )


class LeaderElection(_Model):
    """One active replica at a time (leader.py); timings as in client-go's defaults."""

    enabled: bool = True
    # The chart sets "<fullname>-operator" and grants get/update on that name only.
    lease_name: Annotated[str, Field(min_length=1, max_length=253)] = "flowprobe-operator"
    lease_duration_seconds: Annotated[int, Field(ge=2, le=300)] = 15
    renew_deadline_seconds: Annotated[int, Field(ge=1, le=300)] = 10
    retry_period_seconds: Annotated[int, Field(ge=1, le=60)] = 2

    @model_validator(mode="after")
    def _ordered(self) -> Self:
        # A leader must give up before anyone else may take over.
        if (
            not self.retry_period_seconds
            < self.renew_deadline_seconds
            < self.lease_duration_seconds
        ):
            raise ValueError(
                "need retryPeriodSeconds < renewDeadlineSeconds < leaseDurationSeconds"
            )
        return self


class OperatorConfig(_Model):
    # Namespace of the operator and the agents; the chart sets it from the release.
    namespace: Annotated[str, Field(min_length=1, max_length=63)]
    agent: AgentDefaults = AgentDefaults()
    # Used by policies without spec.export.otlp.
    default_export: OtlpExport | None = None
    # Full reconcile at least this often (drift in fields the watches miss,
    # expiry, matched pods, agent reports).
    resync_seconds: Annotated[int, Field(ge=5, le=3600)] = 30
    # An agent pod Ready for this long without a fresh report is "not reporting".
    agent_report_grace_seconds: Annotated[int, Field(ge=5, le=3600)] = 60
    leader_election: LeaderElection = LeaderElection()
    # Events about cluster-scoped objects must go to "default" (or kube-system):
    # the API server rejects any other namespace for them.
    events_namespace: Literal["default", "kube-system"] = "default"


def load_config(path: str | os.PathLike[str] | None = None) -> OperatorConfig:
    """Read the file named by ``$FLOWPROBE_OPERATOR_CONFIG`` (or ``path``).

    Without a file, defaults apply and the namespace comes from
    ``$FLOWPROBE_NAMESPACE``; that is how the tests and a developer's local
    ``kopf run`` configure the operator.
    """
    source = path or os.environ.get(ENV_CONFIG)
    data: dict[str, object] = {}
    if source:
        loaded = json.loads(Path(source).read_text())
        if not isinstance(loaded, dict):
            raise ValueError(f"{source}: expected a mapping, got {type(loaded).__name__}")
        data = loaded
    if ENV_NAMESPACE in os.environ:
        data["namespace"] = os.environ[ENV_NAMESPACE]
    return OperatorConfig.model_validate(data)
