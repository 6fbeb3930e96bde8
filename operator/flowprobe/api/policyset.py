"""The compiled policy set: what the operator writes and every agent reads.

The operator validates and resolves all ProbePolicies into one
``CompiledPolicySet`` and stores its canonical JSON in the agents' ConfigMap
(key ``policies.json``, mounted at ``constants.POLICY_FILE``). Agents never
read ProbePolicy objects: everything they need (resolved export settings,
mounted secret paths, the effective end time) is here, and nothing here
depends on the API server's defaulting.

Agent side::

    policy_set = CompiledPolicySet.from_json(Path(POLICY_FILE).read_text())
    mine = [p for p in policy_set.policies if p.applies_to_node(node_labels)]
"""

from __future__ import annotations

import datetime
import hashlib
import json
from typing import Annotated, Literal

from pydantic import BaseModel, ConfigDict, Field
from pydantic.alias_generators import to_camel

from flowprobe.api.v1alpha1 import (
    AnomaliesSpec,
    Direction,
    ForensicsSpec,
    IsolationSpec,
    LabelSelector,
    OtlpProtocol,
    PayloadSpec,
    PortRule,
    Protocol,
    RedactionSpec,
    ResourceAttribute,
    SecuritySpec,
)


class _Model(BaseModel):
    model_config = ConfigDict(
        alias_generator=to_camel, populate_by_name=True, extra="forbid", frozen=True
    )


class CompiledExport(_Model):
    endpoint: str
    protocol: OtlpProtocol
    # Directory of a mounted Secret: each file name is a header, its content the value.
    headers_dir: str | None = None
    ca_file: str | None = None
    insecure_skip_verify: bool = False
    server_name: str | None = None
    timeout_seconds: int
    resource_attributes: list[ResourceAttribute] = []


class CompiledPolicy(_Model):
    name: str
    uid: str
    generation: int
    namespace_selector: LabelSelector
    pod_selector: LabelSelector
    # Agents on nodes whose labels do not match skip this policy ({} = all nodes).
    node_selector: dict[str, str] = {}
    direction: Direction
    protocols: list[Protocol]
    ports: list[PortRule] = []
    sampling_percent: Annotated[int, Field(ge=1, le=100)]
    # Agents stop applying the policy at this instant even if the operator,
    # which removes expired policies from the set, is late or down.
    not_after: datetime.datetime | None = None
    payload: PayloadSpec
    redaction: RedactionSpec
    # Absent when the policy leaves security at its defaults (everything off).
    security: SecuritySpec | None = None
    export: CompiledExport
    # Absent when the policy leaves anomalies off.
    anomalies: AnomaliesSpec | None = None
    # Absent when the policy has no spec.isolation (docs/isolation.md).
    isolation: IsolationSpec | None = None
    # Absent when forensics is off (its default).
    forensics: ForensicsSpec | None = None

    def applies_to_node(self, node_labels: dict[str, str]) -> bool:
        return all(node_labels.get(k) == v for k, v in self.node_selector.items())


class CompiledPolicySet(_Model):
    api_version: Literal["flowprobe.io/v1alpha1"] = "flowprobe.io/v1alpha1"
    kind: Literal["CompiledPolicySet"] = "CompiledPolicySet"
    policies: list[CompiledPolicy] = []

    def to_json(self) -> str:
        """Canonical JSON: same set, same bytes (the checksum depends on it)."""
        data = self.model_dump(mode="json", by_alias=True, exclude_none=True)
        return json.dumps(data, indent=2, sort_keys=True, ensure_ascii=False) + "\n"

    def checksum(self) -> str:
        return hashlib.sha256(self.to_json().encode()).hexdigest()

    @classmethod
    def from_json(cls, text: str) -> CompiledPolicySet:
        return cls.model_validate_json(text)

    def get(self, name: str) -> CompiledPolicy | None:
        return next((p for p in self.policies if p.name == name), None)
