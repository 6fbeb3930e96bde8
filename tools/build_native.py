"""Compile the agent's per-packet and per-exchange modules with mypyc, in place.

The agent's Python handles every packet tshark prints and turns every
exchange into spans and metrics; compiled with mypyc (the compiler mypy
ships, driven by the type annotations mypy --strict already checks) the
sessionizer took 12.8 instead of 16.7 µs per exchange (docs/performance.md,
2026-11-29). The compiled modules sit next to their sources as
``*.cpython-*.so`` (git ignores them), with the shared runtime
``flowprobe/agent/_native__mypyc*.so``; CPython prefers them to the ``.py``
files. ``flowprobe/agent/_native.json`` records the hash of each compiled
source, and ``flowprobe.agent`` refuses to import when a source has changed
since. The same record tells this script whether anything needs building:
``make native`` runs it every time and it only compiles when a source, this
script, mypy or the Python changed. ``--clean`` removes everything and the
agent runs as plain Python.

Run from anywhere: ``python tools/build_native.py [--clean]``. Needs a C
compiler and the Python headers; the build directory is
``$FLOWPROBE_CACHE/native-build`` (default ~/.cache/flowprobe).
"""

from __future__ import annotations

import argparse
import hashlib
import json
import os
import sys
import sysconfig
from importlib.metadata import version
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
AGENT_ROOT = ROOT / "node_agent"

# What runs per packet or per exchange: the parsers, the sessionizer, the
# span and metric encoders and what they call. Modules that start processes
# or threads stay interpreted.
MODULES = [
    "flowprobe/agent/capture/columns.py",
    "flowprobe/agent/pipeline.py",
    *(
        f"flowprobe/agent/export/{m}.py"
        for m in ("metrics", "naming", "protobuf", "spans", "workloads")
    ),
    *sorted(
        str(p.relative_to(AGENT_ROOT))
        for d in ("parse", "sessionize")
        for p in (AGENT_ROOT / "flowprobe" / "agent" / d).glob("*.py")
        if p.name != "__init__.py"
    ),
]
GROUP = "flowprobe.agent._native"
# Each compiled source's hash, checked when flowprobe.agent is imported.
MANIFEST = AGENT_ROOT / "flowprobe" / "agent" / "_native.json"


def compiled() -> list[Path]:
    return sorted(MANIFEST.parent.rglob("*.cpython-*.so"))


def _sha256(path: Path) -> str:
    return hashlib.sha256(path.read_bytes()).hexdigest()


def record() -> dict[str, object]:
    """What _native.json holds for the current sources: their hashes (the
    import check reads them), this script's, and the compiler and Python the
    extensions were built with (a change in any of them rebuilds; a new
    Python would otherwise skip the old extensions and run plain code)."""
    package = MANIFEST.parent
    return {
        "sources": {
            str((AGENT_ROOT / m).relative_to(package)): _sha256(AGENT_ROOT / m) for m in MODULES
        },
        "builder": _sha256(Path(__file__).resolve()),
        "compiler": f"mypy {version('mypy')}",
        "extension": sysconfig.get_config_var("EXT_SUFFIX"),
    }


def up_to_date() -> bool:
    try:
        return bool(compiled()) and json.loads(MANIFEST.read_text()) == record()
    except (OSError, ValueError):
        return False


def clean() -> None:
    MANIFEST.unlink(missing_ok=True)
    for so in compiled():
        so.unlink()


def build() -> None:
    from mypyc.build import mypycify
    from setuptools import setup  # type: ignore[import-untyped]

    cache = Path(os.environ.get("FLOWPROBE_CACHE", Path.home() / ".cache" / "flowprobe"))
    build_dir = cache / "native-build"
    os.chdir(AGENT_ROOT)
    clean()
    extensions = mypycify(
        ["--config-file", str(ROOT / "pyproject.toml"), *MODULES],
        opt_level="3",
        group_name=GROUP,
        target_dir=str(build_dir / "c"),
    )
    setup(
        name="flowprobe-native",
        ext_modules=extensions,
        script_args=[
            "-q",
            "build_ext",
            "--inplace",
            "--build-temp",
            str(build_dir / "temp"),
            "--build-lib",
            str(build_dir / "lib"),
        ],
    )
    MANIFEST.write_text(json.dumps(record(), indent=1) + "\n")


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--clean", action="store_true", help="remove the compiled modules")
    args = ap.parse_args()
    if args.clean:
        clean()
        return
    if up_to_date():
        return
    build()
    print(f"compiled {len(compiled())} modules into {AGENT_ROOT}", file=sys.stderr)


if __name__ == "__main__":
    main()
