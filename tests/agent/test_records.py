"""The per-exchange records write their __init__ out so that mypyc compiles it
(see the note in sessionize/records.py); these tests keep each one in step with
the dataclass fields it stands in for. Compiled code checks argument types, so
each class has a sample: a value per field, none equal to another field's or
to the field's default."""

from __future__ import annotations

import dataclasses
from typing import Any

import pytest

from flowprobe.agent.parse.messages import L7Message
from flowprobe.agent.sessionize.records import Endpoints, Exchange, Outcome, TcpFigures
from flowprobe.agent.sessionize.sessionizer import Pending

_ENDPOINTS = Endpoints("tcp", "10.0.0.1", 40000, "10.0.1.1", 80)
_MESSAGE = L7Message("http", True)

SAMPLES: dict[type, dict[str, Any]] = {
    TcpFigures: {
        name: 101 + i
        for i, name in enumerate(
            [
                "client_packets",
                "server_packets",
                "client_bytes",
                "server_bytes",
                "retransmits",
                "out_of_order",
                "zero_window",
                "syn",
                "fin",
                "rst",
                "rtt_samples",
                "rtt_sum_us",
                "rtt_max_us",
            ]
        )
    },
    Exchange: {
        "protocol": "redis",
        "endpoints": _ENDPOINTS,
        "start_us": 1,
        "end_us": 2,
        "request_end_us": 3,
        "response_start_us": 4,
        "outcome": Outcome.ERROR,
        "attrs": {"db.operation.name": "GET"},
        "error_type": "ERR",
        "figures": TcpFigures(retransmits=5),
        "handshake_server_us": 6,
        "handshake_client_us": 7,
        "events": [(8, "retransmit")],
        "security_events": [(9, "waf", {"rule": 942100})],
    },
    L7Message: {
        "protocol": "dns",
        "is_request": True,
        "attrs": {"dns.question.name": "a.b"},
        "key": 4711,
        "final": False,
        "error_type": "NXDOMAIN",
        "upgrade": True,
        "control": True,
    },
    Pending: {
        "msg": _MESSAGE,
        "client_side": 1,
        "start_us": 2,
        "request_end_us": 3,
        "snapshot": [4],
        "event_mark": 5,
        "request_bytes": 6,
        "request_packets": 7,
        "response_bytes": 8,
        "response_packets": 9,
        "response_start_us": 10,
        "response_attrs": {"http.response.status_code": 200},
    },
}


def _default(f: dataclasses.Field[Any]) -> Any:
    if f.default_factory is not dataclasses.MISSING:
        return f.default_factory()
    return f.default


@pytest.mark.parametrize("cls", SAMPLES, ids=lambda c: c.__name__)
def test_written_init_takes_every_field_in_order(cls: type) -> None:
    fields = dataclasses.fields(cls)
    sample = SAMPLES[cls]
    assert [f.name for f in fields] == list(sample), "the sample must name every field, in order"
    obj = cls(*sample.values())
    assert {f.name: getattr(obj, f.name) for f in fields} == sample


@pytest.mark.parametrize("cls", SAMPLES, ids=lambda c: c.__name__)
def test_written_init_has_the_field_defaults_and_names(cls: type) -> None:
    sample = SAMPLES[cls]
    fields = [f for f in dataclasses.fields(cls) if _default(f) is not dataclasses.MISSING]
    required = {k: v for k, v in sample.items() if k not in {f.name for f in fields}}
    a, b = cls(**required), cls(**required)
    for f in fields:
        assert getattr(a, f.name) == _default(f), f.name
        assert sample[f.name] != _default(f), f"the sample of {f.name} is its default"
        if f.default_factory is not dataclasses.MISSING:
            # A fresh container per record, never one shared by all.
            assert getattr(a, f.name) is not getattr(b, f.name), f.name
        # Given by name alone, that field and only that field changes.
        one = cls(**required, **{f.name: sample[f.name]})
        assert getattr(one, f.name) == sample[f.name], f.name
        assert dataclasses.replace(one, **{f.name: getattr(a, f.name)}) == a, f.name
