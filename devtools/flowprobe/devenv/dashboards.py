"""Grafana dashboards for flowprobe, generated into ``otel/grafana/dashboards/*.json``.

The JSON files are what users load (``otel/grafana/provisioning`` points Grafana at
them); this module is where they are written, so that the PromQL shares one set of
selectors and panel ids and grid positions are never edited by hand. After a change::

    PYTHONPATH=devtools python3 -m flowprobe.devenv.dashboards --write

``tests/agent/export/test_dashboards.py`` fails when the files differ from what this
module generates, and ``tests/backends/test_demo_backends.py`` runs every ``expr``
against Prometheus after the demo.

Every name is what the collector's Prometheus exporter makes of the agent's OTLP
metrics (checked against ``/api/v1/label/__name__/values`` after the demo): dots
become underscores, counters get ``_total``, histograms in seconds become
``*_seconds_bucket/_sum/_count``, ``service.name`` becomes ``job``. The agent's
self-metrics come through the same path (``otel_scope_name="flowprobe.agent.self"``);
only ``process_*`` (memory, CPU) is scraped from the agent's ``/metrics``.

Counters that only exist once something happened (drops, retransmissions, errors of
a kind) are written ``x or 0 * y``, with ``y`` a series that exists whenever there is
traffic: a panel then shows 0 rather than "No data", which would look like a broken
query.
"""

from __future__ import annotations

import argparse
import json
import re
import sys
from collections.abc import Iterator, Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

PROMETHEUS_UID = "flowprobe-prometheus"
JAEGER_UID = "flowprobe-jaeger"
DS = {"type": "prometheus", "uid": "${datasource}"}
JAEGER = {"type": "jaeger", "uid": JAEGER_UID}
RATE = "$__rate_interval"
RANGE = "$__range"

EDGE = "flowprobe_client_service, flowprobe_server_service, flowprobe_protocol"
EDGE_SEL = (
    'flowprobe_client_service=~"$client", flowprobe_server_service=~"$server", '
    'flowprobe_protocol=~"$protocol"'
)
EDGE_LEGEND = "{{flowprobe_client_service}} → {{flowprobe_server_service}} ({{flowprobe_protocol}})"
WL_SEL = 'job=~"$workload"'
SELF_SEL = 'otel_scope_name="flowprobe.agent.self"'

Json = dict[str, Any]


def _rate(metric: str, sel: str, by: str, window: str = RATE) -> str:
    return f"sum by ({by}) (rate({metric}{{{sel}}}[{window}]))"


def _or_zero(value: str, zero_source: str) -> str:
    """``value``, or 0 for every series of ``zero_source`` that ``value`` lacks."""
    return f"({value}) or (0 * {zero_source})"


def _ratio(errors: str, total: str) -> str:
    return f"({_or_zero(errors, total)}) / {total}"


def _quantile(q: float, bucket: str, sel: str, by: str, window: str = RATE) -> str:
    return f"histogram_quantile({q}, sum by ({by}, le) (rate({bucket}{{{sel}}}[{window}])))"


# -- panel model ----------------------------------------------------------


@dataclass
class Query:
    expr: str
    legend: str = ""
    instant: bool = False
    fmt: str = "time_series"  # time_series | table | heatmap
    ref: str = ""

    def target(self, ref: str) -> Json:
        return {
            "refId": self.ref or ref,
            "datasource": DS,
            "expr": self.expr,
            "legendFormat": self.legend or "__auto",
            "range": not self.instant,
            "instant": self.instant,
            "format": self.fmt,
            "editorMode": "code",
        }


@dataclass
class Panel:
    title: str
    kind: str  # timeseries | table | heatmap | stat | nodeGraph | traces-table
    queries: Sequence[Query]
    description: str
    unit: str = "short"
    width: int = 12
    height: int = 8
    extra: Json = field(default_factory=dict)


def _panel(p: Panel, pid: int, x: int, y: int) -> Json:
    refs = "ABCDEFGH"
    out: Json = {
        "id": pid,
        "type": p.kind,
        "title": p.title,
        "description": p.description,
        "datasource": DS,
        "gridPos": {"h": p.height, "w": p.width, "x": x, "y": y},
        "targets": [q.target(refs[i]) for i, q in enumerate(p.queries)],
        "fieldConfig": {"defaults": {"unit": p.unit}, "overrides": []},
    }
    if p.kind == "timeseries":
        out["options"] = {
            "legend": {"displayMode": "table", "placement": "bottom", "calcs": ["mean", "max"]},
            "tooltip": {"mode": "multi", "sort": "desc"},
        }
        out["fieldConfig"]["defaults"]["custom"] = {"fillOpacity": 10, "showPoints": "never"}
    elif p.kind == "heatmap":
        out["options"] = {
            "calculate": False,
            "yAxis": {"unit": p.unit, "axisPlacement": "left"},
            "color": {"mode": "scheme", "scheme": "Oranges", "steps": 64},
            "cellGap": 1,
            "rowsFrame": {"layout": "auto"},
            "tooltip": {"mode": "single", "yHistogram": True},
            "legend": {"show": True},
        }
    elif p.kind == "stat":
        out["options"] = {
            "reduceOptions": {"calcs": ["lastNotNull"], "fields": "", "values": False},
            "graphMode": "area",
            "colorMode": "value",
        }
    elif p.kind == "table":
        out["options"] = {"showHeader": True, "cellHeight": "sm"}
    out.update(p.extra)
    return out


