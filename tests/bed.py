"""A real DNS and HTTPS test bed on loopback: the servers MTA-STS discovery talks to, no mocks.

- knot (Debian package ``knot``) serves the zone ``mtasts.test`` authoritatively and accepts
  dynamic updates (RFC 2136) from loopback, so a test changes records at run time
  (``Bed.dns_set``).
- unbound (Debian package ``unbound``) is the recursive resolver the code under test asks; a stub
  zone sends ``mtasts.test`` to knot. It caches nothing, so an update is seen at once.
- A Python HTTPS server on port 443 of a loopback address serves the policy hosts
  ``mta-sts.<domain>``. Per host it can answer normally or misbehave (status, redirect, media type,
  delay, slow drip, hang, oversized body) and present a valid, expired, wrong-name or untrusted
  certificate from a throwaway CA made in this run (trustme).
- A "dead" nameserver: a bound UDP and TCP port that never answers.

SCENARIOS is the one table of the standard test domains ``<label>.mtasts.test``: their DNS
records and how their policy host behaves. ``Bed.start`` publishes all of them; tests read their
expectations from the same table.

DNSSEC and DANE (RFC 7672), for the DANE tests:

- knot also serves ``dane.test``, signed on the fly (ECDSA P-256, one combined key made with
  ``keymgr`` before knot starts, so its DS is known up front); dynamic updates are signed too.
- ``down.dane.test`` is a signed child zone (its DS is in ``dane.test``) served by a second knot.
  The bed starts it, checks that it validates, then stops it for good: from then on every lookup
  below it fails (SERVFAIL), the "signed zone whose server is down" case.
- A second unbound validates (``bed.validating_nameservers``): the DS of ``dane.test`` is its only
  trust anchor, so names in ``dane.test`` come back with the AD bit and names in the unsigned
  ``mtasts.test`` without it. The first unbound (``bed.resolver_nameservers``) knows the same zones
  but validates nothing.
- DANE_SCENARIOS is the one table of the DANE test domains, their records and what a DANE
  evaluation must conclude. TLSA data is made from a certificate of this run (``bed.dane_cert``).

The servers run as children of the test process with their own configuration, logs and state in a
temporary directory; nothing of the system's configuration is used or changed.
"""

from __future__ import annotations

import contextlib
import ctypes
import datetime
import errno
import hashlib
import os
import random
import shutil
import signal
import socket
import socketserver
import ssl
import subprocess
import threading
import time
import traceback
from collections.abc import Callable, Iterable, Iterator, Mapping, Sequence
from dataclasses import dataclass, field, replace
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path
from typing import Any, Literal

import dns.flags
import dns.message
import dns.name
import dns.query
import dns.rcode
import dns.rdata
import dns.rdataclass
import dns.rdataset
import dns.rdatatype
import dns.rdtypes.ANY.TXT
import dns.update
import dns.zone
import trustme
from cryptography import x509
from cryptography.hazmat.primitives import serialization

ZONE = "mtasts.test"
RECORD_TTL = 1
POLICY_PATH = "/.well-known/mta-sts.txt"

KNOTD = "/usr/sbin/knotd"
KEYMGR = "/usr/sbin/keymgr"
UNBOUND = "/usr/sbin/unbound"

# The signed zones (RFC 4033): dane.test is served by the bed's knot; down.dane.test, its signed
# child, by a second knot that is stopped once the bed has checked that it validates.
DANE_ZONE = "dane.test"
DOWN_ZONE = f"down.{DANE_ZONE}"
DNSSEC_ALGORITHM = "ecdsap256sha256"
# unbound gives up on a nameserver once its retransmit timeout reaches this (milliseconds), so a
# lookup in the stopped zone is a SERVFAIL within a fraction of a second instead of a long silence.
# knot on loopback answers in well under a millisecond.
MAX_RTT_MS = 400

# How long a server may take to come up, and how long to wait for it to stop before killing it.
STARTUP_TIMEOUT = 15.0
STOP_TIMEOUT = 5.0
# Socket timeout of the HTTPS server's connections (TLS handshake, reading the request). A "hang"
# response waits for the bed to stop (or HANG_LIMIT), never for the client.
HTTPS_IO_TIMEOUT = 10.0
HANG_LIMIT = 600.0

CertKind = Literal["valid", "expired", "wrongname", "untrusted"]
CERT_KINDS: tuple[CertKind, ...] = ("valid", "expired", "wrongname", "untrusted")
WRONG_NAME = "wrong.example"


class BedError(Exception):
    """The test bed could not be started or changed; the message says what to fix."""


# --------------------------------------------------------------------------------------------------
# The scenario table.


@dataclass(frozen=True)
class Response:
    """How a policy host answers every GET (any path).

    ``content_type`` None sends no Content-Type header. ``drip`` = (bytes per chunk, seconds between
    chunks). ``hang`` reads the request and never answers. ``headers`` are added last and override
    the defaults (Content-Length included).
    """

    body: bytes = b""
    status: int = 200
    content_type: str | None = "text/plain"
    delay: float = 0.0
    drip: tuple[int, float] | None = None
    hang: bool = False
    cert: CertKind = "valid"
    headers: Mapping[str, str] = field(default_factory=dict)


def policy_text(
    mode: str, mx: Sequence[str] = (), max_age: int = 86400, *, newline: str = "\n"
) -> bytes:
    """An RFC 8461 §3.2 policy body."""
    lines = ["version: STSv1", f"mode: {mode}", *(f"mx: {m}" for m in mx), f"max_age: {max_age}"]
    return (newline.join(lines) + newline).encode("ascii")


@dataclass(frozen=True)
class Scenario:
    """A test domain: the TXT records at ``_mta-sts.<domain>``, extra records, its policy host.

    ``records`` are (name relative to the domain, "@" for the domain itself, type, value): TXT
    values are raw text, others zone-file rdata with names relative to the zone. ``response`` None
    leaves the policy host without an address record. ``record_id``, ``mode``, ``mx`` and
    ``max_age`` are what a test expects discovery to find ("", 0 or empty when it finds nothing).
    """

    txt: tuple[str, ...] = ()
    response: Response | None = None
    records: tuple[tuple[str, str, str], ...] = ()
    record_id: str = ""
    mode: str = ""
    mx: tuple[str, ...] = ()
    max_age: int = 0


def _policy_scenario(
    label: str,
    mode: str = "enforce",
    *,
    other_txt: tuple[str, ...] = (),
    body: bytes | None = None,
    **response: Any,
) -> Scenario:
    """A domain with one valid record and a policy host serving a valid policy, maybe misbehaving
    as ``response`` (keyword arguments of Response) says."""
    record_id = f"{label}20240101"
    mx = (f"mail.{label}.{ZONE}", "*.example.net")
    policy = policy_text(mode, mx)
    return Scenario(
        txt=(*other_txt, f"v=STSv1; id={record_id};"),
        response=Response(body=policy if body is None else body, **response),
        record_id=record_id,
        mode=mode,
        mx=mx,
        max_age=86400,
    )


def _cname_scenario() -> Scenario:
    """_mta-sts.cname is a CNAME chain of two hops ending at a TXT record at another name."""
    plain = _policy_scenario("cname")
    return replace(
        plain,
        txt=(),
        records=(
            ("_mta-sts", "CNAME", "_mta-sts-hop.cname"),
            ("_mta-sts-hop", "CNAME", "sts-target.cname"),
            ("sts-target", "TXT", plain.txt[0]),
        ),
    )


