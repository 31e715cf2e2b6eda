"""RFC 8461 (MTA-STS) itself: the TXT record, the policy, MX matching and discovery.

A domain publishes a TXT record at ``_mta-sts.<domain>`` whose ``id`` names the current policy, and
serves the policy over HTTPS at ``https://mta-sts.<domain>/.well-known/mta-sts.txt``. The policy
says whether senders must use TLS (``enforce``), should only report (``testing``) or have no policy
(``none``), and which MX host names a valid certificate must carry.

This module parses both strictly to the RFC's ABNF (parsing is pure: strings in, values out),
reads a policy tolerantly when asked (only defects whose meaning leaves no doubt, each one named
in ``Policy.defects``; see docs/policy-parsing.md), matches MX host names against a policy, and
drives discovery through a resolver and a fetcher that live in their own modules. It knows
nothing of Postfix, caches or sockets. Every failure is one of a small, closed set of errors
that names the domain and chains its cause.
"""

from __future__ import annotations

import enum
import functools
import ipaddress
import re
from dataclasses import dataclass
from dataclasses import field as _field
from typing import Protocol

import idna

from postfix_mtasts import fetch as _fetch
from postfix_mtasts import resolver as _resolver

__all__ = [
    "DEFECTS",
    "MAX_DEFECT_TEXT",
    "MAX_MAX_AGE",
    "MX",
    "DNSError",
    "MTASTSError",
    "Mode",
    "MultipleRecordsError",
    "NoPolicyError",
    "NoRecordError",
    "Policy",
    "PolicyFetchError",
    "PolicySyntaxError",
    "Record",
    "RecordSyntaxError",
    "Result",
    "fetch_policy",
    "get",
    "is_hostname",
    "lookup_record",
    "parse_policy",
    "parse_record",
    "policy_url",
    "printable",
    "printable_defects",
    "tls_report_failure_reason",
    "to_alabel",
]

# RFC 8461 §3.2: "max_age" is capped at 31557600 seconds (about one year).
MAX_MAX_AGE = 31557600

POLICY_PATH = _fetch.POLICY_PATH  # RFC 8461 §3.2


class Mode(enum.StrEnum):
    ENFORCE = "enforce"
    TESTING = "testing"
    NONE = "none"


# --------------------------------------------------------------------------------------------------
# Errors: a closed taxonomy that callers branch on. str(error) is one line a postmaster can read:
# "<domain>: <what went wrong> (<cause>)".


class MTASTSError(Exception):
    """Base of every MTA-STS failure; ``domain`` is the policy domain, ``cause`` the detail."""

    what = "MTA-STS failure"

    def __init__(self, domain: str, cause: str) -> None:
        super().__init__(f"{domain}: {self.what} ({cause})")
        self.domain = domain
        self.cause = cause


class NoRecordError(MTASTSError):
    """The domain publishes no MTA-STS TXT record: it has no policy."""

    what = "no MTA-STS record"


class MultipleRecordsError(MTASTSError):
    """More than one ``v=STSv1`` TXT record: RFC 8461 §3.1 says the domain has no usable record."""

    what = "more than one MTA-STS record"


class DNSError(MTASTSError):
    """A temporary DNS failure (SERVFAIL, timeout, refused): try again later."""

    what = "DNS lookup failed"


class RecordSyntaxError(MTASTSError):
    """The one ``v=STSv1`` TXT record does not follow RFC 8461 §3.1."""

    what = "invalid MTA-STS record"


class PolicyFetchError(MTASTSError):
    """The policy could not be fetched over HTTPS. ``webpki`` is set for certificate failures."""

    what = "policy fetch failed"

    def __init__(self, domain: str, cause: str, *, webpki: bool = False) -> None:
        super().__init__(domain, cause)
        self.webpki = webpki


class NoPolicyError(PolicyFetchError):
    """The policy host answered, but serves no policy (HTTP 404)."""

    what = "no policy served"


