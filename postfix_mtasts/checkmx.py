"""``query --check-mx``: probe a domain's MX hosts and say what Postfix will do with our answer.

"Why does Postfix defer mail to this domain?" is answered by looking where Postfix looks: for each
MX host (RFC 5321 §5.1: the domain itself when it has no MX records), each of its addresses is
asked the way Postfix's smtp client asks it, up to the TLS handshake and no further (EHLO,
STARTTLS, EHLO, QUIT: never MAIL FROM, RCPT or DATA). What the server presents is then judged
twice:

- by RFC 8461: is the MX host listed in the policy (§4.1), does its certificate chain to the
  configured CA store and carry the MX host name as a DNS-ID, with a wildcard only as the whole
  left-most label (§4.2);
- by Postfix, given the answer the daemon would give it (``postfix.policy_reply`` or the DANE
  answer): ``secure match=P`` needs a verified chain and a certificate name matching one of P by
  Postfix's own rule (``.example.net`` matches any depth); ``dane``/``dane-only`` need a usable
  TLSA record of ``_25._tcp.HOST`` matching the chain presented; ``may`` and ``NOTFOUND`` deliver
  with whatever TLS the server offers; ``TEMP`` defers.

The checks are our own, with Python's ssl (OpenSSL, as Postfix) rather than posttls-finger, so
that every lookup goes through the configured resolver; tests/test_check_mx.py shows that
posttls-finger reaches the same verdict on the same servers, case by case.

Every probe is bounded: the connection, each read and the handshake get what is left of one
deadline per address; a reply is read up to ``MAX_LINE`` bytes a line and ``MAX_LINES`` lines.
Text from the remote side is shown only through :func:`printable`.
"""

from __future__ import annotations

import datetime
import hashlib
import ipaddress
import itertools
import socket
import ssl
import time
from collections.abc import Callable, Sequence
from dataclasses import asdict, dataclass, field
from typing import Any

from cryptography import x509
from cryptography.exceptions import InvalidSignature
from cryptography.hazmat.primitives import serialization

from postfix_mtasts import mtasts
from postfix_mtasts.dane import DaneResult, tlsa_usable
from postfix_mtasts.fetch import is_public
from postfix_mtasts.mtasts import Policy, is_hostname
from postfix_mtasts.resolver import DNSFailure, DNSNotFound, DNSTemporaryError, Resolver

__all__ = [
    "AddressProbe",
    "DomainCheck",
    "HostCheck",
    "check_domain",
    "postfix_name_match",
    "printable",
    "rfc8461_name_match",
]

SMTP_PORT = 25
# The deadline of one address's probe; one MX host gets at most HOST_TIMEOUTS of them in all.
DEFAULT_TIMEOUT = 30.0
HOST_TIMEOUTS = 2
# MX hosts probed per domain, in order of preference: the rest are listed, not probed, so a
# domain publishing hundreds of MX records cannot hold the probe for hours.
MAX_HOSTS = 10
# Addresses probed per MX host, a bound of ours (Postfix's smtp_mx_address_limit, default 5,
# caps the addresses it tries for the whole domain).
MAX_ADDRESSES = 5
# RFC 5321 §4.5.3.1.5: a reply line is at most 512 octets, CRLF included; a little slack for
# servers that overstep it, no more.
MAX_LINE = 1024
# Lines of one multi-line reply (an EHLO reply lists a few dozen extensions at most).
MAX_LINES = 100
# Remote text shown to the user: at most this many characters.
MAX_SHOWN = 200

# What Postfix does with the mail for one MX host (or one address).
DELIVER = "deliver"
DEFER = "defer"
UNREACHABLE = "unreachable"  # no SMTP conversation: Postfix tries the next address or MX host
NOT_PROBED = "not-probed"

# Exit statuses of `query --check-mx`: the worst over the domains.
EXIT_ALL_DELIVER = 0
EXIT_SOME_NOT = 1
EXIT_TEMPORARY = 2


class ProbeError(Exception):
    """One step of an SMTP probe failed; the message says which and why."""


def printable(text: str | bytes, limit: int = MAX_SHOWN) -> str:
    """Remote text made safe to print (:func:`postfix_mtasts.mtasts.printable`), at most
    ``limit`` characters."""
    return mtasts.printable(text, limit)


# --------------------------------------------------------------------------------------------------
# Names.


