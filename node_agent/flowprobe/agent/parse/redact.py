"""Query-text sanitisation: literals become placeholders before anything leaves the parser."""

from __future__ import annotations

import re

# Strings ('..' with doubled quotes, E'..' escapes), dollar-quoted bodies,
# hex/binary literals and numbers not glued to identifiers.
_SQL_LITERAL = re.compile(
    r"""
      (?:[EeBbXxNn])?'(?:[^'\\]|''|\\.)*'     # string literals
    | \$(?P<tag>[A-Za-z_]*)\$.*?\$(?P=tag)\$  # dollar-quoted
    | \b0x[0-9A-Fa-f]+\b
    | (?<![A-Za-z_$.\d])-?\d+(?:\.\d+)?(?:[eE][-+]?\d+)?\b
    """,
    re.VERBOSE | re.DOTALL,
)
_IN_LIST = re.compile(r"\(\s*\?(?:\s*,\s*\?)+\s*\)")
_WS = re.compile(r"\s+")


def sanitize_sql(text: str) -> str:
    """Replace every literal with ``?`` (and collapse ``IN (?, ?, ?)`` to ``IN (?)``)."""
    out = _SQL_LITERAL.sub("?", text)
    out = _IN_LIST.sub("(?)", out)
    return _WS.sub(" ", out).strip()


_SQL_OPERATION = re.compile(r"^\s*(?:/\*.*?\*/\s*)*([A-Za-z]+)", re.DOTALL)
_SQL_TABLE = re.compile(
    r"\b(?:FROM|INTO|UPDATE|TABLE|JOIN)\s+(?:ONLY\s+)?([A-Za-z_][\w$.\"`]*)", re.IGNORECASE
)


def sql_operation(text: str) -> str | None:
    m = _SQL_OPERATION.match(text)
    return m.group(1).upper() if m else None


def sql_collection(text: str) -> str | None:
    m = _SQL_TABLE.search(text)
    return m.group(1).strip('"`') if m else None