class PolicySyntaxError(MTASTSError):
    """The policy was fetched but does not follow RFC 8461 §3.2."""

    what = "invalid policy"


# --------------------------------------------------------------------------------------------------
# Host names.

# RFC 1123 LDH label: letters, digits, hyphens, not starting or ending with a hyphen.
_LABEL = re.compile(r"[a-z0-9](?:[a-z0-9-]{0,61}[a-z0-9])?")


def is_hostname(name: str) -> bool:
    """Whether ``name`` is a lowercase A-label host name (RFC 5321 Domain, no trailing dot).

    Only letters, digits, hyphens and dots can pass, so a name that passes can never carry
    whitespace, ``:``, ``{`` or ``=`` into a Postfix policy string. An all-numeric last label is
    refused: no top-level domain is numeric, so such a name is an IP address, not a host name.
    """
    if not name or len(name) > 253 or not name.isascii():
        return False
    labels = name.split(".")
    if any(_LABEL.fullmatch(label) is None for label in labels):
        return False
    if labels[-1].isdigit():
        return False
    for label in labels:
        # An A-label must decode to a valid U-label (RFC 5890 §2.3.2.1). Other labels with "--"
        # in positions 3 and 4 (R-LDH, e.g. "r3---sn-x") are not IDNA labels, but they are valid
        # RFC 5321 Domain labels and real host names, so they stay allowed.
        if label.startswith("xn--"):
            try:
                idna.decode(label)
            except idna.IDNAError:
                return False
    return True


def to_alabel(domain: str) -> str:
    """The lowercase A-label form of a domain given in any case, as U-labels or A-labels, with or
    without a trailing dot. Raises ``ValueError`` naming the domain when it is not a host name."""
    name = domain.strip()
    if name.endswith("."):
        name = name[:-1]
    if not name.isascii():
        try:
            name = idna.encode(name, uts46=True).decode("ascii")
        except idna.IDNAError as exc:
            raise ValueError(f"{domain!r} is not a valid domain name ({exc})") from exc
    name = name.lower()
    if not is_hostname(name):
        raise ValueError(f"{domain!r} is not a valid domain name")
    return name


# --------------------------------------------------------------------------------------------------
# Values.


@dataclass(frozen=True, slots=True)
class MX:
    """One ``mx`` line of a policy: a host name, or ``*.`` and a host name (``wildcard``)."""

    wildcard: bool
    domain: str

    def __str__(self) -> str:
        return f"*.{self.domain}" if self.wildcard else self.domain

    def matches(self, hostname: str) -> bool:
        """``hostname`` must already be a lowercase A-label without trailing dot."""
        if not self.wildcard:
            return hostname == self.domain
        # RFC 8461 §4.1: the wildcard stands for exactly one, left-most label.
        first, dot, rest = hostname.partition(".")
        return bool(first) and bool(dot) and rest == self.domain


@dataclass(frozen=True, slots=True)
class Record:
    """The ``_mta-sts`` TXT record (RFC 8461 §3.1)."""

    version: str
    id: str
    extensions: tuple[tuple[str, str], ...] = ()

    def to_text(self) -> str:
        """The record as a domain would publish it, ``v=STSv1; id=...``, extensions after the id;
        ``parse_record`` reads it back to an equal Record.

        Why: property tests and fuzzers check that every accepted record re-serialises to itself.
        """
        fields = [f"v={self.version}", f"id={self.id}"]
        fields += [f"{name}={value}" for name, value in self.extensions]
        return "; ".join(fields)


