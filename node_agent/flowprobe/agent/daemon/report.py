"""The agent's side of the operator contract: health endpoints and the per-node report Lease."""

from __future__ import annotations

import datetime
import json
import logging
import threading
from collections.abc import Callable
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from typing import Any

import urllib3

from flowprobe.agent.enrich.kubeapi import ApiError, KubeApi
from flowprobe.api import constants
from flowprobe.api.agentreport import AgentReport, report_lease_name

log = logging.getLogger("flowprobe.agent.daemon")

# (healthy, JSON-able detail)
Check = Callable[[], tuple[bool, dict[str, Any]]]


class HealthServer:
    """``GET /healthz`` (liveness) and ``/readyz`` (readiness): 200 or 503 with a JSON body."""

    def __init__(
        self,
        address: str,
        port: int,
        liveness: Check,
        readiness: Check,
        extra: Callable[[BaseHTTPRequestHandler], bool] | None = None,
    ) -> None:
        """``extra`` may answer a request first (True when it did): the pcap endpoint."""
        checks = {
            constants.AGENT_HEALTH_LIVENESS_PATH: liveness,
            constants.AGENT_HEALTH_READINESS_PATH: readiness,
        }

        class Handler(BaseHTTPRequestHandler):
            def do_GET(self) -> None:
                if extra is not None and extra(self):
                    return
                check = checks.get(self.path.split("?")[0])
                if check is None:
                    self.send_error(404)
                    return
                try:
                    ok, detail = check()
                except Exception as exc:  # a failing check is an unhealthy agent, not a crash
                    ok, detail = False, {"error": str(exc)}
                body = json.dumps(detail, sort_keys=True).encode()
                self.send_response(200 if ok else 503)
                self.send_header("Content-Type", "application/json")
                self.send_header("Content-Length", str(len(body)))
                self.end_headers()
                self.wfile.write(body)

            def log_message(self, fmt: str, *args: Any) -> None:
                pass  # probes every few seconds would drown the log

        self.server = ThreadingHTTPServer((address, port), Handler)
        self.server.daemon_threads = True
        self.port = self.server.server_address[1]
        self._thread = threading.Thread(
            target=self.server.serve_forever, name="flowprobe-health", daemon=True
        )

    def start(self) -> HealthServer:
        self._thread.start()
        return self

    def stop(self) -> None:
        self.server.shutdown()
        self.server.server_close()


def _micro_time(ts: datetime.datetime) -> str:
    return ts.astimezone(datetime.UTC).strftime("%Y-%m-%dT%H:%M:%S.%fZ")


class LeaseReporter:
    """Creates or renews ``report_lease_name(node)`` with the report in an annotation."""

    def __init__(
        self, api: KubeApi, namespace: str, node: str, holder: str, interval_s: float
    ) -> None:
        self.api = api
        self.namespace = namespace
        self.node = node
        self.holder = holder
        self.interval_s = interval_s
        self.name = report_lease_name(node)
        self.path = f"/apis/coordination.k8s.io/v1/namespaces/{namespace}/leases"
        self.reports = 0
        self.failures = 0
        self._failing = False

    def _body(self, report: AgentReport, resource_version: str | None) -> dict[str, Any]:
        meta: dict[str, Any] = {
            "name": self.name,
            "namespace": self.namespace,
            "labels": {
                constants.LABEL_COMPONENT: constants.COMPONENT_AGENT_REPORT,
                constants.LABEL_PART_OF: constants.PART_OF,
            },
            "annotations": {
                constants.ANNOTATION_AGENT_REPORT: report.model_dump_json(by_alias=True)
            },
        }
        if resource_version is not None:
            meta["resourceVersion"] = resource_version
        return {
            "apiVersion": "coordination.k8s.io/v1",
            "kind": "Lease",
            "metadata": meta,
            "spec": {
                "holderIdentity": self.holder,
                "leaseDurationSeconds": max(1, round(3 * self.interval_s)),
                "renewTime": _micro_time(datetime.datetime.now(datetime.UTC)),
            },
        }

    def report(self, report: AgentReport) -> bool:
        """One renewal; False (logged once per outage) if the API refused or was unreachable."""
        try:
            try:
                current = self.api.request("GET", f"{self.path}/{self.name}")
            except ApiError as exc:
                if exc.status != 404:
                    raise
                self.api.request("POST", self.path, body=self._body(report, None))
            else:
                rv = current["metadata"]["resourceVersion"]
                self.api.request("PUT", f"{self.path}/{self.name}", body=self._body(report, rv))
        except (ApiError, OSError, ValueError, KeyError, urllib3.exceptions.HTTPError) as exc:
            self.failures += 1
            if not self._failing:
                log.warning("report Lease %s/%s: %r", self.namespace, self.name, exc)
                self._failing = True
            return False
        if self._failing:
            log.info("report Lease renewed again")
        self._failing = False
        self.reports += 1
        return True
