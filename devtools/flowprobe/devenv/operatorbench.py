"""The operator at scale: one ProbePolicy on a cluster of kwok nodes and many pods.

Starts a ``LocalCluster`` (real etcd, kube-apiserver, kube-controller-manager,
kube-scheduler; kwok plays kubelet), installs the CRD, creates fake nodes and
app pods spread over namespaces (the scheduler places them, kwok runs them),
starts the operator as a process (``kopf run -m flowprobe.controller``, as
the chart does), then ``kubectl apply``s one ProbePolicy selecting half of
the pods and measures

- the time until the DaemonSet exists, until every agent pod is scheduled,
  until every agent pod is Running and Ready (kwok), and until the policy
  reports ``Ready=True`` for its current generation;
- the operator's CPU (``/proc/<pid>/stat`` utime+stime) and memory (VmRSS,
  peak VmHWM) before, during and after;
- every reconcile run (start, wall and CPU time): the operator is started
  through a small shim that wraps ``Reconciler.reconcile_once`` with a timer
  and otherwise runs ``kopf run`` unchanged.

App pods are bare pods POSTed by a thread pool over keep-alive connections
(one request per pod, no client-side throttling; ``kubectl apply`` of a list
also sends one object at a time, plus a GET each); the policy itself goes
through ``kubectl apply`` as a user's would.

Acceptance (docs/performance.md): Ready within 10 s of the apply, operator
RSS below 200 MB.

    python -m flowprobe.devenv.operatorbench                 # 200 nodes, 5,000 pods
    python -m flowprobe.devenv.operatorbench --nodes 20 --pods 500
    python -m flowprobe.devenv.operatorbench --repeat 3      # 3 measurements, one cluster
    python -m flowprobe.devenv.operatorbench --client-limits scale
    python -m flowprobe.devenv.operatorbench --profile       # operator under cProfile

``--client-limits`` sets kube-controller-manager's and kube-scheduler's
client rate limits, which, not the operator, bound how fast 200 agent pods
are created and bound:

- ``upstream`` (default): the binaries' defaults, kcm 20 QPS / burst 30,
  scheduler 50 / 100. The DaemonSet controller alone needs about 10 s for
  200 pods and their Events at 20 QPS.
- ``scale``: kcm ``--kube-api-qps=100 --kube-api-burst=100``, scheduler
  ``--kube-api-qps=100``, the settings Kubernetes' own 5,000-node
  scalability validation runs with (sig-scalability's release reports;
  OpenShift ships kcm at 150 / 300). A real cluster of this size would.
- ``lifted``: 5,000 / 10,000 (kwokctl's ``--disable-qps-limits``), to show
  what is left once the clients do not wait at all.

``--repeat N`` measures N times on one cluster: between measurements the
policy is deleted and the agents are waited away, so each apply starts from
no DaemonSet, as the first did.
"""

from __future__ import annotations

import argparse
import concurrent.futures
import contextlib
import http.client
import json
import os
import pstats
import shutil
import ssl
import statistics
import subprocess
import sys
import tempfile
import threading
import time
import urllib.parse
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from flowprobe.devenv.cluster import HOST, ClusterError, Component, LocalCluster
from flowprobe.devenv.procs import free_ports, log_tail, stop_process

REPO = Path(__file__).resolve().parents[3]
CRDS = REPO / "crds"
OPERATOR_ROOTS = [REPO / "operator", REPO / "node_agent", REPO / "devtools"]

GROUP_VERSION = "flowprobe.io/v1alpha1"
POLICY = "bench"
OPERATOR_NS = "flowprobe-system"
AGENT = "flowprobe-agent"
AGENT_SELECTOR = "app.kubernetes.io/component=agent"
APP_LABEL = "flowprobe-bench"
CAPTURE_LABEL = "flowprobe-bench/capture"
EXPORT = "http://otel-collector.observability:4317"
METADATA_ONLY = "application/json;as=PartialObjectMetadataList;g=meta.k8s.io;v=v1,application/json"

READY_LIMIT_S = 10.0
RSS_LIMIT_MB = 200.0
# Extra flags per --client-limits profile, by component (see the module docstring).
CLIENT_LIMITS: dict[str, dict[str, list[str]]] = {
    "upstream": {},
    "scale": {
        "kube-controller-manager": ["--kube-api-qps=100", "--kube-api-burst=100"],
        "kube-scheduler": ["--kube-api-qps=100"],
    },
    "lifted": {
        name: ["--kube-api-qps=5000", "--kube-api-burst=10000"]
        for name in ("kube-controller-manager", "kube-scheduler")
    },
}
_CLK_TCK = os.sysconf("SC_CLK_TCK")


def log(msg: str) -> None:
    print(f"[{time.strftime('%H:%M:%S')}] {msg}", flush=True)


