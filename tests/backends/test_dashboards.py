"""The Grafana files in otel/grafana/ are what dashboards.py generates, and hang together.

No Grafana here (it is not packaged in Debian): these checks are structural. That every
query returns data is tests/backends/test_demo_backends.py's job, against Prometheus.
"""

from __future__ import annotations

import json
import re
from pathlib import Path
from typing import Any

import yaml

from flowprobe.devenv import dashboards as d

ROOT = Path(__file__).resolve().parents[2]
GRAFANA = ROOT / "otel" / "grafana"


def load(name: str) -> dict[str, Any]:
    doc: dict[str, Any] = json.loads((GRAFANA / "dashboards" / name).read_text())
    return doc


def test_dashboard_files_are_generated_and_up_to_date() -> None:
    assert sorted(p.name for p in (GRAFANA / "dashboards").glob("*.json")) == sorted(d.DASHBOARDS)
    assert d.main(["--dir", str(GRAFANA / "dashboards")]) == 0, (
        "run: PYTHONPATH=devtools python3 -m flowprobe.devenv.dashboards --write"
    )


def test_panels_ids_layout_and_variables() -> None:
    uids = set()
    for name in d.DASHBOARDS:
        doc = load(name)
        uids.add(doc["uid"])
        panels = list(d.panels_of(doc))
        ids = [p["id"] for p in panels]
        assert len(ids) == len(set(ids)), name
        for p in panels:
            g = p["gridPos"]
            assert g["x"] >= 0 and g["x"] + g["w"] <= 24, (name, p["title"])
            if p["type"] != "row":
                assert p["targets"] and p.get("description"), (name, p["title"])
        defined = {v["name"] for v in doc["templating"]["list"]}
        texts = json.dumps(panels) + json.dumps(doc["templating"])
        used = set(re.findall(r"\$\{?([A-Za-z_]\w*)", texts)) - {
            "__rate_interval",
            "__range",
            "__all",
        }
        assert used <= defined, (name, used - defined)
        assert d.queries(doc), name
    assert len(uids) == len(d.DASHBOARDS)


def test_queries_name_only_metrics_the_pipeline_produces() -> None:
    """A typo in a metric name would pass PromQL parsing and return nothing."""
    known = re.compile(
        r"(http_(server|client)_request_duration_seconds|rpc_(server|client)_call_duration_seconds"
        r"|db_client_operation_duration_seconds|dns_lookup_duration_seconds"
        r"|flowprobe_edge_(duration|rtt)_seconds)_(bucket|sum|count)"
        r"|flowprobe_edge_(exchanges|errors|bytes|retransmits)_total"
        r"|flowprobe_top_(requests|errors|bytes|latency_seconds|retransmits|resets)"
        r"|flowprobe_anomaly_alerts_total"
        r"|flowprobe_agent_\w+|process_(resident_memory_bytes|cpu_seconds_total)"
        r"|otelcol_\w+"
    )
    for name in d.DASHBOARDS:
        for q in d.queries(load(name)):
            for metric in re.findall(r"([a-z_]+)\{", q.expr):
                assert known.fullmatch(metric), (q.panel, metric)


def test_provisioning_points_at_the_dashboards_and_their_datasources() -> None:
    sources = yaml.safe_load(
        (GRAFANA / "provisioning" / "datasources" / "flowprobe.yaml").read_text()
    )
    by_uid = {s["uid"]: s for s in sources["datasources"]}
    assert by_uid[d.PROMETHEUS_UID]["type"] == "prometheus"
    assert by_uid[d.JAEGER_UID]["type"] == "jaeger"
    providers = yaml.safe_load(
        (GRAFANA / "provisioning" / "dashboards" / "flowprobe.yaml").read_text()
    )
    assert [p["type"] for p in providers["providers"]] == ["file"]
    for name in d.DASHBOARDS:
        text = (GRAFANA / "dashboards" / name).read_text()
        for uid in re.findall(r'"uid": "([\w-]+)"', text):
            assert uid in by_uid or uid == load(name)["uid"], (name, uid)


def test_substitution_follows_grafana() -> None:
    values = {"client": ".*", "agent_job": "flowprobe-agent"}
    got = d.substitute(
        'label_replace(rate(x{a=~"$client", j="${agent_job}"}[$__rate_interval]), "id", "$1", "a", "(.*)")',
        values,
        {"__rate_interval": "1m"},
    )
    assert got == (
        'label_replace(rate(x{a=~".*", j="flowprobe-agent"}[1m]), "id", "$1", "a", "(.*)")'
    )
