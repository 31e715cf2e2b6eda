"""The MTA-STS cache rules (RFC 8461 §3.3 and §5), as pure functions of what is known.

MTA-STS is trust on first use: a policy, once fetched, must be applied until it expires, whatever
DNS or HTTPS say in between, because an attacker who can block discovery can make a domain look
unprotected. This module says what follows from that for one domain, given the stored entry, the
time and the outcome of a TXT query and of a policy fetch. It does no I/O, keeps no state, reads no
clock and logs nothing: what is to be logged comes back as data (``Note``). :mod:`policydb` carries
out what it decides (threads, the store, the resolver, the fetcher).

A lookup goes through up to three steps:

1. :func:`consult` -- what the store (or memory) holds: an ``Answer`` to give now (perhaps with a
   check to make right after it), or a ``Plan`` for asking the network;
2. :func:`after_record` -- the TXT record's outcome: an ``Outcome`` (the answer and the entry to
   store), or ``Fetch`` when the policy must be fetched;
3. :func:`after_fetch` -- the fetch's outcome: an ``Outcome``.

Between lookups, :func:`keep_in_memory`, :func:`check_due` and :func:`purge_horizons` say what
maintenance forgets, refreshes and removes.

Policy changes. A real fetch is the only moment the cached policy meets its successor, so
:func:`after_fetch` also says what changed that a postmaster should hear of: a downgrade from
``enforce``, a new set of MX patterns, a ``max_age`` cut to under a day, or the first failed fetch
of a run while the TXT record is present. Each is one WARNING note starting
``policy-change: DOMAIN: `` and a kind in ``Outcome.changes`` (:data:`POLICY_CHANGES`), which
:mod:`policydb` counts. What only reads the cache (memory, the store, another daemon's entry) never
compares, so a restart or a fleet's shared entry raises no alert twice.
"""

from __future__ import annotations

import functools
import logging
import time
from dataclasses import dataclass, field, replace

from postfix_mtasts import mtasts
from postfix_mtasts.config import CacheConfig, Config
from postfix_mtasts.mtasts import Mode, Policy, Record
from postfix_mtasts.store import Entry

__all__ = [
    "DNS_RETRY_INTERVAL",
    "POLICY_CHANGES",
    "Answer",
    "Decision",
    "Fetch",
    "Note",
    "Outcome",
    "Plan",
    "after_fetch",
    "after_record",
    "check_due",
    "consult",
    "expire",
    "forced_plan",
    "forced_step",
    "held_decision",
    "in_force",
    "keep_in_memory",
    "purge_horizons",
    "unexpired",
]

# A temporary DNS failure is retried sooner than the RFC's five minutes for a failed fetch.
DNS_RETRY_INTERVAL = 60.0

# Parsed policies of the decisions answered lately: a decision keeps only the policy text (one
# object per cached domain instead of a Policy with its MX objects), and is parsed again when a
# reply is built from it, which the responder's memo makes rare.
PARSED_POLICIES = 1024

# Something for the postmaster's log: (logging level, message).
Note = tuple[int, str]

# The kinds of policy change, the keys of PolicyDB.policy_changes: a downgrade from enforce, a
# changed MX pattern set, a max_age cut to under a day, fetches failing while the record is there.
POLICY_CHANGES = ("downgrade", "mx", "max_age", "fetch_failing")
# Every policy-change line starts with this, then the domain and ": ": one string to grep for.
CHANGE_PREFIX = "policy-change: "
# A max_age cut below this is a change worth a line: a policy that short lapses within a day of
# its host becoming unreachable, which is what an attacker who can block the fetch waits for.
SHORT_MAX_AGE = 86400
# At most this many characters of text from the remote domain (MX patterns, a failure's cause)
# go into one policy-change line.
MAX_CHANGE_TEXT = 300


# Policies read back from the store are read as they were when fetched: with the daemon's
# [policy] parsing setting, this default unless the caller passes it.
TOLERANT = Config.parsing == "tolerant"
# Every policy-defects line starts with this, then the domain and ": ": one string to grep for.
DEFECTS_PREFIX = "policy-defects: "