# --------------------------------------------------------------------------
# Cluster and API access


class BenchCluster(LocalCluster):
    """LocalCluster with kcm's and the scheduler's client rate limits of a profile."""

    def __init__(
        self, workdir: Path | None, *, keep: bool, client_limits: str, start_timeout: float = 120
    ) -> None:
        super().__init__(workdir, keep=keep, start_timeout=start_timeout)
        self.client_limits = client_limits

    def _make_components(self, bins: dict[str, Path]) -> dict[str, Component]:
        comps = super()._make_components(bins)
        for name, flags in CLIENT_LIMITS[self.client_limits].items():
            comps[name].argv.extend(flags)
        return comps


class Api:
    """Keep-alive HTTPS to the API server as the cluster admin, one connection per thread."""

    def __init__(self, cluster: LocalCluster) -> None:
        pki = cluster.pki
        self._ctx = ssl.create_default_context(cafile=str(pki.ca_crt))
        self._ctx.load_cert_chain(str(pki.admin_crt), str(pki.admin_key))
        self._port = cluster.ports.apiserver
        self._local = threading.local()

    def _conn(self) -> http.client.HTTPSConnection:
        conn: http.client.HTTPSConnection | None = getattr(self._local, "conn", None)
        if conn is None:
            conn = http.client.HTTPSConnection(HOST, self._port, context=self._ctx, timeout=60)
            self._local.conn = conn
        return conn

    def call(
        self,
        method: str,
        path: str,
        body: Any = None,
        *,
        accept: str = "application/json",
        query: dict[str, str] | None = None,
    ) -> tuple[int, Any]:
        url = path + ("?" + urllib.parse.urlencode(query) if query else "")
        data = None if body is None else json.dumps(body).encode()
        headers = {"Accept": accept}
        if data is not None:
            headers["Content-Type"] = "application/json"
        for attempt in range(3):
            conn = self._conn()
            try:
                conn.request(method, url, body=data, headers=headers)
                resp = conn.getresponse()
                raw = resp.read()
            except (OSError, http.client.HTTPException):
                conn.close()
                self._local.conn = None
                if attempt == 2:
                    raise
                time.sleep(0.2)
                continue
            return resp.status, (json.loads(raw) if raw else None)
        raise AssertionError("unreachable")

    def watch(self, path: str, **query: str) -> Iterator[dict[str, Any]]:
        """Watch events of a collection on a connection of its own (ADDED for what exists)."""
        url = path + "?" + urllib.parse.urlencode({**query, "watch": "1", "timeoutSeconds": "900"})
        conn = http.client.HTTPSConnection(HOST, self._port, context=self._ctx, timeout=900)
        try:
            conn.request("GET", url, headers={"Accept": "application/json"})
            resp = conn.getresponse()
            if resp.status != 200:
                raise ClusterError(f"watch {path}: HTTP {resp.status}: {resp.read()[:500]!r}")
            while line := resp.readline():
                yield json.loads(line)
        finally:
            conn.close()

    def get(self, path: str, **query: str) -> Any:
        status, data = self.call("GET", path, query=query or None)
        if status == 404:
            return None
        if status != 200:
            raise ClusterError(f"GET {path}: HTTP {status}: {data}")
        return data

    def count(self, path: str, *, label: str = "", field_sel: str = "") -> int:
        """Items of a list, page by page, metadata only."""
        query = {"limit": "500"}
        if label:
            query["labelSelector"] = label
        if field_sel:
            query["fieldSelector"] = field_sel
        total = 0
        while True:
            status, page = self.call("GET", path, accept=METADATA_ONLY, query=query)
            if status != 200:
                raise ClusterError(f"GET {path}: HTTP {status}: {page}")
            total += len(page.get("items") or [])
            token = (page.get("metadata") or {}).get("continue")
            if not token:
                return total
            query["continue"] = token


def wait_until(check: Callable[[], bool], what: str, timeout: float, interval: float) -> float:
    """Poll ``check``; the monotonic time it first held."""
    deadline = time.monotonic() + timeout
    while True:
        if check():
            return time.monotonic()
        if time.monotonic() > deadline:
            raise ClusterError(f"timed out after {timeout:.0f} s waiting for {what}")
        time.sleep(interval)


# --------------------------------------------------------------------------
# App workload


@dataclass
class Workload:
    namespaces: list[str]
    captured: list[str]
    pods: int
    created_s: float = 0.0
    scheduled_s: float = 0.0
    running_s: float = 0.0


