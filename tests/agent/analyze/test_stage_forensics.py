"""Anomaly alerts freeze a connection of their edge: which one, what names the pcap, the limits."""

from __future__ import annotations

from collections.abc import Mapping
from pathlib import Path
from typing import Any

import pytest
from opentelemetry.sdk._logs.export import InMemoryLogRecordExporter
from opentelemetry.sdk.resources import Resource

from flowprobe.agent.analyze.stage import ANOMALY, Analyzer
from flowprobe.agent.capture.tshark import Tools
from flowprobe.agent.config import AnomalyConfig, ForensicsConfig, ForensicsTrigger
from flowprobe.agent.export.workloads import Workload
from flowprobe.agent.forensics.freezer import (
    PCAP_NAME,
    PCAP_STREAM_ID,
    PCAP_TRIGGER,
    Forensics,
    community_id,
)
from flowprobe.agent.parse.messages import AttrValue
from flowprobe.agent.security.alerts import Alerts
from flowprobe.agent.sessionize.records import Endpoints, Exchange, Outcome
from tests.agent.export.fakes import exchange

S = 1_000_000
T0 = 1_700_000_000 * S
CFG = AnomalyConfig(
    enabled=True,
    top_n=0,
    interval_seconds=1,
    warmup_intervals=3,
    min_exchanges=10,
    span_intervals=10,
)
API = Workload("api")


class FakeFreezer:
    """Names a pcap per connection, as Forensics does while a cut is pending."""

    def __init__(self) -> None:
        self.calls: list[tuple[Endpoints, int, int]] = []

    def __call__(self, ep: Endpoints, start_us: int, end_us: int) -> Mapping[str, AttrValue]:
        self.calls.append((ep, start_us, end_us))
        return {
            PCAP_NAME: f"pcap-{ep.client_port}.pcap",
            PCAP_STREAM_ID: community_id(ep),
            PCAP_TRIGGER: "anomaly",
        }


def _analyzer(freeze: Any, live: bool = False) -> tuple[Analyzer, InMemoryLogRecordExporter]:
    logs = InMemoryLogRecordExporter()  # type: ignore[no-untyped-call]
    alerts = Alerts(logs, Resource({})).start()
    return Analyzer(CFG, alerts, live=live, freeze=freeze), logs


