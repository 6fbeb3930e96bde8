"""The column text the sessionizer reads on every row."""

from __future__ import annotations

import pytest

from flowprobe.agent.capture.columns import parse_ts_us


@pytest.mark.parametrize(
    ("text", "us"),
    [
        # Nanosecond captures: nine decimals, cut to the microsecond.
        ("1764390000.123456789", 1_764_390_000_123_456),
        ("1764390000.000000999", 1_764_390_000_000_000),
        # Microsecond captures: six.
        ("1764390000.123456", 1_764_390_000_123_456),
        ("0.000001", 1),
        # Anything else tshark might print: fewer decimals, none, a short second.
        ("1764390000.5", 1_764_390_000_500_000),
        ("1764390000.1234567", 1_764_390_000_123_456),
        ("1764390000", 1_764_390_000_000_000),
        ("5.123456789", 5_123_456),
    ],
)
def test_epoch_column_in_microseconds(text: str, us: int) -> None:
    assert parse_ts_us(text) == us


@pytest.mark.parametrize("text", ["", "x.123456", "1764390000.12345x789"])
def test_a_malformed_time_is_a_value_error(text: str) -> None:
    # The sessionizer counts ValueError as a malformed row.
    with pytest.raises(ValueError):
        parse_ts_us(text)