def _pod(ns: str, i: int, node: str | None) -> dict[str, Any]:
    spec: dict[str, Any] = {
        "containers": [{"name": "app", "image": "registry.invalid/app:1"}],
        "automountServiceAccountToken": False,
        "terminationGracePeriodSeconds": 0,
    }
    if node is not None:
        spec["nodeName"] = node
    return {
        "apiVersion": "v1",
        "kind": "Pod",
        "metadata": {"name": f"app-{i}", "namespace": ns, "labels": {APP_LABEL: "app"}},
        "spec": spec,
    }


def create_workload(
    cluster: LocalCluster,
    api: Api,
    *,
    pods: int,
    namespaces: int,
    nodes: Sequence[str],
    pin: bool,
    workers: int,
    timeout: float,
) -> Workload:
    names = [f"bench-{i:03d}" for i in range(namespaces)]
    captured = names[::2]  # half of the namespaces, so half of the pods
    docs = [
        {
            "apiVersion": "v1",
            "kind": "Namespace",
            "metadata": {
                "name": n,
                "labels": {CAPTURE_LABEL: "yes" if n in captured else "no", APP_LABEL: "ns"},
            },
        }
        for n in names
    ]
    cluster.kubectl(
        "apply", "-f", "-", input=json.dumps({"apiVersion": "v1", "kind": "List", "items": docs})
    )
    # ServiceAccount admission rejects pods until kcm made the namespace's `default` SA.
    wait_until(
        lambda: (
            api.count("/api/v1/serviceaccounts", field_sel="metadata.name=default", label="")
            >= namespaces + 1
        ),
        "default ServiceAccounts in the bench namespaces",
        timeout=120,
        interval=0.5,
    )
    work = Workload(names, captured, pods)
    jobs = [(names[i % namespaces], i, nodes[i % len(nodes)] if pin else None) for i in range(pods)]

    def post(job: tuple[str, int, str | None]) -> None:
        ns, i, node = job
        for _ in range(5):
            status, data = api.call("POST", f"/api/v1/namespaces/{ns}/pods", _pod(ns, i, node))
            if status in (201, 409):
                return
            time.sleep(0.5)  # 429 / 5xx under load
        raise ClusterError(f"creating pod {ns}/app-{i}: HTTP {status}: {data}")

    t0 = time.monotonic()
    with concurrent.futures.ThreadPoolExecutor(workers) as pool:
        for n, _ in enumerate(pool.map(post, jobs), 1):
            if n % 1000 == 0:
                log(f"  {n}/{pods} pods created ({time.monotonic() - t0:.0f} s)")
    work.created_s = time.monotonic() - t0
    log(f"{pods} pods created in {work.created_s:.1f} s ({pods / work.created_s:.0f}/s)")

    pods_path = "/api/v1/pods"
    sel = f"{APP_LABEL}=app"
    last_log = [time.monotonic()]

    def progress(what: str, left: int) -> None:
        if time.monotonic() - last_log[0] > 15:
            last_log[0] = time.monotonic()
            log(f"  {pods - left}/{pods} {what} ({time.monotonic() - t0:.0f} s)")

    def scheduled() -> bool:
        left = api.count(pods_path, label=sel, field_sel="spec.nodeName=")
        progress("scheduled", left)
        return left == 0

    def running() -> bool:
        left = api.count(pods_path, label=sel, field_sel="status.phase!=Running")
        progress("Running", left)
        return left == 0

    work.scheduled_s = wait_until(scheduled, "app pods scheduled", timeout, 1.0) - t0
    log(f"all {pods} pods scheduled {work.scheduled_s:.1f} s after the first create")
    work.running_s = wait_until(running, "app pods Running", timeout, 1.0) - t0
    log(f"all {pods} pods Running {work.running_s:.1f} s after the first create")
    return work


# --------------------------------------------------------------------------
# The operator process and its resource use


@dataclass(frozen=True)
class Sample:
    t: float  # monotonic
    cpu_s: float  # utime + stime
    rss_mb: float
    hwm_mb: float


class ProcSampler:
    """Samples a process's CPU time and memory from /proc every ``interval`` seconds."""

    def __init__(self, pid: int, interval: float = 0.1) -> None:
        self.pid = pid
        self.interval = interval
        self.samples: list[Sample] = []
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, name="proc-sampler", daemon=True)

    def read(self) -> Sample | None:
        try:
            stat = Path(f"/proc/{self.pid}/stat").read_text()
            status = Path(f"/proc/{self.pid}/status").read_text()
        except OSError:
            return None
        # Fields after the parenthesised command name; utime, stime are 14, 15.
        fields = stat[stat.rindex(")") + 2 :].split()
        cpu = (int(fields[11]) + int(fields[12])) / _CLK_TCK
        mem = {
            k: int(v.split()[0]) / 1024
            for k, v in (line.split(":", 1) for line in status.splitlines() if ":" in line)
            if k in ("VmRSS", "VmHWM")
        }
        return Sample(time.monotonic(), cpu, mem.get("VmRSS", 0.0), mem.get("VmHWM", 0.0))

    def _run(self) -> None:
        while not self._stop.is_set():
            s = self.read()
            if s is None:
                return
            self.samples.append(s)
            self._stop.wait(self.interval)

    def start(self) -> None:
        self._thread.start()

    def stop(self) -> None:
        self._stop.set()
        self._thread.join(5)

    def window(self, t0: float, t1: float) -> tuple[float, float, float]:
        """(CPU seconds, max RSS MB, peak HWM MB) between two monotonic times."""
        inside = [s for s in self.samples if t0 <= s.t <= t1]
        before = [s for s in self.samples if s.t <= t0]
        if not inside:
            return 0.0, 0.0, 0.0
        start = before[-1] if before else inside[0]
        return (
            inside[-1].cpu_s - start.cpu_s,
            max(s.rss_mb for s in inside),
            max(s.hwm_mb for s in inside),
        )


