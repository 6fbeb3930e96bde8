"""Live half of ``make bench``: nginx and h2load in namespace pods, the agent capturing.

For each rate, h2load sends HTTP/1.1 requests at that rate for ``--seconds``
and the agent captures on the node side; loss is 1 - reported / succeeded.
The agent's CPU is read from /proc for its Python, tshark and dumpcap
processes. ``--soak`` runs one rate for a long time and samples the agent's
total RSS and disk use every 10 s.

Each rate also runs once with a reference in the agent's place: the same
dumpcap piped into raw tshark (the agent's dissection, preferences and
display filter, no columns, no Python; ``rawtshark``). Its CPU and drops,
and the workload's own CPU (nginx and h2load), show how much of the two
cores a lossless capture at that rate leaves for the agent.
"""

from __future__ import annotations

import argparse
import contextlib
import json
import os
import re
import resource
import shutil
import signal
import subprocess
import tempfile
import threading
import time
from collections.abc import Iterator, Sequence
from pathlib import Path

from flowprobe.agent.capture.tshark import (
    CAPTURE_SETTLE_S,
    Tools,
    dumpcap_args,
    dumpcap_counts,
    interrupt,
)
from flowprobe.agent.config import AgentConfig
from flowprobe.agent.pipeline import Pipeline, Sinks
from flowprobe.devenv.netns import Node, Pod
from flowprobe.devenv.rawtshark import raw_tshark_args

NGINX_CONF = """
worker_processes 1;
daemon off;
pid {work}/nginx.pid;
error_log {work}/nginx.err;
events {{ worker_connections 1024; }}
http {{
  access_log off;
  keepalive_requests 100000000;
  client_body_temp_path {work};
  proxy_temp_path {work};
  fastcgi_temp_path {work};
  uwsgi_temp_path {work};
  scgi_temp_path {work};
  server {{
    listen {ip}:8080;
    location / {{ return 200 "ok\\n"; }}
  }}
}}
"""

TICKS = os.sysconf("SC_CLK_TCK")


def tree_pids(root: int) -> list[int]:
    """``root`` and its descendants (the agent, tshark, dumpcap)."""
    children: dict[int, list[int]] = {}
    for entry in Path("/proc").iterdir():
        if entry.name.isdigit():
            try:
                ppid = int((entry / "stat").read_text().rsplit(")", 1)[1].split()[1])
            except (OSError, IndexError, ValueError):
                continue
            children.setdefault(ppid, []).append(int(entry.name))
    out, todo = [], [root]
    while todo:
        pid = todo.pop()
        out.append(pid)
        todo.extend(children.get(pid, []))
    return out


def children_cpu_s() -> float:
    """CPU seconds of this process's children that exited and were waited for."""
    r = resource.getrusage(resource.RUSAGE_CHILDREN)
    return r.ru_utime + r.ru_stime


def proc_ticks(pid: int) -> tuple[str, int, int] | None:
    """(command name, own CPU ticks, CPU ticks of the children it waited for);
    None once the process is gone."""
    try:
        head, tail = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)
        f = tail.split()
        # utime, stime; cutime, cstime
        return head.split("(", 1)[1], int(f[11]) + int(f[12]), int(f[13]) + int(f[14])
    except (OSError, IndexError, ValueError):
        return None


def cpu_seconds(pids: list[int]) -> float:
    """CPU seconds of ``pids`` and of the children they have waited for: a
    replaced tshark's CPU stays counted in the agent that reaped it."""
    return sum(sum(t[1:]) for pid in pids if (t := proc_ticks(pid))) / TICKS


class CpuByProcess:
    """CPU seconds of a process tree by command name (python, tshark, dumpcap),
    sampled every 0.5 s so that processes that come and go (a replaced
    tshark) count too; up to 0.5 s of an exited process's CPU is missed."""

    def __init__(self, root: int) -> None:
        self.root = root
        self.first: dict[int, int] = {}
        self.last: dict[int, tuple[str, int]] = {}
        self._stop = threading.Event()
        self._sample(first=True)
        self._thread = threading.Thread(target=self._run, daemon=True)
        self._thread.start()

    def _sample(self, first: bool = False) -> None:
        for pid in tree_pids(self.root):
            if (t := proc_ticks(pid)) is None:
                continue
            comm, ticks, _ = t
            if first:
                self.first[pid] = ticks
            self.last[pid] = (comm, ticks)

    def _run(self) -> None:
        while not self._stop.wait(0.5):
            self._sample()

    def stop(self) -> dict[str, float]:
        """Seconds of CPU per command name since the start."""
        self._stop.set()
        self._thread.join()
        self._sample()
        out: dict[str, float] = {}
        for pid, (comm, ticks) in self.last.items():
            name = "python" if comm.startswith("python") else comm
            out[name] = out.get(name, 0.0) + (ticks - self.first.get(pid, 0)) / TICKS
        return out


