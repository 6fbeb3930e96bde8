"""Agent configuration: one pydantic model, from the command line or the operator's policy."""

from __future__ import annotations

from pydantic import BaseModel, ConfigDict, Field

ALL_PROTOCOLS = ("http", "http2", "dns", "redis", "postgresql", "mysql")


class _Model(BaseModel):
    model_config = ConfigDict(extra="forbid", frozen=True)


class PayloadConfig(_Model):
    """What of the payload may leave the agent. Everything off by default."""

    headers: bool = False
    bodies: bool = False
    body_max_bytes: int = Field(default=1024, ge=0, le=65536)
    user_agent: bool = False
    # Off means query text is sanitised (literals -> ?), never dropped.
    raw_query_text: bool = False


class AgentConfig(_Model):
    protocols: tuple[str, ...] = ALL_PROTOCOLS
    # Extra server ports per protocol, on top of each parser's defaults; tshark
    # decodes them with "decode as".
    ports: dict[str, tuple[int, ...]] = Field(default_factory=dict)
    payload: PayloadConfig = PayloadConfig()
    response_timeout_seconds: int = Field(default=30, ge=1, le=3600)
    session_reset_packets: int = Field(default=200_000, ge=10_000)