@functools.lru_cache(maxsize=PARSED_POLICIES)
def _parsed(text: str, domain: str) -> Policy:
    # Only texts that passed consult() or a fetch under the daemon's setting get here, and a
    # tolerant reading of a text the strict one accepts gives the same Policy: whatever the
    # setting, reading tolerantly here gives what that setting gave.
    return mtasts.parse_policy(text, domain, tolerant=True)


@dataclass(frozen=True, slots=True)
class Decision:
    """What the cache says about one policy domain right now.

    ``policy`` is the policy to apply, or ``None`` when the domain has no usable policy (no record,
    failed discovery without a cached policy, expired). A ``mode: none`` policy is kept as such.
    ``error`` is the last failure, for logs and the query tool; ``failure`` its RFC 8460 type.
    ``defer`` is set (to the reason) when nothing could be decided for a local reason, such as
    too many lookups at once or no file descriptor left: Postfix is to try again later.

    ``policy`` is parsed from the policy text (needed for TLSRPT anyway) when it is read, unless
    the decision was made with the policy at hand (``parsed``: not part of its value); only texts
    that parsed when they were cached are ever held here. Memory keeps a decision only until the
    replies built from it are kept instead.
    """

    domain: str
    policy_text: str | None = None
    record_id: str | None = None
    expires_at: float | None = None
    error: str = ""
    failure: str = ""
    defer: str = ""
    parsed: Policy | None = field(default=None, compare=False, repr=False)

    @property
    def policy(self) -> Policy | None:
        if self.policy_text is None:
            return None
        if self.parsed is not None:
            return self.parsed
        return _parsed(self.policy_text, self.domain)


@dataclass(frozen=True, slots=True)
class Answer:
    """Answer ``decision`` now, from ``entry`` as the store (or memory) holds it. ``check``: the
    TXT record is due for a check, to be made right after the answer, never before it (§5)."""

    entry: Entry
    decision: Decision
    valid_until: float
    check_after: float
    check: bool = False
    notes: tuple[Note, ...] = ()


@dataclass(frozen=True, slots=True)
class Plan:
    """Where the network part of a lookup starts: the time it started, the entry to update (an
    expired policy already taken out) and the unexpired policy cached, if any. ``unread`` is why
    the store could not be read ("" when it was): what it may hold is then unknown."""

    now: float
    base: Entry
    cached: Policy | None
    unread: str = ""
    notes: tuple[Note, ...] = ()


@dataclass(frozen=True, slots=True)
class Fetch:
    """The policy must be fetched (none cached, a new ``id``, or a refresh due)."""

    record: Record


@dataclass(frozen=True, slots=True)
class Outcome:
    """The end of a lookup: the entry to store, the decision to answer with, until when it may be
    answered and from when to check it again, a one-line ``summary`` and ``notes`` for the log.
    ``defer`` is set when the network settled nothing and the store, which may hold an unexpired
    policy that must be applied (§5), could not be read: a local failure, not "no policy".
    ``changes``: the kinds of policy change (:data:`POLICY_CHANGES`) this lookup's fetch found,
    each also a ``policy-change:`` note."""

    entry: Entry
    decision: Decision
    valid_until: float
    check_after: float
    summary: str
    notes: tuple[Note, ...] = ()
    defer: str = ""
    changes: tuple[str, ...] = ()


def when(timestamp: float | None) -> str:
    """A timestamp as a postmaster reads it in a log line."""
    if timestamp is None:
        return "never"
    return time.strftime("%Y-%m-%d %H:%M:%S UTC", time.gmtime(timestamp))


def unexpired(decision: Decision, now: float) -> Decision:
    """``decision`` without its policy once that policy expired: never used after (§5)."""
    if decision.policy_text is None or decision.expires_at is None or decision.expires_at > now:
        return decision
    return replace(decision, policy_text=None, expires_at=None, error="expired", parsed=None)


def expire(outcome: Outcome, now: float) -> Outcome:
    """``outcome`` as it stands at ``now``, when the lookup ended: a lookup that straddled the
    expiry of the policy it kept must not hand that policy out (§5); what is left of the answer
    holds while the entry's backoff lasts."""
    decision = unexpired(outcome.decision, now)
    if decision is outcome.decision:
        return outcome
    until = outcome.entry.backoff_until
    return replace(outcome, decision=decision, valid_until=until, check_after=until)


