"""``postfix_mtasts.resolver`` against real nameservers on loopback.

The bed's unbound (recursive) and knot (authoritative) answer the ordinary cases; a dead port
answers nothing. Replies neither of them gives on demand (SERVFAIL, a malformed message, a CNAME
into a zone the server does not have) come from a small scripted UDP nameserver in this file.
Nameserver parsing is pure and table-driven.
"""

from __future__ import annotations

import asyncio
import socket
import threading
import time
from collections.abc import Callable, Iterator
from concurrent.futures import ThreadPoolExecutor

import dns.flags
import dns.message
import dns.name
import dns.rcode
import dns.rdataclass
import dns.rdatatype
import dns.rrset
import pytest
from bed import SCENARIOS, Bed

from postfix_mtasts.resolver import (
    AddressOutcome,
    DNSFailure,
    DNSNotFound,
    DNSTemporaryError,
    Resolver,
)

# Generous for loopback, small enough that a test of a dead server stays quick.
TIMEOUT = 2.0


@pytest.fixture
def recursive(bed: Bed) -> Resolver:
    return Resolver(bed.resolver_nameservers, timeout=TIMEOUT)


@pytest.fixture
def authoritative(bed: Bed) -> Resolver:
    return Resolver(bed.auth_nameservers, timeout=TIMEOUT)


TXTQuery = Callable[[Resolver, str], list[str]]
AddressQuery = Callable[[Resolver, str], list[str]]


@pytest.fixture(params=["thread", "loop"])
def txt(request: pytest.FixtureRequest) -> TXTQuery:
    """A TXT question asked the blocking way (``txt``, the command-line tool's) or on an event
    loop (``txt_async``, the daemon's): every answer and error must be the same either way."""
    if request.param == "thread":
        return lambda resolver, name: resolver.txt(name)
    return lambda resolver, name: asyncio.run(resolver.txt_async(name))


def _addresses_in_a_thread(resolver: Resolver, name: str) -> list[str]:
    # As the command-line tool asks: A, then AAAA, both blocking.
    return [address for family in resolver.address_families(name) for address in family]


def _addresses_on_a_loop(resolver: Resolver, name: str) -> list[str]:
    # As the daemon asks: the A query on its loop, then AAAA (only if needed) in a thread.
    ipv4: AddressOutcome
    try:
        ipv4 = asyncio.run(resolver.ipv4_async(name))
    except DNSFailure as exc:
        ipv4 = exc
    return [address for family in resolver.address_families(name, ipv4) for address in family]


@pytest.fixture(params=["thread", "loop"])
def addresses(request: pytest.FixtureRequest) -> AddressQuery:
    """The addresses of a name, asked the blocking way or the daemon's way."""
    if request.param == "thread":
        return _addresses_in_a_thread
    return _addresses_on_a_loop


@pytest.mark.parametrize(
    ("nameservers", "options"),
    [
        ([], {}),
        ("127.0.0.1", {}),
        (["127.0.0.1:99999"], {}),
        (["127.0.0.1"], {"timeout": 0}),
        (["127.0.0.1"], {"timeout": 1.0, "lifetime": -1.0}),
    ],
)
def test_unusable_configuration_is_refused(nameservers: object, options: dict[str, float]) -> None:
    with pytest.raises(ValueError):
        Resolver(nameservers, **options)  # type: ignore[arg-type]


def test_each_nameserver_keeps_its_own_port() -> None:
    resolver = Resolver(["127.0.0.1:5300", "[::1]:5301", "192.0.2.1"])
    assert resolver.nameservers == ["127.0.0.1 port 5300", "::1 port 5301", "192.0.2.1 port 53"]


def test_lifetime_defaults_to_twice_the_timeout() -> None:
    resolver = Resolver(["127.0.0.1"], timeout=1.5)
    assert (resolver.timeout, resolver.lifetime) == (1.5, 3.0)


# --------------------------------------------------------------------------------------------------
# TXT.


def test_txt_returns_the_record_of_a_domain(recursive: Resolver, txt: TXTQuery) -> None:
    assert txt(recursive, "_mta-sts.enforce.mtasts.test") == list(SCENARIOS["enforce"].txt)


def test_txt_returns_one_string_per_record(bed: Bed, recursive: Resolver, txt: TXTQuery) -> None:
    name = f"_mta-sts.{bed.unique_domain('txt')}"
    bed.dns_set(name, "TXT", ["v=STSv1; id=one;", "some other text"])
    assert sorted(txt(recursive, name)) == ["some other text", "v=STSv1; id=one;"]


