"""Counters for everything the pipeline drops, repairs or cannot make sense of."""

from __future__ import annotations

import logging
from collections import Counter
from dataclasses import dataclass, field

log = logging.getLogger("flowprobe.agent")


@dataclass
class Stats:
    packets: int = 0
    exchanges: int = 0
    connections: int = 0
    # dumpcap's own counts at the end of a live capture.
    capture_received: int = 0
    capture_dropped: int = 0
    # tshark processes replaced because their memory grew (capture.rotate).
    tshark_rotations: int = 0
    anomalies: Counter[str] = field(default_factory=Counter)
    _logged: set[str] = field(default_factory=set)

    def anomaly(self, kind: str, detail: str = "") -> None:
        """Count an anomaly; log only its first occurrence so a flood stays quiet."""
        self.anomalies[kind] += 1
        if kind not in self._logged:
            self._logged.add(kind)
            log.warning(
                "first %s%s (further ones are only counted)", kind, f": {detail}" if detail else ""
            )

    def as_dict(self) -> dict[str, object]:
        return {
            "packets": self.packets,
            "exchanges": self.exchanges,
            "connections": self.connections,
            "capture_received": self.capture_received,
            "capture_dropped": self.capture_dropped,
            "tshark_rotations": self.tshark_rotations,
            "anomalies": dict(sorted(self.anomalies.items())),
        }