def rfc8461_name_match(names: Sequence[str], host: str) -> bool:
    """Whether a certificate's DNS-IDs carry the MX host name (RFC 8461 §4.2, RFC 6125 §6.4.3):
    exact, or ``*.`` standing for exactly the whole left-most label."""
    host = host.rstrip(".").lower()
    for name in names:
        name = name.rstrip(".").lower()
        if name == host:
            return True
        if name.startswith("*."):
            first, dot, rest = host.partition(".")
            if first and dot and rest == name[2:]:
                return True
    return False


def postfix_name_match(names: Sequence[str], patterns: Sequence[str]) -> bool:
    """Whether Postfix's ``secure match=`` accepts a certificate with these names: a pattern
    ``example.net`` matches that name exactly, ``.example.net`` any name below it at any depth
    (TLS_README); a certificate name ``*.example.net`` matches a pattern of one label more."""
    for name in (n.rstrip(".").lower() for n in names):
        for pattern in (p.lower() for p in patterns):
            if pattern.startswith("."):
                if len(name) > len(pattern) and name.endswith(pattern):
                    return True
            elif name == pattern or (
                name.startswith("*.") and pattern.partition(".")[2] == name[2:]
            ):
                return True
    return False


def _certificate_names(cert: x509.Certificate) -> tuple[list[str], bool]:
    """(DNS names, whether they came from the subjectAltName): the DNS-IDs, or the subject's
    common names when there is no subjectAltName (Postfix's fallback; RFC 8461 allows none)."""
    try:
        san = cert.extensions.get_extension_for_class(x509.SubjectAlternativeName)
    except x509.ExtensionNotFound:
        common = cert.subject.get_attributes_for_oid(x509.NameOID.COMMON_NAME)
        return [str(c.value) for c in common], False
    return [str(n) for n in san.value.get_values_for_type(x509.DNSName)], True


# --------------------------------------------------------------------------------------------------
# What a probe finds.


@dataclass
class CertificateInfo:
    subject_names: list[str]
    names_from_san: bool
    issuer: str
    not_after: str
    verified: bool
    verify_error: str
    matches_mx_host: bool  # RFC 8461 §4.2
    matches_postfix_patterns: bool | None  # secure match=..., None without a secure answer


@dataclass
class TlsaCheck:
    state: str  # the DANE state of the host (dane.HostDane), or "" when not looked up
    records: list[str]
    matched: str  # the record that matched the chain presented, "" when none did
    secure: bool


@dataclass
class AddressProbe:
    address: str
    postfix: str = UNREACHABLE
    reason: str = ""
    banner: str = ""
    starttls: bool | None = None
    tls_version: str = ""
    cipher: str = ""
    certificate: CertificateInfo | None = None
    tlsa: TlsaCheck | None = None
    error: str = ""
    chain: list[bytes] = field(default_factory=list, repr=False)


@dataclass
class HostCheck:
    host: str
    preference: int | None
    in_policy: bool | None  # RFC 8461 §4.1; None without a policy
    postfix: str = UNREACHABLE
    reason: str = ""
    addresses: list[AddressProbe] = field(default_factory=list)
    error: str = ""


@dataclass
class DomainCheck:
    domain: str
    postfix_answer: str
    mx_source: str  # "mx", "implicit" (no MX records) or "null-mx"
    policy_mode: str | None = None  # the MTA-STS policy's mode, None without a policy
    policy_mx: list[str] = field(default_factory=list)
    dane: str | None = None  # the DANE verdict's state, None when DANE is not checked
    hosts: list[HostCheck] = field(default_factory=list)
    error: str = ""
    temporary: bool = False

    def status(self) -> int:
        if self.temporary:
            return EXIT_TEMPORARY
        if self.hosts and all(h.postfix == DELIVER for h in self.hosts):
            return EXIT_ALL_DELIVER
        return EXIT_SOME_NOT

    def to_json(self) -> dict[str, Any]:
        data = asdict(self)
        del data["temporary"]
        for host in data["hosts"]:
            for probe in host["addresses"]:
                del probe["chain"]
        data["exit_status"] = self.status()
        return data


# --------------------------------------------------------------------------------------------------
# The SMTP conversation, bounded.


