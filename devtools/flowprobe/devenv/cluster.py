"""A real Kubernetes control plane as local processes, bound to loopback only.

``LocalCluster`` starts etcd, kube-apiserver, kube-controller-manager,
kube-scheduler and kwok (which plays kubelet for fake nodes: it marks them
Ready and gives scheduled pods phase Running, a podIP and a hostIP). All
binaries are the pinned builds from ``tools/versions.env`` (see
``flowprobe.devenv.toolchain``). Nothing runs containers: pod, node and
Service IPs are fake and must never be connected to.

    with LocalCluster() as cluster:
        cluster.create_fake_nodes(2)
        cluster.kubectl("create", "deployment", "web", "--image=registry.invalid/web:1")

``python -m flowprobe.devenv.cluster`` runs one in the foreground until Ctrl-C
(this is what ``make cluster`` calls).
"""

from __future__ import annotations

import argparse
import contextlib
import ctypes
import datetime
import fcntl
import ipaddress
import json
import os
import shutil
import signal
import ssl
import subprocess
import sys
import tempfile
import time
import urllib.error
import urllib.request
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from types import TracebackType
from typing import Any

from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec, rsa
from cryptography.hazmat.primitives.asymmetric.types import CertificatePublicKeyTypes
from cryptography.x509.oid import ExtendedKeyUsageOID, NameOID

from flowprobe.devenv import toolchain
from flowprobe.devenv.procs import free_ports, log_tail, sigterm_as_interrupt

HOST = "127.0.0.1"
# 10.0.0.1 (first address) becomes the `kubernetes` Service ClusterIP, so it
# is in the serving certificate's SANs.
SERVICE_CIDR = "10.0.0.0/24"
# kwok hands out podIPs from this one pool, so they are unique cluster-wide.
# Nodes get no spec.podCIDR on purpose: kwok would then start at the node
# range's network address (x.y.z.0), which no real CNI assigns.
POD_CIDR = "10.244.0.0/16"
_KWOK_CIDR = "10.244.0.1/16"  # kwok's flag takes the first address to use
KWOK_ANNOTATION = "kwok.x-k8s.io/node"
_MARKER = ".flowprobe-cluster"
_LOG_TAIL_LINES = 40


class ClusterError(RuntimeError):
    """The local cluster could not be started or driven."""


class ClusterStartError(ClusterError):
    def __init__(self, message: str, component: str | None = None, log_tail: str = "") -> None:
        self.component = component
        self.log_tail = log_tail
        if log_tail:
            message = f"{message}\n--- last lines of {component} log ---\n{log_tail}"
        super().__init__(message)


# --------------------------------------------------------------------------
# Certificates


@dataclass(frozen=True)
class Pki:
    ca_crt: Path
    ca_key: Path
    apiserver_crt: Path
    apiserver_key: Path
    admin_crt: Path
    admin_key: Path
    sa_key: Path
    front_proxy_ca_crt: Path
    front_proxy_client_crt: Path
    front_proxy_client_key: Path


def _write_key(path: Path, key: ec.EllipticCurvePrivateKey | rsa.RSAPrivateKey) -> None:
    path.write_bytes(
        key.private_bytes(
            serialization.Encoding.PEM,
            serialization.PrivateFormat.TraditionalOpenSSL,
            serialization.NoEncryption(),
        )
    )
    path.chmod(0o600)


def _write_cert(path: Path, cert: x509.Certificate) -> None:
    path.write_bytes(cert.public_bytes(serialization.Encoding.PEM))


def _key_usage(*, cert_sign: bool) -> x509.KeyUsage:
    return x509.KeyUsage(
        digital_signature=True,
        content_commitment=False,
        key_encipherment=False,
        data_encipherment=False,
        key_agreement=False,
        key_cert_sign=cert_sign,
        crl_sign=cert_sign,
        encipher_only=False,
        decipher_only=False,
    )


@dataclass(frozen=True)
class _Ca:
    cert: x509.Certificate
    key: ec.EllipticCurvePrivateKey


