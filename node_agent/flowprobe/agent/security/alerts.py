"""Findings as OTLP log records, sent from their own thread through a bounded queue.

Security findings (security/) and anomaly alerts (analyze/) both go out here,
each with its own instrumentation scope.

A rule hit or a first sighting of sensitive data is an event someone may be
paged for, so it is a log record (severity, body, attributes) as well as a
span event; the records carry the agent's resource (the agent observed the
edge; both ends are in the attributes). As with spans, a full queue drops
the newest record and counts it, and a failed export is counted, never
retried beyond the exporter's own retries.
"""

from __future__ import annotations

import logging
import threading
from collections import Counter, deque
from collections.abc import Mapping

from opentelemetry._logs import LogRecord, SeverityNumber
from opentelemetry.sdk._logs import ReadableLogRecord
from opentelemetry.sdk._logs.export import LogRecordExporter, LogRecordExportResult
from opentelemetry.sdk.resources import Resource
from opentelemetry.sdk.util.instrumentation import InstrumentationScope

from flowprobe.agent.config import ExportConfig
from flowprobe.agent.export import otlp
from flowprobe.agent.export.telemetry import Telemetry, agent_resource
from flowprobe.agent.parse.messages import AttrValue

log = logging.getLogger("flowprobe.agent")

SCOPE = InstrumentationScope("flowprobe.agent.security", "0.1.0")
# ModSecurity / syslog severities -> OTel severity numbers (logs data model).
SEVERITY_NUMBERS = {
    "EMERGENCY": SeverityNumber.FATAL,
    "ALERT": SeverityNumber.FATAL,
    "CRITICAL": SeverityNumber.ERROR,
    "ERROR": SeverityNumber.ERROR,
    "WARNING": SeverityNumber.WARN,
    "NOTICE": SeverityNumber.INFO,
    "INFO": SeverityNumber.INFO,
    "DEBUG": SeverityNumber.DEBUG,
}
_POLL_S = 0.2


class Alerts:
    """Queue of log records and the thread that exports them in batches."""

    def __init__(
        self,
        exporter: LogRecordExporter,
        resource: Resource,
        queue_size: int = 4096,
        batch_size: int = 256,
        scope: InstrumentationScope = SCOPE,
    ) -> None:
        self.exporter = exporter
        self.resource = resource
        self.scope = scope
        self.queue_size = queue_size
        self.batch_size = batch_size
        self.counts: Counter[str] = Counter()
        self._queue: deque[ReadableLogRecord] = deque()
        self._closing = threading.Event()
        self._thread = threading.Thread(target=self._run, name="flowprobe-alerts", daemon=True)
        self._failing = False

    def emit(
        self,
        event_name: str,
        time_us: int,
        severity: str,
        body: str,
        attributes: Mapping[str, AttrValue],
    ) -> None:
        if len(self._queue) >= self.queue_size:
            self.counts["dropped"] += 1
            return
        record = LogRecord(
            timestamp=time_us * 1000,
            severity_text=severity,
            severity_number=SEVERITY_NUMBERS.get(severity, SeverityNumber.WARN),
            body=body,
            attributes=dict(attributes),
            event_name=event_name,
        )
        self._queue.append(ReadableLogRecord(record, self.resource, self.scope))

    def start(self) -> Alerts:
        self._thread.start()
        return self

    def close(self, timeout_s: float = 10.0) -> None:
        self._closing.set()
        if self._thread.is_alive():
            self._thread.join(timeout_s)
        self.counts["dropped"] += len(self._queue)
        self._queue.clear()
        self.exporter.shutdown()  # type: ignore[no-untyped-call]

    def _run(self) -> None:
        queue = self._queue
        while True:
            if queue:
                batch = [queue.popleft() for _ in range(min(self.batch_size, len(queue)))]
                self._export(batch)
                continue
            if self._closing.is_set():
                return
            self._closing.wait(_POLL_S)

    def _export(self, batch: list[ReadableLogRecord]) -> None:
        try:
            ok = self.exporter.export(batch) is LogRecordExportResult.SUCCESS
        except Exception as exc:
            log.debug("log export raised %r", exc)
            ok = False
        if ok:
            self.counts["exported"] += len(batch)
            if self._failing:
                log.warning("%s: alert export works again", self.scope.name)
                self._failing = False
            return
        if not self._failing:
            log.warning(
                "%s: alert export failed; dropping alerts until it works again", self.scope.name
            )
            self._failing = True
        self.counts["export_failed"] += len(batch)


def open_alerts(
    export: ExportConfig, telemetry: Telemetry | None, scope: InstrumentationScope = SCOPE
) -> Alerts | None:
    """Started alerts to the configured OTLP logs endpoint, or None without one (or
    with console spans); raises OtlpConfigError."""
    settings = None if export.console_spans else otlp.resolve(export.otlp, "logs")
    if settings is None:
        return None
    resource = (
        telemetry.agent_resource
        if telemetry is not None
        else agent_resource(export.agent_service_name)
    )
    return Alerts(otlp.log_exporter(settings), resource, scope=scope).start()
