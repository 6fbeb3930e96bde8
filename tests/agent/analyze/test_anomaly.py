"""Per-edge baselines: warm-up, EWMA, each rule, storms deduplicated, bounded memory."""

from __future__ import annotations

from flowprobe.agent.analyze.anomaly import Baselines, Kind, Transition, bucket, p95_seconds
from flowprobe.agent.config import AnomalyConfig

S = 1_000_000
A = ("client", "api", "http")
B = ("other", "api", "http")
CFG = AnomalyConfig(
    enabled=True, interval_seconds=1, warmup_intervals=3, min_exchanges=10, span_intervals=10
)


def feed(
    b: Baselines,
    second: int,
    edge: tuple[str, str, str],
    n: int,
    errors: int = 0,
    latency_us: int = 2000,
) -> list[Transition]:
    out = []
    for i in range(n):
        at = second * S + i * (S // (n + 1))
        out += b.observe(at, edge, latency_us, i < errors)
    return out


def steady(b: Baselines, seconds: range, *edges: tuple[str, str, str]) -> list[Transition]:
    out = []
    for s in seconds:
        for e in edges:
            out += feed(b, s, e, 20, errors=2)
    return out


def test_p95_of_the_histogram() -> None:
    hist: dict[int, int] = {}
    for us in [1000] * 95 + [100_000] * 5:
        hist[bucket(us)] = hist.get(bucket(us), 0) + 1
    assert abs(p95_seconds(hist, 100) - 0.001) < 0.0002
    hist[bucket(100_000)] += 1
    assert abs(p95_seconds(hist, 101) - 0.1) < 0.02


def test_steady_traffic_raises_nothing() -> None:
    b = Baselines(CFG)
    assert steady(b, range(60), A, B) == []
    e = b.edges[A]
    assert abs(e.error_ratio - 0.1) < 1e-9 and abs(e.rate - 20) < 1e-9


def test_error_ratio_and_latency_shift_alert_once_on_that_edge_only() -> None:
    b = Baselines(CFG)
    assert steady(b, range(10), A, B) == []
    out = []
    for s in range(10, 20):
        out += feed(b, s, A, 20, errors=12, latency_us=200_000)
        out += feed(b, s, B, 20, errors=2)
    alerts = [t for t in out if not t.resolved]
    assert {(t.edge, t.kind) for t in alerts} == {(A, Kind.ERROR_RATIO), (A, Kind.LATENCY)}
    # Both measured on the first shifted interval (10 s), closed by an exchange at 11 s.
    assert {t.start_us for t in alerts} == {10 * S}
    ratio = next(t for t in alerts if t.kind is Kind.ERROR_RATIO)
    assert ratio.observed == 0.6 and abs(ratio.baseline - 0.1) < 1e-9
    assert abs(ratio.threshold - 0.2) < 1e-9
    # A storm goes on without new alerts, and resolves with its count once
    # the edge is back (the latency one as soon as the baseline, following
    # the shift, has caught up with it).
    out += steady(b, range(20, 40), A, B)
    assert len([t for t in out if not t.resolved]) == 2
    resolved = {t.kind: t for t in out if t.resolved}
    assert set(resolved) == {Kind.ERROR_RATIO, Kind.LATENCY}
    for t in resolved.values():
        assert t.reason == "recovered" and t.since_us == 10 * S and t.count >= 2
    assert 5 <= resolved[Kind.ERROR_RATIO].count <= 10


def test_nothing_alerts_during_warm_up() -> None:
    b = Baselines(CFG)
    feed(b, 0, A, 20, errors=0)
    out = feed(b, 1, A, 20, errors=20, latency_us=500_000) + feed(b, 2, A, 20)
    assert out == []


def test_intervals_with_too_few_exchanges_are_not_judged() -> None:
    b = Baselines(CFG)
    steady(b, range(10), A)
    out = feed(b, 10, A, 5, errors=5) + feed(b, 11, A, 20, errors=2)
    assert [t for t in out if t.kind is Kind.ERROR_RATIO] == []


def test_rate_rise_and_drop_including_silence() -> None:
    b = Baselines(CFG.model_copy(update={"rate_change_percent": 100}))
    steady(b, range(10), A, B)
    out = feed(b, 10, A, 60) + feed(b, 10, B, 20) + feed(b, 11, B, 20)
    assert [(t.edge, t.kind) for t in out] == [(A, Kind.RATE_INCREASE)]
    # A goes silent: a drop, measured when time moves on through B's traffic.
    out = feed(b, 12, B, 20) + feed(b, 13, B, 20)
    assert (A, Kind.RATE_DECREASE) in [(t.edge, t.kind) for t in out if not t.resolved]


def test_a_gap_is_closed_as_empty_intervals_and_stop_reports_open_storms() -> None:
    b = Baselines(CFG)
    steady(b, range(10), A)
    feed(b, 10, A, 20, errors=15)
    # Closes 10 s (errors) and 11 s (empty: the rate dropped).
    out = b.advance(12 * S)
    assert [(t.kind, t.resolved) for t in out] == [
        (Kind.ERROR_RATIO, False),
        (Kind.RATE_DECREASE, False),
    ]
    stopped = b.stop()
    assert {(t.kind, t.reason) for t in stopped} == {
        (Kind.ERROR_RATIO, "stopped"),
        (Kind.RATE_DECREASE, "stopped"),
    }
    # A long gap: idle edges without a storm are forgotten.
    b.advance(10_000 * S)
    assert b.edges == {}


def test_edges_are_bounded() -> None:
    b = Baselines(CFG.model_copy(update={"max_edges": 2}))
    for i in range(4):
        b.observe(S, (f"c{i}", "api", "http"), 1000, False)
    assert len(b.edges) == 2 and b.untracked == 2