def rss_mb(pids: list[int]) -> float:
    total = 0
    for pid in pids:
        try:
            for line in Path(f"/proc/{pid}/status").read_text().splitlines():
                if line.startswith("VmRSS:"):
                    total += int(line.split()[1])
        except OSError:
            pass
    return total / 1024


def spawn_agent(
    node: Node, stats_file: Path, agent_args: Sequence[str] = ()
) -> subprocess.Popen[bytes]:
    """The agent capturing what reaches nginx, exchanges to /dev/null, counters to ``stats_file``."""
    return node.spawn_agent(
        [
            "-i",
            "any",
            "-f",
            "inbound and tcp port 8080",
            "--output",
            "/dev/null",
            "--stats",
            str(stats_file),
            *agent_args,
        ]
    )


def stop_agent(agent: subprocess.Popen[bytes]) -> None:
    time.sleep(2.0)  # let the pipeline drain before stopping
    os.killpg(agent.pid, signal.SIGINT)
    agent.wait(timeout=120)


def h2load(server: Pod, rate: int, seconds: int) -> list[str]:
    """h2load argv: HTTP/1.1 GETs to nginx at ``rate``/s, over 8 connections from 800/s."""
    conns = 8 if rate >= 800 else 1
    return [
        "h2load",
        "--h1",
        "-c",
        str(conns),
        "-t",
        "1",
        "--rps",
        str(rate / conns),
        "-D",
        str(seconds),
        f"http://{server.ip}:8080/",
    ]


def succeeded(h2load_out: str) -> int | None:
    """The succeeded-requests count of h2load's summary; None if it printed none."""
    m = re.search(r"requests: \d+ total, \d+ started, \d+ done, (\d+) succeeded", h2load_out)
    return int(m.group(1)) if m else None


@contextlib.contextmanager
def nginx_pods(subnet: str, prefix: str) -> Iterator[tuple[Node, Pod, Pod, Path]]:
    """A node with a load pod and an nginx pod serving on 8080: (node, client, server, work dir)."""
    with tempfile.TemporaryDirectory(prefix=prefix) as tmp, Node(subnet=subnet) as node:
        work = Path(tmp)
        client, server = node.add_pod("load"), node.add_pod("nginx")
        (work / "nginx.conf").write_text(NGINX_CONF.format(work=work, ip=server.ip))
        server.spawn(["/usr/sbin/nginx", "-c", str(work / "nginx.conf")])
        server.wait_port(8080)
        yield node, client, server, work


