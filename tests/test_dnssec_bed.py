"""The DNSSEC part of the test bed works: a signed zone, a validating resolver, a zone that is down.

What the DANE tests rely on, checked with dnspython alone (no project code): the validating unbound
sets the AD bit for dane.test and not for the unsigned mtasts.test, the plain unbound never sets
it, every record of the DANE table is served as published, dynamic updates are signed at once, and
every lookup below the stopped down.dane.test fails.
"""

from __future__ import annotations

import socket
import struct
import time
from typing import Any

import dns.dnssec
import dns.exception
import dns.flags
import dns.message
import dns.name
import dns.query
import dns.rcode
import dns.rdata
import dns.rdataclass
import dns.rdatatype
import dns.rrset
import pytest
from bed import (
    DANE_SCENARIOS,
    DANE_ZONE,
    DOWN_ZONE,
    EE,
    SCENARIOS,
    UNUSABLE,
    USABLE_EE,
    ZONE,
    Bed,
    domain_of,
    tlsa_ee_digest,
    zone_of,
)
from cryptography import x509

TIMEOUT = 3.0


def _split(nameserver: str) -> tuple[str, int]:
    host, port = nameserver.rsplit(":", 1)
    return host, int(port)


def _query(name: str, rdtype: str) -> dns.message.QueryMessage:
    # DO (RFC 4035 §3.2.1) and AD (RFC 6840 §5.7): without either, a validating resolver does not
    # report its verdict, and dnspython shows no AD bit.
    query = dns.message.make_query(name, rdtype, want_dnssec=True)
    query.flags |= dns.flags.AD
    return query


def ask(nameserver: str, name: str, rdtype: str) -> dns.message.Message:
    host, port = _split(nameserver)
    return dns.query.udp(_query(name, rdtype), host, port=port, timeout=TIMEOUT)


def ask_raw(nameserver: str, name: str, rdtype: str) -> bytes:
    """The reply as bytes, for answers dnspython refuses to parse."""
    host, port = _split(nameserver)
    with socket.socket(socket.AF_INET, socket.SOCK_DGRAM) as sock:
        sock.settimeout(TIMEOUT)
        sock.connect((host, port))
        sock.send(_query(name, rdtype).to_wire())
        return sock.recv(65535)


def header(wire: bytes) -> tuple[int, bool, int]:
    """(rcode, AD bit, answer count) from a reply's header (RFC 1035 §4.1.1)."""
    _id, flags, _qd, ancount, _ns, _ar = struct.unpack("!6H", wire[:12])
    return flags & 0xF, bool(flags & dns.flags.AD), ancount


def is_secure(answer: dns.message.Message) -> bool:
    return bool(answer.flags & dns.flags.AD)


def rrset(answer: dns.message.Message, name: str, rdtype: str) -> dns.rrset.RRset:
    return answer.find_rrset(
        answer.answer,
        dns.name.from_text(name),
        dns.rdataclass.IN,
        dns.rdatatype.from_text(rdtype),
    )


def published(bed: Bed) -> list[tuple[str, str, list[str]]]:
    """Every (name, type, rdata texts) of the DANE table outside the down zone, as published."""
    merged: dict[tuple[str, str], list[str]] = {}
    for scenario in DANE_SCENARIOS.values():
        for name, rtype, value in (*scenario.records, *scenario.mtasts_records):
            if zone_of(name) != DOWN_ZONE:
                merged.setdefault((name, rtype), []).append(bed.expand(value))
    return [(name, rtype, values) for (name, rtype), values in merged.items()]


def received_text(rdata: dns.rdata.Rdata) -> str:
    if rdata.rdtype == dns.rdatatype.TXT:
        return b"".join(rdata.strings).decode()  # type: ignore[attr-defined]
    if rdata.rdtype == dns.rdatatype.TLSA:
        tlsa: Any = rdata
        return f"{tlsa.usage} {tlsa.selector} {tlsa.mtype} {tlsa.cert.hex()}"
    return rdata.to_text().lower()


def published_text(rtype: str, value: str) -> str:
    if rtype == "TXT":
        return value
    if rtype == "TLSA":
        usage, selector, mtype, data = value.split(None, 3)
        return f"{usage} {selector} {mtype} {''.join(data.split()).lower()}"
    return dns.rdata.from_text(dns.rdataclass.IN, rtype, value).to_text().lower()


# --------------------------------------------------------------------------------------------------
# The validating resolver.


