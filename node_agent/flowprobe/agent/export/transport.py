"""Sending encoded ``ExportTraceServiceRequest`` bytes: OTLP/gRPC, OTLP/HTTP, or stdout.

The spans are encoded by the agent itself (``spans.py``, ``protobuf.py``), so
the SDK's span exporters, which take SDK span objects, cannot send them. What
they did is done here the same way: the settings come from ``otlp.resolve``
(headers, TLS, compression, timeout); a request is retried with exponential
back-off (±20% jitter, or the delay the server asks for) while the error is
transient and the timeout allows; :meth:`shutdown` cuts a back-off short.
A request that still fails is reported as ``False`` and the caller counts
the drop. Nothing is logged per failure: the agent logs the first failure
and the recovery itself.
"""

from __future__ import annotations

import gzip
import json
import random
import sys
import threading
import time
import urllib.parse
import zlib
from collections.abc import Callable
from typing import Any, Protocol

import grpc

from flowprobe.agent.export.otlp import SignalSettings, grpc_compression, grpc_tls, http_session

TRACE_EXPORT_METHOD = "/opentelemetry.proto.collector.trace.v1.TraceService/Export"
# The OTLP spec's retryable gRPC codes.
_GRPC_RETRYABLE = frozenset(
    {
        grpc.StatusCode.CANCELLED,
        grpc.StatusCode.DEADLINE_EXCEEDED,
        grpc.StatusCode.RESOURCE_EXHAUSTED,
        grpc.StatusCode.ABORTED,
        grpc.StatusCode.OUT_OF_RANGE,
        grpc.StatusCode.UNAVAILABLE,
        grpc.StatusCode.DATA_LOSS,
    }
)
# ... and HTTP statuses (plus connection errors).
_HTTP_RETRYABLE = frozenset({429, 502, 503, 504})


class SpanSink(Protocol):
    """Where encoded trace requests go."""

    def export(self, request: bytes) -> bool:
        """Send one ExportTraceServiceRequest; True when the backend accepted it."""
        ...

    def shutdown(self) -> None:
        """Stop: a retry back-off in progress ends at once, later exports fail."""
        ...


class _Retrying:
    """The retry loop both OTLP transports share."""

    def __init__(self, timeout_s: float) -> None:
        self.timeout_s = timeout_s
        self._stop = threading.Event()

    def retry(self, attempt: Callable[[float], float | None]) -> bool:
        """Call ``attempt(remaining_s)`` until it returns None (done) or the time is up.

        ``attempt`` returns the back-off before the next try, or raises
        :class:`_Permanent` for an error not worth retrying.
        """
        deadline = time.monotonic() + self.timeout_s
        for n in range(64):
            if self._stop.is_set():
                return False
            try:
                delay = attempt(max(0.001, deadline - time.monotonic()))
            except _Permanent:
                return False
            if delay is None:
                return True
            backoff = delay if delay > 0 else 2**n * random.uniform(0.8, 1.2)
            if backoff > deadline - time.monotonic() or self._stop.wait(backoff):
                return False
        return False

    def shutdown(self) -> None:
        self._stop.set()


class _Permanent(Exception):
    """The backend refused the request for good (bad request, unauthenticated, ...)."""


class GrpcSpanSender(_Retrying):
    """OTLP/gRPC: the request bytes as they are, through a generic unary call."""

    def __init__(self, s: SignalSettings) -> None:
        super().__init__(s.timeout_s)
        self._settings = s
        self._target = s.endpoint
        if "://" in self._target:
            self._target = urllib.parse.urlsplit(self._target).netloc
        self._metadata = tuple(s.headers.items())
        self._connect()

    def _connect(self) -> None:
        s = self._settings
        compression = grpc_compression(s.compression)
        if s.insecure:
            self._channel = grpc.insecure_channel(self._target, compression=compression)
        else:
            creds, options = grpc_tls(s)
            self._channel = grpc.secure_channel(
                self._target,
                creds or grpc.ssl_channel_credentials(),
                options=options,
                compression=compression,
            )
        # No serializers: the request is already protobuf, the response
        # (ExportTraceServiceResponse, partial-success counts) is not needed.
        self._call: grpc.UnaryUnaryMultiCallable[bytes, bytes] = self._channel.unary_unary(
            TRACE_EXPORT_METHOD
        )

    def export(self, request: bytes) -> bool:
        def attempt(remaining: float) -> float | None:
            try:
                self._call(request, metadata=self._metadata, timeout=remaining)
            except grpc.RpcError as exc:
                code = _call_detail(exc, "code")
                if code not in _GRPC_RETRYABLE:
                    raise _Permanent from exc
                if code is grpc.StatusCode.UNAVAILABLE and not self._stop.is_set():
                    # A channel that failed to connect waits out its own
                    # back-off (up to minutes) before it tries again; a new
                    # one connects at once, so a backend that is back is
                    # used by the next request (as the SDK exporter does).
                    self._channel.close()
                    self._connect()
                return _retry_delay(exc)
            return None

        return self.retry(attempt)

    def shutdown(self) -> None:
        super().shutdown()
        self._channel.close()


