"""Session-wide local Kubernetes control plane (see docs/local-cluster.md)."""

from __future__ import annotations

import os
from collections.abc import Iterator

import pytest

from flowprobe.devenv import toolchain
from flowprobe.devenv.cluster import LocalCluster


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