def test_signed_names_come_back_with_the_ad_bit(bed: Bed) -> None:
    validating = bed.validating_nameservers[0]
    for name, rdtype in [
        (DANE_ZONE, "SOA"),
        (DANE_ZONE, "DNSKEY"),
        (f"all-tlsa.{DANE_ZONE}", "MX"),
        (f"mx1.all-tlsa.{DANE_ZONE}", "A"),
        (f"_25._tcp.mx1.all-tlsa.{DANE_ZONE}", "TLSA"),
        (DOWN_ZONE, "DS"),
    ]:
        answer = ask(validating, name, rdtype)
        assert answer.rcode() == dns.rcode.NOERROR, (name, rdtype, answer)
        assert is_secure(answer), (name, rdtype, answer)
        assert rrset(answer, name, rdtype), (name, rdtype, answer)


def test_signed_denials_come_back_with_the_ad_bit(bed: Bed) -> None:
    validating = bed.validating_nameservers[0]
    # NODATA: the implicit-MX domain exists but has no MX; NXDOMAIN: no such name.
    nodata = ask(validating, f"implicit-mx.{DANE_ZONE}", "MX")
    assert (nodata.rcode(), nodata.answer, is_secure(nodata)) == (dns.rcode.NOERROR, [], True)
    for name in (f"nxdomain.{DANE_ZONE}", f"_25._tcp.mx2.some-tlsa.{DANE_ZONE}"):
        answer = ask(validating, name, "TLSA" if name.startswith("_25") else "MX")
        assert (answer.rcode(), is_secure(answer)) == (dns.rcode.NXDOMAIN, True), answer


def test_unsigned_names_resolve_without_the_ad_bit(bed: Bed) -> None:
    validating = bed.validating_nameservers[0]
    txt = ask(validating, f"_mta-sts.{domain_of('enforce')}", "TXT")
    assert txt.rcode() == dns.rcode.NOERROR and rrset(
        txt, f"_mta-sts.{domain_of('enforce')}", "TXT"
    )
    assert not is_secure(txt)
    # The unsigned MX of unsigned-mx.mtasts.test points into the signed zone.
    domain = DANE_SCENARIOS["unsigned-mx"].domain
    mx = ask(validating, domain, "MX")
    assert [r.exchange.to_text() for r in rrset(mx, domain, "MX")] == [
        f"mx.unsigned-mx.{DANE_ZONE}."
    ]
    assert not is_secure(mx)
    nxdomain = ask(validating, f"nosuchname.{ZONE}", "MX")
    assert (nxdomain.rcode(), is_secure(nxdomain)) == (dns.rcode.NXDOMAIN, False)


def test_the_plain_resolver_answers_signed_names_without_validating(bed: Bed) -> None:
    plain = bed.resolver_nameservers[0]
    name = f"all-tlsa.{DANE_ZONE}"
    answer = ask(plain, name, "MX")
    assert answer.rcode() == dns.rcode.NOERROR
    assert len(rrset(answer, name, "MX")) == 2
    assert not is_secure(answer)
    # The signatures are there (DO bit), only nobody checked them.
    assert answer.find_rrset(
        answer.answer,
        dns.name.from_text(name),
        dns.rdataclass.IN,
        dns.rdatatype.RRSIG,
        dns.rdatatype.MX,
    )


def test_the_trust_anchor_is_the_ds_of_the_key_knot_signs_with(bed: Bed) -> None:
    answer = ask(bed.auth_nameservers[0], DANE_ZONE, "DNSKEY")
    assert answer.flags & dns.flags.AA
    keys = rrset(answer, DANE_ZONE, "DNSKEY")
    (anchor,) = bed.dane_trust_anchors
    owner, _type, ds_text = anchor.split(" ", 2)
    assert (owner, _type) == (f"{DANE_ZONE}.", "DS")
    computed = [dns.dnssec.make_ds(f"{DANE_ZONE}.", key, "SHA256").to_text() for key in keys]
    assert ds_text.lower() in computed


def test_every_dane_table_record_is_served_as_published(bed: Bed) -> None:
    validating = bed.validating_nameservers[0]
    for name, rtype, values in published(bed):
        wire = ask_raw(validating, name, rtype)
        rcode, secure, count = header(wire)
        assert rcode == dns.rcode.NOERROR and count > 0, (name, rtype)
        assert secure == (zone_of(name) == DANE_ZONE), (name, rtype)
        try:
            answer = dns.message.from_wire(wire)
        except dns.exception.FormError:
            # dnspython refuses TLSA digests of the wrong length (see the test below).
            short = bed.expand(UNUSABLE["short"]).split()[-1]
            assert rtype == "TLSA" and short in {v.split()[-1] for v in values}, (name, values)
            continue
        found = answer.find_rrset(
            answer.answer,
            dns.name.from_text(name),
            dns.rdataclass.IN,
            dns.rdatatype.from_text(rtype),
        )
        assert sorted(received_text(r) for r in found) == sorted(
            published_text(rtype, v) for v in values
        ), (name, rtype)