def _scenarios() -> dict[str, Scenario]:
    # Domains without a usable record still serve a policy: a test can check nobody fetched it.
    unused = Response(body=policy_text("enforce", (f"mail.unused.{ZONE}",)))
    oversized = policy_text("enforce", (f"mail.oversized.{ZONE}",))
    oversized += b"x" * (70000 - len(oversized))
    return {
        "enforce": _policy_scenario("enforce", "enforce"),
        "testing": _policy_scenario("testing", "testing"),
        "none": _policy_scenario("none", "none"),
        # No TXT record at all: NXDOMAIN.
        "norecord": Scenario(response=unused),
        # RFC 8461 §3.1: more than one v=STSv1 record means no usable record.
        "tworecords": Scenario(
            txt=("v=STSv1; id=first1;", "v=STSv1; id=second2;"), response=unused
        ),
        # RFC 8461 §3.1: id is 1*32(ALPHA / DIGIT).
        "badrecord": Scenario(txt=("v=STSv1; id=bad-id!",), response=unused),
        # Starts with "v=STSv1;" but has no id field.
        "noid": Scenario(txt=("v=STSv1;",), response=unused),
        # RFC 8461 §3.1: records not starting with "v=STSv1;" are discarded: this is no record.
        "nosemicolon": Scenario(txt=("v=STSv1",), response=unused),
        # A TXT record that is not MTA-STS, next to the real one, is ignored.
        "othertxt": _policy_scenario("othertxt", other_txt=("some other text",)),
        "cname": _cname_scenario(),
        "notfound404": _policy_scenario("notfound404", body=b"not found\n", status=404),
        "error500": _policy_scenario("error500", body=b"oops\n", status=500),
        "redirect": _policy_scenario(
            "redirect",
            status=301,
            headers={"Location": f"https://mta-sts.enforce.{ZONE}{POLICY_PATH}"},
        ),
        "wrongtype": _policy_scenario("wrongtype", content_type="text/html"),
        "oversized": _policy_scenario("oversized", body=oversized),
        "wrongname": _policy_scenario("wrongname", cert="wrongname"),
        "expired": _policy_scenario("expired", cert="expired"),
        "untrusted": _policy_scenario("untrusted", cert="untrusted"),
        # One byte per half second: a 100-byte policy takes ~50 s, far past any test's deadline.
        "slow": _policy_scenario("slow", drip=(1, 0.5)),
        "hang": _policy_scenario("hang", hang=True),
        "badpolicy": _policy_scenario("badpolicy", body=b"version: STSv1\nmode: sometimes\n"),
        # The policy host has no address record.
        "nohost": Scenario(txt=("v=STSv1; id=nohost1;",), record_id="nohost1"),
    }


SCENARIOS: dict[str, Scenario] = _scenarios()


def domain_of(label: str) -> str:
    """The test domain of a scenario label."""
    return f"{label}.{ZONE}"


# --------------------------------------------------------------------------------------------------
# The DANE scenario table.

# Placeholders in TLSA and A rdata, filled in when the bed starts (the data depends on the run):
EE = "{ee}"  # SHA-256 of the SubjectPublicKeyInfo of bed.dane_cert
TA = "{ta}"  # SHA-512 of the bed CA's certificate
SHORT = "{short}"  # 20 bytes: a SHA-1-sized digest, the wrong length for matching type 1
HTTPS = "{https}"  # the address of the HTTPS policy server

# A TLSA record a DANE client can use for SMTP (RFC 7672 §3.1.1: DANE-EE, SPKI, SHA-256).
USABLE_EE = f"3 1 1 {EE}"
# RFC 7672 §3.1.2: DANE-TA, the full trust-anchor certificate, SHA-512.
USABLE_TA = f"2 0 2 {TA}"
# Records a DANE client must ignore: RFC 7672 §3.1.3 (PKIX-TA, PKIX-EE are unusable in SMTP), an
# unknown selector or matching type, a digest whose length does not fit its matching type (RFC 6698
# §2.1.3: 32 bytes for SHA2-256): malformed, hence unusable.
UNUSABLE = {
    "usage0": f"0 0 1 {EE}",
    "usage1": f"1 1 1 {EE}",
    "selector5": f"3 5 1 {EE}",
    "mtype7": f"3 1 7 {EE}",
    "short": f"3 1 1 {SHORT}",
}

# Expected per-host states (dane.HostDane.state).
USABLE = "usable"
UNUSABLE_TLSA = "unusable"
NO_TLSA = "no-tlsa"
INSECURE = "insecure"
TEMP = "temp"


@dataclass(frozen=True)
class DaneScenario:
    """A DANE test domain: its records and what a DANE evaluation must conclude.

    ``records`` are (absolute owner, type, zone-file rdata with absolute names); each goes to the
    zone the owner is in (mtasts.test, dane.test or down.dane.test) and may use the placeholders
    above. ``state`` is the expected ``dane.DaneState`` value and ``hosts`` the expected (MX host,
    host state) pairs in MX preference order. ``policy_mx``, when set, also publishes an MTA-STS
    ``enforce`` policy with those ``mx`` lines (record at ``_mta-sts.<domain>``, policy host
    ``mta-sts.<domain>`` on the bed's HTTPS server).
    """

    domain: str
    state: str
    records: tuple[tuple[str, str, str], ...] = ()
    hosts: tuple[tuple[str, str], ...] = ()
    policy_mx: tuple[str, ...] = ()

    @property
    def host_states(self) -> dict[str, str]:
        return dict(self.hosts)

    @property
    def mtasts_records(self) -> tuple[tuple[str, str, str], ...]:
        if not self.policy_mx:
            return ()
        record_id = "dane" + hashlib.sha256(self.domain.encode()).hexdigest()[:12]
        return (
            (f"_mta-sts.{self.domain}", "TXT", f"v=STSv1; id={record_id};"),
            (f"mta-sts.{self.domain}", "A", HTTPS),
        )

    @property
    def policy(self) -> bytes:
        return policy_text("enforce", self.policy_mx)


def _mx_domain(
    domain: str,
    state: str,
    *hosts: tuple[str, str, tuple[str, ...]],
    policy: bool = False,
) -> DaneScenario:
    """A domain with one MX per (host, expected host state, TLSA rdata) in preference order; each
    host gets a loopback A record and its TLSA records at ``_25._tcp.<host>`` (RFC 7672 §3.2)."""
    records: list[tuple[str, str, str]] = []
    for preference, (host, _state, tlsa) in enumerate(hosts, 1):
        records.append((domain, "MX", f"{preference * 10} {host}."))
        records.append((host, "A", "127.0.0.1"))
        records.extend((f"_25._tcp.{host}", "TLSA", rdata) for rdata in tlsa)
    return DaneScenario(
        domain=domain,
        state=state,
        records=tuple(records),
        hosts=tuple((host, host_state) for host, host_state, _tlsa in hosts),
        policy_mx=tuple(host for host, _state, _tlsa in hosts) if policy else (),
    )


