"""DNS queries and responses from tshark's ``dns`` dissector, over UDP and TCP.

Responses pair with queries by transaction id (``L7Message.key``), so several
queries in flight on one socket pair correctly whatever order the answers
come back in. Over TCP, tshark splits the length-prefixed stream into
messages; several messages in one segment (RFC 7766 pipelining) arrive as
comma-joined occurrences and are walked with the per-message section counts.

Records carry ``dns.question.name``, ``flowprobe.dns.question.type`` (``A``,
``AAAA``…), ``flowprobe.dns.response_code`` (``NOERROR``, ``NXDOMAIN``…),
``dns.answers`` (the A/AAAA addresses of the answer section, as OpenTelemetry
defines it), ``flowprobe.dns.cnames`` (CNAME targets), ``flowprobe.dns.answer_count``
and ``flowprobe.dns.retries`` (queries tshark saw retransmitted before the
answer). Any response code other than NOERROR makes the outcome ``error``.

tshark prints value-string fields resolved ("A (Host Address)", "No such name",
"Message is a response"); they are mapped back to the wire names here.

DNS runs over UDP and TCP, so ``--port dns=5300`` makes decode-as rules for
both (``Parser.transports``).
"""

from __future__ import annotations

import functools
import re
from collections.abc import Sequence

from flowprobe.agent.capture.columns import ColumnLayout
from flowprobe.agent.parse.base import int_occurrences, split_occurrences
from flowprobe.agent.parse.messages import AttrValue, L7Message

FIELDS = (
    "dns.id",
    "dns.flags.response",
    "dns.flags.rcode",
    "dns.qry.name",
    "dns.qry.type",
    "dns.count.queries",
    "dns.count.answers",
    "dns.count.auth_rr",
    "dns.count.add_rr",
    "dns.resp.type",
    "dns.a",
    "dns.aaaa",
    "dns.cname",
    "dns.retransmission",
)

# tshark 4.0's rcode_vals; unknown codes print as bare numbers.
RCODES = {
    "No error": "NOERROR",
    "Format error": "FORMERR",
    "Server failure": "SERVFAIL",
    "No such name": "NXDOMAIN",
    "Not implemented": "NOTIMP",
    "Refused": "REFUSED",
    "Name exists": "YXDOMAIN",
    "RRset exists": "YXRRSET",
    "RRset does not exist": "NXRRSET",
    "Not authoritative": "NOTAUTH",
    "Name out of zone": "NOTZONE",
    "DSO-Type not implemented": "DSOTYPENI",
}

# "A (Host Address)", "* (A request for all records ...)", "65280": the type is
# the first word; descriptions may contain commas, so occurrences are found
# rather than split.
_TYPE = re.compile(r"(?:^|,)([^\s,(]+)(?: \([^)]*\))?")

# Retry counts kept per connection for queries still unanswered; bounded so a
# flood of unanswered retries cannot grow it.
MAX_TRACKED_RETRIES = 256


@functools.lru_cache(maxsize=4096)
def rr_types(column: str) -> tuple[str, ...]:
    """Wire type names of a type column; the same few columns repeat, hence the cache."""
    out = []
    for m in _TYPE.finditer(column):
        word = m.group(1)
        if word == "*":
            out.append("ANY")
        elif word.isdigit():
            out.append(f"TYPE{word}")
        else:
            out.append(word)
    return tuple(out)


def rcode_name(value: str) -> str:
    value = value.strip()
    if value in RCODES:
        return RCODES[value]
    return f"RCODE{value}" if value.isdigit() else value.upper().replace(" ", "_")


