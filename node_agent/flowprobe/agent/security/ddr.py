"""Sensitive-data detectors (DDR): what kind of sensitive value a text carries, and where.

Every detector is a regular expression for the shape plus, where the data
has one, the check that real values pass: Luhn for card numbers, ISO 13616
mod-97 for IBANs, the SSA's allocation rules for US social security numbers,
a decodable JSON header for JWTs. Shapes that fail the check are not
reported, so order ids and random digit runs do not count as cards.

Values never leave in clear: :func:`mask` replaces each finding with a
category-specific mask that keeps just enough to recognise it (a card's last
four digits, an e-mail's domain).
"""

from __future__ import annotations

import base64
import binascii
import bisect
import json
import re
from collections.abc import Callable
from dataclasses import dataclass

CARD, IBAN, EMAIL, PHONE, NATIONAL_ID = "card", "iban", "email", "phone", "national_id"
JWT, API_KEY, PRIVATE_KEY, PASSWORD = "jwt", "api_key", "private_key", "password"
CATEGORIES = (CARD, IBAN, EMAIL, PHONE, NATIONAL_ID, JWT, API_KEY, PRIVATE_KEY, PASSWORD)


@dataclass(frozen=True, slots=True)
class Finding:
    category: str
    start: int
    end: int
    masked: str


def luhn_ok(digits: str) -> bool:
    total = 0
    for i, ch in enumerate(reversed(digits)):
        d = ord(ch) - 48
        if i % 2:
            d = d * 2 - 9 if d > 4 else d * 2
        total += d
    return total % 10 == 0


# ISO 13616 lengths of the countries most traffic will carry; others are
# accepted at any length the standard allows (15..34) if the checksum holds.
_IBAN_LENGTHS = {
    "AT": 20, "BE": 16, "CH": 21, "CZ": 24, "DE": 22, "DK": 18, "ES": 24, "FI": 18,
    "FR": 27, "GB": 22, "IE": 22, "IT": 27, "LU": 20, "NL": 18, "NO": 15, "PL": 28,
    "PT": 25, "SE": 24,
}  # fmt: skip


def iban_ok(iban: str) -> bool:
    expected = _IBAN_LENGTHS.get(iban[:2])
    if (expected is not None and len(iban) != expected) or not 15 <= len(iban) <= 34:
        return False
    rearranged = iban[4:] + iban[:4]
    number = "".join(str(int(ch, 36)) for ch in rearranged)
    return int(number) % 97 == 1


def ssn_ok(area: str, group: str, serial: str) -> bool:
    """SSA rules: no 000, 666 or 9xx area, no 00 group, no 0000 serial."""
    return area not in ("000", "666") and area[0] != "9" and group != "00" and serial != "0000"


def _jwt_ok(token: str) -> bool:
    header = token.split(".", 1)[0]
    try:
        decoded = json.loads(base64.urlsafe_b64decode(header + "=" * (-len(header) % 4)))
    except (ValueError, binascii.Error):
        return False
    return isinstance(decoded, dict) and "alg" in decoded


def _digits(text: str) -> str:
    return "".join(ch for ch in text if ch.isdigit())


def _keep_last(value: str, n: int) -> str:
    return "*" * max(len(value) - n, 0) + value[-n:]


@dataclass(frozen=True, slots=True)
class Detector:
    """A shape (``pattern``), the check real values pass (``valid``) and the mask.

    Python's regular expressions cost tens of nanoseconds per character when
    a pattern does not start with a literal, so each detector also names a
    cheap pre-test done with C string search: ``needles`` (one must occur,
    compared in lower case) or ``digits`` (a run of four digits must occur).
    """

    category: str
    pattern: re.Pattern[str]
    mask: Callable[[re.Match[str]], str]
    valid: Callable[[re.Match[str]], bool] | None = None
    needles: tuple[str, ...] = ()
    digits: bool = False


