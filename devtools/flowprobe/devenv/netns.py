"""Network namespaces as pods, joined by veth pairs to a namespace that plays the node.

The node namespace stands in for a Kubernetes node's host network namespace:
each pod gets a veth pair whose host end lives there, a /32 address and a
default route through a link-local gateway (the Calico layout), so pod-to-pod
traffic crosses two veths exactly like on a real node. Nothing touches the
machine's own network namespace, and every namespace and process is removed on
exit, also after errors and Ctrl-C.
"""

from __future__ import annotations

import contextlib
import ipaddress
import os
import secrets
import signal
import subprocess
import sys
import threading
import time
from collections.abc import Iterator, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from types import TracebackType

GATEWAY = "169.254.1.1"


def _ip(*args: str) -> None:
    subprocess.run(["ip", *args], check=True, capture_output=True, text=True)


class NetnsError(Exception):
    pass


@dataclass
class Pod:
    name: str
    netns: str
    ip: str
    host_veth: str
    processes: list[subprocess.Popen[bytes]] = field(default_factory=list)

    def cmd(self, argv: Sequence[str]) -> list[str]:
        return ["ip", "netns", "exec", self.netns, *argv]

    def run(self, argv: Sequence[str], **kwargs: object) -> subprocess.CompletedProcess[str]:
        """Run a command to completion inside the pod."""
        return subprocess.run(self.cmd(argv), text=True, capture_output=True, **kwargs)  # type: ignore[call-overload, no-any-return]

    def spawn(
        self, argv: Sequence[str], log_path: str | None = None, **kwargs: object
    ) -> subprocess.Popen[bytes]:
        """Start a long-running process inside the pod; it is killed on teardown."""
        out = open(log_path, "ab") if log_path else subprocess.DEVNULL  # noqa: SIM115
        proc = subprocess.Popen(  # type: ignore[call-overload]
            self.cmd(argv), stdout=out, stderr=subprocess.STDOUT, start_new_session=True, **kwargs
        )
        self.processes.append(proc)
        return proc  # type: ignore[no-any-return]

    def wait_port(self, port: int, timeout: float = 20.0) -> None:
        """Wait until something listens on ``port`` in the pod (TCP)."""
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            out = self.run(["ss", "-Hltn", f"sport = :{port}"]).stdout
            if out.strip():
                return
            for proc in self.processes:
                if proc.poll() not in (None, 0):
                    raise NetnsError(
                        f"{self.name}: a server exited with {proc.returncode} before port {port} opened"
                    )
            time.sleep(0.05)
        raise NetnsError(f"{self.name}: nothing listens on port {port} after {timeout}s")


