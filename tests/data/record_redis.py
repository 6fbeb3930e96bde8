"""Records tests/data/redis/*.pcapng from Debian's redis-server and redis-py in pods.

Run as root from the repository root::

    PYTHONPATH=operator:node_agent:devtools python3 tests/data/record_redis.py

The same file is the client run inside the client pod (``client SCENARIO``).
Each scenario's commands and expected records are asserted in
tests/agent/parse/test_redis.py; the comments below are the contract.
"""

from __future__ import annotations

import contextlib
import socket
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

OUT = Path(__file__).resolve().parent / "redis"
PORT = 6379
CUSTOM_PORT = 6380


def _client(ip: str, port: int = PORT, protocol: int = 2) -> Any:
    import redis

    # No CLIENT SETINFO on connect: every command on the wire is one below.
    return redis.Redis(
        host=ip, port=port, protocol=protocol, lib_name=None, lib_version=None, socket_timeout=5
    )


def client(scenario: str, ip: str) -> None:
    import redis

    if scenario == "resp2":
        # One connection, one command at a time (RESP2), 18 commands.
        r = _client(ip)
        r.set("user:1", "hello")  # SET -> +OK
        r.get("user:1")  # GET -> bulk
        r.get("missing")  # GET -> nil
        r.incr("counter")  # INCR -> :1
        r.rpush("list", "a", "b", "c")  # RPUSH -> :3
        r.lrange("list", 0, -1)  # LRANGE -> array of 3
        r.hset("user:2", mapping={"name": "alice", "age": "30"})  # HSET -> :2
        r.hgetall("user:2")  # HGETALL -> array of 4
        with contextlib.suppress(redis.ResponseError):
            r.get("list")  # WRONGTYPE
        with contextlib.suppress(redis.ResponseError):
            r.execute_command("FOO", "bar")  # ERR unknown command 'FOO', with args...
        r.set("big", b"x" * 5000)  # a command spanning several segments
        r.get("big")  # a reply spanning several segments
        r.rpush("biglist", *(f"element-{i:06d}" for i in range(800)))  # 801 args
        r.lrange("biglist", 0, -1)  # an array reply spanning segments
        r.delete("user:1", "user:2")  # DEL -> :2
        r.ping()  # PING -> +PONG
        r.set("k", "v", nx=True)  # SET NX -> +OK
        r.set("k", "v", nx=True)  # SET NX again -> nil
    elif scenario == "pipeline":
        r = _client(ip)
        r.rpush("plist", "x")
        # 50 commands in one write, all answered in one segment.
        p = r.pipeline(transaction=False)
        for i in range(20):
            p.set(f"p:{i}", f"value-{i}")
        for i in range(20):
            p.get(f"p:{i}")
        for _ in range(10):
            p.incr("p:counter")
        p.execute()
        # 50 commands again, one of them a WRONGTYPE error.
        p = r.pipeline(transaction=False)
        for i in range(49):
            p.get(f"p:{i % 20}")
        p.incr("plist")
        p.execute(raise_on_error=False)
        # 300 commands: more than tshark's 2047-character columns can name.
        p = r.pipeline(transaction=False)
        for i in range(300):
            p.set(f"bulk:{i:04d}", "v" * 40)
        p.execute()
        # MULTI/EXEC: 5 commands, EXEC answers with a nested array.
        p = r.pipeline(transaction=True)
        p.set("tx:1", "a")
        p.incr("tx:counter")
        p.lrange("plist", 0, -1)
        p.execute()
        # MULTI/EXEC whose queued INCR fails inside EXEC's reply.
        p = r.pipeline(transaction=True)
        p.set("tx:2", "b")
        p.incr("plist")
        p.execute(raise_on_error=False)
    elif scenario == "resp3":
        # HELLO 3 on connect, then RESP3 replies (maps, sets, nulls) that
        # tshark 4.0 does not dissect.
        r = _client(ip, protocol=3)
        r.hset("h", mapping={"f1": "v1", "f2": "v2"})  # :2
        r.hgetall("h")  # map
        r.sadd("s", "a", "b")  # :2
        r.smembers("s")  # set
        r.get("missing")  # null
        with contextlib.suppress(redis.ResponseError):
            r.hget("s", "x")  # WRONGTYPE
        p = r.pipeline(transaction=False)
        for i in range(10):
            p.get(f"nope:{i}")  # ten nulls in one segment
        p.execute()
    elif scenario == "port":
        r = _client(ip, port=CUSTOM_PORT)
        r.set("a", "1")
        r.get("a")
        r.incr("a")
    elif scenario == "garbage":
        # Random bytes, then a command cut in the middle: Redis answers a
        # protocol error and closes.
        import random

        rnd = random.Random(6379)
        s = socket.create_connection((ip, PORT))
        s.sendall(b"*2\r\n$3\r\nGET\r\n$1\r\nk\r\n")
        s.recv(100)
        s.sendall(b"*1\r\n$4\r\nPI" + rnd.randbytes(200))
        time.sleep(0.3)
        s.close()
        s = socket.create_connection((ip, PORT))
        s.sendall(b"*3\r\n$3\r\nSET\r\n$1\r\nk\r\n$10\r\nabc")  # truncated, then closed
        time.sleep(0.3)
        s.close()
    else:
        raise SystemExit(f"unknown scenario {scenario}")


def small_segments(node: Any) -> None:
    """No GSO on the veths: the capture sees MSS-sized segments as on a wire,
    so a few KB already span several segments and the pcaps stay small."""
    for pod in node.pods.values():
        for argv in (["gso_max_size", "1500"], ["gso_max_segs", "1"]):
            pod.run(["ip", "link", "set", "eth0", *argv]).check_returncode()
            node.exec_node(["ip", "link", "set", pod.host_veth, *argv])


def main() -> None:
    from flowprobe.devenv.netns import Node, record_pcap, run_or_exit
    from flowprobe.devenv.servers import start_redis

    OUT.mkdir(parents=True, exist_ok=True)
    me = str(Path(__file__).resolve())
    with Node(subnet="10.253.0.0/24") as node, tempfile.TemporaryDirectory() as tmp:
        cli = node.add_pod("client")
        srv = node.add_pod("redis")
        small_segments(node)
        for sub, port in (("a", PORT), ("b", CUSTOM_PORT)):
            (Path(tmp) / sub).mkdir()
            start_redis(srv, Path(tmp) / sub, port)
        for scenario in ("resp2", "pipeline", "resp3", "port", "garbage"):
            with record_pcap(node, OUT / f"{scenario}.pcapng", "inbound and tcp"):
                run_or_exit(cli, [sys.executable, me, "client", scenario, srv.ip], scenario)


if __name__ == "__main__":
    if len(sys.argv) > 1 and sys.argv[1] == "client":
        client(sys.argv[2], sys.argv[3])
    else:
        main()
