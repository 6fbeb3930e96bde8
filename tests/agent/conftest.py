"""Fixtures of the agent's live tests."""

from __future__ import annotations

from collections.abc import Iterator

import pytest

from flowprobe.devenv.netns import Node, Pod
from flowprobe.devenv.servers import start_http


@pytest.fixture
def http_pods() -> Iterator[tuple[Node, Pod, Pod]]:
    """A node with a client pod and an ``api`` pod serving the test HTTP app on 8080."""
    with Node(subnet="10.253.0.0/24") as node:
        client = node.add_pod("client")
        api = node.add_pod("api")
        start_http(api, 8080)
        yield node, client, api
