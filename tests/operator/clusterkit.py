"""Tools for the operator tests on the local control plane.

- ``ApiProxy``: a recording reverse proxy in front of the API server. The
  operator under test talks plain HTTP to it, it forwards over TLS; every
  request is recorded as an RBAC (verb, group, resource) triple, and matching
  requests can be held back to stop the operator at an exact point.
- ``OperatorProcess``: ``kopf run -m flowprobe.controller`` as a subprocess
  (a real process that can be killed mid-reconcile and restarted).
"""

from __future__ import annotations

import asyncio
import json
import os
import re
import signal
import ssl
import subprocess
import sys
import threading
import time
import urllib.request
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any
from urllib.parse import parse_qs

import aiohttp
from aiohttp import web

import flowprobe.controller
from flowprobe.devenv.procs import free_ports

_HOP_BY_HOP = {
    "connection",
    "keep-alive",
    "proxy-authenticate",
    "proxy-authorization",
    "te",
    "trailers",
    "transfer-encoding",
    "upgrade",
    "host",
}
_CORE = re.compile(r"^/api/(?P<version>[^/]+)(?P<rest>/.*)?$")
_GROUP = re.compile(r"^/apis/(?P<group>[^/]+)/(?P<version>[^/]+)(?P<rest>/.*)?$")


@dataclass(frozen=True)
class Call:
    """One API request in RBAC terms."""

    verb: str
    group: str
    resource: str  # "pods", "probepolicies/status", ...
    namespace: str | None
    name: str | None
    status: int
    method: str
    path: str


def rbac_call(method: str, path: str, query: str, status: int) -> Call | None:
    """Map an HTTP request to the RBAC verb/resource it is authorized as (None: non-resource)."""
    m = _CORE.match(path) or _GROUP.match(path)
    if not m or not m.group("rest"):
        return None  # discovery (/api, /apis/g/v) and non-resource URLs
    group = m.groupdict().get("group") or ""
    parts = [p for p in m.group("rest").split("/") if p]
    namespace = None
    if len(parts) >= 2 and parts[0] == "namespaces" and len(parts) > 2:
        namespace, parts = parts[1], parts[2:]
    resource, name, sub = parts[0], parts[1] if len(parts) > 1 else None, parts[2:]
    if sub:
        resource = f"{resource}/{sub[0]}"
    watch = parse_qs(query).get("watch", ["false"])[0] in ("true", "1")
    verb = {
        "GET": "watch" if watch else ("get" if name else "list"),
        "POST": "create",
        "PUT": "update",
        "PATCH": "patch",
        "DELETE": "delete" if name else "deletecollection",
    }.get(method, method.lower())
    return Call(verb, group, resource, namespace, name, status, method, path)


class Gate:
    """Holds back matching requests until released; ``drop`` then fails them with 503."""

    def __init__(self, match: Callable[[str, str], bool], drop: bool = False) -> None:
        self.match = match
        self.drop = drop
        self.arrived = threading.Event()
        self._released = threading.Event()

    def release(self) -> None:
        self._released.set()

    async def wait(self) -> None:
        self.arrived.set()
        # Released from the test's thread; wait for it off the event loop.
        await asyncio.to_thread(self._released.wait)


