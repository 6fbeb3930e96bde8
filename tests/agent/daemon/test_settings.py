"""The daemon's pure parts: environment, export settings, which policies apply."""

from __future__ import annotations

import datetime
from pathlib import Path

import pytest

from flowprobe.agent.daemon.main import Settings, SettingsError, active_policies, export_config
from flowprobe.api.policyset import CompiledExport, CompiledPolicySet
from flowprobe.devenv.k8sobjects import policy

NOW = datetime.datetime(2026, 11, 28, tzinfo=datetime.UTC)


def test_settings_from_the_contracts_environment() -> None:
    s = Settings.from_env(
        {
            "NODE_NAME": "node-a",
            "POD_NAMESPACE": "flowprobe-system",
            "FLOWPROBE_HEALTH_PORT": "9999",
            "FLOWPROBE_REPORT_INTERVAL_SECONDS": "5",
            "FLOWPROBE_CAPTURE_INTERFACES": "eth0,cali+",
        }
    )
    assert (s.node, s.namespace, s.health_port, s.report_interval_s) == (
        "node-a",
        "flowprobe-system",
        9999,
        5.0,
    )
    assert s.policy_file == Path("/etc/flowprobe/policies/policies.json")
    assert s.interfaces == ("eth0", "cali+") and s.pod == "flowprobe-agent-node-a"
    for bad in (
        {},
        {"NODE_NAME": "n", "FLOWPROBE_HEALTH_PORT": "x"},
        {"NODE_NAME": "n", "FLOWPROBE_REPORT_INTERVAL_SECONDS": "0"},
    ):
        with pytest.raises(SettingsError):
            Settings.from_env(bad)


def test_export_config_reads_header_secret_files(tmp_path: Path) -> None:
    (tmp_path / "authorization").write_text("Bearer abc\n")
    (tmp_path / "..data").mkdir()  # the Secret volume's own bookkeeping
    cfg = export_config(
        CompiledExport(
            endpoint="https://otlp.example:4318",
            protocol="HttpProtobuf",
            headers_dir=str(tmp_path),
            ca_file="/etc/ca.crt",
            timeout_seconds=7,
            server_name="otlp.internal",
            insecure_skip_verify=True,
        )
    )
    assert cfg.otlp.protocol == "http/protobuf"
    assert (cfg.otlp.server_name, cfg.otlp.insecure_skip_verify) == ("otlp.internal", True)
    assert cfg.otlp.headers == {"authorization": "Bearer abc"}
    assert (cfg.otlp.certificate, cfg.otlp.timeout_seconds) == ("/etc/ca.crt", 7)


def test_policies_apply_by_node_labels_and_time() -> None:
    pset = CompiledPolicySet(
        policies=[
            policy("everywhere"),
            policy("gpu-only", nodeSelector={"gpu": "true"}),
            policy("expired", notAfter="2026-11-27T00:00:00Z"),
            policy("later", notAfter="2026-11-29T00:00:00Z"),
        ]
    )
    assert [p.name for p in active_policies(pset, {"gpu": "false"}, NOW)] == ["everywhere", "later"]
    assert len(active_policies(pset, {"gpu": "true"}, NOW)) == 3
    assert active_policies(pset, None, NOW) == []  # node labels not read yet
