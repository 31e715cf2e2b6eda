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

``DaneCache`` keeps the verdicts for as long as their DNS TTLs allow, in memory only.
"""

from __future__ import annotations

import asyncio
import concurrent.futures
import enum
import logging
import time
from collections.abc import Callable
from dataclasses import dataclass
from typing import Protocol

from postfix_mtasts.lookups import SingleFlight
from postfix_mtasts.resolver import DNSTemporaryError, SecureAnswer

__all__ = ["DaneCache", "DaneResult", "DaneState", "HostDane", "evaluate", "tlsa_usable"]

log = logging.getLogger("postfix_mtasts.dane")

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


class DaneCache:
    """DANE verdicts, kept as long as the DNS TTLs allow.

    Separate from the MTA-STS policies: a verdict lives by its DNS TTLs (bounded by
    ``MIN_TTL``/``MAX_TTL``) and in memory only. Like the policy cache it answers at once while a
    verdict is fresh, revalidates in the background when three quarters of its TTL have passed,
    and lets concurrent askers for a new domain share one lookup (:mod:`lookups`). A verdict is
    never answered past its TTL.
    """

    def __init__(
        self,
        resolver: SecureResolver,
        *,
        deadline: float = 30.0,
        threads: int = 20,
        max_verdicts: int = 200000,
        clock: Callable[[], float] = time.time,
    ) -> None:
        self.resolver = resolver
        self.deadline = deadline
        self.max_verdicts = max_verdicts
        self._clock = clock
        # domain -> (verdict, valid until, refresh after)
        self._verdicts: dict[str, tuple[DaneResult, float, float]] = {}
        self._lookups: SingleFlight[str, DaneResult] = SingleFlight()
        self._pool = concurrent.futures.ThreadPoolExecutor(
            max_workers=threads, thread_name_prefix="dane"
        )
        self.lookups = 0

    def lookup(self, domain: str) -> DaneResult | asyncio.Future[DaneResult]:
        now = self._clock()
        known = self._verdicts.get(domain)
        if known is not None:
            verdict, valid_until, refresh_after = known
            if now < valid_until:
                if now >= refresh_after and domain not in self._lookups:
                    self._start(domain)
                return verdict
        return self._lookups.ask(
            domain, lambda: self._start(domain), self.deadline, _same, self._temp
        )

    def _temp(self, domain: str, job: asyncio.Future[DaneResult], exc: Exception) -> DaneResult:
        if isinstance(exc, TimeoutError):
            reason = f"DANE lookup still running after {self.deadline:.0f}s"
        else:
            reason = f"DANE lookup failed: {exc}"
        # Never a weaker answer for want of DNS: Postfix defers and asks again later.
        return DaneResult(domain, DaneState.TEMP, reason=reason, ttl=0)

    def _start(self, domain: str) -> asyncio.Future[DaneResult]:
        job = asyncio.get_running_loop().run_in_executor(self._pool, self._evaluate, domain)
        return self._lookups.start(domain, job, self._finished)

    def _evaluate(self, domain: str) -> DaneResult:
        started = time.monotonic()
        self.lookups += 1
        verdict = evaluate(domain, self.resolver)
        elapsed = (time.monotonic() - started) * 1000
        hosts = ", ".join(f"{h.host} {h.state}" for h in verdict.hosts)
        line = f"{domain}: DANE {verdict.state} ({verdict.reason}{'; ' if hosts else ''}{hosts})"
        if verdict.state is DaneState.TEMP:
            log.warning("%s; deferring mail to it (%.0f ms)", line, elapsed)
        else:
            log.info("%s (%.0f ms)", line, elapsed)
        return verdict

    def _finished(self, domain: str, job: asyncio.Future[DaneResult]) -> None:
        if job.cancelled() or job.exception() is not None:
            return
        verdict = job.result()
        now = self._clock()
        if domain not in self._verdicts and len(self._verdicts) >= self.max_verdicts:
            # Bounded like the policies: expired verdicts go first, then the oldest tenth.
            self.prune()
            if len(self._verdicts) >= self.max_verdicts:
                for old in list(self._verdicts)[: max(1, self.max_verdicts // 10)]:
                    del self._verdicts[old]
        self._verdicts[domain] = (verdict, now + verdict.ttl, now + verdict.ttl * 0.75)

    @property
    def size(self) -> int:
        """Verdicts held (for statistics)."""
        return len(self._verdicts)

    def prune(self) -> None:
        """Forget expired verdicts (called from maintenance)."""
        now = self._clock()
        for domain, (_, valid_until, _) in list(self._verdicts.items()):
            if valid_until <= now:
                del self._verdicts[domain]

    def close(self) -> None:
        self._pool.shutdown(wait=False, cancel_futures=True)


def _same(verdict: DaneResult) -> DaneResult:
    return verdict