class ApiProxy:
    def __init__(
        self, upstream: str, ca_file: Path, client_cert: tuple[Path, Path] | None = None
    ) -> None:
        """``client_cert``: authenticate upstream as that user (e.g. the cluster admin);
        without it, requests carry only the caller's own bearer token."""
        self.upstream = upstream.rstrip("/")
        self._ssl = ssl.create_default_context(cafile=str(ca_file))
        if client_cert is not None:
            self._ssl.load_cert_chain(str(client_cert[0]), str(client_cert[1]))
        self.calls: list[Call] = []
        self.gates: list[Gate] = []
        self._lock = threading.Lock()
        self._loop: asyncio.AbstractEventLoop | None = None
        self._thread: threading.Thread | None = None
        self._runner: web.AppRunner | None = None
        self.port = 0
        self.error: Exception | None = None

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.port}"

    def start(self) -> None:
        started = threading.Event()
        self._thread = threading.Thread(target=self._run, args=(started,), daemon=True)
        self._thread.start()
        if not started.wait(10):
            raise RuntimeError("API proxy did not start")
        if self.error is not None:
            raise RuntimeError("API proxy did not start") from self.error

    def stop(self) -> None:
        if self._loop is not None and self._runner is not None:
            fut = asyncio.run_coroutine_threadsafe(self._shutdown(), self._loop)
            fut.result(15)
            self._loop.call_soon_threadsafe(self._loop.stop)
        if self._thread is not None:
            self._thread.join(10)

    async def _shutdown(self) -> None:
        assert self._runner is not None
        await self._runner.cleanup()
        # Streams still open (watches of a killed client) end here, not at interpreter exit.
        tasks = [t for t in asyncio.all_tasks() if t is not asyncio.current_task()]
        for task in tasks:
            task.cancel()
        await asyncio.gather(*tasks, return_exceptions=True)
        await self._session.close()

    def hold(self, match: Callable[[str, str], bool], drop: bool = False) -> Gate:
        gate = Gate(match, drop)
        self.gates.append(gate)
        return gate

    def snapshot(self) -> list[Call]:
        with self._lock:
            return list(self.calls)

    def _run(self, started: threading.Event) -> None:
        loop = asyncio.new_event_loop()
        self._loop = loop
        asyncio.set_event_loop(loop)
        try:
            loop.run_until_complete(self._setup())
        except Exception as exc:  # surfaced by start()
            self.error = exc
            started.set()
            return
        started.set()
        try:
            loop.run_forever()
        finally:
            loop.close()

    async def _setup(self) -> None:
        self._session = aiohttp.ClientSession(
            auto_decompress=False, timeout=aiohttp.ClientTimeout(total=None)
        )
        app = web.Application(client_max_size=64 * 1024 * 1024)
        app.router.add_route("*", "/{tail:.*}", self._handle)
        self._runner = web.AppRunner(app, handle_signals=False, shutdown_timeout=1)
        await self._runner.setup()
        site = web.TCPSite(self._runner, "127.0.0.1", 0)
        await site.start()
        server = site._server
        assert server is not None
        self.port = server.sockets[0].getsockname()[1]  # type: ignore[attr-defined]

    async def _handle(self, request: web.Request) -> web.StreamResponse:
        path, query = request.rel_url.path, request.rel_url.query_string
        for gate in list(self.gates):
            if gate.match(request.method, path):
                await gate.wait()
                if gate.drop:
                    return web.json_response(
                        {"kind": "Status", "status": "Failure", "message": "dropped by test"},
                        status=503,
                    )
        headers = {k: v for k, v in request.headers.items() if k.lower() not in _HOP_BY_HOP}
        body = await request.read()
        url = self.upstream + str(request.rel_url)
        async with self._session.request(
            request.method, url, headers=headers, data=body or None, ssl=self._ssl
        ) as upstream:
            call = rbac_call(request.method, path, query, upstream.status)
            if call is not None:
                with self._lock:
                    self.calls.append(call)
            resp = web.StreamResponse(
                status=upstream.status,
                headers={k: v for k, v in upstream.headers.items() if k.lower() not in _HOP_BY_HOP},
            )
            await resp.prepare(request)
            try:
                async for chunk in upstream.content.iter_any():
                    await resp.write(chunk)
                await resp.write_eof()
            except (ConnectionResetError, aiohttp.ClientError):
                pass  # the client went away mid-watch (operator killed)
            return resp


def token_kubeconfig(path: Path, server: str, token: str) -> Path:
    config = {
        "apiVersion": "v1",
        "kind": "Config",
        "clusters": [{"name": "proxy", "cluster": {"server": server}}],
        "users": [{"name": "sa", "user": {"token": token}}],
        "contexts": [{"name": "proxy", "context": {"cluster": "proxy", "user": "sa"}}],
        "current-context": "proxy",
    }
    path.write_text(json.dumps(config))
    path.chmod(0o600)
    return path


