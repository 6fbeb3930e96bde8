"""What the anomaly analysis costs (docs/anomalies.md): per exchange, and per ranking.

1. CPU µs per exchange of ``Analyzer.observe`` (on the export process
   thread) over synthetic HTTP exchanges between 50 workloads from 200
   client addresses, one in twenty failing: baselines only (``topN.size:
   0``), then top-N and baselines.
2. CPU ms of one ranking (``Analyzer.collect``, once per metric export).

Process CPU time, so a loaded machine stretches it less than wall time would;
the load average is printed with it.
"""

from __future__ import annotations

import os
import time

from flowprobe.agent.analyze.stage import Analyzer
from flowprobe.agent.config import AnomalyConfig
from flowprobe.agent.export.workloads import Workload
from flowprobe.agent.sessionize.records import Endpoints, Exchange, Outcome, TcpFigures

WORKLOADS, ADDRESSES = 50, 200


def _exchanges(count: int) -> list[tuple[Exchange, Workload, Workload]]:
    workloads = [Workload(f"svc-{n}") for n in range(WORKLOADS)]
    start = int(time.time() * 1_000_000)
    out = []
    for i in range(count):
        at = start + i * 100  # 10 000 exchanges per second of exchange time
        failed = i % 20 == 0
        ex = Exchange(
            protocol="http",
            endpoints=Endpoints("tcp", f"10.1.0.{i % ADDRESSES}", 40000, "10.2.0.1", 8080),
            start_us=at,
            end_us=at + 2000 + i % 7 * 300,
            request_end_us=at + 100,
            response_start_us=at + 1900,
            outcome=Outcome.OK,
            attrs={
                "http.request.method": "GET",
                "url.path": "/items/1",
                "http.response.status_code": 500 if failed else 200,
            },
            figures=TcpFigures(client_bytes=80, server_bytes=300),
        )
        out.append((ex, workloads[i % WORKLOADS], workloads[(i * 7 + 3) % WORKLOADS]))
    return out


def observe(count: int = 100_000) -> None:
    exchanges = _exchanges(count)
    for label, top_n in (("baselines only (topN.size: 0)", 0), ("top-N + baselines", 10)):
        analyzer = Analyzer(AnomalyConfig(enabled=True, top_n=top_n))
        t0 = time.process_time()
        for ex, client, server in exchanges:
            analyzer.observe(ex, client, server)
        per = (time.process_time() - t0) / count * 1e6
        print(f"anomalies, {label}: {per:.1f} µs CPU per exchange ({count} exchanges)")
        if top_n:
            members = ADDRESSES + 2 * WORKLOADS  # client addresses, client and server workloads
            t0 = time.process_time()
            analyzer.collect(time.time_ns())
            ms = (time.process_time() - t0) * 1e3
            print(f"anomalies, one ranking: {ms:.1f} ms CPU ({members} members)")
        assert analyzer.errors == 0


def main() -> None:
    print(f"load average {' '.join(f'{x:.2f}' for x in os.getloadavg())} (2 cores)")
    observe()


if __name__ == "__main__":
    main()