def run_rate(
    node: Node,
    client: Pod,
    server: Pod,
    rate: int,
    seconds: int,
    work: Path,
    agent_args: Sequence[str] = (),
) -> dict[str, float]:
    """One rate; ``agent_args`` are extra agent flags (secbench turns the WAF on)."""
    stats_file = work / f"stats-{rate}.json"
    agent = spawn_agent(node, stats_file, agent_args)
    pids = tree_pids(agent.pid)
    cpu0, t0 = cpu_seconds(pids), time.monotonic()
    by_process = CpuByProcess(agent.pid)
    nginx = tree_pids(server.processes[0].pid)
    nginx0, load0 = cpu_seconds(nginx), children_cpu_s()
    r = client.run(h2load(server, rate, seconds))
    cpu1, t1 = cpu_seconds(tree_pids(agent.pid)), time.monotonic()
    workload = cpu_seconds(nginx) - nginx0 + children_cpu_s() - load0
    split = by_process.stop()
    # The agent is this process's child: its CPU (and its children's) is
    # counted here once it has been waited for.
    ru0 = resource.getrusage(resource.RUSAGE_CHILDREN)
    stop_agent(agent)
    ru1 = resource.getrusage(resource.RUSAGE_CHILDREN)
    stop_s = time.monotonic() - t1
    cpu_total = ru1.ru_utime + ru1.ru_stime - ru0.ru_utime - ru0.ru_stime
    sent = succeeded(r.stdout)
    if sent is None:
        raise SystemExit(f"h2load failed: {r.stdout[-500:]} {r.stderr[-500:]}")
    stats = json.loads(stats_file.read_text())
    seen = stats["exchanges"]
    return {
        "rate": rate,
        "sent": sent,
        "reported": seen,
        "loss": 1 - seen / sent if sent else 0.0,
        "achieved_rps": sent / seconds,
        "agent_cpu_pct": 100 * (cpu1 - cpu0) / (t1 - t0),
        "workload_cpu_pct": 100 * workload / (t1 - t0),
        **{f"{name}_cpu_pct": 100 * cpu / (t1 - t0) for name, cpu in split.items()},
        # The agent's whole life (start-up, the load, and what it still had
        # to process after it: a lagging security stage drains its queue).
        "agent_cpu_total_s": cpu_total,
        "stop_s": stop_s,
        "capture_dropped": stats["capture_dropped"],
        "tshark_rotations": stats["tshark_rotations"],
        # Passed on without WAF/DDR inspection (security stage queue full).
        "uninspected": sum(stats.get("security", {}).get(k, 0) for k in ("skipped", "dropped")),
    }


def run_reference(
    node: Node, client: Pod, server: Pod, rate: int, seconds: int, work: Path
) -> dict[str, float]:
    """One rate with raw tshark behind the agent's dumpcap in the agent's place."""
    tools = Tools.find()
    err_path = work / f"ref-dumpcap-{rate}.err"
    with err_path.open("wb") as err:
        dumpcap = node.spawn_node(
            dumpcap_args(tools, ["any"], "inbound and tcp port 8080", 65535),
            stdout=subprocess.PIPE,
            stderr=err,
        )
    assert dumpcap.stdout is not None
    tshark = node.spawn_node(
        raw_tshark_args(tools, Pipeline(AgentConfig(), Sinks()).tshark_options, "-", live=True),
        stdin=dumpcap.stdout,
        stdout=subprocess.DEVNULL,
        stderr=subprocess.DEVNULL,
    )
    dumpcap.stdout.close()
    deadline = time.monotonic() + 30
    while b"Capturing on" not in err_path.read_bytes():
        if dumpcap.poll() is not None or time.monotonic() > deadline:
            raise SystemExit(f"reference dumpcap did not start: {err_path.read_text()}")
        time.sleep(0.05)
    time.sleep(CAPTURE_SETTLE_S)
    pids = [dumpcap.pid, tshark.pid]
    nginx = tree_pids(server.processes[0].pid)
    cpu0, nginx0, load0, t0 = (
        cpu_seconds(pids),
        cpu_seconds(nginx),
        children_cpu_s(),
        time.monotonic(),
    )
    client.run(h2load(server, rate, seconds))
    t1 = time.monotonic()
    cpu1, workload = cpu_seconds(pids), cpu_seconds(nginx) - nginx0 + children_cpu_s() - load0
    time.sleep(2.0)  # as stop_agent: let tshark catch up before the capture stops
    interrupt(dumpcap)
    tshark.wait(timeout=120)
    counts = dumpcap_counts(err_path.read_text())
    return {
        "raw_cpu_pct": 100 * (cpu1 - cpu0) / (t1 - t0),
        "workload_cpu_pct": 100 * workload / (t1 - t0),
        "capture_dropped": counts[1] if counts else float("nan"),
    }


