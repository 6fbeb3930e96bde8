"""A ProbePolicy left at its defaults and the CLI left at its defaults mean the
same agent settings: the bounds and defaults are written twice (the CRD's
pydantic models in flowprobe.api, the agent's in flowprobe.agent.config), and
these tests are what keeps the two from drifting apart."""

from __future__ import annotations

from flowprobe.agent.analyze import options as analyze_options
from flowprobe.agent.config import AnomalyConfig, ForensicsConfig, SecurityConfig
from flowprobe.agent.forensics import node as forensics_node
from flowprobe.agent.security import options as security_options
from flowprobe.api.v1alpha1 import (
    AnomaliesSpec,
    AnomalyMode,
    ForensicsMode,
    ForensicsSpec,
    SecuritySpec,
)


def test_anomalies() -> None:
    spec = AnomaliesSpec(mode=AnomalyMode.DETECT)
    assert analyze_options.from_policy(spec) == AnomalyConfig(enabled=True)


def test_forensics() -> None:
    spec = ForensicsSpec(mode=ForensicsMode.ENABLED)
    directory = ForensicsConfig().directory
    got = forensics_node.from_policy(spec, directory, "/token")
    assert got == ForensicsConfig(enabled=True, token_file="/token")


def test_security() -> None:
    assert security_options.from_policy(SecuritySpec()) == SecurityConfig()
