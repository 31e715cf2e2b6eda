"""The policy cache: RFC 8461 §3.3 and §5 semantics on top of a dumb store.

MTA-STS is trust on first use: a policy, once fetched, must be applied until it expires, whatever
DNS or HTTPS say in between, because an attacker who can block discovery can make a domain look
unprotected. So this cache answers from what it holds whenever it may, and goes to the network only
for a domain it has never seen, or in the background:

- a cached, unexpired policy is answered at once; when its TXT record was last checked longer ago
  than ``txt_check_interval``, the record is checked in the background, and a changed ``id`` fetches
  the new policy (§3.3);
- a policy is refetched before it expires (proactive refresh, §3.3, daily by default), and is never
  used after ``fetched_at + max_age`` (§5); only a successful fetch extends its life;
- a failed fetch keeps the cached policy and is not retried for five minutes (§3.3);
- a fetched ``mode: none`` policy replaces whatever was cached (§8.3);
- a domain without a record is remembered briefly, so it does not cost a TXT query per delivery;
- concurrent askers for one domain share one lookup: one TXT query, one HTTPS GET.

What this machine runs short of is never taken for a fact about a domain: network lookups run at
most ``max_lookups`` at once, the others wait their turn within their askers' deadline (and are
answered ``TEMP`` if it does not come: a local bottleneck defers mail, it does not downgrade it); a
lookup that fails for a local reason (no file descriptor, no thread: ``LocalError``) is not
remembered; and the domains held in memory are bounded (``memory_domains``), those without a
policy going first.

Everything here runs on the event loop, except what blocks: reading and writing the store, and
the HTTPS fetch (requests), which run in a thread pool. A lookup's DNS questions (the TXT record,
the policy host's IPv4 addresses) are asked from the loop itself: in a lookup thread, each of a
question's system calls would hand the interpreter lock to another thread. The hot path, a cached
answer, is a dict look-up and two comparisons.
"""

from __future__ import annotations

import asyncio
import concurrent.futures
import contextlib
import functools
import heapq
import logging
import math
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass, replace
from typing import NamedTuple

from postfix_mtasts import dane, mtasts
from postfix_mtasts.fetch import Fetcher
from postfix_mtasts.mtasts import Mode, Policy
from postfix_mtasts.resolver import (
    AddressOutcome,
    DNSFailure,
    LocalError,
    Resolver,
)
from postfix_mtasts.store import Entry, Store, StoreError

__all__ = ["CacheSettings", "DaneCache", "Decision", "PolicyDB"]

log = logging.getLogger("postfix_mtasts.policydb")

# A temporary DNS failure is retried sooner than the RFC's five minutes for a failed fetch.
DNS_RETRY_INTERVAL = 60.0
# Threads reading and writing the store (the SQLite store serialises its statements anyway).
STORE_THREADS = 4
# When the domains in memory reach memory_domains, this share of them is dropped at once, so that
# the (rare) work of choosing them is not done again at every new domain.
SHRINK_SHARE = 0.1
# An outage (the store failing, local resources running out) is logged when it starts, and then
# at most this often while it lasts, with the number of failures since.
OUTAGE_LOG_INTERVAL = 60.0


@dataclass(frozen=True, slots=True)
class CacheSettings:
    txt_check_interval: float = 300.0
    refresh_interval: float = 86400.0
    unused_after: float = 30 * 86400.0
    no_record_ttl: float = 300.0
    fetch_retry_interval: float = 300.0
    first_lookup_deadline: float = 30.0
    maintenance_interval: float = 60.0
    lookup_threads: int = 100
    max_lookups: int = 100
    memory_domains: int = 200000


@dataclass(frozen=True, slots=True)
class Decision:
    """What the cache says about one policy domain right now.

    ``policy`` is the policy to apply, or ``None`` when the domain has no usable policy (no record,
    failed discovery without a cached policy, expired). A ``mode: none`` policy is kept as such.
    ``error`` is the last failure, for logs and the query tool; ``failure`` its RFC 8460 type.
    ``defer`` is set (to the reason) when nothing could be decided for a local reason, such as
    too many lookups at once or no file descriptor left: Postfix is to try again later.
    """

    domain: str
    policy: Policy | None
    policy_text: str | None = None
    record_id: str | None = None
    expires_at: float | None = None
    error: str = ""
    failure: str = ""
    defer: str = ""


