"""TLS settings neither transport offers directly: another server name, no verification.

``server_name`` is the name the backend's certificate is checked against
(and, over HTTP, sent as SNI) when it differs from the dialled address, e.g.
an IP or a node-local forwarder. ``insecure_skip_verify`` accepts any
certificate; traffic stays encrypted.

* HTTP/protobuf (the agent's span sender and the SDK's metric exporter, both
  on ``requests``): :class:`TlsAdapter`, mounted on the session, sets
  urllib3's ``server_hostname``/``assert_hostname`` and overrides whatever
  ``verify`` the caller passes (the SDK's transport sets its own).
* gRPC (``otlp.grpc_tls``): the server name is the
  ``grpc.ssl_target_name_override`` channel option. grpcio cannot skip verification, so the certificate the endpoint
  presents is fetched (unverified) and pinned as the only trusted root, under
  the name it carries: any *self-signed* certificate is then accepted; a
  certificate issued by a CA needs ``caFile`` (docs/agent-in-cluster.md).
"""

from __future__ import annotations

import socket
import ssl
import urllib.parse
from typing import Any, cast

import urllib3
from requests.adapters import HTTPAdapter
from requests.models import PreparedRequest, Response


class TlsAdapter(HTTPAdapter):
    def __init__(self, verify: bool | str, server_name: str | None) -> None:
        self._verify = verify
        self._server_name = server_name
        if verify is False:
            # Asked for explicitly in the policy; one warning per request would flood the log.
            urllib3.disable_warnings(urllib3.exceptions.InsecureRequestWarning)
        super().__init__()

    def init_poolmanager(self, *args: Any, **kwargs: Any) -> None:
        if self._server_name:
            kwargs["server_hostname"] = self._server_name
            kwargs["assert_hostname"] = self._server_name
        super().init_poolmanager(*args, **kwargs)

    def send(self, request: PreparedRequest, *args: Any, **kwargs: Any) -> Response:
        kwargs["verify"] = self._verify
        return super().send(request, *args, **kwargs)


def grpc_host_port(target: str) -> tuple[str, int]:
    """(host, port) of a gRPC endpoint given as ``host:port`` or ``https://host:port``."""
    netloc = urllib.parse.urlsplit(target).netloc if "://" in target else target
    parsed = urllib.parse.urlsplit(f"//{netloc}")
    if parsed.hostname is None:
        raise ValueError(f"no host in OTLP endpoint {target!r}")
    return parsed.hostname, parsed.port or 443


def presented_certificate(
    host: str, port: int, server_name: str | None, timeout_s: float
) -> tuple[str, str]:
    """The endpoint's certificate (PEM) and a DNS name (else IP, else CN) it is valid for."""
    loose = ssl.create_default_context()
    loose.check_hostname = False
    loose.verify_mode = ssl.CERT_NONE
    sni = server_name or host
    with (
        socket.create_connection((host, port), timeout=timeout_s) as sock,
        loose.wrap_socket(sock, server_hostname=sni) as tls,
    ):
        der = tls.getpeercert(binary_form=True)
    if der is None:
        raise ssl.SSLError(f"{host}:{port} presented no certificate")
    pem = ssl.DER_cert_to_PEM_cert(der)
    if server_name:
        return pem, server_name
    # Decoding needs a verified handshake: once more, trusting just that certificate.
    pinned = ssl.create_default_context(cadata=pem)
    pinned.check_hostname = False
    with (
        socket.create_connection((host, port), timeout=timeout_s) as sock,
        pinned.wrap_socket(sock, server_hostname=sni) as tls,
    ):
        cert = tls.getpeercert() or {}
    # typeshed types each field as the union of all; these are their shapes.
    sans = cast("tuple[tuple[str, str], ...]", cert.get("subjectAltName", ()))
    subject = cast("tuple[tuple[tuple[str, str], ...], ...]", cert.get("subject", ()))
    names = [v for k, v in sans if k == "DNS"] + [v for k, v in sans if k == "IP Address"]
    names += [v for rdn in subject for k, v in rdn if k == "commonName"]
    return pem, names[0] if names else host