class DnsParser:
    name = "dns"
    tshark_name = "dns"
    default_ports: tuple[int, ...] = (53,)
    fields: tuple[str, ...] = FIELDS
    transports: tuple[str, ...] = ("udp", "tcp")
    shares_columns = True

    def __init__(self) -> None:
        self._idx: tuple[int, ...] = ()

    def bind(self, layout: ColumnLayout) -> None:
        self._idx = layout.indices(FIELDS)

    def parse(
        self, cols: Sequence[str], to_server: bool | None, state: dict[str, object]
    ) -> list[L7Message]:
        (
            i_id,
            i_resp,
            i_rcode,
            i_qname,
            i_qtype,
            i_nq,
            i_nan,
            i_nns,
            i_nar,
            i_rrtype,
            i_a,
            i_aaaa,
            i_cname,
            i_retrans,
        ) = self._idx
        ids = split_occurrences(cols[i_id])
        if not ids:
            return []
        n = len(ids)
        flags = split_occurrences(cols[i_resp])
        retrans = split_occurrences(cols[i_retrans])
        rcodes = split_occurrences(cols[i_rcode])
        qtypes = rr_types(cols[i_qtype])
        n_q = int_occurrences(cols[i_nq])
        n_an = int_occurrences(cols[i_nan])
        n_ns = int_occurrences(cols[i_nns])
        n_ar = int_occurrences(cols[i_nar])
        # A lone message with a lone question is never split: a name may
        # (escaped) contain a comma.
        single = n == 1 and (not n_q or n_q[0] <= 1)
        qnames = [cols[i_qname]] if single else split_occurrences(cols[i_qname])
        rrtypes = rr_types(cols[i_rrtype])
        addrs_a = split_occurrences(cols[i_a])
        addrs_aaaa = split_occurrences(cols[i_aaaa])
        cnames = split_occurrences(cols[i_cname])
        if len(flags) != n:
            # Without the QR bit per message nothing can be paired.
            raise ValueError(f"dns: {n} ids but {len(flags)} QR flags")

        retries = state.get("dns.retries")
        if not isinstance(retries, dict):
            retries = {}
            state["dns.retries"] = retries

        out: list[L7Message] = []
        rejected = 0
        q_at = rr_at = a_at = aaaa_at = cname_at = rcode_at = 0
        for m in range(n):
            qid = int(ids[m], 16)
            is_response = flags[m].endswith("response")
            nq = n_q[m] if m < len(n_q) else 1
            nan = n_an[m] if m < len(n_an) else 0
            nrr = nan + (n_ns[m] if m < len(n_ns) else 0) + (n_ar[m] if m < len(n_ar) else 0)
            attrs: dict[str, AttrValue] = {"network.protocol.name": "dns"}
            qname = qnames[q_at] if nq and q_at < len(qnames) else ""
            qtype = qtypes[q_at] if nq and q_at < len(qtypes) else ""
            q_at += nq
            answer_types = rrtypes[rr_at : rr_at + nan]
            # dns.a / dns.aaaa / dns.cname hold every section's records in
            # order; the answer section comes first in each message.
            rest_types = rrtypes[rr_at + nan : rr_at + nrr]
            rr_at += nrr
            n_a, n_aaaa, n_cname = (answer_types.count(t) for t in ("A", "AAAA", "CNAME"))
            answers = addrs_a[a_at : a_at + n_a] + addrs_aaaa[aaaa_at : aaaa_at + n_aaaa]
            targets = cnames[cname_at : cname_at + n_cname]
            a_at += n_a + rest_types.count("A")
            aaaa_at += n_aaaa + rest_types.count("AAAA")
            cname_at += n_cname + rest_types.count("CNAME")
            # The field only appears on flagged messages: with several
            # messages in a segment a lone flag cannot be placed.
            retransmitted = len(retrans) == n and retrans[m] == "True"
            rcode = ""
            if is_response:
                # Queries carry no rcode occurrence.
                rcode = rcode_name(rcodes[rcode_at]) if rcode_at < len(rcodes) else "NOERROR"
                rcode_at += 1
            if to_server is not None and is_response == to_server:
                # A query from the server's side or an answer from the
                # client's: random bytes that happened to dissect as DNS.
                rejected += 1
                continue
            if not is_response:
                if not (qname and qtype):
                    rejected += 1  # a query always asks something
                    continue
                attrs["dns.question.name"] = qname
                attrs["flowprobe.dns.question.type"] = qtype
                if retransmitted:
                    # The same query again (same id, within tshark's window):
                    # one lookup, so the exchange runs from the first query
                    # to the answer and counts the retry.
                    retries[qid] = retries.get(qid, 0) + 1
                    continue
                retries.pop(qid, None)
                out.append(L7Message("dns", True, attrs, key=qid))
                continue
            if retransmitted:
                # A duplicate answer; the first one closed the exchange.
                continue
            attrs["flowprobe.dns.response_code"] = rcode
            attrs["flowprobe.dns.answer_count"] = nan
            attrs["dns.answers"] = answers
            if targets:
                attrs["flowprobe.dns.cnames"] = targets
            n_retries = retries.pop(qid, 0)
            if n_retries:
                attrs["flowprobe.dns.retries"] = n_retries
            out.append(
                L7Message(
                    "dns", False, attrs, key=qid, error_type=None if rcode == "NOERROR" else rcode
                )
            )
        while len(retries) > MAX_TRACKED_RETRIES:
            del retries[next(iter(retries))]
        if rejected and not out:
            # Counted by the sessionizer as parse_error.dns.
            raise ValueError(f"dns: {rejected} message(s) that cannot be a query or its answer")
        return out
