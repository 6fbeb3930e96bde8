"""The mypyc-compiled agent modules (tools/build_native.py) and their guard."""

from __future__ import annotations

import hashlib
import json
import os
from pathlib import Path

import pytest

import flowprobe.agent.sessionize.sessionizer
from flowprobe.agent import _check_native


def test_make_test_runs_the_compiled_modules() -> None:
    # `make test` compiles first and says so: the code under test is then
    # the code the agent image ships.
    if not os.environ.get("FLOWPROBE_EXPECT_NATIVE"):
        pytest.skip("not run by make test/test-fast: plain Python is fine here")
    compiled = flowprobe.agent.sessionize.sessionizer.__file__ or ""
    assert compiled.endswith(".so"), compiled


def _package(tmp_path: Path, source: bytes, recorded: bytes) -> Path:
    (tmp_path / "parse").mkdir()
    (tmp_path / "parse" / "dns.py").write_bytes(source)
    (tmp_path / "parse" / "dns.cpython-311-x86_64-linux-gnu.so").write_bytes(b"")
    digest = hashlib.sha256(recorded).hexdigest()
    (tmp_path / "_native.json").write_text(json.dumps({"sources": {"parse/dns.py": digest}}))
    return tmp_path


def test_unchanged_sources_pass(tmp_path: Path) -> None:
    _check_native(_package(tmp_path, b"x = 1\n", b"x = 1\n"))


def test_a_source_changed_since_the_build_is_refused(tmp_path: Path) -> None:
    with pytest.raises(ImportError, match=r"dns\.py changed since it was compiled"):
        _check_native(_package(tmp_path, b"x = 2\n", b"x = 1\n"))


def test_compiled_modules_without_their_manifest_are_refused(tmp_path: Path) -> None:
    (_package(tmp_path, b"x = 1\n", b"x = 1\n") / "_native.json").unlink()
    with pytest.raises(ImportError, match=r"without _native\.json"):
        _check_native(tmp_path)


def test_a_plain_tree_passes(tmp_path: Path) -> None:
    (tmp_path / "parse").mkdir()
    (tmp_path / "parse" / "dns.py").write_text("x = 1\n")
    _check_native(tmp_path)