def _dane_scenarios() -> dict[str, DaneScenario]:
    d = DANE_ZONE
    unusable_hosts = [
        (f"{kind}.unusable-tlsa.{d}", UNUSABLE_TLSA, (rdata,)) for kind, rdata in UNUSABLE.items()
    ]
    all_tlsa = _mx_domain(
        f"all-tlsa.{d}",
        "dane-only",
        (f"mx1.all-tlsa.{d}", USABLE, (USABLE_EE,)),
        (f"mx2.all-tlsa.{d}", USABLE, (USABLE_EE,)),
    )
    down_host = f"mx.{DOWN_ZONE}"
    return {
        # Every MX host has a usable TLSA RRset: mandatory DANE.
        "all-tlsa": all_tlsa,
        # One host with, one without: opportunistic DANE (Postfix enforces where there is TLSA).
        "some-tlsa": _mx_domain(
            f"some-tlsa.{d}",
            "dane",
            (f"mx1.some-tlsa.{d}", USABLE, (USABLE_EE,)),
            (f"mx2.some-tlsa.{d}", NO_TLSA, ()),
        ),
        # Signed, but no TLSA anywhere: DANE does not apply, the MTA-STS policy does.
        "no-tlsa": _mx_domain(
            f"no-tlsa.{d}",
            "none",
            (f"mx1.no-tlsa.{d}", NO_TLSA, ()),
            (f"mx2.no-tlsa.{d}", NO_TLSA, ()),
            policy=True,
        ),
        # Only unusable TLSA records: still DANE (RFC 7672 §2.2: TLS is mandatory, "dane").
        "unusable-tlsa": _mx_domain(f"unusable-tlsa.{d}", "dane", *unusable_hosts),
        # One usable record among unusable ones makes the RRset usable.
        "mixed-tlsa": _mx_domain(
            f"mixed-tlsa.{d}",
            "dane-only",
            (f"mx.mixed-tlsa.{d}", USABLE, (USABLE_TA, UNUSABLE["usage1"], UNUSABLE["short"])),
        ),
        # DANE and MTA-STS together: DANE wins (RFC 8461 §2).
        "dane-mtasts": _mx_domain(
            f"dane-mtasts.{d}",
            "dane-only",
            (f"mx.dane-mtasts.{d}", USABLE, (USABLE_EE,)),
            policy=True,
        ),
        # A secure NODATA for MX: the domain itself is the implicit MX (RFC 5321 §5.1).
        "implicit-mx": DaneScenario(
            domain=f"implicit-mx.{d}",
            state="dane-only",
            records=(
                (f"implicit-mx.{d}", "A", "127.0.0.1"),
                (f"_25._tcp.implicit-mx.{d}", "TLSA", USABLE_EE),
            ),
            hosts=((f"implicit-mx.{d}", USABLE),),
        ),
        # RFC 7505: a null MX accepts no mail; no policy at all.
        "null-mx": DaneScenario(
            domain=f"null-mx.{d}", state="null-mx", records=((f"null-mx.{d}", "MX", "0 ."),)
        ),
        # The MX RRset is reached through a CNAME (RFC 7672 §2.2.1), to a DANE-only domain.
        "cname-mx": DaneScenario(
            domain=f"cname-mx.{d}",
            state="dane-only",
            records=((f"cname-mx.{d}", "CNAME", f"all-tlsa.{d}."),),
            hosts=all_tlsa.hosts,
        ),
        # A secure NXDOMAIN: no DANE (and no MTA-STS either).
        "nxdomain": DaneScenario(domain=f"nxdomain.{d}", state="none"),
        # One MX host in the unsigned zone: its TLSA record (unsigned) is never trusted.
        "insecure-host": _mx_domain(
            f"insecure-host.{d}",
            "dane",
            (f"mx1.insecure-host.{d}", USABLE, (USABLE_EE,)),
            (f"mx2.insecure-host.{ZONE}", INSECURE, (USABLE_EE,)),
        ),
        # The MX RRset is in the unsigned zone, its host in the signed one with a TLSA record: the
        # MX is not secure, so DANE does not apply (RFC 7672 §2.2.1), no host is looked at, and
        # MTA-STS does apply.
        "unsigned-mx": replace(
            _mx_domain(
                f"unsigned-mx.{ZONE}",
                "none",
                (f"mx.unsigned-mx.{d}", USABLE, (USABLE_EE,)),
                policy=True,
            ),
            hosts=(),
        ),
        # The MX lookup itself fails: the signed child zone's server is down.
        "down": DaneScenario(
            domain=DOWN_ZONE,
            state="temp",
            records=(
                (DOWN_ZONE, "MX", f"10 {down_host}."),
                (down_host, "A", "127.0.0.1"),
                (f"_25._tcp.{down_host}", "TLSA", USABLE_EE),
            ),
        ),
        # The MX RRset is secure, but its host is in the zone whose server is down. It has an
        # MTA-STS policy too, which must not be answered instead: the TLSA records may exist.
        "down-host": DaneScenario(
            domain=f"down-host.{d}",
            state="temp",
            records=((f"down-host.{d}", "MX", f"10 {down_host}."),),
            hosts=((down_host, TEMP),),
            policy_mx=(down_host,),
        ),
    }


DANE_SCENARIOS: dict[str, DaneScenario] = _dane_scenarios()


def tlsa_ee_digest(cert: trustme.LeafCert) -> str:
    """The SHA-256 of a certificate's SubjectPublicKeyInfo, hex: the data of its ``3 1 1`` TLSA."""
    leaf = x509.load_pem_x509_certificate(cert.cert_chain_pems[0].bytes())
    spki = leaf.public_key().public_bytes(
        serialization.Encoding.DER, serialization.PublicFormat.SubjectPublicKeyInfo
    )
    return hashlib.sha256(spki).hexdigest()


def tlsa_ta_digest(ca: trustme.CA) -> str:
    """The SHA-512 of a CA's certificate, hex: the data of its ``2 0 2`` TLSA."""
    cert = x509.load_pem_x509_certificate(ca.cert_pem.bytes())
    return hashlib.sha512(cert.public_bytes(serialization.Encoding.DER)).hexdigest()


# --------------------------------------------------------------------------------------------------
# DNS helpers.


def _txt_rdata(value: str | Sequence[str]) -> dns.rdata.Rdata:
    """One TXT RR from raw text (split into 255-byte strings) or from explicit strings."""
    if isinstance(value, str):
        raw = value.encode("utf-8")
        strings = [raw[i : i + 255] for i in range(0, len(raw), 255)] or [b""]
    else:
        strings = [s.encode("utf-8") for s in value]
    return dns.rdtypes.ANY.TXT.TXT(dns.rdataclass.IN, dns.rdatatype.TXT, strings)


def _rdata(
    rdtype: dns.rdatatype.RdataType, value: str | Sequence[str], origin: dns.name.Name
) -> dns.rdata.Rdata:
    if rdtype == dns.rdatatype.TXT:
        return _txt_rdata(value)
    if not isinstance(value, str):
        raise TypeError(f"{dns.rdatatype.to_text(rdtype)} value must be zone-file text")
    if rdtype == dns.rdatatype.TLSA:
        # As raw wire data (RFC 3597): dnspython refuses to build a TLSA record whose digest has
        # the wrong length for its matching type, and such records must be publishable.
        usage, selector, mtype, data = value.split(None, 3)
        wire = bytes((int(usage), int(selector), int(mtype))) + bytes.fromhex("".join(data.split()))
        return dns.rdata.GenericRdata(dns.rdataclass.IN, rdtype, wire)
    return dns.rdata.from_text(dns.rdataclass.IN, rdtype, value, origin=origin)


RRsets = Iterable[tuple[str, str, Sequence[str | Sequence[str]]]]


