"""The handover filter of a tshark replacement (capture/rotate.py), on hand-made rows."""

from __future__ import annotations

from flowprobe.agent.capture.rotate import RotatingCapture

E = 1_700_000_000_000_000  # the last packet the old capture delivered, µs


def _row(us: int, tag: str) -> list[str]:
    return [f"{us // 1_000_000}.{us % 1_000_000:06d}", tag]


def test_new_capture_skips_what_the_old_delivered_then_stops_checking() -> None:
    rows = [
        _row(E - 5, "old, delivered"),
        _row(E, "old, delivered"),
        _row(E + 3, "new"),
        _row(E - 2, "reordered by µs, delivered by the old capture"),
        _row(E + 2_000, "new, past the reordering margin"),
        _row(E - 1, "later than any reordering: passed on unparsed"),
        ["not a timestamp", "passed on"],
    ]
    kept = [tag for _, tag in RotatingCapture._after(iter(rows), E)]
    assert kept == [
        "new",
        "new, past the reordering margin",
        "later than any reordering: passed on unparsed",
        "passed on",
    ]
