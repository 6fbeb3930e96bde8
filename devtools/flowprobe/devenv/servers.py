"""Real servers started inside pod namespaces: Debian's redis-server, PostgreSQL and
MariaDB, flowprobe's test HTTP app, a small authoritative DNS server and OpenSSL's
TLS test server."""

from __future__ import annotations

import glob
import os
import shutil
import subprocess
import sys
import tempfile
from pathlib import Path

from flowprobe.devenv.netns import NetnsError, Pod


def start_http(
    pod: Pod, port: int = 8080, app: str = "flowprobe.devenv.httpapp", *args: str
) -> None:
    pod.spawn([sys.executable, "-m", app, pod.ip, str(port), *args])
    pod.wait_port(port)


def start_tls(pod: Pod, cert: Path, key: Path, port: int = 8443) -> None:
    """``openssl s_server``: TLS on ``port``, answering ``GET /`` with a status page
    (``curl -k https://ip:port/``)."""
    pod.spawn(
        [
            "openssl",
            "s_server",
            "-quiet",
            "-accept",
            f"{pod.ip}:{port}",
            "-cert",
            str(cert),
            "-key",
            str(key),
            "-www",
        ]
    )
    pod.wait_port(port)


def start_redis(pod: Pod, workdir: Path, port: int = 6379) -> None:
    exe = shutil.which("redis-server") or "/usr/bin/redis-server"
    pod.spawn(
        [
            exe,
            "--bind",
            pod.ip,
            "--port",
            str(port),
            "--save",
            "",
            "--appendonly",
            "no",
            "--dir",
            str(workdir),
            "--protected-mode",
            "no",
        ],
        log_path=str(workdir / "redis.log"),
    )
    pod.wait_port(port)


def _pg_bin(name: str) -> str:
    found = sorted(glob.glob(f"/usr/lib/postgresql/*/bin/{name}"))
    if not found:
        raise NetnsError("PostgreSQL binaries not found: apt-get install postgresql")
    return found[-1]


def start_postgres(pod: Pod, workdir: Path, port: int = 5432, password: str | None = None) -> None:
    """A throwaway cluster owned by the postgres user. Connections from the pods
    are trusted, or with ``password`` must log in as postgres with SCRAM-SHA-256."""
    data = workdir / "pgdata"
    workdir.mkdir(parents=True, exist_ok=True)
    # The postgres user must be able to reach its data dir through our temp dirs.
    for parent in workdir.parents:
        if parent == Path(tempfile.gettempdir()):
            break
        parent.chmod(parent.stat().st_mode | 0o011)
    shutil.chown(workdir, "postgres", "postgres")
    auth = ["-A", "trust"]
    host_auth = "trust"
    if password is not None:
        pwfile = workdir / "pw"
        pwfile.write_text(password + "\n")
        shutil.chown(pwfile, "postgres", "postgres")
        host_auth = "scram-sha-256"
        auth = ["--auth-local=trust", f"--auth-host={host_auth}", f"--pwfile={pwfile}"]
    subprocess.run(
        [
            "runuser",
            "-u",
            "postgres",
            "--",
            _pg_bin("initdb"),
            "-D",
            str(data),
            "-U",
            "postgres",
            *auth,
        ],
        check=True,
        capture_output=True,
    )
    with open(data / "pg_hba.conf", "a") as f:
        f.write(f"host all all 0.0.0.0/0 {host_auth}\n")
    pod.spawn(
        [
            "runuser",
            "-u",
            "postgres",
            "--",
            _pg_bin("postgres"),
            "-D",
            str(data),
            "-c",
            f"listen_addresses={pod.ip}",
            "-c",
            f"port={port}",
            "-c",
            f"unix_socket_directories={workdir}",
            "-c",
            "ssl=off",
            "-c",
            "fsync=off",
        ],
        log_path=str(workdir / "postgres.log"),
    )
    pod.wait_port(port, timeout=60)


def start_mariadb(pod: Pod, workdir: Path, port: int = 3306, init_sql: str = "") -> None:
    """A throwaway MariaDB with TLS off, run as root; ``init_sql`` is run as
    root over the local socket once it listens (users, grants, databases)."""
    data = workdir / "data"
    sock = workdir / "mysqld.sock"
    workdir.mkdir(parents=True, exist_ok=True)
    subprocess.run(
        [
            "mariadb-install-db",
            "--no-defaults",
            "--user=root",
            f"--datadir={data}",
            "--auth-root-authentication-method=normal",
            "--skip-test-db",
        ],
        check=True,
        capture_output=True,
    )
    pod.spawn(
        [
            "mariadbd",
            "--no-defaults",
            "--user=root",
            f"--datadir={data}",
            f"--socket={sock}",
            f"--pid-file={workdir / 'mysqld.pid'}",
            f"--bind-address={pod.ip}",
            f"--port={port}",
            "--skip-ssl",
            "--skip-name-resolve",
            "--innodb-buffer-pool-size=16M",
            "--innodb-log-file-size=4M",
            f"--log-error={workdir / 'mysqld.log'}",
        ],
    )
    pod.wait_port(port, timeout=60)
    if init_sql:
        pod.run(
            ["mariadb", "--no-defaults", f"--socket={sock}", "-u", "root", "-e", init_sql],
            check=True,
        )


DNS_SERVER = r"""
import socket, sys, threading, struct
import dns.message, dns.rcode, dns.rrset
ip, zone = sys.argv[1], dict(a.split("=") for a in sys.argv[2:])
def answer(wire):
    q = dns.message.from_wire(wire); r = dns.message.make_response(q)
    name = q.question[0].name.to_text().rstrip(".")
    if name in zone:
        r.answer.append(dns.rrset.from_text(q.question[0].name, 30, "IN", "A", zone[name]))
    else:
        r.set_rcode(dns.rcode.NXDOMAIN)
    return r.to_wire()
def tcp():
    srv = socket.socket(); srv.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
    srv.bind((ip, 53)); srv.listen(16)
    while True:
        c, _ = srv.accept()
        n = struct.unpack("!H", c.recv(2))[0]; out = answer(c.recv(n))
        c.sendall(struct.pack("!H", len(out)) + out); c.close()
threading.Thread(target=tcp, daemon=True).start()
u = socket.socket(socket.AF_INET, socket.SOCK_DGRAM); u.bind((ip, 53))
while True:
    data, peer = u.recvfrom(4096); u.sendto(answer(data), peer)
"""


def start_dns(pod: Pod, zone: dict[str, str]) -> None:
    """An authoritative server for ``zone`` (name -> IPv4), NXDOMAIN for the rest, UDP and TCP."""
    pod.spawn([sys.executable, "-c", DNS_SERVER, pod.ip, *(f"{k}={v}" for k, v in zone.items())])
    pod.wait_port(53)


def ensure_root() -> None:
    if os.geteuid() != 0:
        raise SystemExit("this needs root: network namespaces, veths and dumpcap")
