"""The daemon end to end: a policy's anomaly alert freezes a pcap of the edge's connection.

The daemon runs in the test process (the index filled by hand, as in
test_security.py), capturing in the node namespace; a client pod calls the
``api`` pod steadily, then half of its requests fail. The policy detects
anomalies with a 1 s interval and enables forensics with the AnomalyAlert
trigger only; its export goes over OTLP/gRPC to a receiver here.
"""

from __future__ import annotations

import functools
import threading
import time
from pathlib import Path
from typing import Any

import pytest
from kubernetes import client as k8s_client

from flowprobe.agent.daemon import main
from flowprobe.agent.enrich.index import NAMESPACES, PODS
from flowprobe.agent.enrich.kubeapi import KubeApi
from flowprobe.agent.enrich.watch import now_us
from flowprobe.agent.forensics.node import NodeForensics
from flowprobe.api.policyset import CompiledPolicySet
from flowprobe.devenv.k8sobjects import namespace, pod, policy
from flowprobe.devenv.netns import Node, Pod
from tests.agent.daemon.helpers import daemon_settings, netns_tools, stop_daemon
from tests.agent.export.fakes import FakeGrpcReceiver
from tests.agent.helpers import check_stream_id, loadgen
from tests.operator.clusterkit import wait_until

pytestmark = [pytest.mark.capture, pytest.mark.netns, pytest.mark.slow]

RATE = 30
ANOMALIES = {
    "mode": "Detect",
    "baseline": {
        "intervalSeconds": 1,
        "warmupIntervals": 3,
        "spanIntervals": 10,
        "minExchanges": 10,
    },
}


def _alert(receiver: FakeGrpcReceiver) -> dict[str, Any] | None:
    return next(
        (
            a
            for name, a in receiver.received.log_records()
            if name == "flowprobe.anomaly" and "flowprobe.pcap.name" in a
        ),
        None,
    )


def test_a_policys_anomaly_alert_freezes_a_pcap_on_the_node(
    http_pods: tuple[Node, Pod, Pod], tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    node, client, api = http_pods
    forensics_dir = tmp_path / "forensics"
    monkeypatch.setattr(
        main,
        "NodeForensics",
        functools.partial(NodeForensics, directory=str(forensics_dir), token_file="/none"),
    )
    receiver = FakeGrpcReceiver()
    settings = daemon_settings(tmp_path)
    daemon = main.Daemon(settings, netns_tools(node, tmp_path), KubeApi(k8s_client.Configuration()))
    t = now_us() - 10_000_000
    daemon.index.apply(NAMESPACES, "ADDED", namespace("shop", {"capture": "on"}), t)
    daemon.index.apply(PODS, "ADDED", pod("api", api.ip, labels={"app": "api"}), t)
    daemon.node_labels = {}
    export = {
        "endpoint": f"http://127.0.0.1:{receiver.port}",
        "protocol": "Grpc",
        "timeoutSeconds": 5,
    }
    settings.policy_file.write_text(
        CompiledPolicySet(
            policies=[
                policy(
                    "api",
                    podSelector={"matchLabels": {"app": "api"}},
                    protocols=["HTTP"],
                    export=export,
                    anomalies=ANOMALIES,
                    forensics={"mode": "Enabled", "triggers": ["AnomalyAlert"]},
                )
            ]
        ).to_json()
    )
    try:
        assert daemon._read_policies()
        daemon._apply(True)
        wait_until(daemon.switcher.alive, "the capture", timeout=30)
        current = daemon.forensics.current
        assert current is not None and current.ring.wait_capturing(30)
        # Steady for longer than the warm-up, then half of the requests fail;
        # the loads overlap so the rate has no gap.
        steady = threading.Thread(target=loadgen, args=(client, api.ip, 9, RATE, "/items/{n}", 4))
        steady.start()
        time.sleep(6.0)
        loadgen(client, api.ip, 4, RATE, "/status/500,/items/{n}", 4)
        steady.join()
        wait_until(lambda: _alert(receiver) is not None, "an alert naming a pcap", timeout=30)
        alert = _alert(receiver)
        assert alert is not None
        assert alert["flowprobe.anomaly.kind"] == "error_ratio"
        assert alert["flowprobe.pcap.trigger"] == "anomaly"
        pcap = forensics_dir / "frozen" / alert["flowprobe.pcap.name"]
        wait_until(pcap.exists, f"the pcap to be cut ({current.totals()})", timeout=30)
    finally:
        stop_daemon(daemon)
        receiver.stop()
    check_stream_id(pcap, alert["flowprobe.pcap.stream_id"])