def _scenario_rrsets(
    domain: str, scenario: Scenario, https_address: str
) -> Iterator[tuple[str, str, list[str | Sequence[str]]]]:
    """(absolute name, type, values) of one scenario published at ``domain``; TXT values are raw
    text, other values zone-file rdata with names relative to the domain's zone."""
    if scenario.txt:
        yield f"_mta-sts.{domain}", "TXT", list(scenario.txt)
    if scenario.response is not None:
        yield f"mta-sts.{domain}", "A", [https_address]
    for name, rtype, rdata in scenario.records:
        owner = domain if name == "@" else f"{name}.{domain}"
        yield owner, rtype, [rdata]


def zone_of(name: str) -> str:
    """The bed zone an absolute name belongs to (the most specific: down.dane.test before
    dane.test); BedError for a name in none of them."""
    name = name.rstrip(".").lower()
    for zone in (DOWN_ZONE, DANE_ZONE, ZONE):
        if name == zone or name.endswith("." + zone):
            return zone
    raise BedError(f"{name} is in none of the bed's zones ({ZONE}, {DANE_ZONE}, {DOWN_ZONE})")


def _write_zone_file(path: Path, zone_name: str, rrsets: RRsets) -> None:
    """A zone file with its apex (SOA, NS) and ``rrsets`` (absolute names, rdata relative to the
    zone); records of one name and type given in several entries are merged."""
    origin = dns.name.from_text(zone_name)
    zone = dns.zone.Zone(origin)

    def add(name: str, rtype: str, values: Iterable[str | Sequence[str]]) -> None:
        rdtype = dns.rdatatype.from_text(rtype)
        rdataset = zone.find_rdataset(dns.name.from_text(name), rdtype, create=True)
        for value in values:
            rdataset.add(_rdata(rdtype, value, origin), RECORD_TTL)

    # SOA minimum 1: negative answers (RFC 2308) are cached for at most a second too.
    add(zone_name, "SOA", [f"ns.{zone_name}. hostmaster.{zone_name}. 1 60 60 3600 {RECORD_TTL}"])
    add(zone_name, "NS", [f"ns.{zone_name}."])
    add(f"ns.{zone_name}", "A", ["127.0.0.1"])
    for name, rtype, values in rrsets:
        add(name, rtype, values)
    zone.to_file(str(path), relativize=False)


def _zone_rrsets(https_address: str, fill: Mapping[str, str]) -> dict[str, list[Any]]:
    """Every scenario's records (both tables), by zone."""
    by_zone: dict[str, list[Any]] = {ZONE: [], DANE_ZONE: [], DOWN_ZONE: []}
    for label, scenario in SCENARIOS.items():
        by_zone[ZONE].extend(_scenario_rrsets(domain_of(label), scenario, https_address))
    for dane in DANE_SCENARIOS.values():
        for name, rtype, value in (*dane.records, *dane.mtasts_records):
            by_zone[zone_of(name)].append((name, rtype, [_fill(value, fill)]))
    return by_zone


def _fill(value: str, fill: Mapping[str, str]) -> str:
    for placeholder, text in fill.items():
        value = value.replace(placeholder, text)
    return value


# --------------------------------------------------------------------------------------------------
# Processes and ports.


def _free_port(address: str = "127.0.0.1") -> int:
    """A port free for both UDP and TCP on address (DNS servers need both)."""
    for _ in range(100):
        with socket.socket(socket.AF_INET, socket.SOCK_DGRAM) as udp:
            udp.bind((address, 0))
            port: int = udp.getsockname()[1]
            with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as tcp:
                try:
                    tcp.bind((address, port))
                except OSError:
                    continue
                return port
    raise BedError(f"no free UDP+TCP port on {address}")


def _tail(path: Path, lines: int = 30) -> str:
    try:
        text = path.read_text(errors="replace")
    except OSError as exc:
        return f"(no log: {exc})"
    return "\n".join(text.splitlines()[-lines:]) or "(log is empty)"


def _die_with_parent() -> None:
    """In the child before exec: get SIGTERM when the test process dies (Linux prctl)."""
    pr_set_pdeathsig = 1
    with contextlib.suppress(OSError, AttributeError):
        ctypes.CDLL(None, use_errno=True).prctl(pr_set_pdeathsig, signal.SIGTERM)


class _Daemon:
    """A server running in the foreground as a child process, its output in a log file."""

    def __init__(self, name: str, argv: list[str], log_path: Path) -> None:
        self.name = name
        self.log_path = log_path
        with open(log_path, "ab") as log:
            self.process = subprocess.Popen(
                argv,
                stdin=subprocess.DEVNULL,
                stdout=log,
                stderr=subprocess.STDOUT,
                # A Ctrl-C in the terminal goes to pytest alone, whose teardown stops the server;
                # if pytest dies without a teardown, the kernel stops it (PR_SET_PDEATHSIG).
                start_new_session=True,
                preexec_fn=_die_with_parent,
            )

    def failure(self, what: str) -> BedError:
        return BedError(
            f"{self.name} {what}; last lines of {self.log_path}:\n{_tail(self.log_path)}"
        )

    def wait_until_answering(
        self, port: int, qname: str, rdtype: str, *, need_answer: bool = True
    ) -> None:
        """Query the server until it answers NOERROR (bounded), or fail with its log."""

        def judge(answer: dns.message.Message) -> str | None:
            if answer.rcode() == dns.rcode.NOERROR and (answer.answer or not need_answer):
                return None
            return f"rcode {dns.rcode.to_text(answer.rcode())}, {len(answer.answer)} answers"

        self._poll(port, dns.message.make_query(qname, rdtype), judge, "")

    def wait_until_secure(self, port: int, qname: str, rdtype: str) -> None:
        """A validating resolver: wait until it answers qname with the AD bit (RFC 4035 §3.2.3),
        or fail with its log (a bogus chain is a SERVFAIL, explained there)."""
        query = dns.message.make_query(qname, rdtype, want_dnssec=True)
        query.flags |= dns.flags.AD

        def judge(answer: dns.message.Message) -> str | None:
            secure = bool(answer.flags & dns.flags.AD)
            if answer.rcode() == dns.rcode.NOERROR and answer.answer and secure:
                return None
            return f"rcode {dns.rcode.to_text(answer.rcode())}, AD bit {secure}"

        self._poll(port, query, judge, " as validated")

    def _poll(
        self,
        port: int,
        query: dns.message.Message,
        judge: Callable[[dns.message.Message], str | None],
        how: str,
    ) -> None:
        """Send ``query`` until ``judge`` accepts an answer (returns None) or STARTUP_TIMEOUT
        passes; then fail with the last thing ``judge`` said and the server's log."""
        deadline = time.monotonic() + STARTUP_TIMEOUT
        last = "no answer"
        while time.monotonic() < deadline:
            if self.process.poll() is not None:
                raise self.failure(f"exited with status {self.process.returncode}")
            try:
                answer = dns.query.udp(query, "127.0.0.1", port=port, timeout=0.3)
            except (OSError, dns.exception.DNSException) as exc:
                last = f"{type(exc).__name__}: {exc}"
            else:
                verdict = judge(answer)
                if verdict is None:
                    return
                last = verdict
            time.sleep(0.05)
        question = query.question[0]
        raise self.failure(
            f"did not answer {question.name.to_text(omit_final_dot=True)} "
            f"{dns.rdatatype.to_text(question.rdtype)} on 127.0.0.1:{port}{how} "
            f"within {STARTUP_TIMEOUT:.0f}s ({last})"
        )

    def stop(self) -> None:
        if self.process.poll() is None:
            self.process.terminate()
            try:
                self.process.wait(STOP_TIMEOUT)
            except subprocess.TimeoutExpired:
                self.process.kill()
                self.process.wait()


