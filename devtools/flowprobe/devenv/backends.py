"""Real OTLP backends on loopback: Jaeger v2, the flowprobe collector, Prometheus.

    agent/test --OTLP--> otelcol-flowprobe --traces---> Jaeger, in-memory (/api/v3)
                                           --metrics--> prometheus exporter <-- Prometheus
                                           --both-----> OTLP JSON lines file (tests only)

The configs are the ones users deploy (``otel/collector.yaml``,
``otel/jaeger.yaml``, ``otel/prometheus.yml``); only addresses differ, so a
test exercises exactly the pipeline a user runs. Jaeger and the collector come
from ``tools/build/{jaeger,otelcol}.sh`` (built on first use), Prometheus from
the Debian package.

Library use (pytest fixture ``local_backends`` in tests/backends/conftest.py)::

    with LocalBackends() as b:          # free ports, temporary work dir
        exporter = OTLPSpanExporter(endpoint=b.otlp_grpc, insecure=True)
        ...
        b.jaeger_traces("my-service", start, end)
        b.prom_query('my_counter_total{job="my-service"}')

Foreground (``make backends``): ``python -m flowprobe.devenv.backends``
starts everything on the default ports and runs until Ctrl-C.
"""

from __future__ import annotations

import argparse
import contextlib
import json
import os
import re
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import time
import urllib.error
import urllib.parse
import urllib.request
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, fields
from datetime import datetime
from pathlib import Path
from types import TracebackType
from typing import IO, Any, Self

from flowprobe.devenv import toolchain
from flowprobe.devenv.procs import free_ports, log_tail, sigterm_as_interrupt, stop_process

LOOPBACK = "127.0.0.1"


class BackendError(RuntimeError):
    """A backend could not be found, built, started or queried."""


@dataclass(frozen=True)
class Ports:
    """Every TCP port the three backends listen on (all bound to 127.0.0.1).

    The defaults are the ones written in the otel/ configs and the docs.
    """

    otlp_grpc: int = 4317
    otlp_http: int = 4318
    collector_health: int = 13133
    collector_metrics: int = 8888
    prometheus_exporter: int = 8889
    jaeger_otlp_grpc: int = 14317
    jaeger_query_http: int = 16686
    jaeger_query_grpc: int = 16685
    prometheus: int = 9090
    # Nothing listens here unless an agent is started with its /metrics on
    # it; Prometheus already has the scrape job for it.
    agent_metrics: int = 9464

    @classmethod
    def free(cls) -> Ports:
        """Distinct ports that were free a moment ago (see :func:`free_ports`)."""
        return cls(*free_ports(len(fields(cls)), LOOPBACK))

    def busy(self) -> list[str]:
        """Names of the ports something else is already listening on."""
        return [
            f"{f.name}={getattr(self, f.name)}"
            for f in fields(self)
            # agent_metrics is meant to be taken by an agent.
            if f.name != "agent_metrics" and _tcp_open(getattr(self, f.name))
        ]


# --- binaries ---------------------------------------------------------------

# component (tools/build/<component>.sh) -> its binary
_GO_BACKENDS: dict[str, str] = {"jaeger": "jaeger", "otelcol": "otelcol-flowprobe"}


def backend_binary(component: str, *, build: bool = True) -> Path:
    """Cached binary of a Go-built backend, running its build script if missing."""
    return toolchain.ensure_binary(_GO_BACKENDS[component], build=build)


def prometheus_binary() -> Path:
    found = shutil.which("prometheus") or shutil.which("prometheus", path="/usr/bin")
    if not found:
        raise BackendError("prometheus not found; apt-get install prometheus (Debian 2.42 works)")
    return Path(found)


# --- config rendering -------------------------------------------------------


def _render_prometheus(template: str, ports: Ports, scrape_interval: str) -> str:
    """Point the literal default targets of otel/prometheus.yml at ``ports``.

    One regex pass, so a new port that equals another default (8889 -> 8888)
    is never rewritten a second time.
    """
    defaults = Ports()
    replacements = {
        f"{LOOPBACK}:{defaults.prometheus_exporter}": f"{LOOPBACK}:{ports.prometheus_exporter}",
        f"{LOOPBACK}:{defaults.collector_metrics}": f"{LOOPBACK}:{ports.collector_metrics}",
        f"{LOOPBACK}:{defaults.agent_metrics}": f"{LOOPBACK}:{ports.agent_metrics}",
        "scrape_interval: 5s": f"scrape_interval: {scrape_interval}",
        "evaluation_interval: 5s": f"evaluation_interval: {scrape_interval}",
    }
    missing = [k for k in replacements if k not in template]
    if missing:
        # A silently unrendered target would scrape the wrong port and the
        # failure would surface much later as "metric never arrived".
        raise BackendError(f"otel/prometheus.yml no longer contains {missing}")
    pattern = re.compile("|".join(re.escape(k) for k in replacements))
    return pattern.sub(lambda m: replacements[m.group(0)], template)


