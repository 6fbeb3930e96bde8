"""List + watch of the resources the index needs, one thread per resource.

Kubernetes' reflector pattern: list (paginated) at a resourceVersion, replace
the index's view, then watch from that version with bookmarks. A watch that
ends normally is resumed from the last version seen; ``410 Gone`` (the
version was compacted away) relists; connection errors and 5xx reconnect
with capped, jittered exponential backoff, so the agent rides out an API
server restart and its watches resume by themselves. Capture never waits for
any of this: until a resource has synced, lookups just find less.
"""

from __future__ import annotations

import logging
import random
import threading
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from typing import Any

import urllib3

from flowprobe.agent.enrich.index import (
    ENDPOINTSLICES,
    JOBS,
    NAMESPACES,
    PODS,
    RESOURCES,
    SERVICES,
    ClusterIndex,
)
from flowprobe.agent.enrich.kubeapi import METADATA_ITEM, METADATA_LIST, ApiError, KubeApi

log = logging.getLogger("flowprobe.agent.enrich")


@dataclass(frozen=True)
class ResourceSpec:
    path: str
    metadata_only: bool = False

    @property
    def list_accept(self) -> str:
        return METADATA_LIST if self.metadata_only else "application/json"

    @property
    def watch_accept(self) -> str:
        return METADATA_ITEM if self.metadata_only else "application/json"


SPECS = {
    PODS: ResourceSpec("/api/v1/pods"),
    SERVICES: ResourceSpec("/api/v1/services"),
    ENDPOINTSLICES: ResourceSpec("/apis/discovery.k8s.io/v1/endpointslices"),
    JOBS: ResourceSpec("/apis/batch/v1/jobs", metadata_only=True),
    NAMESPACES: ResourceSpec("/api/v1/namespaces", metadata_only=True),
}


class _Gone(Exception):
    """The watch's resourceVersion is too old: relist."""


@dataclass
class WatchStatus:
    synced: threading.Event = field(default_factory=threading.Event)
    lists: int = 0
    relists_gone: int = 0
    reconnects: int = 0
    last_error: str | None = None


def now_us() -> int:
    return time.time_ns() // 1000


class Watcher:
    def __init__(
        self,
        api: KubeApi,
        index: ClusterIndex,
        resources: Sequence[str] = RESOURCES,
        page_size: int = 500,
        watch_timeout_s: float = 300.0,
        max_backoff_s: float = 30.0,
        clock: Callable[[], int] = now_us,
    ) -> None:
        self.api = api
        self.index = index
        self.resources = tuple(resources)
        self.page_size = page_size
        self.watch_timeout_s = watch_timeout_s
        self.max_backoff_s = max_backoff_s
        self.clock = clock
        self.status = {r: WatchStatus() for r in self.resources}
        self._stop = threading.Event()
        self._threads: list[threading.Thread] = []

    def start(self) -> Watcher:
        for r in self.resources:
            t = threading.Thread(
                target=self._run, args=(r,), name=f"flowprobe-watch-{r}", daemon=True
            )
            t.start()
            self._threads.append(t)
        return self

    def stop(self) -> None:
        self._stop.set()
        # Watch threads may sit in a long read; they are daemons and exit with
        # the process, and stop their loop at the next event or timeout.

    def synced(self) -> bool:
        return all(s.synced.is_set() for s in self.status.values())

    def wait_synced(self, timeout_s: float) -> bool:
        deadline = time.monotonic() + timeout_s
        return all(
            s.synced.wait(max(0.0, deadline - time.monotonic())) for s in self.status.values()
        )

    # -- one resource -----------------------------------------------------

    def _run(self, resource: str) -> None:
        st = self.status[resource]
        version: str | None = None
        failures = 0
        while not self._stop.is_set():
            try:
                if version is None:
                    version = self._list(resource)
                    st.lists += 1
                    st.synced.set()
                version = self._watch(resource, version)
                failures = 0
            except _Gone:
                st.relists_gone += 1
                version = None
            except (ApiError, urllib3.exceptions.HTTPError, OSError, ValueError) as exc:
                if isinstance(exc, ApiError) and exc.status == 410:
                    st.relists_gone += 1
                    version = None
                    continue
                failures += 1
                st.reconnects += 1
                if st.last_error is None or failures == 1:
                    log.warning("watch %s: %s; retrying with backoff", resource, exc)
                st.last_error = str(exc)
                delay = min(self.max_backoff_s, 0.5 * 2 ** min(failures - 1, 10))
                self._stop.wait(delay * random.uniform(0.5, 1.0))
            except Exception:
                # A bug must not end the thread: the index would silently go stale.
                log.exception("watch %s failed", resource)
                st.reconnects += 1
                self._stop.wait(self.max_backoff_s)

    def _list(self, resource: str) -> str:
        spec = SPECS[resource]
        items: list[Any] = []
        params: dict[str, Any] = {"limit": self.page_size}
        while True:
            page = self.api.request("GET", spec.path, params, accept=spec.list_accept)
            items.extend(page.get("items") or ())
            cont = (page.get("metadata") or {}).get("continue")
            if not cont:
                break
            params = {"limit": self.page_size, "continue": cont}
        version: str = page["metadata"]["resourceVersion"]
        with self.index.lock:
            self.index.replace(resource, items, self.clock())
        return version

    def _watch(self, resource: str, version: str) -> str:
        spec = SPECS[resource]
        params = {"resourceVersion": version, "allowWatchBookmarks": "true"}
        index = self.index
        for event in self.api.watch(spec.path, params, spec.watch_accept, self.watch_timeout_s):
            kind = event.get("type")
            obj = event.get("object") or {}
            if kind == "ERROR":
                if obj.get("code") == 410:
                    raise _Gone
                raise ApiError(int(obj.get("code") or 500), str(obj.get("message")))
            meta = obj.get("metadata") or {}
            if kind != "BOOKMARK":
                with index.lock:
                    index.apply(resource, str(kind), obj, self.clock())
            version = meta.get("resourceVersion") or version
            if self._stop.is_set():
                break
        return version
