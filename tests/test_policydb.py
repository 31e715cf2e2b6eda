"""The policy cache, ``postfix_mtasts.policydb``: RFC 8461 §3.3 and §5 against real servers.

Every test publishes a fresh domain in the test bed's DNS zone (knot, asked through unbound) and
serves its policy from the bed's HTTPS server, then drives a real ``PolicyDB`` (real resolver, real
fetcher, memory or SQLite store) with a clock it controls, so that minutes and days pass at once.
What is asserted is what Postfix and the policy hosts would see: the decision, whether it came
synchronously (the hot path) or after a lookup, and how many HTTPS GETs each policy host received.

The lookups run in the PolicyDB's thread pool and read the clock there too; the tests move the
clock only while no lookup is running (``settle`` waits for the background jobs), except the one
test about a lookup that is still running when the policy expires.
"""

from __future__ import annotations

import asyncio
import logging
import math
import os
import time
from collections.abc import Callable, Coroutine, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pytest
from bed import Bed, policy_text
from cachefiles import damaged_cache

from postfix_mtasts import config, service
from postfix_mtasts.fetch import Fetcher
from postfix_mtasts.mtasts import Mode
from postfix_mtasts.policydb import Decision, PolicyDB
from postfix_mtasts.postfix import NOTFOUND, policy_reply
from postfix_mtasts.resolver import Resolver
from postfix_mtasts.store import Entry, Store, StoreError, open_store

START = 1_700_000_000.0

# Short and distinct, so that a test can step over one interval without crossing another.
TXT_CHECK = 60.0
REFRESH = 3600.0
UNUSED_AFTER = 30 * 86400.0
NO_RECORD_TTL = 120.0
FETCH_RETRY = 300.0
SETTLE_TIMEOUT = 15.0


class FakeClock:
    """A clock the test moves by hand; PolicyDB reads it on the loop and in its threads."""

    def __init__(self, now: float = START) -> None:
        self.now = now

    def __call__(self) -> float:
        return self.now

    def advance(self, seconds: float) -> None:
        self.now += seconds


@dataclass
class Site:
    """A published test domain: its TXT record and its policy host."""

    bed: Bed
    domain: str

    @property
    def host(self) -> str:
        return f"mta-sts.{self.domain}"

    @property
    def mx(self) -> str:
        return f"mail.{self.domain}"

    def set_record(self, record_id: str) -> None:
        self.bed.dns_set(f"_mta-sts.{self.domain}", "TXT", [f"v=STSv1; id={record_id}"])

    def serve(
        self,
        mode: str = "enforce",
        mx: tuple[str, ...] | None = None,
        max_age: int = 86400,
        **response: Any,
    ) -> None:
        body = policy_text(mode, (self.mx, "*.example.net") if mx is None else mx, max_age)
        self.bed.https.set(self.host, body=body, **response)

    def fail(self, **response: Any) -> None:
        self.bed.https.set(self.host, body=b"oops\n", status=500, **response)

    @property
    def gets(self) -> int:
        return self.bed.https.request_count(self.host)


def publish(
    bed: Bed,
    prefix: str,
    *,
    record: str | None = "1",
    mode: str = "enforce",
    max_age: int = 86400,
    **response: Any,
) -> Site:
    """A fresh domain with a TXT record ``id=<record>`` (None: no record) and a policy host."""
    site = Site(bed, bed.unique_domain(prefix))
    bed.dns_set(site.host, "A", [bed.https_address])
    if record is not None:
        site.set_record(record)
    site.serve(mode, max_age=max_age, **response)
    return site


@pytest.fixture
def clock() -> FakeClock:
    return FakeClock()


MakeDB = Callable[..., PolicyDB]


@pytest.fixture
def make_db(bed: Bed, clock: FakeClock) -> Iterator[MakeDB]:
    """Builds PolicyDBs on the test bed; ``store`` (default: memory), ``fetch_timeout`` and any
    ``config.CacheConfig`` field as keywords."""
    stores: list[Store] = []

    def make(store: Store | None = None, *, fetch_timeout: float = 3.0, **changes: Any) -> PolicyDB:
        if store is None:
            store = open_store("memory", "")
            stores.append(store)
        settings: dict[str, Any] = {
            "txt_check_interval": TXT_CHECK,
            "refresh_interval": REFRESH,
            "unused_after": UNUSED_AFTER,
            "no_record_ttl": NO_RECORD_TTL,
            "fetch_retry_interval": FETCH_RETRY,
            "first_lookup_deadline": 10.0,
        }
        settings.update(changes)
        resolver = Resolver(bed.resolver_nameservers, timeout=2)
        fetcher = Fetcher(
            resolver, ca_file=bed.ca_file, allow_private_addresses=True, timeout=fetch_timeout
        )
        cache = config.CacheConfig(backend="memory", path="", **settings)
        return PolicyDB(store, resolver, fetcher, cache, clock=clock)

    yield make
    for store in stores:
        store.close()


async def ask(db: PolicyDB, domain: str) -> Decision:
    """The decision, whether the cache answered at once or after a lookup."""
    answer = db.lookup(domain)
    if isinstance(answer, Decision):
        return answer
    return await answer


def answered_at_once(db: PolicyDB, domain: str) -> Decision:
    """The decision, which must come synchronously: the hot path, no lookup to wait for."""
    answer = db.lookup(domain)
    assert isinstance(answer, Decision), f"{domain}: expected a cached answer, got {answer!r}"
    return answer


async def answered_later(db: PolicyDB, domain: str) -> Decision:
    """The decision, which must come from a lookup (a future), not from the cache."""
    answer = db.lookup(domain)
    assert isinstance(answer, asyncio.Future), f"{domain}: expected a lookup, got {answer!r}"
    return await answer


async def settle(db: PolicyDB) -> None:
    """Wait until no lookup runs in the background any more."""
    deadline = time.monotonic() + SETTLE_TIMEOUT
    while db.pending:
        assert time.monotonic() < deadline, "background lookups did not finish"
        await asyncio.sleep(0.01)
    # Let the done-callbacks that install results run.
    await asyncio.sleep(0)