def in_force(decision: Decision | None, now: float) -> bool:
    """Whether ``decision`` is an unexpired policy: one that is answered while it is checked."""
    return (
        decision is not None
        and decision.policy_text is not None
        and decision.expires_at is not None
        and decision.expires_at > now
    )


def _decision(domain: str, entry: Entry, policy: Policy | None, failure: str = "") -> Decision:
    # ``domain`` rather than entry.domain: policydb's key, one string for both.
    return Decision(
        domain=domain,
        policy_text=entry.policy_text if policy is not None else None,
        record_id=entry.record_id,
        expires_at=entry.expires_at if policy is not None else None,
        error=entry.last_error,
        failure=failure,
        parsed=policy,
    )


def held_decision(domain: str, entry: Entry, policy: bool, valid_until: float) -> Decision | None:
    """The decision memory answers with (``policy``: a policy or not; until ``valid_until``),
    read back from the stored ``entry``; None when the entry holds another answer. A policy is
    only replaced by a fetch, and each fetch gives a new ``expires_at``: the same ``expires_at``
    is the same policy."""
    if not policy:
        return _decision(domain, entry, None)
    if entry.policy_text is None or entry.expires_at != valid_until:
        return None
    return Decision(
        domain=domain,
        policy_text=entry.policy_text,
        record_id=entry.record_id,
        expires_at=entry.expires_at,
        error=entry.last_error,
    )


def _refresh_at(fetched_at: float | None, policy: Policy, settings: CacheConfig) -> float:
    # §3.3 (proactive refresh): well before expiry, daily or at half of a shorter max_age.
    return (fetched_at or 0.0) + min(settings.refresh_interval, policy.max_age / 2)


def _schedule(entry: Entry, policy: Policy | None, settings: CacheConfig) -> tuple[float, float]:
    """Until when the decision built from ``entry`` may be answered, and from when to check it."""
    if policy is not None and entry.expires_at is not None:
        check_after = min(
            (entry.checked_at or 0.0) + settings.txt_check_interval,
            _refresh_at(entry.fetched_at, policy, settings),
        )
        # §3.3: a failed attempt is not repeated before its backoff ends.
        check_after = max(check_after, entry.backoff_until)
        # §5: never used after fetched_at + max_age.
        return entry.expires_at, min(check_after, entry.expires_at)
    # No policy: the answer holds while the no-record memory or the backoff lasts.
    return entry.backoff_until, entry.backoff_until


def _parse_cached(
    entry: Entry, now: float, tolerant: bool
) -> tuple[Policy | None, tuple[Note, ...]]:
    if entry.policy_text is None or entry.expires_at is None or entry.expires_at <= now:
        return None, ()
    try:
        return mtasts.parse_policy(entry.policy_text, entry.domain, tolerant=tolerant), ()
    except mtasts.PolicySyntaxError as exc:
        # Also a policy fetched under [policy] parsing = "tolerant" and read back under "strict".
        note = f"{entry.domain}: cached policy no longer parses ({exc}); ignoring it"
        return None, ((logging.WARNING, note),)


def consult(
    domain: str,
    stored: Entry | None,
    current: Decision | None,
    now: float,
    settings: CacheConfig,
    unread: str = "",
    *,
    tolerant: bool = TOLERANT,
) -> Answer | Plan:
    """What to do with what is known: ``stored`` is the store's entry (or the one memory holds
    because the store failed to take it), ``current`` the decision answered from memory until
    now, ``unread`` why the store could not be read. ``tolerant``: read the stored policy as
    ``[policy] parsing = "tolerant"`` does (else strictly)."""
    entry = stored
    if entry is None and current is not None and current.policy_text is not None:
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
    cached: Policy | None = None
    notes: tuple[Note, ...] = ()
    if entry is not None:
        cached, notes = _parse_cached(entry, now, tolerant)
        decision = _decision(domain, entry, cached)
        valid_until, check_after = _schedule(entry, cached, settings)
        if now < valid_until and now < check_after:
            # Fresh in the store: written before a restart, or by another daemon.
            return Answer(entry, decision, valid_until, check_after, notes=notes)
        if cached is not None and not in_force(current, now):
            # An unexpired policy in the store is the answer now, whatever DNS and HTTPS do
            # later (§5): its check runs after the answer, never before it.
            return Answer(entry, decision, valid_until, check_after, check=True, notes=notes)
        if cached is None and entry.last_error and now < entry.backoff_until:
            # §3.3: a failed attempt is not repeated within the retry interval, also when the
            # policy it failed to refresh has expired meanwhile.
            return Answer(entry, decision, valid_until, check_after, notes=notes)
    base = entry or Entry.unknown(domain, now)
    if cached is None and base.policy_text is not None:
        # The stored policy expired: it must not be used any more (§5).
        if base.expires_at is not None and base.expires_at <= now:
            note = (
                f"{domain}: cached policy expired at {when(base.expires_at)}; looking it up again"
            )
            notes += ((logging.WARNING, note),)
        base = replace(base, policy_text=None, fetched_at=None, expires_at=None)
    return Plan(now, base, cached, unread, notes)