class _CertFactory:
    def __init__(self) -> None:
        now = datetime.datetime.now(datetime.UTC)
        # Backdated so that small clock differences never make a cert "not yet valid".
        self.not_before = now - datetime.timedelta(hours=1)
        self.not_after = now + datetime.timedelta(days=365)

    def _builder(
        self, subject: x509.Name, issuer: x509.Name, public: CertificatePublicKeyTypes
    ) -> x509.CertificateBuilder:
        return (
            x509.CertificateBuilder()
            .subject_name(subject)
            .issuer_name(issuer)
            .public_key(public)
            .serial_number(x509.random_serial_number())
            .not_valid_before(self.not_before)
            .not_valid_after(self.not_after)
        )

    def ca(self, common_name: str) -> _Ca:
        key = ec.generate_private_key(ec.SECP256R1())
        name = x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, common_name)])
        cert = (
            self._builder(name, name, key.public_key())
            .add_extension(x509.BasicConstraints(ca=True, path_length=None), critical=True)
            .add_extension(_key_usage(cert_sign=True), critical=True)
            .add_extension(
                x509.SubjectKeyIdentifier.from_public_key(key.public_key()), critical=False
            )
            .sign(key, hashes.SHA256())
        )
        return _Ca(cert, key)

    def leaf(
        self,
        ca: _Ca,
        subject: x509.Name,
        usage: x509.ObjectIdentifier,
        sans: Sequence[x509.GeneralName] = (),
    ) -> tuple[x509.Certificate, ec.EllipticCurvePrivateKey]:
        key = ec.generate_private_key(ec.SECP256R1())
        builder = (
            self._builder(subject, ca.cert.subject, key.public_key())
            .add_extension(x509.BasicConstraints(ca=False, path_length=None), critical=True)
            .add_extension(_key_usage(cert_sign=False), critical=True)
            .add_extension(x509.ExtendedKeyUsage([usage]), critical=False)
            .add_extension(
                x509.AuthorityKeyIdentifier.from_issuer_public_key(ca.key.public_key()),
                critical=False,
            )
        )
        if sans:
            builder = builder.add_extension(x509.SubjectAlternativeName(sans), critical=False)
        return builder.sign(ca.key, hashes.SHA256()), key


def _cn(common_name: str, org: str | None = None) -> x509.Name:
    attrs = [x509.NameAttribute(NameOID.ORGANIZATION_NAME, org)] if org else []
    return x509.Name([*attrs, x509.NameAttribute(NameOID.COMMON_NAME, common_name)])


FRONT_PROXY_CLIENT_CN = "front-proxy-client"


def generate_pki(directory: Path) -> Pki:
    """Cluster CA, apiserver serving cert, admin client cert, service-account key,
    and the front-proxy (request-header) CA and client cert.

    EC P-256 keeps generation in the milliseconds; the service-account key is
    RSA because that is the signing algorithm every component defaults to.
    """
    directory.mkdir(parents=True, exist_ok=True)
    f = _CertFactory()
    ca = f.ca("flowprobe-local-ca")
    service_ip = ipaddress.IPv4Network(SERVICE_CIDR)[1]
    api_cert, api_key = f.leaf(
        ca,
        _cn("kube-apiserver"),
        ExtendedKeyUsageOID.SERVER_AUTH,
        [
            x509.DNSName("localhost"),
            x509.DNSName("kubernetes"),
            x509.DNSName("kubernetes.default"),
            x509.DNSName("kubernetes.default.svc"),
            x509.DNSName("kubernetes.default.svc.cluster.local"),
            x509.IPAddress(ipaddress.IPv4Address(HOST)),
            x509.IPAddress(service_ip),
        ],
    )
    # O=system:masters is bound to cluster-admin by the bootstrap RBAC policy,
    # so no RoleBinding has to exist before the first request.
    admin_cert, admin_key = f.leaf(
        ca, _cn("flowprobe-admin", "system:masters"), ExtendedKeyUsageOID.CLIENT_AUTH
    )
    # The apiserver publishes this CA in kube-system/extension-apiserver-authentication;
    # without it kcm and the scheduler log "missing content for CA bundle" on
    # every sync, and aggregated API servers could not authenticate requests.
    fp_ca = f.ca("flowprobe-front-proxy-ca")
    fp_cert, fp_key = f.leaf(fp_ca, _cn(FRONT_PROXY_CLIENT_CN), ExtendedKeyUsageOID.CLIENT_AUTH)
    sa_key = rsa.generate_private_key(public_exponent=65537, key_size=2048)

    pki = Pki(
        ca_crt=directory / "ca.crt",
        ca_key=directory / "ca.key",
        apiserver_crt=directory / "apiserver.crt",
        apiserver_key=directory / "apiserver.key",
        admin_crt=directory / "admin.crt",
        admin_key=directory / "admin.key",
        sa_key=directory / "sa.key",
        front_proxy_ca_crt=directory / "front-proxy-ca.crt",
        front_proxy_client_crt=directory / "front-proxy-client.crt",
        front_proxy_client_key=directory / "front-proxy-client.key",
    )
    _write_cert(pki.ca_crt, ca.cert)
    _write_key(pki.ca_key, ca.key)
    _write_cert(pki.apiserver_crt, api_cert)
    _write_key(pki.apiserver_key, api_key)
    _write_cert(pki.admin_crt, admin_cert)
    _write_key(pki.admin_key, admin_key)
    _write_key(pki.sa_key, sa_key)
    _write_cert(pki.front_proxy_ca_crt, fp_ca.cert)
    _write_cert(pki.front_proxy_client_crt, fp_cert)
    _write_key(pki.front_proxy_client_key, fp_key)
    return pki