def test_txt_joins_the_strings_of_one_record_without_separator(
    bed: Bed, recursive: Resolver, txt: TXTQuery
) -> None:
    # RFC 8461 §3.1 (as RFC 7208 §3.3): a record split into strings is read as their concatenation.
    name = f"_mta-sts.{bed.unique_domain('split')}"
    bed.dns_set(name, "TXT", [["v=STSv1; ", "id=split", "2024;"]])
    assert txt(recursive, name) == ["v=STSv1; id=split2024;"]


def test_txt_keeps_every_byte_of_a_record(bed: Bed, recursive: Resolver, txt: TXTQuery) -> None:
    name = f"_mta-sts.{bed.unique_domain('bytes')}"
    bed.dns_set(name, "TXT", ["v=STSv1; id=caf\u00e9;"])
    (text,) = txt(recursive, name)
    assert text.encode("latin-1") == "v=STSv1; id=caf\u00e9;".encode()


@pytest.mark.parametrize("server", ["recursive", "authoritative"])
def test_txt_follows_a_cname_chain(
    server: str, request: pytest.FixtureRequest, txt: TXTQuery
) -> None:
    resolver: Resolver = request.getfixturevalue(server)
    # _mta-sts.cname -> _mta-sts-hop.cname -> sts-target.cname (TXT).
    assert txt(resolver, "_mta-sts.cname.mtasts.test") == ["v=STSv1; id=cname20240101;"]


def test_nxdomain_is_not_found(recursive: Resolver, txt: TXTQuery) -> None:
    with pytest.raises(DNSNotFound) as raised:
        txt(recursive, "_mta-sts.norecord.mtasts.test")
    assert str(raised.value) == "_mta-sts.norecord.mtasts.test TXT: NXDOMAIN"


def test_name_without_txt_record_is_not_found(recursive: Resolver, txt: TXTQuery) -> None:
    # NODATA: the name exists (it has an A record) but no TXT.
    with pytest.raises(DNSNotFound) as raised:
        txt(recursive, "mta-sts.enforce.mtasts.test")
    assert str(raised.value) == "mta-sts.enforce.mtasts.test TXT: no TXT record"


def test_cname_to_a_missing_name_is_not_found_and_says_where(
    bed: Bed, recursive: Resolver, txt: TXTQuery
) -> None:
    domain = bed.unique_domain("dangling")
    bed.dns_set(f"_mta-sts.{domain}", "CNAME", [f"nowhere.{domain}."])
    with pytest.raises(DNSNotFound) as raised:
        txt(recursive, f"_mta-sts.{domain}")
    message = str(raised.value)
    assert message.startswith(f"_mta-sts.{domain} TXT: NXDOMAIN"), message
    assert f"nowhere.{domain}" in message


def test_invalid_name_is_not_found(recursive: Resolver, txt: TXTQuery) -> None:
    with pytest.raises(DNSNotFound, match="not a valid DNS name"):
        txt(recursive, "a" * 64 + ".mtasts.test")


def test_refused_query_is_a_temporary_error(authoritative: Resolver, txt: TXTQuery) -> None:
    # knot is authoritative for mtasts.test only and refuses anything else.
    with pytest.raises(DNSTemporaryError) as raised:
        txt(authoritative, "_mta-sts.example.org")
    message = str(raised.value)
    assert message.startswith("_mta-sts.example.org TXT: REFUSED from 127.0.0.1 port "), message


def test_dead_nameserver_is_a_temporary_error_within_the_lifetime(bed: Bed, txt: TXTQuery) -> None:
    resolver = Resolver([bed.dead_nameserver], timeout=0.2, lifetime=0.5)
    started = time.monotonic()
    with pytest.raises(DNSTemporaryError) as raised:
        txt(resolver, "_mta-sts.enforce.mtasts.test")
    assert time.monotonic() - started < 3.0
    message = str(raised.value)
    assert message.startswith("_mta-sts.enforce.mtasts.test TXT: timed out after 0.5s"), message
    assert bed.dead_nameserver.replace(":", " port ") in message