def _layout(panels: Sequence[Panel | str]) -> list[Json]:
    """Rows (a string starts one) and panels flowed left to right, 24 columns wide."""
    out: list[Json] = []
    x = y = 0
    row_h = 0
    pid = 1
    for p in panels:
        if isinstance(p, str):
            y += row_h
            x = row_h = 0
            out.append(
                {
                    "id": pid,
                    "type": "row",
                    "title": p,
                    "collapsed": False,
                    "gridPos": {"h": 1, "w": 24, "x": 0, "y": y},
                    "panels": [],
                }
            )
            pid += 1
            y += 1
            continue
        if x + p.width > 24:
            y += row_h
            x = row_h = 0
        out.append(_panel(p, pid, x, y))
        pid += 1
        x += p.width
        row_h = max(row_h, p.height)
    return out


def _query_var(name: str, label: str, query: str, *, multi: bool = True) -> Json:
    var: Json = {
        "name": name,
        "label": label,
        "type": "query",
        "datasource": DS,
        "query": {"query": query, "refId": f"{name}-values"},
        "definition": query,
        "refresh": 2,
        "includeAll": multi,
        "multi": multi,
        "sort": 1,
    }
    if multi:
        var["allValue"] = ".*"
        var["current"] = {"selected": True, "text": ["All"], "value": ["$__all"]}
    return var


def _datasource_var() -> Json:
    return {
        "name": "datasource",
        "label": "Prometheus",
        "type": "datasource",
        "query": "prometheus",
        "current": {"text": "Prometheus (flowprobe)", "value": PROMETHEUS_UID},
        "hide": 0,
    }


EDGE_VARS = [
    _query_var(
        "client",
        "Client",
        "label_values(flowprobe_edge_exchanges_total, flowprobe_client_service)",
    ),
    _query_var(
        "server",
        "Server",
        "label_values(flowprobe_edge_exchanges_total, flowprobe_server_service)",
    ),
    _query_var(
        "protocol", "Protocol", "label_values(flowprobe_edge_exchanges_total, flowprobe_protocol)"
    ),
]
SEMCONV_SERIES = (
    '{__name__=~"http_server_request_duration_seconds_count|http_client_request_duration_'
    "seconds_count|rpc_server_call_duration_seconds_count|rpc_client_call_duration_seconds_"
    'count|db_client_operation_duration_seconds_count|dns_lookup_duration_seconds_count"}'
)
WORKLOAD_VAR = _query_var("workload", "Workload", f"label_values({SEMCONV_SERIES}, job)")
# Jaeger searches one service at a time: a single-value variable.
TRACE_SERVICE_VAR = _query_var(
    "trace_service",
    "Traces of",
    "label_values(http_server_request_duration_seconds_count, job)",
    multi=False,
)
AGENT_JOB_VAR: Json = {
    "name": "agent_job",
    "label": "Agent scrape job",
    "type": "textbox",
    "query": "flowprobe-agent",
    "current": {"text": "flowprobe-agent", "value": "flowprobe-agent"},
    "description": "Prometheus job that scrapes the agents' /metrics (process memory and CPU)",
}


def _dashboard(
    uid: str, title: str, description: str, variables: list[Json], panels: list[Json]
) -> Json:
    return {
        "uid": uid,
        "title": title,
        "description": description,
        "tags": ["flowprobe"],
        "editable": True,
        "graphTooltip": 1,
        "schemaVersion": 39,
        "version": 1,
        "refresh": "10s",
        "time": {"from": "now-15m", "to": "now"},
        "timezone": "",
        "templating": {"list": [_datasource_var(), *variables]},
        "annotations": {"list": []},
        "links": [
            {
                "type": "dashboards",
                "tags": ["flowprobe"],
                "asDropdown": True,
                "title": "flowprobe",
                "includeVars": False,
                "keepTime": True,
            }
        ],
        "panels": panels,
    }


# -- dashboards -------------------------------------------------------------

_EX = "flowprobe_edge_exchanges_total"
_ERR = "flowprobe_edge_errors_total"


def _server_calls(sel: str, by: str, *, failed: bool = False, status: bool = False) -> str:
    """HTTP and gRPC server requests/s as one vector, so a panel has data with either alone."""
    http_sel = f'{sel}, http_response_status_code=~"5.."' if failed else sel
    rpc_sel = f'{sel}, error_type!=""' if failed else sel
    http = f"rate(http_server_request_duration_seconds_count{{{http_sel}}}[{RATE}])"
    rpc = f"rate(rpc_server_call_duration_seconds_count{{{rpc_sel}}}[{RATE}])"
    if status:
        http = f'label_replace({http}, "status", "HTTP $1", "http_response_status_code", "(.*)")'
        rpc = f'label_replace({rpc}, "status", "gRPC $1", "rpc_grpc_status_code", "(.*)")'
    return f"sum by ({by}) ({http} or {rpc})"


# What the agent's top-N gauges are called in Prometheus, per ranked metric.
TOP_METRICS = {
    "requests": "flowprobe_top_requests",
    "errors": "flowprobe_top_errors",
    "bytes": "flowprobe_top_bytes",
    "mean latency (s)": "flowprobe_top_latency_seconds",
    "retransmits": "flowprobe_top_retransmits",
    "resets": "flowprobe_top_resets",
}
TOP_BY = "flowprobe_top_dimension, flowprobe_top_member"


