"""Per-policy security in the daemon: real capture (dumpcap in a node namespace, tshark),
real HTTP servers in pod namespaces, the real CRS, spans over OTLP/HTTP to a
receiver that decodes them.

The daemon runs in the test process; its dumpcap runs in the node namespace
through a wrapper (``ip netns exec``), as the agent's would on the node. The
cluster index is filled by hand (the API watch is tested elsewhere): two pods,
each selected by its own policy.
"""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
from kubernetes import client as k8s_client

from flowprobe.agent.capture.tshark import Tools
from flowprobe.agent.daemon.main import Daemon
from flowprobe.agent.enrich.index import NAMESPACES, PODS
from flowprobe.agent.enrich.kubeapi import KubeApi
from flowprobe.agent.enrich.watch import now_us
from flowprobe.agent.forensics.freezer import PCAP_NAME
from flowprobe.agent.forensics.node import NodeForensics
from flowprobe.api.policyset import CompiledPolicySet
from flowprobe.devenv.k8sobjects import namespace, pod, policy
from flowprobe.devenv.netns import Node, Pod
from flowprobe.devenv.servers import start_http
from tests.agent.daemon.helpers import daemon_settings, netns_tools, stop_daemon
from tests.agent.export.fakes import FakeHttpReceiver, sdk_spans
from tests.operator.clusterkit import wait_until

pytestmark = [pytest.mark.capture, pytest.mark.netns, pytest.mark.slow]

PORT = 8080
SQLI = "items?id=1%27%20UNION%20SELECT%20password%20FROM%20users--"


@pytest.fixture
def pods(tmp_path: Path) -> Iterator[tuple[Node, Pod, Pod, Pod, Tools]]:
    with Node(subnet="10.254.18.0/24") as node:
        client, guarded, open_ = (node.add_pod(n) for n in ("client", "guarded", "open"))
        for server in (guarded, open_):
            start_http(server, PORT)
        yield node, client, guarded, open_, netns_tools(node, tmp_path)


def _policies(path: Path, endpoint: str, secured: str, generation: int) -> None:
    export = {"endpoint": endpoint, "protocol": "HttpProtobuf", "timeoutSeconds": 5}
    waf = {"waf": {"mode": "DetectionOnly"}}
    forensics = {"mode": "Enabled", "triggers": ["SecurityAlert"], "secondsAfter": 0}
    path.write_text(
        CompiledPolicySet(
            policies=[
                policy(
                    name,
                    uid=f"uid-{name}",
                    generation=generation,
                    podSelector={"matchLabels": {"app": name}},
                    direction="Both",
                    protocols=["HTTP"],
                    export=export,
                    **({"security": waf, "forensics": forensics} if name == secured else {}),
                )
                for name in ("guarded", "open")
            ]
        ).to_json()
    )


def _server_spans(receiver: FakeHttpReceiver) -> list[Any]:
    with receiver.received.lock:
        requests = list(receiver.received.traces)
    return [
        s
        for r in requests
        for s in sdk_spans(r)
        if s.kind.name == "SERVER" and s.attributes is not None
    ]


def _mine(spans: list[Any], server: str, prefix: str) -> list[Any]:
    return [
        s
        for s in spans
        if s.attributes.get("server.address") == server
        and str(s.attributes.get("url.path", "")).startswith(prefix)
    ]


def _waf_paths(spans: list[Any], server: str, prefix: str) -> tuple[int, int]:
    """(spans, spans with WAF events) of requests to ``server`` under ``prefix``."""
    mine = _mine(spans, server, prefix)
    hit = [s for s in mine if any(e.name == "flowprobe.waf.match" for e in s.events)]
    return len(mine), len(hit)


def test_waf_findings_only_for_the_policy_that_turns_it_on_and_following_changes(
    pods: tuple[Node, Pod, Pod, Pod, Tools], tmp_path: Path
) -> None:
    _node, client, guarded, open_ = pods[:4]
    receiver = FakeHttpReceiver()
    settings = daemon_settings(tmp_path)
    daemon = Daemon(settings, pods[4], KubeApi(k8s_client.Configuration()))
    daemon.forensics = NodeForensics(pods[4], str(tmp_path / "forensics"), str(tmp_path / "t"))
    t = now_us() - 10_000_000
    daemon.index.apply(NAMESPACES, "ADDED", namespace("shop", {"capture": "on"}), t)
    for name, ip in (("guarded", guarded.ip), ("open", open_.ip)):
        daemon.index.apply(PODS, "ADDED", pod(name, ip, labels={"app": name}), t)
    daemon.node_labels = {}
    try:
        for generation, secured in ((1, "guarded"), (2, "open")):
            _policies(settings.policy_file, receiver.endpoint, secured, generation)
            assert daemon._read_policies()
            daemon._apply(True)
            wait_until(daemon.switcher.alive, "the capture", timeout=30)
            ring = daemon.forensics.current
            assert ring is not None and ring.ring.wait_capturing(30)
            prefix = f"/gen{generation}/"
            for ip in (guarded.ip, open_.ip):
                url = f"http://{ip}:{PORT}{prefix}{SQLI}"
                r = client.run(["curl", "-s", "-o", "/dev/null", "--max-time", "5", url, url, url])
                assert r.returncode == 0, r.stderr
            secured_ip, other_ip = (
                (guarded.ip, open_.ip) if secured == "guarded" else (open_.ip, guarded.ip)
            )

            def exported(prefix: str = prefix) -> bool:
                spans = _server_spans(receiver)
                return all(_waf_paths(spans, ip, prefix)[0] == 3 for ip in (guarded.ip, open_.ip))

            wait_until(exported, f"the spans of generation {generation}", timeout=60)
            spans = _server_spans(receiver)
            assert _waf_paths(spans, secured_ip, prefix) == (3, 3)
            assert _waf_paths(spans, other_ip, prefix) == (3, 0)
            # The findings froze the secured policy's connection (inspected before
            # forensics looks), and only that.
            (pcap,) = {s.attributes.get(PCAP_NAME) for s in _mine(spans, secured_ip, prefix)}
            assert isinstance(pcap, str) and "-alert-" in pcap
            assert not any(PCAP_NAME in s.attributes for s in _mine(spans, other_ip, prefix))
            frozen = ring.store.directory / pcap
            wait_until(frozen.exists, f"{pcap} to be cut ({ring.totals()})", timeout=30)
        assert daemon.security.totals()["inspected"] >= 3
        text = str(receiver.received.traces)
        assert "flowprobe.payload." not in text
    finally:
        stop_daemon(daemon)
        receiver.stop()
