"""Security half of ``make bench``: what the WAF and the sensitive-data scan cost.

1. Per exchange, offline: the CPU time of one CRS pass (libmodsecurity3 with
   Debian's CRS, paranoia level 1, every phase: request line and headers,
   request body, response headers and body) and of the whole security stage
   (CRS and DDR), median and p99 in µs, over benign exchanges of three
   shapes and attacks. CPU time of the calling thread, so a loaded machine
   stretches the figures less than wall time would.
2. Live, in the same run: the highest lossless rate of the agent capturing
   h2load -> nginx between namespace pods, with ``--waf --ddr`` and without.
   Lossless: every request reported, none passed uninspected, no capture drop.
   A lagging security stage buffers up to 4096 exchanges and inspects them
   after the load, so a step also counts as lost when the agent needs more
   than STOP_GRACE_S to stop. Each step prints the agent's CPU time per
   request over its whole life (start-up, CRS loading and draining included:
   compare on and off at the same rate; less sensitive to a loaded machine
   than the rate), the time it took to stop, and the load average.
3. The sensitive-data scan of database replies: 8 KB of MySQL text rows (the
   per-response cap) without and with sensitive values (an e-mail address, a
   card number and an IBAN in every row: a worst case), and a Redis reply,
   CPU µs median and p99.
"""

from __future__ import annotations

import argparse
import dataclasses
import os
import statistics
import time
from collections.abc import Callable, Sequence
from pathlib import Path

from flowprobe.agent.config import DdrConfig, SecurityConfig, WafConfig
from flowprobe.agent.export.workloads import AddressResolver
from flowprobe.agent.parse.base import MAX_VALUES_CHARS
from flowprobe.agent.parse.messages import (
    PAYLOAD_QUERY,
    PAYLOAD_REPLY_TEXT,
    PAYLOAD_REPLY_VALUES,
    PAYLOAD_REQUEST_BODY,
    PAYLOAD_REQUEST_HEADERS,
    PAYLOAD_RESPONSE_BODY,
    PAYLOAD_RESPONSE_HEADERS,
    AttrValue,
)
from flowprobe.agent.security.modsec import HttpTransaction, ModSecurity
from flowprobe.agent.security.stage import SecurityStage
from flowprobe.agent.sessionize.records import Endpoints, Exchange, Outcome
from flowprobe.devenv.livebench import nginx_pods, run_rate
from flowprobe.devenv.netns import Node, Pod
from flowprobe.devenv.servers import ensure_root

REQUEST_HEADERS = [
    ("Host", "api.shop.svc:8080"),
    ("User-Agent", "python-requests/2.31.0"),
    ("Accept", "application/json"),
    ("Accept-Encoding", "gzip, deflate"),
    ("Connection", "keep-alive"),
    ("X-Request-Id", "9f1c2a7e-55b0-4d8e-a1c2-3f6b7e9d0a11"),
]
RESPONSE_HEADERS = [
    ("Content-Type", "application/json"),
    ("Server", "gunicorn"),
    ("Date", "Fri, 27 Nov 2026 21:06:44 GMT"),
]
ORDER = (
    b'{"id": 1042, "items": [{"sku": "A-1001", "qty": 2, "price": 19.99}, '
    b'{"sku": "B-2002", "qty": 1, "price": 5.49}], "shipping": {"method": "standard", '
    b'"address": {"city": "Lyon", "zip": "69002", "country": "FR"}}, "note": "leave at door"}'
)


def _shapes() -> dict[str, HttpTransaction]:
    def tx(
        uri: str,
        method: str = "GET",
        headers: Sequence[tuple[str, str]] = REQUEST_HEADERS,
        request_body: bytes = b"",
        response_body: bytes = b"",
    ) -> HttpTransaction:
        return HttpTransaction(
            "10.0.0.1",
            41000,
            "10.0.0.2",
            8080,
            method,
            uri,
            request_headers=headers,
            request_body=request_body,
            status=200,
            response_headers=[*RESPONSE_HEADERS, ("Content-Length", str(len(response_body)))],
            response_body=response_body,
        )

    post_headers = [
        *REQUEST_HEADERS,
        ("Content-Type", "application/json"),
        ("Content-Length", str(len(ORDER))),
    ]
    return {
        "GET, no bodies": tx("/api/orders/1042?expand=items", response_body=b""),
        "GET, JSON reply": tx("/api/orders/1042?expand=items", response_body=ORDER),
        "POST JSON, JSON reply": tx(
            "/api/orders",
            "POST",
            request_body=ORDER,
            response_body=ORDER,
            headers=post_headers,
        ),
        "attack (SQLi in query)": tx(
            "/api/orders?id=1%27%20UNION%20SELECT%20password%20FROM%20users--", response_body=b""
        ),
    }