def _top(metric: str, sel: str = "") -> str:
    # max: the same member may come from several agents (or a member that
    # left the top N and has not expired yet in the collector).
    return f"max by ({TOP_BY}) ({metric}{{{sel}}})"


def _top_panels(exchanges: str) -> list[Panel]:
    requests = _top(TOP_METRICS["requests"])
    alerts = _rate("flowprobe_anomaly_alerts_total", EDGE_SEL, f"{EDGE}, flowprobe_anomaly_kind")
    return [
        Panel(
            "Top talkers (current window)",
            "table",
            [
                Query(_or_zero(_top(metric), requests), instant=True, fmt="table", ref=f"t{i}")
                for i, metric in enumerate(TOP_METRICS.values())
            ],
            "The agent's top N client addresses (client.address) and workloads (client.workload, "
            "server.workload) per metric over its sliding window (flowprobe.top.*: totals over "
            "the window, latency its mean). A member that left the top N stays until the "
            "collector expires it (metric_expiration); 0: not in that metric's top N.",
            width=24,
            extra=_table_rename(
                {
                    "flowprobe_top_dimension": "dimension",
                    "flowprobe_top_member": "member",
                    **{f"Value #t{i}": m for i, m in enumerate(TOP_METRICS)},
                },
                merge=True,
            ),
        ),
        Panel(
            "Top client workloads by requests",
            "timeseries",
            [
                Query(
                    _top(TOP_METRICS["requests"], 'flowprobe_top_dimension="client.workload"'),
                    "{{flowprobe_top_member}}",
                )
            ],
            "Exchanges over the agent's top-N window of the client workloads in its top N.",
        ),
        Panel(
            "Anomaly alerts/s per edge",
            "timeseries",
            [Query(_or_zero(alerts, exchanges), f"{EDGE_LEGEND} {{{{flowprobe_anomaly_kind}}}}")],
            "Edges leaving their baseline (flowprobe.anomaly.alerts, one per storm; the alerts "
            "themselves are OTLP log records and span events: docs/anomalies.md). 0: none.",
            unit="short",
        ),
    ]


