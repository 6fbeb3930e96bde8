"""The frozen pcaps on disk: named, listed, bounded (the oldest go first)."""

from __future__ import annotations

import contextlib
import logging
import os
import re
import threading
from collections import Counter
from dataclasses import dataclass
from pathlib import Path

from flowprobe.agent.config import ForensicsConfig

log = logging.getLogger("flowprobe.agent.forensics")

# 20261128T035812Z-error-3f9a1c0b.pcap: when, why, and a random part so two
# freezes in one second never collide. Nothing else is ever served.
NAME = re.compile(r"^[0-9]{8}T[0-9]{6}Z-[a-z]{1,16}-[0-9a-f]{8}\.pcap$")


@dataclass(frozen=True)
class FrozenPcap:
    name: str
    size: int
    modified_unix_s: float

    def as_dict(self) -> dict[str, object]:
        return {"name": self.name, "bytes": self.size, "modified": self.modified_unix_s}


class PcapStore:
    """``directory`` holds the frozen pcaps; ``add`` keeps it within its bounds."""

    def __init__(self, directory: Path, config: ForensicsConfig) -> None:
        self.directory = directory
        self.max_bytes = config.max_frozen_mb << 20
        self.max_files = config.max_frozen_files
        self.counts: Counter[str] = Counter()
        self._lock = threading.Lock()
        directory.mkdir(parents=True, exist_ok=True)

    def list(self) -> list[FrozenPcap]:
        """Frozen pcaps, oldest first."""
        out = []
        for p in self.directory.iterdir():
            if not NAME.match(p.name):
                continue
            with contextlib.suppress(FileNotFoundError):  # evicted meanwhile
                st = p.stat()
                out.append(FrozenPcap(p.name, st.st_size, st.st_mtime))
        out.sort(key=lambda f: (f.modified_unix_s, f.name))
        return out

    def path(self, name: str) -> Path | None:
        """The file of a frozen pcap, or None for a name that is not one (never a path)."""
        if not NAME.match(name):
            return None
        p = self.directory / name
        return p if p.is_file() else None

    def add(self, tmp: Path, name: str) -> None:
        """Move a finished pcap in under ``name``, then evict the oldest beyond the bounds."""
        os.replace(tmp, self.directory / name)
        with self._lock:
            files = self.list()
            total = sum(f.size for f in files)
            while files and (len(files) > self.max_files or total > self.max_bytes):
                oldest = files.pop(0)
                with contextlib.suppress(FileNotFoundError):
                    (self.directory / oldest.name).unlink()
                total -= oldest.size
                self.counts["evicted"] += 1

    def usage(self) -> int:
        return sum(f.size for f in self.list())
