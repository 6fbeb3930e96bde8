"""ProbePolicy objects -> one validated CompiledPolicySet plus a verdict per policy.

Pure: no API calls, no clock (``now`` is an argument). Everything the schema
cannot check is checked here (regular expressions compile, an export endpoint
exists, agent settings of different policies agree), and every finding ends
up in a verdict that status.py turns into conditions, so a policy that
cannot be realised says why instead of breaking the others.
"""

from __future__ import annotations

import datetime
import re
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass, field
from decimal import Decimal, InvalidOperation
from typing import Any

from pydantic import ValidationError

from flowprobe.api import constants
from flowprobe.api.policyset import CompiledExport, CompiledPolicy, CompiledPolicySet
from flowprobe.api.v1alpha1 import (
    AnomalyMode,
    ForensicsMode,
    OtlpExport,
    ProbePolicy,
    Reason,
    ResourceList,
    ResourceRequirements,
    SecuritySpec,
    Toleration,
)
from flowprobe.controller.config import OperatorConfig


@dataclass(frozen=True)
class Unparseable:
    """A stored object the models refuse (e.g. written under an older schema)."""

    name: str
    uid: str
    generation: int
    creation_timestamp: str
    message: str


def parse_policy(body: Mapping[str, Any]) -> ProbePolicy | Unparseable:
    try:
        return ProbePolicy.model_validate(dict(body))
    except ValidationError as exc:
        meta = body.get("metadata") or {}
        return Unparseable(
            name=str(meta.get("name", "")),
            uid=str(meta.get("uid", "")),
            generation=int(meta.get("generation") or 0),
            creation_timestamp=str(meta.get("creationTimestamp", "")),
            message=describe_validation_error(exc),
        )


def describe_validation_error(exc: ValidationError) -> str:
    parts = []
    for err in exc.errors(include_url=False):
        loc = ".".join(str(p) for p in err["loc"])
        parts.append(f"{loc}: {err['msg']}" if loc else str(err["msg"]))
    return "; ".join(parts)


@dataclass(frozen=True)
class Issue:
    reason: Reason
    message: str


@dataclass
class Verdict:
    """What compilation concluded about one Managed policy."""

    name: str
    uid: str
    generation: int
    ends_at: datetime.datetime | None = None
    expired: bool = False
    # Errors keep the policy out of the set (Ready=False); warnings do not (Degraded=True).
    errors: list[Issue] = field(default_factory=list)
    warnings: list[Issue] = field(default_factory=list)
    compiled: CompiledPolicy | None = None


@dataclass(frozen=True)
class AgentSettings:
    """The agent DaemonSet settings after merging every active policy."""

    image: str
    resources: ResourceRequirements
    tolerations: list[Toleration]
    # One term per distinct policy node selector; None: every node.
    node_selector_terms: list[dict[str, str]] | None
    priority_class_name: str | None


@dataclass(frozen=True)
class OwnerRef:
    name: str
    uid: str


@dataclass(frozen=True)
class Compilation:
    policy_set: CompiledPolicySet
    verdicts: dict[str, Verdict]
    agent: AgentSettings
    # Policies with an entry in the set: owners of the agent objects, so the
    # garbage collector removes them if the last one goes while the operator is down.
    owners: list[OwnerRef]
    # Secrets (in the operator namespace) the agents must mount.
    secrets: list[str]

    @property
    def empty(self) -> bool:
        return not self.policy_set.policies


def _sort_key(p: ProbePolicy | Unparseable) -> tuple[str, str]:
    if isinstance(p, Unparseable):
        return (p.creation_timestamp, p.name)
    created = p.metadata.creation_timestamp
    return (created.isoformat() if created else "", p.name)


def compile_policies(
    policies: Iterable[ProbePolicy | Unparseable],
    config: OperatorConfig,
    *,
    previous: CompiledPolicySet | None,
    now: datetime.datetime,
) -> Compilation:
    """Compile every policy; ``previous`` supplies the frozen entries of Unmanaged ones."""
    ordered = sorted(policies, key=_sort_key)
    verdicts: dict[str, Verdict] = {}
    entries: list[CompiledPolicy] = []
    owners: list[OwnerRef] = []
    active: list[ProbePolicy] = []

    for pol in ordered:
        if isinstance(pol, Unparseable):
            verdicts[pol.name] = Verdict(
                name=pol.name,
                uid=pol.uid,
                generation=pol.generation,
                errors=[Issue(Reason.INVALID_SPEC, f"the policy does not parse: {pol.message}")],
            )
            continue
        if not pol.managed:
            frozen = previous.get(pol.name) if previous else None
            if frozen is not None and frozen.uid == pol.metadata.uid and not _past(frozen, now):
                entries.append(frozen)
                owners.append(OwnerRef(pol.name, pol.metadata.uid))
            continue
        verdict = _judge(pol, config, now)
        verdicts[pol.name] = verdict
        if verdict.compiled is not None:
            entries.append(verdict.compiled)
            owners.append(OwnerRef(pol.name, pol.metadata.uid))
            active.append(pol)

    agent = _merge_agent_settings(active, config, verdicts)
    entries.sort(key=lambda e: e.name)
    secrets = sorted({s for e in entries for s in _secret_names(e)})
    return Compilation(
        policy_set=CompiledPolicySet(policies=entries),
        verdicts=verdicts,
        agent=agent,
        owners=sorted(owners, key=lambda o: o.name),
        secrets=secrets,
    )


