"""A failing forensics or isolation step costs its pcap or block, not the exchange's span
or the thread that hands exchanges on (the capture thread, without a security stage)."""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path

from kubernetes import client as k8s_client

from flowprobe.agent.capture.tshark import Tools
from flowprobe.agent.daemon.main import Daemon
from flowprobe.agent.enrich.index import NAMESPACES, PODS
from flowprobe.agent.enrich.kubeapi import KubeApi
from flowprobe.agent.enrich.watch import now_us
from flowprobe.agent.sessionize.records import Exchange
from flowprobe.api.policyset import CompiledPolicy
from flowprobe.devenv.k8sobjects import namespace, pod, policy
from tests.agent.daemon.helpers import daemon_settings, stop_daemon
from tests.agent.export.fakes import FakeHttpReceiver, exchange, sdk_spans


def test_a_forensics_failure_is_counted_and_the_span_still_exported(tmp_path: Path) -> None:
    receiver = FakeHttpReceiver()
    daemon = Daemon(daemon_settings(tmp_path), Tools.find(), KubeApi(k8s_client.Configuration()))

    def broken(ex: Exchange, policies: Sequence[CompiledPolicy]) -> None:
        raise OSError("disk full")

    # The failure cannot be provoked in the real NodeForensics on demand.
    daemon.forensics.observe = broken  # type: ignore[method-assign]
    t = now_us() - 10_000_000
    daemon.index.apply(NAMESPACES, "ADDED", namespace("shop", {"capture": "on"}), t)
    daemon.index.apply(PODS, "ADDED", pod("web", "10.0.0.2"), t)
    export = {"endpoint": receiver.endpoint, "protocol": "HttpProtobuf", "timeoutSeconds": 5}
    active = [policy("web", protocols=["HTTP"], export=export)]
    try:
        # What _apply does before it starts a capture (none is needed here).
        daemon.engine.set_policies(active)
        daemon._sync_exports(active)
        daemon.on_exchange(exchange())  # no security stage: as on the capture thread
        assert daemon.stats.anomalies["forensics_isolation_error"] == 1
        daemon.telemetry[next(iter(daemon.telemetry))].close()  # exports what it holds
        spans = [s for r in list(receiver.received.traces) for s in sdk_spans(r)]
        assert [s.attributes["url.path"] for s in spans if s.attributes] == ["/items/42"]
    finally:
        stop_daemon(daemon)
        receiver.stop()
