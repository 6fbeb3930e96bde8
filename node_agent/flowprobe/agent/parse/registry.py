"""The parsers the agent runs, built from configuration."""

from __future__ import annotations

from flowprobe.agent.config import AgentConfig
from flowprobe.agent.parse.base import Parser
from flowprobe.agent.parse.dns import DnsParser
from flowprobe.agent.parse.http1 import Http1Parser
from flowprobe.agent.parse.http2 import Http2Parser
from flowprobe.agent.parse.mysql import MysqlParser
from flowprobe.agent.parse.postgres import PostgresParser
from flowprobe.agent.parse.redis import RedisParser


def build_parsers(config: AgentConfig) -> list[Parser]:
    raw = config.payload.raw_query_text
    parsers: list[Parser] = [
        Http1Parser(
            keep_user_agent=config.payload.user_agent, keep_payload=config.security.enabled
        ),
        Http2Parser(keep_user_agent=config.payload.user_agent),
        RedisParser(raw_query_text=raw, keep_payload=config.security.ddr.enabled),
        PostgresParser(raw_query_text=raw, keep_payload=config.security.ddr.enabled),
        MysqlParser(raw_query_text=raw, keep_payload=config.security.ddr.enabled),
        DnsParser(),
    ]
    enabled = set(config.protocols)
    return [p for p in parsers if p.name in enabled]
