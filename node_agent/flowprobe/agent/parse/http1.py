"""HTTP/1.x requests and responses from tshark's ``http`` dissector.

tshark reassembles chunked and multi-segment bodies and tracks HEAD responses,
so a row carries a whole message. Pipelined messages in one segment show up as
comma-joined occurrences, paired here in order.
"""

from __future__ import annotations

from collections.abc import Sequence

from flowprobe.agent.capture.columns import ColumnLayout
from flowprobe.agent.parse.base import split_occurrences
from flowprobe.agent.parse.messages import (
    PAYLOAD_REQUEST_BODY,
    PAYLOAD_REQUEST_HEADERS,
    PAYLOAD_RESPONSE_BODY,
    PAYLOAD_RESPONSE_HEADERS,
    AttrValue,
    L7Message,
)

FIELDS = (
    "http.request.method",
    "http.request.uri",
    "http.request.version",
    "http.host",
    "http.response.code",
)
USER_AGENT = "http.user_agent"
# Header lines and bodies, for in-agent inspection only (security/). tshark
# prints them escaped ("Host: a\\r\\n" joined by commas), handed over as
# they are: decoding is the inspecting thread's work, not the capture's.
PAYLOAD_FIELDS = ("http.request.line", "http.response.line", "http.file_data")


def split_uri(uri: str) -> tuple[str, str | None]:
    path, sep, query = uri.partition("?")
    return path, (query if sep else None)


class Http1Parser:
    name = "http"
    tshark_name = "http"
    default_ports: tuple[int, ...] = (80, 8080, 8000)
    transports: tuple[str, ...] = ("tcp",)
    # An upgrade to h2c puts HTTP/1.1 and HTTP/2 into one segment.
    shares_columns = False
    fields: tuple[str, ...] = FIELDS

    def __init__(self, keep_user_agent: bool = False, keep_payload: bool = False) -> None:
        self.keep_user_agent = keep_user_agent
        self.keep_payload = keep_payload
        # The user agent and the payload are opt-in, and so is their columns' cost.
        self.fields = (
            *FIELDS,
            *((USER_AGENT,) if keep_user_agent else ()),
            *(PAYLOAD_FIELDS if keep_payload else ()),
        )
        self._idx: tuple[int, ...] = ()
        self._ua = -1
        self._payload: tuple[int, ...] = ()

    def bind(self, layout: ColumnLayout) -> None:
        self._idx = layout.indices(FIELDS)
        if self.keep_user_agent:
            self._ua = layout.index(USER_AGENT)
        if self.keep_payload:
            self._payload = layout.indices(PAYLOAD_FIELDS)

    def parse(
        self, cols: Sequence[str], to_server: bool | None, state: dict[str, object]
    ) -> list[L7Message]:
        i_method, i_uri, i_rver, i_host, i_code = self._idx
        out: list[L7Message] = []
        methods = cols[i_method]
        if methods:
            method_list = split_occurrences(methods)
            # A URI may itself contain commas; only split when several requests
            # share the segment.
            uris = [cols[i_uri]] if len(method_list) == 1 else split_occurrences(cols[i_uri])
            versions = split_occurrences(cols[i_rver])
            hosts = split_occurrences(cols[i_host])
            agents = split_occurrences(cols[self._ua]) if self._ua >= 0 else []
            for n, method in enumerate(method_list):
                uri = uris[n] if n < len(uris) else ""
                path, query = split_uri(uri)
                req: dict[str, AttrValue] = {"http.request.method": method, "url.path": path}
                if query is not None:
                    req["url.query"] = query
                if n < len(versions):
                    req["network.protocol.version"] = versions[n].removeprefix("HTTP/")
                if n < len(hosts):
                    req["http.request.header.host"] = hosts[n]
                if n < len(agents):
                    req["user_agent.original"] = agents[n]
                # Several requests in one segment share the columns, which
                # cannot be told apart: their payload is not kept.
                if self._payload and len(method_list) == 1:
                    i_lines, _, i_body = self._payload
                    req[PAYLOAD_REQUEST_HEADERS] = cols[i_lines]
                    req[PAYLOAD_REQUEST_BODY] = cols[i_body]
                out.append(L7Message("http", True, req))
        codes = cols[i_code]
        if codes:
            for code_s in split_occurrences(codes):
                code = int(code_s)
                attrs: dict[str, AttrValue] = {"http.response.status_code": code}
                if self._payload and "," not in codes:
                    _, i_lines, i_body = self._payload
                    attrs[PAYLOAD_RESPONSE_HEADERS] = cols[i_lines]
                    attrs[PAYLOAD_RESPONSE_BODY] = cols[i_body]
                # 1xx other than 101 are interim: the real response follows.
                interim = 100 <= code < 200 and code != 101
                out.append(
                    L7Message(
                        "http",
                        False,
                        attrs,
                        final=not interim,
                        error_type=str(code) if code >= 500 else None,
                        upgrade=code == 101,
                    )
                )
        return out