class OperatorProcess:
    """The operator as `kopf run -m flowprobe.controller`, logs in a file."""

    def __init__(
        self,
        workdir: Path,
        *,
        kubeconfig: Path,
        namespace: str,
        config: dict[str, Any],
        name: str = "operator",
    ) -> None:
        self.workdir = workdir
        self.kubeconfig = kubeconfig
        self.namespace = namespace
        self.name = name
        self.config_file = workdir / f"{name}-config.json"
        self.config_file.write_text(json.dumps(config))
        self.log = workdir / f"{name}.log"
        self.port = free_ports(1)[0]
        self.proc: subprocess.Popen[bytes] | None = None
        self.starts = 0

    def start(self) -> None:
        # The directory holding flowprobe/controller: works with or without `pip install -e .`.
        roots = {str(Path(p).parents[1]) for p in flowprobe.controller.__path__}
        env = dict(
            os.environ,
            KUBECONFIG=str(self.kubeconfig),
            FLOWPROBE_OPERATOR_CONFIG=str(self.config_file),
            FLOWPROBE_NAMESPACE=self.namespace,
            PYTHONPATH=os.pathsep.join([*sorted(roots), os.environ.get("PYTHONPATH", "")]),
        )
        env.pop("KUBERNETES_SERVICE_HOST", None)
        argv = [
            sys.executable,
            "-m",
            "kopf",
            "run",
            "--module=flowprobe.controller",
            f"--namespace={self.namespace}",
            f"--liveness=http://127.0.0.1:{self.port}/healthz",
            "--log-format=json",
            # One active replica is ensured by our own leader election.
            "--standalone",
        ]
        self.starts += 1
        with self.log.open("ab") as out:
            out.write(f"---- start #{self.starts}\n".encode())
            out.flush()
            self.proc = subprocess.Popen(argv, env=env, stdout=out, stderr=subprocess.STDOUT)

    @property
    def alive(self) -> bool:
        return self.proc is not None and self.proc.poll() is None

    def stop(self, sig: int = signal.SIGTERM, timeout: float = 20) -> None:
        if self.proc is None or self.proc.poll() is not None:
            return
        self.proc.send_signal(sig)
        try:
            self.proc.wait(timeout)
        except subprocess.TimeoutExpired:
            self.proc.kill()
            self.proc.wait(10)

    def kill(self) -> None:
        self.stop(signal.SIGKILL)

    def log_text(self) -> str:
        return self.log.read_text(errors="replace") if self.log.exists() else ""

    def log_records(self) -> list[dict[str, Any]]:
        records = []
        for line in self.log_text().splitlines():
            if line.startswith("{"):
                try:
                    records.append(json.loads(line))
                except ValueError:
                    continue
        return records

    def health(self) -> tuple[int, Any]:
        try:
            with urllib.request.urlopen(f"http://127.0.0.1:{self.port}/healthz", timeout=5) as r:
                return int(r.status), json.load(r)
        except OSError as exc:
            return 0, str(exc)


def wait_until(
    check: Callable[[], Any], what: str, timeout: float = 60, interval: float = 0.5
) -> Any:
    """Poll until ``check()`` is truthy; return its value."""
    deadline = time.monotonic() + timeout
    last: Any = None
    while time.monotonic() < deadline:
        last = check()
        if last:
            return last
        time.sleep(interval)
    raise AssertionError(f"timed out after {timeout:.0f} s waiting for {what} (last: {last!r})")


# -- RBAC accounting ------------------------------------------------------------


@dataclass(frozen=True)
class Grant:
    """One (group, resource, verb) a Role or ClusterRole allows; namespace None = cluster-wide."""

    namespace: str | None
    group: str
    resource: str
    verb: str
    name: str | None = None  # resourceNames restriction


def grants_from(roles: list[dict[str, Any]]) -> set[Grant]:
    grants = set()
    for role in roles:
        ns = role["metadata"].get("namespace") if role["kind"] == "Role" else None
        for rule in role.get("rules") or []:
            for group in rule.get("apiGroups", []):
                for resource in rule.get("resources", []):
                    for verb in rule.get("verbs", []):
                        for name in rule.get("resourceNames") or [None]:
                            grants.add(Grant(ns, group, resource, verb, name))
    return grants


def _verbs(call: Call) -> set[str]:
    # A server-side apply that creates the object (201) is authorized as both
    # patch and create.
    if call.method == "PATCH" and call.status == 201:
        return {"patch", "create"}
    return {call.verb}


def _covers(grant: Grant, call: Call) -> bool:
    return (
        grant.group == call.group
        and grant.resource == call.resource
        and grant.verb in _verbs(call)
        and (grant.namespace is None or grant.namespace == call.namespace)
        and (grant.name is None or grant.name == call.name)
    )


def rbac_gaps(grants: set[Grant], calls: list[Call]) -> tuple[set[Call], set[Grant]]:
    """(calls no grant allows or the server refused, grants no call used)."""
    missing = {c for c in calls if c.status == 403 or not any(_covers(g, c) for g in grants)}
    unused = {g for g in grants if not any(_covers(g, c) for c in calls)}
    return missing, unused
