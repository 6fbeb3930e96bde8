"""``make demo``: the agent's main job on an embedded default, no cluster needed.

Builds a node namespace with five pods (frontend -> api -> redis, postgres;
frontend -> dns), runs real servers and a load generator in them, captures on
the node side with ``flowprobe-agent capture`` (live summary on a terminal),
writes every exchange to ``out/demo-exchanges.jsonl`` and removes every
namespace and process it made, also on Ctrl-C or failure.

When an OTLP collector answers on 127.0.0.1:4317 (``make backends``) or
``FLOWPROBE_OTLP_ENDPOINT`` is set, the agent also exports spans and metrics
there, through a forwarder from the node namespace (whose loopback is not the
machine's), and its own ``/metrics`` is forwarded to 127.0.0.1:9464, where
``otel/prometheus.yml`` scrapes it.
"""

from __future__ import annotations

import argparse
import contextlib
import json
import os
import signal
import socket
import subprocess
import sys
import tempfile
import time
import urllib.parse
from dataclasses import dataclass
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

from flowprobe.devenv.netns import Node, Pod
from flowprobe.devenv.nsproxy import Forwarder
from flowprobe.devenv.servers import ensure_root, start_dns, start_http, start_postgres, start_redis

DEFAULT_OTLP_ENDPOINT = "http://127.0.0.1:4317"
# Where otel/prometheus.yml looks for an agent's own /metrics.
DEFAULT_AGENT_METRICS_PORT = 9464
# Inside the node namespace; only the forwarder connects to it.
_NODE_METRICS_PORT = 9464


@dataclass(frozen=True)
class Export:
    """Where the demo's agent sends OTLP, as addresses of this machine (not the node namespace).

    ``metrics_port``: machine port the agent's ``/metrics`` is forwarded to
    (None: not served). ``service_prefix`` goes before every pod's
    ``service.name`` (tests keep runs apart with it). The URLs are only printed.
    """

    otlp_endpoint: str
    metrics_port: int | None = DEFAULT_AGENT_METRICS_PORT
    service_prefix: str = ""
    # The SDK variable in milliseconds; shorter than the agent's 15 s so the
    # dashboards fill while a short demo runs.
    metric_interval_ms: int = 5000
    jaeger_url: str = "http://127.0.0.1:16686"
    prometheus_url: str = "http://127.0.0.1:9090"


def find_export() -> Export | None:
    """FLOWPROBE_OTLP_ENDPOINT if set, else the local backends if their collector answers."""
    endpoint = os.environ.get("FLOWPROBE_OTLP_ENDPOINT", "").strip()
    if endpoint:
        return Export(endpoint)
    with socket.socket() as s:
        s.settimeout(0.5)
        if s.connect_ex(("127.0.0.1", 4317)) == 0:
            return Export(DEFAULT_OTLP_ENDPOINT)
    return None


def _where_to_look(export: Export, since: float | None = None) -> str:
    p = export.service_prefix
    if since is None:
        window = "query.start_time_min=<RFC3339>&query.start_time_max=<RFC3339>"
    else:
        t0 = datetime.fromtimestamp(since - 60, UTC).strftime("%Y-%m-%dT%H:%M:%SZ")
        t1 = datetime.fromtimestamp(time.time() + 60, UTC).strftime("%Y-%m-%dT%H:%M:%SZ")
        window = f"query.start_time_min={t0}&query.start_time_max={t1}"
    return (
        f"  Jaeger API   {export.jaeger_url}/api/v3/services\n"
        f"               {export.jaeger_url}/api/v3/operations?service={p}api\n"
        f"               {export.jaeger_url}/api/v3/traces?query.service_name={p}api"
        f"&{window}&query.num_traces=20\n"
        f"  Prometheus   {export.prometheus_url}/graph "
        "(e.g. sum by (flowprobe_client_service, flowprobe_server_service) "
        "(rate(flowprobe_edge_exchanges_total[1m])))\n"
        "  Grafana      dashboards in otel/grafana/ (docs/backends.md)"
    )


