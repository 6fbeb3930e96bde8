"""The mypyc-compiled agent modules (tools/build_native.py) and their guard."""

from __future__ import annotations

import hashlib
import json
import os
from pathlib import Path

import pytest

import flowprobe.agent
import flowprobe.agent.sessionize.sessionizer
from flowprobe.agent import _check_native


def test_make_test_runs_the_compiled_modules() -> None:
    package = Path(flowprobe.agent.__file__).parent
    compiled = flowprobe.agent.sessionize.sessionizer.__file__ or ""
    if (package / "_native.json").exists() or os.environ.get("CI"):
        # CI runs `make test`, which compiles first: the code under test is
        # the code the agent image ships.
        assert compiled.endswith(".so"), compiled
    else:
        print(f"plain Python run ({compiled}); `make native` compiles")


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
