"""DNS lookups for MTA-STS, through dnspython and the nameservers we were told to use.

Every DNS question the project asks goes through one ``Resolver``: the ``_mta-sts`` TXT record
(RFC 8461 §3.1), the address of the policy host (so that the HTTPS fetch never falls back to the
system resolver), and, later, MX and TLSA records with the AD bit. The nameservers are explicit
(``host``, ``host:port``, ``[v6]:port``) or those of /etc/resolv.conf, which lets a validating
local resolver see every query and lets the tests run a real DNS server on loopback.

Answers fall into two kinds, because callers must treat them differently (RFC 8461 §3.1, §5):

- ``DNSNotFound``: the name or the record type does not exist (NXDOMAIN, or NODATA). This is an
  answer: the domain has no such record.
- ``DNSTemporaryError``: no usable answer came (SERVFAIL, REFUSED, a timeout, a malformed reply).
  Nothing can be concluded; try again later.

Messages name the question and say what happened in plain words
(``_mta-sts.example.org TXT: NXDOMAIN``, ``... SERVFAIL from 192.0.2.53 port 53``).

Every exchange is dnspython's: ``dns.resolver`` for the blocking questions, ``dns.asyncresolver``
for those the daemon asks on its event loop, with dnspython's own retries, nameserver rotation and
TCP fallback. The one exception is a TLSA question (DANE): dnspython's query functions refuse a
whole reply when one TLSA record is malformed, so that one exchange sends with ``dns.query`` and
parses the reply itself, leniently (``_lenient_exchange``).

dnspython's own cache is off: the project caches policies itself and must see DNS as it is now.
A ``Resolver`` is safe to share between threads: after ``__init__`` it is only read (but for
the asyncio resolver behind ``txt_async`` and ``ipv4_async``, made on its first use).
"""

from __future__ import annotations

import errno
import re
import socket
import time
from collections.abc import Iterator, Sequence
from dataclasses import dataclass
from typing import Any, NoReturn, TypeVar

import dns.exception
import dns.flags
import dns.inet
import dns.message
import dns.name
import dns.nameserver
import dns.query
import dns.rcode
import dns.rdatatype
import dns.rdtypes.ANY.TXT
import dns.resolver
import dns.rrset

from postfix_mtasts.listeners import parse_nameserver

__all__ = [
    "AddressOutcome",
    "DNSFailure",
    "DNSNotFound",
    "DNSTemporaryError",
    "LocalError",
    "Resolver",
    "SecureAnswer",
    "local_cause",
    "nameservers_in",
]


# A CNAME chain that leaves the answer of one query (possible when asking an authoritative
# server directly) is followed by asking again for the target; this bounds such loops.
_MAX_CNAME_QUERIES = 8

_R = TypeVar("_R", bound=dns.resolver.BaseResolver)

# The largest reply read (the most a datagram or a DNS-over-TCP message can carry).
_MAX_REPLY = 65535

_NAMESERVER_TEXT = re.compile(r"[A-Za-z0-9]+:(.+)@[0-9]+")


class DNSFailure(Exception):
    """A DNS question without a usable answer: the one name callers catch."""


class DNSNotFound(DNSFailure):
    """The name or the record type does not exist (NXDOMAIN or NODATA)."""


class DNSTemporaryError(DNSFailure):
    """No usable answer: SERVFAIL, REFUSED, a timeout, no nameserver answered, a malformed reply."""


class LocalError(Exception):
    """This machine ran out of something a lookup needs (file descriptors, buffers, memory, a
    thread). Unlike ``DNSTemporaryError`` it says nothing about the domain asked for: callers
    must not remember it as the domain's state."""


# errno values that mean "this process or system ran out of something", not "the network said".
LOCAL_ERRNOS = frozenset({errno.EMFILE, errno.ENFILE, errno.ENOBUFS, errno.ENOMEM})