def run(db: PolicyDB, scenario: Callable[[], Coroutine[Any, Any, None]]) -> None:
    """Run ``scenario`` on a fresh event loop, then let ``db`` finish its lookups and close."""

    async def main() -> None:
        try:
            await scenario()
        finally:
            await settle(db)
            await db.close()

    asyncio.run(main())


def enforce_reply(site: Site) -> str:
    return f"OK secure match={site.mx}:.example.net servername=hostname"


def reply(decision: Decision) -> str:
    return policy_reply(decision.policy, config.Profile())


def stored(db: PolicyDB, domain: str) -> Entry:
    entry = db.store.get(domain)
    assert entry is not None, f"{domain}: no entry in the store"
    return entry


# --------------------------------------------------------------------------------------------------
# First lookup and the hot path.


def test_first_lookup_fetches_the_policy_and_answers(
    bed: Bed, make_db: MakeDB, clock: FakeClock
) -> None:
    site = publish(bed, "first")
    db = make_db()

    async def scenario() -> None:
        decision = await answered_later(db, site.domain)
        assert decision.policy is not None
        assert decision.policy.mode is Mode.ENFORCE
        assert [str(mx) for mx in decision.policy.mx] == [site.mx, "*.example.net"]
        assert decision.record_id == "1"
        assert decision.expires_at == clock.now + 86400
        assert decision.policy_text == policy_text("enforce", (site.mx, "*.example.net")).decode()
        assert reply(decision) == enforce_reply(site)
        assert site.gets == 1
        entry = stored(db, site.domain)
        assert (entry.record_id, entry.fetched_at, entry.checked_at) == ("1", START, START)

    run(db, scenario)


def test_second_lookup_is_answered_from_the_cache_at_once(bed: Bed, make_db: MakeDB) -> None:
    site = publish(bed, "hot")
    db = make_db()

    async def scenario() -> None:
        first = await answered_later(db, site.domain)
        for _ in range(20):
            again = answered_at_once(db, site.domain)
            assert again.policy == first.policy
            assert reply(again) == enforce_reply(site)
        assert site.gets == 1
        assert db.pending == 0
        assert db.network_lookups == 1

    run(db, scenario)


def test_testing_policy_is_cached_like_any_other(bed: Bed, make_db: MakeDB) -> None:
    site = publish(bed, "testing", mode="testing")
    db = make_db()

    async def scenario() -> None:
        decision = await answered_later(db, site.domain)
        assert decision.policy is not None and decision.policy.mode is Mode.TESTING
        assert reply(decision) == NOTFOUND
        assert answered_at_once(db, site.domain).policy == decision.policy
        assert site.gets == 1

    run(db, scenario)


# --------------------------------------------------------------------------------------------------
# Revalidation by id (RFC 8461 §3.3).


def test_changed_id_is_fetched_in_the_background_after_txt_check_interval(
    bed: Bed, make_db: MakeDB, clock: FakeClock
) -> None:
    site = publish(bed, "newid")
    db = make_db()
    new_mx = f"mx2.{site.domain}"

    async def scenario() -> None:
        await answered_later(db, site.domain)
        site.set_record("2")
        site.serve(mx=(new_mx,))

        # Within the interval the record is not even looked at.
        clock.advance(TXT_CHECK - 1)
        assert reply(answered_at_once(db, site.domain)) == enforce_reply(site)
        assert db.pending == 0

        # After it, the answer is still the cached policy, and the check runs in the background.
        clock.advance(2)
        assert reply(answered_at_once(db, site.domain)) == enforce_reply(site)
        assert db.pending == 1
        await settle(db)

        decision = answered_at_once(db, site.domain)
        assert reply(decision) == f"OK secure match={new_mx} servername=hostname"
        assert decision.record_id == "2"
        assert decision.expires_at == clock.now + 86400
        assert site.gets == 2

    run(db, scenario)


def test_unchanged_id_costs_no_new_get(bed: Bed, make_db: MakeDB, clock: FakeClock) -> None:
    site = publish(bed, "sameid")
    db = make_db()

    async def scenario() -> None:
        first = await answered_later(db, site.domain)
        for _ in range(3):
            clock.advance(TXT_CHECK + 1)
            assert answered_at_once(db, site.domain).policy == first.policy
            await settle(db)
            assert stored(db, site.domain).checked_at == clock.now
        assert site.gets == 1
        # The TXT check does not extend the policy's life: only a fetch does (§5).
        assert answered_at_once(db, site.domain).expires_at == first.expires_at
        assert stored(db, site.domain).fetched_at == START

    run(db, scenario)


# --------------------------------------------------------------------------------------------------
# Expiry (RFC 8461 §5): never used after fetched_at + max_age.


def test_expired_policy_is_never_used(bed: Bed, make_db: MakeDB, clock: FakeClock) -> None:
    site = publish(bed, "expiry", max_age=1000)
    db = make_db(txt_check_interval=10_000.0, refresh_interval=10_000.0)

    async def scenario() -> None:
        first = await answered_later(db, site.domain)
        assert first.expires_at == START + 1000
        site.fail()

        clock.advance(1000)
        decision = await ask(db, site.domain)
        assert decision.policy is None
        assert decision.expires_at is None
        assert reply(decision) == NOTFOUND
        assert decision.error
        # And later answers (from the backoff) do not bring it back either.
        clock.advance(1)
        assert (await ask(db, site.domain)).policy is None

    run(db, scenario)


def test_cached_policy_is_kept_through_failed_refreshes_until_it_expires(
    bed: Bed, make_db: MakeDB, clock: FakeClock
) -> None:
    site = publish(bed, "keepuntil", max_age=1000)
    db = make_db(fetch_retry_interval=100.0)

    async def scenario() -> None:
        await answered_later(db, site.domain)
        site.set_record("2")
        site.fail()
        # Refresh attempts before expiry fail: the cached policy is applied (§3.3).
        while clock.now + 150 < START + 1000:
            clock.advance(150)
            assert reply(answered_at_once(db, site.domain)) == enforce_reply(site)
            await settle(db)
        assert site.gets > 1
        # At expiry, it is gone, whatever the network says.
        clock.now = START + 1000
        decision = await ask(db, site.domain)
        assert decision.policy is None
        assert reply(decision) == NOTFOUND

    run(db, scenario)