# Patterns start with a character class, and the "not glued to a word" test
# comes after it: a leading look-behind or alternation would switch off the
# engine's fast skip to candidate characters (ten times slower, measured).
_START = r"(?:(?<=^.)|(?<![\w-].))"
_CARD = re.compile(rf"[2-6]{_START}\d{{3}}(?:[ -]?\d){{9,15}}(?![\w-])")
# Compact, or printed in groups of four.
_IBAN = re.compile(
    rf"[A-Z]{_START}[A-Z]\d{{2}}(?:[A-Z0-9]{{11,30}}|(?: [A-Z0-9]{{4}}){{2,7}}(?: [A-Z0-9]{{1,3}})?)\b"
)
_EMAIL = re.compile(r"@[A-Za-z0-9-]+(?:\.[A-Za-z0-9-]+)*\.[A-Za-z]{2,24}\b")
_EMAIL_LOCAL = re.compile(r"[A-Za-z0-9._%+-]{1,64}$")
# International form only (+ and a country code), or the North American
# (NXX) NXX-XXXX: bare digit runs are ids far more often than phones.
_PHONE = re.compile(
    r"\+(?<![\w+]\+)[1-9]\d{0,2}[ .-]?(?:\(\d{1,4}\)[ .-]?)?\d{1,4}(?:[ .-]?\d{2,4}){2,4}(?!\w)"
    r"|\((?<!\w\()\d{3}\) ?\d{3}-\d{4}(?!\w)"
)
_SSN = re.compile(rf"\d{_START}\d\d-\d\d-\d{{4}}(?![\w-])")
_JWT = re.compile(r"eyJ[A-Za-z0-9_-]{5,}\.eyJ[A-Za-z0-9_-]{5,}\.[A-Za-z0-9_-]*")
_API_KEY_PREFIXES = (
    "AKIA",  # AWS access key id
    "ASIA",  # AWS temporary access key id
    "ghp_", "gho_", "ghu_", "ghs_", "ghr_", "github_pat_",  # GitHub
    "glpat-",  # GitLab
    "xoxa-", "xoxb-", "xoxp-", "xoxr-", "xoxs-",  # Slack
    "sk_live_", "rk_live_",  # Stripe
    "AIza",  # Google
    "sk-",  # OpenAI
)  # fmt: skip
_API_KEY = re.compile(
    r"(?:AKIA|ASIA)[0-9A-Z]{16}\b"
    r"|gh[pousr]_[A-Za-z0-9]{36}\b"
    r"|github_pat_[A-Za-z0-9_]{60,}"
    r"|glpat-[A-Za-z0-9_-]{20}\b"
    r"|xox[abprs]-[A-Za-z0-9-]{10,}"
    r"|[sr]k_live_[A-Za-z0-9]{24,}"
    r"|AIza[0-9A-Za-z_-]{35}"
    r"|sk-(?:proj-)?[A-Za-z0-9_-]{32,}"
)
_PRIVATE_KEY = re.compile(
    r"-----BEGIN (?:[A-Z]+ )?PRIVATE KEY-----(?:[^-]{0,8192}-----END [A-Z ]*PRIVATE KEY-----)?"
)
_SECRET_NAMES = (
    "password", "passwd", "pwd", "passphrase", "secret", "client_secret", "api_key", "apikey",
    "access_token",
)  # fmt: skip
_NAMES = "|".join(_SECRET_NAMES)
_PASSWORD = re.compile(
    rf"(?i)(?<![\w])({_NAMES})=([^&\s\"']+)"  # query string, form
    rf"|\"({_NAMES})\"\s*:\s*\"((?:[^\"\\]|\\.)+)\""  # JSON
)


def _password_mask(m: re.Match[str]) -> str:
    if m.group(1) is not None:
        return f"{m.group(1)}=****"
    return f'"{m.group(3)}":"****"'


def _iban_mask(m: re.Match[str]) -> str:
    compact = m.group().replace(" ", "")
    return compact[:2] + _keep_last(compact[2:], 4)


def _api_key_mask(m: re.Match[str]) -> str:
    token = m.group()
    cut = next((i + 1 for i, ch in enumerate(token[:12]) if ch in "_-"), 4)
    return token[:cut] + "****"


def _email_ok(m: re.Match[str]) -> bool:
    return _EMAIL_LOCAL.search(m.string, max(0, m.start() - 64), m.start()) is not None