def service_map() -> Json:
    exchanges = _rate(_EX, EDGE_SEL, EDGE)
    errors = _rate(_ERR, EDGE_SEL, EDGE)
    nodes_in = (
        f'sum by (id) (label_replace(rate({_EX}{{{EDGE_SEL}}}[{RANGE}]), "id", "$1", '
        '"flowprobe_server_service", "(.*)"))'
    )
    nodes_out = (
        f'sum by (id) (label_replace(rate({_EX}{{{EDGE_SEL}}}[{RANGE}]), "id", "$1", '
        '"flowprobe_client_service", "(.*)"))'
    )
    edges = (
        "label_join(label_replace(label_replace(sum by (" + EDGE + ") (rate("
        f"{_EX}{{{EDGE_SEL}}}[{RANGE}])), "
        '"source", "$1", "flowprobe_client_service", "(.*)"), '
        '"target", "$1", "flowprobe_server_service", "(.*)"), '
        '"id", " ", "source", "target", "flowprobe_protocol")'
    )
    panels: list[Panel | str] = [
        Panel(
            "Service map",
            "nodeGraph",
            [
                # Grafana's node graph takes the frames whose refId is "nodes"
                # and "edges"; fields id / source / target come from labels.
                Query(
                    f'label_replace({_or_zero(nodes_in, nodes_out)}, "title", "$1", "id", "(.*)")',
                    instant=True,
                    fmt="table",
                    ref="nodes",
                ),
                Query(edges, instant=True, fmt="table", ref="edges"),
            ],
            "Workloads and the calls between them over the selected range. Node: requests/s "
            "received; edge: exchanges/s. Names are service.name (Kubernetes workload or, "
            "outside a cluster, address[:port]); 'external' is an end that is not a workload.",
            unit="reqps",
            width=24,
            height=12,
            extra={
                "transformations": [
                    {
                        "id": "organize",
                        "options": {
                            "excludeByName": {"Time": True},
                            "renameByName": {
                                "Value #nodes": "mainstat",
                                "Value #edges": "mainstat",
                            },
                        },
                    }
                ],
                "options": {
                    "nodes": {"mainStatUnit": "reqps"},
                    "edges": {"mainStatUnit": "reqps"},
                },
            },
        ),
        Panel(
            "Edges (selected range)",
            "table",
            [
                Query(_rate(_EX, EDGE_SEL, EDGE, RANGE), instant=True, fmt="table", ref="rate"),
                Query(
                    _ratio(_rate(_ERR, EDGE_SEL, EDGE, RANGE), _rate(_EX, EDGE_SEL, EDGE, RANGE)),
                    instant=True,
                    fmt="table",
                    ref="errors",
                ),
                Query(
                    _quantile(
                        0.95, "flowprobe_edge_duration_seconds_bucket", EDGE_SEL, EDGE, RANGE
                    ),
                    instant=True,
                    fmt="table",
                    ref="p95",
                ),
            ],
            "Rate, error ratio and p95 duration per client → server edge. An edge error is the "
            "callee's verdict when it has a span (an HTTP 404 is not one), else the exchange's.",
            width=24,
            extra=_table_rename(
                {
                    "flowprobe_client_service": "client",
                    "flowprobe_server_service": "server",
                    "flowprobe_protocol": "protocol",
                    "Value #rate": "exchanges/s",
                    "Value #errors": "error ratio",
                    "Value #p95": "p95 (s)",
                },
                merge=True,
            ),
        ),
        "RED per edge",
        Panel(
            "Exchanges/s per edge",
            "timeseries",
            [Query(exchanges, EDGE_LEGEND)],
            "Request rate of each client → server edge (flowprobe.edge.exchanges).",
            unit="reqps",
        ),
        Panel(
            "Error ratio per edge",
            "timeseries",
            [Query(_ratio(errors, exchanges), EDGE_LEGEND)],
            "flowprobe.edge.errors / flowprobe.edge.exchanges; 0 for edges without errors.",
            unit="percentunit",
        ),
        Panel(
            "Duration per edge: p50, p95, p99",
            "timeseries",
            [
                Query(
                    _quantile(q, "flowprobe_edge_duration_seconds_bucket", EDGE_SEL, EDGE),
                    f"p{int(q * 100)} {EDGE_LEGEND}",
                )
                for q in (0.5, 0.95, 0.99)
            ],
            "Exchange duration (first request byte to last response byte) from "
            "flowprobe.edge.duration; semconv HTTP buckets, so sub-5 ms calls (Redis) sit in "
            "the first bucket: see the Databases dashboard for finer DB buckets.",
            unit="s",
        ),
        Panel(
            "Payload bytes/s per edge",
            "timeseries",
            [
                Query(
                    _rate("flowprobe_edge_bytes_total", EDGE_SEL, f"{EDGE}, flowprobe_direction"),
                    f"{EDGE_LEGEND} {{{{flowprobe_direction}}}}",
                )
            ],
            "L7 payload per edge and direction (request / response), without TCP/IP headers.",
            unit="Bps",
        ),
        "Top talkers and anomalies (spec.anomalies / --anomalies)",
        *_top_panels(exchanges),
        "HTTP and gRPC per workload (semconv)",
        Panel(
            "Server requests/s by status",
            "timeseries",
            [Query(_server_calls(WL_SEL, "job, status", status=True), "{{job}} {{status}}")],
            "http.server.request.duration and rpc.server.call.duration counts, by status "
            "(HTTP status code, gRPC status code).",
            unit="reqps",
        ),
        Panel(
            "Server error ratio (HTTP 5xx, gRPC server errors)",
            "timeseries",
            [
                Query(
                    _ratio(_server_calls(WL_SEL, "job", failed=True), _server_calls(WL_SEL, "job")),
                    "{{job}}",
                )
            ],
            "Share of server requests that failed in semconv terms (HTTP 5xx; gRPC UNKNOWN, "
            "DEADLINE_EXCEEDED, UNIMPLEMENTED, INTERNAL, UNAVAILABLE, DATA_LOSS).",
            unit="percentunit",
        ),
        Panel(
            "Client requests/s by status (callers' view)",
            "timeseries",
            [
                Query(
                    _rate(
                        "http_client_request_duration_seconds_count",
                        WL_SEL,
                        "job, server_address, http_response_status_code",
                    ),
                    "{{job}} → {{server_address}} {{http_response_status_code}}",
                ),
            ],
            "http.client.request.duration counts on the calling workload.",
            unit="reqps",
            width=24,
        ),
        Panel(
            "Recent traces",
            "table",
            [],
            "Jaeger search (the Jaeger data source) for the chosen service: Jaeger's service "
            "is the workload's service.name, which is the job label in Prometheus.",
            width=24,
            extra={
                "datasource": JAEGER,
                "targets": [
                    {
                        "refId": "A",
                        "datasource": JAEGER,
                        "queryType": "search",
                        "service": "${trace_service}",
                        "limit": 20,
                    }
                ],
            },
        ),
    ]
    return _dashboard(
        "flowprobe-service-map",
        "flowprobe / Service map and RED",
        "Who calls whom, how often, how many fail and how slow (flowprobe.edge.* and the "
        "semconv HTTP/gRPC histograms).",
        [*EDGE_VARS, WORKLOAD_VAR, TRACE_SERVICE_VAR],
        _layout(panels),
    )


def _endpoint_buckets(window: str) -> str:
    """HTTP routes and gRPC methods as one ``endpoint`` label, with their buckets."""
    http = (
        f"label_join(rate(http_server_request_duration_seconds_bucket{{{WL_SEL}}}[{window}]), "
        '"endpoint", " ", "http_request_method", "http_route")'
    )
    rpc = (
        f"label_join(rate(rpc_server_call_duration_seconds_bucket{{{WL_SEL}}}[{window}]), "
        '"endpoint", "/", "rpc_service", "rpc_method")'
    )
    return f"({http} or {rpc})"


