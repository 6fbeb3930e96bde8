"""The pydantic models and the hand-written CRD schema describe the same API.

The API server enforces the CRD; the operator parses with the models. If they
drift, the operator either refuses objects the server accepted or misses
fields, so every field, enum, bound and default is compared here.
"""

from __future__ import annotations

import datetime
import types
import typing
from enum import Enum
from typing import Any

import annotated_types
import pytest
import yaml
from pydantic import BaseModel, ValidationError
from pydantic.fields import FieldInfo

from flowprobe.api import constants
from flowprobe.api.conditions import Condition
from flowprobe.api.v1alpha1 import (
    LabelSelector,
    ProbePolicy,
    ProbePolicySpec,
    ProbePolicyStatus,
)
from tests.operator.support import CRD_FILE, policy_body


def _crd() -> dict[str, Any]:
    crd: dict[str, Any] = yaml.safe_load(CRD_FILE.read_text())
    return crd


def _schema() -> dict[str, Any]:
    (version,) = _crd()["spec"]["versions"]
    schema: dict[str, Any] = version["schema"]["openAPIV3Schema"]
    return schema


def _unwrap(tp: Any) -> tuple[Any, list[Any]]:
    """Strip Optional and Annotated; return the bare type and collected metadata."""
    meta: list[Any] = []
    while True:
        origin = typing.get_origin(tp)
        if origin is typing.Annotated:
            tp, *extra = typing.get_args(tp)
            for m in extra:
                meta += m.metadata if isinstance(m, FieldInfo) else [m]
        elif origin in (typing.Union, types.UnionType):
            args = [a for a in typing.get_args(tp) if a is not type(None)]
            assert len(args) == 1, tp
            tp = args[0]
        else:
            return tp, meta


def _bounds(meta: list[Any]) -> dict[str, Any]:
    out: dict[str, Any] = {}
    for m in meta:
        if isinstance(m, annotated_types.Ge):
            out["minimum"] = m.ge
        elif isinstance(m, annotated_types.Le):
            out["maximum"] = m.le
        elif isinstance(m, annotated_types.MinLen):
            out["min"] = m.min_length
        elif isinstance(m, annotated_types.MaxLen):
            out["max"] = m.max_length
    return out


def _compare(
    model: type[BaseModel], schema: dict[str, Any], path: str, *, written_by_us: bool = False
) -> None:
    """``written_by_us``: status is always written whole, so model defaults are fine there."""
    props = schema.get("properties", {})
    fields = {(f.alias or name): f for name, f in model.model_fields.items()}
    assert set(fields) == set(props), f"{path}: model {sorted(fields)} vs CRD {sorted(props)}"
    required = {a for a, f in fields.items() if f.is_required()}
    assert required == set(schema.get("required", [])), f"{path}: required fields differ"
    for alias, info in fields.items():
        _compare_field(info, props[alias], f"{path}.{alias}", written_by_us)


def _compare_field(info: FieldInfo, prop: dict[str, Any], path: str, written_by_us: bool) -> None:
    tp, meta = _unwrap(info.annotation)
    meta += info.metadata
    if "default" in prop:
        default = info.get_default(call_default_factory=True)
        dumped = (
            default.model_dump(mode="json", by_alias=True, exclude_none=True)
            if isinstance(default, BaseModel)
            else default
        )
        if isinstance(dumped, dict) and prop["default"] == {}:
            pass  # {} in the CRD means "apply the nested defaults", as the model does
        else:
            assert dumped == prop["default"], f"{path}: default {dumped!r} vs {prop['default']!r}"
    elif not info.is_required() and not written_by_us:
        # Only "nothing" defaults ("" / None / empty) may exist on the model alone.
        default = info.get_default(call_default_factory=True)
        assert default in (None, "", [], {}) or isinstance(default, BaseModel), (
            f"{path}: the model has a default the CRD lacks"
        )
    _compare_type(tp, meta, prop, path, written_by_us)