class _Slot:
    """The in-memory state of one domain: the decision to answer with, until when it may be
    answered without asking anyone, and when the domain was last used.

    The entry behind the decision lives in the store, not here: a revalidation reads it again
    (another daemon may have refreshed it meanwhile). Only an entry the store failed to save is
    kept in memory (``unsaved``), so that a store that fails loses nothing. Kept this small because
    there is one per cached domain: at 100000 domains every attribute costs megabytes.
    """

    __slots__ = (
        "check_after",
        "decision",
        "last_used",
        "pending",
        "touched",
        "unsaved",
        "valid_until",
        "wanted_until",
    )

    def __init__(
        self,
        decision: Decision,
        valid_until: float,
        check_after: float,
        last_used: float,
        unsaved: Entry | None = None,
    ):
        self.decision = decision
        self.valid_until = valid_until
        self.check_after = check_after
        self.last_used = last_used
        # Used since the last flush() wrote the last-used times to the store.
        self.touched = True
        self.unsaved = unsaved
        self.pending: asyncio.Future[_Result] | None = None
        # Until when (time.monotonic()) someone waits for the pending lookup's first answer: a
        # lookup still waiting for its turn after that is dropped.
        self.wanted_until = 0.0


class _Result(NamedTuple):
    """What a lookup returns: the entry, the decision, whether the store holds the entry, and
    whether the entry came from the store due for a check (to be made now, in the background)."""

    entry: Entry
    decision: Decision
    saved: bool
    revalidate: bool = False


class _Abandoned(Exception):
    """A lookup that waited for its turn until nobody waited for it any more."""


class _Outage:
    """Logs a run of failures of one kind (the store, local resources) once when it starts, then
    at most every OUTAGE_LOG_INTERVAL seconds, and once when it ends: never once per request.
    Safe to call from the lookup threads."""

    def __init__(self, what: str) -> None:
        self.what = what
        self._lock = threading.Lock()
        self._failures = 0
        self._logged_at = -math.inf

    def failed(self, detail: str, consequence: str) -> None:
        now = time.monotonic()
        with self._lock:
            self._failures += 1
            first = self._failures == 1
            if not first and now - self._logged_at < OUTAGE_LOG_INTERVAL:
                return
            self._logged_at = now
            count = self._failures
        if first:
            log.error("%s (%s); %s", self.what, detail, consequence)
        else:
            log.error("%s: still failing, %d times so far (%s)", self.what, count, detail)

    def succeeded(self) -> None:
        if not self._failures:
            return
        with self._lock:
            count, self._failures = self._failures, 0
        if count:
            log.warning("%s: works again after %d failures", self.what, count)


@dataclass(frozen=True, slots=True)
class _Plan:
    """Where the network part of a lookup starts: the time it started, the entry to update (an
    expired policy already taken out) and the policy in force, if any. ``unread`` is why the store
    could not be read ("" when it was): what it may hold is then unknown."""

    now: float
    base: Entry
    cached: Policy | None
    unread: str = ""


def _unexpired(decision: Decision, now: float) -> Decision:
    """``decision`` without its policy once that policy expired: never used after (§5)."""
    if decision.policy is None or decision.expires_at is None or decision.expires_at > now:
        return decision
    return replace(decision, policy=None, policy_text=None, expires_at=None, error="expired")


def _in_force(decision: Decision | None, now: float) -> bool:
    """Whether ``decision`` is an unexpired policy: one that is answered while it is checked."""
    return (
        decision is not None
        and decision.policy is not None
        and decision.expires_at is not None
        and decision.expires_at > now
    )


def _when(timestamp: float | None) -> str:
    if timestamp is None:
        return "never"
    return time.strftime("%Y-%m-%d %H:%M:%S UTC", time.gmtime(timestamp))


