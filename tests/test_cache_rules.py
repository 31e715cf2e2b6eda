"""The cache rules, ``postfix_mtasts.cache_rules``: RFC 8461 §3.3 and §5 as values in, values out.

No server, no thread, no clock: each row gives what is known (the stored entry, the time, the
outcome of the TXT query and of the fetch) and what the rules must decide. The same rules are
tested against the real DNS and HTTPS bed, through ``PolicyDB``, in test_policydb.py.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass, replace

import pytest
from hypothesis import given
from hypothesis import strategies as st

from postfix_mtasts import cache_rules, mtasts
from postfix_mtasts.cache_rules import (
    DNS_RETRY_INTERVAL,
    Answer,
    Decision,
    Fetch,
    Outcome,
    Plan,
    after_fetch,
    after_record,
    consult,
)
from postfix_mtasts.config import CacheConfig
from postfix_mtasts.mtasts import Mode, Record
from postfix_mtasts.store import Entry

D = "example.com"
T0 = 1_700_000_000.0
MAX_AGE = 86400
S = CacheConfig(
    backend="memory",
    path="",
    txt_check_interval=300.0,
    refresh_interval=3600.0,
    unused_after=30 * 86400.0,
    no_record_ttl=120.0,
    fetch_retry_interval=300.0,
)


def policy_text(mode: str = "enforce", max_age: int = MAX_AGE, mx: str = "mail.example.com") -> str:
    return f"version: STSv1\nmode: {mode}\nmx: {mx}\nmax_age: {max_age}\n"


def fetched(mode: str = "enforce", max_age: int = MAX_AGE) -> tuple[mtasts.Policy, str]:
    text = policy_text(mode, max_age)
    return mtasts.parse_policy(text, D), text


def stored(at: float = T0, record_id: str | None = "1", **changes: object) -> Entry:
    """An entry as a successful fetch at ``at`` leaves it."""
    text = policy_text()
    entry = Entry(D, record_id, text, at, at + MAX_AGE, at, at)
    return replace(entry, **changes)  # type: ignore[arg-type]


def no_record_entry(at: float = T0) -> Entry:
    return Entry(D, None, None, None, None, at, at, "no record", at + S.no_record_ttl)


def record(record_id: str = "1") -> Record:
    return mtasts.parse_record(f"v=STSv1; id={record_id}", D)


NO_RECORD = mtasts.NoRecordError(D, "no TXT record at _mta-sts.example.com")
DNS_DOWN = mtasts.DNSError(D, "SERVFAIL")
FETCH_FAILED = mtasts.PolicyFetchError(D, "HTTP 500")


def plan_at(now: float, entry: Entry | None = None) -> Plan:
    """Where a network lookup starts: at once for a domain with nothing in force, else (as
    policydb does) the check behind the answer the store gave."""
    step = consult(D, entry, None, now, S)
    if isinstance(step, Answer):
        assert step.check, step
        step = consult(D, entry, step.decision, now, S)
    assert isinstance(step, Plan), step
    return step


def lookup(
    now: float,
    entry: Entry | None,
    txt: Record | mtasts.MTASTSError,
    fetch: tuple[mtasts.Policy, str] | mtasts.MTASTSError | None = None,
) -> Outcome:
    """A whole network lookup; ``fetch`` must be given exactly when the rules ask for one."""
    plan = plan_at(now, entry)
    step = after_record(D, plan, txt, S)
    if isinstance(step, Fetch):
        assert fetch is not None, "the rules fetched where the row expected none"
        return after_fetch(D, plan, step.record, fetch, S)
    assert fetch is None, "the rules fetched nothing where the row expected a fetch"
    return step


# --------------------------------------------------------------------------------------------------
# Step 1: what the store holds.


@dataclass(frozen=True)
class Held:
    rule: str
    entry: Entry | None
    now: float
    # "plan": go to the network; "answer": answer now; "answer+check": answer now, check after.
    expected: str
    has_policy: bool


HELD = [
    Held("first use: nothing known, ask the network", None, T0, "plan", False),
    Held("fresh policy in the store: answered, nothing to do", stored(), T0 + 10, "answer", True),
    Held(
        "policy whose TXT check is due: answered now, checked after (§5)",
        stored(),
        T0 + S.txt_check_interval + 1,
        "answer+check",
        True,
    ),
    Held(
        "proactive refresh due: answered now, refreshed after (§3.3)",
        stored(checked_at=T0 + 3000),
        T0 + S.refresh_interval + 1,
        "answer+check",
        True,
    ),
    Held("expired at fetched_at + max_age: never used (§5)", stored(), T0 + MAX_AGE, "plan", False),
    Held(
        "no-record memory: answered without policy while it lasts",
        no_record_entry(),
        T0 + S.no_record_ttl - 1,
        "answer",
        False,
    ),
    Held(
        "no-record memory over: asked again", no_record_entry(), T0 + S.no_record_ttl, "plan", False
    ),
    Held(
        "failed fetch, no policy: not retried within the backoff (§3.3)",
        Entry(D, "1", None, None, None, T0, T0, "HTTP 500", T0 + S.fetch_retry_interval),
        T0 + S.fetch_retry_interval - 1,
        "answer",
        False,
    ),
    Held(
        "failed refresh of an expired policy: not retried within the backoff either",
        stored(last_error="HTTP 500", backoff_until=T0 + MAX_AGE + 100),
        T0 + MAX_AGE + 50,
        "answer",
        False,
    ),
    Held(
        "policy text that no longer parses: ignored",
        stored(policy_text="garbage"),
        T0 + 10,
        "plan",
        False,
    ),
]


@pytest.mark.parametrize("row", HELD, ids=[row.rule for row in HELD])
def test_consult(row: Held) -> None:
    step = consult(D, row.entry, None, row.now, S)
    if row.expected == "plan":
        assert isinstance(step, Plan)
        assert (step.cached is not None) == row.has_policy
        # An expired or unusable policy is taken out of the entry to update (§5).
        assert step.base.policy_text is None or step.cached is not None
        return
    assert isinstance(step, Answer)
    assert step.check == (row.expected == "answer+check")
    assert (step.decision.policy is not None) == row.has_policy
    if row.expected == "answer":
        assert row.now < step.valid_until and row.now < step.check_after


def test_an_expired_policy_is_noted_for_the_log() -> None:
    step = plan_at(T0 + MAX_AGE + 1, stored())
    assert [level for level, _ in step.notes] == [logging.WARNING]
    assert "expired" in step.notes[0][1]


def test_a_policy_in_force_in_memory_survives_a_store_that_lost_it() -> None:
    # §5: the policy held in memory is applied until it expires, whatever the store says.
    current = Decision(D, policy_text(), "1", T0 + MAX_AGE)
    step = consult(D, None, current, T0 + S.txt_check_interval + 1, S)
    assert isinstance(step, Plan)
    assert step.cached is not None and step.base.expires_at == T0 + MAX_AGE


# --------------------------------------------------------------------------------------------------
# Steps 2 and 3: the TXT record's outcome, then the fetch's.


@dataclass(frozen=True)
class Lookup:
    rule: str
    entry: Entry | None
    now: float
    txt: Record | mtasts.MTASTSError
    fetch: tuple[mtasts.Policy, str] | mtasts.MTASTSError | None
    mode: Mode | None  # the policy answered (None: none)
    expires_at: float | None
    check_after: float  # from when the answer is checked again
    valid_until: float


LOOKUPS = [
    Lookup(
        "first use: record, policy fetched",
        None,
        T0,
        record(),
        fetched(),
        Mode.ENFORCE,
        T0 + MAX_AGE,
        T0 + S.txt_check_interval,
        T0 + MAX_AGE,
    ),
    Lookup(
        "id unchanged: no fetch, the policy's life not extended",
        stored(),
        T0 + 400,
        record("1"),
        None,
        Mode.ENFORCE,
        T0 + MAX_AGE,
        T0 + 400 + S.txt_check_interval,
        T0 + MAX_AGE,
    ),
    Lookup(
        "id changed: the new policy is fetched (§3.3)",
        stored(),
        T0 + 400,
        record("2"),
        fetched("testing"),
        Mode.TESTING,
        T0 + 400 + MAX_AGE,
        T0 + 400 + S.txt_check_interval,
        T0 + 400 + MAX_AGE,
    ),
    Lookup(
        "proactive refresh: only a real fetch extends the policy's life",
        stored(checked_at=T0 + 3000),
        T0 + S.refresh_interval + 1,
        record("1"),
        fetched(),
        Mode.ENFORCE,
        T0 + S.refresh_interval + 1 + MAX_AGE,
        T0 + S.refresh_interval + 1 + S.txt_check_interval,
        T0 + S.refresh_interval + 1 + MAX_AGE,
    ),
    Lookup(
        "proactive refresh failing: the cached policy kept, unextended, retried after the backoff",
        stored(checked_at=T0 + 3000),
        T0 + S.refresh_interval + 1,
        record("1"),
        FETCH_FAILED,
        Mode.ENFORCE,
        T0 + MAX_AGE,
        T0 + S.refresh_interval + 1 + S.fetch_retry_interval,
        T0 + MAX_AGE,
    ),
    Lookup(
        "fetch failure without a cached policy: no policy, fetch backoff (§3.3)",
        None,
        T0,
        record(),
        FETCH_FAILED,
        None,
        None,
        T0 + S.fetch_retry_interval,
        T0 + S.fetch_retry_interval,
    ),
    Lookup(
        "fetch failure with a cached policy: the cached policy is kept (§3.3)",
        stored(),
        T0 + 400,
        record("2"),
        FETCH_FAILED,
        Mode.ENFORCE,
        T0 + MAX_AGE,
        T0 + 400 + S.fetch_retry_interval,
        T0 + MAX_AGE,
    ),
    Lookup(
        "mode none replaces a cached policy (§8.3)",
        stored(),
        T0 + 400,
        record("2"),
        fetched("none"),
        Mode.NONE,
        T0 + 400 + MAX_AGE,
        T0 + 400 + S.txt_check_interval,
        T0 + 400 + MAX_AGE,
    ),
    Lookup(
        "no record: remembered for no_record_ttl",
        None,
        T0,
        NO_RECORD,
        None,
        None,
        None,
        T0 + S.no_record_ttl,
        T0 + S.no_record_ttl,
    ),
    Lookup(
        "record gone with a cached policy: the policy MUST still be applied (§3.3)",
        stored(),
        T0 + 400,
        NO_RECORD,
        None,
        Mode.ENFORCE,
        T0 + MAX_AGE,
        T0 + 400 + S.txt_check_interval,
        T0 + MAX_AGE,
    ),
    Lookup(
        "DNS failure without a policy: retried after the DNS retry interval",
        None,
        T0,
        DNS_DOWN,
        None,
        None,
        None,
        T0 + DNS_RETRY_INTERVAL,
        T0 + DNS_RETRY_INTERVAL,
    ),
    Lookup(
        "DNS failure with a cached policy: kept, not retried before the DNS retry interval",
        stored(),
        T0 + 400,
        DNS_DOWN,
        None,
        Mode.ENFORCE,
        T0 + MAX_AGE,
        T0 + 400 + DNS_RETRY_INTERVAL,
        T0 + MAX_AGE,
    ),
    Lookup(
        "expired policy: looked up as if new, and fetched",
        stored(),
        T0 + MAX_AGE + 5,
        record("1"),
        fetched(),
        Mode.ENFORCE,
        T0 + MAX_AGE + 5 + MAX_AGE,
        T0 + MAX_AGE + 5 + S.txt_check_interval,
        T0 + MAX_AGE + 5 + MAX_AGE,
    ),
]


@pytest.mark.parametrize("row", LOOKUPS, ids=[row.rule for row in LOOKUPS])
def test_lookup(row: Lookup) -> None:
    outcome = lookup(row.now, row.entry, row.txt, row.fetch)
    policy = outcome.decision.policy
    assert (policy.mode if policy is not None else None) == row.mode
    assert outcome.decision.expires_at == row.expires_at
    assert outcome.check_after == row.check_after
    assert outcome.valid_until == row.valid_until
    assert outcome.defer == ""
    # What is stored is what the decision was built from.
    assert outcome.entry.record_id == outcome.decision.record_id
    if policy is not None:
        assert outcome.entry.policy_text == outcome.decision.policy_text
        assert outcome.entry.expires_at == row.expires_at


def test_a_fetch_failure_carries_its_tlsrpt_failure_type() -> None:
    outcome = lookup(T0, None, record(), FETCH_FAILED)
    assert outcome.decision.failure == mtasts.tls_report_failure_reason(FETCH_FAILED)
    assert outcome.decision.error


def test_a_withdrawal_is_noted_for_the_log() -> None:
    outcome = lookup(T0 + 400, stored(), record("2"), fetched("none"))
    assert any("withdrew" in message for _, message in outcome.notes)


@pytest.mark.parametrize("txt", [DNS_DOWN, record()], ids=["DNS failure", "fetch failure"])
def test_nothing_settled_while_the_store_is_unreadable_defers(
    txt: Record | mtasts.MTASTSError,
) -> None:
    # The unreadable store may hold an unexpired policy that must be applied (§5).
    plan = replace(plan_at(T0), unread="disk I/O error")
    step = after_record(D, plan, txt, S)
    if isinstance(step, Fetch):
        step = after_fetch(D, plan, step.record, FETCH_FAILED, S)
    assert "cannot be read" in step.defer


def test_no_record_while_the_store_is_unreadable_is_still_no_policy() -> None:
    plan = replace(plan_at(T0), unread="disk I/O error")
    step = after_record(D, plan, NO_RECORD, S)
    assert isinstance(step, Outcome) and step.defer == ""


def test_a_lookup_straddling_the_expiry_does_not_hand_out_the_policy() -> None:
    outcome = lookup(T0 + MAX_AGE - 10, stored(), DNS_DOWN)
    assert outcome.decision.policy is not None
    ended = cache_rules.expire(outcome, T0 + MAX_AGE)
    assert ended.decision.policy is None and ended.decision.error == "expired"
    assert ended.valid_until == outcome.entry.backoff_until


# --------------------------------------------------------------------------------------------------
# Between lookups: what memory forgets, what maintenance refreshes, what the store drops.


@pytest.mark.parametrize(
    ("valid_until", "last_used", "now", "kept"),
    [
        (T0 + 100, T0, T0 + 50, True),
        (T0 + 100, T0, T0 + 100, False),  # its answer expired
        (T0 + 10 * S.unused_after, T0, T0 + S.unused_after + 1, False),  # unused_after
        (T0 + 10 * S.unused_after, T0, T0 + S.unused_after, True),
    ],
)
def test_keep_in_memory(valid_until: float, last_used: float, now: float, kept: bool) -> None:
    assert cache_rules.keep_in_memory(valid_until, last_used, now, S) is kept


def test_maintenance_refreshes_only_policies_in_force_that_are_due() -> None:
    assert cache_rules.check_due(True, T0 + MAX_AGE, T0 + 300, T0 + 300)
    assert not cache_rules.check_due(True, T0 + MAX_AGE, T0 + 300, T0 + 299)
    assert not cache_rules.check_due(True, T0 + 100, T0 + 50, T0 + 100)
    assert not cache_rules.check_due(False, T0 + 100, T0 + 50, T0 + 60)


def test_purge_horizons_unused_after_and_negative_memories() -> None:
    unused, negative = cache_rules.purge_horizons(T0, S)
    assert unused == T0 - S.unused_after
    assert negative == T0 - max(S.no_record_ttl, S.fetch_retry_interval, DNS_RETRY_INTERVAL)


# --------------------------------------------------------------------------------------------------
# Properties that hold whatever the times and outcomes.

times = st.floats(min_value=0, max_value=3 * MAX_AGE, allow_nan=False)
outcomes = st.sampled_from(["same", "new", "none", "gone", "dns"])
fetches = st.sampled_from(["ok", "failed"])


def _run(entry: Entry | None, now: float, txt: str, fetch: str) -> Outcome | Answer:
    step = consult(D, entry, None, now, S)
    if isinstance(step, Answer):
        if not step.check:
            return step
        step = consult(D, entry, step.decision, now, S)
        assert isinstance(step, Plan)
    the_txt = {
        "same": record("1"),
        "new": record("2"),
        "none": record("3"),
        "gone": NO_RECORD,
        "dns": DNS_DOWN,
    }[txt]
    nxt = after_record(D, step, the_txt, S)
    if isinstance(nxt, Outcome):
        return nxt
    result = fetched("none" if txt == "none" else "enforce") if fetch == "ok" else FETCH_FAILED
    return after_fetch(D, step, nxt.record, result, S)


@given(elapsed=times, txt=outcomes, fetch=fetches)
def test_a_policy_is_never_answered_past_its_expiry(elapsed: float, txt: str, fetch: str) -> None:
    now = T0 + elapsed
    result = _run(stored(), now, txt, fetch)
    decision = result.decision
    if decision.policy is not None:
        assert decision.expires_at is not None and decision.expires_at > now
        assert result.valid_until == decision.expires_at
    assert result.check_after <= result.valid_until or decision.policy is None


@given(elapsed=st.floats(min_value=0, max_value=MAX_AGE - 1, allow_nan=False), txt=outcomes)
def test_an_unexpired_policy_survives_any_discovery_failure(elapsed: float, txt: str) -> None:
    # Trust on first use (§3.3, §5): DNS and HTTPS failing never take an unexpired policy away.
    now = T0 + elapsed
    result = _run(stored(), now, txt, "failed")
    assert result.decision.policy is not None
    assert result.decision.expires_at == T0 + MAX_AGE


@given(elapsed=times, txt=outcomes, fetch=fetches)
def test_the_life_of_a_policy_is_extended_only_by_a_fetch(
    elapsed: float, txt: str, fetch: str
) -> None:
    now = T0 + elapsed
    result = _run(stored(), now, txt, fetch)
    entry = result.entry
    if entry.expires_at is not None and entry.expires_at != T0 + MAX_AGE:
        assert entry.fetched_at == now and entry.expires_at == now + MAX_AGE


# What memory answers, read back from the store once only the replies are held.


def test_held_decision_reads_back_the_policy_memory_answers() -> None:
    entry = stored()
    decision = cache_rules.held_decision(D, entry, True, T0 + MAX_AGE)
    assert decision == Decision(D, entry.policy_text, "1", T0 + MAX_AGE)
    assert decision is not None and decision.policy is not None
    assert decision.policy.mode is Mode.ENFORCE


@pytest.mark.parametrize(
    ("why", "entry"),
    [
        ("another fetch since (another daemon)", stored(at=T0 + 10)),
        ("no policy any more", no_record_entry()),
    ],
)
def test_held_decision_is_none_when_the_store_holds_another_policy(why: str, entry: Entry) -> None:
    assert cache_rules.held_decision(D, entry, True, T0 + MAX_AGE) is None, why


def test_held_decision_without_a_policy_is_the_entrys_without_one() -> None:
    decision = cache_rules.held_decision(D, no_record_entry(), False, T0 + S.no_record_ttl)
    assert decision is not None
    assert decision.policy is None
    assert decision.error == no_record_entry().last_error


# --------------------------------------------------------------------------------------------------
# Policy changes: what a fetch changes against the cached policy, for the postmaster's alerts.

CHANGE = "policy-change: example.com: "


def cached_entry(text: str, at: float = T0) -> Entry:
    """An entry as a successful fetch of ``text`` at ``at`` leaves it."""
    max_age = mtasts.parse_policy(text, D).max_age
    return Entry(D, "1", text, at, at + max_age, at, at)


def served(text: str) -> tuple[mtasts.Policy, str]:
    return mtasts.parse_policy(text, D), text


@dataclass(frozen=True)
class Change:
    rule: str
    cached: str
    fetched: str | mtasts.MTASTSError
    kinds: tuple[str, ...]
    # The WARNING lines expected, each given by its start (the rest is explanation).
    lines: tuple[str, ...]


MX2 = "mail.example.com\nmx: *.example.net"
MX2_REORDERED = "*.example.net\nmx: mail.example.com"

CHANGES = [
    Change("the same policy fetched again: no change", policy_text(), policy_text(), (), ()),
    Change(
        "mx order changed only: the same set, no change",
        policy_text(mx=MX2),
        policy_text(mx=MX2_REORDERED),
        (),
        (),
    ),
    Change(
        "max_age raised: no change",
        policy_text(max_age=3600),
        policy_text(max_age=604800),
        (),
        (),
    ),
    Change(
        "enforce -> testing: a downgrade",
        policy_text(),
        policy_text("testing"),
        ("downgrade",),
        (CHANGE + "mode enforce -> testing (a downgrade: ",),
    ),
    Change(
        "enforce -> none: a downgrade",
        policy_text(),
        policy_text("none"),
        ("downgrade",),
        (CHANGE + "mode enforce -> none (a downgrade: the domain withdrew MTA-STS",),
    ),
    Change(
        "testing -> none: a withdrawal, not a downgrade from enforce",
        policy_text("testing"),
        policy_text("none"),
        (),
        (),
    ),
    Change(
        "testing -> enforce: an upgrade, no alert",
        policy_text("testing"),
        policy_text(),
        (),
        (),
    ),
    Change(
        "mx set replaced",
        policy_text(mx=MX2),
        policy_text(mx="mx.evil.example"),
        ("mx",),
        (CHANGE + "mx mail.example.com,*.example.net -> mx.evil.example",),
    ),
    Change(
        "mx pattern added",
        policy_text(),
        policy_text(mx=MX2),
        ("mx",),
        (CHANGE + "mx mail.example.com -> mail.example.com,*.example.net",),
    ),
    Change(
        "max_age cut from a week to an hour",
        policy_text(max_age=604800),
        policy_text(max_age=3600),
        ("max_age",),
        (CHANGE + "max_age 604800 -> 3600 (under a day)",),
    ),
    Change(
        "max_age cut from exactly a day to a second under it",
        policy_text(max_age=86400),
        policy_text(max_age=86399),
        ("max_age",),
        (CHANGE + "max_age 86400 -> 86399 (under a day)",),
    ),
    Change(
        "max_age cut but still a day: no change",
        policy_text(max_age=604800),
        policy_text(max_age=86400),
        (),
        (),
    ),
    Change(
        "max_age cut while already under a day: no change",
        policy_text(max_age=7200),
        policy_text(max_age=3600),
        (),
        (),
    ),
    Change(
        "downgrade, new mx and a short max_age at once: three lines",
        policy_text(max_age=604800),
        policy_text("testing", 600, "mx.evil.example"),
        ("downgrade", "mx", "max_age"),
        (
            CHANGE + "mode enforce -> testing (a downgrade: ",
            CHANGE + "mx mail.example.com -> mx.evil.example",
            CHANGE + "max_age 604800 -> 600 (under a day)",
        ),
    ),
    Change(
        "a fetch failing while the record is there: the first failure of a run",
        policy_text(),
        FETCH_FAILED,
        ("fetch_failing",),
        (
            CHANGE + "policy fetch failing while its TXT record (id 2) is present: HTTP 500;"
            " keeping the cached enforce policy until ",
        ),
    ),
    Change(
        "no policy served (404): a fetch failing",
        policy_text(),
        mtasts.NoPolicyError(D, "HTTP 404"),
        ("fetch_failing",),
        (
            CHANGE
            + "policy fetch failing while its TXT record (id 2) is present: no policy served:",
        ),
    ),
    Change(
        "a policy that does not parse: a fetch failing",
        policy_text(),
        mtasts.PolicySyntaxError(D, 'no "max_age" field'),
        ("fetch_failing",),
        (
            CHANGE + "policy fetch failing while its TXT record (id 2) is present:"
            ' invalid policy: no "max_age" field;',
        ),
    ),
]


def warnings_of(outcome: Outcome) -> list[str]:
    return [message for level, message in outcome.notes if level >= logging.WARNING]


@pytest.mark.parametrize("row", CHANGES, ids=[row.rule for row in CHANGES])
def test_policy_changes(row: Change) -> None:
    fetch = row.fetched if isinstance(row.fetched, mtasts.MTASTSError) else served(row.fetched)
    outcome = lookup(T0 + 400, cached_entry(row.cached), record("2"), fetch)
    assert outcome.changes == row.kinds
    changes = [line for line in warnings_of(outcome) if line.startswith("policy-change: ")]
    assert len(changes) == len(row.lines), changes
    for line, start in zip(changes, row.lines, strict=True):
        assert line.startswith(start), line
    assert set(outcome.changes) <= set(cache_rules.POLICY_CHANGES)


def test_an_upgrade_to_enforce_is_an_info_line() -> None:
    outcome = lookup(T0 + 400, cached_entry(policy_text("testing")), record("2"), fetched())
    assert outcome.notes == (
        (
            logging.INFO,
            "example.com: mode testing -> enforce (an upgrade: MX hosts failing the policy are"
            " deferred from now on)",
        ),
    )


def test_a_first_fetch_compares_nothing() -> None:
    for fetch in (fetched("testing", 60), FETCH_FAILED):
        outcome = lookup(T0, None, record(), fetch)
        assert outcome.changes == ()
        assert not any(message.startswith("policy-change") for _, message in outcome.notes)


def test_a_run_of_failed_fetches_is_announced_once_and_ends_with_a_success() -> None:
    entry: Entry = cached_entry(policy_text())
    now = T0 + 400
    seen: list[tuple[str, ...]] = []
    for fetch in (FETCH_FAILED, FETCH_FAILED, FETCH_FAILED, fetched(), FETCH_FAILED):
        outcome = lookup(now, entry, record(str(len(seen) + 2)), fetch)
        seen.append(outcome.changes)
        entry = outcome.entry
        now += S.fetch_retry_interval + 1
    assert seen == [("fetch_failing",), (), (), (), ("fetch_failing",)]


def test_a_retry_within_a_run_is_the_plain_refresh_note() -> None:
    first = lookup(T0 + 400, cached_entry(policy_text()), record("2"), FETCH_FAILED)
    again = lookup(T0 + 400 + S.fetch_retry_interval + 1, first.entry, record("2"), FETCH_FAILED)
    assert again.changes == ()
    assert warnings_of(again) == [
        f"example.com: policy refresh failed (HTTP 500); keeping the cached enforce policy until"
        f" {cache_rules.when(T0 + MAX_AGE)}"
    ]


def test_a_remote_cause_is_made_printable_and_bounded() -> None:
    cause = "HTTP 500 \x1b[31mred\r\nforged: line\x00" + "x" * 5000
    outcome = lookup(
        T0 + 400, cached_entry(policy_text()), record("2"), mtasts.PolicyFetchError(D, cause)
    )
    (line,) = warnings_of(outcome)
    assert line.isprintable() and line.isascii()
    assert "\\x1b[31mred\\r\\nforged: line\\x00" in line
    assert len(line) < 600


def test_a_long_mx_list_is_bounded() -> None:
    many = "\nmx: ".join(f"mx{n}.example.com" for n in range(200))
    outcome = lookup(
        T0 + 400, cached_entry(policy_text()), record("2"), served(policy_text(mx=many))
    )
    (line,) = warnings_of(outcome)
    assert line.startswith(CHANGE + "mx mail.example.com -> mx0.example.com,mx1.example.com,")
    assert line.endswith(" more)")
    assert len(line) < 2 * cache_rules.MAX_CHANGE_TEXT + 100


@given(
    old=st.sampled_from(list(Mode)),
    new=st.sampled_from(list(Mode)),
    old_age=st.integers(min_value=0, max_value=31557600),
    new_age=st.integers(min_value=0, max_value=31557600),
)
def test_every_change_is_one_warning_line_of_its_kind(
    old: Mode, new: Mode, old_age: int, new_age: int
) -> None:
    cached = policy_text(old, old_age)
    plan = Plan(T0, cached_entry(cached), mtasts.parse_policy(cached, D))
    outcome = after_fetch(D, plan, record("2"), served(policy_text(new, new_age)), S)
    lines = [message for message in warnings_of(outcome) if message.startswith(CHANGE)]
    assert len(lines) == len(outcome.changes) == len(warnings_of(outcome))
    assert ("downgrade" in outcome.changes) == (old is Mode.ENFORCE and new is not Mode.ENFORCE)
    assert ("max_age" in outcome.changes) == (old_age >= 86400 > new_age)
    assert "mx" not in outcome.changes
