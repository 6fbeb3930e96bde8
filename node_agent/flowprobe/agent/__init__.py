"""flowprobe node agent: capture -> parse -> sessionize -> enrich -> export."""

import hashlib
import json
from pathlib import Path


def _check_native(here: Path) -> None:
    """Refuse stale mypyc-compiled modules (tools/build_native.py).

    CPython imports a compiled module in preference to its source, so after
    an edit or a checkout the old code would run without a word. The build
    records each compiled source's hash; hashes, not mtimes, because
    installing a wheel or checking out a branch sets mtimes in any order.
    """
    manifest = here / "_native.json"
    if not manifest.exists():
        if next(here.rglob("*.cpython-*.so"), None) is not None:
            raise ImportError(
                f"compiled modules under {here} without {manifest.name}: "
                "run `make native` (or `make clean-native`)"
            )
        return
    for rel, digest in json.loads(manifest.read_text())["sources"].items():
        if hashlib.sha256((here / rel).read_bytes()).hexdigest() != digest:
            raise ImportError(
                f"{here / rel} changed since it was compiled: run `make native` to rebuild "
                "the compiled modules, or `make clean-native` to run the agent as plain Python"
            )


_check_native(Path(__file__).parent)
