"""A small Kubernetes API client for the agent: JSON in, JSON out, watches as line streams.

The agent's caches want the API's JSON as dicts (no generated model objects:
10,000 pods as models cost hundreds of MB and most of a core to build), and
watches as a stream of lines. ``kubernetes.config`` still does what it is
good at: in-cluster and kubeconfig loading, token refresh, client certs.
"""

from __future__ import annotations

import json
from collections.abc import Iterator, Mapping
from pathlib import Path
from typing import Any
from urllib.parse import urlencode

import urllib3
from kubernetes import client as k8s_client
from kubernetes import config as k8s_config

# Metadata-only responses where labels and owners are all we need: a list
# asks for the List form, a watch for the item form (the server refuses a
# List type for watch events).
METADATA_LIST = "application/json;as=PartialObjectMetadataList;g=meta.k8s.io;v=v1"
METADATA_ITEM = "application/json;as=PartialObjectMetadata;g=meta.k8s.io;v=v1"


class ApiError(Exception):
    def __init__(self, status: int, message: str) -> None:
        super().__init__(f"{status}: {message}")
        self.status = status


def load_configuration(kubeconfig: str | Path | None = None) -> k8s_client.Configuration:
    """In-cluster config when running in a pod, else ``kubeconfig`` / ``$KUBECONFIG``."""
    cfg = k8s_client.Configuration()
    if kubeconfig is None:
        try:
            k8s_config.load_incluster_config(client_configuration=cfg)  # type: ignore[no-untyped-call]
            return cfg
        except k8s_config.ConfigException:
            pass
    k8s_config.load_kube_config(  # type: ignore[no-untyped-call]
        config_file=str(kubeconfig) if kubeconfig else None, client_configuration=cfg
    )
    return cfg


class KubeApi:
    def __init__(self, cfg: k8s_client.Configuration, timeout_s: float = 30.0) -> None:
        self.cfg = cfg
        self.base: str = cfg.host.rstrip("/")
        self.timeout_s = timeout_s
        self.pool = urllib3.PoolManager(
            num_pools=4,
            maxsize=8,
            cert_reqs="CERT_REQUIRED" if cfg.verify_ssl else "CERT_NONE",
            ca_certs=cfg.ssl_ca_cert,
            cert_file=cfg.cert_file,
            key_file=cfg.key_file,
            # The retries belong to the callers (watch backoff, report interval).
            retries=False,
        )

    def _headers(self, accept: str, content_type: str | None = None) -> dict[str, str]:
        headers = {"Accept": accept, "User-Agent": "flowprobe-agent"}
        if content_type is not None:
            headers["Content-Type"] = content_type
        # auth_settings() runs the token refresh hook (bound SA tokens rotate).
        auth = self.cfg.auth_settings().get("BearerToken")
        token = auth["value"] if auth else None
        if token:
            headers["Authorization"] = token
        return headers

    def _url(self, path: str, params: Mapping[str, Any] | None) -> str:
        query = {k: v for k, v in (params or {}).items() if v is not None}
        return self.base + path + ("?" + urlencode(query) if query else "")

    def request(
        self,
        method: str,
        path: str,
        params: Mapping[str, Any] | None = None,
        body: object | None = None,
        accept: str = "application/json",
        content_type: str = "application/json",
    ) -> Any:
        resp = self.pool.request(
            method,
            self._url(path, params),
            body=json.dumps(body).encode() if body is not None else None,
            headers=self._headers(accept, content_type if body is not None else None),
            timeout=urllib3.Timeout(connect=5.0, read=self.timeout_s),
        )
        if resp.status >= 400:
            raise ApiError(resp.status, resp.data[:500].decode(errors="replace"))
        return json.loads(resp.data)

    def watch(
        self,
        path: str,
        params: Mapping[str, Any],
        accept: str = "application/json",
        timeout_s: float = 300.0,
    ) -> Iterator[dict[str, Any]]:
        """Watch events as dicts until the server ends the watch (or the connection breaks)."""
        resp = self.pool.request(
            "GET",
            self._url(path, {**params, "watch": "true", "timeoutSeconds": int(timeout_s)}),
            headers=self._headers(accept),
            preload_content=False,
            # The read timeout outlives the server's own watch timeout, so a
            # silent, half-dead connection still ends.
            timeout=urllib3.Timeout(connect=5.0, read=timeout_s + 30),
        )
        try:
            if resp.status >= 400:
                raise ApiError(resp.status, resp.read()[:500].decode(errors="replace"))
            pending = b""
            for chunk in resp.stream(65536):
                pending += chunk
                *lines, pending = pending.split(b"\n")
                for line in lines:
                    if line.strip():
                        yield json.loads(line)
        finally:
            resp.release_conn()