def test_policy_expiring_during_a_refresh_is_not_answered(
    bed: Bed, make_db: MakeDB, clock: FakeClock
) -> None:
    # A background refresh starts shortly before expiry and hangs; an asker who comes after the
    # expiry shares that lookup, and must not get the expired policy from it.
    site = publish(bed, "expiresduring", max_age=1000)
    db = make_db(fetch_timeout=2.0, txt_check_interval=TXT_CHECK)

    async def scenario() -> None:
        await answered_later(db, site.domain)
        site.set_record("2")
        site.serve(hang=True)
        clock.now = START + 990
        assert reply(answered_at_once(db, site.domain)) == enforce_reply(site)
        assert db.pending == 1
        await asyncio.sleep(0.5)  # the refresh has read the clock and waits for the policy host
        clock.now = START + 1001
        decision = await ask(db, site.domain)
        assert decision.policy is None, f"expired policy answered: {decision}"
        assert reply(decision) == NOTFOUND

    run(db, scenario)


def test_expired_policy_in_the_store_is_not_used_after_a_restart(
    bed: Bed, make_db: MakeDB, clock: FakeClock, tmp_path: Path
) -> None:
    site = publish(bed, "expiredstore", max_age=1000)
    path = str(tmp_path / "cache.sqlite")

    store = open_store("sqlite", path)
    db = make_db(store)

    async def first() -> None:
        await answered_later(db, site.domain)

    run(db, first)
    store.close()

    site.fail()
    clock.advance(1001)
    store = open_store("sqlite", path)
    db = make_db(store)

    async def after_restart() -> None:
        decision = await answered_later(db, site.domain)
        assert decision.policy is None
        assert reply(decision) == NOTFOUND

    try:
        run(db, after_restart)
    finally:
        store.close()


# --------------------------------------------------------------------------------------------------
# Failures keep the cached policy (RFC 8461 §3.3).


@pytest.mark.parametrize("failure", ["status 500", "hang"])
def test_failed_refresh_keeps_the_cached_policy_and_is_logged(
    bed: Bed, make_db: MakeDB, clock: FakeClock, caplog: pytest.LogCaptureFixture, failure: str
) -> None:
    site = publish(bed, "keep")
    db = make_db(fetch_timeout=1.5)

    async def scenario() -> None:
        first = await answered_later(db, site.domain)
        site.set_record("2")
        if failure == "hang":
            site.serve(mx=("other.example",), hang=True)
        else:
            site.fail()

        clock.advance(TXT_CHECK + 1)
        with caplog.at_level(logging.INFO, logger="postfix_mtasts"):
            assert reply(answered_at_once(db, site.domain)) == enforce_reply(site)
            await settle(db)
        decision = answered_at_once(db, site.domain)
        assert decision.policy == first.policy
        assert reply(decision) == enforce_reply(site)
        assert decision.expires_at == first.expires_at
        assert decision.error
        assert site.gets == 2
        warnings = [
            r.getMessage()
            for r in caplog.records
            if r.levelno >= logging.WARNING and site.domain in r.getMessage()
        ]
        assert any("cached" in message for message in warnings), warnings

    run(db, scenario)


def test_record_gone_keeps_the_cached_policy(bed: Bed, make_db: MakeDB, clock: FakeClock) -> None:
    site = publish(bed, "recordgone")
    db = make_db()

    async def scenario() -> None:
        first = await answered_later(db, site.domain)
        bed.dns_delete(f"_mta-sts.{site.domain}", "TXT")
        clock.advance(TXT_CHECK + 1)
        answered_at_once(db, site.domain)
        await settle(db)
        # §3.3: no live record, but an unexpired cached policy: it MUST be applied.
        assert answered_at_once(db, site.domain).policy == first.policy
        assert site.gets == 1

    run(db, scenario)


def test_dns_failure_keeps_the_cached_policy(bed: Bed, make_db: MakeDB, clock: FakeClock) -> None:
    site = publish(bed, "dnsdown")
    db = make_db()

    async def scenario() -> None:
        first = await answered_later(db, site.domain)
        # The resolver stops answering (as after a reload pointing at a dead nameserver).
        db.resolver = Resolver([bed.dead_nameserver], timeout=0.3)
        clock.advance(TXT_CHECK + 1)
        answered_at_once(db, site.domain)
        await settle(db)
        decision = answered_at_once(db, site.domain)
        assert decision.policy == first.policy
        assert decision.error
        assert site.gets == 1

    run(db, scenario)


def test_fetched_mode_none_removes_the_cached_enforce_policy(
    bed: Bed, make_db: MakeDB, clock: FakeClock
) -> None:
    site = publish(bed, "withdraw")
    store = open_store("memory", "")
    db = make_db(store)

    async def scenario() -> None:
        await answered_later(db, site.domain)
        site.set_record("2")
        site.serve("none", mx=())
        clock.advance(TXT_CHECK + 1)
        answered_at_once(db, site.domain)
        await settle(db)
        decision = answered_at_once(db, site.domain)
        assert decision.policy is not None and decision.policy.mode is Mode.NONE
        assert reply(decision) == NOTFOUND
        assert "enforce" not in (stored(db, site.domain).policy_text or "")
        assert site.gets == 2

    run(db, scenario)

    # Nothing of the enforce policy comes back from the store either.
    db = make_db(store)

    async def restarted() -> None:
        assert reply(await answered_later(db, site.domain)) == NOTFOUND
        assert site.gets == 2

    run(db, restarted)


# --------------------------------------------------------------------------------------------------
# Backoff: at most one attempt per fetch_retry_interval after a failed fetch (RFC 8461 §3.3).