class _Conversation:
    """One SMTP client connection whose every step is bounded by one deadline."""

    def __init__(self, address: str, port: int, deadline: float) -> None:
        self.deadline = deadline
        self.buffer = b""
        try:
            self.sock: socket.socket | ssl.SSLSocket = socket.create_connection(
                (address, port), timeout=self._left("connect")
            )
        except TimeoutError as exc:
            raise ProbeError("connect: timed out") from exc
        except OSError as exc:
            raise ProbeError(f"connect: {exc.strerror or exc}") from exc

    def _left(self, step: str) -> float:
        left = self.deadline - time.monotonic()
        if left <= 0:
            raise ProbeError(f"{step}: deadline passed")
        return left

    def reply(self, step: str) -> tuple[int, list[str]]:
        """One reply: its code and its lines' text (RFC 5321 §4.2), bounded in size and time."""
        lines: list[str] = []
        while True:
            line = self._line(step)
            if len(line) < 3 or not line[:3].isdigit() or line[3:4] not in (b"", b" ", b"-"):
                raise ProbeError(f"{step}: not an SMTP reply: {printable(line)}")
            lines.append(printable(line[4:]))
            if line[3:4] != b"-":
                return int(line[:3]), lines
            if len(lines) >= MAX_LINES:
                raise ProbeError(f"{step}: reply of more than {MAX_LINES} lines")

    def _line(self, step: str) -> bytes:
        while b"\n" not in self.buffer:
            if len(self.buffer) > MAX_LINE:
                raise ProbeError(f"{step}: reply line longer than {MAX_LINE} bytes")
            self.sock.settimeout(self._left(step))
            try:
                chunk = self.sock.recv(4096)
            except TimeoutError as exc:
                raise ProbeError(f"{step}: no reply in time") from exc
            except OSError as exc:
                raise ProbeError(f"{step}: {exc.strerror or exc}") from exc
            if not chunk:
                raise ProbeError(f"{step}: connection closed by the server")
            self.buffer += chunk
        line, _, self.buffer = self.buffer.partition(b"\n")
        if len(line) > MAX_LINE:
            raise ProbeError(f"{step}: reply line longer than {MAX_LINE} bytes")
        return line.rstrip(b"\r")

    def send(self, command: str) -> None:
        self.sock.settimeout(self._left(command))
        try:
            self.sock.sendall(command.encode("ascii") + b"\r\n")
        except OSError as exc:
            raise ProbeError(f"{command}: {exc.strerror or exc}") from exc

    def starttls(self, context: ssl.SSLContext, server_name: str) -> None:
        if self.buffer:
            # Plain text after the 220 would be read as if it came over TLS (cf. CVE-2011-0411).
            raise ProbeError("STARTTLS: the server sent data before the TLS handshake")
        self.sock.settimeout(self._left("TLS handshake"))
        try:
            self.sock = context.wrap_socket(self.sock, server_hostname=server_name)
        except TimeoutError as exc:
            raise ProbeError("TLS handshake: no answer in time") from exc
        except ssl.SSLCertVerificationError:
            raise
        except (ssl.SSLError, OSError) as exc:
            raise ProbeError(f"TLS handshake: {printable(str(exc))}") from exc

    def close(self) -> None:
        try:
            if self.sock.fileno() >= 0:
                self.sock.settimeout(1.0)
                self.sock.sendall(b"QUIT\r\n")
        except OSError:
            pass
        self.sock.close()


@dataclass
class _Session:
    """What an SMTP probe saw; ``starttls`` is None until the EHLO reply came."""

    banner: str = ""
    starttls: bool | None = None
    tls_version: str = ""
    cipher: str = ""
    chain: list[bytes] = field(default_factory=list)


