"""Who is at each end of an exchange: the workload whose resource a span or metric carries.

One agent exports for every workload it observes, so the OTel resource is per
workload, not per agent. Outside Kubernetes (the demo, pcap replay) a workload
is named after its address — ``address:port`` for a server, the address alone
for a client, whose port is ephemeral — unless configuration names it. The
Kubernetes enrichment plugs in as another :class:`WorkloadResolver` that fills
``attributes`` with ``k8s.*`` and returns ``None`` for addresses that are not
pods (the outside world, whose addresses must not become service names).
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass, field
from typing import Protocol

from flowprobe.agent.parse.messages import AttrValue

# What tells workloads apart: their name and resource attributes.
WorkloadKey = tuple[str, tuple[tuple[str, AttrValue], ...]]


@dataclass(frozen=True, slots=True)
class Workload:
    """An observed workload: ``name`` becomes ``service.name``.

    ``attributes`` are extra resource attributes (``k8s.namespace.name``,
    ``k8s.pod.name``, ...). Two workloads with the same ``name`` and
    ``attributes`` share one resource.
    """

    name: str
    attributes: tuple[tuple[str, AttrValue], ...] = field(default=())

    @property
    def key(self) -> WorkloadKey:
        return (self.name, self.attributes)


class WorkloadResolver(Protocol):
    # at_us: the exchange's start (µs since the epoch); in a cluster an IP can
    # belong to another pod a minute later.
    def server(self, address: str, port: int, at_us: int = 0) -> Workload | None:
        """The workload serving on ``address:port``, or None if it is not observed."""
        ...

    def client(self, address: str, at_us: int = 0) -> Workload | None:
        """The workload calling from ``address``, or None if it is not observed."""
        ...


def host_port(address: str, port: int) -> str:
    return f"[{address}]:{port}" if ":" in address else f"{address}:{port}"


class AddressResolver:
    """Every address is a workload, named by configuration or after the address.

    ``names`` maps ``address:port`` (servers only) or ``address`` (either
    role) to a service name; IPv6 servers are written ``[addr]:port``.
    """

    def __init__(self, names: Mapping[str, str] | None = None, max_cache: int = 65_536) -> None:
        self.names = dict(names or {})
        # Workload objects are cached so resources are shared; the cache is
        # cleared rather than grown past max_cache (addresses are unbounded).
        self._cache: dict[tuple[str, int], Workload] = {}
        self._max = max_cache

    def _get(self, address: str, port: int) -> Workload:
        key = (address, port)
        wl = self._cache.get(key)
        if wl is None:
            if port >= 0:
                hp = host_port(address, port)
                name = self.names.get(hp) or self.names.get(address) or hp
            else:
                name = self.names.get(address) or address
            if len(self._cache) >= self._max:
                self._cache.clear()
            wl = self._cache[key] = Workload(name)
        return wl

    def server(self, address: str, port: int, at_us: int = 0) -> Workload | None:
        return self._get(address, port)

    def client(self, address: str, at_us: int = 0) -> Workload | None:
        return self._get(address, -1)


def parse_service_name_rule(text: str) -> tuple[str, str]:
    """``ADDRESS[:PORT]=NAME`` from the command line."""
    target, sep, name = text.rpartition("=")
    if not sep or not target or not name:
        raise ValueError(f"expected ADDRESS[:PORT]=NAME, got {text!r}")
    return target, name
