"""DANE for SMTP (RFC 7672): does a destination have a DNSSEC-validated, usable TLSA policy?

RFC 8461 §2: a sender that validates DANE must not let MTA-STS override it. So before an MTA-STS
answer, the daemon asks whether DANE applies to the destination, and answers ``dane-only`` or
``dane`` instead when it does. The verdict rests on the AD bit of the configured resolver, which
must validate DNSSEC; this module never validates signatures itself.

The decision, in RFC 7672's terms:

- the MX RRset must be validated (§2.2.1); a secure denial of MX makes the domain its own
  implicit MX, and a Null MX (RFC 7505) means no mail and so no policy;
- per MX host, TLSA records are looked up only when the host's address records are validated
  (§2.2.2), at ``_25._tcp.<host>`` (§3);
- a TLSA RRset is usable when one of its records has a usage, selector and matching type Postfix
  supports (usage DANE-TA(2) or DANE-EE(3), §3.1; selector 0 or 1; matching type 0, 1 or 2) and
  well-formed data; a validated TLSA RRset with no usable record still obliges TLS (§2.2).

Any lookup the decision needs that fails temporarily makes the whole answer ``TEMP``: a DANE
domain must never fall back to a weaker policy because its DNS is briefly unreachable.
"""

from __future__ import annotations

import enum
from dataclasses import dataclass
from typing import Protocol

from postfix_mtasts.resolver import DNSTemporaryError, SecureAnswer

__all__ = ["DaneResult", "DaneState", "HostDane", "evaluate", "tlsa_usable"]

# Bounds on how long a DANE verdict is kept: the DNS TTLs, but not less (a domain answering with
# TTL 0 would cost four queries per delivery) and not more (a change is seen within the hour).
MIN_TTL = 60
MAX_TTL = 3600
# A temporary failure is retried soon.
TEMP_TTL = 30

# Digest lengths of the matching types SHA2-256 (1) and SHA2-512 (2) (RFC 6698 §2.1.3).
_DIGEST_LENGTH = {1: 32, 2: 64}


class DaneState(enum.StrEnum):
    DANE_ONLY = "dane-only"  # every MX host has a validated, usable TLSA RRset
    DANE = "dane"  # some MX host has validated TLSA records
    NONE = "none"  # no DANE: MTA-STS decides
    NULL_MX = "null-mx"  # the domain accepts no mail (RFC 7505)
    TEMP = "temp"  # a lookup the decision needs failed temporarily


@dataclass(frozen=True, slots=True)
class HostDane:
    """The DANE state of one MX host: ``usable``, ``unusable`` (validated TLSA, none usable),
    ``no-tlsa`` (validated denial), ``insecure`` (not validated) or ``temp``."""

    host: str
    state: str
    detail: str = ""


@dataclass(frozen=True, slots=True)
class DaneResult:
    domain: str
    state: DaneState
    hosts: tuple[HostDane, ...] = ()
    reason: str = ""
    ttl: int = MIN_TTL


class SecureResolver(Protocol):
    """What :func:`evaluate` needs of :class:`postfix_mtasts.resolver.Resolver`."""

    def secure_query(self, name: str, rdtype: str) -> SecureAnswer: ...


def tlsa_usable(usage: int, selector: int, mtype: int, data: bytes) -> bool:
    """Whether one TLSA record can authenticate an SMTP server (RFC 7672 §3.1)."""
    if usage not in (2, 3) or selector not in (0, 1) or mtype not in (0, 1, 2):
        return False
    if mtype == 0:
        return len(data) > 0
    return len(data) == _DIGEST_LENGTH[mtype]


def _name(text: str) -> str:
    return text.rstrip(".").lower()


def _host_state(host: str, resolver: SecureResolver) -> tuple[HostDane, int]:
    """The DANE state of one MX host and the smallest TTL it rests on."""
    ttl = MAX_TTL
    # §2.2.2: TLSA records count only for a host whose address records are validated.
    addresses = resolver.secure_query(host, "A")
    if not addresses.exists and not addresses.nxdomain:
        addresses = resolver.secure_query(host, "AAAA")
    ttl = min(ttl, addresses.ttl)
    if not addresses.secure:
        return HostDane(host, "insecure", "address records not DNSSEC-validated"), ttl
    if not addresses.exists:
        return HostDane(host, "no-tlsa", "no address records"), ttl
    tlsa = resolver.secure_query(f"_25._tcp.{host}", "TLSA")
    ttl = min(ttl, tlsa.ttl)
    if not tlsa.secure:
        return HostDane(host, "insecure", "TLSA records not DNSSEC-validated"), ttl
    if not tlsa.exists:
        return HostDane(host, "no-tlsa", "validated: no TLSA records"), ttl
    usable = [r for r in tlsa.records if tlsa_usable(r.usage, r.selector, r.mtype, bytes(r.cert))]
    if usable:
        kinds = sorted({f"{r.usage} {r.selector} {r.mtype}" for r in usable})
        return HostDane(host, "usable", f"{len(usable)} usable TLSA ({', '.join(kinds)})"), ttl
    count = len(tlsa.records) + tlsa.malformed
    return HostDane(host, "unusable", f"{count} TLSA, none usable"), ttl


def evaluate(domain: str, resolver: SecureResolver) -> DaneResult:
    """The DANE verdict for mail to ``domain`` (a lowercase A-label domain)."""
    try:
        mx = resolver.secure_query(domain, "MX")
    except DNSTemporaryError as exc:
        return DaneResult(domain, DaneState.TEMP, reason=str(exc), ttl=TEMP_TTL)
    if not mx.secure:
        why = "domain does not exist" if mx.nxdomain else "MX records not DNSSEC-validated"
        return DaneResult(domain, DaneState.NONE, reason=why, ttl=_bounded(mx.ttl))
    if mx.nxdomain:
        return DaneResult(
            domain, DaneState.NONE, reason="validated: no such domain", ttl=_bounded(mx.ttl)
        )
    if mx.exists:
        exchanges = sorted((r.preference, _name(r.exchange.to_text())) for r in mx.records)
        if len(exchanges) == 1 and exchanges[0][1] == "":
            # RFC 7505: "MX 0 ." says the domain accepts no mail.
            return DaneResult(domain, DaneState.NULL_MX, reason="null MX", ttl=_bounded(mx.ttl))
        hosts = list(dict.fromkeys(host for _, host in exchanges if host))
    else:
        # RFC 5321 §5.1: without MX records the domain itself is the mail host (implicit MX).
        hosts = [domain]

    ttl = mx.ttl
    states: list[HostDane] = []
    for host in hosts:
        try:
            state, host_ttl = _host_state(host, resolver)
        except DNSTemporaryError as exc:
            states.append(HostDane(host, "temp", str(exc)))
            continue
        states.append(state)
        ttl = min(ttl, host_ttl)

    found = tuple(states)
    temp = [s for s in found if s.state == "temp"]
    if temp:
        return DaneResult(domain, DaneState.TEMP, found, temp[0].detail, TEMP_TTL)
    if all(s.state == "usable" for s in found):
        return DaneResult(
            domain, DaneState.DANE_ONLY, found, "every MX host has usable TLSA", _bounded(ttl)
        )
    if any(s.state in ("usable", "unusable") for s in found):
        return DaneResult(
            domain, DaneState.DANE, found, "some MX hosts have TLSA records", _bounded(ttl)
        )
    return DaneResult(domain, DaneState.NONE, found, "no validated TLSA records", _bounded(ttl))


def _bounded(ttl: int) -> int:
    return max(MIN_TTL, min(ttl, MAX_TTL))
