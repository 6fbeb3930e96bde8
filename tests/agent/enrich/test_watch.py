"""The watcher's reflector logic against a scripted API (the cluster test covers the real one)."""

from __future__ import annotations

from collections.abc import Callable, Iterator, Mapping
from typing import Any

from flowprobe.agent.enrich.index import PODS, ClusterIndex
from flowprobe.agent.enrich.kubeapi import ApiError, KubeApi
from flowprobe.agent.enrich.watch import Watcher
from flowprobe.devenv.k8sobjects import pod


class ScriptedApi(KubeApi):
    """Lists come from ``lists``; each watch call plays the next script entry."""

    def __init__(
        self, lists: list[list[dict[str, Any]]], watches: list[list[dict[str, Any]] | Exception]
    ) -> None:
        self.lists = lists
        self.watches = watches
        self.calls: list[tuple[str, str | None]] = []
        self.on_script_end: Callable[[], None] = lambda: None

    def request(self, *args: Any, **kwargs: Any) -> Any:
        items = self.lists.pop(0)
        self.calls.append(("list", None))
        return {"metadata": {"resourceVersion": str(10 * len(self.calls))}, "items": items}

    def watch(
        self, path: str, params: Mapping[str, Any], accept: str = "", timeout_s: float = 0
    ) -> Iterator[dict[str, Any]]:
        self.calls.append(("watch", params["resourceVersion"]))
        if not self.watches:
            self.on_script_end()
            raise ApiError(503, "script over")
        step = self.watches.pop(0)
        if isinstance(step, Exception):
            raise step
        yield from step


def test_gone_relists_and_errors_reconnect_from_the_last_version() -> None:
    a, b, c = pod("a", "10.0.0.1"), pod("b", "10.0.0.2"), pod("c", "10.0.0.3")
    c["metadata"]["resourceVersion"] = "77"
    api = ScriptedApi(
        lists=[[a], [b, c]],
        watches=[
            [{"type": "ADDED", "object": c}],
            ConnectionResetError("apiserver went away"),
            [{"type": "ERROR", "object": {"kind": "Status", "code": 410, "message": "too old"}}],
            [{"type": "BOOKMARK", "object": {"metadata": {"resourceVersion": "99"}}}],
        ],
    )
    index = ClusterIndex()
    watcher = Watcher(api, index, resources=[PODS], max_backoff_s=0.01)
    api.on_script_end = watcher.stop
    watcher.start()
    for t in watcher._threads:
        t.join(10)
    st = watcher.status[PODS]
    assert api.calls == [
        ("list", None),
        ("watch", "10"),
        ("watch", "77"),  # resumed after the reset from the last event's version
        ("watch", "77"),  # 410 Gone ...
        ("list", None),  # ... relists
        ("watch", "50"),  # the relist's version
        ("watch", "99"),  # the bookmark moved it on
    ]
    assert st.relists_gone == 1 and st.lists == 2 and st.reconnects >= 2
    # The relist removed a (no longer listed).
    assert {p.name for p in index.pods.values() if p.alive} == {"b", "c"}