# `kopf run` with every reconcile run timed: one JSON line per run on stderr
# (monotonic start, wall and process CPU seconds, whether the run found the
# agent objects in sync and applied nothing). The operator itself is unchanged.
_SHIM = """\
import json, sys, time
from flowprobe.controller import reconcile

_original = reconcile.Reconciler.reconcile_once

async def _timed(self):
    t0, c0 = time.monotonic(), time.process_time()
    result = None
    try:
        result = await _original(self)
        return result
    finally:
        line = {"benchRun": t0, "wall": time.monotonic() - t0, "cpu": time.process_time() - c0,
                "inSync": bool(getattr(result, "in_sync", False))}
        print(json.dumps(line), file=sys.stderr, flush=True)

reconcile.Reconciler.reconcile_once = _timed
sys.argv[0] = "kopf"
from kopf import cli
cli.main()
"""


@dataclass(frozen=True)
class Run:
    start: float  # monotonic, same clock as this process
    wall: float
    cpu: float
    in_sync: bool = False  # applied nothing: the agent objects were as rendered


class Operator:
    """``kopf run -m flowprobe.controller`` as the chart runs it, logs in a file."""

    def __init__(self, workdir: Path, kubeconfig: Path, *, profile: Path | None) -> None:
        self.workdir = workdir
        self.kubeconfig = kubeconfig
        self.profile = profile
        self.log = workdir / "operator.log"
        self.config = workdir / "operator-config.json"
        self.config.write_text(
            json.dumps({"namespace": OPERATOR_NS, "defaultExport": {"endpoint": EXPORT}})
        )
        self.port = free_ports(1, HOST)[0]
        self.proc: subprocess.Popen[bytes] | None = None

    @property
    def pid(self) -> int:
        assert self.proc is not None
        return self.proc.pid

    def start(self) -> None:
        env = dict(
            os.environ,
            KUBECONFIG=str(self.kubeconfig),
            FLOWPROBE_OPERATOR_CONFIG=str(self.config),
            FLOWPROBE_NAMESPACE=OPERATOR_NS,
            PYTHONPATH=os.pathsep.join(
                [*(str(p) for p in OPERATOR_ROOTS), os.environ.get("PYTHONPATH", "")]
            ),
        )
        env.pop("KUBERNETES_SERVICE_HOST", None)
        shim = self.workdir / "operator_shim.py"
        shim.write_text(_SHIM)
        prefix = [sys.executable]
        if self.profile is not None:
            prefix += ["-m", "cProfile", "-o", str(self.profile)]
        argv = [
            *prefix,
            str(shim),
            "run",
            "--module=flowprobe.controller",
            f"--namespace={OPERATOR_NS}",
            f"--liveness=http://{HOST}:{self.port}/healthz",
            "--log-format=json",
            "--standalone",
        ]
        with self.log.open("ab") as out:
            self.proc = subprocess.Popen(
                argv, env=env, stdout=out, stderr=subprocess.STDOUT, cwd=self.workdir
            )

    def health(self) -> dict[str, Any] | None:
        conn = http.client.HTTPConnection(HOST, self.port, timeout=2)
        try:
            conn.request("GET", "/healthz")
            resp = conn.getresponse()
            data: dict[str, Any] = json.loads(resp.read())
            return data if resp.status == 200 else None
        except (OSError, ValueError, http.client.HTTPException):
            return None
        finally:
            conn.close()

    def leading(self) -> bool:
        # kopf caches probe results for 10 s, so this turns true up to 10 s late;
        # it only gates the start of the idle measurement.
        if self.proc is not None and self.proc.poll() is not None:
            raise ClusterError(f"the operator exited ({self.proc.returncode}); log: {self.log}")
        rec = (self.health() or {}).get("reconciler") or {}
        return bool(rec.get("active")) and rec.get("secondsSinceLastSuccess") is not None

    def stop(self) -> None:
        if self.proc is not None:
            stop_process(self.proc, 30)

    def runs(self) -> list[Run]:
        """Reconcile runs so far, from the shim's lines in the log."""
        text = self.log.read_text(errors="replace") if self.log.exists() else ""
        runs = []
        for line in text.splitlines():
            if line.startswith('{"benchRun"'):
                with contextlib.suppress(ValueError, KeyError):
                    d = json.loads(line)
                    runs.append(
                        Run(
                            float(d["benchRun"]),
                            float(d["wall"]),
                            float(d["cpu"]),
                            bool(d.get("inSync")),
                        )
                    )
        return runs

    def log_tail(self, lines: int = 20) -> str:
        return log_tail(self.log, lines)