def _call_detail(exc: grpc.RpcError, name: str) -> Any:
    """``code()`` or ``trailing_metadata()`` of a failed call.

    The error a call raises is also a ``grpc.Call``; the type stubs cannot say so.
    """
    method = getattr(exc, name, None)
    return method() if callable(method) else None


def _retry_delay(exc: grpc.RpcError) -> float:
    """The delay a server asked for in ``google.rpc.RetryInfo``, else 0 (back off)."""
    info = dict(_call_detail(exc, "trailing_metadata") or ()).get("google.rpc.retryinfo-bin")
    if not isinstance(info, bytes):
        return 0.0
    from google.rpc.error_details_pb2 import RetryInfo  # type: ignore[import-untyped]

    retry = RetryInfo()
    retry.ParseFromString(info)
    return float(retry.retry_delay.seconds + retry.retry_delay.nanos / 1e9)


class HttpSpanSender(_Retrying):
    """OTLP/HTTP with a protobuf body."""

    def __init__(self, s: SignalSettings) -> None:
        super().__init__(s.timeout_s)
        import requests

        self._requests = requests
        self._session = http_session(s)
        self._session.headers.update(s.headers)
        self._session.headers["Content-Type"] = "application/x-protobuf"
        if s.compression != "none":
            self._session.headers["Content-Encoding"] = s.compression
        self._session.verify = s.certificate or True
        if s.client_certificate and s.client_key:
            self._session.cert = (s.client_certificate, s.client_key)
        self._endpoint = s.endpoint
        self._compression = s.compression

    def export(self, request: bytes) -> bool:
        if self._compression == "gzip":
            body = gzip.compress(request)
        elif self._compression == "deflate":
            body = zlib.compress(request)
        else:
            body = request

        def attempt(remaining: float) -> float | None:
            try:
                resp = self._session.post(self._endpoint, data=body, timeout=remaining)
            except (self._requests.ConnectionError, self._requests.Timeout):
                return 0.0
            except self._requests.RequestException as exc:
                raise _Permanent from exc
            if resp.ok:
                return None
            if resp.status_code not in _HTTP_RETRYABLE:
                raise _Permanent
            after = resp.headers.get("Retry-After", "")
            return float(after) if after.isdigit() else 0.0

        return self.retry(attempt)

    def shutdown(self) -> None:
        super().shutdown()
        self._session.close()


class ConsoleSpanPrinter:
    """``--console-spans``: each span as one line of OTLP/JSON, with its resource."""

    def export(self, request: bytes) -> bool:
        from google.protobuf.json_format import MessageToDict  # type: ignore[import-untyped]
        from opentelemetry.proto.collector.trace.v1.trace_service_pb2 import (
            ExportTraceServiceRequest,
        )

        req = ExportTraceServiceRequest()
        req.ParseFromString(request)
        out = []
        for rs in req.resource_spans:
            resource = MessageToDict(rs.resource)
            for ss in rs.scope_spans:
                scope = MessageToDict(ss.scope)
                for span in ss.spans:
                    d = MessageToDict(span)
                    # OTLP/JSON writes ids in hex, not protobuf JSON's base64.
                    d["traceId"] = span.trace_id.hex()
                    d["spanId"] = span.span_id.hex()
                    if span.parent_span_id:
                        d["parentSpanId"] = span.parent_span_id.hex()
                    out.append(json.dumps({"resource": resource, "scope": scope, "span": d}))
        if out:
            sys.stdout.write("\n".join(out) + "\n")
            sys.stdout.flush()
        return True

    def shutdown(self) -> None:
        pass