def _smtp_session(
    session: _Session,
    address: str,
    port: int,
    host: str,
    context: ssl.SSLContext,
    deadline: float,
    ehlo_name: str,
) -> None:
    """Banner, EHLO, STARTTLS, TLS handshake, EHLO again, QUIT, noting in ``session`` what the
    server said. Raises ProbeError, or ssl.SSLCertVerificationError when ``context`` verifies
    and the chain does not."""
    conversation = _Conversation(address, port, deadline)
    try:
        code, lines = conversation.reply("banner")
        banner = lines[0] if lines else ""
        if code != 220:
            raise ProbeError(f"banner: {code} {banner}")
        session.banner = banner
        conversation.send(f"EHLO {ehlo_name}")
        code, lines = conversation.reply("EHLO")
        if code != 250:
            raise ProbeError(f"EHLO: {code} {lines[0] if lines else ''}")
        session.starttls = any(line.upper().split(" ")[0] == "STARTTLS" for line in lines[1:])
        if not session.starttls:
            return
        conversation.send("STARTTLS")
        code, lines = conversation.reply("STARTTLS")
        if code != 220:
            raise ProbeError(f"STARTTLS: {code} {lines[0] if lines else ''}")
        conversation.starttls(context, host)
        tls = conversation.sock
        assert isinstance(tls, ssl.SSLSocket)
        session.tls_version = tls.version() or ""
        cipher = tls.cipher()
        session.cipher = cipher[0] if cipher else ""
        session.chain = _presented_chain(tls)
        # RFC 3207 §4.2: the client must forget what it knew and ask again.
        conversation.send(f"EHLO {ehlo_name}")
        conversation.reply("EHLO after STARTTLS")
    finally:
        conversation.close()


def _presented_chain(tls: ssl.SSLSocket) -> list[bytes]:
    """The certificates the server sent, leaf first (DER). Python 3.13 names it
    get_unverified_chain(); older versions have it on the internal object only."""
    getter = getattr(tls, "get_unverified_chain", None) or getattr(
        getattr(tls, "_sslobj", None), "get_unverified_chain", None
    )
    if getter is not None:
        der = ssl._ssl.ENCODING_DER  # type: ignore[attr-defined]
        return [c if isinstance(c, bytes) else c.public_bytes(der) for c in getter() or []]
    leaf = tls.getpeercert(binary_form=True)
    return [leaf] if leaf else []


# --------------------------------------------------------------------------------------------------
# The verdicts.


def _tlsa_matches(chain: Sequence[bytes], records: Sequence[Any], host: str) -> str:
    """The first usable TLSA record that the chain presented satisfies, as text, or "".

    DANE-EE (3) pins the leaf itself: no name, no dates (RFC 7672 §3.1.1). DANE-TA (2) pins a
    trust anchor the server sent: the leaf must chain to it, be within its dates and carry the
    MX host name (§3.1.2, §3.2.2)."""
    certs = [x509.load_der_x509_certificate(der) for der in chain]
    for record in records:
        usage, selector, mtype, data = (
            record.usage,
            record.selector,
            record.mtype,
            bytes(record.cert),
        )
        if not tlsa_usable(usage, selector, mtype, data):
            continue
        candidates = certs[:1] if usage == 3 else certs[1:]
        for index, cert in enumerate(candidates, start=0 if usage == 3 else 1):
            if selector == 0:
                blob = cert.public_bytes(serialization.Encoding.DER)
            else:
                blob = cert.public_key().public_bytes(
                    serialization.Encoding.DER, serialization.PublicFormat.SubjectPublicKeyInfo
                )
            digest = {0: blob, 1: hashlib.sha256(blob).digest(), 2: hashlib.sha512(blob).digest()}
            if digest[mtype] != data:
                continue
            if usage == 2 and not _chains_to(certs, index, host):
                continue
            return f"{usage} {selector} {mtype} {data.hex()[:16]}..."
    return ""


def _chains_to(certs: Sequence[x509.Certificate], anchor: int, host: str) -> bool:
    now = datetime.datetime.now(datetime.UTC)
    leaf = certs[0]
    if not leaf.not_valid_before_utc <= now <= leaf.not_valid_after_utc:
        return False
    names, _ = _certificate_names(leaf)
    if not rfc8461_name_match(names, host):
        return False
    try:
        for child, parent in itertools.pairwise(certs[: anchor + 1]):
            child.verify_directly_issued_by(parent)
    except (ValueError, TypeError, InvalidSignature):
        return False
    return True


def _match_patterns(answer: str) -> list[str] | None:
    """The ``match=`` list of a ``secure`` answer, None for any other answer."""
    words = answer.split()
    if words[:2] != ["OK", "secure"]:
        return None
    for word in words[2:]:
        if word.startswith("match="):
            return word[len("match=") :].split(":")
    return ["nexthop", "dot-nexthop"]