# --------------------------------------------------------------------------
# The measurement


@dataclass
class Milestones:
    """Monotonic times at which each state was first seen (None: not reached)."""

    apply_start: float = 0.0
    apply_done: float = 0.0
    daemonset: float | None = None
    first_pod: float | None = None
    all_scheduled: float | None = None
    all_ready: float | None = None
    policy_ready: float | None = None
    status_writes: int = 0
    last_status: dict[str, Any] = field(default_factory=dict)

    def rel(self, t: float | None) -> str:
        return "not reached" if t is None else f"{t - self.apply_start:6.2f} s"


def _agent_state(pod: dict[str, Any]) -> tuple[bool, bool]:
    """(scheduled, Running and Ready) of an agent pod."""
    st = pod.get("status") or {}
    conds = {c.get("type"): c.get("status") for c in st.get("conditions") or []}
    scheduled = bool((pod.get("spec") or {}).get("nodeName"))
    return scheduled, st.get("phase") == "Running" and conds.get("Ready") == "True"


def _watch_agents(api: Api, nodes: int, ms: Milestones, done: threading.Event) -> None:
    """Record the DaemonSet and agent-pod milestones.

    A watch, not a poll: listing 200 full pods four times a second would load
    the API server (and these 2 cores) with the measurement itself.
    """
    ds_path = f"/apis/apps/v1/namespaces/{OPERATOR_NS}/daemonsets/{AGENT}"
    while ms.daemonset is None:
        if done.is_set():
            return
        if api.get(ds_path) is not None:
            ms.daemonset = time.monotonic()
        else:
            done.wait(0.1)
    pods: dict[str, tuple[bool, bool]] = {}
    for event in api.watch(f"/api/v1/namespaces/{OPERATOR_NS}/pods", labelSelector=AGENT_SELECTOR):
        now = time.monotonic()
        pod = event["object"]
        name = pod["metadata"]["name"]
        if event["type"] == "DELETED" or pod["metadata"].get("deletionTimestamp"):
            pods.pop(name, None)
        else:
            pods[name] = _agent_state(pod)
        if pods and ms.first_pod is None:
            ms.first_pod = now
        if ms.all_scheduled is None and sum(s for s, _ in pods.values()) >= nodes:
            ms.all_scheduled = now
        if sum(r for _, r in pods.values()) >= nodes:
            ms.all_ready = now
            return
        if done.is_set():
            return


def _policy() -> dict[str, Any]:
    return {
        "apiVersion": GROUP_VERSION,
        "kind": "ProbePolicy",
        "metadata": {"name": POLICY},
        "spec": {
            "namespaceSelector": {"matchLabels": {CAPTURE_LABEL: "yes"}},
            "podSelector": {"matchLabels": {APP_LABEL: "app"}},
            "protocols": ["HTTP", "GRPC", "PostgreSQL"],
            "timeLimit": {"durationSeconds": 3600},
        },
    }


def _ready(policy: dict[str, Any] | None) -> bool:
    if not policy:
        return False
    gen = policy["metadata"].get("generation")
    st = policy.get("status") or {}
    return st.get("observedGeneration") == gen and any(
        c.get("type") == "Ready"
        and c.get("status") == "True"
        and c.get("observedGeneration") == gen
        for c in st.get("conditions") or []
    )


def measure_policy(cluster: LocalCluster, api: Api, nodes: int, timeout: float) -> Milestones:
    ms = Milestones()
    done = threading.Event()
    watcher = threading.Thread(
        target=_watch_agents, args=(api, nodes, ms, done), name="agents", daemon=True
    )
    path = f"/apis/flowprobe.io/v1alpha1/probepolicies/{POLICY}"
    ms.apply_start = time.monotonic()
    cluster.kubectl("apply", "-f", "-", input=json.dumps(_policy()))
    ms.apply_done = time.monotonic()
    watcher.start()
    last_rv = ""
    deadline = ms.apply_start + timeout
    try:
        while time.monotonic() < deadline:
            pol = api.get(path)
            now = time.monotonic()
            if pol is not None:
                rv = pol["metadata"].get("resourceVersion", "")
                if rv != last_rv and pol.get("status"):
                    ms.status_writes += 1
                last_rv = rv
                ms.last_status = pol.get("status") or {}
            if ms.policy_ready is None and _ready(pol):
                ms.policy_ready = now
            if ms.policy_ready is not None and ms.all_ready is not None:
                break
            time.sleep(0.1)
    finally:
        done.set()
        watcher.join(5)
    return ms