def test_next_nameserver_answers_when_the_first_is_dead(bed: Bed, txt: TXTQuery) -> None:
    resolver = Resolver([bed.dead_nameserver, *bed.resolver_nameservers], timeout=0.3)
    assert txt(resolver, "_mta-sts.enforce.mtasts.test") == list(SCENARIOS["enforce"].txt)


def test_answers_are_not_cached(bed: Bed, recursive: Resolver, txt: TXTQuery) -> None:
    name = f"_mta-sts.{bed.unique_domain('fresh')}"
    bed.dns_set(name, "TXT", ["v=STSv1; id=before;"])
    assert txt(recursive, name) == ["v=STSv1; id=before;"]
    bed.dns_set(name, "TXT", ["v=STSv1; id=after;"])
    assert txt(recursive, name) == ["v=STSv1; id=after;"]


def test_answer_too_large_for_udp_comes_over_tcp(
    bed: Bed, recursive: Resolver, txt: TXTQuery
) -> None:
    # Over 512 bytes: truncated over UDP (no EDNS), asked again over TCP.
    name = f"_mta-sts.{bed.unique_domain('large')}"
    records = [f"v=STSv1; id=large{i};" + "x" * 180 for i in range(6)]
    bed.dns_set(name, "TXT", records)
    assert sorted(txt(recursive, name)) == sorted(records)


def test_one_resolver_serves_many_threads(recursive: Resolver, txt: TXTQuery) -> None:
    names = ["enforce", "testing", "none", "cname"] * 10
    with ThreadPoolExecutor(max_workers=8) as pool:
        answers = list(
            pool.map(lambda label: recursive.txt(f"_mta-sts.{label}.mtasts.test"), names)
        )
    for label, answer in zip(names, answers, strict=True):
        assert answer == [f"v=STSv1; id={label}20240101;"]


# --------------------------------------------------------------------------------------------------
# Addresses.


def test_addresses_returns_ipv4_before_ipv6(
    bed: Bed, recursive: Resolver, addresses: AddressQuery
) -> None:
    name = f"mta-sts.{bed.unique_domain('dual')}"
    bed.dns_set(name, "AAAA", ["2001:db8::1", "2001:db8::2"])
    bed.dns_set(name, "A", ["192.0.2.1"])
    found = addresses(recursive, name)
    assert found[0] == "192.0.2.1"
    assert sorted(found[1:]) == ["2001:db8::1", "2001:db8::2"]


def test_addresses_with_ipv6_only(bed: Bed, recursive: Resolver, addresses: AddressQuery) -> None:
    name = f"mta-sts.{bed.unique_domain('six')}"
    bed.dns_set(name, "AAAA", ["2001:db8::6"])
    assert addresses(recursive, name) == ["2001:db8::6"]


def test_addresses_follow_a_cname(bed: Bed, recursive: Resolver, addresses: AddressQuery) -> None:
    domain = bed.unique_domain("alias")
    bed.dns_set(f"mta-sts.{domain}", "CNAME", [f"web.{domain}."])
    bed.dns_set(f"web.{domain}", "A", ["192.0.2.7"])
    assert addresses(recursive, f"mta-sts.{domain}") == ["192.0.2.7"]


def test_no_address_record_is_not_found(
    bed: Bed, recursive: Resolver, addresses: AddressQuery
) -> None:
    with pytest.raises(DNSNotFound) as raised:
        addresses(recursive, "mta-sts.nohost.mtasts.test")
    assert str(raised.value) == "mta-sts.nohost.mtasts.test A/AAAA: NXDOMAIN"
    # A name with other records but no address: NODATA for both types.
    with pytest.raises(DNSNotFound, match=r"^enforce\.mtasts\.test A/AAAA: no A record"):
        addresses(recursive, "enforce.mtasts.test")


def test_addresses_from_a_dead_nameserver_are_a_temporary_error(
    bed: Bed, addresses: AddressQuery
) -> None:
    resolver = Resolver([bed.dead_nameserver], timeout=0.2, lifetime=0.4)
    with pytest.raises(DNSTemporaryError, match=r"^mta-sts\.enforce\.mtasts\.test A: timed out"):
        addresses(resolver, "mta-sts.enforce.mtasts.test")


# --------------------------------------------------------------------------------------------------
# Replies the bed's servers do not give: a scripted nameserver.


Script = Callable[[dns.message.QueryMessage], bytes | dns.message.Message]


