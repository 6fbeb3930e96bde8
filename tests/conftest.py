"""Suite-wide fixtures and checks: tests that need root say so instead of failing obscurely."""

from __future__ import annotations

import os
import shutil
from collections.abc import Iterator

import pytest

from flowprobe.devenv import toolchain
from flowprobe.devenv.cluster import LocalCluster


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


@pytest.fixture(scope="session")
def local_cluster(tmp_path_factory: pytest.TempPathFactory) -> Iterator[LocalCluster]:
    """A running etcd + kube-apiserver + kcm + scheduler + kwok, shared by the session.

    Missing binaries are built first (tens of minutes cold on 2 cores; run
    `make cluster-tools` beforehand so this stays within test timeouts). Tests
    share the cluster: use your own namespace and fake-node prefix.
    FLOWPROBE_KEEP_CLUSTER=1 keeps the work dir (logs, kubeconfig) afterwards.
    """
    toolchain.ensure_components(["kube", "etcd", "kwok", "helm"])
    toolchain.ensure_kubectl()
    keep = os.environ.get("FLOWPROBE_KEEP_CLUSTER") == "1"
    with LocalCluster(tmp_path_factory.mktemp("local-cluster"), keep=keep) as cluster:
        if keep:
            print(f"\nlocal cluster work dir (kept): {cluster.workdir}")
        yield cluster
