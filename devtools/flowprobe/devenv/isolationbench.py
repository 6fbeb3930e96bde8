"""What micro-isolation costs: rule matching per exchange, and one ``nft`` block.

1. CPU µs per exchange of ``IsolationEngine.submit`` (the part on the capture
   or security thread) with eight rules of every type, over exchanges that
   match none and over exchanges whose source is already blocked (a flood of
   denied requests). Process CPU time, so a loaded machine stretches it less
   than wall time would.
2. Wall and CPU ms of one block (an ``nft -f`` transaction) in a scratch
   network namespace (root), on the isolation thread, off the capture path.
"""

from __future__ import annotations

import os
import resource
import time

from flowprobe.agent.export.workloads import AddressResolver
from flowprobe.agent.isolation.engine import IsolationEngine
from flowprobe.agent.isolation.nft import NftTable
from flowprobe.agent.sessionize.records import Endpoints, Exchange, Outcome
from flowprobe.api.v1alpha1 import IsolationSpec
from flowprobe.devenv.netns import Node

RULES = {
    "mode": "DryRun",
    "rules": [
        {
            "name": f"admin-{n}",
            "type": "DenyRequest",
            "methods": ["POST", "DELETE"],
            "paths": ["/admin/*", f"/internal/{n}/*"],
            "from": {"cidrs": ["10.0.0.0/8"]},
            "to": {"ports": [8080, 8443]},
        }
        for n in range(6)
    ]
    + [
        {
            "name": "edges",
            "type": "DenyNewEdge",
            "learningSeconds": 0,
            "to": {"cidrs": ["192.0.2.0/24"]},
        },
        {"name": "crs", "type": "BlockOnWafMatch", "minSeverity": "Critical"},
    ],
}


def _exchange(n: int, path: str) -> Exchange:
    start = int(time.time() * 1_000_000)
    return Exchange(
        protocol="http",
        endpoints=Endpoints("tcp", f"10.1.{n // 250}.{n % 250}", 40000, "10.2.0.1", 8080),
        start_us=start,
        end_us=start + 500,
        request_end_us=start + 100,
        response_start_us=start + 400,
        outcome=Outcome.OK,
        attrs={"http.request.method": "GET", "url.path": path},
    )


def matching(count: int = 200_000) -> None:
    engine = IsolationEngine(AddressResolver(), enforce=False)
    engine.configure([("", IsolationSpec.model_validate(RULES))])
    for label, path, method in (
        ("no rule matches", "/orders/42", "GET"),
        ("source already blocked", "/admin/users", "POST"),
    ):
        exchanges = [_exchange(i % 1000, path) for i in range(count)]
        for ex in exchanges:
            ex.attrs["http.request.method"] = method
        t0 = time.process_time()
        for ex in exchanges:
            engine.submit(ex)
        per = (time.process_time() - t0) / count * 1e6
        print(f"isolation matching, {label}: {per:.2f} µs CPU per exchange ({count} exchanges)")


def nft_block(blocks: int = 20) -> None:
    with Node(subnet="10.252.9.0/24") as node:
        table = NftTable(netns=node.netns)
        table.replace()
        children0 = resource.getrusage(resource.RUSAGE_CHILDREN)
        t0 = time.perf_counter()
        for n in range(blocks):
            table.block(f"10.1.0.{n + 1}", "10.2.0.1", 8080, 60)
        wall = (time.perf_counter() - t0) / blocks * 1e3
        c = resource.getrusage(resource.RUSAGE_CHILDREN)
        cpu = (c.ru_utime + c.ru_stime - children0.ru_utime - children0.ru_stime) / blocks * 1e3
        table.delete()
        print(
            f"one nft block: {wall:.1f} ms wall, {cpu:.1f} ms CPU (nft processes), {blocks} blocks"
        )


def main() -> None:
    print(f"load average {os.getloadavg()[0]:.2f} {os.getloadavg()[1]:.2f} (2 cores)")
    matching()
    if os.geteuid() == 0:
        nft_block()


if __name__ == "__main__":
    main()