def _past(entry: CompiledPolicy, now: datetime.datetime) -> bool:
    return entry.not_after is not None and entry.not_after <= now


def _judge(pol: ProbePolicy, config: OperatorConfig, now: datetime.datetime) -> Verdict:
    verdict = Verdict(name=pol.name, uid=pol.metadata.uid, generation=pol.metadata.generation)
    verdict.ends_at = pol.ends_at()
    if verdict.ends_at is not None and verdict.ends_at <= now:
        verdict.expired = True
        return verdict

    for rule in pol.spec.redaction.patterns:
        try:
            re.compile(rule.regex)
        except re.error as exc:
            verdict.errors.append(
                Issue(
                    Reason.INVALID_SPEC,
                    f"spec.redaction.patterns[{rule.name}].regex does not compile: {exc}",
                )
            )

    otlp = pol.spec.export.otlp if pol.spec.export and pol.spec.export.otlp else None
    otlp = otlp or config.default_export
    if otlp is None:
        verdict.errors.append(
            Issue(
                Reason.NO_EXPORT_ENDPOINT,
                "no OTLP endpoint: set spec.export.otlp.endpoint, or the operator's "
                "default (Helm value agent.defaultExport)",
            )
        )
    if verdict.errors or otlp is None:
        return verdict

    verdict.compiled = CompiledPolicy(
        name=pol.name,
        uid=pol.metadata.uid,
        generation=pol.metadata.generation,
        namespace_selector=pol.spec.namespace_selector,
        pod_selector=pol.spec.pod_selector,
        node_selector=_node_selector(pol, config),
        direction=pol.spec.direction,
        protocols=pol.spec.protocols,
        ports=pol.spec.ports,
        sampling_percent=pol.spec.sampling_percent,
        not_after=verdict.ends_at,
        payload=pol.spec.payload,
        redaction=pol.spec.redaction,
        security=pol.spec.security if pol.spec.security != SecuritySpec() else None,
        export=_compile_export(otlp, pol),
        anomalies=pol.spec.anomalies if pol.spec.anomalies.mode != AnomalyMode.OFF else None,
        isolation=pol.spec.isolation,
        forensics=pol.spec.forensics if pol.spec.forensics.mode != ForensicsMode.OFF else None,
    )
    return verdict


def _compile_export(otlp: OtlpExport, pol: ProbePolicy) -> CompiledExport:
    tls = otlp.tls
    ca = tls.ca_secret_ref if tls else None
    return CompiledExport(
        endpoint=otlp.endpoint,
        protocol=otlp.protocol,
        headers_dir=(
            f"{constants.SECRETS_DIR}/{otlp.headers_secret_ref.name}"
            if otlp.headers_secret_ref
            else None
        ),
        ca_file=f"{constants.SECRETS_DIR}/{ca.name}/{ca.key}" if ca else None,
        insecure_skip_verify=bool(tls and tls.insecure_skip_verify),
        server_name=tls.server_name if tls else None,
        timeout_seconds=otlp.timeout_seconds,
        resource_attributes=pol.spec.export.resource_attributes if pol.spec.export else [],
    )


def _secret_names(entry: CompiledPolicy) -> list[str]:
    prefix = constants.SECRETS_DIR + "/"
    paths = [entry.export.headers_dir, entry.export.ca_file]
    return [p.removeprefix(prefix).split("/", 1)[0] for p in paths if p]


def _node_selector(pol: ProbePolicy, config: OperatorConfig) -> dict[str, str]:
    if pol.spec.agent and pol.spec.agent.node_selector is not None:
        return dict(pol.spec.agent.node_selector)
    return dict(config.agent.node_selector)


# -- agent settings ---------------------------------------------------------------