def write_kubeconfig(path: Path, server: str, pki: Pki, context: str = "flowprobe-local") -> None:
    # JSON is valid YAML and spares a YAML dependency; paths are absolute so the
    # file works from any working directory.
    config = {
        "apiVersion": "v1",
        "kind": "Config",
        "clusters": [
            {
                "name": context,
                "cluster": {"server": server, "certificate-authority": str(pki.ca_crt.resolve())},
            }
        ],
        "users": [
            {
                "name": "admin",
                "user": {
                    "client-certificate": str(pki.admin_crt.resolve()),
                    "client-key": str(pki.admin_key.resolve()),
                },
            }
        ],
        "contexts": [
            {
                "name": context,
                "context": {"cluster": context, "user": "admin", "namespace": "default"},
            }
        ],
        "current-context": context,
        "preferences": {},
    }
    path.write_text(json.dumps(config, indent=2) + "\n")
    path.chmod(0o600)


# --------------------------------------------------------------------------
# Processes


def _load_libc() -> Any:
    try:
        return ctypes.CDLL(None, use_errno=True)
    except OSError:
        return None


_LIBC = _load_libc() if sys.platform.startswith("linux") else None
_PR_SET_PDEATHSIG = 1


def _die_with_parent() -> None:
    # Runs in the child between fork and exec: if the Python process is
    # SIGKILLed (or pytest is killed by a CI timeout) the component dies too
    # instead of lingering on its port. Linux ties this to the *thread* that
    # forked, so create LocalCluster on a long-lived thread.
    if _LIBC is not None:
        _LIBC.prctl(_PR_SET_PDEATHSIG, signal.SIGKILL, 0, 0, 0)


@dataclass
class Component:
    name: str
    argv: list[str]
    log: Path
    env: dict[str, str] | None = None
    proc: subprocess.Popen[bytes] | None = field(default=None, repr=False)

    def running(self) -> bool:
        return self.proc is not None and self.proc.poll() is None

    def log_tail(self, lines: int = _LOG_TAIL_LINES) -> str:
        return log_tail(self.log, lines)


def _spawn(comp: Component, cwd: Path, die_with_parent: bool) -> None:
    with comp.log.open("ab") as log:
        log.write(f"==> {time.strftime('%H:%M:%S')} starting: {' '.join(comp.argv)}\n".encode())
        log.flush()
        comp.proc = subprocess.Popen(
            comp.argv,
            stdin=subprocess.DEVNULL,
            stdout=log,
            stderr=subprocess.STDOUT,
            cwd=cwd,
            env=comp.env,
            # Own process group: teardown signals the whole group, and a
            # Ctrl-C in the terminal reaches only Python, which then stops
            # the components in order.
            start_new_session=True,
            preexec_fn=_die_with_parent if die_with_parent else None,
        )


def _signal_group(proc: subprocess.Popen[bytes], sig: int) -> None:
    with contextlib.suppress(ProcessLookupError, PermissionError):
        os.killpg(proc.pid, sig)


def _stop_all(comps: Sequence[Component], timeout: float = 10.0, sig: int = signal.SIGTERM) -> None:
    running = [c for c in comps if c.proc is not None]
    for c in running:
        assert c.proc is not None
        _signal_group(c.proc, sig)
    deadline = time.monotonic() + timeout
    for c in running:
        assert c.proc is not None
        try:
            c.proc.wait(timeout=max(0.1, deadline - time.monotonic()))
        except subprocess.TimeoutExpired:
            _signal_group(c.proc, signal.SIGKILL)
            c.proc.wait()
        # Reap any stray children left in the group.
        _signal_group(c.proc, signal.SIGKILL)


# --------------------------------------------------------------------------
# The cluster


@dataclass(frozen=True)
class Ports:
    etcd_client: int
    etcd_peer: int
    apiserver: int
    controller_manager: int
    scheduler: int
    kwok: int