def test_failed_first_fetch_is_not_retried_within_fetch_retry_interval(
    bed: Bed, make_db: MakeDB, clock: FakeClock
) -> None:
    site = publish(bed, "backoff")
    site.fail()
    db = make_db()

    async def scenario() -> None:
        decision = await answered_later(db, site.domain)
        assert decision.policy is None
        assert decision.error
        assert site.gets == 1

        site.serve()
        for _ in range(5):
            clock.advance((FETCH_RETRY - 1) / 5)
            assert answered_at_once(db, site.domain).policy is None
        await settle(db)
        assert site.gets == 1

        clock.advance(2)
        assert reply(await ask(db, site.domain)) == enforce_reply(site)
        assert site.gets == 2

    run(db, scenario)


def test_policy_host_without_address_is_a_failed_fetch(bed: Bed, make_db: MakeDB) -> None:
    # The TXT record and the policy host's A query are asked from the event loop, the AAAA
    # query and the fetch in a thread: the one outcome names both address types.
    site = publish(bed, "noaddress")
    bed.dns_delete(site.host)
    db = make_db()

    async def scenario() -> None:
        decision = await answered_later(db, site.domain)
        assert decision.policy is None
        assert decision.record_id == "1"
        assert f"{site.host} A/AAAA: NXDOMAIN" in decision.error, decision.error
        assert site.gets == 0
        entry = stored(db, site.domain)
        assert entry.backoff_until == START + FETCH_RETRY

    run(db, scenario)


def test_policy_host_with_only_ipv6_addresses_is_asked_for_them(bed: Bed, make_db: MakeDB) -> None:
    # No A record (NODATA on the loop): the AAAA query follows, and its address is tried. The
    # bed serves on IPv4 only, so the connection fails; what matters is the address tried.
    site = publish(bed, "sixonly")
    bed.dns_delete(site.host, "A")
    bed.dns_set(site.host, "AAAA", ["::1"])
    db = make_db()

    async def scenario() -> None:
        decision = await answered_later(db, site.domain)
        assert decision.policy is None
        assert "::1 port 443" in decision.error, decision.error

    run(db, scenario)


def test_failed_refresh_is_not_retried_within_fetch_retry_interval(
    bed: Bed, make_db: MakeDB, clock: FakeClock
) -> None:
    site = publish(bed, "refreshbackoff")
    db = make_db()

    async def scenario() -> None:
        await answered_later(db, site.domain)
        site.set_record("2")
        site.fail()
        clock.advance(TXT_CHECK + 1)
        failed_at = clock.now
        answered_at_once(db, site.domain)
        await settle(db)
        assert site.gets == 2

        # Past several TXT check intervals, but within the retry interval: no GET.
        while clock.now + TXT_CHECK < failed_at + FETCH_RETRY:
            clock.advance(TXT_CHECK)
            assert reply(answered_at_once(db, site.domain)) == enforce_reply(site)
            await settle(db)
        assert site.gets == 2

        clock.now = failed_at + FETCH_RETRY + 1
        site.serve(mx=(f"mx2.{site.domain}",))
        answered_at_once(db, site.domain)
        await settle(db)
        assert site.gets == 3
        assert answered_at_once(db, site.domain).record_id == "2"

    run(db, scenario)


def test_backoff_after_a_failed_refresh_holds_when_the_policy_expires(
    bed: Bed, make_db: MakeDB, clock: FakeClock
) -> None:
    # Issue 3: "A failed fetch: retried for that domain and id at most once per five minutes."
    # An expiry inside the retry interval is no reason to ask the failing host again.
    site = publish(bed, "expirybackoff", max_age=1000)
    db = make_db()

    async def scenario() -> None:
        await answered_later(db, site.domain)
        site.fail()
        # The proactive refresh at max_age / 2 fails.
        clock.advance(500)
        answered_at_once(db, site.domain)
        await settle(db)
        assert site.gets == 2

        # The retry interval has passed: the next answer retries in the background, and fails
        # again; the next retry may only come at 1100 s.
        clock.advance(300)
        answered_at_once(db, site.domain)
        await settle(db)
        assert site.gets == 3

        clock.advance(201)  # expired at 1000 s, inside the retry interval
        decision = await ask(db, site.domain)
        assert decision.policy is None
        assert site.gets == 3

    run(db, scenario)


# --------------------------------------------------------------------------------------------------
# No record: remembered for no_record_ttl.


def test_no_record_is_remembered_for_no_record_ttl(
    bed: Bed, make_db: MakeDB, clock: FakeClock
) -> None:
    site = publish(bed, "norecord", record=None)
    db = make_db()

    async def scenario() -> None:
        decision = await answered_later(db, site.domain)
        assert decision.policy is None
        assert reply(decision) == NOTFOUND
        assert decision.error

        # The domain starts publishing MTA-STS; the remembered "no record" is answered until
        # no_record_ttl has passed, without a lookup.
        site.set_record("1")
        clock.advance(NO_RECORD_TTL - 1)
        assert answered_at_once(db, site.domain).policy is None
        assert db.pending == 0
        assert site.gets == 0

        clock.advance(2)
        decision = await answered_later(db, site.domain)
        assert reply(decision) == enforce_reply(site)
        assert site.gets == 1

    run(db, scenario)


# --------------------------------------------------------------------------------------------------
# One lookup per domain at a time.


def test_concurrent_cold_lookups_make_exactly_one_get(bed: Bed, make_db: MakeDB) -> None:
    site = publish(bed, "crowd", delay=0.3)
    db = make_db()

    async def scenario() -> None:
        # 50 askers before the first lookup finished, then 50 more while it runs.
        first = [db.lookup(site.domain) for _ in range(50)]
        assert all(isinstance(answer, asyncio.Future) for answer in first)
        more = asyncio.gather(*(ask(db, site.domain) for _ in range(50)))
        decisions = await asyncio.gather(*first, more)
        answers = [*decisions[:50], *decisions[50]]
        assert len(answers) == 100
        assert {reply(decision) for decision in answers} == {enforce_reply(site)}
        assert site.gets == 1
        assert db.network_lookups == 1

    run(db, scenario)