def _merge_agent_settings(
    active: Sequence[ProbePolicy], config: OperatorConfig, verdicts: dict[str, Verdict]
) -> AgentSettings:
    defaults = config.agent
    image = _first_wins(active, "image", verdicts) or defaults.image
    priority = _first_wins(active, "priority_class_name", verdicts) or defaults.priority_class_name

    tolerations: dict[str, Toleration] = {}
    # No active policy (the set is empty) still yields the defaults, for a stable render.
    requested = [p.spec.agent.tolerations if p.spec.agent else None for p in active] or [None]
    for own in requested:
        for tol in defaults.tolerations if own is None else own:
            tolerations.setdefault(tol.model_dump_json(exclude_none=True), tol)

    selectors = [_node_selector(p, config) for p in active] or [dict(defaults.node_selector)]
    terms: list[dict[str, str]] | None = None
    if all(selectors):
        unique = {tuple(sorted(s.items())): s for s in selectors}
        terms = [unique[k] for k in sorted(unique)]

    return AgentSettings(
        image=image,
        resources=_merge_resources(active, defaults.resources),
        tolerations=[tolerations[k] for k in sorted(tolerations)],
        node_selector_terms=terms,
        priority_class_name=priority,
    )


def _first_wins(
    active: Sequence[ProbePolicy], attr: str, verdicts: dict[str, Verdict]
) -> str | None:
    """The oldest policy that sets ``attr`` wins; younger ones that disagree are told so."""
    winner: tuple[str, str] | None = None
    field_name = {"image": "image", "priority_class_name": "priorityClassName"}[attr]
    for pol in active:
        value = getattr(pol.spec.agent, attr) if pol.spec.agent else None
        if value is None:
            continue
        if winner is None:
            winner = (value, pol.name)
        elif value != winner[0]:
            verdicts[pol.name].warnings.append(
                Issue(
                    Reason.AGENT_SETTINGS_CONFLICT,
                    f"spec.agent.{field_name} {value!r} is not used: the older policy "
                    f"{winner[1]!r} sets {winner[0]!r} and all policies share one agent DaemonSet",
                )
            )
    return winner[0] if winner else None


_SUFFIXES = {
    "n": Decimal("1e-9"),
    "u": Decimal("1e-6"),
    "m": Decimal("1e-3"),
    "": Decimal(1),
    "k": Decimal("1e3"),
    "M": Decimal("1e6"),
    "G": Decimal("1e9"),
    "T": Decimal("1e12"),
    "P": Decimal("1e15"),
    "E": Decimal("1e18"),
    "Ki": Decimal(2**10),
    "Mi": Decimal(2**20),
    "Gi": Decimal(2**30),
    "Ti": Decimal(2**40),
    "Pi": Decimal(2**50),
    "Ei": Decimal(2**60),
}
_QUANTITY = re.compile(r"^([+-]?[0-9.]+)([eE][+-]?[0-9]+|[KMGTPE]i|[numkMGTPE])?$")


def parse_quantity(text: str) -> Decimal:
    """Value of a Kubernetes resource quantity ("100m", "1.5Gi", "2e3")."""
    m = _QUANTITY.match(text.strip())
    if not m:
        raise ValueError(f"not a quantity: {text!r}")
    number, suffix = m.group(1), m.group(2) or ""
    try:
        value = Decimal(number)
    except InvalidOperation:
        raise ValueError(f"not a quantity: {text!r}") from None
    if suffix[:1] in {"e", "E"}:
        return value * (Decimal(10) ** int(suffix[1:]))
    if suffix not in _SUFFIXES:
        raise ValueError(f"not a quantity: {text!r}")
    return value * _SUFFIXES[suffix]


def _larger(a: str | None, b: str | None) -> str | None:
    if a is None or b is None:
        return a or b
    return a if parse_quantity(a) >= parse_quantity(b) else b


def _merge_resources(
    active: Sequence[ProbePolicy], defaults: ResourceRequirements
) -> ResourceRequirements:
    """Per resource the largest value any policy asks for, defaults where none does."""
    merged: dict[str, dict[str, str | None]] = {"requests": {}, "limits": {}}
    for kind in ("requests", "limits"):
        for res in ("cpu", "memory"):
            values = [
                getattr(getattr(p.spec.agent.resources, kind), res)
                for p in active
                if p.spec.agent and p.spec.agent.resources and getattr(p.spec.agent.resources, kind)
            ]
            chosen = None
            for v in values:
                chosen = _larger(chosen, v)
            default_list = getattr(defaults, kind)
            merged[kind][res] = chosen or (getattr(default_list, res) if default_list else None)
    # A request raised by one policy may exceed another's (or the default) limit;
    # the API server would refuse such a pod, so the limit follows the request.
    for res in ("cpu", "memory"):
        req, lim = merged["requests"][res], merged["limits"][res]
        if req and lim and parse_quantity(req) > parse_quantity(lim):
            merged["limits"][res] = req
    return ResourceRequirements(
        requests=ResourceList(**merged["requests"]) if any(merged["requests"].values()) else None,
        limits=ResourceList(**merged["limits"]) if any(merged["limits"].values()) else None,
    )