def _exchange(t: HttpTransaction) -> Exchange:
    """The exchange the parser would have produced, payload attributes included."""

    def lines(headers: Sequence[tuple[str, str]]) -> str:
        return ",".join(f"{k}: {v}\\r\\n" for k, v in headers)

    path, _, query = t.uri.partition("?")
    attrs: dict[str, AttrValue] = {
        "http.request.method": t.method,
        "url.path": path,
        "network.protocol.version": "1.1",
        "http.response.status_code": 200,
        PAYLOAD_REQUEST_HEADERS: lines(t.request_headers),
        PAYLOAD_REQUEST_BODY: t.request_body.decode(),
        PAYLOAD_RESPONSE_HEADERS: lines(t.response_headers),
        PAYLOAD_RESPONSE_BODY: t.response_body.decode(),
    }
    if query:
        attrs["url.query"] = query
    ep = Endpoints("tcp", t.client_address, t.client_port, t.server_address, t.server_port)
    start = 1_700_000_000_000_000
    return Exchange("http", ep, start, start + 900, start + 100, start + 800, Outcome.OK, attrs)


def _db_replies() -> dict[str, Exchange]:
    """Database exchanges as the parsers hand them over with DDR on: rows, a reply."""

    def rows(row: str) -> str:
        return (row * (MAX_VALUES_CHARS // len(row) + 1))[:MAX_VALUES_CHARS]

    sensitive = rows(
        "1042,Ada Lovelace,ada.lovelace@example.com,4111 1111 1111 1111,DE89370400440532013000,"
    )
    plain = rows("1042,item-1042,19.99,2026-11-28 04:45:43,shipped,Lyon,69002,FR,")
    reply = ",".join(v.encode().hex() for v in ("ada.lovelace@example.com", "4111111111111111"))
    start = 1_700_000_000_000_000
    out = {}
    for name, protocol, port, attrs in (
        ("MySQL rows, 8 KB, plain", "mysql", 3306, {PAYLOAD_REPLY_TEXT: plain}),
        ("MySQL rows, 8 KB, 3 hits/row", "mysql", 3306, {PAYLOAD_REPLY_TEXT: sensitive}),
        ("Redis HGETALL reply", "redis", 6379, {PAYLOAD_REPLY_VALUES: reply}),
    ):
        ep = Endpoints("tcp", "10.0.0.1", 40000, "10.0.0.2", port)
        base: dict[str, AttrValue] = {"db.system.name": protocol, PAYLOAD_QUERY: "SELECT"}
        out[name] = Exchange(
            protocol, ep, start, start + 900, start + 100, start + 800, Outcome.OK, base | attrs
        )
    return out


def _cpu_us(fn: Callable[[], object], n: int) -> tuple[float, float]:
    samples = []
    for _ in range(n):
        t0 = time.thread_time_ns()
        fn()
        samples.append((time.thread_time_ns() - t0) / 1000)
    samples.sort()
    return statistics.median(samples), samples[min(len(samples) - 1, int(len(samples) * 0.99))]


def offline(n: int) -> None:
    waf = WafConfig(enabled=True)
    engine = ModSecurity.with_crs(waf, 2047)
    both = SecurityConfig(waf=waf, ddr=DdrConfig(enabled=True))
    ddr_only = SecurityConfig(ddr=DdrConfig(enabled=True))
    stage = SecurityStage(both, lambda ex: None, AddressResolver(), waf=engine)
    ddr_stage = SecurityStage(ddr_only, lambda ex: None, AddressResolver())
    print(f"per exchange, CPU µs over {n} runs (median / p99)")
    print(f"{'exchange':<28} {'CRS':>17} {'DDR':>17} {'stage (CRS+DDR)':>17}")
    for name, t in _shapes().items():
        crs = _cpu_us(lambda t=t: engine.inspect(t), n)  # type: ignore[misc]
        ddr = _cpu_us(lambda t=t: ddr_stage.inspect(_exchange(t)), n)  # type: ignore[misc]
        whole = _cpu_us(lambda t=t: stage.inspect(_exchange(t)), n)  # type: ignore[misc]
        print(
            f"{name:<28} {crs[0]:>8.0f} / {crs[1]:>6.0f} {ddr[0]:>8.0f} / {ddr[1]:>6.0f} "
            f"{whole[0]:>8.0f} / {whole[1]:>6.0f}",
            flush=True,
        )
    for name, ex in _db_replies().items():

        def scan(ex: Exchange = ex) -> None:
            # inspect() takes the payload off: each run gets its own attributes.
            ddr_stage.inspect(dataclasses.replace(ex, attrs=dict(ex.attrs)))

        ddr = _cpu_us(scan, n)
        print(f"{name:<28} {'-':>17} {ddr[0]:>8.0f} / {ddr[1]:>6.0f}", flush=True)
    engine.close()


# stop_agent's 2 s, plus the agent's own exit.
STOP_GRACE_S = 3.0


def highest_lossless(
    node: Node,
    client: Pod,
    server: Pod,
    rates: Sequence[int],
    seconds: int,
    work: Path,
    agent_args: Sequence[str],
) -> int:
    best = 0
    for rate in rates:
        # Loading the CRS takes a moment more than the agent alone.
        res = run_rate(node, client, server, rate, seconds, work, agent_args)
        # A stage that lags holds up to queue_size (4096) exchanges and
        # inspects them after the load: kept up means drained within the
        # 2 s stop_agent grants before interrupting the agent.
        kept_up = res["stop_s"] <= STOP_GRACE_S
        lossless = (
            res["loss"] <= 0 and not res["uninspected"] and not res["capture_dropped"] and kept_up
        )
        print(
            f"  {' '.join(agent_args) or 'off':<12} {rate:>7}/s sent {res['sent']:>7.0f} "
            f"reported {res['reported']:>7.0f} uninspected {res['uninspected']:>6.0f} "
            f"agent CPU {res['agent_cpu_pct']:>5.1f}% "
            f"{1e6 * res['agent_cpu_total_s'] / max(res['sent'], 1):>5.0f} µs/request "
            f"stop {res['stop_s']:>4.1f} s "
            f"load {os.getloadavg()[0]:>5.2f} {'lossless' if lossless else 'LOSS'}",
            flush=True,
        )
        if not lossless:
            break
        best = rate
    return best


def live(seconds: int, rates_off: Sequence[int], rates_on: Sequence[int]) -> None:
    ensure_root()
    with nginx_pods("10.254.9.0/24", "flowprobe-secbench-") as (node, client, server, work):
        print(f"highest lossless live rate, {seconds} s per step (h2load GET -> nginx)")
        off = highest_lossless(node, client, server, rates_off, seconds, work, [])
        on = highest_lossless(node, client, server, rates_on, seconds, work, ["--waf", "--ddr"])
        print(f"security off: {off}/s lossless; CRS + DDR on: {on}/s lossless")


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__)
    ap.add_argument("--runs", type=int, default=500, help="offline runs per exchange shape")
    ap.add_argument("--seconds", type=int, default=10, help="live: seconds per rate step")
    ap.add_argument("--rates-off", default="1000,2000,4000,8000,16000")
    ap.add_argument("--rates-on", default="100,200,400,800,1600,3200")
    ap.add_argument("--offline-only", action="store_true")
    args = ap.parse_args()
    print(f"load average before: {' '.join(f'{x:.2f}' for x in os.getloadavg())}")
    offline(args.runs)
    if not args.offline_only:
        live(
            args.seconds,
            [int(x) for x in args.rates_off.split(",")],
            [int(x) for x in args.rates_on.split(",")],
        )
    print(f"load average after: {' '.join(f'{x:.2f}' for x in os.getloadavg())}")


if __name__ == "__main__":
    main()