class LocalCluster:
    """etcd + kube-apiserver + kube-controller-manager + kube-scheduler + kwok.

    ``workdir`` holds certificates, etcd data, the kubeconfig and one log file
    per component. By default it is a fresh temporary directory; a given
    directory must be empty, missing, or a previous LocalCluster's. It is
    deleted on exit unless ``keep`` is true.
    """

    def __init__(
        self,
        workdir: Path | str | None = None,
        *,
        keep: bool = False,
        build: bool = True,
        start_timeout: float = 90.0,
        die_with_parent: bool = True,
    ) -> None:
        self._given_workdir = Path(workdir).resolve() if workdir is not None else None
        self.keep = keep
        self.build = build
        self.start_timeout = start_timeout
        self.die_with_parent = die_with_parent
        self._workdir: Path | None = None
        self._running = False
        self._lock_fd: int | None = None
        self._pki: Pki | None = None
        self._ports: Ports | None = None
        self._components: dict[str, Component] = {}
        self._kubectl: Path | None = None
        self._ssl: ssl.SSLContext | None = None
        self._opener = urllib.request.build_opener(urllib.request.ProxyHandler({}))
        self.started_in: float | None = None

    # -- public properties -------------------------------------------------

    @property
    def workdir(self) -> Path:
        """The work dir; still set after stop() (it then exists only with keep=True)."""
        if self._workdir is None:
            raise ClusterError("cluster not started")
        return self._workdir

    @property
    def kubeconfig(self) -> Path:
        return self.workdir / "admin.kubeconfig"

    @property
    def ports(self) -> Ports:
        if self._ports is None:
            raise ClusterError("cluster not started")
        return self._ports

    @property
    def server(self) -> str:
        return f"https://{HOST}:{self.ports.apiserver}"

    @property
    def etcd_url(self) -> str:
        return f"http://{HOST}:{self.ports.etcd_client}"

    @property
    def pki(self) -> Pki:
        if self._pki is None:
            raise ClusterError("cluster not started")
        return self._pki

    def log_path(self, component: str) -> Path:
        return self.workdir / "logs" / f"{component}.log"

    # -- context manager ---------------------------------------------------

    def __enter__(self) -> LocalCluster:
        self.start()
        return self

    def __exit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        self.stop()

    # -- lifecycle ---------------------------------------------------------

    def _binaries(self) -> dict[str, Path]:
        names = ("etcd", "kube-apiserver", "kube-controller-manager", "kube-scheduler", "kwok")
        return {n: toolchain.ensure_binary(n, build=self.build) for n in names}

    def _prepare_workdir(self) -> Path:
        if self._given_workdir is None:
            wd = Path(tempfile.mkdtemp(prefix="flowprobe-cluster-"))
        else:
            wd = self._given_workdir
            wd.mkdir(parents=True, exist_ok=True)
            entries = {p.name for p in wd.iterdir()}
            if entries and _MARKER not in entries:
                raise ClusterError(
                    f"{wd} is not empty and was not made by LocalCluster; refusing to use it"
                )
        marker = wd / _MARKER
        fd = os.open(marker, os.O_RDWR | os.O_CREAT, 0o644)
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            os.close(fd)
            raise ClusterError(f"another LocalCluster is running in {wd}") from None
        self._lock_fd = fd
        # Leftovers of an earlier run (stale etcd data would resurrect old objects).
        for p in wd.iterdir():
            if p.name != _MARKER:
                if p.is_dir() and not p.is_symlink():
                    shutil.rmtree(p)
                else:
                    p.unlink()
        return wd

    def start(self) -> None:
        if self._running:
            raise ClusterError("cluster already started")
        t0 = time.monotonic()
        bins = self._binaries()
        self._workdir = self._prepare_workdir()
        self._running = True
        try:
            (self.workdir / "logs").mkdir()
            self._pki = generate_pki(self.workdir / "pki")
            ctx = ssl.create_default_context(cafile=str(self._pki.ca_crt))
            ctx.load_cert_chain(str(self._pki.admin_crt), str(self._pki.admin_key))
            self._ssl = ctx
            for attempt in range(3):
                self._ports = Ports(*free_ports(6, HOST))
                write_kubeconfig(self.kubeconfig, self.server, self._pki)
                self._components = self._make_components(bins)
                try:
                    self._start_components()
                    break
                except ClusterStartError as exc:
                    # Another process may grab a port between our probe and the bind.
                    if "address already in use" not in exc.log_tail or attempt == 2:
                        raise
                    _stop_all(list(self._components.values())[::-1])
                    for d in ("etcd", "kwok-home"):
                        shutil.rmtree(self.workdir / d, ignore_errors=True)
        except BaseException as exc:
            if isinstance(exc, ClusterStartError) and not self.keep:
                exc.add_note(
                    "The work dir (and so that log) is removed; keep it with keep=True "
                    "(FLOWPROBE_KEEP_CLUSTER=1 for the pytest fixture, --keep for the CLI)."
                )
            self.stop(force_remove=not self.keep)
            raise
        self.started_in = time.monotonic() - t0

    def stop(self, *, force_remove: bool | None = None) -> None:
        """Stop every component (also safe after a failed or partial start)."""
        if self._components:
            order = ["kwok", "kube-scheduler", "kube-controller-manager", "kube-apiserver"]
            _stop_all([self._components[n] for n in order if n in self._components])
            # etcd last, so the apiserver's graceful shutdown still reaches it.
            if "etcd" in self._components:
                _stop_all([self._components["etcd"]])
            self._components = {}
        remove = (not self.keep) if force_remove is None else force_remove
        if self._running and self._workdir is not None and remove:
            shutil.rmtree(self._workdir, ignore_errors=True)
        self._running = False
        if self._lock_fd is not None:
            os.close(self._lock_fd)
            self._lock_fd = None

    def _make_components(self, bins: dict[str, Path]) -> dict[str, Component]:
        wd = self.workdir
        p = self.ports
        pki = self.pki
        kc = str(self.kubeconfig)
        logs = wd / "logs"
        # kwok always loads ~/.kwok/kwok.yaml if it exists; a private HOME keeps
        # a developer's kwokctl settings out of the tests.
        kwok_home = wd / "kwok-home"
        kwok_home.mkdir(exist_ok=True)
        kwok_env = dict(os.environ, HOME=str(kwok_home))

        comps = [
            Component(
                "etcd",
                [
                    str(bins["etcd"]),
                    "--name=flowprobe",
                    f"--data-dir={wd / 'etcd'}",
                    f"--listen-client-urls=http://{HOST}:{p.etcd_client}",
                    f"--advertise-client-urls=http://{HOST}:{p.etcd_client}",
                    f"--listen-peer-urls=http://{HOST}:{p.etcd_peer}",
                    f"--initial-advertise-peer-urls=http://{HOST}:{p.etcd_peer}",
                    f"--initial-cluster=flowprobe=http://{HOST}:{p.etcd_peer}",
                    # Throwaway data: fsync only costs time (envtest does the same).
                    "--unsafe-no-fsync=true",
                    "--log-level=warn",
                ],
                logs / "etcd.log",
            ),
            Component(
                "kube-apiserver",
                [
                    str(bins["kube-apiserver"]),
                    f"--etcd-servers=http://{HOST}:{p.etcd_client}",
                    f"--bind-address={HOST}",
                    f"--secure-port={p.apiserver}",
                    # Without it the apiserver looks for a default-route interface
                    # and fails on machines with none; a loopback address is then
                    # rejected by the endpoint reconcilers, hence "none" (no
                    # Endpoints for the `kubernetes` Service, which nothing needs here).
                    f"--advertise-address={HOST}",
                    "--endpoint-reconciler-type=none",
                    f"--cert-dir={wd / 'apiserver-certs'}",
                    f"--tls-cert-file={pki.apiserver_crt}",
                    f"--tls-private-key-file={pki.apiserver_key}",
                    f"--client-ca-file={pki.ca_crt}",
                    f"--requestheader-client-ca-file={pki.front_proxy_ca_crt}",
                    f"--requestheader-allowed-names={FRONT_PROXY_CLIENT_CN}",
                    "--requestheader-username-headers=X-Remote-User",
                    "--requestheader-group-headers=X-Remote-Group",
                    "--requestheader-extra-headers-prefix=X-Remote-Extra-",
                    f"--proxy-client-cert-file={pki.front_proxy_client_crt}",
                    f"--proxy-client-key-file={pki.front_proxy_client_key}",
                    "--authorization-mode=RBAC",
                    "--service-account-issuer=https://kubernetes.default.svc.cluster.local",
                    f"--service-account-key-file={pki.sa_key}",
                    f"--service-account-signing-key-file={pki.sa_key}",
                    f"--service-cluster-ip-range={SERVICE_CIDR}",
                    "--allow-privileged=true",
                    # kubectl logs/exec go apiserver -> node InternalIP (kwok sets
                    # 127.0.0.1 below): keep that path on loopback.
                    "--kubelet-preferred-address-types=InternalIP",
                    # On SIGTERM, open watches (kcm, scheduler, kwok, tests)
                    # otherwise hold the HTTP server's shutdown for its 60 s timeout.
                    "--shutdown-watch-termination-grace-period=2s",
                    "--profiling=false",
                ],
                logs / "kube-apiserver.log",
            ),
            Component(
                "kube-controller-manager",
                [
                    str(bins["kube-controller-manager"]),
                    f"--kubeconfig={kc}",
                    f"--authentication-kubeconfig={kc}",
                    f"--authorization-kubeconfig={kc}",
                    "--authorization-always-allow-paths=/healthz,/readyz,/livez",
                    "--leader-elect=false",
                    f"--bind-address={HOST}",
                    f"--secure-port={p.controller_manager}",
                    f"--cert-dir={wd / 'kcm-certs'}",
                    f"--root-ca-file={pki.ca_crt}",
                    f"--service-account-private-key-file={pki.sa_key}",
                    f"--cluster-signing-cert-file={pki.ca_crt}",
                    f"--cluster-signing-key-file={pki.ca_key}",
                    f"--service-cluster-ip-range={SERVICE_CIDR}",
                    # Its default is under /usr/libexec, which kcm would create.
                    f"--flex-volume-plugin-dir={wd / 'flexvolume'}",
                    "--profiling=false",
                ],
                logs / "kube-controller-manager.log",
            ),
            Component(
                "kube-scheduler",
                [
                    str(bins["kube-scheduler"]),
                    f"--kubeconfig={kc}",
                    f"--authentication-kubeconfig={kc}",
                    f"--authorization-kubeconfig={kc}",
                    "--authorization-always-allow-paths=/healthz,/readyz,/livez",
                    "--leader-elect=false",
                    f"--bind-address={HOST}",
                    f"--secure-port={p.scheduler}",
                    f"--cert-dir={wd / 'scheduler-certs'}",
                    "--profiling=false",
                ],
                logs / "kube-scheduler.log",
            ),
            Component(
                "kwok",
                [
                    str(bins["kwok"]),
                    f"--kubeconfig={kc}",
                    f"--manage-nodes-with-annotation-selector={KWOK_ANNOTATION}=fake",
                    "--node-lease-duration-seconds=40",
                    f"--cidr={_KWOK_CIDR}",
                    # Node InternalIP and so every pod's hostIP; loopback so that
                    # anything dialling a "kubelet" stays on this machine.
                    f"--node-ip={HOST}",
                    f"--server-address={HOST}:{p.kwok}",
                ],
                logs / "kwok.log",
                env=kwok_env,
            ),
        ]
        return {c.name: c for c in comps}

    def _start_components(self) -> None:
        c = self._components
        self._launch(c["etcd"])
        self._wait(c["etcd"], "etcd /health", self._etcd_healthy)
        self._launch(c["kube-apiserver"])
        self._wait(c["kube-apiserver"], "kube-apiserver /readyz", self._apiserver_ready)
        for name in ("kube-controller-manager", "kube-scheduler", "kwok"):
            self._launch(c[name])
        p = self.ports
        self._wait(
            c["kube-controller-manager"],
            "kube-controller-manager /healthz",
            lambda: self._https_ok(p.controller_manager, "/healthz"),
        )
        self._wait(
            c["kube-scheduler"],
            "kube-scheduler /healthz",
            lambda: self._https_ok(p.scheduler, "/healthz"),
        )
        self._wait(
            c["kwok"], "kwok /healthz", lambda: self._http_ok(f"http://{HOST}:{p.kwok}/healthz")
        )
        # Pods are rejected by ServiceAccount admission until kcm has created
        # the namespace's `default` ServiceAccount; wait so callers need not.
        self._wait(
            c["kube-controller-manager"],
            "ServiceAccount default/default (created by kube-controller-manager)",
            lambda: (
                self.api_status("GET", "/api/v1/namespaces/default/serviceaccounts/default") == 200
            ),
        )

    def _launch(self, comp: Component) -> None:
        _spawn(comp, self.workdir, self.die_with_parent)

    def _wait(
        self,
        comp: Component,
        what: str,
        check: Callable[[], bool],
        timeout: float | None = None,
    ) -> None:
        timeout = self.start_timeout if timeout is None else timeout
        deadline = time.monotonic() + timeout
        delay = 0.05
        while True:
            if comp.proc is not None and comp.proc.poll() is not None:
                raise ClusterStartError(
                    f"{comp.name} exited with code {comp.proc.returncode} while waiting for "
                    f"{what} (log: {comp.log})",
                    comp.name,
                    comp.log_tail(),
                )
            if check():
                return
            if time.monotonic() > deadline:
                raise ClusterStartError(
                    f"timed out after {timeout:.0f} s waiting for {what} (log: {comp.log})",
                    comp.name,
                    comp.log_tail(),
                )
            time.sleep(delay)
            delay = min(delay * 1.5, 0.5)

    # -- health probes -----------------------------------------------------

    def _http_ok(self, url: str, context: ssl.SSLContext | None = None) -> bool:
        try:
            handlers: list[urllib.request.BaseHandler] = [urllib.request.ProxyHandler({})]
            if context is not None:
                handlers.append(urllib.request.HTTPSHandler(context=context))
            with urllib.request.build_opener(*handlers).open(url, timeout=2) as resp:
                return int(resp.status) == 200
        except (OSError, urllib.error.URLError):
            return False

    def _https_ok(self, port: int, path: str) -> bool:
        # kcm and the scheduler serve a self-signed cert generated at startup;
        # there is nothing to verify it against, and this is loopback only.
        ctx = ssl.create_default_context()
        ctx.check_hostname = False
        ctx.verify_mode = ssl.CERT_NONE
        return self._http_ok(f"https://{HOST}:{port}{path}", ctx)

    def _etcd_healthy(self) -> bool:
        try:
            with self._opener.open(f"{self.etcd_url}/health", timeout=2) as resp:
                return bool(json.load(resp).get("health") == "true")
        except (OSError, ValueError, urllib.error.URLError):
            return False

    def _apiserver_ready(self) -> bool:
        return self.api_status("GET", "/readyz") == 200

    # -- API access (stdlib only; no kubernetes client needed) --------------

    def _api_opener(self) -> urllib.request.OpenerDirector:
        if self._ssl is None:
            raise ClusterError("cluster not started")
        return urllib.request.build_opener(
            urllib.request.ProxyHandler({}), urllib.request.HTTPSHandler(context=self._ssl)
        )

    def _api_call(
        self, method: str, path: str, body: object | None, timeout: float
    ) -> tuple[int, bytes]:
        data = None if body is None else json.dumps(body).encode()
        req = urllib.request.Request(self.server + path, data=data, method=method)
        if data is not None:
            ctype = "application/merge-patch+json" if method == "PATCH" else "application/json"
            req.add_header("Content-Type", ctype)
        req.add_header("Accept", "application/json")
        try:
            with self._api_opener().open(req, timeout=timeout) as resp:
                return int(resp.status), resp.read()
        except urllib.error.HTTPError as err:
            return int(err.code), err.read()

    def api_status(self, method: str, path: str, body: object | None = None) -> int | None:
        """HTTP status of an API call as admin, or None if the server is unreachable."""
        try:
            return self._api_call(method, path, body, timeout=5)[0]
        except (OSError, urllib.error.URLError):
            return None

    def api(self, method: str, path: str, body: object | None = None, timeout: float = 30) -> Any:
        """JSON API call as admin (system:masters); raises ClusterError on non-2xx."""
        status, data = self._api_call(method, path, body, timeout)
        if not 200 <= status < 300:
            raise ClusterError(f"{method} {path} -> HTTP {status}: {data[:500]!r}")
        return json.loads(data) if data else None

    def server_version(self) -> str:
        """gitVersion reported by the API server, e.g. ``v1.37.2``."""
        return str(self.api("GET", "/version")["gitVersion"])

    # -- kubectl / helm ----------------------------------------------------

    def tool_env(self) -> dict[str, str]:
        """Environment for CLI tools pointed at this cluster (own caches too)."""
        wd = self.workdir
        return dict(
            os.environ,
            KUBECONFIG=str(self.kubeconfig),
            # Ports get reused between runs; a shared discovery cache could
            # describe a different cluster.
            KUBECACHEDIR=str(wd / "kube-cache"),
            HELM_CACHE_HOME=str(wd / "helm" / "cache"),
            HELM_CONFIG_HOME=str(wd / "helm" / "config"),
            HELM_DATA_HOME=str(wd / "helm" / "data"),
        )

    def kubectl(
        self,
        *args: str,
        check: bool = True,
        input: str | None = None,  # noqa: A002 - mirrors subprocess.run
        timeout: float = 60,
    ) -> subprocess.CompletedProcess[str]:
        """Run the pinned kubectl against this cluster; output captured as text."""
        if self._kubectl is None:
            self._kubectl = toolchain.ensure_kubectl()
        return self._run_tool(
            [str(self._kubectl), f"--kubeconfig={self.kubeconfig}", *args],
            check=check,
            input=input,
            timeout=timeout,
        )

    def helm(
        self,
        *args: str,
        check: bool = True,
        input: str | None = None,  # noqa: A002
        timeout: float = 120,
    ) -> subprocess.CompletedProcess[str]:
        """Run the pinned helm against this cluster; output captured as text."""
        helm = toolchain.ensure_binary("helm", build=self.build)
        return self._run_tool(
            [str(helm), f"--kubeconfig={self.kubeconfig}", *args],
            check=check,
            input=input,
            timeout=timeout,
        )

    def _run_tool(
        self,
        argv: list[str],
        *,
        check: bool,
        input: str | None,  # noqa: A002
        timeout: float,
    ) -> subprocess.CompletedProcess[str]:
        proc = subprocess.run(
            argv,
            env=self.tool_env(),
            input=input,
            capture_output=True,
            text=True,
            timeout=timeout,
            check=False,
        )
        if check and proc.returncode != 0:
            raise ClusterError(
                f"{' '.join(argv)} failed with exit code {proc.returncode}\n"
                f"stdout:\n{proc.stdout}\nstderr:\n{proc.stderr}"
            )
        return proc

    # -- fake nodes --------------------------------------------------------

    def create_fake_nodes(
        self,
        count: int,
        prefix: str = "kwok-node-",
        *,
        labels: dict[str, str] | None = None,
        taint: bool = False,
        wait: bool = True,
        timeout: float = 60,
    ) -> list[str]:
        """Create ``count`` nodes that kwok manages and (by default) wait until Ready.

        Nodes already present are left alone, so calling this twice with the
        same prefix is harmless. With ``taint`` the nodes carry kwok's usual
        NoSchedule taint and pods need a matching toleration.
        """
        existing = {
            n["metadata"]["name"] for n in self.api("GET", "/api/v1/nodes").get("items", [])
        }
        names = [f"{prefix}{i}" for i in range(count)]
        for name in names:
            if name in existing:
                continue
            node_labels = {
                "kubernetes.io/hostname": name,
                "kubernetes.io/os": "linux",
                "kubernetes.io/arch": "amd64",
                "type": "kwok",
                **(labels or {}),
            }
            spec: dict[str, Any] = {}
            if taint:
                spec["taints"] = [{"key": KWOK_ANNOTATION, "value": "fake", "effect": "NoSchedule"}]
            self.api(
                "POST",
                "/api/v1/nodes",
                {
                    "apiVersion": "v1",
                    "kind": "Node",
                    "metadata": {
                        "name": name,
                        "labels": node_labels,
                        "annotations": {
                            KWOK_ANNOTATION: "fake",
                            "node.alpha.kubernetes.io/ttl": "0",
                        },
                    },
                    "spec": spec,
                },
            )
        if wait:
            self.wait_nodes_ready(names, timeout=timeout)
        return names

    def node_ready(self, name: str) -> bool:
        status, data = self._api_call("GET", f"/api/v1/nodes/{name}", None, timeout=5)
        if status != 200:
            return False
        conditions = json.loads(data).get("status", {}).get("conditions", [])
        return any(c.get("type") == "Ready" and c.get("status") == "True" for c in conditions)

    def wait_nodes_ready(self, names: Sequence[str], timeout: float = 60) -> None:
        self.wait_for(
            lambda: all(self.node_ready(n) for n in names),
            f"nodes {', '.join(names)} Ready",
            timeout=timeout,
            component="kwok",
        )

    def wait_established(self, crd: str, timeout: float = 60) -> None:
        """Wait until a CustomResourceDefinition is served (condition Established).

        Not ``kubectl wait --for=condition=Established``: right after the
        create, the CRD has no status.conditions yet and kubectl fails at once
        (".status.conditions accessor error") instead of waiting.
        """

        def established() -> bool:
            obj = self.api("GET", f"/apis/apiextensions.k8s.io/v1/customresourcedefinitions/{crd}")
            return any(
                c.get("type") == "Established" and c.get("status") == "True"
                for c in (obj.get("status") or {}).get("conditions") or []
            )

        self.wait_for(established, f"CRD {crd} Established", timeout=timeout)

    def wait_for(
        self,
        check: Callable[[], bool],
        what: str,
        *,
        timeout: float = 60,
        component: str = "kube-apiserver",
    ) -> None:
        """Poll ``check`` until true; on timeout the error shows ``component``'s log."""
        comp = self._components.get(component)
        deadline = time.monotonic() + timeout
        delay = 0.05
        while not check():
            if time.monotonic() > deadline:
                tail = comp.log_tail() if comp else ""
                raise ClusterError(
                    f"timed out after {timeout:.0f} s waiting for {what}"
                    + (f"\n--- last lines of {component} log ---\n{tail}" if tail else "")
                )
            time.sleep(delay)
            delay = min(delay * 1.5, 0.5)

    # -- API server restarts -----------------------------------------------

    def stop_apiserver(self, *, graceful: bool = True) -> None:
        """Stop kube-apiserver only (etcd and the controllers keep running)."""
        comp = self._components["kube-apiserver"]
        _stop_all([comp], sig=signal.SIGTERM if graceful else signal.SIGKILL)

    def start_apiserver(self) -> None:
        """Start kube-apiserver again on the same port and wait for /readyz."""
        comp = self._components["kube-apiserver"]
        if comp.running():
            raise ClusterError("kube-apiserver is already running")
        self._launch(comp)
        self._wait(comp, "kube-apiserver /readyz after restart", self._apiserver_ready)

    def restart_apiserver(self, *, graceful: bool = True, downtime: float = 0.0) -> None:
        """Stop kube-apiserver, optionally stay down ``downtime`` s, start it again.

        Clients see connection errors and then broken watches, as in a real
        control-plane upgrade; state lives in etcd and survives.
        """
        self.stop_apiserver(graceful=graceful)
        if downtime > 0:
            time.sleep(downtime)
        self.start_apiserver()

    def dead_components(self) -> list[Component]:
        return [c for c in self._components.values() if not c.running()]