def latency() -> Json:
    def heat(bucket: str, sel: str) -> Query:
        return Query(f"sum by (le) (rate({bucket}{{{sel}}}[{RATE}]))", "{{le}}", fmt="heatmap")

    top_endpoints = (
        f"topk(10, histogram_quantile(0.95, sum by (job, endpoint, le) "
        f"({_endpoint_buckets(RANGE)})))"
    )
    top_db = (
        "topk(10, "
        + _quantile(
            0.95,
            "db_client_operation_duration_seconds_bucket",
            WL_SEL,
            "job, db_system_name, db_operation_name, db_collection_name",
            RANGE,
        )
        + ")"
    )
    panels: list[Panel | str] = [
        Panel(
            "Top 10 slow endpoints (p95, selected range)",
            "table",
            [Query(top_endpoints, instant=True, fmt="table")],
            "HTTP routes (method + http.route) and gRPC methods by p95 server duration.",
            unit="s",
            extra=_table_rename({"job": "workload", "Value": "p95"}),
        ),
        Panel(
            "Top 10 slow DB operations (p95, selected range)",
            "table",
            [Query(top_db, instant=True, fmt="table")],
            "db.client.operation.duration p95 per operation and collection.",
            unit="s",
            extra=_table_rename({"job": "workload", "Value": "p95"}),
        ),
        "Heatmaps",
        Panel(
            "HTTP and gRPC server duration",
            "heatmap",
            [
                Query(
                    "sum by (le) (rate(http_server_request_duration_seconds_bucket"
                    f"{{{WL_SEL}}}[{RATE}]) or rate(rpc_server_call_duration_seconds_bucket"
                    f"{{{WL_SEL}}}[{RATE}]))",
                    "{{le}}",
                    fmt="heatmap",
                )
            ],
            "http.server.request.duration and rpc.server.call.duration (same buckets).",
            unit="s",
        ),
        Panel(
            "DB client operation duration",
            "heatmap",
            [heat("db_client_operation_duration_seconds_bucket", WL_SEL)],
            "db.client.operation.duration: PostgreSQL, MySQL, Redis.",
            unit="s",
        ),
        Panel(
            "DNS lookup duration",
            "heatmap",
            [heat("dns_lookup_duration_seconds_bucket", WL_SEL)],
            "dns.lookup.duration of resolver clients.",
            unit="s",
        ),
        Panel(
            "Exchange duration, all edges",
            "heatmap",
            [heat("flowprobe_edge_duration_seconds_bucket", EDGE_SEL)],
            "flowprobe.edge.duration, every protocol (filter with the edge variables).",
            unit="s",
        ),
        "Quantiles",
        Panel(
            "Endpoint p95",
            "timeseries",
            [
                Query(
                    f"histogram_quantile(0.95, sum by (job, endpoint, le) "
                    f"({_endpoint_buckets(RATE)}))",
                    "{{job}} {{endpoint}}",
                )
            ],
            "p95 server duration per HTTP route / gRPC method.",
            unit="s",
        ),
        Panel(
            "DB operation p95",
            "timeseries",
            [
                Query(
                    _quantile(
                        0.95,
                        "db_client_operation_duration_seconds_bucket",
                        WL_SEL,
                        "job, db_system_name, db_operation_name",
                    ),
                    "{{job}} {{db_system_name}} {{db_operation_name}}",
                )
            ],
            "p95 db.client.operation.duration per operation.",
            unit="s",
        ),
    ]
    return _dashboard(
        "flowprobe-latency",
        "flowprobe / Latency",
        "Latency heatmaps and the slowest endpoints and database operations.",
        [*EDGE_VARS, WORKLOAD_VAR],
        _layout(panels),
    )


def _table_rename(names: Mapping[str, str], merge: bool = False) -> Json:
    """Grafana table transformations: rename the columns, drop Time; ``merge``: one row per
    label set across the queries first."""
    return {
        "transformations": [
            *([{"id": "merge", "options": {}}] if merge else []),
            {
                "id": "organize",
                "options": {"excludeByName": {"Time": True}, "renameByName": dict(names)},
            },
        ]
    }


def tcp() -> Json:
    rtt = "flowprobe_edge_rtt_seconds"
    retrans = _rate("flowprobe_edge_retransmits_total", EDGE_SEL, EDGE)
    exchanges = _rate(_EX, EDGE_SEL, EDGE)
    panels: list[Panel | str] = [
        Panel(
            "RTT per edge: p50 and p95",
            "timeseries",
            [
                Query(
                    _quantile(q, f"{rtt}_bucket", EDGE_SEL, EDGE), f"p{int(q * 100)} {EDGE_LEGEND}"
                )
                for q in (0.5, 0.95)
            ],
            "TCP round-trip time measured by the capture (the mean RTT of each exchange, "
            "flowprobe.edge.rtt; buckets from 50 µs).",
            unit="s",
        ),
        Panel(
            "Mean RTT per edge",
            "timeseries",
            [
                Query(
                    f"sum by ({EDGE}) (rate({rtt}_sum{{{EDGE_SEL}}}[{RATE}])) / "
                    f"sum by ({EDGE}) (rate({rtt}_count{{{EDGE_SEL}}}[{RATE}]))",
                    EDGE_LEGEND,
                )
            ],
            "Average of the exchanges' mean RTT.",
            unit="s",
        ),
        Panel(
            "Retransmissions/s per edge",
            "timeseries",
            [Query(_or_zero(retrans, exchanges), EDGE_LEGEND)],
            "TCP retransmissions seen while exchanges ran (flowprobe.edge.retransmits); "
            "0 for edges with none.",
            unit="pps",
        ),
        Panel(
            "Retransmissions per 1000 exchanges",
            "timeseries",
            [Query(f"1000 * ({_or_zero(retrans, exchanges)}) / {exchanges}", EDGE_LEGEND)],
            "Retransmissions normalised by traffic, to compare edges of different volume.",
        ),
        Panel(
            "RTT heatmap",
            "heatmap",
            [
                Query(
                    f"sum by (le) (rate({rtt}_bucket{{{EDGE_SEL}}}[{RATE}]))",
                    "{{le}}",
                    fmt="heatmap",
                )
            ],
            "Distribution of per-exchange RTT over every selected edge.",
            unit="s",
        ),
        Panel(
            "Exchanges with RTT samples/s",
            "timeseries",
            [Query(_rate(f"{rtt}_count", EDGE_SEL, EDGE), EDGE_LEGEND)],
            "How many exchanges the RTT figures rest on (UDP exchanges have none).",
            unit="reqps",
        ),
    ]
    return _dashboard(
        "flowprobe-tcp",
        "flowprobe / TCP health per edge",
        "Round-trip times and retransmissions per client → server edge, from the capture.",
        EDGE_VARS,
        _layout(panels),
    )


