"""A kwok node made real enough for the agent: its pods as network namespaces, the agent in
its "host" namespace, and the kubelet's one duty the agent relies on (the ConfigMap volume).

kwok gives pods IPs but runs nothing. :class:`AgentNode` builds a
:class:`~flowprobe.devenv.netns.Node` whose pods have exactly the IPs kwok
assigned, so real servers and clients started in them produce real traffic
between "pods", and runs ``flowprobe-agent daemon`` in the node namespace
with the environment the operator's DaemonSet would give it. The node
namespace cannot reach the machine's loopback, so forwarders carry the
agent's API and OTLP connections out (same port numbers, so the kubeconfig
and the policy's export endpoint work unchanged) and its health port in.
"""

from __future__ import annotations

import contextlib
import json
import os
import sys
import threading
import urllib.parse
import urllib.request
from pathlib import Path
from types import TracebackType
from typing import Any

from flowprobe.api import constants
from flowprobe.devenv.cluster import ClusterError, LocalCluster
from flowprobe.devenv.netns import Node, Pod
from flowprobe.devenv.nsproxy import Forwarder
from flowprobe.devenv.procs import stop_process

_HEALTH_PORT = 9477


class ConfigMapFile:
    """Mirrors one key of a ConfigMap into a file, as the kubelet's volume does:
    replaced atomically on change, left as it was while the ConfigMap is gone
    (the operator deletes it with the DaemonSet, whose pods then go too)."""

    def __init__(
        self, cluster: LocalCluster, namespace: str, name: str, key: str, path: Path
    ) -> None:
        self.cluster = cluster
        self.url = f"/api/v1/namespaces/{namespace}/configmaps/{name}"
        self.key = key
        self.path = path
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, name="configmap-file", daemon=True)

    def __enter__(self) -> ConfigMapFile:
        self._thread.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self._stop.set()
        self._thread.join(5)

    def _run(self) -> None:
        while not self._stop.wait(0.5):
            try:
                data = (self.cluster.api("GET", self.url, timeout=5).get("data") or {}).get(
                    self.key
                )
            except (ClusterError, OSError):
                continue  # gone, or the API server restarting
            if data is not None and (not self.path.exists() or self.path.read_text() != data):
                tmp = self.path.with_suffix(".tmp")
                tmp.write_text(data)
                tmp.replace(self.path)


class AgentNode:
    """Use as a context manager; ``add_pod`` after kwok gave the pod its IP."""

    def __init__(
        self,
        cluster: LocalCluster,
        node_name: str,
        namespace: str,
        workdir: Path,
        otlp_endpoints: tuple[str, ...] = (),
        report_interval_s: float = 2.0,
    ) -> None:
        self.cluster = cluster
        self.node_name = node_name
        self.namespace = namespace
        self.workdir = workdir
        self.otlp_endpoints = otlp_endpoints
        self.report_interval_s = report_interval_s
        self.policy_file = workdir / f"{node_name}-policies.json"
        self.log = workdir / f"{node_name}-agent.log"
        self.node = Node(subnet="10.251.0.0/24")
        self._stack = contextlib.ExitStack()
        self.health_url = ""
        self.agent: Any = None

    def __enter__(self) -> AgentNode:
        try:
            self._stack.enter_context(self.node)
            api = urllib.parse.urlsplit(self.cluster.server)
            targets = [(api.hostname or "127.0.0.1", api.port or 443)]
            for url in self.otlp_endpoints:
                u = urllib.parse.urlsplit(url)
                targets.append((u.hostname or "127.0.0.1", u.port or 4317))
            for host, port in targets:
                self._stack.enter_context(
                    Forwarder(("127.0.0.1", port), (host, port), listen_netns=self.node.netns)
                )
            health = self._stack.enter_context(
                Forwarder(
                    ("127.0.0.1", 0), ("127.0.0.1", _HEALTH_PORT), target_netns=self.node.netns
                )
            )
            self.health_url = f"http://127.0.0.1:{health.port}"
            self._stack.enter_context(
                ConfigMapFile(
                    self.cluster,
                    self.namespace,
                    "flowprobe-agent",
                    constants.POLICY_SET_KEY,
                    self.policy_file,
                )
            )
        except BaseException:
            self._stack.close()
            raise
        return self

    def __exit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        self.stop_agent()
        self._stack.close()

    def add_pod(self, name: str, ip: str) -> Pod:
        return self.node.add_pod(name, ip=ip)

    def start_agent(self) -> None:
        env = dict(
            os.environ,
            **{
                constants.ENV_NODE_NAME: self.node_name,
                constants.ENV_POD_NAME: f"flowprobe-agent-{self.node_name}",
                constants.ENV_POD_NAMESPACE: self.namespace,
                constants.ENV_POLICY_FILE: str(self.policy_file),
                constants.ENV_HEALTH_PORT: str(_HEALTH_PORT),
                constants.ENV_REPORT_INTERVAL: str(self.report_interval_s),
                "FLOWPROBE_HEALTH_ADDRESS": "127.0.0.1",
                "KUBECONFIG": str(self.cluster.kubeconfig),
            },
        )
        with self.log.open("ab") as out:
            self.agent = self.node.spawn_node(
                [sys.executable, "-m", "flowprobe.agent", "daemon"],
                env=env,
                stdout=out,
                stderr=out,
            )

    def stop_agent(self) -> None:
        if self.agent is not None:
            stop_process(self.agent, 30)

    def readiness(self) -> tuple[int, dict[str, Any]]:
        """(status, body) of the agent's /readyz; (0, {}) while it does not answer."""
        try:
            with urllib.request.urlopen(self.health_url + "/readyz", timeout=5) as r:
                return int(r.status), json.load(r)
        except urllib.error.HTTPError as exc:
            return exc.code, json.load(exc)
        except (OSError, ValueError):
            return 0, {}

    def log_text(self) -> str:
        return self.log.read_text(errors="replace") if self.log.exists() else ""