@dataclass(frozen=True, slots=True)
class Policy:
    """A parsed policy (RFC 8461 §3.2). ``mx`` keeps the policy's order.

    ``defects``: what a tolerant reading accepted outside the RFC's grammar, each one of
    :data:`DEFECTS` (a dropped IP address ``mx`` names the address after ": "), in the order found,
    each kind once; empty for a strict reading. Not part of the policy's value: the same policy with
    or without defects compares equal, because it means the same.
    """

    version: str
    mode: Mode
    mx: tuple[MX, ...]
    max_age: int
    extensions: tuple[tuple[str, str], ...] = ()
    defects: tuple[str, ...] = _field(default=(), compare=False)

    def to_text(self) -> str:
        """The policy as a policy host would serve it: one field a line, LF line ends, ``version``,
        ``mode``, the ``mx`` lines in order, ``max_age``, then the extensions in order;
        ``parse_policy`` reads it back to an equal Policy.

        Why: property tests and fuzzers check that every accepted policy re-serialises to itself.
        """
        lines = [f"version: {self.version}", f"mode: {self.mode}"]
        lines += [f"mx: {mx}" for mx in self.mx]
        lines.append(f"max_age: {self.max_age}")
        lines += [f"{name}: {value}" for name, value in self.extensions]
        return "\n".join(lines) + "\n"

    def matches(self, hostname: str) -> bool:
        """Whether an MX host name is allowed by this policy (RFC 8461 §4.1): case-insensitive,
        trailing dot ignored, internationalised names compared as A-labels."""
        try:
            name = to_alabel(hostname)
        except ValueError:
            return False
        return any(mx.matches(name) for mx in self.mx)


@dataclass(frozen=True, slots=True)
class Result:
    """What discovery found for one domain. ``record`` is set whenever the TXT record was valid,
    even when the policy could not be fetched; ``error`` says what stopped discovery."""

    record: Record | None
    policy: Policy | None
    policy_text: str | None
    error: MTASTSError | None
    record_text: str | None = None


# --------------------------------------------------------------------------------------------------
# RFC 8461 §3.1: the TXT record.

_WSP = "[ \t]"
# A record is an STS record only if it starts with the version field and its delimiter.
_RECORD_START = re.compile(rf"v=STSv1{_WSP}*;")
_RECORD_EXT_NAME = re.compile(r"[A-Za-z0-9][A-Za-z0-9_.-]{0,31}")
_RECORD_EXT_VALUE = re.compile(r"[\x21-\x3a\x3c\x3e-\x7e]+")
_RECORD_ID = re.compile(r"[A-Za-z0-9]{1,32}")


def is_sts_record(text: str) -> bool:
    """Whether a TXT record is meant as an MTA-STS record; others are discarded (RFC 8461 §3.1)."""
    return _RECORD_START.match(text) is not None


def parse_record(text: str, domain: str = "") -> Record:
    """Parse one TXT record strictly to the RFC 8461 §3.1 ABNF.

    Raises ``RecordSyntaxError`` (naming ``domain`` when given) for anything else.
    """

    def fail(cause: str) -> RecordSyntaxError:
        return RecordSyntaxError(domain, f"{cause}: {text!r}")

    if not text.startswith("v=STSv1"):
        raise fail('does not start with "v=STSv1"')
    # sts-field-delim = *WSP ";" *WSP: split at ";", then strip the WSP next to each ";". Not a
    # regular expression split: at every WSP not followed by ";" it would scan the whole run of
    # WSP again, quadratic time on a 64 KiB record, on the event loop.
    *heads, tail = text[len("v=STSv1") :].split(";")
    pieces = [head.rstrip(" \t") for head in heads] + [tail]
    pieces[1:] = [piece.lstrip(" \t") for piece in pieces[1:]]
    # Now "" comes first (the record continues with a delimiter right after the version), and ""
    # last when the optional trailing delimiter is present.
    if pieces[0] != "":
        raise fail('"v=STSv1" must be followed by ";"')
    fields = pieces[1:]
    if fields and fields[-1] == "":
        fields.pop()
    if not fields:
        raise fail("no fields after the version")
    record_id: str | None = None
    extensions: list[tuple[str, str]] = []
    for field in fields:
        name, eq, value = field.partition("=")
        if not eq or not name:
            raise fail(f'field {field!r} is not "name=value"')
        if name == "id":
            if _RECORD_ID.fullmatch(value) is None:
                raise fail(f"id {value!r} is not 1 to 32 letters and digits")
            if record_id is None:
                record_id = value
            continue
        if _RECORD_EXT_NAME.fullmatch(name) is None:
            raise fail(f"invalid field name {name!r}")
        if _RECORD_EXT_VALUE.fullmatch(value) is None:
            raise fail(f"invalid value for {name!r}")
        extensions.append((name, value))
    if record_id is None:
        raise fail('no "id" field')
    return Record(version="STSv1", id=record_id, extensions=tuple(extensions))