def local_cause(exc: BaseException) -> OSError | None:
    """The local resource failure behind ``exc`` (itself, a chained cause, or one of the errors
    dnspython collected per nameserver), or None when ``exc`` is about the remote side."""
    seen: set[int] = set()
    pending: list[BaseException] = [exc]
    while pending:
        current = pending.pop()
        if id(current) in seen:
            continue
        seen.add(id(current))
        if isinstance(current, OSError) and current.errno in LOCAL_ERRNOS:
            return current
        if isinstance(current, dns.exception.DNSException):
            # NoNameservers and LifetimeTimeout keep what each nameserver did: (server, tcp,
            # port, error, response).
            for error in current.kwargs.get("errors", ()):
                if isinstance(error[3], BaseException):
                    pending.append(error[3])
        pending.extend(arg for arg in current.args if isinstance(arg, BaseException))
        for linked in (current.__cause__, current.__context__):
            if linked is not None:
                pending.append(linked)
    return None


# What an A query already made came to: the addresses, or the error it raised (None: not made).
AddressOutcome = list[str] | DNSFailure | None


# EDNS buffer size of the DNSSEC queries (the DNS Flag Day 2020 value: no fragmentation).
_EDNS_PAYLOAD = 1232


@dataclass(frozen=True, slots=True)
class SecureAnswer:
    """An answer with the validating resolver's verdict on it (for DANE, RFC 7672).

    ``exists`` is False for NXDOMAIN and NODATA, which are answers too: a *secure* NODATA proves
    that the record does not exist; ``nxdomain`` tells the two apart. ``secure`` is the AD bit:
    the resolver validated the answer (or the denial) with DNSSEC. ``ttl`` is the answer's TTL, or
    the negative TTL of a denial (RFC 2308 §5). ``records`` are dnspython rdata objects.
    """

    name: str
    rdtype: str
    exists: bool
    secure: bool
    ttl: int
    records: tuple[Any, ...] = ()
    nxdomain: bool = False
    # Records of the answer that could not be parsed and were left out (see _tlsa_query).
    malformed: int = 0


def _describe_errors(errors: Sequence[dns.resolver.ErrorTuple]) -> str:
    """Say in words what each nameserver did, e.g. "SERVFAIL from 127.0.0.1 port 53"."""
    seen: list[str] = []
    for server, _tcp, port, error, _response in errors:
        # dnspython names a nameserver "Do53:192.0.2.53@53"; the address is what a reader knows.
        address = _NAMESERVER_TEXT.fullmatch(server or "")
        where = f"{address.group(1) if address else server} port {port}"
        if isinstance(error, str):  # an rcode such as "SERVFAIL" or "REFUSED"
            text = f"{error} from {where}"
        elif isinstance(error, ConnectionRefusedError):
            text = f"connection refused by {where}"
        elif isinstance(error, dns.exception.Timeout):
            text = f"no answer from {where}"
        elif isinstance(error, dns.exception.FormError | dns.message.Truncated | EOFError):
            text = f"malformed answer from {where} ({error})"
        elif isinstance(error, OSError):
            text = f"{error.strerror or error} talking to {where}"
        else:
            text = f"{error} from {where}"
        if text not in seen:
            seen.append(text)
    return ", ".join(seen)


def nameservers_in(path: str) -> list[str]:
    """The nameservers a resolv.conf file names, as addresses, read as the C library reads it.
    Raises ``ValueError`` (dnspython's reason) when it cannot be read or names none."""
    try:
        conf = dns.resolver.Resolver(filename=path, configure=True)
    except dns.resolver.NoResolverConfiguration as exc:
        raise ValueError(str(exc)) from exc
    return [str(ns) for ns in conf.nameservers]


