"""``make demo``: the agent's main job on an embedded default, no cluster needed.

Builds a node namespace with five pods (frontend -> api -> redis, postgres;
frontend -> dns), runs real servers and a load generator in them, captures on
the node side with ``flowprobe-agent capture`` (live summary on a terminal),
writes every exchange to ``out/demo-exchanges.jsonl`` and removes every
namespace and process it made, also on Ctrl-C or failure.
"""

from __future__ import annotations

import argparse
import json
import os
import signal
import subprocess
import sys
import tempfile
import time
from pathlib import Path

from flowprobe.devenv.netns import Node
from flowprobe.devenv.servers import ensure_root, start_dns, start_http, start_postgres, start_redis


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(prog="flowprobe-demo", description=__doc__)
    ap.add_argument("--requests", type=int, default=3000)
    ap.add_argument("--rate", type=float, default=300.0)
    ap.add_argument("--output", default="out/demo-exchanges.jsonl")
    args = ap.parse_args(argv)
    ensure_root()
    out = Path(args.output).resolve()
    out.parent.mkdir(parents=True, exist_ok=True)
    with (
        tempfile.TemporaryDirectory(prefix="flowprobe-demo-") as tmp,
        Node(subnet="10.252.0.0/24") as node,
    ):
        work = Path(tmp)
        pods = {n: node.add_pod(n) for n in ("frontend", "api", "redis", "postgres", "dns")}
        print("pods:", ", ".join(f"{n}={p.ip}" for n, p in pods.items()), flush=True)
        start_redis(pods["redis"], work)
        start_postgres(pods["postgres"], work / "pg")
        start_dns(pods["dns"], {"api.demo.local": pods["api"].ip})
        start_http(
            pods["api"], 8080, "flowprobe.devenv.demoapp", pods["redis"].ip, pods["postgres"].ip
        )
        agent = node.spawn_node(
            [
                sys.executable,
                "-m",
                "flowprobe.agent",
                "capture",
                "--interface",
                "any",
                "--filter",
                "inbound",
                "--summary",
                "--output",
                str(out),
                "--connections",
            ],
        )
        time.sleep(2.0)  # dumpcap opens the interface
        print(
            f"load: {args.requests} HTTP requests at ~{args.rate:.0f}/s plus DNS lookups",
            flush=True,
        )
        load = pods["frontend"].run(
            [
                sys.executable,
                "-m",
                "flowprobe.devenv.loadgen",
                "--target",
                pods["api"].ip,
                "--requests",
                str(args.requests),
                "--rate",
                str(args.rate),
                "--dns-server",
                pods["dns"].ip,
                "--dns",
                "100",
            ],
        )
        time.sleep(1.5)
        os.killpg(agent.pid, signal.SIGINT)
        agent.wait(timeout=60)
        if load.returncode:
            print(load.stderr, file=sys.stderr)
            return 1
        sent = json.loads(load.stdout)
        records = [json.loads(ln) for ln in out.read_text().splitlines()]
        exchanges = [r for r in records if r["flowprobe.record"] == "exchange"]
        by_proto: dict[str, int] = {}
        for r in exchanges:
            by_proto[r["flowprobe.protocol"]] = by_proto.get(r["flowprobe.protocol"], 0) + 1
        print(f"\nload generator sent: {sent}")
        print(f"probe reported exchanges by protocol: {by_proto}")
        print(f"records written to {out}")
    return 0


if __name__ == "__main__":
    try:
        sys.exit(main())
    except KeyboardInterrupt:
        print("\ninterrupted; namespaces and processes removed", file=sys.stderr)
        sys.exit(130)
    except subprocess.CalledProcessError as exc:
        print(f"demo failed: {exc}: {exc.stderr}", file=sys.stderr)
        sys.exit(1)