def databases() -> Json:
    count = "db_client_operation_duration_seconds_count"
    by_op = "job, db_system_name, db_operation_name, db_collection_name"
    ops = _rate(count, WL_SEL, by_op)
    panels: list[Panel | str] = [
        Panel(
            "Operations/s",
            "timeseries",
            [Query(ops, "{{job}} {{db_system_name}} {{db_operation_name}} {{db_collection_name}}")],
            "db.client.operation.duration count per operation and collection (table).",
            unit="ops",
        ),
        Panel(
            "Error ratio per operation",
            "timeseries",
            [
                Query(
                    _ratio(_rate(count, f'{WL_SEL}, error_type!=""', by_op), ops),
                    "{{job}} {{db_system_name}} {{db_operation_name}} {{db_collection_name}}",
                )
            ],
            "Share of operations the server answered with an error; 0 where none failed.",
            unit="percentunit",
        ),
        Panel(
            "Errors/s by response status code",
            "timeseries",
            [
                Query(
                    _rate(
                        count,
                        f'{WL_SEL}, db_response_status_code!=""',
                        "job, db_system_name, db_response_status_code",
                    ),
                    "{{job}} {{db_system_name}} {{db_response_status_code}}",
                )
            ],
            "SQLSTATE (PostgreSQL), MySQL error number, Redis error prefix.",
            unit="ops",
        ),
        Panel(
            "p95 per operation",
            "timeseries",
            [
                Query(
                    _quantile(0.95, "db_client_operation_duration_seconds_bucket", WL_SEL, by_op),
                    "{{job}} {{db_system_name}} {{db_operation_name}} {{db_collection_name}}",
                )
            ],
            "db.client.operation.duration p95 (DB buckets from 1 ms).",
            unit="s",
        ),
        Panel(
            "Time spent per operation (selected range)",
            "table",
            [
                Query(
                    f"topk(15, sum by ({by_op}) (increase("
                    f"db_client_operation_duration_seconds_sum{{{WL_SEL}}}[{RANGE}])))",
                    instant=True,
                    fmt="table",
                )
            ],
            "Where the workloads wait on their databases: total seconds per operation.",
            unit="s",
            width=24,
            extra=_table_rename({"job": "workload", "Value": "seconds"}),
        ),
    ]
    return _dashboard(
        "flowprobe-databases",
        "flowprobe / Database operations",
        "PostgreSQL, MySQL and Redis calls seen on the wire (db.client.operation.duration).",
        [WORKLOAD_VAR],
        _layout(panels),
    )


def dns() -> Json:
    count = "dns_lookup_duration_seconds_count"
    lookups = _rate(count, WL_SEL, "job")
    panels: list[Panel | str] = [
        Panel(
            "DNS errors/s by response code",
            "timeseries",
            [
                Query(
                    _rate(count, f'{WL_SEL}, error_type!=""', "job, error_type"),
                    "{{job}} {{error_type}}",
                )
            ],
            "Failed lookups by rcode (NXDOMAIN, SERVFAIL, ...) or timeout, per client workload.",
            unit="ops",
        ),
        Panel(
            "DNS error ratio",
            "timeseries",
            [Query(_ratio(_rate(count, f'{WL_SEL}, error_type!=""', "job"), lookups), "{{job}}")],
            "Share of lookups that failed, per client workload.",
            unit="percentunit",
        ),
        Panel(
            "Lookups/s by question type",
            "timeseries",
            [
                Query(
                    _rate(count, WL_SEL, "job, flowprobe_dns_question_type"),
                    "{{job}} {{flowprobe_dns_question_type}}",
                )
            ],
            "dns.lookup.duration count by question type (A, AAAA, SRV, ...).",
            unit="ops",
        ),
        Panel(
            "Lookup duration p50 / p95",
            "timeseries",
            [
                Query(
                    _quantile(q, "dns_lookup_duration_seconds_bucket", WL_SEL, "job"),
                    f"p{int(q * 100)} {{{{job}}}}",
                )
                for q in (0.5, 0.95)
            ],
            "dns.lookup.duration quantiles per client workload.",
            unit="s",
        ),
        Panel(
            "Errors per DNS server",
            "timeseries",
            [
                Query(
                    _ratio(
                        _rate(_ERR, f'{EDGE_SEL}, flowprobe_protocol="dns"', EDGE),
                        _rate(_EX, f'{EDGE_SEL}, flowprobe_protocol="dns"', EDGE),
                    ),
                    EDGE_LEGEND,
                )
            ],
            "Error ratio of each client → DNS server edge (which resolver fails).",
            unit="percentunit",
            width=24,
        ),
    ]
    return _dashboard(
        "flowprobe-dns",
        "flowprobe / DNS",
        "DNS lookups and their errors seen on the wire (dns.lookup.duration).",
        [*EDGE_VARS, WORKLOAD_VAR],
        _layout(panels),
    )