# --------------------------------------------------------------------------------------------------
# RFC 8461 §3.2: the policy.

_POLICY_KEY = re.compile(r"[A-Za-z0-9][A-Za-z0-9_.-]{0,31}")
# sts-policy-ext-value: visible ASCII or non-ASCII UTF-8, with inner spaces; no tabs inside.
# Surrogates are not UTF-8 (RFC 3629 §3): a str given directly must not carry them in.
_POLICY_VALUE = re.compile(
    r"[^\x00-\x20\x7f\ud800-\udfff]"
    r"(?:[^\x00-\x1f\x7f\ud800-\udfff]*[^\x00-\x20\x7f\ud800-\udfff])?"
)
_MAX_AGE = re.compile(r"[0-9]{1,10}")


# Policies of many domains name the same MX hosts (those of the large mail providers): the most
# recent distinct values each map to one shared MX object, so a cache of many policies holds each
# host name once. MX is immutable, and lru_cache is safe to call from several threads.
_SHARED_MX = 4096


@functools.lru_cache(maxsize=_SHARED_MX)
def _parse_mx(value: str) -> MX:
    wildcard = value.startswith("*.")
    name = value[2:] if wildcard else value
    # RFC 8461 §3.2: A-labels only; anything that is not a host name is refused, so no mx value
    # can carry text into a Postfix policy string later. The characters are judged before the
    # case: str.lower() makes ASCII of some others (KELVIN SIGN becomes "k").
    lowered = name.lower() if name.isascii() else ""
    if not is_hostname(lowered):
        raise ValueError(f"mx {value!r} is not a host name in A-label form")
    return MX(wildcard=wildcard, domain=name if lowered == name else lowered)


def _policy_lines(text: str) -> list[str]:
    # sts-policy-term is LF or CRLF; the last line may end with one terminator or none.
    # A CR counts only as part of CRLF; a stray CR stays in the line and fails the value check.
    lines = text.split("\n")
    last = lines.pop()
    lines = [line[:-1] if line.endswith("\r") else line for line in lines]
    if last:
        lines.append(last)
    return lines


# The defects a tolerant reading accepts: each leaves no doubt about what the policy's operator
# meant (docs/policy-parsing.md gives the reason for each). Mixed LF and CRLF line ends and spaces
# or tabs after a value are not here: RFC 8461's ABNF allows both.
BYTE_ORDER_MARK = "byte-order mark"
CR_LINE_END = "CR line end"
BLANK_LINE = "blank line"
INDENTED_LINE = "indented line"
MX_TRAILING_DOT = "mx with trailing dot"
MX_IP_ADDRESS = "mx is an IP address, dropped"
DEFECTS = (BYTE_ORDER_MARK, CR_LINE_END, BLANK_LINE, INDENTED_LINE, MX_TRAILING_DOT, MX_IP_ADDRESS)

# At most this many characters of defect text (it names a remote domain's IP address mx values)
# go into one log line or query answer.
MAX_DEFECT_TEXT = 200


