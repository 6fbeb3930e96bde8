"""Fixtures for tests against real OTLP backends (Jaeger, collector, Prometheus)."""

from __future__ import annotations

from collections.abc import Iterator

import pytest

from flowprobe.devenv.backends import LocalBackends


@pytest.fixture(scope="session")
def local_backends(tmp_path_factory: pytest.TempPathFactory) -> Iterator[LocalBackends]:
    """Jaeger + collector + Prometheus on free loopback ports, once per session.

    The first run builds jaeger and otelcol-flowprobe (several minutes on two
    cores; `make backends-tools` does it ahead of time). The work dir is kept
    by pytest, so configs and the three logs can be read after a failure.
    """
    with LocalBackends(tmp_path_factory.mktemp("backends")) as backends:
        yield backends
