"""The only module that talks to the Kubernetes API (besides kopf's own watches).

A thin async layer over ``kubernetes.aio``'s ApiClient with plain-dict
objects: the operator renders dicts, applies them with server-side apply and
reads a handful of resources, so typed models would only add conversions.
(``kubernetes.aio`` ships py.typed but leaves a few functions unannotated,
hence the targeted ``no-untyped-call`` ignores.)
"""

from __future__ import annotations

import asyncio
import logging
import os
from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any
from urllib.parse import quote

import aiohttp
import orjson
from kubernetes.aio import client as kclient
from kubernetes.aio import config as kconfig

from flowprobe.api import constants

log = logging.getLogger(__name__)

_PAGE = 500
# Transient: overloaded or restarting API server, or a lost connection.
_RETRY_STATUSES = {0, 429, 500, 502, 503, 504}
_RETRY_DELAYS = (0.5, 1.0, 2.0, 4.0)
# No call of ours is a watch: anything slower than this is a hung connection,
# and failing it lets the retry (or the next run) use a fresh one.
_TIMEOUT = 60
_METADATA_ONLY = "application/json;as=PartialObjectMetadataList;g=meta.k8s.io;v=v1,application/json"


@dataclass(frozen=True)
class Resource:
    group: str
    version: str
    plural: str
    namespaced: bool

    def path(
        self, namespace: str | None = None, name: str | None = None, sub: str | None = None
    ) -> str:
        base = f"/apis/{self.group}/{self.version}" if self.group else f"/api/{self.version}"
        parts = [base]
        if self.namespaced and namespace:
            parts += ["namespaces", quote(namespace, safe="")]
        parts.append(self.plural)
        if name:
            parts.append(quote(name, safe=""))
        if sub:
            parts.append(sub)
        return "/".join(parts)


PROBEPOLICIES = Resource(constants.GROUP, constants.VERSION, constants.PLURAL, namespaced=False)
DAEMONSETS = Resource("apps", "v1", "daemonsets", namespaced=True)
CONFIGMAPS = Resource("", "v1", "configmaps", namespaced=True)
SERVICEACCOUNTS = Resource("", "v1", "serviceaccounts", namespaced=True)
PODS = Resource("", "v1", "pods", namespaced=True)
NAMESPACES = Resource("", "v1", "namespaces", namespaced=False)
NODES = Resource("", "v1", "nodes", namespaced=False)
LEASES = Resource("coordination.k8s.io", "v1", "leases", namespaced=True)
EVENTS = Resource("", "v1", "events", namespaced=True)

_BY_KIND = {
    ("apps/v1", "DaemonSet"): DAEMONSETS,
    ("v1", "ConfigMap"): CONFIGMAPS,
    ("v1", "ServiceAccount"): SERVICEACCOUNTS,
}


def resource_of(obj: Mapping[str, Any]) -> Resource:
    """The resource of an object the operator applies (by apiVersion and kind)."""
    return _BY_KIND[(obj["apiVersion"], obj["kind"])]


class KubeError(Exception):
    """A failed API call; ``status`` 0 means no HTTP response at all."""

    def __init__(self, method: str, path: str, status: int, message: str) -> None:
        self.method = method
        self.path = path
        self.status = status
        self.message = message
        super().__init__(f"{method} {path}: HTTP {status}: {message}")

    @property
    def not_found(self) -> bool:
        return self.status == 404

    @property
    def transient(self) -> bool:
        return self.status in _RETRY_STATUSES


def _status_message(raw: bytes) -> str:
    # API errors come as a metav1.Status whose message names the field and the rule.
    try:
        data = orjson.loads(raw)
    except orjson.JSONDecodeError:
        return raw.decode(errors="replace")[:500]
    if isinstance(data, dict) and "message" in data:
        return str(data["message"])
    return str(data)[:500]