def soak(
    node: Node,
    client: Pod,
    server: Pod,
    rate: int,
    seconds: int,
    work: Path,
    agent_args: Sequence[str] = (),
) -> None:
    stats_file = work / "soak-stats.json"
    agent = spawn_agent(node, stats_file, agent_args)
    load = subprocess.Popen(
        client.cmd(h2load(server, rate, seconds)), stdout=subprocess.PIPE, text=True
    )
    tmp = Path(tempfile.gettempdir())
    print(f"{'t s':>5} {'RSS MB':>8} {'/tmp MB':>8}")
    start = time.monotonic()
    # Sampled every second, printed every 10 s: the peak between prints
    # (a tshark replacement) is reported too.
    peak = 0.0
    tick = 0
    while load.poll() is None:
        rss = rss_mb(tree_pids(agent.pid))
        peak = max(peak, rss)
        if tick % 10 == 0:
            used = sum(f.stat().st_size for f in tmp.glob("wireshark_*") if f.is_file()) / 1e6
            print(f"{time.monotonic() - start:5.0f} {rss:8.1f} {used:8.1f}", flush=True)
        tick += 1
        time.sleep(1)
    stop_agent(agent)
    stats = json.loads(stats_file.read_text())
    out = load.stdout.read() if load.stdout else ""
    sent = succeeded(out) or 0
    print(
        f"peak RSS (1 s sampling) {peak:.1f} MB; requests {sent}, exchanges {stats['exchanges']}, "
        f"dumpcap dropped {stats['capture_dropped']}, tshark replaced {stats['tshark_rotations']}x"
    )


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__)
    ap.add_argument("--rates", default="1000,5000,10000,15000,20000,25000")
    ap.add_argument("--seconds", type=int, default=60)
    ap.add_argument("--soak", type=int, default=0, metavar="SECONDS", help="run a soak instead")
    ap.add_argument("--soak-rate", type=int, default=10000)
    ap.add_argument(
        "--agent-args", default="", help="extra agent flags, e.g. '--tshark-rss-limit 400'"
    )
    ap.add_argument(
        "--no-reference",
        dest="reference",
        action="store_false",
        help="skip the raw-tshark run at each rate",
    )
    args = ap.parse_args()
    if not shutil.which("nginx") and not Path("/usr/sbin/nginx").exists():
        raise SystemExit("nginx missing: apt-get install nginx-light nghttp2-client")
    with nginx_pods("10.254.0.0/24", "flowprobe-live-") as (node, client, server, work):
        if args.soak:
            soak(node, client, server, args.soak_rate, args.soak, work, args.agent_args.split())
            return
        print(
            f"{'target/s':>9} {'achieved/s':>10} {'sent':>9} {'reported':>9} {'loss':>8} "
            f"{'agent CPU%':>10} {'py/tshark/dumpcap':>17} {'drops':>8} {'rotations':>9} "
            f"{'workload CPU%':>13} | "
            f"{'raw tshark CPU%':>15} {'drops':>8} {'workload CPU%':>13} {'agent/raw':>9}"
        )
        lossless: list[int] = []
        raw_lossless: list[int] = []
        for rate in (int(x) for x in args.rates.split(",")):
            res = run_rate(node, client, server, rate, args.seconds, work, args.agent_args.split())
            split = "/".join(
                f"{res.get(f'{name}_cpu_pct', 0.0):.0f}" for name in ("python", "tshark", "dumpcap")
            )
            line = (
                f"{rate:>9} {res['achieved_rps']:>10.0f} {res['sent']:>9.0f} {res['reported']:>9.0f} "
                f"{res['loss']:>8.3%} {res['agent_cpu_pct']:>10.1f} {split:>17} "
                f"{res['capture_dropped']:>8.0f} {res['tshark_rotations']:>9.0f} "
                f"{res['workload_cpu_pct']:>13.1f} |"
            )
            if res["loss"] < 0.001:
                lossless.append(rate)
            if args.reference:
                ref = run_reference(node, client, server, rate, args.seconds, work)
                line += (
                    f" {ref['raw_cpu_pct']:>15.1f} {ref['capture_dropped']:>8.0f} "
                    f"{ref['workload_cpu_pct']:>13.1f} "
                    f"{res['agent_cpu_pct'] / ref['raw_cpu_pct']:>8.2f}x"
                )
                if ref["capture_dropped"] == 0:
                    raw_lossless.append(rate)
            print(line, flush=True)
        print(
            f"highest rate with < 0.1% lost for {args.seconds} s: agent "
            f"{max(lossless, default=0)}/s"
            + (
                f"; raw tshark without drops {max(raw_lossless, default=0)}/s"
                if args.reference
                else ""
            )
        )


if __name__ == "__main__":
    main()