class Resolver:
    """A stub resolver over dnspython with explicit nameservers and limits.

    ``nameservers``: ``host``, ``host:port``, ``[v6]:port`` or a bare IPv6 address each; ``None``
    reads /etc/resolv.conf. ``timeout`` is how long one nameserver gets to answer one try;
    ``lifetime`` is how long a whole query may take across tries and nameservers (default
    ``2 * timeout``). Raises ``ValueError`` for a malformed nameserver, a non-positive limit or
    an unusable /etc/resolv.conf.
    """

    def __init__(
        self,
        nameservers: Sequence[str] | None = None,
        *,
        timeout: float = 5.0,
        lifetime: float | None = None,
    ) -> None:
        if lifetime is None:
            lifetime = 2 * timeout
        if timeout <= 0 or lifetime <= 0:
            raise ValueError(f"DNS timeout ({timeout}) and lifetime ({lifetime}) must be positive")
        if isinstance(nameservers, str):
            # A lone string would otherwise be taken character by character.
            raise ValueError("nameservers must be a list of strings, not a string")
        if nameservers is None:
            try:
                self._resolver = dns.resolver.Resolver(configure=True)
            except dns.resolver.NoResolverConfiguration as exc:
                raise ValueError(f"no usable nameserver in /etc/resolv.conf ({exc})") from exc
        else:
            if not nameservers:
                raise ValueError("no nameservers given")
            self._resolver = dns.resolver.Resolver(configure=False)
            # One Do53Nameserver per entry, so that each keeps its own port.
            self._resolver.nameservers = [
                dns.nameserver.Do53Nameserver(*parse_nameserver(text)) for text in nameservers
            ]
        self._resolver.timeout = timeout
        self._resolver.lifetime = lifetime
        # The project has its own policy cache; DNS answers must be fresh each time.
        self._resolver.cache = None
        # The same settings for the asyncio loop (the daemon's TXT and A queries), built when
        # first used.
        self._async: tuple[Any, Any] | None = None  # dns.asyncresolver.Resolver, its backend
        self.timeout = timeout
        self.lifetime = lifetime
        # DNSSEC queries (DANE): same servers and limits, with the DO bit and the AD flag set so
        # that the validating resolver reports its verdict (RFC 6840 §5.7). We trust the AD bit
        # of the resolver we were configured with; we do not validate ourselves.
        self._secure = self._like_ours(dns.resolver.Resolver(configure=False))
        self._secure.use_edns(0, dns.flags.DO, _EDNS_PAYLOAD)
        self._secure.flags = dns.flags.RD | dns.flags.AD

    @property
    def nameservers(self) -> list[str]:
        """The nameservers in use, as ``address port N`` strings (for log lines)."""
        return [
            f"{ns.address} port {ns.port}"
            if isinstance(ns, dns.nameserver.AddressAndPortNameserver)
            else f"{ns} port {self._resolver.port}"
            for ns in self._resolver.nameservers
        ]

    def txt(self, name: str) -> list[str]:
        """The TXT records of ``name``, one string per record, CNAMEs followed.

        A record made of several character-strings is one string: RFC 8461 §3.1 and RFC 7208 §3.3
        read such a record as the strings concatenated without separator. Bytes are decoded as
        latin-1 so that every byte survives for the caller to judge.
        """
        return _txt_strings(self._query(name, dns.rdatatype.TXT))

    async def txt_async(self, name: str) -> list[str]:
        """:meth:`txt` on the running asyncio loop: the daemon asks without a thread."""
        rrset = await self._query_async(name, dns.rdatatype.TXT)
        return _txt_strings(rrset)

    async def ipv4_async(self, name: str) -> list[str]:
        """The IPv4 addresses of ``name`` (CNAMEs followed), on the running asyncio loop.

        Raises ``DNSNotFound`` or ``DNSTemporaryError`` as :meth:`txt` does; the caller goes on
        with :meth:`address_families`, which asks for the AAAA records only if they are needed.
        """
        rrset = await self._query_async(name, dns.rdatatype.A)
        return [rdata.to_text() for rdata in rrset]

    def address_families(self, name: str, ipv4: AddressOutcome = None) -> Iterator[list[str]]:
        """The IPv4 addresses of ``name``, then its IPv6 addresses: the AAAA query is only made
        when the caller asks for more (an HTTPS fetch that reached an IPv4 address does not).

        ``ipv4`` is the outcome of an A query already made (by :meth:`ipv4_async`): the
        addresses, or the error it raised; it is not asked again.

        ``DNSNotFound`` only when neither A nor AAAA exists, once that is clear. When one family
        fails temporarily and the other answers, the answering family is enough to connect.
        """
        not_found: list[DNSNotFound] = []
        failed: list[DNSTemporaryError] = []
        found = False
        for rdtype in (dns.rdatatype.A, dns.rdatatype.AAAA):
            try:
                if rdtype == dns.rdatatype.A and ipv4 is not None:
                    if isinstance(ipv4, Exception):
                        raise ipv4
                    addresses = ipv4
                else:
                    addresses = [rdata.to_text() for rdata in self._query(name, rdtype)]
            except DNSNotFound as exc:
                not_found.append(exc)
                continue
            except DNSTemporaryError as exc:
                failed.append(exc)
                continue
            found = True
            yield addresses
        if found:
            return
        if failed:
            raise failed[0]
        raise DNSNotFound(f"{name} A/AAAA: {self._reasons(not_found)}")

    def secure_query(self, name: str, rdtype: str) -> SecureAnswer:
        """Ask for ``rdtype`` (``"MX"``, ``"TLSA"``, ``"A"``, ...) at ``name`` with DNSSEC and
        return the answer with its AD bit, CNAMEs followed by the recursive resolver.

        NXDOMAIN and NODATA are answers (``exists`` False), not errors. Raises
        ``DNSTemporaryError`` when no usable answer came.
        """
        type_code = dns.rdatatype.from_text(rdtype)
        question = f"{name} {rdtype}"
        try:
            qname = dns.name.from_text(name)
        except dns.exception.DNSException as exc:
            raise DNSTemporaryError(f"{question}: not a valid DNS name ({exc})") from exc
        if type_code == dns.rdatatype.TLSA:
            return self._tlsa_query(qname, question)
        try:
            answer = self._secure.resolve(qname, type_code, search=False, raise_on_no_answer=False)
        except dns.resolver.NXDOMAIN as exc:
            responses: dict[dns.name.Name, dns.message.Message] = exc.responses()  # type: ignore[no-untyped-call]
            response = responses.get(qname) or next(iter(responses.values()), None)
            if response is None:  # pragma: no cover - dnspython always keeps the response
                raise DNSTemporaryError(f"{question}: NXDOMAIN without a response") from exc
            secure = bool(response.flags & dns.flags.AD)
            return SecureAnswer(name, rdtype, False, secure, _negative_ttl(response), nxdomain=True)
        except Exception as exc:
            self._temporary(question, exc)
        response = answer.response
        secure = bool(response.flags & dns.flags.AD)
        if answer.rrset is None:
            return SecureAnswer(name, rdtype, False, secure, _negative_ttl(response))
        return SecureAnswer(name, rdtype, True, secure, answer.rrset.ttl, tuple(answer.rrset))

    def _tlsa_query(self, qname: dns.name.Name, question: str) -> SecureAnswer:
        """A TLSA query whose reply is parsed leniently (``_lenient_exchange``).

        dnspython refuses a whole reply when one TLSA record's data has the wrong length for its
        matching type. Such a record is legal on the wire and RFC 7672 §3.1 says to treat it as
        unusable, no more: so the records that do not parse are counted in ``malformed``, and the
        rest are kept. Tries each nameserver in turn within the resolver's timeout and lifetime,
        as dnspython's resolver does.
        """
        query = dns.message.make_query(
            qname, dns.rdatatype.TLSA, want_dnssec=True, payload=_EDNS_PAYLOAD
        )
        query.flags |= dns.flags.AD
        deadline = time.monotonic() + self.lifetime
        failures: list[str] = []
        for address, port in self._addresses():
            remaining = deadline - time.monotonic()
            if remaining <= 0:
                break
            where = f"{address} port {port}"
            try:
                response = _lenient_exchange(
                    query, address, port, time.monotonic() + min(self.timeout, remaining)
                )
            except (OSError, EOFError, dns.exception.DNSException) as exc:
                if local_cause(exc) is not None:
                    self._temporary(question, exc)
                failures.append(f"{_socket_error(exc)} from {where}")
                continue
            rcode = response.rcode()
            if rcode not in (dns.rcode.NOERROR, dns.rcode.NXDOMAIN):
                failures.append(f"{dns.rcode.to_text(rcode)} from {where}")
                continue
            return _tlsa_answer(qname, question, response)
        cause = ", ".join(dict.fromkeys(failures)) or f"timed out after {self.lifetime}s"
        raise DNSTemporaryError(f"{question}: {cause}")

    def _addresses(self) -> list[tuple[str, int]]:
        servers = []
        for ns in self._secure.nameservers:
            if isinstance(ns, dns.nameserver.AddressAndPortNameserver):
                servers.append((ns.address, ns.port))
            else:
                servers.append((str(ns), self._secure.port))
        return servers

    def validates(self, name: str) -> bool:
        """Whether the resolver validates DNSSEC: it sets the AD bit on ``name``, which must be a
        signed name (the root zone ``.`` is one)."""
        try:
            return self.secure_query(name, "SOA" if name == "." else "A").secure
        except DNSTemporaryError:
            return False

    def _temporary(self, question: str, exc: BaseException) -> NoReturn:
        """Raise the ``DNSTemporaryError`` for a failed query (shared by the query methods), or
        ``LocalError`` when this machine, not the network, failed it."""
        local = local_cause(exc)
        if local is not None:
            raise LocalError(f"{question}: not asked: {local.strerror or local}") from exc
        if isinstance(exc, dns.resolver.NoNameservers):
            errors = exc.kwargs.get("errors", [])
            cause = _describe_errors(errors) or "no nameserver answered"
            raise DNSTemporaryError(f"{question}: {cause}") from exc
        if isinstance(exc, dns.resolver.LifetimeTimeout):
            detail = _describe_errors(exc.kwargs.get("errors", []))
            cause = f"timed out after {float(self.lifetime)}s"
            raise DNSTemporaryError(f"{question}: {cause} ({detail or 'no answer'})") from exc
        if isinstance(exc, dns.resolver.YXDOMAIN):
            raise DNSTemporaryError(f"{question}: YXDOMAIN (name too long after DNAME)") from exc
        if isinstance(exc, OSError):  # e.g. no route to the nameserver's address family
            raise DNSTemporaryError(f"{question}: {exc.strerror or exc}") from exc
        if isinstance(exc, dns.exception.DNSException):
            raise DNSTemporaryError(f"{question}: {exc}") from exc
        raise exc

    @staticmethod
    def _reasons(errors: Sequence[DNSNotFound]) -> str:
        reasons = [str(exc).split(": ", 1)[-1] for exc in errors]
        if len(set(reasons)) == 1:
            return reasons[0]
        return ", ".join(reasons)

    def _query(self, name: str, rdtype: dns.rdatatype.RdataType) -> dns.rrset.RRset:
        """Ask for ``rdtype`` at ``name`` and return the RRset at the end of any CNAME chain.

        With :meth:`_query_async`, the one place that turns dnspython's outcomes into
        ``DNSNotFound`` and ``DNSTemporaryError`` (in :meth:`_next_name`).
        """
        question, qname = self._question(name, rdtype)
        # One lifetime for the question, however many CNAME hops it takes: each hop must not
        # start the clock again, or a slow chain holds a lookup for hops x lifetime.
        deadline = time.monotonic() + self.lifetime
        for _ in range(_MAX_CNAME_QUERIES):
            try:
                answer = self._resolver.resolve(
                    qname, rdtype, search=False, lifetime=self._left(deadline, question)
                )
            except Exception as exc:
                qname = self._next_name(exc, question, qname, name, rdtype)
                continue
            return self._rrset(answer, question, rdtype)
        raise DNSTemporaryError(f"{question}: CNAME chain longer than {_MAX_CNAME_QUERIES} queries")

    def _left(self, deadline: float, question: str) -> float:
        """What is left of a question's lifetime; ``DNSTemporaryError`` when nothing is."""
        left = deadline - time.monotonic()
        if left <= 0:
            raise DNSTemporaryError(
                f"{question}: timed out after {float(self.lifetime)}s (CNAME chain not resolved)"
            )
        return left

    async def _query_async(self, name: str, rdtype: dns.rdatatype.RdataType) -> dns.rrset.RRset:
        """:meth:`_query` on the running asyncio loop, through dnspython's asyncio resolver, with
        the same answers and errors."""
        question, qname = self._question(name, rdtype)
        # One lifetime for the whole question, CNAME hops included (see _query).
        deadline = time.monotonic() + self.lifetime
        for _ in range(_MAX_CNAME_QUERIES):
            try:
                resolver, backend = self._async_resolver()
                answer = await resolver.resolve(
                    qname,
                    rdtype,
                    search=False,
                    lifetime=self._left(deadline, question),
                    backend=backend,
                )
            except Exception as exc:
                qname = self._next_name(exc, question, qname, name, rdtype)
                continue
            return self._rrset(answer, question, rdtype)
        raise DNSTemporaryError(f"{question}: CNAME chain longer than {_MAX_CNAME_QUERIES} queries")

    def _async_resolver(self) -> tuple[Any, Any]:  # dns.asyncresolver.Resolver, its backend
        """dnspython's asyncio resolver with our settings, and the backend it asks through."""
        if self._async is None:
            # Imported here: the command-line tool never needs them, and they cost start-up time.
            import dns.asyncresolver

            from postfix_mtasts.dns_backend import LoopBackend

            resolver = self._like_ours(dns.asyncresolver.Resolver(configure=False))
            self._async = (resolver, LoopBackend())
        return self._async

    def _like_ours(self, resolver: _R) -> _R:
        """``resolver`` with our nameservers, port, limits, and no cache."""
        resolver.nameservers = self._resolver.nameservers
        resolver.port = self._resolver.port
        resolver.timeout = self.timeout
        resolver.lifetime = self.lifetime
        resolver.cache = None
        return resolver

    @staticmethod
    def _question(name: str, rdtype: dns.rdatatype.RdataType) -> tuple[str, dns.name.Name]:
        question = f"{name} {dns.rdatatype.to_text(rdtype)}"
        try:
            return question, dns.name.from_text(name)
        except dns.exception.DNSException as exc:
            # Such a name (an empty label, a label over 63 octets, ...) cannot exist in the DNS.
            raise DNSNotFound(f"{question}: not a valid DNS name ({exc})") from exc

    def _next_name(
        self,
        exc: Exception,
        question: str,
        qname: dns.name.Name,
        name: str,
        rdtype: dns.rdatatype.RdataType,
    ) -> dns.name.Name:
        """The name to ask next after ``exc``, or the ``DNSNotFound`` / ``DNSTemporaryError``
        that ``exc`` means."""
        if isinstance(exc, dns.resolver.NXDOMAIN):
            where = self._at_canonical(qname, exc.canonical_name, name)
            raise DNSNotFound(f"{question}: NXDOMAIN{where}") from exc
        if isinstance(exc, dns.resolver.NoAnswer):
            response: dns.message.QueryMessage = exc.kwargs["response"]
            canonical = response.canonical_name()
            if canonical != qname and not self._has_soa(response):
                # The chain leaves this answer (an authoritative server does not follow a
                # CNAME into another zone): ask again for its target.
                return canonical
            where = self._at_canonical(qname, canonical, name)
            type_text = dns.rdatatype.to_text(rdtype)
            raise DNSNotFound(f"{question}: no {type_text} record{where}") from exc
        self._temporary(question, exc)

    @staticmethod
    def _rrset(
        answer: dns.resolver.Answer, question: str, rdtype: dns.rdatatype.RdataType
    ) -> dns.rrset.RRset:
        if answer.rrset is None:  # pragma: no cover - resolve() raises NoAnswer instead
            raise DNSNotFound(f"{question}: no {dns.rdatatype.to_text(rdtype)} record")
        return answer.rrset

    @staticmethod
    def _has_soa(response: dns.message.Message) -> bool:
        """Whether the response carries an SOA in its authority section, as a NODATA answer for
        the end of the chain does (RFC 2308 §2.2); without it the server said nothing about the
        CNAME target and must be asked about it directly."""
        return any(rrset.rdtype == dns.rdatatype.SOA for rrset in response.authority)

    @staticmethod
    def _at_canonical(qname: dns.name.Name, canonical: dns.name.Name, original: str) -> str:
        if canonical == qname and qname.to_text(omit_final_dot=True) == original:
            return ""
        return f" (at {canonical.to_text(omit_final_dot=True)}, reached through CNAME)"