def test_concurrent_lookups_of_different_domains_do_not_wait_for_each_other(
    bed: Bed, make_db: MakeDB
) -> None:
    slow = publish(bed, "slowhost", hang=True)
    fast = publish(bed, "fasthost")
    db = make_db(first_lookup_deadline=5.0, fetch_timeout=1.5)

    async def scenario() -> None:
        stuck = asyncio.ensure_future(ask(db, slow.domain))
        started = time.monotonic()
        assert reply(await ask(db, fast.domain)) == enforce_reply(fast)
        assert time.monotonic() - started < 2.0
        assert (await stuck).policy is None

    run(db, scenario)


# --------------------------------------------------------------------------------------------------
# The first lookup's deadline.


def test_first_lookup_deadline_answers_without_policy(
    bed: Bed, make_db: MakeDB, clock: FakeClock
) -> None:
    site = publish(bed, "deadline", hang=True)
    db = make_db(first_lookup_deadline=1.0, fetch_timeout=2.0)

    async def scenario() -> None:
        started = time.monotonic()
        decision = await asyncio.wait_for(answered_later(db, site.domain), 2.5)
        elapsed = time.monotonic() - started
        assert 0.9 < elapsed < 2.5
        assert decision.policy is None
        assert reply(decision) == NOTFOUND
        assert decision.error
        # The lookup went on in the background, failed, and its result serves the next asker.
        await settle(db)
        assert site.gets == 1
        assert answered_at_once(db, site.domain).policy is None

    run(db, scenario)


def test_lookup_that_outlives_the_deadline_serves_the_next_asker(bed: Bed, make_db: MakeDB) -> None:
    site = publish(bed, "latepolicy", delay=1.5)
    db = make_db(first_lookup_deadline=0.5)

    async def scenario() -> None:
        assert (await answered_later(db, site.domain)).policy is None
        await settle(db)
        assert reply(answered_at_once(db, site.domain)) == enforce_reply(site)
        assert site.gets == 1

    run(db, scenario)


# --------------------------------------------------------------------------------------------------
# Persistence: restart keeps the cache; a broken store costs lookups, never answers.


def test_restart_keeps_the_cache(
    bed: Bed, make_db: MakeDB, clock: FakeClock, tmp_path: Path
) -> None:
    site = publish(bed, "restart")
    path = str(tmp_path / "state" / "cache.sqlite")

    store = open_store("sqlite", path)
    db = make_db(store)

    async def before() -> None:
        await answered_later(db, site.domain)

    run(db, before)
    store.close()

    site.fail()  # anything fetched now would not be this policy
    clock.advance(10)
    store = open_store("sqlite", path)
    db = make_db(store)

    async def after() -> None:
        decision = await ask(db, site.domain)
        assert reply(decision) == enforce_reply(site)
        assert decision.expires_at == START + 86400
        assert answered_at_once(db, site.domain).policy == decision.policy
        assert site.gets == 1
        assert db.network_lookups == 0

    try:
        run(db, after)
    finally:
        store.close()


@pytest.mark.parametrize("kind", ["damaged", "empty"])
def test_corrupted_cache_file_is_survived(
    bed: Bed,
    make_db: MakeDB,
    tmp_path: Path,
    caplog: pytest.LogCaptureFixture,
    kind: str,
) -> None:
    site = publish(bed, "corrupt")
    path = tmp_path / "cache.sqlite"
    if kind == "damaged":
        garbage = damaged_cache(path)
    else:
        garbage = b""
        path.write_bytes(garbage)
    settings = config.Config(cache=config.CacheConfig(backend="sqlite", path=str(path)))

    with caplog.at_level(logging.INFO, logger="postfix_mtasts"):
        store = service.make_store(settings)
    try:
        if garbage:
            errors = [r for r in caplog.records if r.levelno >= logging.ERROR]
            assert errors, "a damaged cache file must be logged"
            # The damaged file is not destroyed: a postmaster can look at it.
            kept = [p.read_bytes() for p in tmp_path.iterdir() if p.is_file()]
            assert garbage in kept
        db = make_db(store)

        async def scenario() -> None:
            assert reply(await answered_later(db, site.domain)) == enforce_reply(site)
            assert reply(answered_at_once(db, site.domain)) == enforce_reply(site)

        run(db, scenario)
        assert store.get(site.domain) is not None
    finally:
        store.close()


@pytest.mark.parametrize(
    "garbage",
    [os.urandom(8192), b"SQLite format 3\x00" + b"\xff" * 4080],
    ids=["random", "damaged-header"],
)
def test_a_file_that_is_not_a_cache_is_refused_and_left_alone(
    tmp_path: Path, garbage: bytes
) -> None:
    path = tmp_path / "cache.sqlite"
    path.write_bytes(garbage)
    settings = config.Config(cache=config.CacheConfig(backend="sqlite", path=str(path)))
    with pytest.raises(config.ConfigError, match=r"^cache.path: .*not a postfix-mtasts cache"):
        service.make_store(settings)
    assert [p.name for p in tmp_path.iterdir()] == ["cache.sqlite"]
    assert path.read_bytes() == garbage


def test_policydb_answers_when_the_store_fails(
    bed: Bed,
    make_db: MakeDB,
    clock: FakeClock,
    tmp_path: Path,
    caplog: pytest.LogCaptureFixture,
) -> None:
    site = publish(bed, "storefails")
    store = open_store("sqlite", str(tmp_path / "cache.sqlite"))
    store.close()  # every call now raises StoreError
    with pytest.raises(StoreError):
        store.get(site.domain)
    db = make_db(store, unused_after=1000.0)

    async def scenario() -> None:
        with caplog.at_level(logging.INFO, logger="postfix_mtasts"):
            assert reply(await answered_later(db, site.domain)) == enforce_reply(site)
            assert reply(answered_at_once(db, site.domain)) == enforce_reply(site)
            clock.advance(TXT_CHECK + 1)
            assert reply(answered_at_once(db, site.domain)) == enforce_reply(site)
            await settle(db)
            await db.maintain()
            await settle(db)
            assert reply(answered_at_once(db, site.domain)) == enforce_reply(site)
        assert site.gets == 1
        errors = [r.getMessage() for r in caplog.records if r.levelno >= logging.ERROR]
        assert any(site.domain in message for message in errors), errors

    run(db, scenario)