def printable(text: str | bytes, limit: int = MAX_DEFECT_TEXT) -> str:
    """Text from a remote party (a domain's policy, a server's reply, an error naming either)
    made fit for one log or output line: printable ASCII stays, anything else is written as its
    Python escape (bytes are read as Latin-1 first), and the result is at most ``limit``
    characters, cut between escapes and ended with "..." when shortened."""
    if isinstance(text, bytes):
        text = text.decode("latin-1")
    pieces = [c if " " <= c <= "~" else ascii(c)[1:-1] for c in text]
    if sum(map(len, pieces)) <= limit:
        return "".join(pieces)
    shown: list[str] = []
    room = limit - 3
    for piece in pieces:
        room -= len(piece)
        if room < 0:
            break
        shown.append(piece)
    return "".join(shown) + "..."


def printable_defects(defects: tuple[str, ...], limit: int = MAX_DEFECT_TEXT) -> str:
    """``defects`` as one line safe to log: "; "-joined and :func:`printable`."""
    return printable("; ".join(defects), limit)


def _tolerant_lines(text: str, defects: list[str]) -> list[str]:
    if text.startswith("\ufeff"):
        # A byte-order mark says "this is UTF-8", nothing about the policy.
        text = text[1:]
        defects.append(BYTE_ORDER_MARK)
    if "\r" in text.replace("\r\n", ""):
        # A CR is never part of a key or value (the grammar excludes control characters), so a
        # lone CR can only have been meant as a line end (old Mac OS, or CR CR LF).
        text = text.replace("\r\n", "\n").replace("\r", "\n")
        defects.append(CR_LINE_END)
    lines = []
    for line in _policy_lines(text):
        if not line.strip(" \t"):
            # A blank line carries no field: dropping it loses nothing.
            if BLANK_LINE not in defects:
                defects.append(BLANK_LINE)
            continue
        if line[0] in " \t":
            # A field is one line, so indentation cannot continue an earlier field: it is layout.
            line = line.lstrip(" \t")
            if INDENTED_LINE not in defects:
                defects.append(INDENTED_LINE)
        lines.append(line)
    return lines


def _ip_address(value: str) -> bool:
    try:
        ipaddress.ip_address(
            value[1:-1] if value.startswith("[") and value.endswith("]") else value
        )
    except ValueError:
        return False
    return True


