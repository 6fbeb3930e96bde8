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
from typing import Any

from flowprobe.devenv.netns import Node
from flowprobe.devenv.servers import ensure_root, start_dns, start_http, start_postgres, start_redis


def run_demo(
    requests: int, rate: float, out: Path, dns_lookups: int = 100
) -> tuple[dict[str, Any], list[dict[str, Any]]]:
    """Run the whole demo; return what the load generator sent and every record written."""
    ensure_root()
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
            f"load: {requests} HTTP requests at ~{rate:.0f}/s plus {dns_lookups} DNS lookups",
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
                str(requests),
                "--rate",
                str(rate),
                "--dns-server",
                pods["dns"].ip,
                "--dns",
                str(dns_lookups),
            ],
        )
        time.sleep(1.5)
        os.killpg(agent.pid, signal.SIGINT)
        agent.wait(timeout=60)
        if load.returncode:
            raise RuntimeError(f"load generator failed: {load.stderr}")
        sent: dict[str, Any] = json.loads(load.stdout)
        records = [json.loads(ln) for ln in out.read_text().splitlines()]
    return sent, records


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(prog="flowprobe-demo", description=__doc__)
    ap.add_argument("--requests", type=int, default=3000)
    ap.add_argument("--rate", type=float, default=300.0)
    ap.add_argument("--output", default="out/demo-exchanges.jsonl")
    args = ap.parse_args(argv)
    out = Path(args.output).resolve()
    sent, records = run_demo(args.requests, args.rate, out)
    by_proto: dict[str, int] = {}
    for r in records:
        if r["flowprobe.record"] == "exchange":
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
    except RuntimeError as exc:
        print(f"demo failed: {exc}", file=sys.stderr)
        sys.exit(1)
