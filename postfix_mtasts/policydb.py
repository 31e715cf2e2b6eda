"""The policy cache: carries out the RFC 8461 cache rules (:mod:`cache_rules`) on a dumb store.

What to answer and what to do next is decided by :mod:`cache_rules`, which is pure; this module
does it: an in-memory front for the hot path, the store behind it, the resolver and the fetcher,
threads, turns and maintenance. In short (the rules module gives each rule's RFC section):

- a cached, unexpired policy is answered at once, from memory or from the store; its TXT record
  is checked in the background when due, and a changed ``id`` or a due refresh fetches it anew;
- a domain never seen before waits for its first lookup, and concurrent askers for one domain
  share that lookup (:mod:`lookups`): one TXT query, one HTTPS GET.

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
import bisect
import collections
import concurrent.futures
import contextlib
import functools
import heapq
import logging
import math
import os
import secrets
import socket
import threading
import time
from collections.abc import Callable, Iterable
from dataclasses import replace
from typing import Any, NamedTuple, TypeVar

from postfix_mtasts import cache_rules, mtasts
from postfix_mtasts.cache_rules import Answer, Decision, Fetch, Note, Outcome, Plan
from postfix_mtasts.config import CacheConfig
from postfix_mtasts.fetch import Fetcher
from postfix_mtasts.lookups import SingleFlight
from postfix_mtasts.resolver import AddressOutcome, DNSFailure, LocalError, Resolver
from postfix_mtasts.store import ALL, Entry, Store, StoreError, Watcher

__all__ = ["Decision", "PolicyDB"]

log = logging.getLogger("postfix_mtasts.policydb")

# Threads reading and writing the store (the SQLite store serialises its statements anyway).
STORE_THREADS = 4
# How often maintenance runs (last-used times, proactive refresh, removal of unused entries).
MAINTENANCE_INTERVAL = 60.0
# When the domains in memory reach memory_domains, this share of them is dropped at once, so that
# the (rare) work of choosing them is not done again at every new domain.
SHRINK_SHARE = 0.1
# An outage (the store failing, local resources running out) is logged when it starts, and then
# at most this often while it lasts, with the number of failures since.
OUTAGE_LOG_INTERVAL = 60.0
# Map names whose replies are kept per domain (Postfix uses one or two; a client making names up
# gets answers, not memory).
REPLY_NAMES = 4
# Last-used times are kept to this precision: one float object shared by the domains used within
# it, rather than one per domain.
USED_PRECISION = 1.0
# A store that failed to answer (an error, or no answer within cache.timeout) is not asked again
# for this long: meanwhile every read counts as "cannot be read" at once, so that a dead server
# costs a request nothing, not one timeout each.
STORE_RETRY_INTERVAL = 5.0
# How long one daemon of a fleet holds the lease on a domain it looks up (the others wait for its
# result): longer than a lookup takes with the default timeouts (DNS lifetime 10 s, then the HTTPS
# connection and fetch within 15 s), short enough that a crashed holder delays the domain little.
LEASE_SECONDS = 60.0
# A daemon waiting for another's lookup reads the store again at least this often, in case the
# change notification was lost.
LEASE_POLL_INTERVAL = 1.0
# Domains read again per store round when a watcher reports that every domain may have changed.
REREAD_BATCH = 200
# The upper bounds (seconds) of the lookup durations counted (PolicyDB.lookup_seconds): from a
# loopback answer to the deadlines of DNS (10 s) and of the HTTPS fetch.
LOOKUP_SECONDS_BUCKETS = (0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 30.0)
# What a network lookup ended with: a policy to apply (fetched or kept), no policy (no record, an
# invalid record), or a failure: the TXT lookup failed for a DNS reason, or the policy fetch
# failed (whether a cached policy was kept or not).
LOOKUP_OUTCOMES = ("policy", "no-policy", "failure")
# RFC 8460 §4.3.1 result types of a failed policy fetch (mtasts.tls_report_failure_reason).
FETCH_FAILURE_TYPES = ("sts-policy-fetch-error", "sts-policy-invalid", "sts-webpki-invalid")

_T = TypeVar("_T")


class _Slot:
    """The in-memory state of one domain: until when its answer may be given without asking
    anyone, from when it is to be checked, when it was last used, and the replies kept for it.

    One is kept per cached domain, so it holds what the hot path reads and little else: at
    100000 domains every attribute costs megabytes. ``decision`` (with the policy text and the
    record id) is held until the responder keeps its reply here (:meth:`PolicyDB.remember`); then
    it is dropped, for the replies are all the hot path needs, and it is read back from the store
    when asked for again (a new map name, a changed configuration, a check). ``policy`` says
    whether the answer is a policy. ``valid_until`` is the policy's ``expires_at`` (or the entry's
    backoff) itself. Replies: ``reply`` for the map name ``reply_name``, ``more`` for up to
    ``REPLY_NAMES - 1`` others (a tuple of name, reply, name, reply...)."""

    __slots__ = (
        "check_after",
        "decision",
        "last_used",
        "more",
        "policy",
        "reply",
        "reply_name",
        "valid_until",
    )

    def __init__(
        self, decision: Decision, valid_until: float, check_after: float, last_used: float
    ) -> None:
        self.decision: Decision | None = decision
        self.policy = decision.policy_text is not None
        self.valid_until = valid_until
        self.check_after = check_after
        self.last_used = last_used
        self.reply_name: str | None = None
        self.reply: bytes | None = None
        self.more: tuple[str | bytes, ...] | None = None

    def update(self, decision: Decision, valid_until: float, check_after: float) -> None:
        """Answer ``decision`` from now. The replies kept stay when they are still those of the
        new decision: both without a policy, or both the same fetched policy (a policy is only
        replaced by a fetch, and every fetch gives a new ``expires_at``); then the decision, read
        back or checked, is not held either."""
        if self.reply_name is not None and _same(self, decision):
            self.decision = None
        else:
            self.decision = decision
            self.reply_name = self.reply = self.more = None
        self.policy = decision.policy_text is not None
        self.valid_until, self.check_after = valid_until, check_after


class _Result(NamedTuple):
    """What a lookup returns: the rules' answer or outcome, and whether the store holds its
    entry (when it does not, memory keeps the entry until the store takes it)."""

    found: Answer | Outcome
    saved: bool


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


def _same(slot: _Slot, decision: Decision) -> bool:
    """Whether ``decision`` gives the answer ``slot`` holds: both without a policy, or both the
    same fetched policy (a policy is only replaced by a fetch, and each fetch gives a new
    ``expires_at``)."""
    if decision.policy_text is None:
        return not slot.policy
    return slot.policy and decision.expires_at == slot.valid_until


def _log_notes(notes: tuple[Note, ...]) -> None:
    for level, message in notes:
        log.log(level, "%s", message)


class PolicyDB:
    """The cache. ``lookup(domain)`` returns a ``Decision`` at once when it can, else a future.

    ``resolver`` and ``fetcher`` are those of :mod:`postfix_mtasts.resolver` and
    :mod:`postfix_mtasts.fetch`; ``store`` persists entries (see :mod:`postfix_mtasts.store`);
    ``settings`` is the ``[cache]`` table of the configuration.
    Create it and call every method from the event loop's thread.

    ``policy_changes`` counts the policy changes this daemon's own fetches found, by kind
    (``cache_rules.POLICY_CHANGES``: "downgrade", "mx", "max_age", "fetch_failing"), each also
    logged as a ``policy-change:`` WARNING line. Entries read from the store or adopted from
    another daemon of a fleet are not compared, so a change counts once, where it was fetched.
    It is only ever increased, on the event loop's thread, for a reader such as a metrics exporter.
    So are the other counters: ``hits``, ``misses``, ``network_lookups``, ``lookup_seconds`` and
    ``lookup_seconds_sum`` (network lookups by outcome, ``LOOKUP_OUTCOMES``, in the buckets of
    ``LOOKUP_SECONDS_BUCKETS``), ``fetch_failures`` (by RFC 8460 result type) and ``dns_failures``.
    """

    def __init__(
        self,
        store: Store,
        resolver: Resolver,
        fetcher: Fetcher,
        settings: CacheConfig | None = None,
        *,
        clock: Callable[[], float] = time.time,
        tolerant: bool = cache_rules.TOLERANT,
    ) -> None:
        self.store = store
        self.resolver = resolver
        self.fetcher = fetcher
        # [policy] parsing: how fetched policies, and those read back from the store, are read.
        self.tolerant = tolerant
        self._clock = clock
        self._slots: dict[str, _Slot] = {}
        self._settings = settings or CacheConfig()
        self._turns = asyncio.Semaphore(self._settings.max_lookups)
        # A running lookup fetches in a thread: as many threads as lookups may run.
        self._pool = concurrent.futures.ThreadPoolExecutor(
            max_workers=self._settings.max_lookups, thread_name_prefix="lookup"
        )
        # The store has threads of its own: reading it is part of answering, and must not wait
        # behind slow policy fetches holding every lookup thread.
        self._store_pool = concurrent.futures.ThreadPoolExecutor(
            max_workers=STORE_THREADS, thread_name_prefix="store"
        )
        self._maintenance: asyncio.Task[None] | None = None
        self._lookups: SingleFlight[str, _Result] = SingleFlight()
        # Until when (time.monotonic()) someone waits for a lookup's first answer: a lookup
        # still waiting for its turn after that is dropped.
        self._wanted: dict[str, float] = {}
        # Lookups waiting for their turn (at most max_lookups run at once).
        self._queued: set[asyncio.Future[_Result]] = set()
        # Entries the store failed to take, written again by maintenance: a failing store loses
        # nothing.
        self._unsaved: dict[str, Entry] = {}
        # Slots used at or after this time are written to the store by the next flush().
        self._flushed_at = -math.inf
        # The last-used time handed out lately (_used()).
        self._used_at = -math.inf
        self._store_reads = _Outage("cannot read the cache")
        self._store_writes = _Outage("cannot write the cache")
        # The store failed lately: not asked again before this time (time.monotonic()).
        self._store_down_until = -math.inf
        self._store_down_cause = ""
        # Sharing the store with other daemons: this daemon's name on leases, the lookups that
        # wait for another daemon's result, the watcher of their changes and its thread.
        self._holder = f"{socket.gethostname()}:{os.getpid()}:{secrets.token_hex(4)}"
        self._awaiting: dict[str, asyncio.Future[None]] = {}
        self._watch_stop = threading.Event()
        self._watcher: Watcher | None = None
        self._watch_thread: threading.Thread | None = None
        self._writing_back: asyncio.Task[None] | None = None
        self._rereading: asyncio.Task[None] | None = None
        self._reread: set[str] = set()
        self._watch_outage = _Outage("cannot watch the cache for other daemons' changes")
        self._local = _Outage("lookups fail for want of local resources")
        self._shrunk_at = -math.inf
        # Counters for statistics and tests.
        self.hits = 0
        self.misses = 0
        self.network_lookups = 0
        self.policy_changes: collections.Counter[str] = collections.Counter(
            dict.fromkeys(cache_rules.POLICY_CHANGES, 0)
        )
        # Network lookups by outcome (LOOKUP_OUTCOMES): per outcome, how many took at most each
        # of LOOKUP_SECONDS_BUCKETS (the last slot: longer), and their seconds in all.
        self.lookup_seconds: dict[str, list[int]] = {
            outcome: [0] * (len(LOOKUP_SECONDS_BUCKETS) + 1) for outcome in LOOKUP_OUTCOMES
        }
        self.lookup_seconds_sum: dict[str, float] = dict.fromkeys(LOOKUP_OUTCOMES, 0.0)
        # Policy fetches that failed, by RFC 8460 result type (mtasts.tls_report_failure_reason),
        # and TXT record lookups that failed for a DNS reason (not "no record").
        self.fetch_failures: collections.Counter[str] = collections.Counter(
            dict.fromkeys(FETCH_FAILURE_TYPES, 0)
        )
        self.dns_failures = 0

    @property
    def settings(self) -> CacheConfig:
        return self._settings

    @settings.setter
    def settings(self, settings: CacheConfig) -> None:
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
            slot.last_used = self._used(now)
            if now >= slot.check_after and domain not in self._lookups:
                self._start(domain, slot)
            if slot.decision is not None:
                return slot.decision
            # Only the replies are held: the decision is read back from the store, never asked
            # of the network.
            return asyncio.ensure_future(self._read_back(domain, slot))
        self.misses += 1
        if slot is not None:
            slot.last_used = self._used(now)
        return self._ask(domain, slot)

    def recall(self, name: str, domain: str) -> bytes | None:
        """The reply kept for map ``name`` and ``domain`` (:meth:`remember`) while its answer
        holds, else None. The hot path: a dict look-up, two comparisons, a string comparison."""
        slot = self._slots.get(domain)
        if slot is None:
            return None
        if slot.reply_name == name:
            reply = slot.reply
        elif slot.more is not None and name in slot.more:
            reply = slot.more[slot.more.index(name) + 1]  # type: ignore[assignment]
        else:
            return None
        now = self._clock()
        if now >= slot.valid_until:
            return None
        self.hits += 1
        # _used(), written out: this runs once per request.
        used = self._used_at
        if now - used >= USED_PRECISION or now < used:
            used = self._used_at = now
        slot.last_used = used
        if now >= slot.check_after and domain not in self._lookups:
            self._start(domain, slot)
        return reply

    def remember(self, decision: Decision, name: str, reply: bytes) -> None:
        """Keep ``reply``, the caller's reply for map ``name`` built from ``decision``, for
        :meth:`recall`, while ``decision`` is the domain's answer; the decision itself is then no
        longer held (the store has it). ``name`` is kept as given: pass one string per name."""
        slot = self._slots.get(decision.domain)
        if slot is None or decision.defer or not _same(slot, decision):
            return
        if self._clock() >= slot.valid_until:
            return
        if slot.reply_name is None:
            slot.reply_name, slot.reply = name, reply
        elif slot.reply_name != name:
            more = slot.more or ()
            if name in more or len(more) >= 2 * (REPLY_NAMES - 1):
                return
            slot.more = (*more, name, reply)
        slot.decision = None

    def forget_replies(self) -> None:
        """Drop every reply kept (the configuration's profiles changed); a decision no longer held
        is read back from the store when next asked for."""
        for slot in self._slots.values():
            slot.reply_name = slot.reply = slot.more = None

    def _used(self, now: float) -> float:
        """``now`` as a last-used time: one float object for every domain used within
        USED_PRECISION, rather than one per domain."""
        if now - self._used_at >= USED_PRECISION or now < self._used_at:
            self._used_at = now
        return self._used_at

    def _ask(self, domain: str, slot: _Slot | None) -> asyncio.Future[Decision]:
        deadline = self.settings.first_lookup_deadline
        # Someone waits for this lookup's first answer until the deadline.
        self._wanted[domain] = time.monotonic() + deadline
        return self._lookups.ask(
            domain,
            functools.partial(self._start, domain, slot),
            deadline,
            self._answer,
            self._fallback,
        )

    async def _read_back(self, domain: str, slot: _Slot) -> Decision:
        """The decision behind the replies held for ``domain``, as the store holds it."""
        recover = functools.partial(self._recover, domain, slot.policy, slot.valid_until)
        if self.store.instant:
            decision = recover()
        else:
            try:
                decision = await self._store_call(self._store_reads, recover)
            except StoreError as exc:
                if slot.policy:
                    # A policy in force is never given up for want of the store (§5).
                    return self._deferred(domain, str(exc))
                decision = None
        if decision is None:
            # The store no longer holds that answer (or cannot be read): what the rules make of
            # what it holds now; a policy in force is never given up for want of it (_fallback).
            return await self._ask(domain, self._slots.get(domain))
        return cache_rules.unexpired(decision, self._clock())

    def _recover(self, domain: str, policy: bool, valid_until: float) -> Decision | None:
        """In the store's threads: the decision answered from memory, as the store (or the
        entry memory keeps for it) holds it; None when it holds something else or nothing.
        Raises StoreError when the store cannot be read."""
        entry = self._unsaved.get(domain)
        if entry is None:
            entry = self._load(domain)
        if entry is None:
            return None
        return cache_rules.held_decision(domain, entry, policy, valid_until)

    async def _store_call(self, outage: _Outage, call: Callable[..., _T], *args: Any) -> _T:
        """``call(*args)`` in the store's threads, bounded by ``cache.timeout``. A store that
        failed within the last STORE_RETRY_INTERVAL seconds is not asked: StoreError at once.
        A failure is logged through ``outage`` (once per outage) and raised as StoreError."""
        now = time.monotonic()
        if now < self._store_down_until:
            raise StoreError(self._store_down_cause)
        loop = asyncio.get_running_loop()
        timeout = self.settings.timeout
        try:
            result = await asyncio.wait_for(
                loop.run_in_executor(self._store_pool, call, *args), timeout
            )
        except TimeoutError:
            cause = f"{self.store.where}: no answer within {timeout:g}s"
            self._store_down(cause)
            outage.failed(cause, "answering without it")
            raise StoreError(cause) from None
        except StoreError as exc:
            self._store_down(str(exc))
            raise
        if self._store_down_cause:
            self._store_back()
        return result

    def _store_down(self, cause: str) -> None:
        self._store_down_until = time.monotonic() + STORE_RETRY_INTERVAL
        self._store_down_cause = f"{cause} (not asked again for {STORE_RETRY_INTERVAL:g}s)"

    def _store_back(self) -> None:
        """The store answers again: write back what was learnt meanwhile."""
        self._store_down_cause = ""
        if self._unsaved and (self._writing_back is None or self._writing_back.done()):
            self._writing_back = asyncio.get_running_loop().create_task(self._write_back())

    async def _write_back(self) -> None:
        unsaved = [e for d, e in self._unsaved.items() if d not in self._lookups]
        if not unsaved:
            return
        try:
            saved = await self._store_call(self._store_writes, self._save_unsaved, unsaved)
        except StoreError:
            return
        for entry in saved:
            if self._unsaved.get(entry.domain) is entry:
                del self._unsaved[entry.domain]
        if saved:
            log.info("wrote %d entries learnt while the cache could not be written", len(saved))

    def _answer(self, result: _Result) -> Decision:
        # A lookup that straddled the expiry of the policy it kept must not hand it out (§5).
        return cache_rules.unexpired(result.found.decision, self._clock())

    def _fallback(self, domain: str, job: asyncio.Future[_Result], exc: Exception) -> Decision:
        deadline = self.settings.first_lookup_deadline
        if isinstance(exc, TimeoutError):
            if job in self._queued:
                return self._deferred(domain, f"lookup not started within {deadline:.0f}s")
            slot = self._slots.get(domain)
            if slot is not None and slot.policy and self._clock() < slot.valid_until:
                # A policy in force whose decision could not be read back in time (§5: it must
                # be applied): ask again later, never "no policy".
                return self._deferred(domain, f"lookup still running after {deadline:.0f}s")
            # RFC 8461 §3.3: no policy known and none could be fetched in time: deliver as if the
            # domain had no MTA-STS. The lookup goes on and its result serves the next asker.
            log.warning(
                "%s: first lookup still running after %.0fs; answering without MTA-STS for now",
                domain,
                deadline,
            )
            return Decision(domain, error=f"lookup still running after {deadline:.0f}s")
        if isinstance(exc, _Abandoned):
            return self._deferred(domain, f"lookup not started within {deadline:.0f}s")
        if isinstance(exc, LocalError):
            return self._deferred(domain, str(exc))
        # Our own failure says nothing about the domain either.
        return self._deferred(domain, f"internal error: {exc}")

    @staticmethod
    def _deferred(domain: str, reason: str) -> Decision:
        """The decision for a domain nothing could be learnt about, for a reason of this machine's:
        not "no policy" (that would downgrade a protected domain) but "ask again later"."""
        return Decision(domain, error=reason, defer=reason)

    # ---------------------------------------------------------------------------------------------
    # Lookups: the store in the thread pool, then (in turn) the network.

    def _start(self, domain: str, slot: _Slot | None) -> asyncio.Future[_Result]:
        current = slot.decision if slot is not None else None
        # A policy in force whose decision memory dropped (the replies are held): the store has
        # it, and _consult reads it back as the decision in force.
        held = slot.valid_until if slot is not None and current is None and slot.policy else None
        job = asyncio.get_running_loop().create_task(self._refresh(domain, current, held))
        return self._lookups.start(domain, job, self._finished)

    def _finished(self, domain: str, job: asyncio.Future[_Result]) -> None:
        self._queued.discard(job)
        if domain not in self._lookups:
            self._wanted.pop(domain, None)
        if job.cancelled():
            return
        exc = job.exception()
        if exc is not None:
            if isinstance(exc, LocalError):
                self._local.failed(str(exc), "such lookups are not remembered; asked again later")
            elif not isinstance(exc, _Abandoned):
                log.error("%s: lookup failed unexpectedly: %r", domain, exc)
            # Nothing was learnt about the domain: a real answer held before stays.
            return
        found, saved = job.result()
        if saved:
            self._unsaved.pop(domain, None)
        else:
            self._unsaved[domain] = found.entry
        # Memory holds the decision without the parsed policy that came with it (the askers of
        # this lookup build their replies from that); it is parsed again if it is needed again.
        decision = found.decision
        if decision.parsed is not None:
            decision = replace(decision, parsed=None)
        slot = self._slots.get(domain)
        if slot is None:
            if len(self._slots) >= self.settings.memory_domains:
                self._shrink()
            slot = _Slot(decision, found.valid_until, found.check_after, found.entry.last_used)
            self._slots[domain] = slot
        else:
            slot.update(decision, found.valid_until, found.check_after)
        if isinstance(found, Answer) and found.check and domain not in self._lookups:
            # Answered from the store while its check is due: make the check now, behind it.
            self._start(domain, slot)

    async def _refresh(self, domain: str, current: Decision | None, held: float | None) -> _Result:
        """Bring ``domain`` up to date, from the store or the network.

        ``current`` is the decision answered from now (None for a domain not in memory, and for
        one whose decision memory dropped, in which case ``held`` is its expiry). The
        store is read first (or the entry memory keeps because the store could not take it), and
        an unexpired policy found there is the answer at once (the network check follows in the
        background). On a store shared by a fleet, one daemon looks the domain up (it holds the
        store's lease on it) and the others wait for its result (:meth:`_leave_it`). The network
        part waits for its turn (``max_lookups``). The store is read and written in its threads,
        within ``cache.timeout``; the HTTPS fetch runs in the lookup threads; the DNS queries (the
        TXT record, the policy host's IPv4 addresses) are asked from the event loop, where they
        cost no thread hand-off.
        """
        loop = asyncio.get_running_loop()
        plan, leased = await self._plan(domain, current, held)
        if isinstance(plan, Answer):
            return _Result(plan, domain not in self._unsaved)
        now = self._clock()
        background = cache_rules.in_force(current, now) or (held is not None and held > now)
        while self.store.shared and not (leased or plan.unread):
            # Another daemon looks it up: its result reaches the store, and this daemon.
            plan, leased = await self._leave_it(domain, current, held)
            if isinstance(plan, Answer):
                return _Result(plan, True)
        try:
            # A check behind an answer in force waits as long as it takes; a lookup someone
            # waits for (nothing in force, or only an expired policy) only as long as they wait.
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
                step = cache_rules.after_record(domain, plan, record, self.settings)
                ipv4: AddressOutcome = None
                if isinstance(step, Fetch):
                    try:
                        ipv4 = await self.resolver.ipv4_async(mtasts.policy_host(domain))
                    except DNSFailure as exc:
                        ipv4 = exc
                failures: list[str] = []
                outcome = await loop.run_in_executor(
                    self._pool, self._conclude, domain, plan, step, ipv4, started, failures
                )
            finally:
                turns.release()
            if isinstance(record, mtasts.DNSError):
                failures.append("dns")
            self._count_lookup(outcome, time.monotonic() - started, failures)
            self.policy_changes.update(outcome.changes)
            self._local.succeeded()
            saved = await self._save_async(outcome.entry, release=leased)
            leased = False
        finally:
            if leased:
                with contextlib.suppress(StoreError):
                    await self._store_call(self._store_writes, self._give_up_lease, domain)
        return _Result(cache_rules.expire(outcome, self._clock()), saved)

    async def _plan(
        self, domain: str, current: Decision | None, held: float | None
    ) -> tuple[Answer | Plan, bool]:
        """What the rules make of what the store (or memory) holds for ``domain``, and on a
        shared store whether this daemon took the lease to look it up (one trip to the store)."""
        unsaved = self._unsaved.get(domain)
        if self.store.instant:
            return self._consult(domain, current, unsaved, held), False
        if unsaved is None:
            try:
                return await self._store_call(
                    self._store_reads, self._consult_and_lease, domain, current, held
                )
            except StoreError as exc:
                return self._judge(domain, current, None, str(exc), held), False
        # Memory holds what the store failed to take: this daemon acts alone (giving up a lease
        # it does not hold, afterwards, changes nothing).
        return self._judge(domain, current, unsaved, "", held), True

    def _consult_and_lease(
        self, domain: str, current: Decision | None, held: float | None
    ) -> tuple[Answer | Plan, bool]:
        """In the store's threads: what the rules make of the stored entry, and when the network
        must be asked, the lease on a shared store (without it, another daemon asks). A store
        that cannot be read raises StoreError."""
        entry = self._load(domain)
        plan = self._judge(domain, current, entry, "", held)
        if isinstance(plan, Answer) or plan.unread or not self.store.shared:
            return plan, False
        if not self._take_lease(domain):
            return plan, False
        # Another daemon may have finished the lookup between the read and the lease: what it
        # stored is the answer, not a reason to look the domain up again.
        try:
            again = self._load(domain)
        except StoreError:
            again = entry
        if again == entry:
            return plan, True
        plan = self._judge(domain, current, again, "", held)
        if isinstance(plan, Answer):
            self._give_up_lease(domain)
            return plan, False
        return plan, True

    def _take_lease(self, domain: str) -> bool:
        """In the store's threads: the lease, or True when the store cannot give one (a file
        opened read-only, a server that just failed): then this daemon acts alone."""
        try:
            return self.store.lease(domain, self._holder, LEASE_SECONDS)
        except StoreError:
            return True

    def _give_up_lease(self, domain: str) -> None:
        with contextlib.suppress(StoreError):
            self.store.release(domain, self._holder)

    async def _leave_it(
        self, domain: str, current: Decision | None, held: float | None
    ) -> tuple[Answer | Plan, bool]:
        """Wait until another daemon's lookup of ``domain`` changes its entry (its notification
        comes, or LEASE_POLL_INTERVAL passes), then read the store again (and try the lease)."""
        waiter = self._awaiting.get(domain)
        if waiter is None or waiter.done():
            waiter = self._awaiting[domain] = asyncio.get_running_loop().create_future()
        try:
            await asyncio.wait_for(asyncio.shield(waiter), LEASE_POLL_INTERVAL)
        except TimeoutError:
            pass
        finally:
            # One lookup per domain waits (SingleFlight): nobody else needs the waiter.
            if self._awaiting.get(domain) is waiter:
                del self._awaiting[domain]
        plan, leased = await self._plan(domain, current, held)
        if isinstance(plan, Answer) and plan.check:
            # What the other daemon left is due for a check already: not this one's to make now.
            plan = replace(plan, check=False)
        return plan, leased

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
                    timeout = self._wanted.get(domain, 0.0) - time.monotonic()
                    if timeout <= 0:
                        raise _Abandoned(domain)
                try:
                    await asyncio.wait_for(turns.acquire(), timeout)
                    return
                except TimeoutError:
                    continue  # someone may have asked meanwhile: look at the deadline again
        finally:
            self._queued.discard(job)

    def _consult(
        self, domain: str, current: Decision | None, unsaved: Entry | None, held: float | None
    ) -> Answer | Plan:
        """What the rules make of what an instant store (or memory) holds."""
        unread = ""
        entry = unsaved
        if entry is None:
            try:
                entry = self._load(domain)
            except StoreError as exc:
                unread = str(exc)
        return self._judge(domain, current, entry, unread, held)

    def _judge(
        self,
        domain: str,
        current: Decision | None,
        entry: Entry | None,
        unread: str,
        held: float | None,
    ) -> Answer | Plan:
        """What the rules make of ``entry``, read from the store or memory (``unread``: why the
        store could not be read)."""
        if held is not None:
            current = (
                None if entry is None else cache_rules.held_decision(domain, entry, True, held)
            )
            if current is None and not unread:
                # Memory answers a policy the store no longer holds: as with a store that cannot
                # be read, only a definite answer from the network may replace it (§5).
                unread = "the cache no longer holds the policy in force"
        found = cache_rules.consult(
            domain, entry, current, self._clock(), self.settings, unread, tolerant=self.tolerant
        )
        _log_notes(found.notes)
        return found

    def _conclude(
        self,
        domain: str,
        plan: Plan,
        step: Outcome | Fetch,
        ipv4: AddressOutcome,
        started: float,
        failures: list[str] | None = None,
    ) -> Outcome:
        """In the lookup threads: the fetch when the rules asked for it, and the outcome. The RFC
        8460 result type of a failed fetch is appended to ``failures`` (the caller's own list,
        read back on the event loop: no counter is shared with these threads)."""
        outcome = step
        if isinstance(step, Fetch):
            fetched: tuple[mtasts.Policy, str] | mtasts.MTASTSError
            try:
                fetched = mtasts.fetch_policy(domain, self.fetcher, ipv4, tolerant=self.tolerant)
            except mtasts.MTASTSError as exc:
                fetched = exc
                reason = mtasts.tls_report_failure_reason(exc)
                if reason and failures is not None:
                    failures.append(reason)
            outcome = cache_rules.after_fetch(domain, plan, step.record, fetched, self.settings)
        assert isinstance(outcome, Outcome)
        _log_notes(outcome.notes)
        if outcome.defer:
            raise LocalError(outcome.defer)
        elapsed = (time.monotonic() - started) * 1000
        log.info("%s: %s (%.0f ms)", domain, outcome.summary, elapsed)
        return outcome

    def _count_lookup(self, outcome: Outcome, seconds: float, failures: list[str]) -> None:
        """Count a network lookup that ended (not one that could not be made for a local
        reason): its duration by outcome, and its failures ("dns": the TXT record's lookup; else
        the RFC 8460 result type of the failed fetch)."""
        if failures:
            kind = "failure"
        elif outcome.decision.policy_text is not None:
            kind = "policy"
        else:
            kind = "no-policy"
        self.lookup_seconds[kind][bisect.bisect_left(LOOKUP_SECONDS_BUCKETS, seconds)] += 1
        self.lookup_seconds_sum[kind] += seconds
        for failure in failures:
            if failure == "dns":
                self.dns_failures += 1
            else:
                self.fetch_failures[failure] += 1

    async def _save_async(self, entry: Entry, *, release: bool = False) -> bool:
        """Write ``entry`` (within cache.timeout), and give up the lease when ``release``; False
        when the store did not take the entry."""
        if self.store.instant:
            return self._save(entry)
        try:
            return await self._store_call(
                self._store_writes, self._save_and_release, entry, release
            )
        except StoreError:
            return False

    def _save_and_release(self, entry: Entry, release: bool) -> bool:
        saved = self._save(entry)
        if release:
            self._give_up_lease(entry.domain)
        return saved

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
        idle = [(d, slot) for d, slot in self._slots.items() if d not in self._lookups]
        doomed = [d for d, slot in idle if not slot.policy][:target]
        if len(doomed) < target:
            kept = [(d, s) for d, s in idle if s.policy]
            doomed += [
                d
                for d, _ in heapq.nsmallest(
                    target - len(doomed),
                    kept,
                    key=lambda item: (item[0] in self._unsaved, item[1].last_used),
                )
            ]
        for domain in doomed:
            del self._slots[domain]
            self._unsaved.pop(domain, None)
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
        """Start the periodic maintenance task, and on a shared store the watcher of the other
        daemons' changes (call from the running loop)."""
        loop = asyncio.get_running_loop()
        if self._maintenance is None:
            self._maintenance = loop.create_task(self._maintain())
        if self.store.shared and self._watch_thread is None:
            self._watch_stop.clear()
            self._watch_thread = threading.Thread(
                target=self._watch, args=(loop,), name="cache-watcher", daemon=True
            )
            self._watch_thread.start()

    async def close(self) -> None:
        if self._maintenance is not None:
            self._maintenance.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await self._maintenance
            self._maintenance = None
        self._stop_watching()
        await self.flush()
        for job in self._lookups.jobs():
            job.cancel()
        for task in (self._writing_back, self._rereading):
            if task is not None:
                task.cancel()
        self._pool.shutdown(wait=False, cancel_futures=True)
        self._store_pool.shutdown(wait=False, cancel_futures=True)

    async def flush(self) -> None:
        """Write the last-used times gathered since the last flush to the store."""
        # From now on, slots used get a last-used time of now or later (_used()).
        self._used_at = self._clock()
        since, self._flushed_at = self._flushed_at, self._used_at
        used = {d: slot.last_used for d, slot in self._slots.items() if slot.last_used >= since}
        if not used:
            return
        try:
            failure = await self._store_call(self._store_writes, self._touch, used)
        except StoreError as exc:
            failure = str(exc)
        if failure:
            self._flushed_at = since
            self._store_writes.failed(failure, "last-used times are kept in memory")
        else:
            self._store_writes.succeeded()

    def _touch(self, used: dict[str, float]) -> str:
        """In the store's threads: write last-used times; the failure, if any (a store that
        cannot be written may still be read: this is not an outage of reading)."""
        try:
            self.store.touch(used)
        except StoreError as exc:
            return str(exc)
        return ""

    # ---------------------------------------------------------------------------------------------
    # A store shared by a fleet: the other daemons' changes.

    def _watch(self, loop: asyncio.AbstractEventLoop) -> None:
        """The watcher thread: hands the domains other daemons changed to the loop
        (:meth:`changed`). A watcher that could not be made, or lost its connection, is made or
        reconnected again every STORE_RETRY_INTERVAL seconds; changes missed meanwhile count as
        a change of every domain."""
        missed = False
        while not self._watch_stop.is_set():
            try:
                if self._watcher is None:
                    self._watcher = self.store.watch()
                    if missed:
                        self._report(loop, ALL)
                changes = self._watcher.wait(1.0)
            except StoreError as exc:
                if self._watch_stop.is_set():
                    break
                self._watch_outage.failed(
                    str(exc), "changes other daemons make reach this one later"
                )
                missed = True
                self._watch_stop.wait(STORE_RETRY_INTERVAL if self._watcher is None else 0.5)
                continue
            except Exception:
                log.exception("the cache watcher failed; restarting it")
                missed = True
                self._close_watcher()
                self._watch_stop.wait(STORE_RETRY_INTERVAL)
                continue
            self._watch_outage.succeeded()
            missed = False
            if changes:
                self._report(loop, changes)
        self._close_watcher()

    def _report(self, loop: asyncio.AbstractEventLoop, changes: frozenset[str] | str) -> None:
        with contextlib.suppress(RuntimeError):  # the loop closed
            loop.call_soon_threadsafe(self.changed, changes)

    def _close_watcher(self) -> None:
        watcher, self._watcher = self._watcher, None
        if watcher is not None:
            with contextlib.suppress(Exception):
                watcher.close()

    def _stop_watching(self) -> None:
        if self._watch_thread is None:
            return
        self._watch_stop.set()
        self._close_watcher()
        self._watch_thread.join(timeout=self.settings.timeout + 2.0)
        self._watch_thread = None

    def changed(self, domains: Iterable[str] | str) -> None:
        """Other daemons changed the entries of ``domains`` (``ALL``: perhaps of every domain):
        the domains held in memory are read from the store again, and lookups waiting for
        another daemon's result are woken. Call from the loop."""
        if domains == ALL:
            wanted: Iterable[str] = list(self._slots)
            # The watcher reached the store again: so can the rest.
            self._store_down_until = -math.inf
            self._store_back()
        else:
            wanted = domains
        for domain in wanted:
            waiter = self._awaiting.pop(domain, None)
            if waiter is not None and not waiter.done():
                waiter.set_result(None)
            if domain in self._slots:
                self._reread.add(domain)
        if self._reread and (self._rereading is None or self._rereading.done()):
            self._rereading = asyncio.get_running_loop().create_task(self._read_again())

    async def _read_again(self) -> None:
        """Read the entries of the domains in ``_reread`` from the store and answer from them."""
        while self._reread:
            batch = [self._reread.pop() for _ in range(min(REREAD_BATCH, len(self._reread)))]
            try:
                entries = await self._store_call(self._store_reads, self._load_many, batch)
            except StoreError:
                # The watcher reports every domain again once the store is back.
                self._reread.clear()
                return
            for domain, entry in entries:
                self._adopt(domain, entry)

    def _load_many(self, domains: list[str]) -> list[tuple[str, Entry | None]]:
        return [(domain, self._load(domain)) for domain in domains]

    def _adopt(self, domain: str, entry: Entry | None) -> None:
        """Answer ``domain`` from ``entry``, as another daemon left it in the store."""
        slot = self._slots.get(domain)
        if slot is None or domain in self._lookups:
            # Not held (read from the store when asked), or being looked up (whose result is
            # at least as new).
            return
        now = self._clock()
        in_force = slot.policy and now < slot.valid_until
        if entry is None:
            if domain in self._unsaved:
                return  # learnt here and not yet written: the store's lack of it is no news
            # Forgotten (`postfix-mtasts cache forget`): looked up afresh when next asked.
            del self._slots[domain]
            log.info("%s: removed from the shared cache; looked up again when asked", domain)
            return
        if in_force and (
            entry.policy_text is None
            or entry.expires_at is None
            or entry.expires_at < slot.valid_until
        ):
            # Only a newer fetched policy replaces a policy in force (RFC 8461 §5): not an entry
            # without one, nor an older one written late.
            return
        self._unsaved.pop(domain, None)
        found = cache_rules.consult(
            domain, entry, None, now, self.settings, "", tolerant=self.tolerant
        )
        if isinstance(found, Answer):
            decision = found.decision
            if decision.parsed is not None:
                decision = replace(decision, parsed=None)
            slot.update(decision, found.valid_until, found.check_after)
        elif not in_force:
            del self._slots[domain]

    async def _maintain(self) -> None:
        while True:
            await asyncio.sleep(MAINTENANCE_INTERVAL)
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
        s = self.settings
        for domain, slot in list(self._slots.items()):
            if domain in self._lookups:
                continue
            if not cache_rules.keep_in_memory(slot.valid_until, slot.last_used, now, s):
                del self._slots[domain]
                self._unsaved.pop(domain, None)
            elif domain not in self._unsaved and cache_rules.check_due(
                slot.policy, slot.valid_until, slot.check_after, now
            ):
                self._start(domain, slot)
        if self._unsaved:
            await self._write_back()
        unused, negative = cache_rules.purge_horizons(now, s)
        try:
            removed = await self._store_call(self._store_writes, self._purge, unused, negative)
        except StoreError as exc:
            self._store_writes.failed(str(exc), "unused entries stay in the cache for now")
            return
        if isinstance(removed, str):
            self._store_writes.failed(removed, "unused entries stay in the cache for now")
        elif removed:
            log.info("removed %d cache entries unused since %s", removed, cache_rules.when(unused))

    def _purge(self, unused: float, negative: float) -> int | str:
        """In the store's threads: remove unused entries; how many, or the failure."""
        try:
            return self.store.purge_unused(unused, negative)
        except StoreError as exc:
            return str(exc)

    @property
    def size(self) -> int:
        """Domains held in memory."""
        return len(self._slots)

    @property
    def store_failing(self) -> str:
        """Why the store failed at its last call ("" once a call succeeded again)."""
        return self._store_down_cause

    @property
    def pending(self) -> int:
        """Lookups under way (for statistics and graceful stop)."""
        return len(self._lookups)