def test_tlsa_records_pin_the_dane_certificate(bed: Bed) -> None:
    name = f"_25._tcp.mx1.all-tlsa.{DANE_ZONE}"
    answer = ask(bed.validating_nameservers[0], name, "TLSA")
    (tlsa,) = rrset(answer, name, "TLSA")
    assert (tlsa.usage, tlsa.selector, tlsa.mtype) == (3, 1, 1)
    assert tlsa.cert.hex() == tlsa_ee_digest(bed.dane_cert)
    assert bed.expand(USABLE_EE) == f"3 1 1 {tlsa_ee_digest(bed.dane_cert)}"
    assert EE not in bed.expand(USABLE_EE)
    # The certificate names every MX host of the table (a receiver can present it for any).
    leaf = x509.load_pem_x509_certificate(bed.dane_cert.cert_chain_pems[0].bytes())
    names = leaf.extensions.get_extension_for_class(x509.SubjectAlternativeName).value
    hosts = {host for scenario in DANE_SCENARIOS.values() for host, _ in scenario.hosts}
    assert hosts <= set(names.get_values_for_type(x509.DNSName))


def test_dnspython_refuses_a_tlsa_digest_of_the_wrong_length(bed: Bed) -> None:
    """A trap for DANE code: one such record (legal on the wire, unusable per RFC 7671) makes
    dnspython reject the whole reply as malformed, so it must not be taken for a DNS failure."""
    name = f"_25._tcp.short.unusable-tlsa.{DANE_ZONE}"
    wire = ask_raw(bed.validating_nameservers[0], name, "TLSA")
    assert header(wire) == (dns.rcode.NOERROR, True, 2)  # the TLSA record and its RRSIG
    with pytest.raises(dns.exception.FormError, match="length inconsistent"):
        dns.message.from_wire(wire)


# --------------------------------------------------------------------------------------------------
# The zone whose server is down.


def test_down_zone_lookups_fail_quickly(bed: Bed) -> None:
    validating = bed.validating_nameservers[0]
    for name, rdtype in [(DOWN_ZONE, "MX"), (f"mx.{DOWN_ZONE}", "A"), (f"mx.{DOWN_ZONE}", "A")]:
        started = time.monotonic()
        answer = ask(validating, name, rdtype)
        assert answer.rcode() == dns.rcode.SERVFAIL, (name, rdtype, answer)
        assert time.monotonic() - started < 2.0


def test_down_zone_is_a_signed_delegation_to_a_stopped_server(bed: Bed) -> None:
    # The parent proves the child is signed: a validated DS record.
    ds = ask(bed.validating_nameservers[0], DOWN_ZONE, "DS")
    assert is_secure(ds) and rrset(ds, DOWN_ZONE, "DS")
    # And nothing answers where the child's server was.
    query = dns.message.make_query(DOWN_ZONE, "SOA")
    with pytest.raises((dns.exception.Timeout, ConnectionRefusedError)):
        dns.query.udp(query, "127.0.0.1", port=bed.down_knot_port, timeout=0.5)
    # The domain of the table whose MX host is in the down zone has a secure MX all the same.
    domain = DANE_SCENARIOS["down-host"].domain
    mx = ask(bed.validating_nameservers[0], domain, "MX")
    assert is_secure(mx) and rrset(mx, domain, "MX")


# --------------------------------------------------------------------------------------------------
# Changes at run time.


def test_dynamic_updates_in_the_signed_zone_are_signed_at_once(bed: Bed) -> None:
    validating = bed.validating_nameservers[0]
    domain = bed.unique_dane_domain("signed")
    host = f"mx.{domain}"
    bed.dns_set(domain, "MX", [f"10 {host}."])
    bed.dns_set(host, "A", ["127.0.0.7"])
    bed.dns_set(f"_25._tcp.{host}", "TLSA", [bed.expand(USABLE_EE)])
    for name, rdtype in [(domain, "MX"), (host, "A"), (f"_25._tcp.{host}", "TLSA")]:
        answer = ask(validating, name, rdtype)
        assert is_secure(answer) and rrset(answer, name, rdtype), (name, rdtype, answer)
    bed.dns_delete(f"_25._tcp.{host}", "TLSA")
    gone = ask(validating, f"_25._tcp.{host}", "TLSA")
    assert (gone.rcode(), is_secure(gone)) == (dns.rcode.NXDOMAIN, True)


def test_mtasts_scenarios_still_resolve_through_both_resolvers(bed: Bed) -> None:
    name = f"_mta-sts.{domain_of('enforce')}"
    for nameserver in (bed.resolver_nameservers[0], bed.validating_nameservers[0]):
        answer = ask(nameserver, name, "TXT")
        assert [b"".join(r.strings).decode() for r in rrset(answer, name, "TXT")] == list(
            SCENARIOS["enforce"].txt
        )