def parse_policy(text: str | bytes, domain: str = "", *, tolerant: bool = False) -> Policy:
    """Parse a policy strictly to the RFC 8461 §3.2 ABNF, or tolerantly (``tolerant``).

    LF and CRLF line ends are accepted, ``max_age`` is capped at one year, and every ``mx`` value
    must be a host name in A-label form (optionally ``*.`` and one). Raises ``PolicySyntaxError``.

    ``tolerant`` also accepts, and names in ``Policy.defects``, the :data:`DEFECTS`: a UTF-8
    byte-order mark, lone CR line ends, blank lines, indented lines and ``mx`` host names with a
    trailing dot; an ``mx`` that is an IP address is dropped. Nothing that could change what the
    policy means is accepted: a policy left without ``mx`` (in a mode other than ``none``), an
    unknown version or mode, a bad ``max_age`` or a bad ``mx`` host name are errors as before, and
    each ``mx`` kept passes the same host-name check as in a strict reading.
    """

    def fail(cause: str) -> PolicySyntaxError:
        return PolicySyntaxError(domain, cause)

    if isinstance(text, bytes):
        try:
            text = text.decode("utf-8")
        except UnicodeDecodeError as exc:
            raise fail(f"not UTF-8 ({exc.reason} at byte {exc.start})") from exc
    if not text:
        raise fail("empty policy")
    defects: list[str] = []
    lines = _tolerant_lines(text, defects) if tolerant else _policy_lines(text)
    if not lines:
        raise fail("no fields, only blank lines")
    first: dict[str, str] = {}
    mx: list[MX] = []
    dropped: list[str] = []
    extensions: list[tuple[str, str]] = []
    for number, line in enumerate(lines, start=1):
        if not line:
            raise fail(f"line {number} is empty")
        key, colon, raw = line.partition(":")
        if not colon:
            raise fail(f'line {number} is not "key: value": {line[:80]!r}')
        if _POLICY_KEY.fullmatch(key) is None:
            raise fail(f"line {number}: invalid key {key[:40]!r}")
        value = raw.strip(" \t")
        if _POLICY_VALUE.fullmatch(value) is None:
            raise fail(f"line {number}: invalid value for {key!r}")
        if key == "mx":
            if tolerant and _ip_address(value):
                # An IP address is never an MX host name; passed on, Postfix would match
                # addresses against it.
                dropped.append(value)
                continue
            if tolerant and value.endswith(".") and not value.endswith(".."):
                # The root label: "mx.example.com." names the same host as "mx.example.com".
                value = value[:-1]
                if MX_TRAILING_DOT not in defects:
                    defects.append(MX_TRAILING_DOT)
            try:
                mx.append(_parse_mx(value))
            except ValueError as exc:
                raise fail(f"line {number}: {exc}") from None
        elif key in ("version", "mode", "max_age"):
            # RFC 8461 §3.2: only "mx" may repeat; for other fields the first one wins.
            first.setdefault(key, value)
        else:
            extensions.append((key, value))
    if dropped:
        defects.append(f"{MX_IP_ADDRESS}: {' '.join(dropped)}")

    version = first.get("version")
    if version is None:
        raise fail('no "version" field')
    if version != "STSv1":
        raise fail(f'version {version!r}, expected "STSv1"')
    mode_text = first.get("mode")
    if mode_text is None:
        raise fail('no "mode" field')
    try:
        mode = Mode(mode_text)  # case-sensitive, like the ABNF's %s strings
    except ValueError:
        raise fail(f'mode {mode_text!r}, expected "enforce", "testing" or "none"') from None
    max_age_text = first.get("max_age")
    if max_age_text is None:
        raise fail('no "max_age" field')
    if _MAX_AGE.fullmatch(max_age_text) is None:
        raise fail(f"max_age {max_age_text!r} is not 1 to 10 digits")
    max_age = min(int(max_age_text), MAX_MAX_AGE)
    if not mx and mode is not Mode.NONE:
        left = " (only IP addresses, which are not host names)" if dropped else ""
        raise fail(f'no "mx" field in a {mode} policy{left}')
    return Policy(
        version="STSv1",  # the constant, not the parsed copy: one string for all
        mode=mode,
        mx=tuple(mx),
        max_age=max_age,
        extensions=tuple(extensions),
        defects=tuple(defects),
    )


# --------------------------------------------------------------------------------------------------
# Discovery (RFC 8461 §3.1 and §3.3) through a resolver and a fetcher.


class TXTResolver(Protocol):
    def txt(self, name: str) -> list[str]: ...


class PolicyFetcher(Protocol):
    def get(self, host: str, path: str = ..., *, ipv4: _resolver.AddressOutcome = ...) -> bytes: ...


def policy_host(domain: str) -> str:
    """The host serving the policy of ``domain`` (an A-label), RFC 8461 §3.2."""
    return f"mta-sts.{domain}"


def policy_url(domain: str) -> str:
    return f"https://{policy_host(domain)}{POLICY_PATH}"


def lookup_record(domain: str, resolver: TXTResolver) -> tuple[Record, str]:
    """Find and parse the one MTA-STS TXT record of ``domain`` (CNAMEs followed by the resolver).

    Returns the record and its text. Raises ``NoRecordError``, ``MultipleRecordsError``,
    ``RecordSyntaxError`` or ``DNSError``.
    """
    domain = to_alabel(domain)
    name = f"_mta-sts.{domain}"
    try:
        texts = resolver.txt(name)
    except _resolver.DNSFailure as exc:
        raise _record_lookup_error(domain, exc) from exc
    return _the_record(domain, name, texts)