def _collector_test_overlay(otlp_file: Path) -> str:
    """Second collector --config: mirror every signal into an OTLP JSON file.

    Separate pipelines fan out from the same receiver, so the user's pipelines
    in otel/collector.yaml stay untouched. JSON is valid YAML.
    """
    overlay = {
        "exporters": {
            "file/flowprobe-tests": {
                "path": str(otlp_file),
                # Survive stop_collector()/start_collector() without truncating.
                "append": True,
                "flush_interval": "100ms",
            }
        },
        "service": {
            "pipelines": {
                "traces/flowprobe-tests": {
                    "receivers": ["otlp"],
                    "exporters": ["file/flowprobe-tests"],
                },
                "metrics/flowprobe-tests": {
                    "receivers": ["otlp"],
                    "exporters": ["file/flowprobe-tests"],
                },
            }
        },
    }
    return json.dumps(overlay, indent=2) + "\n"


# --- HTTP (stdlib only; never through a proxy) ------------------------------

# A corporate HTTP(S)_PROXY must not see loopback queries, and NO_PROXY is
# often incomplete; an empty ProxyHandler disables proxies for this opener.
_OPENER = urllib.request.build_opener(urllib.request.ProxyHandler({}))


def _get(
    url: str, params: Mapping[str, str] | None = None, timeout: float = 10.0
) -> tuple[int, bytes]:
    if params:
        url = f"{url}?{urllib.parse.urlencode(params)}"
    try:
        with _OPENER.open(url, timeout=timeout) as resp:
            return int(resp.status), resp.read()
    except urllib.error.HTTPError as err:
        return err.code, err.read()


def _http_ok(url: str) -> bool:
    try:
        status, _ = _get(url, timeout=2.0)
    except OSError:
        return False
    return status == 200


def _tcp_open(port: int) -> bool:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.settimeout(1.0)
        return s.connect_ex((LOOPBACK, port)) == 0


def _json(status: int, body: bytes, what: str) -> Any:
    if status != 200:
        raise BackendError(f"{what}: HTTP {status}: {body[:500]!r}")
    return json.loads(body)


def _rfc3339(ts: datetime) -> str:
    if ts.tzinfo is None:
        # Jaeger rejects times without an offset; naive datetimes from
        # datetime.now() are local time, so make that explicit.
        ts = ts.astimezone()
    return ts.isoformat()


def spans_of(resource_spans: Sequence[Mapping[str, Any]]) -> list[dict[str, Any]]:
    """Flatten OTLP JSON ``resourceSpans`` into span dicts.

    Each span gets ``"resource"`` (the resource's attributes as a plain dict)
    so callers can filter client-side: Jaeger's query ignores attribute filters.
    """
    out: list[dict[str, Any]] = []
    for rs in resource_spans:
        resource = attributes_of(rs.get("resource", {}).get("attributes", []))
        for ss in rs.get("scopeSpans", []):
            for span in ss.get("spans", []):
                out.append({**span, "resource": resource})
    return out


def attributes_of(attrs: Sequence[Mapping[str, Any]]) -> dict[str, Any]:
    """OTLP JSON ``[{"key": k, "value": {"stringValue": v}}]`` -> ``{k: v}``."""
    out: dict[str, Any] = {}
    for kv in attrs:
        value = kv.get("value", {})
        # OTLP JSON has exactly one *Value key; intValue is a string per spec.
        out[str(kv["key"])] = next(iter(value.values()), None) if value else None
    return out


# --- processes --------------------------------------------------------------