def _judge(
    probe: AddressProbe,
    session: _Session | None,
    answer: str,
    host_dane: str,
    verify_error: str,
) -> None:
    """Set probe.postfix and probe.reason from what the probe found and our answer."""
    level = answer.split()[1] if answer.startswith("OK ") and len(answer.split()) > 1 else ""
    if answer.startswith("TEMP"):
        probe.postfix, probe.reason = DEFER, "our answer is TEMP -> Postfix defers"
        return
    if session is None:
        probe.postfix = UNREACHABLE
        probe.reason = f"{probe.error} -> Postfix tries the next address or MX host"
        return
    # The level and its match= list say what Postfix checks; the other attributes do not.
    shown = " ".join(w for w in answer.split()[1:] if w == level or w.startswith("match="))
    shown = shown or answer.strip()
    if level in ("secure", "dane-only") or (level == "dane" and host_dane == "usable"):
        if not session.starttls:
            probe.postfix, probe.reason = DEFER, f"{shown}: STARTTLS not offered -> Postfix defers"
            return
        if probe.error:
            probe.postfix, probe.reason = DEFER, f"{shown}: {probe.error} -> Postfix defers"
            return
    if level == "secure":
        cert = probe.certificate
        if cert is None:
            why = "no certificate presented"
        elif not cert.verified:
            why = f"certificate not trusted ({verify_error})"
        elif not cert.matches_postfix_patterns:
            why = "certificate name mismatch"
        else:
            probe.postfix, probe.reason = DELIVER, f"{shown}: certificate verified -> delivers"
            return
        probe.postfix, probe.reason = DEFER, f"{shown}: {why} -> Postfix defers"
        return
    if level == "dane-only" or (level == "dane" and host_dane in ("usable", "unusable")):
        tlsa = probe.tlsa
        if tlsa is not None and tlsa.matched:
            probe.postfix = DELIVER
            probe.reason = f"{shown}: TLSA {tlsa.matched} matches -> delivers"
        elif host_dane == "unusable" and level == "dane":
            # RFC 7672 §2.2: validated but unusable TLSA still obliges (unauthenticated) TLS.
            if session.starttls and not probe.error:
                probe.postfix, probe.reason = (
                    DELIVER,
                    f"{shown}: TLSA unusable, encrypted -> delivers",
                )
            else:
                probe.postfix, probe.reason = DEFER, f"{shown}: TLSA unusable, no TLS -> defers"
        else:
            why = "no usable TLSA record" if host_dane != "usable" else "no TLSA record matches"
            probe.postfix, probe.reason = DEFER, f"{shown}: {why} -> Postfix defers"
        return
    # may, NOTFOUND (Postfix's own smtp_tls_security_level, usually may), dane without TLSA.
    how = f"TLS {session.tls_version}" if session.tls_version else "without TLS"
    if session.starttls and probe.error:
        how = "TLS failed, Postfix retries in plain text"
    probe.postfix = DELIVER
    probe.reason = f"{shown}: opportunistic, certificate not checked -> delivers ({how})"


# --------------------------------------------------------------------------------------------------
# The check.


def _mx_hosts(domain: str, resolver: Resolver) -> tuple[str, list[tuple[int | None, str]]]:
    answer = resolver.secure_query(domain, "MX")
    if answer.nxdomain:
        raise DNSNotFound(f"{domain} MX: no such domain")
    if not answer.exists:
        return "implicit", [(None, domain)]
    exchanges = sorted(
        (r.preference, r.exchange.to_text().rstrip(".").lower()) for r in answer.records
    )
    if len(exchanges) == 1 and exchanges[0][1] == "":
        return "null-mx", []
    return "mx", [(pref, host) for pref, host in exchanges if host]


def _verify_context(ca_file: str) -> ssl.SSLContext:
    context = ssl.SSLContext(ssl.PROTOCOL_TLS_CLIENT)
    # Names are judged below, twice (RFC 8461 and Postfix's match=), so OpenSSL checks the chain.
    context.check_hostname = False
    context.verify_mode = ssl.CERT_REQUIRED
    if ca_file:
        context.load_verify_locations(cafile=ca_file)
    else:
        context.load_default_certs(ssl.Purpose.SERVER_AUTH)
    return context


def _open_context() -> ssl.SSLContext:
    context = ssl.SSLContext(ssl.PROTOCOL_TLS_CLIENT)
    context.check_hostname = False
    context.verify_mode = ssl.CERT_NONE
    return context