async def lookup_record_async(domain: str, resolver: _resolver.Resolver) -> tuple[Record, str]:
    """:func:`lookup_record` on the running asyncio loop (``Resolver.txt_async``)."""
    domain = to_alabel(domain)
    name = f"_mta-sts.{domain}"
    try:
        texts = await resolver.txt_async(name)
    except _resolver.DNSFailure as exc:
        raise _record_lookup_error(domain, exc) from exc
    return _the_record(domain, name, texts)


def _record_lookup_error(domain: str, exc: Exception) -> MTASTSError:
    if isinstance(exc, _resolver.DNSNotFound):
        return NoRecordError(domain, str(exc))
    return DNSError(domain, str(exc))


def _the_record(domain: str, name: str, texts: list[str]) -> tuple[Record, str]:
    # RFC 8461 §3.1: records that do not start with "v=STSv1;" are discarded.
    candidates = [text for text in texts if is_sts_record(text)]
    if not candidates:
        others = f"{len(texts)} TXT record(s), none starting with v=STSv1;"
        raise NoRecordError(domain, f"{name}: {others}")
    if len(candidates) > 1:
        raise MultipleRecordsError(domain, f"{name}: {len(candidates)} records start with v=STSv1")
    text = candidates[0]
    return parse_record(text, domain), text


def fetch_policy(
    domain: str,
    fetcher: PolicyFetcher,
    ipv4: _resolver.AddressOutcome = None,
    *,
    tolerant: bool = False,
) -> tuple[Policy, str]:
    """Fetch and parse the policy of ``domain`` over HTTPS (RFC 8461 §3.3).

    ``ipv4``: the outcome of the policy host's A query when it was already made. ``tolerant``:
    read it as :func:`parse_policy` does with ``tolerant``. Returns the policy and its text as
    served. Raises ``NoPolicyError`` (HTTP 404), ``PolicyFetchError`` or
    ``PolicySyntaxError``.
    """
    domain = to_alabel(domain)
    host = policy_host(domain)
    try:
        body = fetcher.get(host, POLICY_PATH, ipv4=ipv4)
    except _fetch.HTTPStatusError as exc:
        if exc.status == 404:
            raise NoPolicyError(domain, str(exc)) from exc
        raise PolicyFetchError(domain, str(exc)) from exc
    except _fetch.CertificateError as exc:
        raise PolicyFetchError(domain, str(exc), webpki=True) from exc
    except _fetch.FetchError as exc:
        raise PolicyFetchError(domain, str(exc)) from exc
    policy = parse_policy(body, domain, tolerant=tolerant)
    # parse_policy succeeded, so the body is valid UTF-8.
    return policy, body.decode("utf-8")


def get(
    domain: str, resolver: TXTResolver, fetcher: PolicyFetcher, *, tolerant: bool = False
) -> Result:
    """Discover the MTA-STS policy of ``domain``: the TXT record, then the policy (read
    tolerantly with ``tolerant``, as :func:`parse_policy` does).

    Never raises an ``MTASTSError``: the failure is in ``Result.error``, and the record is kept
    when only the policy failed. Raises ``ValueError`` when ``domain`` is not a domain name.
    """
    domain = to_alabel(domain)
    try:
        record, record_text = lookup_record(domain, resolver)
    except MTASTSError as exc:
        return Result(record=None, policy=None, policy_text=None, error=exc)
    try:
        policy, policy_text = fetch_policy(domain, fetcher, tolerant=tolerant)
    except MTASTSError as exc:
        return Result(record, None, None, exc, record_text)
    return Result(record, policy, policy_text, None, record_text)


def tls_report_failure_reason(exc: BaseException) -> str:
    """The RFC 8460 §4.3.1 result type for a discovery failure, or "" when none applies."""
    if isinstance(exc, PolicySyntaxError):
        return "sts-policy-invalid"
    if isinstance(exc, PolicyFetchError):
        return "sts-webpki-invalid" if exc.webpki else "sts-policy-fetch-error"
    return ""
