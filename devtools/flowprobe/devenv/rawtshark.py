"""The benchmarks' reference: tshark dissecting as the agent's tshark does, printing nothing."""

from __future__ import annotations

from flowprobe.agent.capture.tshark import Tools, TsharkOptions


def raw_tshark_args(
    tools: Tools, options: TsharkOptions, source: str, live: bool = False
) -> list[str]:
    """The agent's tshark argv for ``source`` with ``-q`` in place of its output
    format and column layout: same protocols, preferences, session resets and
    display filter, so the difference to the agent is the columns and Python."""
    args = options.tshark_args(tools, source, live)
    i = args.index("-T")
    j = args.index("-o", i)
    assert args[j + 1].startswith("gui.column.format:")
    return [*args[:i], "-q", *args[j + 2 :]]
