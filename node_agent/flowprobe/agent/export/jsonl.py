"""One JSON object per record, for files, pipes and tests."""

from __future__ import annotations

from typing import BinaryIO

import orjson

from flowprobe.agent.sessionize.records import Connection, Exchange


class JsonLinesWriter:
    def __init__(self, out: BinaryIO, connections: bool = False) -> None:
        self.out = out
        self.connections = connections

    def exchange(self, ex: Exchange) -> None:
        self.out.write(orjson.dumps(ex.to_dict(), option=orjson.OPT_APPEND_NEWLINE))

    def connection(self, conn: Connection) -> None:
        if self.connections:
            self.out.write(orjson.dumps(conn.to_dict(), option=orjson.OPT_APPEND_NEWLINE))

    def flush(self) -> None:
        self.out.flush()
