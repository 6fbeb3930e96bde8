"""TLSNotVisible: a real TLS server in a pod namespace, captured by dumpcap, read by the
agent's pipeline with TLS detection, attributed to the selecting policy and reported."""

from __future__ import annotations

from pathlib import Path

import pytest

from flowprobe.agent.capture.tshark import Tools, read_file
from flowprobe.agent.config import AgentConfig
from flowprobe.agent.daemon.report import TlsSightings
from flowprobe.agent.enrich.index import NAMESPACES, PODS, ClusterIndex
from flowprobe.agent.enrich.policy import PolicyEngine
from flowprobe.agent.pipeline import Pipeline, Sinks
from flowprobe.agent.sessionize.records import Endpoints, Exchange
from flowprobe.api.v1alpha1 import NodeNoteType
from flowprobe.devenv import servers
from flowprobe.devenv.k8sobjects import namespace, pod, policy
from flowprobe.devenv.netns import Node, capture_to_file
from tests.agent.export.fakes import self_signed

pytestmark = [pytest.mark.capture, pytest.mark.netns]

TLS_PORT, HTTP_PORT = 8443, 8080


def _cert(tmp_path: Path) -> tuple[Path, Path]:
    _, cert_pem, key_pem = self_signed(tmp_path, ("shop.test",))
    cert, key = tmp_path / "cert.pem", tmp_path / "key.pem"
    cert.write_bytes(cert_pem)
    key.write_bytes(key_pem)
    return cert, key


def test_tls_on_a_selected_pod_is_reported_per_policy(tmp_path: Path) -> None:
    cert, key = _cert(tmp_path)
    pcap = tmp_path / "tls.pcapng"
    with Node() as node:
        web = node.add_pod("web")
        client = node.add_pod("client")
        servers.start_tls(web, cert, key, TLS_PORT)
        servers.start_http(web, HTTP_PORT)
        with capture_to_file(node, str(pcap), f"inbound and host {web.ip}"):
            r = client.run(["curl", "-skf", f"https://{web.ip}:{TLS_PORT}/"])
            assert r.returncode == 0, r.stderr
            r = client.run(["curl", "-sf", f"http://{web.ip}:{HTTP_PORT}/items/1"])
            assert r.returncode == 0, r.stderr
        web_ip, client_ip = web.ip, client.ip

    # The agent's pipeline as the daemon configures it: HTTP parsed, TLS told.
    seen: list[tuple[Endpoints, int]] = []
    exchanges: list[Exchange] = []
    pipeline = Pipeline(
        AgentConfig(protocols=("http",), detect_tls=True),
        Sinks(exchange=[exchanges.append], tls=[lambda ep, ts: seen.append((ep, ts))]),
    )
    rows = read_file(Tools.find(), str(pcap), pipeline.tshark_options)
    pipeline.feed(rows)
    pipeline.finish()
    assert rows.error is None
    # The HTTP exchange is parsed as before; only the TLS connection is flagged, once.
    assert [ex.endpoints.server_port for ex in exchanges] == [HTTP_PORT]
    assert len(seen) == 1
    ep, ts = seen[0]
    assert (ep.client_address, ep.server_address, ep.server_port) == (
        client_ip,
        web_ip,
        TLS_PORT,
    )

    # The daemon's side: the policy selecting web gets a note naming the connection.
    index = ClusterIndex()
    index.apply(NAMESPACES, "ADDED", namespace("shop", {"capture": "on"}), 0)
    index.apply(PODS, "ADDED", pod("web", web_ip, labels={"app": "web"}), 0)
    index.apply(PODS, "ADDED", pod("client", client_ip, node="node-b"), 0)
    engine = PolicyEngine(index, "node-a")
    engine.set_policies(
        [
            policy("web", podSelector={"matchLabels": {"app": "web"}}),
            policy("other", podSelector={"matchLabels": {"app": "db"}}),
        ]
    )
    policies, where = engine.encrypted(ep, ts)
    assert policies == ["web"]
    sightings = TlsSightings()
    sightings.add(policies, where, now=100.0)
    [note] = sightings.notes(now=100.0)
    assert (note.type, note.policy) == (NodeNoteType.TLS_NOT_VISIBLE, "web")
    assert f"shop/client -> shop/web:{TLS_PORT}" in note.message
    # Forgotten after the window.
    assert sightings.notes(now=100.0 + sightings.window_s + 1) == []