def _require(binary: str, package: str) -> None:
    if not (os.access(binary, os.X_OK) or shutil.which(os.path.basename(binary))):
        raise BedError(
            f"{binary} not found: install the Debian package {package} "
            f"(apt-get install {package}, or run tests/run as root, which installs it)"
        )


def _binary(binary: str) -> str:
    return (
        binary if os.access(binary, os.X_OK) else shutil.which(os.path.basename(binary)) or binary
    )


@dataclass(frozen=True)
class _ZoneConfig:
    """A zone knot serves; ``signed`` turns on knot's automatic DNSSEC signing with the keys
    ``_generate_key`` put in its KASP database."""

    name: str
    file: Path
    signed: bool = False


def _knot_config(workdir: Path, port: int, zones: Sequence[_ZoneConfig]) -> str:
    def entry(zone: _ZoneConfig) -> str:
        text = f'  - domain: "{zone.name}."\n    file: "{zone.file}"'
        if zone.signed:
            # No zone transfers from a zone knot signs itself (nobody needs them, and knot warns
            # about IXFR after a zone file change).
            text += "\n    acl: loopback_update\n    dnssec-signing: on\n    dnssec-policy: bed"
        else:
            text += "\n    acl: [loopback_update, loopback_transfer]"
        return text

    zone_entries = "\n".join(entry(zone) for zone in zones)
    return f"""\
server:
    rundir: "{workdir}/run"
    listen: 127.0.0.1@{port}
    udp-workers: 2
    tcp-workers: 2
    background-workers: 1

log:
  - target: stderr
    any: info

database:
    storage: "{workdir}/db"

acl:
  - id: loopback_update
    address: 127.0.0.0/8
    action: update
  - id: loopback_transfer
    address: 127.0.0.0/8
    action: transfer

# Signed zones: knot signs the zone when it loads it and every dynamic update after that (NSEC,
# signatures valid for two weeks). manual: the keys are the ones keymgr made before the start,
# so the DS is known before knot runs; no rollover ever happens.
policy:
  - id: bed
    manual: on
    algorithm: {DNSSEC_ALGORITHM}

template:
  - id: default
    storage: "{workdir}/db"
    # The zone file is only read at start; updates live in the journal, never written back.
    zonefile-sync: -1
    zonefile-load: whole
    journal-content: changes

zone:
{zone_entries}
"""


def _generate_key(config: Path, zone: str) -> str:
    """Make the signing key of ``zone`` (one combined KSK/ZSK, RFC 6781 §3.1 "CSK") in the KASP
    database of knot's ``config``; its DS record (SHA-256, RFC 4509) as rdata text."""

    def keymgr(*args: str) -> str:
        result = subprocess.run(
            [_binary(KEYMGR), "-c", str(config), f"{zone}.", *args],
            capture_output=True,
            text=True,
            timeout=30,
            check=False,
        )
        if result.returncode != 0:
            raise BedError(f"keymgr {zone}. {' '.join(args)} failed: {result.stderr.strip()}")
        return result.stdout

    keymgr("generate", f"algorithm={DNSSEC_ALGORITHM}", "ksk=yes", "zsk=yes")
    # "dane.test. DS 25666 13 2 833d...": one line per digest type.
    for line in keymgr("ds").splitlines():
        fields = line.split()
        if len(fields) == 6 and fields[1] == "DS" and fields[4] == "2":
            return " ".join(fields[2:])
    raise BedError(f"keymgr {zone}. ds printed no SHA-256 DS record")


def unbound_config(
    workdir: Path,
    port: int,
    stubs: Mapping[str, str],
    trust_anchors: Sequence[str] = (),
    insecure: Sequence[str] = (),
    *,
    interface: str = "127.0.0.1",
    stub_zones_only: bool = False,
    log_queries: bool = False,
) -> str:
    """unbound as a recursive resolver on loopback; stubs maps zone -> "addr@port" of knot.

    With trust_anchors (DS or DNSKEY records in zone-file text) it validates (RFC 4035 §4.3):
    answers under an anchor are secure (AD bit) or bogus (SERVFAIL), others insecure; the zones in
    ``insecure`` are declared unsigned. With ``stub_zones_only`` every other name is NXDOMAIN, so
    a client of this resolver can reach nothing else by name (the delivery test's Postfix).
    ``log_queries`` logs every query the resolver receives (the benchmarks count them).
    """
    modules = "validator iterator" if trust_anchors else "iterator"
    anchors = "".join(f'    trust-anchor: "{anchor}"\n' for anchor in trust_anchors)
    anchors += "".join(f'    domain-insecure: "{zone}."\n' for zone in insecure)
    if trust_anchors:
        # Say in the log why an answer is bogus; no leniency about it. And no denials made up
        # from NSEC records seen earlier (RFC 8198): after a dynamic update they are stale.
        anchors += "    val-log-level: 2\n    val-permissive-mode: no\n    aggressive-nsec: no\n"
    # unbound ships a built-in "test." zone answering NXDOMAIN; nodefault lets ours through.
    tlds = dict.fromkeys(zone.rsplit(".", 1)[-1] for zone in stubs)
    local_zones = "".join(f'    local-zone: "{tld}." nodefault\n' for tld in tlds)
    if stub_zones_only:
        local_zones += '    local-zone: "." static\n' + "".join(
            f'    local-zone: "{zone}." transparent\n' for zone in stubs
        )
    stub_zones = "".join(
        f'stub-zone:\n    name: "{zone}."\n    stub-addr: {address}\n'
        for zone, address in stubs.items()
    )
    return f"""\
server:
    interface: {interface}
    port: {port}
    do-ip4: yes
    do-ip6: no
    do-udp: yes
    do-tcp: yes
    do-daemonize: no
    username: ""
    chroot: ""
    directory: "{workdir}"
    pidfile: "{workdir}/unbound.pid"
    use-syslog: no
    logfile: ""
    verbosity: 1
    num-threads: 1
    so-reuseport: no
    access-control: 127.0.0.0/8 allow
    # knot listens on loopback, which unbound refuses to query by default.
    do-not-query-localhost: no
    qname-minimisation: no
    module-config: "{modules}"
{anchors}\
    # Cache nothing beyond the moment: a dynamic update to knot is visible on the next query.
    cache-max-ttl: 0
    cache-max-negative-ttl: 0
    # Forget quickly that knot was down (tests may stop it), instead of the default 15 minutes.
    infra-host-ttl: 1
    infra-keep-probing: yes
    # A nameserver that does not answer (the stopped down.dane.test) is given up on quickly.
    infra-cache-max-rtt: {MAX_RTT_MS}
    log-queries: {"yes" if log_queries else "no"}
{local_zones}
{stub_zones}
remote-control:
    control-enable: no
"""


# --------------------------------------------------------------------------------------------------
# The HTTPS server.


@dataclass(frozen=True)
class Request:
    """One request as the HTTPS server received it."""

    host: str
    sni: str | None
    method: str
    path: str
    headers: Mapping[str, str]


def _strip_port(host: str) -> str:
    host = host.strip().lower()
    if host.startswith("["):
        return host[1 : host.find("]")] if "]" in host else host
    name, colon, port = host.rpartition(":")
    return name if colon and port.isdigit() else host