class PolicyDB:
    """The cache. ``lookup(domain)`` returns a ``Decision`` at once when it can, else a future.

    ``resolver`` and ``fetcher`` are those of :mod:`postfix_mtasts.resolver` and
    :mod:`postfix_mtasts.fetch`; ``store`` persists entries (see :mod:`postfix_mtasts.store`).
    Create it and call every method from the event loop's thread.
    """

    def __init__(
        self,
        store: Store,
        resolver: Resolver,
        fetcher: Fetcher,
        settings: CacheSettings | None = None,
        *,
        clock: Callable[[], float] = time.time,
    ) -> None:
        self.store = store
        self.resolver = resolver
        self.fetcher = fetcher
        self._clock = clock
        self._slots: dict[str, _Slot] = {}
        self._settings = settings or CacheSettings()
        self._turns = asyncio.Semaphore(self._settings.max_lookups)
        self._pool = concurrent.futures.ThreadPoolExecutor(
            max_workers=self._settings.lookup_threads, thread_name_prefix="lookup"
        )
        # The store has threads of its own: reading it is part of answering, and must not wait
        # behind slow policy fetches holding every lookup thread.
        self._store_pool = concurrent.futures.ThreadPoolExecutor(
            max_workers=STORE_THREADS, thread_name_prefix="store"
        )
        self._maintenance: asyncio.Task[None] | None = None
        self._background: set[asyncio.Future[_Result]] = set()
        # Lookups waiting for their turn (at most max_lookups run at once).
        self._queued: set[asyncio.Future[_Result]] = set()
        self._store_reads = _Outage("cannot read the cache")
        self._store_writes = _Outage("cannot write the cache")
        self._local = _Outage("lookups fail for want of local resources")
        self._shrunk_at = -math.inf
        # Counters for statistics and tests.
        self.hits = 0
        self.misses = 0
        self.network_lookups = 0

    @property
    def settings(self) -> CacheSettings:
        return self._settings

    @settings.setter
    def settings(self, settings: CacheSettings) -> None:
        if settings.max_lookups != self._settings.max_lookups:
            # Lookups holding a turn of the old semaphore give it back there.
            self._turns = asyncio.Semaphore(settings.max_lookups)
        self._settings = settings

    # ---------------------------------------------------------------------------------------------
    # The hot path.

    def lookup(self, domain: str) -> Decision | asyncio.Future[Decision]:
        """The decision for ``domain`` (a lowercase A-label policy domain)."""
        now = self._clock()
        slot = self._slots.get(domain)
        if slot is not None and now < slot.valid_until:
            self.hits += 1
            # In the slot, which is at hand, rather than in a dict of its own: at 100000 domains
            # every object touched per answer is a cache miss.
            slot.last_used = now
            slot.touched = True
            if now >= slot.check_after and slot.pending is None:
                self._start(domain, slot)
            return slot.decision
        self.misses += 1
        if slot is not None:
            slot.last_used = now
            slot.touched = True
        job = slot.pending if slot is not None and slot.pending is not None else None
        if job is None:
            job = self._start(domain, slot)
        # Someone waits for this lookup's first answer until the deadline.
        self._slots[domain].wanted_until = time.monotonic() + self.settings.first_lookup_deadline
        return asyncio.ensure_future(self._first_answer(domain, job))

    async def _first_answer(self, domain: str, job: asyncio.Future[_Result]) -> Decision:
        deadline = self.settings.first_lookup_deadline
        try:
            _, decision, _, _ = await asyncio.wait_for(asyncio.shield(job), deadline)
        except TimeoutError:
            if job in self._queued:
                return self._deferred(domain, f"lookup not started within {deadline:.0f}s")
            # RFC 8461 §3.3: no policy known and none could be fetched in time: deliver as if the
            # domain had no MTA-STS. The lookup goes on and its result serves the next asker.
            log.warning(
                "%s: first lookup still running after %.0fs; answering without MTA-STS for now",
                domain,
                deadline,
            )
            return Decision(domain, None, error=f"lookup still running after {deadline:.0f}s")
        except _Abandoned:
            return self._deferred(domain, f"lookup not started within {deadline:.0f}s")
        except LocalError as exc:
            return self._deferred(domain, str(exc))
        except Exception as exc:
            # Our own failure says nothing about the domain either.
            return self._deferred(domain, f"internal error: {exc}")
        # A lookup that straddled the expiry of the policy it kept must not hand it out (§5).
        return _unexpired(decision, self._clock())

    @staticmethod
    def _deferred(domain: str, reason: str) -> Decision:
        """The decision for a domain nothing could be learnt about, for a reason of this machine's:
        not "no policy" (that would downgrade a protected domain) but "ask again later"."""
        return Decision(domain, None, error=reason, defer=reason)

    # ---------------------------------------------------------------------------------------------
    # Lookups: the store in the thread pool, then (in turn) the network.

    def _start(self, domain: str, slot: _Slot | None) -> asyncio.Future[_Result]:
        loop = asyncio.get_running_loop()
        current = slot.decision if slot is not None else None
        unsaved = slot.unsaved if slot is not None else None
        job = loop.create_task(self._refresh(domain, current, unsaved))
        if slot is None:
            if len(self._slots) >= self.settings.memory_domains:
                self._shrink()
            # A placeholder slot holds the shared job until the first result arrives; it is never
            # answered from (valid_until is 0).
            slot = _Slot(Decision(domain, None), 0.0, 0.0, self._clock())
            self._slots[domain] = slot
        slot.pending = job
        self._background.add(job)
        job.add_done_callback(lambda done: self._finished(domain, done))
        return job

    def _finished(self, domain: str, job: asyncio.Future[_Result]) -> None:
        self._background.discard(job)
        self._queued.discard(job)
        slot = self._slots.get(domain)
        if slot is not None and slot.pending is job:
            slot.pending = None
        if job.cancelled():
            return
        exc = job.exception()
        if exc is not None:
            if isinstance(exc, LocalError):
                self._local.failed(str(exc), "such lookups are not remembered; asked again later")
            elif not isinstance(exc, _Abandoned):
                log.error("%s: lookup failed unexpectedly: %r", domain, exc)
            # Nothing was learnt about the domain: forget a placeholder, keep a real answer.
            if slot is not None and slot.valid_until == 0.0 and slot.pending is None:
                del self._slots[domain]
            return
        result = job.result()
        entry, decision = result.entry, result.decision
        valid_until, check_after = self._schedule(entry, decision)
        unsaved = None if result.saved else entry
        if slot is None:
            slot = _Slot(decision, valid_until, check_after, entry.last_used, unsaved)
            self._slots[domain] = slot
        else:
            slot.decision, slot.unsaved = decision, unsaved
            slot.valid_until, slot.check_after = valid_until, check_after
        if result.revalidate and slot.pending is None:
            # Answered from the store while its check is due: make the check now, behind it.
            self._start(domain, slot)

    def _schedule(self, entry: Entry, decision: Decision) -> tuple[float, float]:
        """Until when ``decision`` may be answered, and from when to revalidate it."""
        s = self.settings
        if decision.policy is not None and entry.expires_at is not None:
            checked = entry.checked_at or 0.0
            fetched = entry.fetched_at or 0.0
            # Refresh well before expiry: daily, or at half of a shorter max_age.
            refresh_at = fetched + min(s.refresh_interval, decision.policy.max_age / 2)
            check_after = min(checked + s.txt_check_interval, refresh_at)
            check_after = max(check_after, entry.backoff_until)
            return entry.expires_at, min(check_after, entry.expires_at)
        return entry.backoff_until, entry.backoff_until

    async def _refresh(
        self, domain: str, current: Decision | None, unsaved: Entry | None
    ) -> _Result:
        """Bring ``domain`` up to date, from the store or the network.

        ``current`` is the decision answered from now (None for a domain not in memory) and
        ``unsaved`` the entry behind it when the store could not save that entry. The store is
        read first, and an unexpired policy found there is the answer at once (the network check
        follows in the background). The network part waits for its turn (``max_lookups``). The
        store is read and written in the thread pool, and so is the HTTPS fetch; the DNS queries
        (the TXT record, the policy host's IPv4 addresses) are asked from the event loop, where
        they cost no thread hand-off.
        """
        loop = asyncio.get_running_loop()
        plan = await loop.run_in_executor(self._store_pool, self._prepare, domain, current, unsaved)
        if not isinstance(plan, _Plan):
            return plan
        # A check behind an answer in force waits as long as it takes; a lookup someone waits
        # for (nothing in force, or only an expired policy) only as long as they wait.
        background = _in_force(current, self._clock())
        turns = self._turns
        await self._take_turn(domain, turns, background)
        try:
            started = time.monotonic()
            self.network_lookups += 1
            record: mtasts.Record | mtasts.MTASTSError
            try:
                record, _ = await mtasts.lookup_record_async(domain, self.resolver)
            except mtasts.MTASTSError as exc:
                record = exc
            due = isinstance(record, mtasts.Record) and self._fetch_due(plan, record)
            ipv4: AddressOutcome = None
            if due:
                try:
                    ipv4 = await self.resolver.ipv4_async(mtasts.policy_host(domain))
                except DNSFailure as exc:
                    ipv4 = exc
            result = await loop.run_in_executor(
                self._pool, self._finish, domain, plan, record, due, ipv4, started
            )
        finally:
            turns.release()
        self._local.succeeded()
        return result

    async def _take_turn(self, domain: str, turns: asyncio.Semaphore, background: bool) -> None:
        """Wait until fewer than ``max_lookups`` lookups run. A lookup someone waits for gives up
        (``_Abandoned``) once nobody does any more; a background check waits as long as it
        takes (the answer in force meanwhile is the cached one)."""
        if not turns.locked():
            await turns.acquire()
            return
        job = asyncio.current_task()
        assert job is not None
        self._queued.add(job)
        try:
            while True:
                timeout: float | None = None
                if not background:
                    slot = self._slots.get(domain)
                    wanted = slot.wanted_until if slot is not None else 0.0
                    timeout = wanted - time.monotonic()
                    if timeout <= 0:
                        raise _Abandoned(domain)
                try:
                    await asyncio.wait_for(turns.acquire(), timeout)
                    return
                except TimeoutError:
                    continue  # someone may have asked meanwhile: look at the deadline again
        finally:
            self._queued.discard(job)

    def _prepare(
        self, domain: str, current: Decision | None, unsaved: Entry | None
    ) -> _Result | _Plan:
        """In the thread pool: the stored entry's answer when it may be given now, else what the
        network part of the lookup starts from."""
        now = self._clock()
        unread = ""
        entry = unsaved
        if entry is None:
            try:
                entry = self._load(domain)
            except StoreError as exc:
                unread = str(exc)
        if entry is None and current is not None and current.policy is not None:
            # The store lost the entry (purged, replaced, unreadable), but the policy in memory
            # must still be applied until it expires (§5): go on from what the decision says.
            entry = Entry(
                domain=domain,
                record_id=current.record_id,
                policy_text=current.policy_text,
                fetched_at=None,
                expires_at=current.expires_at,
                checked_at=None,
                last_used=now,
            )
        cached = None
        if entry is not None:
            cached = self._parse_cached(entry, now)
            decision = self._decision(domain, entry, cached)
            valid_until, check_after = self._schedule(entry, decision)
            if now < valid_until and now < check_after:
                # Fresh in the store: written before a restart, or by another daemon.
                return _Result(entry, decision, unsaved is None)
            if cached is not None and not _in_force(current, now):
                # An unexpired policy in the store is the answer now, whatever DNS and HTTPS do
                # later (§5): its check runs after the answer, never before it.
                return _Result(entry, decision, unsaved is None, revalidate=True)
            if cached is None and entry.last_error and now < entry.backoff_until:
                # §3.3: a failed attempt is not repeated within the retry interval, also when
                # the policy it failed to refresh has expired meanwhile.
                return _Result(entry, decision, unsaved is None)
        base = entry or Entry(
            domain=domain,
            record_id=None,
            policy_text=None,
            fetched_at=None,
            expires_at=None,
            checked_at=None,
            last_used=now,
        )
        if cached is None and base.policy_text is not None:
            # The stored policy expired: it must not be used any more (§5).
            if base.expires_at is not None and base.expires_at <= now:
                log.warning(
                    "%s: cached policy expired at %s; looking it up again",
                    domain,
                    _when(base.expires_at),
                )
            base = replace(base, policy_text=None, fetched_at=None, expires_at=None)
        return _Plan(now, base, cached, unread)

    def _fetch_due(self, plan: _Plan, record: mtasts.Record) -> bool:
        """Whether the policy must be fetched: none cached, a new ``id``, or a refresh due."""
        cached, base = plan.cached, plan.base
        if cached is None or record.id != base.record_id:
            return True
        interval = min(self.settings.refresh_interval, cached.max_age / 2)
        return plan.now >= (base.fetched_at or 0.0) + interval

    def _finish(
        self,
        domain: str,
        plan: _Plan,
        record: mtasts.Record | mtasts.MTASTSError,
        due: bool,
        ipv4: AddressOutcome,
        started: float,
    ) -> _Result:
        """In the thread pool: the fetch when due, then the new entry into the store."""
        new_entry, decision, outcome = self._revalidate(domain, plan, record, due, ipv4)
        failed = isinstance(record, mtasts.DNSError) or (
            isinstance(record, mtasts.Record) and decision.policy is None
        )
        if plan.unread and failed and decision.policy is None:
            # Nothing known from the network, and the store, which may hold an unexpired policy
            # (§5: it must be applied), could not be read: a local failure, not "no policy".
            raise LocalError(f"{domain}: {outcome}; and the cache cannot be read ({plan.unread})")
        new_entry = replace(new_entry, last_used=max(new_entry.last_used, plan.now))
        elapsed = (time.monotonic() - started) * 1000
        log.info("%s: %s (%.0f ms)", domain, outcome, elapsed)
        saved = self._save(new_entry)
        return _Result(new_entry, _unexpired(decision, self._clock()), saved)

    def _revalidate(
        self,
        domain: str,
        plan: _Plan,
        record: mtasts.Record | mtasts.MTASTSError,
        due: bool,
        ipv4: AddressOutcome,
    ) -> tuple[Entry, Decision, str]:
        """RFC 8461 §3.3: the outcome of the TXT record's check; the policy fetched when it is
        new or due (``due``, decided on the loop by :meth:`_fetch_due`)."""
        s = self.settings
        now, base, cached = plan.now, plan.base, plan.cached
        if isinstance(record, mtasts.DNSError):
            retry = now + DNS_RETRY_INTERVAL
            new = replace(base, last_error=str(record), backoff_until=retry)
            if cached is not None:
                log.warning(
                    "%s: %s; keeping the cached %s policy until %s",
                    domain,
                    record.cause,
                    cached.mode,
                    _when(base.expires_at),
                )
                outcome = f"DNS failed, kept cached policy: {record}"
                return new, self._decision(domain, new, cached), outcome
            return new, self._decision(domain, new, None), f"DNS failed: {record.cause}"
        if isinstance(record, mtasts.MTASTSError):
            if cached is not None:
                # §3.3: no live record, but an unexpired cached policy: it MUST still be applied.
                log.warning(
                    "%s: %s; keeping the cached %s policy until %s",
                    domain,
                    record.cause,
                    cached.mode,
                    _when(base.expires_at),
                )
                new = replace(base, checked_at=now, last_error=str(record))
                outcome = f"record gone, kept cached policy: {record}"
                return new, self._decision(domain, new, cached), outcome
            new = replace(
                base,
                record_id=None,
                checked_at=now,
                last_error=str(record),
                backoff_until=now + s.no_record_ttl,
            )
            return new, self._decision(domain, new, None), f"no policy: {record.cause}"

        if not due:
            new = replace(base, checked_at=now, last_error="", backoff_until=0.0)
            return new, self._decision(domain, new, cached), f"record id {record.id} unchanged"

        try:
            policy, text = mtasts.fetch_policy(domain, self.fetcher, ipv4)
        except mtasts.MTASTSError as exc:
            # §3.3: after a failed fetch, at most one attempt per five minutes.
            new = replace(
                base,
                checked_at=now,
                last_error=str(exc),
                backoff_until=now + s.fetch_retry_interval,
            )
            if cached is None:
                new = replace(new, record_id=record.id)
                failure = mtasts.tls_report_failure_reason(exc)
                return new, self._decision(domain, new, None, failure), f"{exc.what}: {exc.cause}"
            log.warning(
                "%s: policy refresh failed (%s); keeping the cached %s policy until %s",
                domain,
                exc.cause,
                cached.mode,
                _when(base.expires_at),
            )
            outcome = f"refresh failed, kept cached: {exc.cause}"
            return new, self._decision(domain, new, cached), outcome

        new = replace(
            base,
            record_id=record.id,
            policy_text=text,
            fetched_at=now,
            expires_at=now + policy.max_age,
            checked_at=now,
            last_error="",
            backoff_until=0.0,
        )
        if policy.mode is Mode.NONE and cached is not None and cached.mode is not Mode.NONE:
            # §8.3: a published "none" policy is how a domain withdraws MTA-STS.
            log.info("%s: the domain withdrew its %s policy (mode: none)", domain, cached.mode)
        return new, self._decision(domain, new, policy), f"{policy.mode} policy, id {record.id}"

    def _decision(
        self, domain: str, entry: Entry, policy: Policy | None, failure: str = ""
    ) -> Decision:
        # ``domain`` rather than entry.domain: the slots' key, one string for both.
        return Decision(
            domain=domain,
            policy=policy,
            policy_text=entry.policy_text if policy is not None else None,
            record_id=entry.record_id,
            expires_at=entry.expires_at if policy is not None else None,
            error=entry.last_error,
            failure=failure,
        )

    def _parse_cached(self, entry: Entry, now: float) -> Policy | None:
        if entry.policy_text is None or entry.expires_at is None or entry.expires_at <= now:
            return None
        try:
            return mtasts.parse_policy(entry.policy_text, entry.domain)
        except mtasts.PolicySyntaxError as exc:
            log.warning("%s: cached policy no longer parses (%s); ignoring it", entry.domain, exc)
            return None

    # ---------------------------------------------------------------------------------------------
    # The store. Its failures cost lookups, never answers (a domain the network says nothing
    # definite about, while the store cannot be read, is deferred); logged once per outage.

    def _load(self, domain: str) -> Entry | None:
        """The stored entry; a StoreError is logged (once per outage) and raised."""
        try:
            entry = self.store.get(domain)
        except StoreError as exc:
            self._store_reads.failed(str(exc), f"looking {domain} and others up instead")
            raise
        self._store_reads.succeeded()
        return entry

    def _save(self, entry: Entry) -> bool:
        try:
            self.store.put(entry)
        except StoreError as exc:
            self._store_writes.failed(
                str(exc), "keeping what is learnt in memory and writing it when the cache works"
            )
            return False
        self._store_writes.succeeded()
        return True

    def _save_unsaved(self, entries: list[Entry]) -> list[Entry]:
        """In the thread pool: write entries the store failed to take before; the saved ones."""
        saved = []
        for entry in entries:
            if not self._save(entry):
                break
            saved.append(entry)
        return saved

    # ---------------------------------------------------------------------------------------------
    # Bounds: the domains held in memory.

    def _shrink(self) -> None:
        """Make room below ``memory_domains``: drop domains without a policy first (a lookup or a
        store read brings them back), then the least recently used ones whose entry the store
        holds. A policy only memory holds (the store failed to take it) goes last."""
        target = max(1, int(self.settings.memory_domains * SHRINK_SHARE))
        idle = [(domain, slot) for domain, slot in self._slots.items() if slot.pending is None]
        doomed = [domain for domain, slot in idle if slot.decision.policy is None][:target]
        if len(doomed) < target:
            kept = [(d, s) for d, s in idle if s.decision.policy is not None]
            doomed += [
                domain
                for domain, _ in heapq.nsmallest(
                    target - len(doomed),
                    kept,
                    key=lambda item: (item[1].unsaved is not None, item[1].last_used),
                )
            ]
        for domain in doomed:
            del self._slots[domain]
        now = time.monotonic()
        if now - self._shrunk_at >= OUTAGE_LOG_INTERVAL:
            self._shrunk_at = now
            log.warning(
                "%d domains in memory (cache.memory_domains): dropped %d, to be read back from"
                " the cache or looked up again when asked",
                len(self._slots) + len(doomed),
                len(doomed),
            )

    # ---------------------------------------------------------------------------------------------
    # Maintenance: last-used times, proactive refresh, removal of unused entries.

    def start(self) -> None:
        """Start the periodic maintenance task (call from the running loop)."""
        if self._maintenance is None:
            self._maintenance = asyncio.get_running_loop().create_task(self._maintain())

    async def close(self) -> None:
        if self._maintenance is not None:
            self._maintenance.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await self._maintenance
            self._maintenance = None
        await self.flush()
        for job in list(self._background):
            job.cancel()
        self._pool.shutdown(wait=False, cancel_futures=True)
        self._store_pool.shutdown(wait=False, cancel_futures=True)

    async def flush(self) -> None:
        """Write the last-used times gathered since the last flush to the store."""
        used: dict[str, float] = {}
        for domain, slot in self._slots.items():
            if slot.touched:
                slot.touched = False
                used[domain] = slot.last_used
        if not used:
            return
        loop = asyncio.get_running_loop()
        try:
            await loop.run_in_executor(self._store_pool, self.store.touch, used)
        except StoreError as exc:
            self._store_writes.failed(str(exc), "last-used times are kept in memory")
        else:
            self._store_writes.succeeded()

    async def _maintain(self) -> None:
        while True:
            await asyncio.sleep(self.settings.maintenance_interval)
            try:
                await self.maintain()
            except Exception:
                log.exception("cache maintenance failed")

    async def maintain(self) -> None:
        """One round of maintenance: flush last-used times, write what the store failed to take
        before, refresh policies that are due (even for domains nobody asked for lately, so they
        never fall out of the cache), forget domains whose answer expired, and remove entries
        unused for ``unused_after`` seconds (those without a policy once their backoff is over)."""
        await self.flush()
        now = self._clock()
        horizon = now - self.settings.unused_after
        loop = asyncio.get_running_loop()
        unsaved: list[Entry] = []
        for domain, slot in list(self._slots.items()):
            if slot.pending is not None:
                continue
            if slot.last_used < horizon or slot.valid_until <= now:
                # Unused, or its answer expired (no policy, or an expired one): worth nothing in
                # memory, since the next asker looks it up again either way.
                del self._slots[domain]
            elif slot.unsaved is not None:
                unsaved.append(slot.unsaved)
            elif (
                slot.decision.policy is not None
                and slot.valid_until > now
                and now >= slot.check_after
            ):
                self._start(domain, slot)
        if unsaved:
            saved = await loop.run_in_executor(self._store_pool, self._save_unsaved, unsaved)
            for entry in saved:
                held = self._slots.get(entry.domain)
                if held is not None and held.unsaved is entry:
                    held.unsaved = None
        # An entry without a policy only carries a no-record memory or a backoff: once those are
        # over it is worth nothing, and a client asking for a million names must not leave a
        # million rows for unused_after.
        s = self.settings
        negative = now - max(s.no_record_ttl, s.fetch_retry_interval, DNS_RETRY_INTERVAL)
        try:
            removed = await loop.run_in_executor(
                self._store_pool, functools.partial(self.store.purge_unused, horizon, negative)
            )
        except StoreError as exc:
            self._store_writes.failed(str(exc), "unused entries stay in the cache for now")
        else:
            if removed:
                log.info("removed %d cache entries unused since %s", removed, _when(horizon))

    @property
    def size(self) -> int:
        """Domains held in memory."""
        return len(self._slots)

    @property
    def pending(self) -> int:
        """Lookups under way (for statistics and graceful stop)."""
        return len(self._background)


