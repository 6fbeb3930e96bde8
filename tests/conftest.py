"""Suite-wide checks: tests that need root say so instead of failing obscurely."""

from __future__ import annotations

import os
import shutil

import pytest


def pytest_collection_modifyitems(config: pytest.Config, items: list[pytest.Item]) -> None:
    needs_root = {"capture", "netns"}
    reason = None
    if os.geteuid() != 0:
        reason = "needs root (network namespaces, dumpcap); CI runs as root"
    elif shutil.which("tshark") is None:
        reason = "tshark missing: run `make deps`"
    if reason is None:
        return
    if os.environ.get("CI"):
        # In CI these suites must run; a skip there would hide a broken setup.
        raise pytest.UsageError(f"CI cannot run capture tests: {reason}")
    for item in items:
        if needs_root & {m.name for m in item.iter_markers()}:
            item.add_marker(pytest.mark.skip(reason=reason))