def agent() -> Json:
    def own(metric: str, by: str = "instance") -> str:
        return _rate(metric, SELF_SEL, by)

    exchanges = own("flowprobe_agent_exchanges_total")
    panels: list[Panel | str] = [
        Panel(
            "Exchanges/s",
            "stat",
            [Query(f"sum({exchanges})")],
            "Exchanges the agents paired, all nodes.",
            unit="reqps",
            width=6,
            height=4,
        ),
        Panel(
            "Spans exported/s",
            "stat",
            [Query(f"sum({own('flowprobe_agent_spans_exported_total')})")],
            "Spans the backend accepted.",
            unit="short",
            width=6,
            height=4,
        ),
        Panel(
            "Workloads with metric state",
            "stat",
            [Query(f"sum(flowprobe_agent_workloads{{{SELF_SEL}}})")],
            "Bounded by max_workloads (1000 by default).",
            width=6,
            height=4,
        ),
        Panel(
            "Agent memory (RSS)",
            "stat",
            [Query('max(process_resident_memory_bytes{job=~"$agent_job"})')],
            "Largest resident memory of the agents scraped on /metrics (--metrics-port).",
            unit="bytes",
            width=6,
            height=4,
        ),
        "Capture",
        Panel(
            "Packets/s, exchanges/s, connections/s",
            "timeseries",
            [
                Query(own("flowprobe_agent_packets_total"), "packets {{instance}}"),
                Query(exchanges, "exchanges {{instance}}"),
                Query(own("flowprobe_agent_connections_total"), "connections {{instance}}"),
            ],
            "What the pipeline processed, per agent (instance = node).",
            unit="ops",
        ),
        Panel(
            "Capture drops, parse errors, anomalies",
            "timeseries",
            [
                Query(
                    f"sum by (instance) (increase(flowprobe_agent_capture_dropped_total"
                    f"{{{SELF_SEL}}}[{RATE}]))",
                    "capture dropped {{instance}}",
                ),
                Query(
                    _or_zero(
                        own("flowprobe_agent_parse_errors_total", "instance, protocol"), exchanges
                    ),
                    "parse errors {{protocol}} {{instance}}",
                ),
                Query(
                    _or_zero(own("flowprobe_agent_anomalies_total", "instance, kind"), exchanges),
                    "anomaly {{kind}} {{instance}}",
                ),
            ],
            "dumpcap reports its drops only when it stops; parse errors and anomalies per "
            "second (0 when none).",
        ),
        "Export",
        Panel(
            "Spans exported and dropped/s",
            "timeseries",
            [
                Query(own("flowprobe_agent_spans_exported_total"), "exported {{instance}}"),
                Query(
                    _or_zero(
                        own("flowprobe_agent_spans_dropped_total", "instance, reason"), exchanges
                    ),
                    "dropped {{reason}} {{instance}}",
                ),
            ],
            "Dropped spans by reason: queue_full, export_failed (backend down), shutdown.",
        ),
        Panel(
            "Exchanges dropped/s and export failures/s",
            "timeseries",
            [
                Query(
                    _or_zero(
                        own("flowprobe_agent_exchanges_dropped_total", "instance, reason"),
                        exchanges,
                    ),
                    "exchanges dropped {{reason}} {{instance}}",
                ),
                Query(
                    _or_zero(
                        own("flowprobe_agent_export_failures_total", "instance, signal"), exchanges
                    ),
                    "failed {{signal}} requests {{instance}}",
                ),
            ],
            "Exchanges lost before any span or metric; OTLP requests that failed after retries.",
        ),
        Panel(
            "Queue fill",
            "timeseries",
            [
                Query(
                    f"max by (instance, queue) (flowprobe_agent_queue_size{{{SELF_SEL}}} / "
                    f"flowprobe_agent_queue_capacity{{{SELF_SEL}}})",
                    "{{queue}} {{instance}}",
                )
            ],
            "Exchange and span queues and held link candidates, as a share of their bound; "
            "at 100% the newest items are dropped.",
            unit="percentunit",
        ),
        Panel(
            "Parent decisions/s",
            "timeseries",
            [Query(own("flowprobe_agent_links_total", "result"), "{{result}}")],
            "In-flight rule outcomes: linked, root, ambiguous, scan_limit, forced.",
        ),
        "Process and collector",
        Panel(
            "Agent memory",
            "timeseries",
            [
                Query('process_resident_memory_bytes{job=~"$agent_job"}', "RSS {{instance}}"),
            ],
            "Resident memory from the agents' /metrics; it should level off, not grow.",
            unit="bytes",
        ),
        Panel(
            "Agent CPU",
            "timeseries",
            [
                Query(
                    f'rate(process_cpu_seconds_total{{job=~"$agent_job"}}[{RATE}])',
                    "{{instance}}",
                )
            ],
            "CPU seconds per second of the agent process (tshark and dumpcap not included).",
            unit="percentunit",
        ),
        Panel(
            "Collector: spans accepted, sent, failed/s",
            "timeseries",
            [
                Query("sum(rate(otelcol_receiver_accepted_spans[$__rate_interval]))", "accepted"),
                Query("sum(rate(otelcol_receiver_refused_spans[$__rate_interval]))", "refused"),
                Query("sum(rate(otelcol_exporter_sent_spans[$__rate_interval]))", "sent to Jaeger"),
                Query(
                    _or_zero(
                        "sum(rate(otelcol_exporter_send_failed_spans[$__rate_interval]))",
                        "sum(rate(otelcol_exporter_sent_spans[$__rate_interval]))",
                    ),
                    "send failed",
                ),
            ],
            "The collector's own metrics (job otel-collector-internal).",
        ),
        Panel(
            "Collector: export queue",
            "timeseries",
            [
                Query(
                    "max by (exporter) (otelcol_exporter_queue_size / otelcol_exporter_queue_capacity)",
                    "{{exporter}}",
                )
            ],
            "The collector's sending queue towards the trace backend.",
            unit="percentunit",
        ),
    ]
    return _dashboard(
        "flowprobe-agent",
        "flowprobe / Agent health",
        "The agents' own counters (OTLP copy, scope flowprobe.agent.self), their process "
        "figures (/metrics) and the collector.",
        [AGENT_JOB_VAR],
        _layout(panels),
    )


