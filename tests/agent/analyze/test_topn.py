"""The sliding top-N window: ranking, sliding on exchange time, bounded memory."""

from __future__ import annotations

from flowprobe.agent.analyze.topn import SlidingTopN

S = 1_000_000  # µs


def one(requests: float = 1, errors: float = 0, latency_us: float = 1000) -> tuple[float, ...]:
    return (requests, errors, 100 * requests, latency_us, 0, 0)


def test_ranks_by_total_largest_first_ties_by_name() -> None:
    top = SlidingTopN(2, 60 * S)
    for member, n in (("a", 3), ("b", 5), ("c", 3)):
        for _ in range(n):
            top.add(10 * S, member, one())
    r = top.ranking(10 * S)
    assert r["requests"] == [("b", 5), ("a", 3)]
    assert r["bytes"] == [("b", 500), ("a", 300)]
    # Nobody failed: nobody is ranked on errors.
    assert r["errors"] == []


def test_latency_is_ranked_by_its_mean() -> None:
    top = SlidingTopN(3, 60 * S)
    top.add(S, "fast", one(latency_us=1000))
    top.add(S, "slow", one(latency_us=9000))
    top.add(S, "slow", one(latency_us=1000))
    assert top.ranking(S)["latency"] == [("slow", 5000), ("fast", 1000)]


def test_the_window_slides_on_exchange_time() -> None:
    top = SlidingTopN(5, 60 * S, slots=6)  # 10 s slots
    top.add(0, "old", one(5))
    top.add(55 * S, "new", one(1))
    assert dict(top.ranking(55 * S)["requests"]) == {"old": 5, "new": 1}
    # At 60 s the slot of 0-10 s is wholly outside the window.
    top.add(60 * S, "new", one(1))
    assert top.ranking(60 * S)["requests"] == [("new", 2)]
    # An idle window empties as time (wall time, live) goes on.
    assert top.ranking(200 * S)["requests"] == []


def test_a_late_exchange_counts_in_the_newest_slot() -> None:
    top = SlidingTopN(5, 60 * S)
    top.add(30 * S, "a", one())
    top.add(5 * S, "b", one())
    top.add(85 * S, "c", one())
    # b was counted at 30 s, so it is still in the window at 85 s.
    assert dict(top.ranking(85 * S)["requests"]) == {"a": 1, "b": 1, "c": 1}


def test_members_per_slot_are_bounded_and_the_rest_counted() -> None:
    top = SlidingTopN(10, 60 * S, max_members=3)
    for i in range(5):
        top.add(S, f"m{i}", one())
    top.add(S, "m0", one())
    assert top.overflow == 2
    assert dict(top.ranking(S)["requests"]) == {"m0": 2, "m1": 1, "m2": 1}