# --------------------------------------------------------------------------
# Report


@dataclass
class Result:
    nodes: int
    pods: int
    client_limits: str
    # 1-based measurement number of --repeat, and the 1/5/15 min load averages at the apply.
    number: int
    load: tuple[float, float, float]
    cluster_start_s: float
    nodes_s: float
    work: Workload
    ms: Milestones
    idle: tuple[float, float, float]  # cpu s over idle_s, rss, hwm
    idle_s: float
    during: tuple[float, float, float]
    hold: tuple[float, float, float]
    hold_s: float
    peak_hwm_mb: float
    matched: int
    runs: list[Run]
    hold_start: float
    hold_end: float

    def run_rows(self) -> list[str]:
        ms = self.ms
        end = ms.policy_ready or self.hold_start
        phases = [
            ("apply -> Ready", ms.apply_start, end),
            (f"after Ready ({self.hold_s:.0f} s)", end, self.hold_end),
        ]
        rows = []
        for name, t0, t1 in phases:
            inside = [r for r in self.runs if t0 <= r.start < t1]
            if not inside:
                rows.append(f"  {name + ':':<40} no run")
                continue
            wall = [r.wall for r in inside]
            cpu = [r.cpu for r in inside]
            rows.append(
                f"  {name + ':':<40} {len(inside)} runs "
                f"({sum(r.in_sync for r in inside)} without applies), "
                f"wall mean {sum(wall) / len(wall):.2f} s "
                f"max {max(wall):.2f} s, CPU mean {sum(cpu) / len(cpu):.2f} s "
                f"max {max(cpu):.2f} s"
            )
        return rows

    def report(self) -> tuple[str, bool]:
        ms = self.ms
        ready_s = None if ms.policy_ready is None else ms.policy_ready - ms.apply_start
        end = ms.policy_ready or ms.all_ready or ms.apply_start
        span = max(end - ms.apply_start, 1e-9)
        ok_ready = ready_s is not None and ready_s <= READY_LIMIT_S
        ok_rss = self.peak_hwm_mb < RSS_LIMIT_MB

        def row(label: str, value: str) -> str:
            return f"  {label:<40} {value}"

        def secs(value: float) -> str:
            return f"{value:7.2f} s"

        def usage(cpu: float, rss: float, wall: float) -> str:
            return f"CPU {cpu:6.2f} s ({100 * cpu / max(wall, 1e-9):5.1f} %), RSS max {rss:6.1f} MB"

        lines = [
            "",
            f"operator benchmark #{self.number}: {self.nodes} kwok nodes, {self.pods} app pods in "
            f"{len(self.work.namespaces)} namespaces, policy matching {self.matched}; "
            f"kcm/scheduler client limits: {self.client_limits}; load average at the apply "
            + " ".join(f"{x:.2f}" for x in self.load),
            "",
            "setup",
            row("cluster start", secs(self.cluster_start_s)),
            row(f"{self.nodes} nodes created and Ready", secs(self.nodes_s)),
            row(f"{self.pods} pods created (POST)", secs(self.work.created_s)),
            row("... all scheduled (from first POST)", secs(self.work.scheduled_s)),
            row("... all Running via kwok (from first POST)", secs(self.work.running_s)),
            "",
            "from `kubectl apply` of the policy",
            row("kubectl apply returned", ms.rel(ms.apply_done)),
            row("DaemonSet exists", ms.rel(ms.daemonset)),
            row("first agent pod", ms.rel(ms.first_pod)),
            row(f"{self.nodes} agent pods scheduled", ms.rel(ms.all_scheduled)),
            row(f"{self.nodes} agent pods Running + Ready", ms.rel(ms.all_ready)),
            row("policy Ready=True (current generation)", ms.rel(ms.policy_ready)),
        ]
        if ms.policy_ready is not None and ms.all_ready is not None:
            lines.append(
                row("operator lag after last agent Ready", secs(ms.policy_ready - ms.all_ready))
            )
        lines += [
            row(
                "final status",
                f"nodes {ms.last_status.get('nodes')}, matchedPods "
                f"{ms.last_status.get('matchedPods')}, {ms.status_writes} status writes seen",
            ),
            "",
            "operator process",
            row(
                f"idle before the policy ({self.idle_s:.0f} s)", usage(*self.idle[:2], self.idle_s)
            ),
            row(f"apply -> Ready ({span:.1f} s)", usage(*self.during[:2], span)),
            row(f"after Ready ({self.hold_s:.0f} s)", usage(*self.hold[:2], self.hold_s)),
            row("peak RSS (VmHWM, whole run)", f"{self.peak_hwm_mb:.1f} MB"),
            "",
            "reconcile runs (Reconciler.reconcile_once, timed in the operator process)",
            *self.run_rows(),
            "",
            "acceptance",
            row(
                f"Ready within {READY_LIMIT_S:.0f} s",
                ("PASS" if ok_ready else "FAIL")
                + f" ({'not reached' if ready_s is None else f'{ready_s:.2f} s'})",
            ),
            row(
                f"operator RSS < {RSS_LIMIT_MB:.0f} MB",
                ("PASS" if ok_rss else "FAIL") + f" (peak {self.peak_hwm_mb:.1f} MB)",
            ),
        ]
        return "\n".join(lines), ok_ready and ok_rss