class _ReadJustBeforeTheOther:
    """A daemon's view of a real shared store in which its first read of a domain came just
    before another daemon stored its lookup's result (the read saw nothing; the lease came after
    the other daemon had given it back)."""

    def __init__(self, store: Store) -> None:
        self._store = store
        self._seen: set[str] = set()

    def get(self, domain: str) -> Entry | None:
        if domain not in self._seen:
            self._seen.add(domain)
            return None
        return self._store.get(domain)

    def __getattr__(self, name: str) -> Any:
        return getattr(self._store, name)


def test_a_lookup_another_daemon_finished_before_the_lease_is_not_made_again(
    bed: Bed, make_db: MakeDB, tmp_path: Path
) -> None:
    site = publish(bed, "leaserace")
    path = str(tmp_path / "cache.sqlite")
    first_store, second_store = open_store("sqlite", path), open_store("sqlite", path)
    first = make_db(first_store)
    second = make_db(_ReadJustBeforeTheOther(second_store))

    async def scenario() -> None:
        assert reply(await answered_later(first, site.domain)) == enforce_reply(site)
        # The second daemon read "nothing", then took the (free) lease: it reads again before
        # going to the network, and answers what the first one stored.
        assert reply(await answered_later(second, site.domain)) == enforce_reply(site)
        assert second.network_lookups == 0
        assert site.gets == 1
        # And gave the lease back: the first daemon could take it now.
        assert first_store.lease(site.domain, "another", 60.0)

    try:
        run(second, scenario)
    finally:
        first_store.close()
        second_store.close()


def test_revalidation_takes_an_entry_another_daemon_refreshed(
    bed: Bed, make_db: MakeDB, clock: FakeClock
) -> None:
    # Two daemons sharing one store: what one fetched, the other answers with, without a lookup.
    site = publish(bed, "shared")
    store = open_store("memory", "")
    first, second = make_db(store), make_db(store)

    async def scenario() -> None:
        await answered_later(first, site.domain)
        await answered_later(second, site.domain)
        assert second.network_lookups == 0
        site.set_record("2")
        site.serve(mx=("mx2.example.org",))
        clock.advance(TXT_CHECK + 1)
        answered_at_once(first, site.domain)
        await settle(first)
        assert [str(mx) for mx in answered_at_once(first, site.domain).policy.mx] == [
            "mx2.example.org"
        ]
        # The second daemon's revalidation finds the first one's fresh entry in the store.
        answered_at_once(second, site.domain)
        await settle(second)
        decision = answered_at_once(second, site.domain)
        assert decision.record_id == "2"
        assert reply(decision) == "OK secure match=mx2.example.org servername=hostname"
        assert second.network_lookups == 0
        assert site.gets == 2
        await settle(first)
        await first.close()

    run(second, scenario)


def test_entry_gone_from_the_store_keeps_the_cached_policy(
    bed: Bed, make_db: MakeDB, clock: FakeClock
) -> None:
    # The store lost the entry (purged by another daemon, file replaced) and DNS fails: the policy
    # held in memory is still applied until it expires (§5).
    site = publish(bed, "storelost")
    db = make_db()

    async def scenario() -> None:
        first = await answered_later(db, site.domain)
        db.store.purge_unused(math.inf)
        db.resolver = Resolver([bed.dead_nameserver], timeout=0.3)
        clock.advance(TXT_CHECK + 1)
        answered_at_once(db, site.domain)
        await settle(db)
        decision = answered_at_once(db, site.domain)
        assert decision.policy == first.policy
        assert decision.expires_at == first.expires_at
        assert decision.error
        # The entry is back in the store, with the policy it kept.
        assert stored(db, site.domain).policy_text == first.policy_text
        clock.now = START + 86400 + 1
        assert (await ask(db, site.domain)).policy is None

    run(db, scenario)


# --------------------------------------------------------------------------------------------------
# Maintenance: proactive refresh and removal of unused entries.


def test_maintain_refreshes_a_policy_older_than_refresh_interval(
    bed: Bed, make_db: MakeDB, clock: FakeClock
) -> None:
    site = publish(bed, "refresh")
    db = make_db(txt_check_interval=10 * REFRESH)

    async def scenario() -> None:
        first = await answered_later(db, site.domain)
        clock.advance(REFRESH / 2)
        await db.maintain()
        await settle(db)
        assert site.gets == 1

        # Nobody asks for the domain; maintenance refreshes it anyway, with the same id.
        clock.advance(REFRESH / 2 + 1)
        await db.maintain()
        await settle(db)
        assert site.gets == 2
        decision = answered_at_once(db, site.domain)
        assert decision.policy == first.policy
        assert decision.expires_at == clock.now + 86400
        assert stored(db, site.domain).fetched_at == clock.now

    run(db, scenario)


def test_refresh_of_a_short_lived_policy_happens_before_it_expires(
    bed: Bed, make_db: MakeDB, clock: FakeClock
) -> None:
    site = publish(bed, "shortlived", max_age=600)
    db = make_db(txt_check_interval=10 * REFRESH)

    async def scenario() -> None:
        await answered_later(db, site.domain)
        # Every 200 s maintenance runs; the policy must never lapse while the host serves it.
        for _ in range(10):
            clock.advance(200)
            await db.maintain()
            await settle(db)
            assert reply(answered_at_once(db, site.domain)) == enforce_reply(site)
        assert site.gets >= 3

    run(db, scenario)


def test_maintain_removes_entries_unused_for_unused_after(
    bed: Bed, make_db: MakeDB, clock: FakeClock
) -> None:
    site = publish(bed, "unused")
    db = make_db(unused_after=1000.0, txt_check_interval=10 * REFRESH)

    async def scenario() -> None:
        await answered_later(db, site.domain)
        clock.advance(1001)
        await db.maintain()
        await settle(db)
        assert db.store.get(site.domain) is None
        # Forgotten in memory too: the next asker waits for a new lookup.
        assert reply(await answered_later(db, site.domain)) == enforce_reply(site)
        assert site.gets == 2

    run(db, scenario)


