"""A bounded load generator run inside the "frontend" pod.

Sends ``--requests`` HTTP GETs over ``--connections`` keep-alive connections at
about ``--rate`` per second, and ``--dns`` lookups, then prints what it sent as
JSON (the demo and tests compare it with what the probe reports).
"""

from __future__ import annotations

import argparse
import http.client
import json
import random
import threading
import time
from collections import Counter

import dns.message
import dns.query
import dns.rcode


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--target", required=True)
    ap.add_argument("--port", type=int, default=8080)
    ap.add_argument("--requests", type=int, default=1000)
    ap.add_argument("--rate", type=float, default=200.0)
    ap.add_argument("--connections", type=int, default=4)
    ap.add_argument("--dns-server")
    ap.add_argument("--dns", type=int, default=0)
    ap.add_argument(
        "--paths",
        default="/orders/{n}",
        help="path template ({n} is 0..199), or several separated by commas, used in turn "
        "on each connection (e.g. nine fine ones and /status/500 for a 10%% error ratio)",
    )
    args = ap.parse_args()
    sent: Counter[str] = Counter()
    lock = threading.Lock()
    per_conn = args.requests // args.connections
    templates = args.paths.split(",")
    interval = args.connections / args.rate

    def worker(seed: int) -> None:
        rnd = random.Random(seed)
        conn = http.client.HTTPConnection(args.target, args.port, timeout=10)
        next_t = time.monotonic()
        for i in range(per_conn):
            # Offset per connection: an error path among the templates comes
            # up on one connection at a time, not on all of them at once.
            path = templates[(i + seed) % len(templates)].format(n=rnd.randrange(0, 200))
            conn.request("GET", path)
            resp = conn.getresponse()
            resp.read()
            with lock:
                sent[str(resp.status)] += 1
            next_t += interval
            delay = next_t - time.monotonic()
            if delay > 0:
                time.sleep(delay)
        conn.close()

    threads = [threading.Thread(target=worker, args=(i,)) for i in range(args.connections)]
    for t in threads:
        t.start()
    rcodes: Counter[str] = Counter()
    if args.dns_server:
        # Spread over the HTTP load rather than in one burst at the start, so
        # that metrics exported every few seconds see lookups all along.
        dns_interval = max(0.01, args.requests / args.rate / max(args.dns, 1))
        next_dns = time.monotonic()
        for i in range(args.dns):
            name = "api.demo.local" if i % 5 else f"missing{i}.demo.local"
            q = dns.message.make_query(name, "A")
            r = dns.query.udp(q, args.dns_server, timeout=2)
            rcodes[dns.rcode.to_text(r.rcode())] += 1
            next_dns += dns_interval
            time.sleep(max(0.0, next_dns - time.monotonic()))
    for t in threads:
        t.join()
    print(json.dumps({"http": dict(sent), "dns": dict(rcodes)}))


if __name__ == "__main__":
    main()