class Kube:
    def __init__(self, api: kclient.ApiClient, field_manager: str = constants.MANAGER) -> None:
        self._api = api
        self.field_manager = field_manager

    @classmethod
    async def connect(cls) -> Kube:
        """In-cluster credentials in a pod, else $KUBECONFIG / ~/.kube/config."""
        cfg = kclient.Configuration()
        if os.environ.get("KUBERNETES_SERVICE_HOST"):
            kconfig.load_incluster_config(client_configuration=cfg)  # type: ignore[no-untyped-call]
        else:
            await kconfig.load_kube_config(client_configuration=cfg)  # type: ignore[no-untyped-call]
        return cls(kclient.ApiClient(configuration=cfg))

    async def close(self) -> None:
        await self._api.close()  # type: ignore[no-untyped-call]

    async def request(
        self,
        method: str,
        path: str,
        *,
        query: Mapping[str, str] | None = None,
        body: Any = None,
        content_type: str | None = None,
        accept: str = "application/json",
    ) -> Any:
        """One API call with retries on transient failures; JSON result or None."""
        headers = {"Accept": accept}
        if content_type:
            headers["Content-Type"] = content_type
        for attempt, delay in enumerate((*_RETRY_DELAYS, None)):
            try:
                return await self._once(method, path, query, body, headers)
            except KubeError as exc:
                if not exc.transient or delay is None:
                    raise
                log.warning("retrying after %s (attempt %d)", exc, attempt + 1)
                await asyncio.sleep(delay)
        raise AssertionError("unreachable")  # pragma: no cover

    async def _once(
        self,
        method: str,
        path: str,
        query: Mapping[str, str] | None,
        body: Any,
        headers: dict[str, str],
    ) -> Any:
        try:
            _, url, hdrs, data, _ = await self._api.param_serialize(
                method=method,
                resource_path=path,
                query_params=list((query or {}).items()),
                header_params=dict(headers),
                body=body,
                auth_settings=["BearerToken"],
            )
            resp = await self._api.call_api(
                method, url, header_params=hdrs, body=data, _request_timeout=_TIMEOUT
            )
            raw = await resp.read()  # type: ignore[no-untyped-call]
        except kclient.ApiException as exc:
            raise KubeError(method, path, int(exc.status or 0), str(exc.reason)) from exc
        except (TimeoutError, OSError, aiohttp.ClientError) as exc:
            raise KubeError(method, path, 0, str(exc) or type(exc).__name__) from exc
        if not 200 <= resp.status < 300:
            raise KubeError(method, path, resp.status, _status_message(raw))
        # orjson: big lists (all agent pods) parse several times faster than with json.
        return orjson.loads(raw) if raw else None

    # -- verbs --------------------------------------------------------------

    async def get(
        self, res: Resource, name: str, namespace: str | None = None
    ) -> dict[str, Any] | None:
        try:
            result: dict[str, Any] = await self.request("GET", res.path(namespace, name))
        except KubeError as exc:
            if exc.not_found:
                return None
            raise
        return result

    async def list(
        self,
        res: Resource,
        namespace: str | None = None,
        *,
        label_selector: str | None = None,
        field_selector: str | None = None,
        metadata_only: bool = False,
    ) -> list[dict[str, Any]]:
        """Every item, page by page (namespace None: all namespaces)."""
        items: list[dict[str, Any]] = []
        query: dict[str, str] = {"limit": str(_PAGE)}
        if label_selector:
            query["labelSelector"] = label_selector
        if field_selector:
            query["fieldSelector"] = field_selector
        accept = _METADATA_ONLY if metadata_only else "application/json"
        while True:
            page = await self.request("GET", res.path(namespace), query=query, accept=accept)
            items += page.get("items") or []
            token = (page.get("metadata") or {}).get("continue")
            if not token:
                return items
            query["continue"] = token

    async def apply(self, obj: Mapping[str, Any]) -> dict[str, Any]:
        """Server-side apply with force: our field manager owns what we render."""
        res = resource_of(obj)
        meta = obj["metadata"]
        result: dict[str, Any] = await self.request(
            "PATCH",
            res.path(meta.get("namespace"), meta["name"]),
            query={"fieldManager": self.field_manager, "force": "true"},
            body=obj,
            content_type="application/apply-patch+yaml",
        )
        return result

    async def delete(self, res: Resource, name: str, namespace: str | None = None) -> bool:
        """Delete in the background (dependents go via GC); False if already gone."""
        try:
            await self.request(
                "DELETE",
                res.path(namespace, name),
                body={"propagationPolicy": "Background"},
            )
        except KubeError as exc:
            if exc.not_found:
                return False
            raise
        return True

    async def patch_status(
        self, res: Resource, name: str, status: Mapping[str, Any], namespace: str | None = None
    ) -> dict[str, Any]:
        # A merge patch replaces lists wholesale, which is what conditions need
        # (the whole list is recomputed), and touches nothing outside .status.
        result: dict[str, Any] = await self.request(
            "PATCH",
            res.path(namespace, name, "status"),
            body={"status": status},
            content_type="application/merge-patch+json",
        )
        return result

    async def create(
        self, res: Resource, obj: Mapping[str, Any], namespace: str | None = None
    ) -> dict[str, Any]:
        result: dict[str, Any] = await self.request("POST", res.path(namespace), body=obj)
        return result

    async def replace(
        self, res: Resource, obj: Mapping[str, Any], namespace: str | None = None
    ) -> dict[str, Any]:
        """PUT; with metadata.resourceVersion set, a concurrent change fails with 409."""
        result: dict[str, Any] = await self.request(
            "PUT", res.path(namespace, obj["metadata"]["name"]), body=obj
        )
        return result