class _Process:
    """One backend process with its log file; restartable with the same argv/env."""

    def __init__(self, name: str, argv: list[str], env: dict[str, str], cwd: Path) -> None:
        self.name = name
        self.argv = argv
        self.env = env
        self.cwd = cwd
        self.log_path = cwd / f"{name}.log"
        self.popen: subprocess.Popen[bytes] | None = None
        self._log: IO[bytes] | None = None

    def start(self) -> None:
        if self.running():
            raise BackendError(f"{self.name} is already running (pid {self.pid})")
        # Append: a restart keeps the earlier run's log for post-mortems.
        self._log = self.log_path.open("ab")
        self._log.write(
            f"\n=== {time.strftime('%H:%M:%S')} start: {' '.join(self.argv)}\n".encode()
        )
        self._log.flush()
        self.popen = subprocess.Popen(
            self.argv,
            cwd=self.cwd,
            env=self.env,
            stdin=subprocess.DEVNULL,
            stdout=self._log,
            stderr=subprocess.STDOUT,
            # Own session: Ctrl-C on the terminal reaches only us, and we stop
            # the backends in order (collector drains into Jaeger first).
            start_new_session=True,
        )

    @property
    def pid(self) -> int | None:
        return self.popen.pid if self.popen else None

    def running(self) -> bool:
        return self.popen is not None and self.popen.poll() is None

    def exit_code(self) -> int | None:
        return self.popen.poll() if self.popen else None

    def stop(self, timeout: float = 15.0) -> None:
        popen, self.popen = self.popen, None
        try:
            if popen is not None:
                stop_process(popen, timeout, kill_timeout=5.0)
        finally:
            if self._log is not None:
                self._log.close()
                self._log = None

    def log_tail(self, lines: int = 30) -> str:
        return log_tail(self.log_path, lines) or "(no log)"


# --- the harness ------------------------------------------------------------


