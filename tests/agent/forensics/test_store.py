"""The frozen-pcap store's bounds and the pcap endpoint's authentication, on real files
and a real HTTP server on loopback."""

from __future__ import annotations

import urllib.error
import urllib.request
from collections.abc import Iterator
from pathlib import Path

import pytest

from flowprobe.agent.config import ForensicsConfig
from flowprobe.agent.forensics.endpoint import (
    FetchError,
    PcapEndpoint,
    PcapServer,
    fetch,
    fetch_list,
)
from flowprobe.agent.forensics.freezer import community_id
from flowprobe.agent.forensics.store import PcapStore
from flowprobe.agent.sessionize.records import Endpoints


def _name(i: int) -> str:
    return f"20261128T0400{i:02d}Z-error-{i:08x}.pcap"


def _add(store: PcapStore, tmp: Path, i: int, size: int) -> None:
    f = tmp / "incoming"
    f.write_bytes(b"\0" * size)
    store.add(f, _name(i))


def test_the_oldest_pcaps_go_when_there_are_too_many(tmp_path: Path) -> None:
    store = PcapStore(tmp_path / "frozen", ForensicsConfig(max_frozen_files=3))
    for i in range(5):
        _add(store, tmp_path, i, 100)
    assert [f.name for f in store.list()] == [_name(2), _name(3), _name(4)]
    assert store.counts["evicted"] == 2


def test_the_oldest_pcaps_go_when_they_take_too_much_space(tmp_path: Path) -> None:
    store = PcapStore(tmp_path / "frozen", ForensicsConfig(max_frozen_mb=1))
    for i in range(4):
        _add(store, tmp_path, i, 400_000)
    # 1 MiB holds two of 400 kB.
    assert [f.name for f in store.list()] == [_name(2), _name(3)]
    assert store.usage() <= 1 << 20
    assert store.counts["evicted"] == 2


def test_only_frozen_pcap_names_are_served(tmp_path: Path) -> None:
    store = PcapStore(tmp_path / "frozen", ForensicsConfig())
    _add(store, tmp_path, 1, 10)
    (tmp_path / "frozen" / "notes.txt").write_text("not a pcap")
    assert store.path(_name(1)) is not None
    for bad in ("notes.txt", "../incoming", f"../frozen/{_name(1)}", _name(2)):
        assert store.path(bad) is None
    assert [f.name for f in store.list()] == [_name(1)]


@pytest.fixture
def served(tmp_path: Path) -> Iterator[tuple[str, Path, PcapStore]]:
    store = PcapStore(tmp_path / "frozen", ForensicsConfig())
    token = tmp_path / "token"
    token.write_text("right-token\n")
    server = PcapServer(PcapEndpoint(store, str(token)), "127.0.0.1", 0).start()
    try:
        yield f"http://127.0.0.1:{server.port}", token, store
    finally:
        server.stop()


def test_the_endpoint_serves_token_holders_only(
    served: tuple[str, Path, PcapStore], tmp_path: Path
) -> None:
    url, token, store = served
    _add(store, tmp_path, 7, 1234)
    assert [e["name"] for e in fetch_list(url, "right-token")] == [_name(7)]
    out = tmp_path / "got.pcap"
    with out.open("wb") as f:
        assert fetch(url, "right-token", _name(7), f) == 1234
    for wrong in ("wrong-token", "", "right-token-and-more", "right-toke"):
        with pytest.raises(FetchError, match="401"):
            fetch_list(url, wrong)
        with pytest.raises(FetchError, match="401"):
            fetch(url, wrong, _name(7), (tmp_path / "x").open("wb"))
    # Another scheme than Bearer is refused too.
    req = urllib.request.Request(f"{url}/pcaps", headers={"Authorization": "Basic right-token"})
    with pytest.raises(urllib.error.HTTPError) as err:
        urllib.request.urlopen(req, timeout=10)
    assert err.value.code == 401
    with pytest.raises(FetchError, match="404"):
        fetch(url, "right-token", _name(8), (tmp_path / "y").open("wb"))
    # The token file is read per request: a rotated Secret applies at once.
    token.write_text("rotated\n")
    with pytest.raises(FetchError, match="401"):
        fetch_list(url, "right-token")
    assert fetch_list(url, "rotated")
    # No token (file gone or empty): everyone is refused.
    token.write_text("")
    with pytest.raises(FetchError, match="401"):
        fetch_list(url, "")


def test_community_id_matches_the_specification_vector() -> None:
    # From the Community ID specification's baseline (corelight/community-id-spec).
    ep = Endpoints("tcp", "128.232.110.120", 34855, "66.35.250.204", 80)
    assert community_id(ep) == "1:LQU9qZlK+B5F3KDmev6m5PMibrg="
    reverse = Endpoints("tcp", "66.35.250.204", 80, "128.232.110.120", 34855)
    assert community_id(reverse) == community_id(ep)