DASHBOARDS = {
    "flowprobe-service-map.json": service_map,
    "flowprobe-latency.json": latency,
    "flowprobe-tcp.json": tcp,
    "flowprobe-databases.json": databases,
    "flowprobe-dns.json": dns,
    "flowprobe-agent.json": agent,
}


def render(doc: Json) -> str:
    return json.dumps(doc, indent=2, ensure_ascii=False) + "\n"


# -- reading dashboards back (tests) ------------------------------------------


@dataclass(frozen=True)
class PanelQuery:
    dashboard: str
    panel: str
    ref: str
    expr: str
    instant: bool


def panels_of(doc: Mapping[str, Any]) -> Iterator[Mapping[str, Any]]:
    """Every panel, including those nested in (collapsed) rows."""
    for p in doc.get("panels", []):
        yield p
        yield from p.get("panels", [])


def queries(doc: Mapping[str, Any]) -> list[PanelQuery]:
    """Every Prometheus ``expr`` of a dashboard."""
    out = []
    for p in panels_of(doc):
        for t in p.get("targets", []):
            if "expr" in t:
                out.append(
                    PanelQuery(
                        doc["title"], p["title"], t["refId"], t["expr"], bool(t.get("instant"))
                    )
                )
    return out


def variable_values(doc: Mapping[str, Any]) -> dict[str, str]:
    """What Grafana substitutes for each template variable with its defaults.

    "All" of a multi-value variable is its ``allValue`` regex; a textbox its text.
    Single-value query variables (whose default is the first value found) are left out.
    """
    out: dict[str, str] = {}
    for v in doc.get("templating", {}).get("list", []):
        if v["type"] == "query" and v.get("includeAll"):
            out[v["name"]] = v["allValue"]
        elif v["type"] == "textbox":
            out[v["name"]] = v["query"]
        elif v["type"] == "datasource":
            out[v["name"]] = v["current"]["value"]
    return out


def substitute(expr: str, variables: Mapping[str, str], builtins: Mapping[str, str]) -> str:
    """Grafana's interpolation of ``$name`` / ``${name}``, builtins (``$__range``) included."""
    values = {**variables, **builtins}

    def one(m: re.Match[str]) -> str:
        name = m.group(1) or m.group(2)
        if name in values:
            return values[name]
        if name.isdigit():
            # label_replace's "$1": Grafana leaves names it does not know alone.
            return m.group(0)
        raise KeyError(f"undefined variable ${name} in {expr!r}")

    # Longest names first is implied: a name runs to the first non-word character.
    return re.sub(r"\$\{(\w+)\}|\$(\w+)", one, expr)


def label_values_queries(doc: Mapping[str, Any]) -> list[str]:
    """The ``label_values(selector, label)`` of query variables, as PromQL that lists them."""
    out = []
    for v in doc.get("templating", {}).get("list", []):
        if v["type"] != "query":
            continue
        m = re.fullmatch(r"label_values\((.*), (\w+)\)", v["definition"])
        if m is None:
            raise ValueError(f"variable {v['name']}: not label_values(): {v['definition']!r}")
        out.append(f"count by ({m.group(2)}) ({m.group(1)})")
    return out


def main(argv: Sequence[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__)
    ap.add_argument(
        "--dir",
        type=Path,
        default=Path(__file__).resolve().parents[3] / "otel" / "grafana" / "dashboards",
    )
    ap.add_argument("--write", action="store_true", help="write the files (else: check them)")
    args = ap.parse_args(argv)
    stale = []
    for name, build in DASHBOARDS.items():
        path = args.dir / name
        text = render(build())
        if args.write:
            path.parent.mkdir(parents=True, exist_ok=True)
            path.write_text(text)
        elif not path.exists() or path.read_text() != text:
            stale.append(str(path))
    if stale:
        print("out of date (run with --write):", *stale, sep="\n  ", file=sys.stderr)
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