def _compare_type(
    tp: Any, meta: list[Any], prop: dict[str, Any], path: str, written_by_us: bool
) -> None:
    bounds = _bounds(meta)
    origin = typing.get_origin(tp)
    if isinstance(tp, type) and issubclass(tp, BaseModel):
        if prop.get("type") == "object" and "properties" in prop:
            _compare(tp, prop, path, written_by_us=written_by_us)
        return
    if isinstance(tp, type) and issubclass(tp, Enum):
        assert prop.get("enum") == [e.value for e in tp], f"{path}: enum differs"
        return
    if origin is list:
        assert prop["type"] == "array", path
        assert "maxItems" in prop, f"{path}: every list needs maxItems"
        assert bounds.get("max") == prop["maxItems"], f"{path}: maxItems differs"
        assert bounds.get("min") == prop.get("minItems"), f"{path}: minItems differs"
        (item,) = typing.get_args(tp)
        item_tp, item_meta = _unwrap(item)
        _compare_type(item_tp, item_meta, prop["items"], f"{path}[]", written_by_us)
        return
    if origin is dict:
        assert prop["type"] == "object" and "additionalProperties" in prop, path
        assert bounds.get("max") == prop.get("maxProperties"), f"{path}: maxProperties differs"
        return
    if tp is bool:
        assert prop["type"] == "boolean", path
    elif tp is int:
        assert prop["type"] == "integer", path
        assert bounds.get("minimum") == prop.get("minimum"), f"{path}: minimum differs"
        assert bounds.get("maximum") == prop.get("maximum"), f"{path}: maximum differs"
    elif tp is str:
        if prop.get("x-kubernetes-int-or-string"):
            return
        assert prop["type"] == "string", path
        assert bounds.get("max") == prop.get("maxLength"), f"{path}: maxLength differs"
        assert bounds.get("min") == prop.get("minLength"), f"{path}: minLength differs"
    elif tp is datetime.datetime:
        assert (prop["type"], prop.get("format")) == ("string", "date-time"), path
    else:
        raise AssertionError(f"{path}: unhandled type {tp!r}")


def test_spec_schema_matches_the_model() -> None:
    _compare(ProbePolicySpec, _schema()["properties"]["spec"], "spec")


def test_status_schema_matches_the_model() -> None:
    _compare(ProbePolicyStatus, _schema()["properties"]["status"], "status", written_by_us=True)


def test_condition_schema_matches_the_model() -> None:
    items = _schema()["properties"]["status"]["properties"]["conditions"]["items"]
    _compare(Condition, items, "status.conditions[]", written_by_us=True)


def test_names_match_the_constants() -> None:
    crd = _crd()
    names = crd["spec"]["names"]
    assert crd["metadata"]["name"] == constants.CRD_NAME
    assert crd["spec"]["group"] == constants.GROUP
    assert names["kind"] == constants.KIND
    assert names["plural"] == constants.PLURAL
    assert names["singular"] == constants.SINGULAR
    assert tuple(names["shortNames"]) == constants.SHORT_NAMES
    assert tuple(names["categories"]) == constants.CATEGORIES
    (version,) = crd["spec"]["versions"]
    assert version["name"] == constants.VERSION
    assert version["subresources"] == {"status": {}}
    columns = [c["name"] for c in version["additionalPrinterColumns"] if "priority" not in c]
    assert columns == ["Ready", "Nodes", "Pods", "Age"]


def _walk(schema: dict[str, Any], path: str = "") -> typing.Iterator[tuple[str, dict[str, Any]]]:
    yield path, schema
    for name, sub in (schema.get("properties") or {}).items():
        yield from _walk(sub, f"{path}.{name}")
    if "items" in schema:
        yield from _walk(schema["items"], f"{path}[]")


def test_every_field_is_described_and_every_list_bounded() -> None:
    for path, node in _walk(_schema()["properties"]["spec"], "spec"):
        if not path.endswith("[]"):
            assert node.get("description"), f"{path} has no description"
        if node.get("type") == "array":
            assert "maxItems" in node, f"{path} has no maxItems"
    for path, node in _walk(_schema()["properties"]["status"], "status"):
        if node.get("type") == "array":
            assert "maxItems" in node, f"{path} has no maxItems"


def test_minimal_policy_gets_the_documented_defaults() -> None:
    pol = ProbePolicy.model_validate(policy_body())
    spec = pol.spec.model_dump(mode="json", by_alias=True, exclude_none=True)
    assert spec["managementState"] == "Managed"
    assert spec["direction"] == "Both"
    assert spec["samplingPercent"] == 100
    assert spec["payload"] == {
        "headers": {"mode": "None", "include": [], "maxBytes": 4096},
        "bodies": {"mode": "None", "maxBytes": 1024},
    }
    assert spec["redaction"]["queryText"] == "Sanitized"
    assert spec["security"]["waf"]["mode"] == "Off"
    assert spec["security"]["sensitiveData"] == {"mode": "Off", "categories": []}
    assert "TCP" not in spec["protocols"]


