"""Policy-change alerts against real servers: a cached domain's policy changes on the test bed's
DNS and HTTPS servers, a real ``PolicyDB`` fetches it, and the postmaster's log gets one WARNING
line starting ``policy-change: DOMAIN: `` while ``PolicyDB.policy_changes`` counts it.

The rules themselves (what counts as a change, row by row) are in test_cache_rules.py; here each
kind goes through the real resolver, fetcher and store, and what only reads the cache (a store
read-back after a restart, another daemon's entry) must raise no alert.
"""

from __future__ import annotations

import asyncio
import logging
import time
from pathlib import Path

import pytest
import test_policydb
from bed import Bed
from test_policydb import (
    FETCH_RETRY,
    TXT_CHECK,
    FakeClock,
    MakeDB,
    Site,
    answered_at_once,
    answered_later,
    publish,
    run,
    settle,
)

from postfix_mtasts.policydb import PolicyDB
from postfix_mtasts.store import open_store

# The fixtures of the PolicyDB tests: a hand-moved clock, and PolicyDBs built on the test bed.
clock = test_policydb.clock
make_db = test_policydb.make_db

NO_CHANGES = {"downgrade": 0, "mx": 0, "max_age": 0, "fetch_failing": 0}


def change_lines(caplog: pytest.LogCaptureFixture, site: Site) -> list[str]:
    """The policy-change lines logged about ``site``, at WARNING, in order."""
    return [
        record.getMessage()
        for record in caplog.records
        if record.levelno == logging.WARNING
        and record.getMessage().startswith(f"policy-change: {site.domain}: ")
    ]


async def refetch(db: PolicyDB, site: Site, clock: FakeClock, record_id: str) -> None:
    """Publish a new record ``id`` and let ``db``'s check behind a cached answer fetch again."""
    site.set_record(record_id)
    clock.advance(max(TXT_CHECK, FETCH_RETRY) + 1)
    answered_at_once(db, site.domain)
    await settle(db)


@pytest.fixture(autouse=True)
def warnings_captured(caplog: pytest.LogCaptureFixture) -> None:
    caplog.set_level(logging.INFO, logger="postfix_mtasts")


def test_a_downgrade_from_enforce_is_alerted_and_counted(
    bed: Bed, make_db: MakeDB, clock: FakeClock, caplog: pytest.LogCaptureFixture
) -> None:
    site = publish(bed, "downgrade")
    db = make_db()

    async def scenario() -> None:
        await answered_later(db, site.domain)
        site.serve("testing")
        await refetch(db, site, clock, "2")
        (line,) = change_lines(caplog, site)
        assert line.startswith(
            f"policy-change: {site.domain}: mode enforce -> testing (a downgrade: "
        )
        assert db.policy_changes == {**NO_CHANGES, "downgrade": 1}
        # Back to enforce: an upgrade, a line at INFO, no alert.
        site.serve("enforce")
        await refetch(db, site, clock, "3")
        assert change_lines(caplog, site) == [line]
        assert db.policy_changes == {**NO_CHANGES, "downgrade": 1}

    run(db, scenario)


def test_a_changed_mx_set_is_alerted_with_both_sets(
    bed: Bed, make_db: MakeDB, clock: FakeClock, caplog: pytest.LogCaptureFixture
) -> None:
    site = publish(bed, "mxchange")
    db = make_db()

    async def scenario() -> None:
        await answered_later(db, site.domain)
        # The same set in another order is no change.
        site.serve(mx=("*.example.net", site.mx))
        await refetch(db, site, clock, "2")
        assert change_lines(caplog, site) == []
        site.serve(mx=("mx.evil.example",))
        await refetch(db, site, clock, "3")
        assert change_lines(caplog, site) == [
            f"policy-change: {site.domain}: mx *.example.net,{site.mx} -> mx.evil.example"
        ]
        assert db.policy_changes == {**NO_CHANGES, "mx": 1}

    run(db, scenario)


def test_a_max_age_cut_to_under_a_day_is_alerted(
    bed: Bed, make_db: MakeDB, clock: FakeClock, caplog: pytest.LogCaptureFixture
) -> None:
    site = publish(bed, "maxagecut", max_age=604800)
    db = make_db()

    async def scenario() -> None:
        await answered_later(db, site.domain)
        site.serve(max_age=3600)
        await refetch(db, site, clock, "2")
        assert change_lines(caplog, site) == [
            f"policy-change: {site.domain}: max_age 604800 -> 3600 (under a day)"
        ]
        # Raised again: no change.
        site.serve(max_age=604800)
        await refetch(db, site, clock, "3")
        assert len(change_lines(caplog, site)) == 1
        assert db.policy_changes == {**NO_CHANGES, "max_age": 1}

    run(db, scenario)


