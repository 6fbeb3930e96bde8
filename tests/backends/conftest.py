"""Fixtures for tests against real OTLP backends (Jaeger, collector, Prometheus)."""

from __future__ import annotations

import time
from collections.abc import Callable, Iterator
from typing import TypeVar

import pytest

from flowprobe.devenv.backends import LocalBackends

T = TypeVar("T")


def poll(
    fetch: Callable[[], T],
    ok: Callable[[T], bool] = bool,
    timeout: float = 60.0,
    interval: float = 0.5,
) -> T:
    """Call ``fetch`` until ``ok`` holds for its value (or time is up), and return the value.

    Spans and points go SDK batch -> collector batch -> backend (-> scrape), so
    they are never visible at once.
    """
    deadline = time.monotonic() + timeout
    while True:
        value = fetch()
        if ok(value) or time.monotonic() > deadline:
            return value
        time.sleep(interval)


@pytest.fixture(scope="session")
def local_backends(tmp_path_factory: pytest.TempPathFactory) -> Iterator[LocalBackends]:
    """Jaeger + collector + Prometheus on free loopback ports, once per session.

    The first run builds jaeger and otelcol-flowprobe (several minutes on two
    cores; `make backends-tools` does it ahead of time). The work dir is kept
    by pytest, so configs and the three logs can be read after a failure.
    """
    with LocalBackends(tmp_path_factory.mktemp("backends")) as backends:
        yield backends
