"""The daemon's analyzers follow the active policies: one per export target, kept while unchanged."""

from __future__ import annotations

import time

from flowprobe.agent.analyze.policies import PolicyAnalyzers
from flowprobe.agent.analyze.stage import Analyzer
from flowprobe.agent.config import ExportConfig
from flowprobe.agent.export.telemetry import Telemetry
from flowprobe.agent.parse.messages import AttrValue
from flowprobe.agent.sessionize.records import Endpoints
from flowprobe.agent.sessionize.stats import Stats
from flowprobe.api.policyset import CompiledPolicy
from flowprobe.devenv.k8sobjects import policy
from tests.agent.export.fakes import MemoryMetricExporter, MemorySpanSink, exchange

ON = {"mode": "Detect", "topN": {"size": 3}}


def _sink() -> Telemetry:
    return Telemetry(
        ExportConfig(),
        Stats(),
        MemorySpanSink(),
        MemoryMetricExporter(),
        salt=b"test",
        wall_clock_release=False,
    )


def _target(p: CompiledPolicy) -> str:
    return p.name[0]  # policies a* export to sink "a", b* to "b"


def test_sync_attaches_keeps_replaces_and_detaches() -> None:
    sinks = {"a": _sink(), "b": _sink()}
    analyzers = PolicyAnalyzers()
    active = [policy("a1", anomalies=ON), policy("a2"), policy("b1")]
    analyzers.sync(active, sinks, _target)
    (first,) = sinks["a"].observers
    assert sinks["b"].observers == []
    assert len(sinks["a"].metrics.collectors) == 1
    # An unrelated change keeps the analyzer and its baselines.
    analyzers.sync([*active, policy("b2")], sinks, _target)
    assert sinks["a"].observers == [first]
    # New settings: a new analyzer in its place.
    changed = {**ON, "baseline": {"intervalSeconds": 5}}
    analyzers.sync([policy("a1", anomalies=changed), policy("b1")], sinks, _target)
    (second,) = sinks["a"].observers
    assert second is not first and len(sinks["a"].metrics.collectors) == 1
    # Off, or the sink gone: detached.
    analyzers.sync([policy("a1", anomalies={"mode": "Off"})], sinks, _target)
    assert sinks["a"].observers == [] and sinks["a"].metrics.collectors == []
    analyzers.sync([policy("b1", anomalies=ON)], sinks, _target)
    analyzers.sync([policy("b1", anomalies=ON)], {"b": _sink()}, _target)
    assert sinks["b"].observers == []
    analyzers.close()


def test_an_attached_analyzer_ranks_what_its_sink_exports() -> None:
    sink = _sink()
    analyzers = PolicyAnalyzers()
    analyzers.sync([policy("a1", anomalies=ON)], {"a": sink}, _target)
    sink.start()
    # The daemon captures live: the window is aged by wall time too.
    now_us = time.time_ns() // 1000
    for i in range(3):
        sink.submit(exchange(client=(f"10.0.0.{i + 1}", 40000), start_us=now_us + i))
    sink.close(timeout_s=10)
    analyzers.close()
    exporter = sink.metric_exporter
    assert isinstance(exporter, MemoryMetricExporter)
    points = exporter.points("flowprobe.top.requests")
    members = {a["flowprobe.top.member"] for _, a, _ in points}
    assert {"10.0.0.1", "10.0.0.2", "10.0.0.3", "10.0.0.2:8080"} <= members


def test_the_policy_that_sets_an_analyzers_settings_decides_whether_it_freezes() -> None:
    asked: list[str] = []

    def freeze(policy: str, ep: Endpoints, start_us: int, end_us: int) -> dict[str, AttrValue]:
        asked.append(policy)
        return {}

    sinks = {"a": _sink()}
    analyzers = PolicyAnalyzers(freeze)
    analyzers.sync([policy("a2", anomalies=ON)], sinks, _target)
    (analyzer,) = sinks["a"].observers
    assert isinstance(analyzer, Analyzer) and analyzer.freeze is not None
    ep = exchange().endpoints
    analyzer.freeze(ep, 1, 2)
    # a1 comes first by name with the same settings: the analyzer stays, a1 decides.
    analyzers.sync([policy("a1", anomalies=ON), policy("a2", anomalies=ON)], sinks, _target)
    assert sinks["a"].observers == [analyzer]
    analyzer.freeze(ep, 1, 2)
    assert asked == ["a2", "a1"]
    analyzers.close()