def _print_profile(path: Path, top: int = 30) -> None:
    if not path.exists():
        log(f"no profile written at {path}")
        return
    print(f"\noperator profile ({path}), top {top} by cumulative time:", flush=True)
    stats = pstats.Stats(str(path))
    stats.sort_stats("cumulative").print_stats(top)
    print(f"top {top} by own time:", flush=True)
    stats.sort_stats("tottime").print_stats(top)


@contextlib.contextmanager
def _operator(workdir: Path, kubeconfig: Path, profile: Path | None) -> Iterator[Operator]:
    op = Operator(workdir, kubeconfig, profile=profile)
    op.start()
    try:
        yield op
    finally:
        op.stop()


def remove_policy(cluster: LocalCluster, api: Api, timeout: float) -> None:
    """Delete the policy and wait until the operator removed the agents and their pods."""
    cluster.kubectl("delete", "probepolicy", POLICY, "--wait=true")
    ds_path = f"/apis/apps/v1/namespaces/{OPERATOR_NS}/daemonsets/{AGENT}"
    pods_path = f"/api/v1/namespaces/{OPERATOR_NS}/pods"
    wait_until(
        lambda: api.get(ds_path) is None and api.count(pods_path, label=AGENT_SELECTOR) == 0,
        "the agent DaemonSet and pods gone after deleting the policy",
        timeout,
        0.5,
    )


def summary(results: Sequence[Result]) -> tuple[str, bool]:
    """One line per measurement and the median time to Ready (the acceptance figure)."""
    ready = [
        None if r.ms.policy_ready is None else r.ms.policy_ready - r.ms.apply_start for r in results
    ]
    reached = sorted(t for t in ready if t is not None)
    median = statistics.median(reached) if len(reached) == len(results) else None
    peak = max(r.peak_hwm_mb for r in results)
    lines = ["", f"summary of {len(results)} measurement(s)"]
    for r, t in zip(results, ready, strict=True):
        agents = r.ms.rel(r.ms.all_ready).strip()
        lines.append(
            f"  #{r.number}: Ready {'not reached' if t is None else f'{t:.2f} s'}, "
            f"agents Running+Ready {agents}, load average " + " ".join(f"{x:.2f}" for x in r.load)
        )
    ok = median is not None and median <= READY_LIMIT_S and peak < RSS_LIMIT_MB
    lines.append(
        f"  median Ready {'n/a' if median is None else f'{median:.2f} s'} "
        f"(limit {READY_LIMIT_S:.0f} s), peak RSS {peak:.1f} MB (limit {RSS_LIMIT_MB:.0f} MB): "
        + ("PASS" if ok else "FAIL")
    )
    return "\n".join(lines), ok