def _txt_strings(rrset: dns.rrset.RRset) -> list[str]:
    return [
        b"".join(rdata.strings).decode("latin-1")
        for rdata in rrset
        if isinstance(rdata, dns.rdtypes.ANY.TXT.TXT)
    ]


def _negative_ttl(response: dns.message.Message) -> int:
    """The TTL of a denial: the SOA record's TTL capped by its MINIMUM field (RFC 2308 §5)."""
    for rrset in response.authority:
        if rrset.rdtype == dns.rdatatype.SOA:
            return int(min(rrset.ttl, min(rdata.minimum for rdata in rrset)))
    return 0


def _socket_error(exc: BaseException) -> str:
    if isinstance(exc, TimeoutError):
        return "no answer"
    if isinstance(exc, OSError):
        return str(exc.strerror or exc)
    return f"malformed answer ({exc})"


def _lenient_exchange(
    query: dns.message.Message, address: str, port: int, deadline: float
) -> dns.message.Message:
    """One exchange of ``query`` with one nameserver, over UDP and again over TCP when the reply
    is truncated, the reply parsed with ``continue_on_error``.

    The one DNS exchange the project does not leave to dnspython, whose query functions parse
    every reply strictly (see ``_tlsa_query``): sending is ``dns.query``'s, reading the reply is
    the smallest piece that keeps its bytes for the lenient parse. A reply counts only when it
    answers the question asked (``Message.is_response``: id, QR, opcode and question); any other
    datagram is ignored, as dnspython ignores it (RFC 5452 §9.1). Raises ``TimeoutError`` when no
    reply came by ``deadline`` (``time.monotonic()``).
    """
    family = dns.inet.af_for_address(address)
    destination = dns.inet.low_level_address_tuple((address, port), family)
    with socket.socket(family, socket.SOCK_DGRAM) as sock:
        # Connected: the kernel drops datagrams from any other address and port.
        sock.connect(destination)
        dns.query.send_udp(sock, query, None)
        response = None
        while response is None:
            sock.settimeout(_until(deadline))
            response = _reply_to(query, sock.recv(_MAX_REPLY))
    if not response.flags & dns.flags.TC:
        return response
    with socket.create_connection(destination, timeout=_until(deadline)) as conn:
        dns.query.send_tcp(conn, query)
        # RFC 7766 §8: two octets of length, then the message.
        length = int.from_bytes(_receive(conn, 2, deadline), "big")
        response = _reply_to(query, _receive(conn, length, deadline))
    if response is None:
        raise dns.exception.FormError("the reply over TCP does not answer the question")  # type: ignore[no-untyped-call]
    return response