def test_maintain_keeps_entries_in_use(bed: Bed, make_db: MakeDB, clock: FakeClock) -> None:
    site = publish(bed, "inuse")
    db = make_db(unused_after=1000.0, txt_check_interval=10 * REFRESH)

    async def scenario() -> None:
        await answered_later(db, site.domain)
        for _ in range(4):
            clock.advance(600)
            answered_at_once(db, site.domain)
            await db.maintain()
            await settle(db)
            assert db.store.get(site.domain) is not None
            assert reply(answered_at_once(db, site.domain)) == enforce_reply(site)
        assert site.gets == 1

    run(db, scenario)


# --------------------------------------------------------------------------------------------------
# Never downgrade, never starve (issue 10): the store answers first, local shortages defer,
# memory is bounded.


def test_a_stored_policy_due_for_its_check_is_answered_before_the_check(
    bed: Bed, make_db: MakeDB, clock: FakeClock, tmp_path: Path
) -> None:
    site = publish(bed, "storefirst")
    path = str(tmp_path / "cache.sqlite")
    store = open_store("sqlite", path)
    db = make_db(store)
    run(db, lambda: answered_later(db, site.domain))
    store.close()

    # After a restart, with the check due and DNS dead, the stored policy is the first answer.
    clock.advance(TXT_CHECK + 1)
    store = open_store("sqlite", path)
    db = make_db(store)
    db.resolver = Resolver([bed.dead_nameserver], timeout=2.0, lifetime=4.0)

    async def scenario() -> None:
        started = time.monotonic()
        decision = await answered_later(db, site.domain)
        assert time.monotonic() - started < 1.0, "the answer waited for the network"
        assert reply(decision) == enforce_reply(site)
        # The check runs behind the answer, fails, and the policy is kept.
        assert db.pending == 1
        await settle(db)
        assert reply(answered_at_once(db, site.domain)) == enforce_reply(site)
        assert "DNS lookup failed" in stored(db, site.domain).last_error

    try:
        run(db, scenario)
    finally:
        store.close()


def test_lookups_beyond_max_lookups_wait_their_turn_and_are_deferred_not_denied(
    bed: Bed, make_db: MakeDB
) -> None:
    slow = [publish(bed, f"slowturn{n}-", delay=2.0) for n in range(2)]
    site = publish(bed, "waiting")
    db = make_db(max_lookups=2, first_lookup_deadline=1.0)

    async def scenario() -> None:
        # Two lookups hold both turns; a third domain waits, and its deadline passes first.
        holding = [asyncio.ensure_future(ask(db, s.domain)) for s in slow]
        await asyncio.sleep(0.2)
        decision = await answered_later(db, site.domain)
        assert decision.policy is None
        assert decision.defer.startswith("lookup not started within 1s")
        assert not isinstance(db.lookup(site.domain), Decision), "a deferral is not remembered"
        await asyncio.gather(*holding)
        await settle(db)
        # Its turn came once nobody waited for it, so it was dropped; the next asker's lookup
        # runs at once.
        assert site.gets == 0
        assert reply(await answered_later(db, site.domain)) == enforce_reply(site)

    run(db, scenario)


def test_the_domains_held_in_memory_are_bounded_policies_last(
    bed: Bed, make_db: MakeDB, caplog: pytest.LogCaptureFixture
) -> None:
    protected = [publish(bed, f"kept{n}-") for n in range(3)]
    junk = [bed.unique_domain("nothing") for _ in range(40)]
    db = make_db(memory_domains=20)

    async def scenario() -> None:
        for site in protected:
            await answered_later(db, site.domain)
        with caplog.at_level(logging.WARNING, logger="postfix_mtasts"):
            for domain in junk:
                await ask(db, domain)
        assert db.size <= 20
        # Domains without a policy went first: every policy is still answered from memory.
        for site in protected:
            assert reply(answered_at_once(db, site.domain)) == enforce_reply(site)
        assert any("cache.memory_domains" in r.getMessage() for r in caplog.records)

    run(db, scenario)


@pytest.mark.parametrize("backend", ["sqlite", "redis", "postgresql"])
def test_a_policy_dropped_from_memory_is_read_back_from_the_store(
    backend: str, request: pytest.FixtureRequest, bed: Bed, make_db: MakeDB, tmp_path: Path
) -> None:
    site = publish(bed, "readback")
    if backend == "sqlite":
        store = open_store("sqlite", str(tmp_path / "cache.sqlite"))
    else:
        fixture = {"redis": "redis_server", "postgresql": "postgres_server"}[backend]
        server = request.getfixturevalue(fixture)
        store = open_store(backend, "", url=server.url, name=f"readback_{os.getpid()}_{id(site)}")
    db = make_db(store, memory_domains=5)

    async def scenario() -> None:
        await answered_later(db, site.domain)
        for n in range(20):
            await ask(db, bed.unique_domain(f"filler{n}-"))
        site.fail()
        decision = await ask(db, site.domain)
        assert reply(decision) == enforce_reply(site)
        assert site.gets == 1

    try:
        run(db, scenario)
    finally:
        store.close()


def test_maintain_forgets_domains_whose_answer_expired(
    bed: Bed, make_db: MakeDB, clock: FakeClock
) -> None:
    site = publish(bed, "forgotten", record=None)
    policy = publish(bed, "remembered")
    db = make_db()

    async def scenario() -> None:
        await answered_later(db, site.domain)
        await answered_later(db, policy.domain)
        assert db.size == 2
        clock.advance(NO_RECORD_TTL + 1)
        await db.maintain()
        await settle(db)
        assert db.size == 1
        assert reply(answered_at_once(db, policy.domain)) == enforce_reply(policy)

    run(db, scenario)


