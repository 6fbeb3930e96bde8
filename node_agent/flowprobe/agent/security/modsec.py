"""A thin ctypes binding to libmodsecurity3's C API, with the OWASP CRS from Debian.

Why ctypes (docs/security.md): the C API is a dozen plain functions on opaque
pointers, Debian ships the library but not its headers (libmodsecurity-dev),
and ctypes is in the standard library, so there is nothing to compile and no
new dependency. ctypes releases the GIL for the duration of each call, so the
rule engine runs in parallel with the capture thread's Python.

Rule hits come back through the log callback as ModSecurity's text lines
(``[id "942100"] [msg "..."] [data "..."] [severity "2"] [tag "..."]``),
parsed into :class:`RuleHit`. The engine runs ``DetectionOnly``: it never
intervenes, it only reports.
"""

from __future__ import annotations

import ctypes
import itertools
import re
import threading
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

from flowprobe.agent.config import WafConfig

LIBRARY = "libmodsecurity.so.3"
CRS_SETUP = Path("/etc/modsecurity/crs/crs-setup.conf")
CRS_EXCLUSIONS_BEFORE = Path("/etc/modsecurity/crs/REQUEST-900-EXCLUSION-RULES-BEFORE-CRS.conf")
CRS_EXCLUSIONS_AFTER = Path("/etc/modsecurity/crs/RESPONSE-999-EXCLUSION-RULES-AFTER-CRS.conf")
CRS_RULES = Path("/usr/share/modsecurity-crs/rules")
# Response bodies of these types are inspected (CRS's data-leakage rules).
RESPONSE_MIME_TYPES = "text/plain text/html text/xml application/json application/xml"

# ModSecurity's numeric severities (the ``severity`` action), by value.
SEVERITIES = ("EMERGENCY", "ALERT", "CRITICAL", "ERROR", "WARNING", "NOTICE", "INFO", "DEBUG")
# CRS rules that only sum up the others' scores, not detections of their own.
EVALUATION_RULES = frozenset({949110, 959100, 980130, 980140})

_KEYS = "file|line|id|rev|msg|data|severity|ver|maturity|accuracy|tag|hostname|uri|unique_id|ref"
# A value ends where the next known key starts (or the line ends): matched
# data is not escaped and may itself contain '"]'.
_FIELD = re.compile(rf'\[({_KEYS}) "(.*?)"\](?= \[(?:{_KEYS}) "|\s*$)', re.DOTALL)

_LogCallback = ctypes.CFUNCTYPE(None, ctypes.c_void_p, ctypes.c_void_p)
_p = ctypes.c_void_p
_s = ctypes.c_char_p
_n = ctypes.c_size_t
_i = ctypes.c_int
_SIGNATURES: dict[str, tuple[object, list[object]]] = {
    "msc_init": (_p, []),
    "msc_set_connector_info": (None, [_p, _s]),
    "msc_set_log_cb": (None, [_p, _LogCallback]),
    "msc_cleanup": (None, [_p]),
    "msc_create_rules_set": (_p, []),
    "msc_rules_add": (_i, [_p, _s, ctypes.POINTER(_s)]),
    "msc_rules_cleanup": (_i, [_p]),
    "msc_new_transaction": (_p, [_p, _p, _p]),
    "msc_process_connection": (_i, [_p, _s, _i, _s, _i]),
    "msc_process_uri": (_i, [_p, _s, _s, _s]),
    "msc_add_n_request_header": (_i, [_p, _s, _n, _s, _n]),
    "msc_process_request_headers": (_i, [_p]),
    "msc_append_request_body": (_i, [_p, _s, _n]),
    "msc_process_request_body": (_i, [_p]),
    "msc_add_n_response_header": (_i, [_p, _s, _n, _s, _n]),
    "msc_process_response_headers": (_i, [_p, _i, _s]),
    "msc_append_response_body": (_i, [_p, _s, _n]),
    "msc_process_response_body": (_i, [_p]),
    "msc_process_logging": (_i, [_p]),
    "msc_transaction_cleanup": (None, [_p]),
}