class _PolicyHandler(BaseHTTPRequestHandler):
    server: _TLSHTTPServer
    protocol_version = "HTTP/1.1"
    server_version = "mtasts-testbed/1"
    timeout = HTTPS_IO_TIMEOUT

    def do_GET(self) -> None:
        self._answer(send_body=True)

    def do_HEAD(self) -> None:
        self._answer(send_body=False)

    def _answer(self, *, send_body: bool) -> None:
        https = self.server.https
        self.close_connection = True
        sni = getattr(self.connection, "mtasts_sni", None)
        host = _strip_port(self.headers.get("Host") or sni or "")
        response = https.record(
            Request(host, sni, self.command, self.path, {k: v for k, v in self.headers.items()})
        )
        stopping = https.stopping
        if response.hang:
            stopping.wait(HANG_LIMIT)
            return
        if response.delay and stopping.wait(response.delay):
            return
        self.send_response(response.status)
        headers = {"Content-Length": str(len(response.body)), "Connection": "close"}
        if response.content_type is not None:
            headers["Content-Type"] = response.content_type
        headers.update(response.headers)
        for name, value in headers.items():
            self.send_header(name, value)
        self.end_headers()
        if not send_body:
            return
        if response.drip is None:
            self.wfile.write(response.body)
            return
        size, interval = response.drip
        for start in range(0, len(response.body), max(size, 1)):
            self.wfile.write(response.body[start : start + max(size, 1)])
            if stopping.wait(interval):
                return

    def log_message(self, format: str, *args: Any) -> None:
        self.server.https.log(f"{self.client_address[0]} {format % args}")


class _TLSHTTPServer(ThreadingHTTPServer):
    """TLS per connection in the handler thread, so a client that never finishes its handshake
    blocks only its own thread, never the accept loop."""

    daemon_threads = True

    def __init__(
        self, address: tuple[str, int], https: HTTPSServer, backlog: int | None = None
    ) -> None:
        self.https = https
        if backlog is not None:
            # socketserver reads it in server_activate(), called by the constructor.
            self.request_queue_size = backlog
        super().__init__(address, _PolicyHandler)

    def finish_request(self, request: Any, client_address: Any) -> None:
        request.settimeout(HTTPS_IO_TIMEOUT)
        try:
            tls = self.https.context.wrap_socket(request, server_side=True)
        except (OSError, ssl.SSLError) as exc:
            # Expected for the certificate scenarios: the client rejects our certificate.
            self.https.log(f"{client_address[0]} TLS handshake failed: {exc}")
            return
        try:
            _PolicyHandler(tls, client_address, self)
        finally:
            with contextlib.suppress(OSError):
                tls.close()

    def server_bind(self) -> None:
        # HTTPServer.server_bind looks up the address's host name (getfqdn), which can wait for
        # the system's DNS; the bed must not depend on the machine's resolver.
        socketserver.TCPServer.server_bind(self)
        self.server_name, self.server_port = self.server_address[:2]  # type: ignore[assignment]

    def handle_error(self, request: Any, client_address: Any) -> None:
        self.https.log(f"{client_address[0]} error:\n{traceback.format_exc()}")


class HTTPSServer:
    """Policy hosts on https://<address>:443 with per-host behaviour; thread-safe."""

    def __init__(
        self,
        ca: trustme.CA,
        address: str,
        port: int,
        log_path: Path,
        *,
        backlog: int | None = None,
    ) -> None:
        self._ca = ca
        self._untrusted_ca = trustme.CA(organization_name="not the test CA")
        self._lock = threading.Lock()
        self._responses: dict[str, Response] = {}
        self._counts: dict[str, int] = {}
        self._requests: dict[str, list[Request]] = {}
        self._contexts: dict[tuple[str, CertKind], ssl.SSLContext] = {}
        self._log_path = log_path
        self.stopping = threading.Event()
        self.context = self._make_context(ca.issue_cert("localhost", address))
        self.context.sni_callback = self._on_sni
        self._server = _TLSHTTPServer((address, port), self, backlog)
        self.address: str = self._server.server_address[0]  # type: ignore[assignment]
        self.port: int = self._server.server_address[1]
        self._thread = threading.Thread(
            target=self._server.serve_forever, kwargs={"poll_interval": 0.1}, daemon=True
        )
        self._thread.start()

    # -- configuration by tests ---------------------------------------------------------------

    def set(
        self,
        host: str,
        *,
        body: bytes | str = b"",
        status: int = 200,
        content_type: str | None = "text/plain",
        delay: float = 0.0,
        drip: tuple[int, float] | None = None,
        hang: bool = False,
        cert: CertKind = "valid",
        headers: Mapping[str, str] | None = None,
    ) -> None:
        """Replace how ``host`` answers (every path). Unknown hosts answer 404."""
        if cert not in CERT_KINDS:
            raise ValueError(f"cert must be one of {CERT_KINDS}, not {cert!r}")
        if isinstance(body, str):
            body = body.encode("utf-8")
        self.set_response(
            host,
            Response(body, status, content_type, delay, drip, hang, cert, dict(headers or {})),
        )

    def set_response(self, host: str, response: Response) -> None:
        with self._lock:
            self._responses[_strip_port(host)] = response

    def response(self, host: str) -> Response:
        with self._lock:
            return self._responses.get(_strip_port(host), _UNKNOWN_HOST)

    def request_count(self, host: str) -> int:
        with self._lock:
            return self._counts.get(_strip_port(host), 0)

    def requests(self, host: str) -> list[Request]:
        """The requests ``host`` received since the last reset, oldest first."""
        with self._lock:
            return list(self._requests.get(_strip_port(host), ()))

    def reset_counts(self) -> None:
        with self._lock:
            self._counts.clear()
            self._requests.clear()

    # -- server side --------------------------------------------------------------------------

    def record(self, request: Request) -> Response:
        with self._lock:
            self._counts[request.host] = self._counts.get(request.host, 0) + 1
            self._requests.setdefault(request.host, []).append(request)
            return self._responses.get(request.host, _UNKNOWN_HOST)

    def log(self, line: str) -> None:
        stamp = time.strftime("%H:%M:%S")
        with self._lock, open(self._log_path, "a") as log:
            log.write(f"{stamp} {line}\n")

    def _make_context(self, cert: trustme.LeafCert) -> ssl.SSLContext:
        context = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER)
        cert.configure_cert(context)
        return context

    def _context_for(self, host: str, kind: CertKind) -> ssl.SSLContext:
        with self._lock:
            context = self._contexts.get((host, kind))
        if context is not None:
            return context
        now = datetime.datetime.now(datetime.UTC)
        if kind == "valid":
            cert = self._ca.issue_cert(host)
        elif kind == "wrongname":
            cert = self._ca.issue_cert(WRONG_NAME)
        elif kind == "expired":
            cert = self._ca.issue_cert(
                host,
                not_before=now - datetime.timedelta(days=30),
                not_after=now - datetime.timedelta(days=1),
            )
        else:
            cert = self._untrusted_ca.issue_cert(host)
        context = self._make_context(cert)
        with self._lock:
            return self._contexts.setdefault((host, kind), context)

    def _on_sni(self, sock: ssl.SSLObject | ssl.SSLSocket, server_name: str | None, _: Any) -> None:
        sock.mtasts_sni = server_name  # type: ignore[union-attr]
        if server_name:
            host = server_name.lower()
            sock.context = self._context_for(host, self.response(host).cert)

    def close(self) -> None:
        self.stopping.set()
        self._server.shutdown()
        self._server.server_close()
        self._thread.join(STOP_TIMEOUT)