def test_store_write_failures_are_logged_once_and_written_when_it_works_again(
    bed: Bed, make_db: MakeDB, clock: FakeClock, caplog: pytest.LogCaptureFixture
) -> None:
    class Failing:
        """A memory store whose writes fail until told otherwise."""

        def __init__(self) -> None:
            self.inner = open_store("memory", "")
            self.failing = True

        def __getattr__(self, name: str) -> Any:
            return getattr(self.inner, name)

        def put(self, entry: Entry) -> None:
            if self.failing:
                raise StoreError("test store: disk full")
            self.inner.put(entry)

        def touch(self, last_used: Any) -> None:
            if self.failing:
                raise StoreError("test store: disk full")
            self.inner.touch(last_used)

    sites = [publish(bed, f"unsaved{n}-") for n in range(4)]
    store = Failing()
    db = make_db(store)  # type: ignore[arg-type]

    async def scenario() -> None:
        with caplog.at_level(logging.INFO, logger="postfix_mtasts"):
            for site in sites:
                assert reply(await answered_later(db, site.domain)) == enforce_reply(site)
            failures = [m for m in caplog.messages if m.startswith("cannot write the cache (")]
            assert len(failures) == 1, caplog.messages
            store.failing = False
            await db.maintain()
            assert any("cannot write the cache: works again" in m for m in caplog.messages)
        for site in sites:
            assert store.inner.get(site.domain) is not None
            assert reply(answered_at_once(db, site.domain)) == enforce_reply(site)

    run(db, scenario)


def test_a_store_that_cannot_be_read_defers_what_the_network_cannot_settle(
    bed: Bed, make_db: MakeDB
) -> None:
    # The store may hold an unexpired policy it cannot hand out: a DNS failure then says nothing,
    # and the domain is deferred, not answered "no policy". What the network settles (a policy,
    # no record) is answered as always.
    class Unreadable:
        def __init__(self) -> None:
            self.inner = open_store("memory", "")

        def __getattr__(self, name: str) -> Any:
            return getattr(self.inner, name)

        def get(self, domain: str) -> Entry | None:
            raise StoreError("test store: I/O error")

    site = publish(bed, "unreadable")
    none = publish(bed, "unreadablenone", record=None)
    db = make_db(Unreadable())  # type: ignore[arg-type]

    async def scenario() -> None:
        assert reply(await answered_later(db, site.domain)) == enforce_reply(site)
        assert reply(await answered_later(db, none.domain)) == NOTFOUND
        db.resolver = Resolver([bed.dead_nameserver], timeout=0.3)
        unknown = await answered_later(db, bed.unique_domain("unreadabledns"))
        assert unknown.policy is None
        assert "the cache cannot be read" in unknown.defer

    run(db, scenario)


# --------------------------------------------------------------------------------------------------
# Memory: once the responder keeps its reply, the decision is not held; the store has it.


def test_a_kept_reply_stands_for_the_decision_which_is_read_back_from_the_store(
    bed: Bed, make_db: MakeDB, clock: FakeClock
) -> None:
    site = publish(bed, "keptreply")
    db = make_db()

    async def scenario() -> None:
        first = await answered_later(db, site.domain)
        db.remember(first, "postfix", b"kept")
        assert db.recall("postfix", site.domain) == b"kept"
        assert db.recall("other", site.domain) is None
        # A second map name needs the decision: read back from the store, not the network.
        again = await answered_later(db, site.domain)
        assert again == first
        db.remember(again, "other", b"other")
        assert db.recall("other", site.domain) == b"other"
        assert db.recall("postfix", site.domain) == b"kept"
        # New profiles (a reload) drop every reply; the decision is read back again.
        db.forget_replies()
        assert db.recall("postfix", site.domain) is None
        assert await answered_later(db, site.domain) == first
        db.remember(first, "postfix", b"kept")
        assert site.gets == 1
        # A new id: the reply kept for the old policy is never given for the new one.
        site.set_record("2")
        site.serve(mx=("mx2.example.net",))
        clock.advance(TXT_CHECK + 1)
        assert db.recall("postfix", site.domain) == b"kept"  # answered while it is checked
        await settle(db)
        assert site.gets == 2
        assert db.recall("postfix", site.domain) is None
        decision = answered_at_once(db, site.domain)
        assert decision.record_id == "2"
        assert "mx2.example.net" in reply(decision)

    run(db, scenario)


def test_a_reply_for_a_policy_the_store_lost_holds_until_expiry_and_nothing_downgrades_it(
    bed: Bed, make_db: MakeDB, clock: FakeClock
) -> None:
    # Only the reply is held, the store lost the entry and DNS fails: the policy is still
    # applied until it expires (§5), and what cannot be read back is deferred, never "no policy".
    site = publish(bed, "keptlost")
    db = make_db()

    async def scenario() -> None:
        first = await answered_later(db, site.domain)
        db.remember(first, "postfix", b"kept")
        db.store.purge_unused(math.inf)
        db.resolver = Resolver([bed.dead_nameserver], timeout=0.3)
        clock.advance(TXT_CHECK + 1)
        assert db.recall("postfix", site.domain) == b"kept"
        await settle(db)
        assert db.recall("postfix", site.domain) == b"kept"
        other = await ask(db, site.domain)
        assert other.defer, other
        assert other.policy is None
        clock.now = START + 86400 + 1
        assert db.recall("postfix", site.domain) is None
        assert (await ask(db, site.domain)).policy is None

    run(db, scenario)


def test_a_reply_is_only_kept_for_the_decision_in_force(bed: Bed, make_db: MakeDB) -> None:
    site = publish(bed, "keptstale")
    db = make_db()

    async def scenario() -> None:
        first = await answered_later(db, site.domain)
        db.remember(Decision(site.domain, error="lookup still running"), "postfix", b"NOTFOUND")
        db.remember(Decision(site.domain, error="x", defer="x"), "postfix", b"TEMP")
        db.remember(Decision("elsewhere.example", first.policy_text), "postfix", b"other")
        assert db.recall("postfix", site.domain) is None
        assert db.recall("postfix", "elsewhere.example") is None
        assert answered_at_once(db, site.domain) == first

    run(db, scenario)