def _email_mask(m: re.Match[str]) -> str:
    local = _EMAIL_LOCAL.search(m.string, max(0, m.start() - 64), m.start())
    return f"{local.group()[:1] if local else ''}***{m.group()}"


def _card_ok(m: re.Match[str]) -> bool:
    digits = _digits(m.group())
    return 13 <= len(digits) <= 19 and luhn_ok(digits)


DETECTORS: tuple[Detector, ...] = (
    Detector(
        PRIVATE_KEY,
        _PRIVATE_KEY,
        lambda m: "-----BEGIN PRIVATE KEY-----****",
        needles=("private key",),
    ),
    Detector(JWT, _JWT, lambda m: "eyJ****", lambda m: _jwt_ok(m.group()), needles=("eyj",)),
    Detector(
        API_KEY, _API_KEY, _api_key_mask, needles=tuple({p.lower() for p in _API_KEY_PREFIXES})
    ),
    Detector(PASSWORD, _PASSWORD, _password_mask, needles=_SECRET_NAMES),
    Detector(EMAIL, _EMAIL, _email_mask, _email_ok, needles=("@",)),
    Detector(IBAN, _IBAN, _iban_mask, lambda m: iban_ok(m.group().replace(" ", "")), digits=True),
    Detector(
        NATIONAL_ID,
        _SSN,
        lambda m: "***-**-" + m.group()[-4:],
        lambda m: ssn_ok(*m.group().split("-")),
        digits=True,
    ),
    Detector(CARD, _CARD, lambda m: _keep_last(_digits(m.group()), 4), _card_ok, digits=True),
    Detector(
        PHONE,
        _PHONE,
        lambda m: _keep_last(_digits(m.group()), 2),
        lambda m: 8 <= len(_digits(m.group())) <= 15,
        # Grouped in twos (+33 1 42 68 53 00) a phone has no run of four digits.
        needles=("+", "("),
    ),
)
# Every digit becomes 0, so "0000" in the result means a run of four digits.
_ZERO_DIGITS = str.maketrans("123456789", "000000000")


class Scanner:
    """Finds the configured categories in text; overlapping findings go to the first detector."""

    def __init__(self, categories: tuple[str, ...] = ()) -> None:
        unknown = set(categories) - set(CATEGORIES)
        if unknown:
            raise ValueError(
                f"unknown sensitive-data categories {sorted(unknown)}; known: {', '.join(CATEGORIES)}"
            )
        wanted = set(categories or CATEGORIES)
        self.detectors = tuple(d for d in DETECTORS if d.category in wanted)

    def scan(self, text: str) -> list[Finding]:
        found: list[Finding] = []
        # Spans already claimed, disjoint, so sorted by start and by end alike:
        # an overlap test is a bisection (rows of many findings stay linear).
        starts: list[int] = []
        ends: list[int] = []
        lower = text.lower()
        digits = "0000" in text.translate(_ZERO_DIGITS)
        for d in self.detectors:
            if (d.digits and not digits) or (d.needles and not any(n in lower for n in d.needles)):
                continue
            for m in d.pattern.finditer(text):
                start, end = m.span()
                at = bisect.bisect_right(ends, start)
                if at < len(starts) and starts[at] < end:
                    continue
                if d.valid is not None and not d.valid(m):
                    continue
                if d.category == EMAIL:
                    local = _EMAIL_LOCAL.search(text, max(0, start - 64), start)
                    # Not back into a span claimed before (it stays disjoint).
                    if local and (at == 0 or ends[at - 1] <= local.start()):
                        start = local.start()
                starts.insert(at, start)
                ends.insert(at, end)
                found.append(Finding(d.category, start, end, d.mask(m)))
        found.sort(key=lambda f: f.start)
        return found


_MASK_ALL = Scanner()


def mask(text: str, findings: list[Finding] | None = None) -> str:
    """``text`` with every sensitive value (of any category) replaced by its mask."""
    if findings is None:
        findings = _MASK_ALL.scan(text)
    out: list[str] = []
    pos = 0
    for f in findings:
        out.append(text[pos : f.start])
        out.append(f.masked)
        pos = f.end
    out.append(text[pos:])
    return "".join(out)
