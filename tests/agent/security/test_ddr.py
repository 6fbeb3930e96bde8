"""Sensitive-data detectors: real shapes found and masked, look-alikes that fail the checks not."""

from __future__ import annotations

import pytest

from flowprobe.agent.security.ddr import CATEGORIES, Scanner, iban_ok, luhn_ok, mask, ssn_ok

JWT = (
    "eyJhbGciOiJIUzI1NiIsInR5cCI6IkpXVCJ9.eyJzdWIiOiIxMjM0NTY3ODkwIn0."
    "dozjgNryP4J3jVmNHl0w5N_XgL0n3I9PlFUP0THsR8U"
)


@pytest.mark.parametrize(
    ("text", "category", "masked"),
    [
        ("pay with 4111 1111 1111 1111 now", "card", "************1111"),
        ("pan=5500005555555559&x=1", "card", "************5559"),
        ("iban DE89 3704 0044 0532 0130 00.", "iban", "DE****************3000"),
        ("GB82WEST12345698765432", "iban", "GB****************5432"),
        ("mail john.doe@example.com", "email", "j***@example.com"),
        ("call +1 415-555-2671", "phone", "*********71"),
        ("call (415) 555-2671", "phone", "********71"),
        ("tel +33 1 42 68 53 00", "phone", "*********00"),
        ("ssn 078-05-1120", "national_id", "***-**-1120"),
        (f"Authorization: Bearer {JWT}", "jwt", "eyJ****"),
        ("AWS AKIAIOSFODNN7EXAMPLE", "api_key", "AKIA****"),
        ("token ghp_abcdefghijklmnopqrstuvwxyz0123456789", "api_key", "ghp_****"),
        ("-----BEGIN RSA PRIVATE KEY-----\nMIIE\n-----END RSA PRIVATE KEY-----", "private_key",
         "-----BEGIN PRIVATE KEY-----****"),
        ("user=bob&password=hunter2&x=1", "password", "password=****"),
        ('{"user": "a", "password": "s3cr\\"et"}', "password", '"password":"****"'),
    ],
)  # fmt: skip
def test_each_category_is_found_and_masked(text: str, category: str, masked: str) -> None:
    findings = Scanner().scan(text)
    assert [(f.category, f.masked) for f in findings] == [(category, masked)]
    out = mask(text)
    assert masked in out
    secret = text[findings[0].start : findings[0].end]
    assert secret not in out


@pytest.mark.parametrize(
    "text",
    [
        "4111 1111 1111 1112",  # bad Luhn
        "order 4111111111111112",
        "DE89370400440532013001",  # bad IBAN checksum
        "GB82WEST12345698765431",
        "DE8937040044053201300",  # wrong length for DE
        "666-12-3456 000-12-3456 912-12-3456 123-00-4567 123-45-0000",  # never issued
        "eyJub3QiOiJqd3QifQ.eyJzdWIiOiIxIn0.x",  # no alg: not a JWT header
        "uuid 550e8400-e29b-41d4-a716-446655440000 ts 1700000000000000",
        "GET /orders/1234567?id=42 HTTP/1.1 Host: 10.250.0.3:8080 Date: 2026-11-27",
        "SELECT id, item FROM orders WHERE id = 987654321012",
        "user@localhost",  # no top-level domain
    ],
)
def test_look_alikes_are_not_flagged(text: str) -> None:
    assert Scanner().scan(text) == []


def test_checks() -> None:
    assert luhn_ok("79927398713") and not luhn_ok("79927398710")
    assert iban_ok("NL91ABNA0417164300") and not iban_ok("NL91ABNA0417164301")
    assert ssn_ok("078", "05", "1120") and not ssn_ok("666", "05", "1120")


def test_categories_can_be_restricted_and_unknown_ones_are_refused() -> None:
    text = "john@example.com 4111111111111111"
    assert [f.category for f in Scanner(("card",)).scan(text)] == ["card"]
    assert {f.category for f in Scanner().scan(text)} == {"card", "email"}
    with pytest.raises(ValueError, match="unknown sensitive-data categories"):
        Scanner(("card", "dna"))
    assert len(CATEGORIES) == 9


def test_several_findings_are_masked_in_place() -> None:
    text = "a=john@example.com&card=4111111111111111&ssn=078-05-1120"
    assert mask(text) == "a=j***@example.com&card=************1111&ssn=***-**-1120"