class LocalBackends:
    """Jaeger + collector + Prometheus on 127.0.0.1, as a context manager.

    ``ports=None`` picks free ports (tests); pass ``Ports()`` for the
    documented defaults. ``work_dir=None`` uses a temporary directory that is
    removed on exit; a given directory is kept (configs, logs, the OTLP file,
    Prometheus data). ``otlp_file=False`` drops the test-only file exporter,
    whose file grows without bound under sustained load.
    """

    def __init__(
        self,
        work_dir: Path | None = None,
        *,
        ports: Ports | None = None,
        scrape_interval: str = "1s",
        startup_timeout: float = 60.0,
        build: bool = True,
        config_dir: Path | None = None,
        otlp_file: bool = True,
    ) -> None:
        self.ports = ports or Ports.free()
        self._otlp_file_enabled = otlp_file
        self.scrape_interval = scrape_interval
        self.startup_timeout = startup_timeout
        self._build = build
        self._config_dir = config_dir
        self._given_work_dir = work_dir
        self._tmp_work_dir: Path | None = None
        self._procs: dict[str, _Process] = {}

    # -- endpoints

    @property
    def work_dir(self) -> Path:
        d = self._given_work_dir or self._tmp_work_dir
        if d is None:
            raise BackendError("LocalBackends is not started")
        return d

    @property
    def otlp_grpc(self) -> str:
        """OTLP/gRPC endpoint of the collector, as OTLPSpanExporter(endpoint=...) takes it."""
        return f"http://{LOOPBACK}:{self.ports.otlp_grpc}"

    @property
    def otlp_http(self) -> str:
        """OTLP/HTTP base URL of the collector (append /v1/traces, /v1/metrics)."""
        return f"http://{LOOPBACK}:{self.ports.otlp_http}"

    @property
    def jaeger_query_url(self) -> str:
        """Jaeger query service: UI at /, API at /api/v3/..."""
        return f"http://{LOOPBACK}:{self.ports.jaeger_query_http}"

    @property
    def prometheus_url(self) -> str:
        return f"http://{LOOPBACK}:{self.ports.prometheus}"

    @property
    def collector_health_url(self) -> str:
        return f"http://{LOOPBACK}:{self.ports.collector_health}/"

    @property
    def otlp_file_enabled(self) -> bool:
        return self._otlp_file_enabled

    @property
    def otlp_file(self) -> Path:
        """Everything the collector received, as OTLP JSON lines."""
        return self.work_dir / "otlp.jsonl"

    def otel_env(self) -> dict[str, str]:
        """OTEL_* variables that point an OTel SDK (e.g. the agent) at the collector."""
        return {
            "OTEL_EXPORTER_OTLP_ENDPOINT": self.otlp_grpc,
            "OTEL_EXPORTER_OTLP_PROTOCOL": "grpc",
            "OTEL_EXPORTER_OTLP_INSECURE": "true",
        }

    # -- lifecycle

    def __enter__(self) -> Self:
        self.start()
        return self

    def __exit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        self.stop()

    def start(self) -> None:
        """Start Jaeger, then the collector, then Prometheus; each must be healthy.

        On any failure everything already started is stopped again.
        """
        if self._given_work_dir is None:
            self._tmp_work_dir = Path(tempfile.mkdtemp(prefix="flowprobe-backends-"))
        self.work_dir.mkdir(parents=True, exist_ok=True)
        try:
            self._prepare()
            self._start("jaeger", self._jaeger_ready)
            self._start("collector", self._collector_ready)
            self._start("prometheus", self._prometheus_ready)
        except BaseException:
            self.stop()
            raise

    def stop(self) -> None:
        """Stop everything (reverse start order) and drop a temporary work dir."""
        errors: list[BaseException] = []
        for name in ("prometheus", "collector", "jaeger"):
            proc = self._procs.get(name)
            if proc is None:
                continue
            try:
                proc.stop()
            except Exception as exc:  # keep stopping the others
                errors.append(exc)
        self._procs.clear()
        if self._tmp_work_dir is not None:
            shutil.rmtree(self._tmp_work_dir, ignore_errors=True)
            self._tmp_work_dir = None
        if errors:
            raise BackendError(f"errors while stopping backends: {errors}")

    def stop_collector(self) -> None:
        """Stop only the collector (agents then see connection refused on OTLP)."""
        self._proc("collector").stop()

    def start_collector(self) -> None:
        """Start the collector again on the same ports and wait until healthy."""
        proc = self._proc("collector")
        proc.start()
        self._wait(proc, self._collector_ready)

    def check_running(self) -> None:
        """Raise if a backend process has exited (the foreground loop polls this)."""
        for proc in self._procs.values():
            if proc.popen is not None and not proc.running():
                raise BackendError(
                    f"{proc.name} exited with code {proc.exit_code()}; log {proc.log_path}:\n"
                    + proc.log_tail()
                )

    # -- queries

    def jaeger_services(self) -> list[str]:
        status, body = _get(f"{self.jaeger_query_url}/api/v3/services")
        return [str(s) for s in _json(status, body, "jaeger services").get("services", [])]

    def jaeger_traces(
        self,
        service: str,
        start: datetime,
        end: datetime,
        *,
        operation: str | None = None,
        num_traces: int = 100,
    ) -> list[dict[str, Any]]:
        """OTLP JSON ``resourceSpans`` of traces of ``service`` that started in [start, end].

        An empty list when Jaeger has none (its API answers 404 then).
        Use :func:`spans_of` to flatten. ``num_traces`` is required in effect:
        without it the memory store rejects the search ("search depth must be
        greater than 0"); it must stay below the store's max_traces.
        """
        params = {
            "query.service_name": service,
            "query.start_time_min": _rfc3339(start),
            "query.start_time_max": _rfc3339(end),
            "query.num_traces": str(num_traces),
        }
        if operation is not None:
            params["query.operation_name"] = operation
        status, body = _get(f"{self.jaeger_query_url}/api/v3/traces", params)
        if status == 404:
            return []
        result = _json(status, body, "jaeger traces").get("result", {})
        return list(result.get("resourceSpans", []))

    def prom_query(self, promql: str) -> list[dict[str, Any]]:
        """Instant query; the ``data.result`` list (``[{"metric": {...}, "value": [ts, "v"]}]``)."""
        status, body = _get(f"{self.prometheus_url}/api/v1/query", {"query": promql})
        doc = _json(status, body, f"prometheus query {promql!r}")
        if doc.get("status") != "success":
            raise BackendError(f"prometheus query {promql!r}: {doc}")
        return list(doc["data"]["result"])

    def prom_query_range(
        self, promql: str, start: float, end: float, step: float
    ) -> list[dict[str, Any]]:
        """Range query (what a Grafana time-series panel runs); ``[{"metric", "values"}]``.

        ``start``/``end`` are Unix seconds.
        """
        params = {
            "query": promql,
            "start": f"{start:.3f}",
            "end": f"{end:.3f}",
            "step": f"{step:g}",
        }
        status, body = _get(f"{self.prometheus_url}/api/v1/query_range", params)
        doc = _json(status, body, f"prometheus range query {promql!r}")
        if doc.get("status") != "success":
            raise BackendError(f"prometheus range query {promql!r}: {doc}")
        return list(doc["data"]["result"])

    def otlp_file_records(self) -> list[dict[str, Any]]:
        """Parsed lines of :attr:`otlp_file`.

        Each is ``{"resourceSpans": [...]}`` or ``{"resourceMetrics": [...]}``.
        """
        try:
            lines = self.otlp_file.read_text().splitlines()
        except FileNotFoundError:
            return []
        # The exporter may be mid-write on the last line.
        records = []
        for line in lines:
            with contextlib.suppress(ValueError):
                records.append(json.loads(line))
        return records

    # -- internals

    def _proc(self, name: str) -> _Process:
        try:
            return self._procs[name]
        except KeyError:
            raise BackendError(f"{name} is not part of a started LocalBackends") from None

    def _prepare(self) -> None:
        config_dir = self._config_dir or toolchain.repo_root() / "otel"
        wd, p = self.work_dir, self.ports
        # Binaries first: a cold build takes minutes and must not eat into
        # the startup timeouts below.
        jaeger = backend_binary("jaeger", build=self._build)
        otelcol = backend_binary("otelcol", build=self._build)
        prometheus = prometheus_binary()

        shutil.copyfile(config_dir / "jaeger.yaml", wd / "jaeger.yaml")
        shutil.copyfile(config_dir / "collector.yaml", wd / "collector.yaml")
        collector_configs = [f"--config={wd / 'collector.yaml'}"]
        if self._otlp_file_enabled:
            (wd / "collector-tests.yaml").write_text(_collector_test_overlay(self.otlp_file))
            collector_configs.append(f"--config={wd / 'collector-tests.yaml'}")
            self.otlp_file.touch()
        (wd / "prometheus.yml").write_text(
            _render_prometheus((config_dir / "prometheus.yml").read_text(), p, self.scrape_interval)
        )

        base_env = dict(os.environ)
        jaeger_env = base_env | {
            "FLOWPROBE_JAEGER_OTLP_GRPC_ENDPOINT": f"{LOOPBACK}:{p.jaeger_otlp_grpc}",
            "FLOWPROBE_JAEGER_QUERY_HTTP_ENDPOINT": f"{LOOPBACK}:{p.jaeger_query_http}",
            "FLOWPROBE_JAEGER_QUERY_GRPC_ENDPOINT": f"{LOOPBACK}:{p.jaeger_query_grpc}",
        }
        collector_env = base_env | {
            "FLOWPROBE_OTLP_GRPC_ENDPOINT": f"{LOOPBACK}:{p.otlp_grpc}",
            "FLOWPROBE_OTLP_HTTP_ENDPOINT": f"{LOOPBACK}:{p.otlp_http}",
            "FLOWPROBE_TRACES_ENDPOINT": f"{LOOPBACK}:{p.jaeger_otlp_grpc}",
            "FLOWPROBE_TRACES_INSECURE": "true",
            # Jaeger is on loopback: compressing for it costs CPU, saves nothing.
            "FLOWPROBE_TRACES_COMPRESSION": "none",
            "FLOWPROBE_PROMETHEUS_EXPORTER_ENDPOINT": f"{LOOPBACK}:{p.prometheus_exporter}",
            "FLOWPROBE_COLLECTOR_HEALTH_ENDPOINT": f"{LOOPBACK}:{p.collector_health}",
            "FLOWPROBE_COLLECTOR_METRICS_HOST": LOOPBACK,
            "FLOWPROBE_COLLECTOR_METRICS_PORT": str(p.collector_metrics),
        }
        self._procs = {
            "jaeger": _Process(
                "jaeger", [str(jaeger), f"--config={wd / 'jaeger.yaml'}"], jaeger_env, wd
            ),
            "collector": _Process(
                "collector",
                [str(otelcol), *collector_configs],
                collector_env,
                wd,
            ),
            "prometheus": _Process(
                "prometheus",
                [
                    str(prometheus),
                    f"--config.file={wd / 'prometheus.yml'}",
                    f"--storage.tsdb.path={wd / 'prometheus-data'}",
                    f"--web.listen-address={LOOPBACK}:{p.prometheus}",
                    "--storage.tsdb.retention.time=1d",
                ],
                base_env,
                wd,
            ),
        }

    def _start(self, name: str, ready: Callable[[], bool]) -> None:
        proc = self._proc(name)
        proc.start()
        self._wait(proc, ready)

    def _wait(self, proc: _Process, ready: Callable[[], bool]) -> None:
        deadline = time.monotonic() + self.startup_timeout
        while True:
            if not proc.running():
                raise BackendError(
                    f"{proc.name} exited with code {proc.exit_code()} during startup; "
                    f"log {proc.log_path}:\n{proc.log_tail()}"
                )
            if ready():
                return
            if time.monotonic() > deadline:
                raise BackendError(
                    f"{proc.name} not ready after {self.startup_timeout:.0f}s; "
                    f"log {proc.log_path}:\n{proc.log_tail()}"
                )
            time.sleep(0.2)

    def _jaeger_ready(self) -> bool:
        # The query extension starts before the receivers, so a 200 from the
        # API alone would race the collector's first export.
        return _http_ok(f"{self.jaeger_query_url}/api/v3/services") and _tcp_open(
            self.ports.jaeger_otlp_grpc
        )

    def _collector_ready(self) -> bool:
        # health_check answers 200 only after every pipeline has started.
        return _http_ok(self.collector_health_url)

    def _prometheus_ready(self) -> bool:
        return _http_ok(f"{self.prometheus_url}/-/ready")


