"""The parsers the agent runs, built from configuration."""

from __future__ import annotations

from flowprobe.agent.config import AgentConfig
from flowprobe.agent.parse.base import Parser
from flowprobe.agent.parse.http1 import Http1Parser


def build_parsers(config: AgentConfig) -> list[Parser]:
    parsers: list[Parser] = [Http1Parser(keep_user_agent=config.payload.user_agent)]
    enabled = set(config.protocols)
    return [p for p in parsers if p.name in enabled]
