"""The frozen pcaps over HTTP, to bearer-token holders only; and the client the CLI uses.

``GET /pcaps`` lists them (JSON), ``GET /pcaps/NAME`` sends one. The token is
read from a file on every request (a mounted Secret is updated in place)
and compared in constant time; a missing or empty token file refuses
everyone: packets carry payloads, so the endpoint fails closed.
"""

from __future__ import annotations

import hmac
import json
import logging
import os
import shutil
import threading
import urllib.error
import urllib.parse
import urllib.request
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path
from typing import Any, BinaryIO

from flowprobe.agent.forensics.store import PcapStore

log = logging.getLogger("flowprobe.agent.forensics")

PCAPS_PATH = "/pcaps"
PCAP_CONTENT_TYPE = "application/vnd.tcpdump.pcap"


class PcapEndpoint:
    def __init__(self, store: PcapStore, token_file: str | None) -> None:
        self.store = store
        self.token_file = token_file
        self.refused = 0
        self._warned = False

    def _token(self) -> bytes:
        if not self.token_file:
            return b""
        try:
            return Path(self.token_file).read_bytes().strip()
        except OSError as exc:
            if not self._warned:
                self._warned = True
                log.warning(
                    "pcap endpoint: token file %s: %s; refusing every request", self.token_file, exc
                )
            return b""

    def authorized(self, header: str | None) -> bool:
        token = self._token()
        scheme, _, presented = (header or "").partition(" ")
        ok = bool(token) and scheme.lower() == "bearer"
        # compare_digest takes as long whatever the first differing byte is.
        return hmac.compare_digest(presented.strip().encode(), token) and ok

    def handle(self, req: BaseHTTPRequestHandler) -> bool:
        """Answer ``req`` if its path is under /pcaps; False leaves it to the caller."""
        path = req.path.split("?")[0]
        if path != PCAPS_PATH and not path.startswith(PCAPS_PATH + "/"):
            return False
        if not self.authorized(req.headers.get("Authorization")):
            self.refused += 1
            body = b'{"error": "unauthorized"}'
            req.send_response(401)
            req.send_header("WWW-Authenticate", 'Bearer realm="flowprobe-pcaps"')
            _send(req, "application/json", len(body))
            req.wfile.write(body)
            return True
        if path == PCAPS_PATH:
            body = json.dumps([f.as_dict() for f in self.store.list()]).encode()
            req.send_response(200)
            _send(req, "application/json", len(body))
            req.wfile.write(body)
            return True
        file = self.store.path(path.removeprefix(PCAPS_PATH + "/"))
        try:
            if file is None:
                raise FileNotFoundError
            f = file.open("rb")
        except FileNotFoundError:  # or evicted between the check and the open
            req.send_error(404)
            return True
        with f:
            req.send_response(200)
            req.send_header("Content-Disposition", f'attachment; filename="{file.name}"')
            _send(req, PCAP_CONTENT_TYPE, os.fstat(f.fileno()).st_size)
            shutil.copyfileobj(f, req.wfile)
        return True


def _send(req: BaseHTTPRequestHandler, content_type: str, length: int) -> None:
    req.send_header("Content-Type", content_type)
    req.send_header("Content-Length", str(length))
    req.send_header("Cache-Control", "no-store")
    req.end_headers()


class PcapServer:
    """The endpoint on its own port, for ``flowprobe-agent capture`` (the daemon
    serves it on its health port instead)."""

    def __init__(self, endpoint: PcapEndpoint, address: str, port: int) -> None:
        class Handler(BaseHTTPRequestHandler):
            def do_GET(self) -> None:
                if not endpoint.handle(self):
                    self.send_error(404)

            def log_message(self, fmt: str, *args: Any) -> None:
                pass

        self.server = ThreadingHTTPServer((address, port), Handler)
        self.server.daemon_threads = True
        self.port = int(self.server.server_address[1])
        self._thread = threading.Thread(
            target=self.server.serve_forever, name="flowprobe-pcaps", daemon=True
        )

    def start(self) -> PcapServer:
        self._thread.start()
        return self

    def stop(self) -> None:
        self.server.shutdown()
        self.server.server_close()


class FetchError(Exception):
    """The endpoint refused or could not be reached; the message says why."""


def _get(url: str, token: str) -> Any:
    request = urllib.request.Request(url, headers={"Authorization": f"Bearer {token}"})
    try:
        return urllib.request.urlopen(request, timeout=30)
    except urllib.error.HTTPError as exc:
        if exc.code == 401:
            raise FetchError(f"{url}: 401 unauthorized (wrong or missing token)") from None
        raise FetchError(f"{url}: {exc.code} {exc.reason}") from None
    except (urllib.error.URLError, OSError) as exc:
        raise FetchError(f"{url}: {exc}") from None


def fetch_list(base_url: str, token: str) -> list[dict[str, Any]]:
    with _get(base_url.rstrip("/") + PCAPS_PATH, token) as resp:
        data = json.loads(resp.read())
    if not isinstance(data, list):
        raise FetchError(f"{base_url}: unexpected answer")
    return data


def fetch(base_url: str, token: str, name: str, out: BinaryIO) -> int:
    """Copy pcap ``name`` into ``out``; the number of bytes."""
    with _get(f"{base_url.rstrip('/')}{PCAPS_PATH}/{urllib.parse.quote(name)}", token) as resp:
        n = 0
        while chunk := resp.read(1 << 16):
            out.write(chunk)
            n += len(chunk)
    return n