class WafError(Exception):
    """libmodsecurity or the rules cannot be loaded."""


@dataclass(frozen=True, slots=True)
class RuleHit:
    rule_id: int
    message: str
    severity: str
    tags: tuple[str, ...]
    # What the rule matched, as ModSecurity reports it: raw, to be masked
    # and truncated before it leaves the agent.
    data: str

    @property
    def family(self) -> str:
        """The CRS rule file's number: 942 (SQLi), 941 (XSS), 930 (LFI), ..."""
        return str(self.rule_id)[:3]

    @property
    def evaluation(self) -> bool:
        return self.rule_id in EVALUATION_RULES


@dataclass(slots=True)
class HttpTransaction:
    """What the capture saw of one HTTP/1 exchange; bodies already cut to the cap."""

    client_address: str
    client_port: int
    server_address: str
    server_port: int
    method: str
    uri: str
    version: str = "1.1"
    request_headers: Sequence[tuple[str, str]] = ()
    request_body: bytes = b""
    status: int | None = None
    response_headers: Sequence[tuple[str, str]] = ()
    response_body: bytes = b""


def parse_hit(line: str) -> RuleHit | None:
    """A log-callback line as a :class:`RuleHit`; None for lines without a rule id."""
    rule_id = 0
    msg = data = severity = ""
    tags: list[str] = []
    for key, value in _FIELD.findall(line):
        if key == "id":
            rule_id = int(value) if value.isdigit() else 0
        elif key == "msg":
            msg = value
        elif key == "data":
            data = value
        elif key == "severity":
            severity = SEVERITIES[int(value)] if value.isdigit() and int(value) < 8 else value
        elif key == "tag":
            tags.append(value)
    if not rule_id:
        return None
    return RuleHit(rule_id, msg, severity, tuple(tags), data)


def crs_rules_text(waf: WafConfig, body_limit: int) -> str:
    """The directives that load the CRS in detection-only mode with the policy's settings."""
    lines = [
        "SecRuleEngine DetectionOnly",
        "SecRequestBodyAccess On",
        f"SecRequestBodyLimit {max(body_limit, 1)}",
        "SecRequestBodyLimitAction ProcessPartial",
        "SecResponseBodyAccess On",
        f"SecResponseBodyMimeType {RESPONSE_MIME_TYPES}",
        f"SecResponseBodyLimit {max(body_limit, 1)}",
        "SecResponseBodyLimitAction ProcessPartial",
        "SecAuditEngine Off",
        # The ids crs-setup.conf reserves for these settings; REQUEST-901
        # only fills in defaults for what is still unset.
        'SecAction "id:900000,phase:1,nolog,pass,t:none,'
        f'setvar:tx.paranoia_level={waf.paranoia_level}"',
        'SecAction "id:900110,phase:1,nolog,pass,t:none,'
        f"setvar:tx.inbound_anomaly_score_threshold={waf.inbound_anomaly_threshold},"
        f'setvar:tx.outbound_anomaly_score_threshold={waf.outbound_anomaly_threshold}"',
        f"Include {CRS_SETUP}",
        *_include_if_present(CRS_EXCLUSIONS_BEFORE),
        f"Include {CRS_RULES}/*.conf",
        *_include_if_present(CRS_EXCLUSIONS_AFTER),
    ]
    lines += [f"SecRuleRemoveById {r}" for r in waf.excluded_rules]
    lines += [f'SecRuleRemoveByTag "{t}"' for t in waf.excluded_tags]
    return "\n".join(lines) + "\n"


def _include_if_present(path: Path) -> list[str]:
    # libmodsecurity 3.0.9 does not know IncludeOptional.
    return [f"Include {path}"] if path.is_file() else []