# --- foreground CLI -----------------------------------------------------------


def _banner(b: LocalBackends) -> str:
    p = b.ports
    otlp_file = f"\n  OTLP JSON lines            {b.otlp_file}" if b.otlp_file_enabled else ""
    return f"""\
flowprobe local backends are running (Ctrl-C to stop)

  OTLP gRPC in (collector)   {b.otlp_grpc}   OTEL_EXPORTER_OTLP_ENDPOINT={b.otlp_grpc}
  OTLP HTTP in (collector)   {b.otlp_http}   POST /v1/traces, /v1/metrics
  Jaeger UI / query API      {b.jaeger_query_url}   e.g. {b.jaeger_query_url}/api/v3/services
  Prometheus                 {b.prometheus_url}   e.g. {b.prometheus_url}/graph
  collector metrics          http://{LOOPBACK}:{p.prometheus_exporter}/metrics (agents' metrics), \
http://{LOOPBACK}:{p.collector_metrics}/metrics (collector's own)
  collector health           {b.collector_health_url}
  Jaeger OTLP gRPC in        http://{LOOPBACK}:{p.jaeger_otlp_grpc} (collector -> Jaeger traces)
  agent /metrics scraped at  http://{LOOPBACK}:{p.agent_metrics}/metrics

  configs and logs           {b.work_dir}{otlp_file}
"""


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(
        prog="python -m flowprobe.devenv.backends",
        description="Run Jaeger, the flowprobe collector and Prometheus on 127.0.0.1 until Ctrl-C.",
    )
    parser.add_argument(
        "--random-ports",
        action="store_true",
        help="use free ports instead of 4317/4318/16686/9090/...",
    )
    parser.add_argument(
        "--work-dir", type=Path, help="keep configs, logs and data here (default: temporary)"
    )
    parser.add_argument(
        "--scrape-interval", default="5s", help="Prometheus scrape interval (default 5s)"
    )
    parser.add_argument(
        "--no-build", action="store_true", help="fail instead of building missing binaries"
    )
    parser.add_argument(
        "--otlp-file",
        action="store_true",
        help="also write everything the collector receives to <work dir>/otlp.jsonl",
    )
    args = parser.parse_args(argv)

    ports = Ports.free() if args.random_ports else Ports()
    busy = ports.busy()
    if busy:
        print(
            f"error: ports already in use: {', '.join(busy)} (try --random-ports)", file=sys.stderr
        )
        return 1
    with sigterm_as_interrupt():
        backends = LocalBackends(
            args.work_dir,
            ports=ports,
            scrape_interval=args.scrape_interval,
            build=not args.no_build,
            otlp_file=args.otlp_file,
        )
        try:
            with backends:
                print(_banner(backends), flush=True)
                try:
                    while True:
                        backends.check_running()
                        time.sleep(1.0)
                except KeyboardInterrupt:
                    # A second Ctrl-C must not abort the teardown half-way.
                    signal.signal(signal.SIGINT, signal.SIG_IGN)
                    signal.signal(signal.SIGTERM, signal.SIG_IGN)
                    print("\nstopping backends ...", flush=True)
        except KeyboardInterrupt:
            print("\ninterrupted during startup; stopped", file=sys.stderr)
            return 130
        except (BackendError, toolchain.ToolchainError) as exc:
            print(f"error: {exc}", file=sys.stderr)
            return 1
        return 0


if __name__ == "__main__":
    sys.exit(main())