# --------------------------------------------------------------------------
# Foreground mode (`make cluster`)


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(
        prog="python -m flowprobe.devenv.cluster",
        description="Run a local Kubernetes control plane in the foreground until Ctrl-C.",
    )
    parser.add_argument("--workdir", type=Path, help="state/log dir (default: a temp dir)")
    parser.add_argument("--keep", action="store_true", help="keep the work dir on exit")
    parser.add_argument("--nodes", type=int, default=2, help="fake kwok nodes (default 2)")
    parser.add_argument(
        "--no-build", action="store_true", help="fail instead of building missing binaries"
    )
    args = parser.parse_args(argv)

    cluster = LocalCluster(args.workdir, keep=args.keep, build=not args.no_build)
    with sigterm_as_interrupt():
        try:
            with cluster:
                nodes = cluster.create_fake_nodes(args.nodes) if args.nodes > 0 else []
                print(
                    f"flowprobe local cluster is up: Kubernetes {cluster.server_version()} "
                    f"(started in {cluster.started_in or 0:.1f} s)\n"
                    f"  server:     {cluster.server}\n"
                    f"  kubeconfig: {cluster.kubeconfig}\n"
                    f"  logs:       {cluster.workdir / 'logs'}\n"
                    f"  nodes:      {', '.join(nodes) or '(none)'}\n"
                    f"\n  export KUBECONFIG={cluster.kubeconfig}\n"
                    f"\nPress Ctrl-C to stop"
                    + ("." if args.keep else " (the work dir is then deleted; --keep keeps it)."),
                    flush=True,
                )
                while True:
                    dead = cluster.dead_components()
                    if dead:
                        for c in dead:
                            print(
                                f"error: {c.name} exited (log: {c.log})\n{c.log_tail()}",
                                file=sys.stderr,
                            )
                        return 1
                    time.sleep(1)
        except KeyboardInterrupt:
            print("\nlocal cluster stopped", flush=True)
            return 0
        except (ClusterError, toolchain.ToolchainError) as exc:
            print(f"error: {exc}", file=sys.stderr)
            return 1


if __name__ == "__main__":
    sys.exit(main())