class DaneCache:
    """DANE verdicts (:mod:`postfix_mtasts.dane`), kept as long as the DNS TTLs allow.

    Separate from the MTA-STS policies: a verdict lives by its DNS TTLs (bounded by
    ``dane.MIN_TTL``/``MAX_TTL``) and in memory only. Like the policy cache it answers at once
    while a verdict is fresh, revalidates in the background when three quarters of its TTL have
    passed, and lets concurrent askers for a new domain share one lookup. A verdict is never
    answered past its TTL.
    """

    def __init__(
        self,
        resolver: dane.SecureResolver,
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
        self._verdicts: dict[str, tuple[dane.DaneResult, float, float]] = {}
        self._pending: dict[str, asyncio.Future[dane.DaneResult]] = {}
        self._pool = concurrent.futures.ThreadPoolExecutor(
            max_workers=threads, thread_name_prefix="dane"
        )
        self.lookups = 0

    def lookup(self, domain: str) -> dane.DaneResult | asyncio.Future[dane.DaneResult]:
        now = self._clock()
        known = self._verdicts.get(domain)
        if known is not None:
            verdict, valid_until, refresh_after = known
            if now < valid_until:
                if now >= refresh_after and domain not in self._pending:
                    self._start(domain)
                return verdict
        job = self._pending.get(domain) or self._start(domain)
        return asyncio.ensure_future(self._first_answer(domain, job))

    async def _first_answer(
        self, domain: str, job: asyncio.Future[dane.DaneResult]
    ) -> dane.DaneResult:
        try:
            return await asyncio.wait_for(asyncio.shield(job), self.deadline)
        except TimeoutError:
            reason = f"DANE lookup still running after {self.deadline:.0f}s"
        except Exception as exc:
            reason = f"DANE lookup failed: {exc}"
        # Never a weaker answer for want of DNS: Postfix defers and asks again later.
        return dane.DaneResult(domain, dane.DaneState.TEMP, reason=reason, ttl=0)

    def _start(self, domain: str) -> asyncio.Future[dane.DaneResult]:
        job = asyncio.get_running_loop().run_in_executor(self._pool, self._evaluate, domain)
        self._pending[domain] = job
        job.add_done_callback(lambda done: self._finished(domain, done))
        return job

    def _evaluate(self, domain: str) -> dane.DaneResult:
        started = time.monotonic()
        self.lookups += 1
        verdict = dane.evaluate(domain, self.resolver)
        elapsed = (time.monotonic() - started) * 1000
        hosts = ", ".join(f"{h.host} {h.state}" for h in verdict.hosts)
        line = f"{domain}: DANE {verdict.state} ({verdict.reason}{'; ' if hosts else ''}{hosts})"
        if verdict.state is dane.DaneState.TEMP:
            log.warning("%s; deferring mail to it (%.0f ms)", line, elapsed)
        else:
            log.info("%s (%.0f ms)", line, elapsed)
        return verdict

    def _finished(self, domain: str, job: asyncio.Future[dane.DaneResult]) -> None:
        if self._pending.get(domain) is job:
            del self._pending[domain]
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
