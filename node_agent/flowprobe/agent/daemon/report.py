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
from flowprobe.api.agentreport import MAX_REPORT_NOTES, AgentNote, AgentReport, report_lease_name
from flowprobe.api.v1alpha1 import NodeNoteType

log = logging.getLogger("flowprobe.agent.daemon")

# A TLSNotVisible note lasts this long after the connection's first TLS record.
TLS_NOTE_WINDOW_S = 600.0
MAX_TLS_SIGHTINGS = 256
_NOTE_MAX = 1024

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


class TlsSightings:
    """Connections carrying TLS in traffic a policy selects, for ``TLSNotVisible`` notes.

    Added to from the capture thread, read by the report; bounded (the oldest
    sighting goes first) and forgotten after ``TLS_NOTE_WINDOW_S``.
    """

    def __init__(self, window_s: float = TLS_NOTE_WINDOW_S) -> None:
        self.window_s = window_s
        # (policy, "client -> server:port") -> when last seen (monotonic)
        self._seen: dict[tuple[str, str], float] = {}
        self._lock = threading.Lock()

    def add(self, policies: list[str], where: str, now: float) -> None:
        with self._lock:
            for policy in policies:
                self._seen.pop((policy, where), None)
                self._seen[(policy, where)] = now
            while len(self._seen) > MAX_TLS_SIGHTINGS:
                del self._seen[next(iter(self._seen))]

    def notes(self, now: float, limit: int = MAX_REPORT_NOTES) -> list[AgentNote]:
        """One note per policy (at most ``limit``), naming the connections."""
        by_policy: dict[str, list[str]] = {}
        with self._lock:
            for key in [k for k, t in self._seen.items() if now - t > self.window_s]:
                del self._seen[key]
            for (policy, where), _ in sorted(self._seen.items(), key=lambda kv: -kv[1]):
                by_policy.setdefault(policy, []).append(where)
        head = f"TLS-encrypted traffic the agent cannot parse (last {self.window_s / 60:g} min): "
        tail = "; capture it before encryption or leave the port out (spec.ports)"
        notes = []
        for policy in sorted(by_policy)[:limit]:
            places = by_policy[policy]
            shown: list[str] = []
            # Room for ", … and N more" within the note's 1024 characters.
            room = _NOTE_MAX - len(head) - len(tail) - 20
            for place in places:
                if sum(len(p) + 2 for p in shown) + len(place) > room:
                    break
                shown.append(place)
            text = ", ".join(shown)
            if len(shown) < len(places):
                text += f" and {len(places) - len(shown)} more"
            notes.append(
                AgentNote(
                    type=NodeNoteType.TLS_NOT_VISIBLE, message=head + text + tail, policy=policy
                )
            )
        return notes