class ModSecurity:
    """One engine with one rule set; :meth:`inspect` may be called from several threads,
    :meth:`close` only once none runs."""

    def __init__(self, rules_text: str, library: str = LIBRARY) -> None:
        try:
            lib = ctypes.CDLL(library)
        except OSError as exc:
            raise WafError(
                f"cannot load {library} ({exc}): apt-get install libmodsecurity3 modsecurity-crs"
            ) from None
        for name, (restype, argtypes) in _SIGNATURES.items():
            fn = getattr(lib, name)
            fn.restype = restype
            fn.argtypes = argtypes
        self._lib = lib
        self._lines: dict[int, list[str]] = {}
        self._tokens = itertools.count(1)
        self._lock = threading.Lock()
        # Kept on the instance: ctypes frees the C thunk with the Python object.
        self._callback = _LogCallback(self._on_log)
        self._msc = lib.msc_init()
        lib.msc_set_connector_info(self._msc, b"flowprobe-agent")
        lib.msc_set_log_cb(self._msc, self._callback)
        self._rules = lib.msc_create_rules_set()
        error = _s()
        loaded = lib.msc_rules_add(self._rules, rules_text.encode(), ctypes.byref(error))
        if loaded < 0:
            # The error string is the library's to free, and 3.0.9 exports no
            # function for it: a few bytes leaked once, on a fatal path.
            detail = (error.value or b"unknown error").decode(errors="replace").strip()
            self.close()
            raise WafError(f"ModSecurity rejected the rules: {detail}")
        self.rules_loaded = int(loaded)

    @classmethod
    def with_crs(cls, waf: WafConfig, body_limit: int) -> ModSecurity:
        if not CRS_SETUP.is_file() or not CRS_RULES.is_dir():
            raise WafError("the OWASP CRS is not installed: apt-get install modsecurity-crs")
        return cls(crs_rules_text(waf, body_limit))

    def _on_log(self, token: int | None, line: int | None) -> None:
        if token is None or line is None:
            return
        sink = self._lines.get(token)
        if sink is not None:
            sink.append(ctypes.string_at(line).decode(errors="replace"))

    def inspect(self, t: HttpTransaction) -> list[RuleHit]:
        """Run every phase over the exchange; the rules that matched, in the order they ran."""
        lib = self._lib
        if not self._rules:
            raise WafError("the engine is closed")
        with self._lock:
            token = next(self._tokens)
            lines: list[str] = []
            self._lines[token] = lines
        tx = lib.msc_new_transaction(self._msc, self._rules, token)
        try:
            lib.msc_process_connection(
                tx,
                t.client_address.encode(),
                t.client_port,
                t.server_address.encode(),
                t.server_port,
            )
            lib.msc_process_uri(tx, t.uri.encode(), t.method.encode(), t.version.encode())
            for key, value in t.request_headers:
                k, v = key.encode(), value.encode()
                lib.msc_add_n_request_header(tx, k, len(k), v, len(v))
            lib.msc_process_request_headers(tx)
            if t.request_body:
                lib.msc_append_request_body(tx, t.request_body, len(t.request_body))
            lib.msc_process_request_body(tx)
            if t.status is not None:
                for key, value in t.response_headers:
                    k, v = key.encode(), value.encode()
                    lib.msc_add_n_response_header(tx, k, len(k), v, len(v))
                lib.msc_process_response_headers(tx, t.status, f"HTTP {t.version}".encode())
                if t.response_body:
                    lib.msc_append_response_body(tx, t.response_body, len(t.response_body))
                lib.msc_process_response_body(tx)
            lib.msc_process_logging(tx)
        finally:
            lib.msc_transaction_cleanup(tx)
            with self._lock:
                del self._lines[token]
        return [hit for hit in map(parse_hit, lines) if hit is not None]

    def close(self) -> None:
        if self._rules:
            self._lib.msc_rules_cleanup(self._rules)
            self._rules = None
        if self._msc:
            self._lib.msc_cleanup(self._msc)
            self._msc = None