def _reply_to(query: dns.message.Message, wire: bytes) -> dns.message.Message | None:
    """``wire`` parsed leniently if it is a reply to ``query``, else None."""
    try:
        response = dns.message.from_wire(wire, continue_on_error=True)
    except dns.exception.DNSException:  # not even a header and a question
        return None
    return response if query.is_response(response) else None


def _receive(conn: socket.socket, size: int, deadline: float) -> bytes:
    """Exactly ``size`` bytes from ``conn`` by ``deadline``: a server that sends one byte at a
    time cannot stretch the exchange past it."""
    data = bytearray()
    while len(data) < size:
        conn.settimeout(_until(deadline))
        chunk = conn.recv(size - len(data))
        if not chunk:
            raise EOFError("connection closed in the middle of the reply")
        data += chunk
    return bytes(data)


def _until(deadline: float) -> float:
    left = deadline - time.monotonic()
    if left <= 0:
        raise TimeoutError("no reply in time")
    return left


def _tlsa_answer(
    qname: dns.name.Name, question: str, response: dns.message.Message
) -> SecureAnswer:
    """The SecureAnswer of a leniently parsed TLSA response, CNAMEs in its answer followed."""
    name = qname
    secure = bool(response.flags & dns.flags.AD)
    malformed = len(getattr(response, "errors", []))
    text = qname.to_text(omit_final_dot=True)
    for _ in range(_MAX_CNAME_QUERIES):
        rrsets = {(r.name, r.rdtype): r for r in response.answer}
        tlsa = rrsets.get((name, dns.rdatatype.TLSA))
        if tlsa is not None:
            return SecureAnswer(
                text, "TLSA", True, secure, tlsa.ttl, tuple(tlsa), malformed=malformed
            )
        cname = rrsets.get((name, dns.rdatatype.CNAME))
        if cname is None:
            break
        name = next(iter(cname)).target
    if malformed:
        # The only TLSA records there were could not be parsed: they exist, none is usable.
        return SecureAnswer(text, "TLSA", True, secure, 0, (), malformed=malformed)
    nxdomain = response.rcode() == dns.rcode.NXDOMAIN
    return SecureAnswer(text, "TLSA", False, secure, _negative_ttl(response), nxdomain=nxdomain)
