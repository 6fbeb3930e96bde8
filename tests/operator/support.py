"""Helpers shared by the operator tests: policy bodies, goldens, paths."""

from __future__ import annotations

import asyncio
import copy
import datetime
import functools
import os
from collections.abc import Callable, Coroutine
from pathlib import Path
from typing import Any

import pytest

from flowprobe.api import constants
from flowprobe.controller.config import OperatorConfig

REPO = Path(__file__).resolve().parents[2]
DATA = REPO / "tests" / "data"
CRD_FILE = REPO / "crds" / "probepolicies.flowprobe.io.yaml"
CREATED = "2026-01-01T00:00:00Z"
NOW = datetime.datetime(2026, 1, 1, 0, 30, tzinfo=datetime.UTC)
# FLOWPROBE_UPDATE_GOLDENS=1 rewrites golden files instead of comparing.
UPDATE_GOLDENS = os.environ.get("FLOWPROBE_UPDATE_GOLDENS") == "1"


def policy_manifest(
    name: str, spec: dict[str, Any], labels: dict[str, str] | None = None
) -> dict[str, Any]:
    """A ProbePolicy as a client writes it (``kubectl apply``)."""
    metadata: dict[str, Any] = {"name": name}
    if labels:
        metadata["labels"] = labels
    return {
        "apiVersion": constants.API_VERSION,
        "kind": constants.KIND,
        "metadata": metadata,
        "spec": copy.deepcopy(spec),
    }


def policy_body(
    name: str = "web", spec: dict[str, Any] | None = None, **meta: Any
) -> dict[str, Any]:
    """A ProbePolicy as the API server returns it (defaults are the models' own)."""
    body = policy_manifest(name, spec if spec is not None else {"namespaceSelector": {}})
    body["metadata"] = {
        "name": name,
        "uid": f"uid-{name}",
        "generation": 1,
        "resourceVersion": "1",
        "creationTimestamp": CREATED,
        **meta,
    }
    return body


def check_golden(path: Path, text: str) -> None:
    if UPDATE_GOLDENS or not path.exists():
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_text(text)
        if not UPDATE_GOLDENS:
            pytest.fail(f"golden {path} did not exist and was written; review and commit it")
        return
    assert text == path.read_text(), (
        f"output differs from {path}; rerun with FLOWPROBE_UPDATE_GOLDENS=1 if the change is intended"
    )


def make_config(**overrides: Any) -> OperatorConfig:
    data: dict[str, Any] = {
        "namespace": "flowprobe-system",
        "defaultExport": {"endpoint": "http://otel-collector.observability:4317"},
    }
    data.update(overrides)
    return OperatorConfig.model_validate(data)


def sync(fn: Callable[[], Coroutine[Any, Any, None]]) -> Callable[[], None]:
    """Run an async test with asyncio.run (the suite has no asyncio plugin)."""

    @functools.wraps(fn)
    def wrapper() -> None:
        asyncio.run(fn())

    return wrapper