def _export_args(
    export: Export, node: Node, pods: dict[str, Pod], stack: contextlib.ExitStack[bool | None]
) -> list[str]:
    """Forwarders for OTLP (node -> machine) and /metrics (machine -> node); the agent's flags."""
    url = urllib.parse.urlsplit(export.otlp_endpoint)
    if url.scheme != "http" or url.hostname is None:
        # Through the forwarder the agent connects to 127.0.0.1, which a TLS
        # certificate for the real host would not match.
        raise RuntimeError(
            f"the demo exports to a plaintext http://host:port endpoint, not {url.geturl()!r}"
        )
    port = url.port or 4317
    stack.enter_context(
        Forwarder(("127.0.0.1", port), (url.hostname, port), listen_netns=node.netns)
    )
    # --anomalies: the top-N panels of the service map dashboard have data.
    args = ["--otlp-endpoint", f"http://127.0.0.1:{port}", "--anomalies"]
    for name, pod in pods.items():
        args += ["--service-name", f"{pod.ip}={export.service_prefix}{name}"]
    if export.metrics_port is not None:
        fwd = Forwarder(
            ("127.0.0.1", export.metrics_port),
            ("127.0.0.1", _NODE_METRICS_PORT),
            target_netns=node.netns,
        )
        try:
            stack.enter_context(fwd)
        except OSError as exc:
            # Another agent may hold the port; the OTLP copy of the
            # self-metrics still reaches Prometheus through the collector.
            print(f"agent /metrics not forwarded to port {export.metrics_port}: {exc}")
        else:
            args += ["--metrics-port", str(_NODE_METRICS_PORT), "--metrics-address", "127.0.0.1"]
    return args


def run_demo(
    requests: int,
    rate: float,
    out: Path,
    dns_lookups: int = 100,
    export: Export | None = None,
    connections: int = 4,
) -> tuple[dict[str, Any], list[dict[str, Any]]]:
    """Run the whole demo; return what the load generator sent and every record written."""
    ensure_root()
    out.parent.mkdir(parents=True, exist_ok=True)
    with (
        tempfile.TemporaryDirectory(prefix="flowprobe-demo-") as tmp,
        Node(subnet="10.252.0.0/24") as node,
        contextlib.ExitStack() as stack,
    ):
        work = Path(tmp)
        pods = {n: node.add_pod(n) for n in ("frontend", "api", "redis", "postgres", "dns")}
        print("pods:", ", ".join(f"{n}={p.ip}" for n, p in pods.items()), flush=True)
        export_args = _export_args(export, node, pods, stack) if export else []
        env = dict(os.environ)
        if export:
            env.setdefault("OTEL_METRIC_EXPORT_INTERVAL", str(export.metric_interval_ms))
            # otel/collector.yaml has no logs pipeline: alerts (too short a
            # demo to pass the baselines' warm-up anyway) are not sent.
            env.setdefault("OTEL_LOGS_EXPORTER", "none")
        start_redis(pods["redis"], work)
        start_postgres(pods["postgres"], work / "pg")
        start_dns(pods["dns"], {"api.demo.local": pods["api"].ip})
        start_http(
            pods["api"], 8080, "flowprobe.devenv.demoapp", pods["redis"].ip, pods["postgres"].ip
        )
        agent = node.spawn_agent(
            [
                "--interface",
                "any",
                "--filter",
                # Loopback carries the agent's own OTLP and /metrics traffic
                # (the forwarders): not demo traffic, and exporting it would
                # feed back into itself.
                "inbound and not net 127.0.0.0/8",
                "--summary",
                "--output",
                str(out),
                "--connections",
                *export_args,
            ],
            env=env,
        )
        if export:
            print(f"exporting to {export.otlp_endpoint}; look at:\n{_where_to_look(export)}")
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
                "--connections",
                str(connections),
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
    ap.add_argument(
        "--no-export",
        action="store_true",
        help="do not export even if a collector answers on 127.0.0.1:4317",
    )
    args = ap.parse_args(argv)
    out = Path(args.output).resolve()
    export = None if args.no_export else find_export()
    started = time.time()
    sent, records = run_demo(args.requests, args.rate, out, export=export)
    by_proto: dict[str, int] = {}
    for r in records:
        if r["flowprobe.record"] == "exchange":
            by_proto[r["flowprobe.protocol"]] = by_proto.get(r["flowprobe.protocol"], 0) + 1
    print(f"\nload generator sent: {sent}")
    print(f"probe reported exchanges by protocol: {by_proto}")
    print(f"records written to {out}")
    if export:
        print(
            f"spans and metrics were sent to {export.otlp_endpoint}:\n"
            + _where_to_look(export, since=started)
        )
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