def run(args: argparse.Namespace) -> int:
    tmp = Path(tempfile.mkdtemp(prefix="flowprobe-operatorbench-"))
    profile = (tmp / "operator.pstats") if args.profile else None
    log(f"starting the local cluster (client limits: {args.client_limits})")
    with BenchCluster(args.workdir, keep=args.keep, client_limits=args.client_limits) as cluster:
        start_s = cluster.started_in or 0.0
        log(f"cluster up in {start_s:.1f} s: {cluster.server} (work dir {cluster.workdir})")
        api = Api(cluster)
        cluster.kubectl("apply", "--server-side", "-f", str(CRDS))
        cluster.wait_established("probepolicies.flowprobe.io")
        cluster.kubectl("create", "namespace", OPERATOR_NS)

        t0 = time.monotonic()
        nodes = cluster.create_fake_nodes(args.nodes, timeout=300)
        nodes_s = time.monotonic() - t0
        log(f"{args.nodes} kwok nodes Ready in {nodes_s:.1f} s")

        work = create_workload(
            cluster,
            api,
            pods=args.pods,
            namespaces=args.namespaces,
            nodes=nodes,
            pin=args.pin,
            workers=args.workers,
            timeout=args.timeout,
        )
        matched = sum(
            1 for i in range(args.pods) if work.namespaces[i % args.namespaces] in work.captured
        )

        results: list[Result] = []
        with _operator(tmp, cluster.kubeconfig, profile) as op:
            sampler = ProcSampler(op.pid)
            sampler.start()
            try:
                wait_until(op.leading, "the operator to lead and finish its first run", 60, 0.2)
                log(f"operator running (pid {op.pid})")
                for number in range(1, args.repeat + 1):
                    if number > 1:
                        log("deleting the policy; waiting for the agents to go")
                        remove_policy(cluster, api, args.timeout)
                    log(f"measurement #{number}: idle for {args.idle:.0f} s")
                    t_idle = time.monotonic()
                    time.sleep(args.idle)
                    idle = sampler.window(t_idle, time.monotonic())

                    load = os.getloadavg()
                    log(f"kubectl apply ProbePolicy {POLICY} (load average {load[0]:.2f})")
                    ms = measure_policy(cluster, api, args.nodes, args.timeout)
                    end = ms.policy_ready or time.monotonic()
                    during = sampler.window(ms.apply_start, end)
                    log(
                        f"holding {args.hold:.0f} s after Ready (the resync falls inside from 30 s)"
                    )
                    t_hold = time.monotonic()
                    time.sleep(args.hold)
                    hold = sampler.window(t_hold, time.monotonic())
                    last = sampler.read()
                    peak = max([s.hwm_mb for s in sampler.samples] + [last.hwm_mb if last else 0.0])
                    result = Result(
                        nodes=args.nodes,
                        pods=args.pods,
                        client_limits=args.client_limits,
                        number=number,
                        load=load,
                        cluster_start_s=start_s,
                        nodes_s=nodes_s,
                        work=work,
                        ms=ms,
                        idle=idle,
                        idle_s=args.idle,
                        during=during,
                        hold=hold,
                        hold_s=args.hold,
                        peak_hwm_mb=peak,
                        matched=matched,
                        runs=op.runs(),
                        hold_start=t_hold,
                        hold_end=time.monotonic(),
                    )
                    results.append(result)
                    print(result.report()[0], flush=True)
            except BaseException:
                log(f"operator log tail:\n{op.log_tail()}")
                raise
            finally:
                sampler.stop()
        text, ok = summary(results)
        print(text, flush=True)
        if profile is not None:
            _print_profile(profile)
        log("stopping the cluster")
    if args.keep:
        log(f"operator log and profile kept in {tmp}")
    else:
        shutil.rmtree(tmp, ignore_errors=True)
    return 0 if ok or not args.check else 1


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(
        prog="python -m flowprobe.devenv.operatorbench",
        description="Time from `kubectl apply` of a ProbePolicy to Ready on a large kwok "
        "cluster, and the operator's CPU and memory meanwhile.",
    )
    parser.add_argument("--nodes", type=int, default=200, help="kwok nodes (default 200)")
    parser.add_argument("--pods", type=int, default=5000, help="app pods (default 5000)")
    parser.add_argument("--namespaces", type=int, default=50, help="app namespaces (default 50)")
    parser.add_argument(
        "--pin", action="store_true", help="set nodeName on app pods instead of scheduling them"
    )
    parser.add_argument("--workers", type=int, default=8, help="parallel pod creates (default 8)")
    parser.add_argument(
        "--client-limits",
        choices=sorted(CLIENT_LIMITS),
        default="upstream",
        help="kube-controller-manager's and kube-scheduler's client rate limits: the "
        "binaries' defaults, those of Kubernetes' scale tests, or none (default upstream)",
    )
    parser.add_argument(
        "--repeat", type=int, default=1, help="measurements on one cluster (default 1)"
    )
    parser.add_argument("--idle", type=float, default=5.0, help="idle seconds measured first")
    parser.add_argument(
        "--hold", type=float, default=35.0, help="seconds measured after Ready (default 35)"
    )
    parser.add_argument("--timeout", type=float, default=900.0, help="per phase (default 900 s)")
    parser.add_argument("--profile", action="store_true", help="run the operator under cProfile")
    parser.add_argument(
        "--check", action="store_true", help="exit 1 if the acceptance does not hold"
    )
    parser.add_argument("--workdir", type=Path, help="cluster work dir (default: a temp dir)")
    parser.add_argument("--keep", action="store_true", help="keep the cluster work dir")
    args = parser.parse_args(argv)
    try:
        return run(args)
    except ClusterError as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 1


if __name__ == "__main__":
    sys.exit(main())