def check_domain(
    domain: str,
    resolver: Resolver,
    *,
    answer: str,
    policy: Policy | None,
    dane_verdict: DaneResult | None,
    ca_file: str = "",
    allow_private_addresses: bool = False,
    timeout: float = DEFAULT_TIMEOUT,
    port: int = SMTP_PORT,
    ehlo_name: str = "",
) -> DomainCheck:
    """Probe every MX host of ``domain`` and judge it against ``answer`` (the daemon's reply to
    Postfix). ``timeout`` bounds the probe of one address from connect to QUIT, and twice it
    the probes of one MX host; at most ``MAX_HOSTS`` MX hosts and ``MAX_ADDRESSES`` addresses of
    each are probed."""
    check = DomainCheck(domain, answer, "mx")
    if policy is not None:
        check.policy_mode, check.policy_mx = policy.mode.value, [str(mx) for mx in policy.mx]
    if dane_verdict is not None:
        check.dane = dane_verdict.state.value
    try:
        check.mx_source, exchanges = _mx_hosts(domain, resolver)
    except DNSTemporaryError as exc:
        check.error, check.temporary = f"{domain}: MX lookup failed: {exc}", True
        return check
    except DNSFailure as exc:
        check.error = f"{domain}: {exc}"
        return check
    if check.mx_source == "null-mx":
        check.error = f"{domain}: null MX (RFC 7505): the domain accepts no mail"
        return check
    patterns = _match_patterns(answer)
    dane_hosts = {h.host: h.state for h in dane_verdict.hosts} if dane_verdict else {}
    ehlo = (ehlo_name or socket.getfqdn()).lower()
    if not is_hostname(ehlo):
        # EHLO takes a domain (RFC 5321 §4.1.1.1); this machine's name may be none.
        ehlo = "localhost"
    verify = _verify_context(ca_file)
    for number, (preference, host) in enumerate(exchanges):
        item = HostCheck(host, preference, None if policy is None else policy.matches(host))
        check.hosts.append(item)
        if number >= MAX_HOSTS:
            item.postfix = NOT_PROBED
            item.reason = f"not probed: only the first {MAX_HOSTS} MX hosts are"
            continue
        tlsa_records: list[Any] = []
        tlsa_secure = False
        if dane_verdict is not None:
            try:
                tlsa = resolver.secure_query(f"_25._tcp.{host}", "TLSA")
                tlsa_records, tlsa_secure = list(tlsa.records), tlsa.secure
            except DNSTemporaryError as exc:
                item.error = f"TLSA lookup failed: {exc}"
        try:
            addresses = [a for family in resolver.address_families(host) for a in family]
        except DNSTemporaryError as exc:
            item.error, check.temporary = f"address lookup failed: {exc}", True
            item.reason = f"{item.error} -> Postfix defers"
            item.postfix = DEFER
            continue
        except DNSFailure as exc:
            item.error = printable(str(exc))
            item.reason = f"{item.error} -> Postfix skips this MX host"
            continue
        host_deadline = time.monotonic() + HOST_TIMEOUTS * timeout
        for count, address in enumerate(addresses):
            probe = AddressProbe(address)
            item.addresses.append(probe)
            if not (allow_private_addresses or is_public(ipaddress.ip_address(address))):
                probe.postfix = NOT_PROBED
                probe.reason = "private address, not probed (allow_private_addresses is off)"
                continue
            if count >= MAX_ADDRESSES:
                probe.postfix = NOT_PROBED
                probe.reason = f"not probed: only the first {MAX_ADDRESSES} addresses are"
                continue
            _probe(
                probe,
                host,
                port,
                verify,
                min(time.monotonic() + timeout, host_deadline),
                ehlo,
                patterns,
                answer,
                dane_hosts.get(host, ""),
                tlsa_records if tlsa_secure else [],
                tlsa_secure if dane_verdict is not None else None,
            )
        _host_verdict(item)
    return check


