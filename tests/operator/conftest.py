"""Fixtures of the operator tests."""

from __future__ import annotations

import json
from collections.abc import Iterator
from typing import Any

import pytest

from flowprobe.controller.config import OperatorConfig
from flowprobe.devenv.cluster import LocalCluster
from tests.operator.support import REPO, make_config


@pytest.fixture
def config() -> OperatorConfig:
    return make_config()


def get_json(cluster: LocalCluster, *args: str) -> Any:
    return json.loads(cluster.kubectl("get", *args, "-o", "json").stdout)


@pytest.fixture(scope="session")
def crds(local_cluster: LocalCluster) -> Iterator[LocalCluster]:
    """The ProbePolicy CRD, applied from crds/ as a user would."""
    local_cluster.kubectl("apply", "--server-side", "-f", str(REPO / "crds"))
    local_cluster.wait_established("probepolicies.flowprobe.io")
    yield local_cluster