def test_failing_fetches_are_alerted_once_per_run(
    bed: Bed, make_db: MakeDB, clock: FakeClock, caplog: pytest.LogCaptureFixture
) -> None:
    site = publish(bed, "fetchfail")
    db = make_db()

    async def scenario() -> None:
        await answered_later(db, site.domain)
        site.fail()
        await refetch(db, site, clock, "2")
        (line,) = change_lines(caplog, site)
        assert line.startswith(
            f"policy-change: {site.domain}: policy fetch failing while its TXT record (id 2) is"
            " present: "
        )
        assert "keeping the cached enforce policy until" in line
        # Retries of the same run: plain refresh notes, no new alert.
        for record_id in ("2", "3"):
            await refetch(db, site, clock, record_id)
        assert site.gets == 4
        assert len(change_lines(caplog, site)) == 1
        assert db.policy_changes == {**NO_CHANGES, "fetch_failing": 1}
        # A successful fetch ends the run; the next failure starts another.
        site.serve()
        await refetch(db, site, clock, "4")
        assert answered_at_once(db, site.domain).record_id == "4"
        site.fail()
        await refetch(db, site, clock, "5")
        assert len(change_lines(caplog, site)) == 2
        assert db.policy_changes == {**NO_CHANGES, "fetch_failing": 2}

    run(db, scenario)


def test_the_same_policy_fetched_again_is_no_change(
    bed: Bed, make_db: MakeDB, clock: FakeClock, caplog: pytest.LogCaptureFixture
) -> None:
    site = publish(bed, "nochange")
    db = make_db()

    async def scenario() -> None:
        await answered_later(db, site.domain)
        await refetch(db, site, clock, "2")
        assert site.gets == 2
        assert change_lines(caplog, site) == []
        assert db.policy_changes == NO_CHANGES

    run(db, scenario)


def test_a_restart_reads_back_without_alerting_again(
    bed: Bed, make_db: MakeDB, clock: FakeClock, caplog: pytest.LogCaptureFixture, tmp_path: Path
) -> None:
    site = publish(bed, "restart")
    path = str(tmp_path / "cache.sqlite")
    store = open_store("sqlite", path)
    db = make_db(store)

    async def before() -> None:
        await answered_later(db, site.domain)
        site.serve("testing")
        await refetch(db, site, clock, "2")
        site.fail()
        await refetch(db, site, clock, "3")

    try:
        run(db, before)
    finally:
        store.close()
    assert db.policy_changes == {**NO_CHANGES, "downgrade": 1, "fetch_failing": 1}
    assert len(change_lines(caplog, site)) == 2

    store = open_store("sqlite", path)
    again = make_db(store)

    async def after() -> None:
        # Read back from the store: no comparison. The failures go on: still the same run.
        decision = await answered_later(again, site.domain)
        assert decision.record_id == "2"
        await refetch(again, site, clock, "3")
        assert site.gets == 4

    try:
        run(again, after)
    finally:
        store.close()
    assert again.policy_changes == NO_CHANGES
    assert len(change_lines(caplog, site)) == 2


def test_in_a_fleet_only_the_daemon_that_fetched_alerts(
    bed: Bed, make_db: MakeDB, clock: FakeClock, caplog: pytest.LogCaptureFixture
) -> None:
    site = publish(bed, "fleet")
    store = open_store("memory", "")
    first, second = make_db(store), make_db(store)

    async def scenario() -> None:
        await answered_later(first, site.domain)
        await answered_later(second, site.domain)
        site.serve(mx=("mx.evil.example",))
        await refetch(first, site, clock, "2")
        # The second daemon hears of the change as from the store's notifications, and adopts it.
        second.changed([site.domain])
        deadline = time.monotonic() + 10
        while answered_at_once(second, site.domain).record_id != "2":
            assert time.monotonic() < deadline, "the second daemon did not adopt the entry"
            await asyncio.sleep(0.01)
        # Its own check, when due, finds the record unchanged: no fetch, nothing to compare.
        clock.advance(TXT_CHECK + 1)
        answered_at_once(second, site.domain)
        await settle(second)
        assert site.gets == 2
        await settle(first)
        await first.close()

    run(second, scenario)
    assert first.policy_changes == {**NO_CHANGES, "mx": 1}
    assert second.policy_changes == NO_CHANGES
    assert len(change_lines(caplog, site)) == 1