def test_metadata_noise_and_unknown_top_level_fields_are_ignored() -> None:
    body = policy_body(managedFields=[{"manager": "kubectl"}], annotations={"a": "b"})
    body["status"] = {"observedGeneration": 1, "nodes": "1/1"}
    pol = ProbePolicy.model_validate(body)
    assert pol.status.nodes == "1/1"


@pytest.mark.parametrize(
    ("spec", "fragment"),
    [
        ({}, "namespaceSelector"),
        ({"namespaceSelector": {}, "samplingPercent": 0}, "samplingPercent"),
        ({"namespaceSelector": {}, "ports": [{"port": 80, "name": "http"}]}, "exactly one of"),
        (
            {
                "namespaceSelector": {},
                "protocols": ["HTTP"],
                "ports": [{"port": 6379, "protocol": "Redis"}],
            },
            "must also be listed",
        ),
        ({"namespaceSelector": {}, "timeLimit": {}}, "exactly one of endTime"),
        ({"namespaceSelector": {}, "payload": {"headers": {"mode": "Allowlist"}}}, "include"),
        (
            {"namespaceSelector": {}, "export": {"otlp": {"endpoint": "collector:4317"}}},
            "http:// or https://",
        ),
        (
            {
                "namespaceSelector": {},
                "export": {"otlp": {"endpoint": "http://c:4317", "tls": {}}},
            },
            "https://",
        ),
        (
            {
                "namespaceSelector": {},
                "export": {"resourceAttributes": [{"key": "k8s.pod.name", "value": "x"}]},
            },
            "k8s.",
        ),
        ({"namespaceSelector": {}, "bogus": 1}, "bogus"),
        (
            {
                "namespaceSelector": {},
                "protocols": ["DNS"],
                "security": {"waf": {"mode": "DetectionOnly"}},
            },
            "needs HTTP in protocols",
        ),
        (
            {"namespaceSelector": {}, "security": {"waf": {"excludedRules": ["94x"]}}},
            "excludedRules",
        ),
        (
            {
                "namespaceSelector": {},
                "forensics": {
                    "secondsBefore": 100,
                    "ring": {"files": 2, "fileDurationSeconds": 50},
                },
            },
            "shorter than the ring",
        ),
        ({"namespaceSelector": {}, "forensics": {"ring": {"files": 257}}}, "files"),
    ],
)
def test_models_refuse_what_the_crd_refuses(spec: dict[str, Any], fragment: str) -> None:
    with pytest.raises(ValidationError, match=fragment):
        ProbePolicy.model_validate(policy_body(spec=spec))


def test_label_selector_semantics() -> None:
    sel = LabelSelector.model_validate(
        {
            "matchLabels": {"app": "web"},
            "matchExpressions": [
                {"key": "tier", "operator": "In", "values": ["a", "b"]},
                {"key": "canary", "operator": "DoesNotExist"},
                {"key": "zone", "operator": "NotIn", "values": ["x"]},
                {"key": "team", "operator": "Exists"},
            ],
        }
    )
    assert sel.matches({"app": "web", "tier": "a", "team": "t"})
    assert sel.matches({"app": "web", "tier": "b", "team": "t", "zone": "y"})
    assert not sel.matches({"app": "web", "tier": "c", "team": "t"})
    assert not sel.matches({"app": "web", "tier": "a", "team": "t", "canary": "1"})
    assert not sel.matches({"app": "web", "tier": "a", "team": "t", "zone": "x"})
    assert not sel.matches({"app": "web", "tier": "a"})
    assert LabelSelector().matches({})


def test_label_selector_as_a_query() -> None:
    sel = LabelSelector.model_validate(
        {
            "matchLabels": {"app": "web", "a.io/x": "1"},
            "matchExpressions": [
                {"key": "tier", "operator": "In", "values": ["a", "b"]},
                {"key": "canary", "operator": "DoesNotExist"},
                {"key": "zone", "operator": "NotIn", "values": ["x"]},
                {"key": "team", "operator": "Exists"},
            ],
        }
    )
    assert sel.to_query() == "a.io/x=1,app=web,tier in (a,b),!canary,zone notin (x),team"
    assert LabelSelector().to_query() == ""
    # The CRD refuses empty values for In and NotIn; the model still answers sensibly.
    nothing = LabelSelector.model_validate(
        {"matchExpressions": [{"key": "k", "operator": "In", "values": []}]}
    )
    assert nothing.to_query() is None and not nothing.matches({"k": "v"})
    anything = LabelSelector.model_validate(
        {"matchExpressions": [{"key": "k", "operator": "NotIn", "values": []}]}
    )
    assert anything.to_query() == "" and anything.matches({})