def _second(a: Analyzer, second: int, client: str, errors: int = 0, n: int = 20) -> list[Exchange]:
    """n exchanges of client -> api in that second, the first ``errors`` of them 500s,
    over four connections per client."""
    out = []
    base = 40000 + 100 * (ord(client[0]) - ord("a"))
    for i in range(n):
        start = T0 + second * S + i * (S // (n + 1))
        failed = i < errors
        ex = exchange(
            client=("10.0.0.1", base + i % 4),
            start_us=start,
            outcome=Outcome.ERROR if failed else Outcome.OK,
            attrs={"url.path": "/x", "http.response.status_code": 500 if failed else 200},
        )
        a.observe(ex, Workload(client), API)
        out.append(ex)
    return out


def _alerts(a: Analyzer, logs: InMemoryLogRecordExporter) -> list[Mapping[str, Any]]:
    a.close()
    return [
        dict(r.log_record.attributes or {})
        for r in logs.get_finished_logs()
        if r.log_record.event_name == ANOMALY
    ]


def _events(ex: Exchange) -> list[dict[str, AttrValue]]:
    return [attrs for _, name, attrs in ex.security_events if name == ANOMALY]


def test_the_alerting_exchange_freezes_its_connection_once_per_storm() -> None:
    freeze = FakeFreezer()
    a, logs = _analyzer(freeze)
    for s in range(6):
        _second(a, s, "client")
    # Half of the requests fail for four intervals: one storm, one alert.
    shifted = [ex for s in range(6, 10) for ex in _second(a, s, "client", errors=10)]
    alerting = [ex for ex in shifted if _events(ex)]
    assert len(alerting) == 1
    ex = alerting[0]
    # The first exchange after the interval out of its baseline raised it.
    assert ex.start_us == T0 + 7 * S
    assert freeze.calls == [(ex.endpoints, ex.start_us, ex.end_us)]
    pcap = {
        PCAP_NAME: f"pcap-{ex.endpoints.client_port}.pcap",
        PCAP_STREAM_ID: community_id(ex.endpoints),
        PCAP_TRIGGER: "anomaly",
    }
    # The span (its attributes and its event) and the log record name the pcap.
    assert {k: ex.attrs[k] for k in pcap} == pcap
    (event,) = _events(ex)
    assert event["flowprobe.anomaly.kind"] == "error_ratio"
    assert {k: event[k] for k in pcap} == pcap
    (record,) = _alerts(a, logs)
    assert {k: record[k] for k in pcap} == pcap
    assert not any(PCAP_NAME in e.attrs for e in shifted if e is not ex)


def test_a_failed_exchange_keeps_the_pcap_its_own_failure_froze() -> None:
    freeze = FakeFreezer()
    a, logs = _analyzer(freeze)
    for s in range(6):
        _second(a, s, "client")
    _second(a, 6, "client", errors=10)
    first = _second(a, 7, "client", errors=1, n=1)[0]
    assert _events(first) and first.attrs[PCAP_TRIGGER] == "anomaly"
    a.close()

    # The same, with the exchange already frozen as an error (forensics runs first).
    a, logs = _analyzer(freeze)
    for s in range(6):
        _second(a, s, "client")
    _second(a, 6, "client", errors=10)
    ex = exchange(client=("10.0.0.1", 40000), start_us=T0 + 7 * S, outcome=Outcome.ERROR)
    ex.attrs.update({PCAP_NAME: "error.pcap", PCAP_TRIGGER: "error"})
    a.observe(ex, Workload("client"), API)
    assert ex.attrs[PCAP_NAME] == "error.pcap" and ex.attrs[PCAP_TRIGGER] == "error"
    (record,) = _alerts(a, logs)
    assert record[PCAP_TRIGGER] == "anomaly"


def test_an_alert_raised_by_another_edge_freezes_its_edges_latest_exchange() -> None:
    freeze = FakeFreezer()
    a, logs = _analyzer(freeze)
    for s in range(6):
        _second(a, s, "client")
        _second(a, s, "other")
    last = _second(a, 6, "client", errors=10)[-1]
    _second(a, 6, "other")
    # Another edge's exchange closes the interval: the alert is about "client".
    (closer,) = _second(a, 7, "other", n=1)
    assert freeze.calls == [(last.endpoints, last.start_us, last.end_us)]
    assert PCAP_NAME not in closer.attrs and not _events(closer)
    # Its event lands on the edge's next exchange, naming the latest one's pcap;
    # that exchange's own connection was not frozen, so its span names none.
    (nxt,) = _second(a, 7, "client", n=1)
    (event,) = _events(nxt)
    assert event[PCAP_NAME] == f"pcap-{last.endpoints.client_port}.pcap"
    assert PCAP_NAME not in nxt.attrs
    (record,) = _alerts(a, logs)
    assert record[PCAP_NAME] == event[PCAP_NAME]


def test_an_alert_raised_by_the_clock_freezes_its_edges_latest_exchange() -> None:
    freeze = FakeFreezer()
    a, logs = _analyzer(freeze, live=True)
    for s in range(6):
        _second(a, s, "client")
    last = _second(a, 6, "client", errors=10)[-1]
    # No exchange comes after the shifted interval: wall time closes it.
    a.tick(T0 + 8 * S + 1)
    assert freeze.calls == [(last.endpoints, last.start_us, last.end_us)]
    (record,) = _alerts(a, logs)
    assert record["flowprobe.anomaly.kind"] == "error_ratio"
    assert record[PCAP_NAME] == f"pcap-{last.endpoints.client_port}.pcap"


def test_a_failing_freeze_on_the_clock_is_counted_not_raised() -> None:
    def broken(ep: Endpoints, start_us: int, end_us: int) -> Mapping[str, AttrValue]:
        raise OSError("disk full")

    a, _ = _analyzer(broken, live=True)
    for s in range(6):
        _second(a, s, "client")
    _second(a, 6, "client", errors=10)
    a.tick(T0 + 8 * S + 1)  # the sink's thread calls this: it must not raise
    assert a.totals()["errors"] == 1


def test_without_a_freezer_nothing_is_remembered() -> None:
    a, _ = _analyzer(None)
    for s in range(8):
        _second(a, s, "client", errors=10 if s == 6 else 0)
    assert a.baselines.edges and all(e.latest is None for e in a.baselines.edges.values())
    a.close()


def _forensics(tmp_path: Path, **settings: Any) -> Forensics:
    config = ForensicsConfig(enabled=True, directory=str(tmp_path / "forensics"), **settings)
    # Never started: freeze() only names and queues, as it does before a cut.
    return Forensics(Tools.find(), config)


def _storm_on(a: Analyzer, clients: list[str]) -> None:
    for s in range(6):
        for c in clients:
            _second(a, s, c)
    for c in clients:
        _second(a, 6, c, errors=10)
    for c in clients:
        _second(a, 7, c, n=1)


@pytest.mark.capture
def test_alerts_beyond_the_freeze_limit_are_counted_not_frozen(tmp_path: Path) -> None:
    forensics = _forensics(tmp_path, max_per_minute=2)
    a, logs = _analyzer(forensics.freeze_anomaly)
    _storm_on(a, ["a", "b", "c", "d"])
    records = _alerts(a, logs)
    assert len(records) == 4
    named = [r for r in records if PCAP_NAME in r]
    assert len(named) == 2 and all(r[PCAP_TRIGGER] == "anomaly" for r in named)
    assert all("-anomaly-" in r[PCAP_NAME] for r in named)
    assert forensics.totals()["triggered"] == 4 and forensics.totals()["suppressed"] == 2


@pytest.mark.capture
def test_nothing_is_frozen_unless_the_anomaly_trigger_is_on(tmp_path: Path) -> None:
    others: tuple[ForensicsTrigger, ...] = ("error", "reset", "timeout", "alert")
    forensics = _forensics(tmp_path, triggers=others)
    a, logs = _analyzer(forensics.freeze_anomaly)
    _storm_on(a, ["a"])
    (record,) = _alerts(a, logs)
    assert PCAP_NAME not in record
    assert forensics.totals().get("triggered", 0) == 0