_UNKNOWN_HOST = Response(body=b"no such policy host in the test bed\n", status=404)


def _bind_https(
    ca: trustme.CA,
    port: int,
    log_path: Path,
    address: str | None = None,
    *,
    backlog: int | None = None,
) -> HTTPSServer:
    """Bind port 443 on a random 127.x address, so several test runs on one machine coexist."""
    if address:
        candidates = [address]
    else:
        candidates = [
            f"127.{random.randint(1, 254)}.{random.randint(0, 255)}.{random.randint(1, 254)}"
            for _ in range(20)
        ]
        candidates.append("127.0.0.1")
    last: OSError | None = None
    for candidate in candidates:
        try:
            return HTTPSServer(ca, candidate, port, log_path, backlog=backlog)
        except PermissionError as exc:
            raise BedError(
                f"cannot bind the HTTPS server to {candidate}:{port} ({exc}): the policy fetch "
                "goes to port 443, which needs root; run the tests as root (sudo tests/run)"
            ) from exc
        except OSError as exc:
            if exc.errno not in (errno.EADDRINUSE, errno.EADDRNOTAVAIL):
                raise
            last = exc
    raise BedError(f"cannot bind the HTTPS server to port {port} on loopback: {last}")


# --------------------------------------------------------------------------------------------------
# The dead nameserver.


class _DeadNameserver:
    """A UDP and a TCP socket on one port that never answer: queries time out."""

    def __init__(self) -> None:
        for _ in range(100):
            self.udp = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
            self.udp.bind(("127.0.0.1", 0))
            self.port: int = self.udp.getsockname()[1]
            self.tcp = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
            try:
                self.tcp.bind(("127.0.0.1", self.port))
            except OSError:
                self.udp.close()
                self.tcp.close()
                continue
            # The kernel completes TCP handshakes into the backlog; nobody ever reads.
            self.tcp.listen(64)
            return
        raise BedError("no free UDP+TCP port for the dead nameserver")

    @property
    def address(self) -> str:
        return f"127.0.0.1:{self.port}"

    def close(self) -> None:
        self.udp.close()
        self.tcp.close()


# --------------------------------------------------------------------------------------------------
# The bed.