def _probe(
    probe: AddressProbe,
    host: str,
    port: int,
    verify: ssl.SSLContext,
    deadline: float,
    ehlo: str,
    patterns: list[str] | None,
    answer: str,
    host_dane: str,
    tlsa_records: list[Any],
    tlsa_secure: bool | None,
) -> None:
    verify_error = ""
    verified = True
    session = _Session()
    try:
        try:
            _smtp_session(session, probe.address, port, host, verify, deadline, ehlo)
        except ssl.SSLCertVerificationError as exc:
            verified = False
            verify_error = printable(exc.verify_message or str(exc))
            # A second conversation without verification, to see what the server presents.
            session = _Session()
            _smtp_session(session, probe.address, port, host, _open_context(), deadline, ehlo)
    except ProbeError as exc:
        probe.error = str(exc)
    probe.banner, probe.starttls = session.banner, session.starttls
    probe.tls_version, probe.cipher, probe.chain = (
        session.tls_version,
        session.cipher,
        session.chain,
    )
    if probe.chain:
        leaf = x509.load_der_x509_certificate(probe.chain[0])
        names, from_san = _certificate_names(leaf)
        probe.certificate = CertificateInfo(
            subject_names=[printable(n) for n in names],
            names_from_san=from_san,
            issuer=printable(leaf.issuer.rfc4514_string()),
            not_after=leaf.not_valid_after_utc.isoformat(),
            verified=verified,
            verify_error=verify_error,
            matches_mx_host=from_san and rfc8461_name_match(names, host),
            matches_postfix_patterns=None
            if patterns is None
            else postfix_name_match(names, patterns),
        )
    if tlsa_secure is not None:
        records = [r.to_text() for r in tlsa_records]
        matched = _tlsa_matches(probe.chain, tlsa_records, host) if probe.chain else ""
        probe.tlsa = TlsaCheck(
            host_dane, [printable(r, 300) for r in records], matched, tlsa_secure
        )
    _judge(
        probe, session if session.starttls is not None else None, answer, host_dane, verify_error
    )


def _host_verdict(item: HostCheck) -> None:
    """Postfix tries the addresses in turn: the first that takes the mail decides."""
    for outcome in (DELIVER, DEFER, UNREACHABLE, NOT_PROBED):
        for probe in item.addresses:
            if probe.postfix == outcome:
                item.postfix, item.reason = outcome, f"{probe.address}: {probe.reason}"
                return
    if not item.addresses and not item.reason:
        item.reason = "no addresses"


# --------------------------------------------------------------------------------------------------
# Output.


def report(check: DomainCheck, as_json: bool, out: Callable[[str], None] = print) -> int:
    """Print the check, as text or one JSON object; return its exit status."""
    import json

    if as_json:
        out(json.dumps(check.to_json()))
        return check.status()
    shown_answer = printable(check.postfix_answer, 120)
    lines = [f"{check.domain}: MX hosts, and what Postfix does with {shown_answer!r}"]
    if check.mx_source == "implicit":
        lines.append(f"  no MX records: {check.domain} itself is the mail host (RFC 5321 §5.1)")
    if check.error:
        lines.append(f"  {check.error}")
    for host in check.hosts:
        listed = {None: "", True: ", listed in the policy", False: ", NOT listed in the policy"}
        pref = "" if host.preference is None else f" (preference {host.preference})"
        lines.append(f"  MX {host.host}{pref}{listed[host.in_policy]}")
        if host.error:
            lines.append(f"    {host.error}")
        for probe in host.addresses:
            lines.append(f"    {probe.address}:")
            if probe.banner:
                lines.append(f"      banner: {probe.banner}")
            if probe.starttls is not None:
                lines.append(f"      STARTTLS: {'offered' if probe.starttls else 'not offered'}")
            if probe.tls_version:
                lines.append(f"      TLS: {probe.tls_version}, {probe.cipher}")
            cert = probe.certificate
            if cert is not None:
                trust = (
                    "chain verified"
                    if cert.verified
                    else f"chain NOT verified: {cert.verify_error}"
                )
                lines.append(f"      certificate: {', '.join(cert.subject_names)} ({trust})")
                lines.append(
                    f"      certificate matches the MX host name (RFC 8461 §4.2): "
                    f"{'yes' if cert.matches_mx_host else 'no'}"
                )
            if probe.tlsa is not None:
                tlsa = probe.tlsa
                if tlsa.records:
                    match = f"matches {tlsa.matched}" if tlsa.matched else "none matches"
                    lines.append(f"      TLSA ({len(tlsa.records)}): {match}")
                else:
                    secure = "validated" if tlsa.secure else "not validated"
                    lines.append(f"      TLSA: none ({secure})")
            if probe.error:
                lines.append(f"      stopped: {probe.error}")
            lines.append(f"      postfix: {probe.postfix}: {probe.reason}")
        lines.append(f"    => {host.postfix}: {host.reason}")
    out("\n".join(lines))
    return check.status()
