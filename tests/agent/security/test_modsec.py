"""The libmodsecurity binding against the real library and Debian's CRS."""

from __future__ import annotations

from collections.abc import Iterator

import pytest

from flowprobe.agent.config import WafConfig
from flowprobe.agent.security.modsec import (
    HttpTransaction,
    ModSecurity,
    WafError,
    crs_rules_text,
    parse_hit,
)

HEADERS = [("Host", "api"), ("User-Agent", "curl/8.5"), ("Accept", "*/*")]


def tx(uri: str = "/orders/1", method: str = "GET", **kw: object) -> HttpTransaction:
    kw.setdefault("request_headers", HEADERS)
    return HttpTransaction("10.0.0.1", 40000, "10.0.0.2", 8080, method, uri, **kw)  # type: ignore[arg-type]


@pytest.fixture(scope="module")
def crs() -> Iterator[ModSecurity]:
    engine = ModSecurity.with_crs(WafConfig(enabled=True), 2047)
    yield engine
    engine.close()


def ids(engine: ModSecurity, t: HttpTransaction) -> set[int]:
    return {h.rule_id for h in engine.inspect(t)}


def test_crs_loads_and_a_benign_request_hits_nothing(crs: ModSecurity) -> None:
    assert crs.rules_loaded > 900
    benign = tx(status=200, response_headers=[("Content-Type", "application/json")])
    assert crs.inspect(benign) == []


def test_sqli_in_the_query_hits_942_and_the_anomaly_evaluation(crs: ModSecurity) -> None:
    hits = crs.inspect(tx("/orders?id=1%20UNION%20SELECT%20password%20FROM%20users--"))
    by_id = {h.rule_id: h for h in hits}
    assert 942100 in by_id and 949110 in by_id
    assert by_id[942100].severity == "CRITICAL"
    assert "UNION SELECT" in by_id[942100].data
    assert by_id[949110].evaluation and not by_id[942100].evaluation
    assert "attack-generic" in by_id[949110].tags


def test_request_body_is_inspected(crs: ModSecurity) -> None:
    body = b"user=a&cmd=;cat /etc/passwd"
    headers = [
        *HEADERS,
        ("Content-Type", "application/x-www-form-urlencoded"),
        ("Content-Length", str(len(body))),
    ]
    families = {
        h.family
        for h in crs.inspect(tx("/login", "POST", request_headers=headers, request_body=body))
    }
    assert {"930", "932"} <= families


def test_response_body_is_inspected(crs: ModSecurity) -> None:
    leak = b"<b>Warning</b>: mysql_fetch_array() expects parameter 1 to be resource"
    t = tx(status=200, response_headers=[("Content-Type", "text/html")], response_body=leak)
    assert any(h.family == "951" for h in crs.inspect(t))


def test_excluded_rules_and_tags_are_removed() -> None:
    engine = ModSecurity.with_crs(
        WafConfig(enabled=True, excluded_rules=("942000-942999",), excluded_tags=("attack-xss",)),
        2047,
    )
    try:
        assert not {
            i
            for i in ids(engine, tx("/q?id=1%20UNION%20SELECT%20a%20FROM%20b--"))
            if i // 1000 == 942
        }
        assert not {
            i for i in ids(engine, tx("/q?x=%3Cscript%3Ealert(1)%3C/script%3E")) if i // 1000 == 941
        }
    finally:
        engine.close()


def test_paranoia_level_and_threshold_change_what_is_reported() -> None:
    # No Accept header: rule 920300 belongs to paranoia level 2.
    bare = tx(request_headers=[("Host", "api"), ("User-Agent", "curl/8.5")])
    pl2 = ModSecurity.with_crs(WafConfig(enabled=True, paranoia_level=2), 2047)
    pl1 = ModSecurity.with_crs(WafConfig(enabled=True, inbound_anomaly_threshold=1000), 2047)
    try:
        assert 920300 in ids(pl2, bare)
        sqli = ids(pl1, tx("/q?id=1%20UNION%20SELECT%20a%20FROM%20b--"))
        assert 942100 in sqli and 949110 not in sqli
    finally:
        pl1.close()
        pl2.close()


def test_a_closed_engine_refuses_rather_than_crashes() -> None:
    engine = ModSecurity.with_crs(WafConfig(enabled=True), 2047)
    engine.close()
    with pytest.raises(WafError, match="closed"):
        engine.inspect(tx())


def test_bad_rules_and_missing_library_are_clear_errors() -> None:
    with pytest.raises(WafError, match="rejected the rules"):
        ModSecurity("SecRuleEngine Sideways\n")
    with pytest.raises(WafError, match="apt-get install"):
        ModSecurity("", library="libnosuchmodsecurity.so.0")


def test_rules_text_carries_the_settings() -> None:
    text = crs_rules_text(
        WafConfig(
            paranoia_level=3,
            inbound_anomaly_threshold=9,
            excluded_rules=("920350", "942100-942199"),
        ),
        512,
    )
    assert "SecRuleEngine DetectionOnly" in text
    assert "setvar:tx.paranoia_level=3" in text
    assert "setvar:tx.inbound_anomaly_score_threshold=9" in text
    assert "SecRuleRemoveById 942100-942199" in text
    assert "SecRequestBodyLimit 512" in text


def test_log_line_parsing_survives_quotes_in_matched_data() -> None:
    line = (
        'ModSecurity: Warning. Matched "x" [file "/r.conf"] [line "1"] [id "941100"] [rev ""] '
        '[msg "XSS Attack Detected via libinjection"] [data "Matched Data: "] [x" found"] '
        '[severity "2"] [ver "OWASP_CRS/3.3.4"] [tag "attack-xss"] [tag "paranoia-level/1"] '
        '[hostname "h"] [uri "/"] [unique_id "1"] [ref ""]'
    )
    hit = parse_hit(line)
    assert hit is not None
    assert hit.rule_id == 941100 and hit.family == "941"
    assert hit.data == 'Matched Data: "] [x" found'
    assert hit.tags == ("attack-xss", "paranoia-level/1")
    assert parse_hit("ModSecurity: something without an id") is None
