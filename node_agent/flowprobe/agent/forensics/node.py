"""Forensics in the daemon: one ring per node, set up by the policies that enable it.

The oldest policy (by name, the policy set's order) that enables forensics
sets the ring and the disk bounds; each policy's triggers apply to the
exchanges it selects. The ring follows the node's capture (same interfaces,
same BPF filter), so it holds only traffic some policy selects.
"""

from __future__ import annotations

import logging
import threading
from collections.abc import Sequence
from http.server import BaseHTTPRequestHandler

from flowprobe.agent.capture.tshark import CaptureError, Tools
from flowprobe.agent.config import ForensicsConfig, ForensicsTrigger
from flowprobe.agent.forensics.endpoint import PcapEndpoint
from flowprobe.agent.forensics.freezer import Forensics
from flowprobe.agent.parse.messages import AttrValue
from flowprobe.agent.sessionize.records import Endpoints, Exchange
from flowprobe.api import constants
from flowprobe.api.policyset import CompiledPolicy
from flowprobe.api.v1alpha1 import ForensicsSpec
from flowprobe.api.v1alpha1 import ForensicsTrigger as PolicyTrigger

log = logging.getLogger("flowprobe.agent.forensics")

TRIGGERS: dict[PolicyTrigger, ForensicsTrigger] = {
    PolicyTrigger.SERVER_ERROR: "error",
    PolicyTrigger.CONNECTION_RESET: "reset",
    PolicyTrigger.TIMEOUT: "timeout",
    PolicyTrigger.SECURITY_ALERT: "alert",
    PolicyTrigger.ANOMALY_ALERT: "anomaly",
}


def from_policy(spec: ForensicsSpec, directory: str, token_file: str) -> ForensicsConfig:
    """A policy's ``spec.forensics`` (as compiled for the agents) as agent settings."""
    return ForensicsConfig(
        enabled=True,
        directory=directory,
        ring_files=spec.ring.files,
        ring_file_mb=spec.ring.file_size_megabytes,
        ring_file_seconds=spec.ring.file_duration_seconds,
        seconds_before=spec.seconds_before,
        seconds_after=spec.seconds_after,
        max_frozen_mb=spec.max_frozen_megabytes,
        max_frozen_files=spec.max_frozen_files,
        max_per_minute=spec.max_freezes_per_minute,
        triggers=tuple(TRIGGERS[t] for t in spec.triggers),
        token_file=token_file,
    )


class NodeForensics:
    def __init__(
        self,
        tools: Tools,
        directory: str = constants.FORENSICS_DIR,
        token_file: str = f"{constants.FORENSICS_TOKEN_DIR}/{constants.FORENSICS_TOKEN_KEY}",
    ) -> None:
        self.tools = tools
        self.directory = directory
        self.token_file = token_file
        # Replaced, never mutated: the capture thread reads them without a lock.
        self.current: Forensics | None = None
        self.endpoint: PcapEndpoint | None = None
        self.triggers: dict[str, frozenset[str]] = {}
        self.error: str | None = None

    def apply(
        self, policies: Sequence[CompiledPolicy], interfaces: Sequence[str], bpf: str | None
    ) -> None:
        """Follow the active policies and the node's capture; called on every tick."""
        enabled = [p for p in policies if p.forensics is not None]
        self.triggers = {
            p.name: frozenset(TRIGGERS[t] for t in p.forensics.triggers)
            for p in enabled
            if p.forensics is not None
        }
        if not enabled or enabled[0].forensics is None:
            self._replace(None)
            return
        config = from_policy(enabled[0].forensics, self.directory, self.token_file)
        current = self.current
        if current is None or current.config != config:
            try:
                current = Forensics(self.tools, config).start()
            except (CaptureError, OSError) as exc:
                if str(exc) != self.error:
                    log.warning("forensics: %s", exc)
                self.error = str(exc)
                self._replace(None)
                return
            self.error = None
            self._replace(current)
        if bpf is None:
            current.ring.stop()
        else:
            current.follow(interfaces, bpf)

    def _replace(self, new: Forensics | None) -> None:
        old = self.current
        if old is new:
            return
        self.current = new
        self.endpoint = PcapEndpoint(new.store, self.token_file) if new is not None else None
        if old is not None:
            # Its pending cuts finish from its ring without holding up the main loop.
            threading.Thread(
                target=old.close, name="flowprobe-forensics-close", daemon=True
            ).start()

    # -- capture thread ---------------------------------------------------

    def observe(self, ex: Exchange, policies: Sequence[CompiledPolicy]) -> None:
        current = self.current
        if current is None:
            return
        triggers = self.triggers
        wanted = frozenset().union(*(triggers.get(p.name, frozenset()) for p in policies))
        if wanted:
            current.observe(ex, wanted)

    # -- export process thread ---------------------------------------------

    def freeze_anomaly(
        self, policy: str, ep: Endpoints, start_us: int, end_us: int
    ) -> dict[str, AttrValue]:
        """An anomaly alert of the analyzer ``policy`` configures: its connection, frozen
        when that policy enables the AnomalyAlert trigger (analyze/policies.py)."""
        current = self.current
        if current is None:
            return {}
        return current.freeze_anomaly(ep, start_us, end_us, self.triggers.get(policy, frozenset()))

    # -- health server ----------------------------------------------------

    def handle(self, req: BaseHTTPRequestHandler) -> bool:
        endpoint = self.endpoint
        return endpoint is not None and endpoint.handle(req)

    def totals(self) -> dict[str, int] | None:
        current = self.current
        return current.totals() if current is not None else None

    def close(self) -> None:
        current = self.current
        self.current = self.endpoint = None
        if current is not None:
            current.close()