class ScriptedNameserver:
    """A UDP nameserver on 127.0.0.1 that answers every query with ``script(query)``."""

    def __init__(self, script: Script) -> None:
        self.script = script
        self.queries: list[str] = []
        # The address the last query came from.
        self.client: tuple[str, int] = ("", 0)
        self._sock = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
        self._sock.bind(("127.0.0.1", 0))
        self._sock.settimeout(0.1)
        self.address = f"127.0.0.1:{self._sock.getsockname()[1]}"
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._serve, daemon=True)
        self._thread.start()

    def _serve(self) -> None:
        while not self._stop.is_set():
            try:
                wire, client = self._sock.recvfrom(65535)
            except TimeoutError:
                continue
            except OSError:
                return
            self.client = client
            query = dns.message.from_wire(wire)
            assert isinstance(query, dns.message.QueryMessage)
            self.queries.append(
                f"{query.question[0].name} {dns.rdatatype.to_text(query.question[0].rdtype)}"
            )
            reply = self.script(query)
            self._sock.sendto(reply if isinstance(reply, bytes) else reply.to_wire(), client)

    def close(self) -> None:
        self._stop.set()
        self._thread.join(2)
        self._sock.close()


@pytest.fixture
def scripted() -> Iterator[Callable[[Script], ScriptedNameserver]]:
    servers: list[ScriptedNameserver] = []

    def start(script: Script) -> ScriptedNameserver:
        servers.append(ScriptedNameserver(script))
        return servers[-1]

    yield start
    for server in servers:
        server.close()


def _reply(
    query: dns.message.QueryMessage, rcode: dns.rcode.Rcode = dns.rcode.Rcode.NOERROR
) -> dns.message.Message:
    reply = dns.message.make_response(query)
    reply.set_rcode(rcode)
    reply.flags |= dns.flags.RA
    return reply


def _rrset(name: str, rdtype: str, *values: str) -> dns.rrset.RRset:
    return dns.rrset.from_text(name, 60, dns.rdataclass.IN, rdtype, *values)


def test_servfail_is_a_temporary_error(
    scripted: Callable[[Script], ScriptedNameserver], txt: TXTQuery
) -> None:
    server = scripted(lambda query: _reply(query, dns.rcode.Rcode.SERVFAIL))
    resolver = Resolver([server.address], timeout=TIMEOUT)
    with pytest.raises(DNSTemporaryError) as raised:
        txt(resolver, "_mta-sts.example.org")
    port = server.address.split(":")[1]
    assert str(raised.value) == f"_mta-sts.example.org TXT: SERVFAIL from 127.0.0.1 port {port}"


def test_malformed_reply_is_a_temporary_error(
    scripted: Callable[[Script], ScriptedNameserver], txt: TXTQuery
) -> None:
    # The query's id and a header claiming one question, then nothing. dnspython drops such a UDP
    # reply and keeps waiting for a well-formed one, so the query ends as a timeout.
    server = scripted(lambda query: query.id.to_bytes(2, "big") + b"\x81\x80\x00\x01" + b"\x00" * 6)
    resolver = Resolver([server.address], timeout=0.5, lifetime=1.0)
    with pytest.raises(DNSTemporaryError, match=r"^_mta-sts\.example\.org TXT: timed out"):
        txt(resolver, "_mta-sts.example.org")


def test_reply_to_another_question_is_not_taken(
    scripted: Callable[[Script], ScriptedNameserver], txt: TXTQuery
) -> None:
    # An off-path forger guessing wrong: the answer it offers comes with another query id.
    def script(query: dns.message.QueryMessage) -> dns.message.Message:
        reply = _reply(query)
        reply.id = (query.id + 1) % 65536
        reply.answer.append(_rrset("_mta-sts.example.org.", "TXT", '"v=STSv1; id=forged;"'))
        return reply

    resolver = Resolver([scripted(script).address], timeout=0.3, lifetime=0.6)
    with pytest.raises(DNSTemporaryError, match=r"^_mta-sts\.example\.org TXT: timed out"):
        txt(resolver, "_mta-sts.example.org")