def _outcome(
    domain: str,
    plan: Plan,
    settings: CacheConfig,
    settled: bool,
    entry: Entry,
    policy: Policy | None,
    summary: str,
    notes: tuple[Note, ...] = (),
    failure: str = "",
    changes: tuple[str, ...] = (),
) -> Outcome:
    """The outcome of a lookup. ``settled``: the network said something definite (a record, or
    no record), and a failure of its own to fetch a policy does not count as such."""
    decision = _decision(domain, entry, policy, failure)
    defer = ""
    if plan.unread and not settled and policy is None:
        defer = f"{domain}: {summary}; and the cache cannot be read ({plan.unread})"
    entry = replace(entry, last_used=max(entry.last_used, plan.now))
    valid_until, check_after = _schedule(entry, policy, settings)
    return Outcome(
        entry, decision, valid_until, check_after, summary, plan.notes + notes, defer, changes
    )


def _keeping(domain: str, cause: str, cached: Policy, base: Entry) -> Note:
    return (
        logging.WARNING,
        f"{domain}: {cause}; keeping the cached {cached.mode} policy until {when(base.expires_at)}",
    )


def _printable(text: str) -> str:
    return mtasts.printable(text, MAX_CHANGE_TEXT)


def _mx_patterns(policy: Policy) -> str:
    """The policy's MX patterns in its order, each once, as one bounded, comma-separated string.
    The parser let only host names through; the bound is for a policy with very many lines."""
    patterns = [_printable(pattern) for pattern in dict.fromkeys(str(mx) for mx in policy.mx)]
    shown = ""
    for count, pattern in enumerate(patterns):
        joined = f"{shown},{pattern}" if shown else pattern
        if len(joined) > MAX_CHANGE_TEXT:
            return f"{shown},... ({len(patterns) - count} more)"
        shown = joined
    return shown or "(none)"


def _change(domain: str, what: str) -> Note:
    return (logging.WARNING, f"{CHANGE_PREFIX}{domain}: {what}")


def _policy_changes(
    domain: str, cached: Policy, policy: Policy
) -> tuple[tuple[Note, ...], tuple[str, ...]]:
    """What a fetched ``policy`` changes against the ``cached`` one it replaces: notes for the log
    and the kinds of change (:data:`POLICY_CHANGES`)."""
    notes: list[Note] = []
    kinds: list[str] = []
    old, new = cached.mode, policy.mode
    if old is Mode.ENFORCE and new is not Mode.ENFORCE:
        # A downgrade is what an attacker who controls discovery would serve (§10.2); the
        # domain may also have meant it, which only its postmaster can tell.
        if new is Mode.NONE:
            why = "the domain withdrew MTA-STS (§8.3), or someone wants that believed"
        else:
            why = "MX hosts failing the policy are delivered to anyway"
        notes.append(_change(domain, f"mode {old} -> {new} (a downgrade: {why})"))
        kinds.append("downgrade")
    elif new is Mode.ENFORCE and old is not Mode.ENFORCE:
        # An upgrade is what the domain asked for, not an alert; but deliveries that worked in
        # testing mode may be deferred from now on, so it is worth a line.
        notes.append(
            (
                logging.INFO,
                f"{domain}: mode {old} -> {new} (an upgrade: MX hosts failing the policy are"
                " deferred from now on)",
            )
        )
    elif new is Mode.NONE and old is not Mode.NONE:
        # §8.3: a published "none" policy is how a domain withdraws MTA-STS.
        notes.append((logging.INFO, f"{domain}: the domain withdrew its {old} policy (mode: none)"))
    # The MX patterns of a "none" policy apply to nothing: only two applied sets are compared.
    if old is not Mode.NONE and new is not Mode.NONE:
        before = {str(mx) for mx in cached.mx}
        if before != {str(mx) for mx in policy.mx}:
            change = f"mx {_mx_patterns(cached)} -> {_mx_patterns(policy)}"
            notes.append(_change(domain, change))
            kinds.append("mx")
    if cached.max_age >= SHORT_MAX_AGE > policy.max_age:
        notes.append(_change(domain, f"max_age {cached.max_age} -> {policy.max_age} (under a day)"))
        kinds.append("max_age")
    return tuple(notes), tuple(kinds)


