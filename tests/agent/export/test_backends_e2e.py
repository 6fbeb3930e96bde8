"""Recorded pcaps replayed by ``flowprobe-agent read --otlp-endpoint`` come out of Jaeger and
Prometheus (through the collector), with the span model and metric names of docs/export.md."""

from __future__ import annotations

import json
import subprocess
import sys
import uuid
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import Any

import pytest

from flowprobe.devenv.backends import LocalBackends, attributes_of, spans_of
from tests.agent.helpers import DATA
from tests.backends.conftest import (
    local_backends,  # noqa: F401 - the fixture
    poll,
)

pytestmark = [pytest.mark.backends, pytest.mark.capture]

SPAN_KIND_SERVER = (2, "SPAN_KIND_SERVER")
SPAN_KIND_CLIENT = (3, "SPAN_KIND_CLIENT")


def test_replayed_http_pcaps_reach_jaeger_and_prometheus(
    local_backends: LocalBackends,  # noqa: F811
    tmp_path: Path,
) -> None:
    b = local_backends
    tag = uuid.uuid4().hex[:8]
    api, loadgen = f"api-{tag}", f"loadgen-{tag}"
    records = tmp_path / "records.jsonl"
    pcaps = sorted(str(p) for p in (DATA / "http").glob("*.pcapng"))
    r = subprocess.run(
        [
            sys.executable, "-m", "flowprobe.agent", "read", *pcaps,
            "--otlp-endpoint", b.otlp_grpc,
            "--service-name", f"10.251.0.2:8080={api}",
            "--service-name", f"10.251.0.1={loadgen}",
            "--output", str(records),
        ],
        capture_output=True, text=True, timeout=300,
    )  # fmt: skip
    assert r.returncode == 0, r.stderr
    exchanges = [json.loads(ln) for ln in records.read_text().splitlines()]
    assert len(exchanges) >= 20
    first = min(e["start_time_unix_us"] for e in exchanges) // 1_000_000
    last = max(e["end_time_unix_us"] for e in exchanges) // 1_000_000
    start = datetime.fromtimestamp(first, UTC) - timedelta(minutes=5)
    end = datetime.fromtimestamp(last, UTC) + timedelta(minutes=5)

    def fetch() -> list[dict[str, Any]]:
        return spans_of(b.jaeger_traces(api, start, end, num_traces=1000))

    spans = poll(fetch, lambda s: len(s) >= 2 * len(exchanges))
    servers = [s for s in spans if s["kind"] in SPAN_KIND_SERVER]
    clients = [s for s in spans if s["kind"] in SPAN_KIND_CLIENT]
    assert len(servers) == len(clients) == len(exchanges)
    assert {s["resource"]["service.name"] for s in servers} == {api}
    assert {s["resource"]["service.name"] for s in clients} == {loadgen}
    # Each SERVER span hangs under its caller's CLIENT span, in the same trace.
    client_ids = {(c["traceId"], c["spanId"]) for c in clients}
    assert all((s["traceId"], s["parentSpanId"]) in client_ids for s in servers)
    # Span times are capture times, to the microsecond.
    want = sorted((e["start_time_unix_us"], e["end_time_unix_us"]) for e in exchanges)
    got = sorted(
        (int(s["startTimeUnixNano"]) // 1000, int(s["endTimeUnixNano"]) // 1000) for s in servers
    )
    assert got == want
    names = {s["name"] for s in servers}
    assert "GET /items/{id}" in names and "GET /silent" in names
    a = attributes_of(next(s for s in servers if s["name"] == "GET /items/{id}")["attributes"])
    assert a["http.route"] == "/items/{id}"
    assert "flowprobe.server_response_time_us" in a
    assert "flowprobe.tcp.rtt.mean_us" in a
    reset = [
        s for s in servers if attributes_of(s["attributes"]).get("flowprobe.outcome") == "reset"
    ]
    assert reset and all(
        any(ev["name"] == "tcp.reset" for ev in s.get("events", [])) for s in reset
    )
    assert all(s.get("status", {}).get("code") in (2, "STATUS_CODE_ERROR") for s in reset)

    # Metrics: semconv histogram per workload (job = service.name), RED per edge.
    query = f'sum(http_server_request_duration_seconds_count{{job="{api}"}})'
    result = poll(lambda: b.prom_query(query), lambda res: bool(res))
    assert result, f"no {query}"
    assert float(result[0]["value"][1]) == len(exchanges)
    edge = poll(
        lambda: b.prom_query(
            f'flowprobe_edge_exchanges_total{{flowprobe_client_service="{loadgen}"}}'
        ),
        lambda res: bool(res),
    )
    assert {m["metric"]["flowprobe_server_service"] for m in edge} == {api}
    assert sum(float(m["value"][1]) for m in edge) == len(exchanges)