class Bed:
    """The running servers. Use ``Bed.start(workdir)`` and ``stop()`` (or ``with``)."""

    zone: str = ZONE
    dane_zone: str = DANE_ZONE
    down_zone: str = DOWN_ZONE

    def __init__(self, workdir: Path) -> None:
        self.workdir = workdir
        self._daemons: list[_Daemon] = []
        self._closers: list[Any] = []
        self.resolver_nameservers: list[str] = []
        self.validating_nameservers: list[str] = []
        self.auth_nameservers: list[str] = []
        self.ca_file = ""
        self.dead_nameserver = ""
        self.knot_port = 0
        self.down_knot_port = 0
        self.unbound_port = 0
        self.validating_port = 0
        # Trust anchors of the validating resolver, zone-file text: ["dane.test. DS ..."].
        self.dane_trust_anchors: list[str] = []
        self._placeholders: dict[str, str] = {}
        self._update_ports: dict[str, int] = {}

    @classmethod
    def start(
        cls,
        workdir: Path,
        *,
        https_port: int = 443,
        log_queries: bool = False,
        https_backlog: int | None = None,
    ) -> Bed:
        """Start every server. ``log_queries``: the plain unbound logs each query it receives;
        ``https_backlog``: the HTTPS server's listen backlog (the benchmarks open hundreds of
        connections at once)."""
        bed = cls(workdir)
        try:
            bed._start(https_port, log_queries, https_backlog)
        except BaseException:
            bed.stop()
            raise
        return bed

    def _start(self, https_port: int, log_queries: bool, https_backlog: int | None) -> None:
        _require(KNOTD, "knot")
        _require(KEYMGR, "knot")
        _require(UNBOUND, "unbound")
        self.ca = trustme.CA(organization_name="postfix-mtasts test bed")
        ca_path = self.workdir / "ca.pem"
        self.ca.cert_pem.write_to_path(str(ca_path))
        self.ca_file = str(ca_path)
        # The certificate the DANE scenarios' TLSA records (3 1 1) pin, valid for all their hosts.
        dane_hosts = sorted(
            {host for dane in DANE_SCENARIOS.values() for host, _state in dane.hosts}
        )
        self.dane_cert = self.ca.issue_cert(*dane_hosts)

        self.https = _bind_https(
            self.ca, https_port, self.workdir / "https.log", backlog=https_backlog
        )
        self._closers.append(self.https.close)
        self.https_address = self.https.address
        self.https_port = self.https.port

        dead = _DeadNameserver()
        self._closers.append(dead.close)
        self.dead_nameserver = dead.address

        ee = tlsa_ee_digest(self.dane_cert)
        self._placeholders = {
            EE: ee,
            TA: tlsa_ta_digest(self.ca),
            SHORT: ee[:40],
            HTTPS: self.https_address,
        }
        down_knot = self._start_knots()
        self._start_unbounds(log_queries)
        self._stop_down_zone(down_knot)

        for label, scenario in SCENARIOS.items():
            if scenario.response is not None:
                self.https.set_response(f"mta-sts.{domain_of(label)}", scenario.response)
        for dane in DANE_SCENARIOS.values():
            if dane.policy_mx:
                self.https.set_response(f"mta-sts.{dane.domain}", Response(body=dane.policy))

    def _start_knots(self) -> _Daemon:
        """The bed's knot (mtasts.test, dane.test signed) and the down.dane.test knot, started
        together; the latter is returned, to be stopped once it has been seen validating."""
        main_dir, down_dir = self.workdir / "knot", self.workdir / "knot-down"
        for directory in (main_dir, down_dir):
            for sub in ("run", "db", "zones"):
                (directory / sub).mkdir(parents=True, exist_ok=True)
        self.knot_port = _free_port()
        self.down_knot_port = _free_port()
        files = {
            ZONE: main_dir / "zones" / f"{ZONE}.zone",
            DANE_ZONE: main_dir / "zones" / f"{DANE_ZONE}.zone",
            DOWN_ZONE: down_dir / "zones" / f"{DOWN_ZONE}.zone",
        }
        main_config, down_config = main_dir / "knot.conf", down_dir / "knot.conf"
        main_config.write_text(
            _knot_config(
                main_dir,
                self.knot_port,
                [_ZoneConfig(ZONE, files[ZONE]), _ZoneConfig(DANE_ZONE, files[DANE_ZONE], True)],
            )
        )
        down_config.write_text(
            _knot_config(
                down_dir, self.down_knot_port, [_ZoneConfig(DOWN_ZONE, files[DOWN_ZONE], True)]
            )
        )
        dane_ds = _generate_key(main_config, DANE_ZONE)
        down_ds = _generate_key(down_config, DOWN_ZONE)
        self.dane_trust_anchors = [f"{DANE_ZONE}. DS {dane_ds}"]

        rrsets = _zone_rrsets(self.https_address, self._placeholders)
        # The secure delegation of down.dane.test (RFC 4035 §2.4): NS, glue and DS in the parent.
        rrsets[DANE_ZONE] += [
            (DOWN_ZONE, "NS", [f"ns.{DOWN_ZONE}."]),
            (f"ns.{DOWN_ZONE}", "A", ["127.0.0.1"]),
            (DOWN_ZONE, "DS", [down_ds]),
        ]
        for zone, path in files.items():
            _write_zone_file(path, zone, rrsets[zone])

        knot = _Daemon("knotd", [_binary(KNOTD), "-c", str(main_config)], main_dir / "knot.log")
        self._daemons.append(knot)
        down = _Daemon(
            "knotd (down.dane.test)",
            [_binary(KNOTD), "-c", str(down_config)],
            down_dir / "knot.log",
        )
        self._daemons.append(down)
        knot.wait_until_answering(self.knot_port, ZONE, "SOA")
        knot.wait_until_answering(self.knot_port, DANE_ZONE, "DNSKEY")
        down.wait_until_answering(self.down_knot_port, DOWN_ZONE, "DNSKEY")
        self.auth_nameservers = [f"127.0.0.1:{self.knot_port}"]
        self._update_ports = {
            ZONE: self.knot_port,
            DANE_ZONE: self.knot_port,
            DOWN_ZONE: self.down_knot_port,
        }
        return down

    def _start_unbounds(self, log_queries: bool) -> None:
        """The plain resolver and the validating one, started together."""
        stubs = {
            ZONE: f"127.0.0.1@{self.knot_port}",
            DANE_ZONE: f"127.0.0.1@{self.knot_port}",
            DOWN_ZONE: f"127.0.0.1@{self.down_knot_port}",
        }
        plain_dir, validating_dir = self.workdir / "unbound", self.workdir / "unbound-validating"
        self.unbound_port = _free_port()
        self.validating_port = _free_port()
        started = []
        for directory, port, config_text, name in (
            (
                plain_dir,
                self.unbound_port,
                unbound_config(plain_dir, self.unbound_port, stubs, log_queries=log_queries),
                "unbound",
            ),
            (
                validating_dir,
                self.validating_port,
                unbound_config(
                    validating_dir,
                    self.validating_port,
                    stubs,
                    trust_anchors=self.dane_trust_anchors,
                    insecure=[ZONE],
                ),
                "unbound (validating)",
            ),
        ):
            directory.mkdir(parents=True, exist_ok=True)
            config = directory / "unbound.conf"
            config.write_text(config_text)
            unbound = _Daemon(
                name, [_binary(UNBOUND), "-d", "-c", str(config)], directory / "unbound.log"
            )
            self._daemons.append(unbound)
            started.append((unbound, port))
        for unbound, port in started:
            unbound.wait_until_answering(port, f"_mta-sts.enforce.{ZONE}", "TXT")
        validating = started[1][0]
        for name in (DANE_ZONE, DOWN_ZONE):
            validating.wait_until_secure(self.validating_port, name, "SOA")
        self.resolver_nameservers = [f"127.0.0.1:{self.unbound_port}"]
        self.validating_nameservers = [f"127.0.0.1:{self.validating_port}"]

    def _stop_down_zone(self, down: _Daemon) -> None:
        """Stop the down.dane.test server for good: its zone validated a moment ago (DS in the
        parent, signed answers), now every lookup below it fails."""
        down.stop()
        self._daemons.remove(down)

    def stop(self) -> None:
        for daemon in reversed(self._daemons):
            daemon.stop()
        self._daemons.clear()
        for close in reversed(self._closers):
            with contextlib.suppress(Exception):
                close()
        self._closers.clear()

    def __enter__(self) -> Bed:
        return self

    def __exit__(self, *exc: object) -> None:
        self.stop()

    # -- helpers for tests --------------------------------------------------------------------

    def domain(self, label: str) -> str:
        """``<label>.mtasts.test``."""
        return domain_of(label)

    def unique_domain(self, prefix: str = "d") -> str:
        """A fresh domain in the zone that no other test uses (for tests that change records)."""
        return domain_of(_unique_label(prefix))

    def unique_dane_domain(self, prefix: str = "d") -> str:
        """A fresh domain in the signed zone dane.test that no other test uses."""
        return f"{_unique_label(prefix)}.{DANE_ZONE}"

    def expand(self, rdata: str) -> str:
        """Zone-file rdata of the DANE table with its placeholders ({ee}, {ta}, ...) filled in."""
        return _fill(rdata, self._placeholders)

    def add_domain(self, domain: str, scenario: Scenario) -> None:
        """Publish a scenario's records and policy host under ``domain`` (in one of the zones)."""
        for name, rtype, values in _scenario_rrsets(
            domain.rstrip("."), scenario, self.https_address
        ):
            self.dns_set(name, rtype, values)
        if scenario.response is not None:
            self.https.set_response(f"mta-sts.{domain.rstrip('.').lower()}", scenario.response)

    def dns_set(
        self, name: str, rtype: str, values: Sequence[str | Sequence[str]], ttl: int = RECORD_TTL
    ) -> None:
        """Replace the RRset ``name``/``rtype`` in knot by dynamic update (empty values: delete).

        ``name`` is absolute in one of the bed's zones (``x.mtasts.test``, ``x.dane.test``;
        trailing dot optional) or relative to mtasts.test. TXT values are the raw text (or a
        sequence of its strings); other types are zone-file rdata, with names relative to the
        name's zone. In dane.test, knot signs the change at once.
        """
        zone, owner = self._owner(name)
        origin = dns.name.from_text(zone)
        rdtype = dns.rdatatype.from_text(rtype)
        update = dns.update.UpdateMessage(origin)
        if values:
            rdataset = dns.rdataset.Rdataset(dns.rdataclass.IN, rdtype)
            for value in values:
                rdataset.add(_rdata(rdtype, value, origin), ttl)
            update.replace(owner, rdataset)
        else:
            update.delete(owner, rdtype)
        self._send_update(zone, update, f"{owner} {rtype}")

    def dns_delete(self, name: str, rtype: str | None = None) -> None:
        """Delete the RRset ``name``/``rtype`` (every RRset of the name when rtype is None)."""
        zone, owner = self._owner(name)
        update = dns.update.UpdateMessage(dns.name.from_text(zone))
        if rtype is None:
            update.delete(owner)
        else:
            update.delete(owner, dns.rdatatype.from_text(rtype))
        self._send_update(zone, update, f"{owner} {rtype or 'ANY'}")

    def _send_update(self, zone: str, update: dns.update.UpdateMessage, what: str) -> None:
        port = self._update_ports[zone]
        try:
            answer = dns.query.tcp(update, "127.0.0.1", port=port, timeout=5)
        except (OSError, dns.exception.DNSException) as exc:
            raise BedError(f"dynamic update of {what} failed: {exc}") from exc
        if answer.rcode() != dns.rcode.NOERROR:
            raise BedError(f"dynamic update of {what} refused: {dns.rcode.to_text(answer.rcode())}")

    def _owner(self, name: str) -> tuple[str, dns.name.Name]:
        """(zone, absolute owner) of ``name``: absolute in a bed zone, or relative to mtasts.test
        ("@" for its apex)."""
        text = name.rstrip(".").lower()
        try:
            return zone_of(text), dns.name.from_text(text)
        except BedError:
            return ZONE, dns.name.from_text(text, dns.name.from_text(ZONE))


def _unique_label(prefix: str) -> str:
    with _unique_lock:
        _unique_counter[0] += 1
        return f"{prefix}{_unique_counter[0]}-{os.getpid()}"


_unique_lock = threading.Lock()
_unique_counter = [0]
