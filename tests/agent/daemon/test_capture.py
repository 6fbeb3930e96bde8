"""Capture switching with real dumpcap processes."""

from __future__ import annotations

import pytest

from flowprobe.agent.capture.tshark import Tools
from flowprobe.agent.config import AgentConfig
from flowprobe.agent.daemon.capture import CaptureSwitcher
from flowprobe.agent.enrich.policy import NO_CAPTURE, CaptureScope
from flowprobe.agent.sessionize.records import Exchange
from flowprobe.agent.sessionize.stats import Stats
from tests.operator.clusterkit import wait_until

pytestmark = pytest.mark.capture


def _scope(bpf: str) -> CaptureScope:
    return CaptureScope(bpf, ("http",), (), False, False)


def _switcher(interface: str) -> CaptureSwitcher:
    seen: list[Exchange] = []
    return CaptureSwitcher(
        Tools.find(), [interface], AgentConfig(), seen.append, Stats(), linger_s=0.1
    )


def _failed(sw: CaptureSwitcher) -> bool:
    sw.check()
    return sw.error is not None


def test_missing_interface_is_an_error_retried_later_not_on_every_event() -> None:
    sw = _switcher("flowprobe-nonexistent0")
    sw.switch(_scope("tcp port 1"))
    # dumpcap says "Capturing on" before it finds the device missing.
    wait_until(lambda: _failed(sw), "the capture to fail", timeout=10)
    assert sw.scope is None and "capture interface not found" in str(sw.error)
    first = sw.error
    sw.error = "marker"  # a respawn would overwrite it
    sw.switch(_scope("tcp port 1"))
    assert sw.error == "marker"
    sw.retry_s = 0
    sw._retry_at = 0
    sw.switch(_scope("tcp port 1"))
    wait_until(lambda: _failed(sw) and sw.error == first, "the retry to fail again", timeout=10)


def test_switch_starts_the_new_capture_before_retiring_the_old() -> None:
    sw = _switcher("lo")
    try:
        sw.switch(_scope("tcp port 1"))
        old = sw.current
        assert old is not None and sw.alive() and sw.error is None
        sw.switch(_scope("tcp port 1"))  # same scope: nothing to do
        assert sw.current is old and sw.switches == 1
        sw.switch(_scope("tcp port 2"))
        new = sw.current
        assert new is not None and new is not old and sw.switches == 2
        # Exchanges split at the handover instant.
        assert old.hi_us == new.lo_us
        assert sw.last_start_s is not None
        sw.switch(NO_CAPTURE)
        assert sw.scope is None
        assert not sw.alive()
    finally:
        sw.stop()