def _fetch_failed(entry: Entry) -> bool:
    """Whether ``entry`` was last left by a failed policy fetch: a run of failures is on."""
    return any(
        entry.last_error.startswith(f"{entry.domain}: {error.what} (")
        for error in (mtasts.PolicyFetchError, mtasts.NoPolicyError, mtasts.PolicySyntaxError)
    )


def after_record(
    domain: str,
    plan: Plan,
    record: Record | mtasts.MTASTSError,
    settings: CacheConfig,
) -> Outcome | Fetch:
    """RFC 8461 §3.3: the outcome of the TXT record's check. ``Fetch`` when the policy must be
    fetched: none is cached, the ``id`` changed, or a proactive refresh is due."""
    now, base, cached = plan.now, plan.base, plan.cached
    if isinstance(record, mtasts.DNSError):
        new = replace(base, last_error=str(record), backoff_until=now + DNS_RETRY_INTERVAL)
        if cached is not None:
            summary = f"DNS failed, kept cached policy: {record}"
            notes = (_keeping(domain, record.cause, cached, base),)
            return _outcome(domain, plan, settings, False, new, cached, summary, notes)
        return _outcome(domain, plan, settings, False, new, None, f"DNS failed: {record.cause}")
    if isinstance(record, mtasts.MTASTSError):
        if cached is not None:
            # §3.3: no live record, but an unexpired cached policy: it MUST still be applied.
            new = replace(base, checked_at=now, last_error=str(record))
            summary = f"record gone, kept cached policy: {record}"
            notes = (_keeping(domain, record.cause, cached, base),)
            return _outcome(domain, plan, settings, True, new, cached, summary, notes)
        # No record: remembered for no_record_ttl, so it costs no TXT query per delivery.
        new = replace(
            base,
            record_id=None,
            checked_at=now,
            last_error=str(record),
            backoff_until=now + settings.no_record_ttl,
        )
        return _outcome(domain, plan, settings, True, new, None, f"no policy: {record.cause}")
    if (
        cached is None
        or record.id != base.record_id
        or now >= _refresh_at(base.fetched_at, cached, settings)
    ):
        return Fetch(record)
    new = replace(base, checked_at=now, last_error="", backoff_until=0.0)
    return _outcome(domain, plan, settings, True, new, cached, f"record id {record.id} unchanged")


