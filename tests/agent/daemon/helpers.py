"""The daemon in the test process, capturing in a node namespace."""

from __future__ import annotations

import dataclasses
from pathlib import Path

from flowprobe.agent.capture.tshark import Tools
from flowprobe.agent.daemon.main import Daemon, Settings
from flowprobe.devenv.netns import Node


def netns_tools(node: Node, tmp: Path) -> Tools:
    """The tools, with dumpcap run in the node namespace (``ip netns exec``), as the
    agent's would on the node."""
    tools = Tools.find()
    wrapper = tmp / "dumpcap"
    wrapper.write_text(f'#!/bin/sh\nexec ip netns exec {node.netns} {tools.dumpcap} "$@"\n')
    wrapper.chmod(0o755)
    return dataclasses.replace(tools, dumpcap=str(wrapper))


def daemon_settings(tmp: Path) -> Settings:
    """A daemon on node-a, its policy file in ``tmp``, the health server unstarted."""
    return Settings(
        node="node-a",
        namespace="flowprobe",
        pod="agent",
        policy_file=tmp / "policies.json",
        health_address="127.0.0.1",
        health_port=0,
        report_interval_s=15,
        interfaces=("any",),
        kubeconfig=None,
    )


def stop_daemon(daemon: Daemon) -> None:
    """What Daemon.shutdown stops, but the health server (never started) and the watcher
    (never started either: the tests fill the index by hand)."""
    daemon.switcher.stop()
    daemon.forensics.close()
    daemon.security.close()
    for telemetry in daemon.telemetry.values():
        telemetry.close()
    daemon.analyzers.close()
    daemon.health.server.server_close()