class Node:
    """A node namespace with pods attached. Use as a context manager."""

    def __init__(self, subnet: str = "10.250.0.0/24", prefix: str | None = None) -> None:
        self.tag = prefix or f"fp{secrets.token_hex(2)}"
        self.netns = f"{self.tag}-node"
        self.net = ipaddress.ip_network(subnet)
        self._hosts = iter(self.net.hosts())
        self.pods: dict[str, Pod] = {}
        self.processes: list[subprocess.Popen[bytes]] = []
        self._created: list[str] = []

    def __enter__(self) -> Node:
        if os.geteuid() != 0:
            raise NetnsError(
                "network namespaces need root (run as root or with CAP_SYS_ADMIN and CAP_NET_ADMIN)"
            )
        try:
            _ip("netns", "add", self.netns)
            self._created.append(self.netns)
            self.exec_node(["ip", "link", "set", "lo", "up"])
            # The pods' gateway must be a local address of the node, so the node
            # answers their ARP for it on every veth.
            self.exec_node(["ip", "addr", "add", f"{GATEWAY}/32", "dev", "lo"])
            self.exec_node(["sysctl", "-qw", "net.ipv4.ip_forward=1"])
        except BaseException:
            self.close()
            raise
        return self

    def __exit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        self.close()

    def exec_node(self, argv: Sequence[str]) -> subprocess.CompletedProcess[str]:
        return subprocess.run(
            ["ip", "netns", "exec", self.netns, *argv], check=True, capture_output=True, text=True
        )

    def node_cmd(self, argv: Sequence[str]) -> list[str]:
        return ["ip", "netns", "exec", self.netns, *argv]

    def spawn_node(self, argv: Sequence[str], **kwargs: object) -> subprocess.Popen[bytes]:
        """Start a process in the node namespace (the capture runs here)."""
        proc = subprocess.Popen(self.node_cmd(argv), start_new_session=True, **kwargs)  # type: ignore[call-overload]
        self.processes.append(proc)
        return proc  # type: ignore[no-any-return]

    def spawn_agent(
        self, args: Sequence[str], timeout: float = 60, **kwargs: object
    ) -> subprocess.Popen[bytes]:
        """``flowprobe-agent capture ARGS`` in the node namespace, returned once
        it says it is capturing, so no traffic sent afterwards is missed. Its
        further stderr goes to ours."""
        proc = self.spawn_node(
            [sys.executable, "-m", "flowprobe.agent", "capture", *args],
            stderr=subprocess.PIPE,
            **kwargs,
        )
        assert proc.stderr is not None
        stderr = proc.stderr
        deadline = time.monotonic() + timeout
        seen: list[bytes] = []
        while time.monotonic() < deadline:
            line = stderr.readline()
            if not line:
                raise NetnsError(f"agent exited: {b''.join(seen).decode(errors='replace')}")
            if line.startswith(b"flowprobe-agent: capturing on"):
                break
            seen.append(line)
        else:
            raise NetnsError(f"agent not capturing after {timeout}s")
        sys.stderr.buffer.write(b"".join(seen))

        def relay() -> None:
            for line in iter(stderr.readline, b""):
                sys.stderr.buffer.write(line)
                sys.stderr.flush()

        threading.Thread(target=relay, daemon=True).start()
        return proc

    def add_pod(self, name: str, ip: str | None = None) -> Pod:
        index = len(self.pods)
        netns = f"{self.tag}-{name}"[:40]
        host_veth = f"{self.tag}h{index}"
        pod_veth = f"{self.tag}p{index}"
        addr = ip or str(next(self._hosts))
        _ip("netns", "add", netns)
        self._created.append(netns)
        _ip(
            "link",
            "add",
            host_veth,
            "netns",
            self.netns,
            "type",
            "veth",
            "peer",
            "name",
            pod_veth,
            "netns",
            netns,
        )
        pod = Pod(name, netns, addr, host_veth)
        for argv in (
            ["ip", "link", "set", "lo", "up"],
            ["ip", "link", "set", pod_veth, "name", "eth0"],
            ["ip", "addr", "add", f"{addr}/32", "dev", "eth0"],
            ["ip", "link", "set", "eth0", "up"],
            ["ip", "route", "add", GATEWAY, "dev", "eth0", "scope", "link"],
            ["ip", "route", "add", "default", "via", GATEWAY, "dev", "eth0"],
        ):
            r = pod.run(argv)
            if r.returncode:
                raise NetnsError(f"{name}: {' '.join(argv)}: {r.stderr.strip()}")
        for argv in (
            ["ip", "link", "set", host_veth, "up"],
            ["sysctl", "-qw", f"net.ipv4.conf.{host_veth}.proxy_arp=1"],
            ["ip", "route", "add", f"{addr}/32", "dev", host_veth],
        ):
            self.exec_node(argv)
        self.pods[name] = pod
        return pod

    def close(self) -> None:
        procs = [*self.processes, *(p for pod in self.pods.values() for p in pod.processes)]
        for proc in procs:
            if proc.poll() is None:
                with contextlib.suppress(ProcessLookupError):
                    os.killpg(proc.pid, signal.SIGTERM)
        for proc in procs:
            try:
                proc.wait(timeout=5)
            except subprocess.TimeoutExpired:
                with contextlib.suppress(ProcessLookupError):
                    os.killpg(proc.pid, signal.SIGKILL)
                proc.wait()
        for netns in reversed(self._created):
            # Stragglers (daemons that forked away from our process group).
            pids = subprocess.run(
                ["ip", "netns", "pids", netns], capture_output=True, text=True
            ).stdout.split()
            for pid in pids:
                with contextlib.suppress(ProcessLookupError, ValueError):
                    os.kill(int(pid), signal.SIGKILL)
            subprocess.run(["ip", "netns", "delete", netns], capture_output=True)
        self._created.clear()


@contextlib.contextmanager
def capture_to_file(node: Node, path: str, bpf: str = "inbound") -> Iterator[None]:
    """dumpcap in the node namespace into ``path`` while the block runs.

    One ``any`` capture keeps packets in time order (dumpcap writes several
    interfaces' packets in per-interface batches, which confuses tshark's TCP
    analysis), and ``inbound`` sees each packet once: a pod-to-pod packet enters
    the node through the sender's veth and leaves through the receiver's.
    """
    argv = ["dumpcap", "-i", "any", "-f", bpf, "-w", path]
    proc = subprocess.Popen(
        node.node_cmd(argv),
        stdout=subprocess.DEVNULL,
        stderr=subprocess.PIPE,
        start_new_session=True,
    )
    assert proc.stderr is not None
    # dumpcap says "Capturing on ..." once every interface is open; before
    # that, packets on the later interfaces would be missed.
    seen = b""
    while b"Capturing on" not in seen:
        line = proc.stderr.readline()
        if not line:
            raise NetnsError(f"dumpcap did not start: {seen.decode(errors='replace')}")
        seen += line
    time.sleep(0.5)
    try:
        yield
    finally:
        time.sleep(0.3)
        with contextlib.suppress(ProcessLookupError):
            os.killpg(proc.pid, signal.SIGINT)
        _out, err = proc.communicate(timeout=10)
        err = seen + err
        if proc.returncode not in (0, -signal.SIGINT):
            raise NetnsError(f"dumpcap failed ({proc.returncode}): {err.decode(errors='replace')}")


@contextlib.contextmanager
def record_pcap(node: Node, path: Path, bpf: str) -> Iterator[None]:
    """For the tests/data/record_*.py scripts: a fresh ``path`` captured while
    the block runs, made world-readable and its size printed after, and a
    pause before the next one."""
    path.unlink(missing_ok=True)
    with capture_to_file(node, str(path), bpf):
        yield
    path.chmod(0o644)
    print(path, path.stat().st_size)
    time.sleep(0.2)


def run_or_exit(pod: Pod, argv: Sequence[str], what: str) -> str:
    """``pod.run`` for the recording scripts: its stdout, or exit with its stderr."""
    r = pod.run(argv)
    if r.returncode:
        raise SystemExit(f"{what}: {r.stderr}")
    return r.stdout