def after_fetch(
    domain: str,
    plan: Plan,
    record: Record,
    fetched: tuple[Policy, str] | mtasts.MTASTSError,
    settings: CacheConfig,
) -> Outcome:
    """RFC 8461 §3.3: the outcome of the policy fetch that :func:`after_record` asked for
    (``fetched``: the policy and its text as served, or why it could not be had).

    When a policy is cached, the outcome also carries what changed (``changes`` and a
    ``policy-change:`` note each): against the fetched policy, a downgrade from ``enforce``, a
    changed set of MX patterns (their order does not count; nor do the patterns of a ``none``
    policy), a ``max_age`` cut from a day or more to under a day; or, when the fetch failed, the
    first failure of a run (the entry was not left by a failed fetch; the run ends with a
    successful one). ``testing`` -> ``enforce`` is an upgrade: an INFO note, not a change. A
    domain with no policy cached has nothing to change: its failures are the summary's."""
    now, base, cached = plan.now, plan.base, plan.cached
    if isinstance(fetched, mtasts.MTASTSError):
        # §3.3: after a failed fetch, at most one attempt per five minutes.
        new = replace(
            base,
            checked_at=now,
            last_error=str(fetched),
            backoff_until=now + settings.fetch_retry_interval,
        )
        if cached is None:
            new = replace(new, record_id=record.id)
            failure = mtasts.tls_report_failure_reason(fetched)
            summary = f"{fetched.what}: {fetched.cause}"
            return _outcome(domain, plan, settings, False, new, None, summary, failure=failure)
        keeping = f"keeping the cached {cached.mode} policy until {when(base.expires_at)}"
        changes: tuple[str, ...] = ()
        if _fetch_failed(base):
            # The run of failures was announced at its first failure; each retry is a plain note.
            note = (
                logging.WARNING,
                f"{domain}: policy refresh failed ({_printable(fetched.cause)}); {keeping}",
            )
        else:
            cause = fetched.cause
            if type(fetched) is not mtasts.PolicyFetchError:
                cause = f"{fetched.what}: {cause}"
            note = _change(
                domain,
                f"policy fetch failing while its TXT record (id {record.id}) is present:"
                f" {_printable(cause)}; {keeping}",
            )
            changes = ("fetch_failing",)
        summary = f"refresh failed, kept cached: {fetched.cause}"
        return _outcome(
            domain, plan, settings, True, new, cached, summary, (note,), changes=changes
        )
    policy, text = fetched
    # Only a successful fetch extends the policy's life (§3.3, §5).
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
    notes: tuple[Note, ...] = ()
    kinds: tuple[str, ...] = ()
    if policy.defects:
        # Once per fetched policy, for the domain's postmaster to be told what to fix.
        defects = mtasts.printable_defects(policy.defects)
        line = f"{DEFECTS_PREFIX}{domain}: {defects}; read tolerantly ([policy] parsing)"
        notes += ((logging.WARNING, line),)
    if cached is not None:
        changed, kinds = _policy_changes(domain, cached, policy)
        notes += changed
    summary = f"{policy.mode} policy, id {record.id}"
    return _outcome(domain, plan, settings, True, new, policy, summary, notes, changes=kinds)


def forced_plan(
    domain: str, stored: Entry | None, now: float, *, tolerant: bool = TOLERANT
) -> Plan:
    """Where a refresh an operator asked for (``postfix-mtasts cache refresh``) starts, whatever
    the entry's schedule or backoff says: :func:`consult`'s plan, never its answer. An unexpired
    policy ``stored`` holds is the one a failed lookup keeps (§5); an expired one is dropped.
    ``tolerant`` as for :func:`consult`."""
    base = stored or Entry.unknown(domain, now)
    cached, notes = _parse_cached(base, now, tolerant)
    if cached is None and base.policy_text is not None:
        # §5: an expired (or no longer parsable) policy is never used again.
        base = replace(base, policy_text=None, fetched_at=None, expires_at=None)
    return Plan(now, base, cached, "", notes)


def forced_step(
    domain: str, plan: Plan, record: Record | mtasts.MTASTSError, settings: CacheConfig
) -> Outcome | Fetch:
    """:func:`after_record` for a refresh an operator asked for: a valid record always leads to a
    fetch, also when its ``id`` is unchanged and no refresh is due (the operator knows the policy
    changed without a new ``id``). A failed TXT lookup is judged as always (§3.3)."""
    if isinstance(record, Record):
        return Fetch(record)
    return after_record(domain, plan, record, settings)


def keep_in_memory(valid_until: float, last_used: float, now: float, settings: CacheConfig) -> bool:
    """Whether a domain held in memory is worth keeping: used within ``unused_after``, and its
    answer not expired (no policy, or an expired one: the next asker looks it up again)."""
    return last_used >= now - settings.unused_after and valid_until > now


def check_due(policy: bool, valid_until: float, check_after: float, now: float) -> bool:
    """Whether maintenance refreshes a domain nobody asked for lately: a policy (``policy``) in
    force whose check (TXT record, proactive refresh) is due, so that it never falls out of the
    cache."""
    return policy and valid_until > now and now >= check_after


def purge_horizons(now: float, settings: CacheConfig) -> tuple[float, float]:
    """The stored entries to remove: those last used before the first time, and those without a
    policy last used before the second (they only carry a no-record memory or a backoff, worth
    nothing once that is over; a client asking for a million names leaves no million rows)."""
    negative = max(settings.no_record_ttl, settings.fetch_retry_interval, DNS_RETRY_INTERVAL)
    return now - settings.unused_after, now - negative