def test_a_forged_reply_from_another_port_is_not_taken(
    scripted: Callable[[Script], ScriptedNameserver], txt: TXTQuery
) -> None:
    # An attacker who guessed the query id and the client's port answers first, but from another
    # port than the nameserver's: the answer taken is the nameserver's (RFC 5452 §9.1).
    forger = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
    forger.bind(("127.0.0.1", 0))
    servers: list[ScriptedNameserver] = []

    def script(query: dns.message.QueryMessage) -> dns.message.Message:
        forged = _reply(query)
        forged.answer.append(_rrset("_mta-sts.example.org.", "TXT", '"v=STSv1; id=forged;"'))
        forger.sendto(forged.to_wire(), servers[0].client)
        time.sleep(0.05)
        real = _reply(query)
        real.answer.append(_rrset("_mta-sts.example.org.", "TXT", '"v=STSv1; id=real;"'))
        return real

    servers.append(scripted(script))
    try:
        resolver = Resolver([servers[0].address], timeout=1.0)
        assert txt(resolver, "_mta-sts.example.org") == ["v=STSv1; id=real;"]
    finally:
        forger.close()


def test_cname_leaving_the_answer_is_followed_by_a_new_query(
    scripted: Callable[[Script], ScriptedNameserver], txt: TXTQuery
) -> None:
    # An authoritative server answers the CNAME of its zone and says nothing about the target.
    def script(query: dns.message.QueryMessage) -> dns.message.Message:
        reply = _reply(query)
        name = query.question[0].name.to_text()
        if name == "_mta-sts.example.org.":
            reply.answer.append(_rrset(name, "CNAME", "sts.example.net."))
        elif name == "sts.example.net.":
            reply.answer.append(_rrset(name, "TXT", '"v=STSv1; id=outside;"'))
        return reply

    server = scripted(script)
    resolver = Resolver([server.address], timeout=TIMEOUT)
    assert txt(resolver, "_mta-sts.example.org") == ["v=STSv1; id=outside;"]
    assert server.queries == ["_mta-sts.example.org. TXT", "sts.example.net. TXT"]


def test_nodata_at_the_end_of_a_cname_is_not_found_without_asking_again(
    scripted: Callable[[Script], ScriptedNameserver], txt: TXTQuery
) -> None:
    # A recursive server's NODATA for the target: the chain, and the target zone's SOA.
    def script(query: dns.message.QueryMessage) -> dns.message.Message:
        reply = _reply(query)
        reply.answer.append(_rrset("_mta-sts.example.org.", "CNAME", "sts.example.net."))
        reply.authority.append(
            _rrset("example.net.", "SOA", "ns.example.net. host.example.net. 1 60 60 60 60")
        )
        return reply

    server = scripted(script)
    resolver = Resolver([server.address], timeout=TIMEOUT)
    with pytest.raises(DNSNotFound) as raised:
        txt(resolver, "_mta-sts.example.org")
    assert str(raised.value) == (
        "_mta-sts.example.org TXT: no TXT record (at sts.example.net, reached through CNAME)"
    )
    assert len(server.queries) == 1


def test_cname_loop_ends(scripted: Callable[[Script], ScriptedNameserver], txt: TXTQuery) -> None:
    def script(query: dns.message.QueryMessage) -> dns.message.Message:
        reply = _reply(query)
        name = query.question[0].name.to_text()
        target = "b.example.org." if name == "a.example.org." else "a.example.org."
        reply.answer.append(_rrset(name, "CNAME", target))
        return reply

    resolver = Resolver([scripted(script).address], timeout=TIMEOUT)
    with pytest.raises(DNSTemporaryError, match="CNAME chain longer than"):
        txt(resolver, "a.example.org")


def test_tlsa_reply_to_another_question_is_not_taken(
    scripted: Callable[[Script], ScriptedNameserver],
) -> None:
    # The lenient TLSA exchange takes a reply only if it answers the question asked
    # (Message.is_response), not merely because it carries the query's id.
    def script(query: dns.message.QueryMessage) -> dns.message.Message:
        other = dns.message.make_query("_25._tcp.elsewhere.example.", "TLSA")
        other.id = query.id
        reply = dns.message.make_response(other)
        reply.answer.append(_rrset("_25._tcp.elsewhere.example.", "TLSA", "3 1 1 " + "ab" * 32))
        return reply

    server = scripted(script)
    resolver = Resolver([server.address], timeout=0.3, lifetime=0.6)
    with pytest.raises(DNSTemporaryError) as raised:
        resolver.secure_query("_25._tcp.mx.example.org", "TLSA")
    port = server.address.split(":")[1]
    assert str(raised.value) == (
        f"_25._tcp.mx.example.org TLSA: no answer from 127.0.0.1 port {port}"
    )
