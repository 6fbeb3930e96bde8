"""The agent's own nftables table: blocked (source, destination, port) triples with a timeout.

Everything lives in ``table inet flowprobe``; nothing outside it is read or
written. A block is an element of a set with ``flags timeout``, so the kernel
removes it when its TTL runs out, with no timer in the agent. The forward
chain matches both the packet's addresses and conntrack's original tuple:
the agent may have seen a Service address the node DNATs before forwarding.
TCP is refused with a reset (the client fails at once), anything else dropped.

``nft`` is run as a subprocess (Debian package ``nftables``): one atomic
``nft -f -`` transaction per change, so a table is never half-built.
"""

from __future__ import annotations

import ipaddress
import json
import shutil
import subprocess
from dataclasses import dataclass

TABLE = "flowprobe"
_SETS = {4: "block4", 6: "block6"}

# Declaring the table first makes the delete succeed when there is none, so
# the whole replacement is one transaction whatever was there (a table left
# by a crashed agent included).
_TABLE = """table inet {table}
delete table inet {table}
table inet {table} {{
  set block4 {{ type ipv4_addr . ipv4_addr . inet_service; flags timeout; }}
  set block6 {{ type ipv6_addr . ipv6_addr . inet_service; flags timeout; }}
  chain forward {{
    type filter hook forward priority filter - 10; policy accept;
    meta l4proto tcp ct original ip saddr . ct original ip daddr . ct original proto-dst @block4 reject with tcp reset
    meta l4proto tcp ip saddr . ip daddr . tcp dport @block4 reject with tcp reset
    meta l4proto udp ct original ip saddr . ct original ip daddr . ct original proto-dst @block4 drop
    meta l4proto tcp ct original ip6 saddr . ct original ip6 daddr . ct original proto-dst @block6 reject with tcp reset
    meta l4proto tcp ip6 saddr . ip6 daddr . tcp dport @block6 reject with tcp reset
    meta l4proto udp ct original ip6 saddr . ct original ip6 daddr . ct original proto-dst @block6 drop
  }}
}}
"""


class NftError(Exception):
    pass


@dataclass(frozen=True, slots=True)
class Block:
    source: str
    destination: str
    port: int
    # Seconds left before the kernel removes it.
    expires_s: int


class NftTable:
    def __init__(
        self, table: str = TABLE, nft: str | None = None, netns: str | None = None
    ) -> None:
        self.table = table
        nft = nft or shutil.which("nft") or "/usr/sbin/nft"
        # netns: an ``ip netns`` name to work in (benchmarks); None: the agent's own.
        self.argv = ["ip", "netns", "exec", netns, nft] if netns else [nft]

    def _run(self, args: list[str], script: str | None = None) -> str:
        try:
            r = subprocess.run(
                [*self.argv, *args], input=script, capture_output=True, text=True, timeout=30
            )
        except (OSError, subprocess.TimeoutExpired) as exc:
            raise NftError(f"nft: {exc}") from None
        if r.returncode:
            raise NftError(f"nft {' '.join(args)}: {r.stderr.strip()}")
        return r.stdout

    def replace(self) -> None:
        """An empty table and chain, whatever was there before."""
        self._run(["-f", "-"], _TABLE.format(table=self.table))

    def delete(self) -> None:
        """Remove the table (and every block) if it exists."""
        self._run(["-f", "-"], f"table inet {self.table}\ndelete table inet {self.table}\n")

    def exists(self) -> bool:
        out = self._run(["-j", "list", "tables", "inet"])
        return any(
            item.get("table", {}).get("name") == self.table
            for item in json.loads(out).get("nftables", [])
        )

    def block(self, source: str, destination: str, port: int, seconds: int) -> None:
        """Block ``source`` -> ``destination:port`` for ``seconds`` (renews an existing block)."""
        src, dst = ipaddress.ip_address(source), ipaddress.ip_address(destination)
        if src.version != dst.version:
            raise NftError(f"{source} and {destination} are of different IP versions")
        element = f"{{ {src} . {dst} . {int(port)} timeout {int(seconds)}s }}"
        name = _SETS[src.version]
        # Delete first so a repeated block restarts its timeout (add keeps the old one).
        self._run(
            ["-f", "-"],
            f"add element inet {self.table} {name} {element}\n"
            f"delete element inet {self.table} {name} {element}\n"
            f"add element inet {self.table} {name} {element}\n",
        )

    def blocks(self) -> list[Block]:
        out: list[Block] = []
        for name in _SETS.values():
            data = json.loads(self._run(["-j", "list", "set", "inet", self.table, name]))
            for item in data.get("nftables", []):
                for elem in item.get("set", {}).get("elem", []):
                    e = elem.get("elem", {})
                    src, dst, port = e["val"]["concat"]
                    out.append(Block(src, dst, int(port), int(e.get("expires", 0))))
        return out


def host_addresses() -> set[str]:
    """Addresses on this network namespace's interfaces (``ip -j addr``): the node's own."""
    try:
        r = subprocess.run(
            ["ip", "-j", "addr", "show"], capture_output=True, text=True, timeout=10, check=True
        )
        links = json.loads(r.stdout)
    except (OSError, subprocess.SubprocessError, ValueError):
        return set()
    return {a["local"] for link in links for a in link.get("addr_info", []) if "local" in a}
