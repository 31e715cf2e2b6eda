"""A fleet: several `postfix-mtasts serve` processes sharing one Redis or PostgreSQL store (and,
on one machine, one SQLite file), against the real test bed and real servers.

What a fleet promises (README, docs/configuration.md), each attacked here:
- a domain one daemon looked up is answered by the others without a DNS query or an HTTPS GET;
- a check or refresh that falls due is made by one daemon of the fleet: one GET in all;
- a change another daemon (or `postfix-mtasts cache`) makes reaches every daemon within
  CHANGE_BOUND seconds;
- a store that dies, or stops answering, costs no answer: known domains are answered from memory,
  new ones through lookups, no request waits on the store longer than its bound, the outage is
  logged once, and what was learnt meanwhile is written back when the store returns.

DNS queries are counted at a DNS server in front of the bed's resolver (tests/hostile_dns.py),
GETs at the bed's HTTPS server.
"""

from __future__ import annotations

import contextlib
import itertools
import shutil
import subprocess
import time
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import pytest
from bed import Bed, policy_text
from dbservers import PASSWORD, PostgresServer, RedisServer
from hostile_dns import HostileDNS
from mtasts_daemon import Daemon, running_daemon

from postfix_mtasts.store import Entry, Store, open_store

# docs/configuration.md: a change reaches every daemon within this many seconds.
CHANGE_BOUND = 2.0

_names = itertools.count()
SERVERS = {"redis": "redis_server", "postgresql": "postgres_server"}


class Site:
    """A published test domain: its TXT record and its policy host."""

    def __init__(self, bed: Bed, prefix: str) -> None:
        self.bed = bed
        self.domain = bed.unique_domain(prefix)
        self.host = f"mta-sts.{self.domain}"
        self.mx = f"mail.{self.domain}"
        bed.dns_set(self.host, "A", [bed.https_address])
        self.set_record("1")
        self.serve(self.mx)

    def set_record(self, record_id: str) -> None:
        self.bed.dns_set(f"_mta-sts.{self.domain}", "TXT", [f"v=STSv1; id={record_id}"])

    def serve(self, mx: str) -> None:
        self.bed.https.set(self.host, body=policy_text("enforce", (mx,), 86400))

    def reply(self, mx: str | None = None) -> str:
        return f"OK secure match={mx or self.mx} servername=hostname"

    @property
    def gets(self) -> int:
        return self.bed.https.request_count(self.host)


class Fleet:
    """Daemons sharing one store, and a store object of the test's own on it."""

    def __init__(self, daemons: list[Daemon], store: Store, settings: dict[str, Any]) -> None:
        self.daemons = daemons
        self.store = store
        self.settings = settings


Shared = Callable[..., contextlib.AbstractContextManager[Fleet]]


def _cache_settings(backend: str, request: pytest.FixtureRequest, tmp: Path) -> dict[str, Any]:
    n = next(_names)
    if backend == "redis":
        redis: RedisServer = request.getfixturevalue("redis_server")
        return {"backend": "redis", "url": redis.url, "prefix": f"fleet{n}:"}
    if backend == "postgresql":
        postgres: PostgresServer = request.getfixturevalue("postgres_server")
        return {"backend": "postgresql", "url": postgres.url, "table": f"fleet_{n}"}
    return {"backend": "sqlite", "path": str(tmp / f"fleet{n}.sqlite")}


def _open(settings: dict[str, Any]) -> Store:
    return open_store(
        settings["backend"],
        settings.get("path", ""),
        url=settings.get("url", ""),
        name=settings.get("prefix") or settings.get("table", ""),
    )


@pytest.fixture
def fleet(
    request: pytest.FixtureRequest, bed: Bed, hostile_dns: HostileDNS, tmp_path: Path
) -> Shared:
    """``fleet(backend, count=3, **cache_keys)``: ``count`` daemons asking the bed through the
    counting DNS server, sharing one store of ``backend``."""

    @contextlib.contextmanager
    def start(backend: str, count: int = 3, **cache: Any) -> Iterator[Fleet]:
        settings = {**_cache_settings(backend, request, tmp_path), **cache}
        store = _open(settings)
        with contextlib.ExitStack() as stack:
            stack.callback(store.close)
            daemons = [
                stack.enter_context(
                    running_daemon(
                        bed,
                        tmp_path / f"daemon{i}",
                        nameservers=[hostile_dns.address],
                        settings={"cache": settings},
                    )
                )
                for i in range(count)
            ]
            yield Fleet(daemons, store, settings)

    return start


def _txt_queries(hostile_dns: HostileDNS, site: Site) -> int:
    return hostile_dns.queries(f"_mta-sts.{site.domain}")


def _eventually(check: Callable[[], bool], within: float, step: float = 0.05) -> float | None:
    """Seconds until ``check()`` held (polled), or None if it did not within ``within``."""
    started = time.monotonic()
    while True:
        if check():
            return time.monotonic() - started
        if time.monotonic() - started > within:
            return None
        time.sleep(step)


# --------------------------------------------------------------------------------------------------
# Sharing.


@pytest.mark.parametrize("backend", ["redis", "postgresql", "sqlite"])
def test_what_one_daemon_looked_up_the_others_answer_without_any_lookup(
    backend: str, fleet: Shared, bed: Bed, hostile_dns: HostileDNS
) -> None:
    site = Site(bed, "share")
    with fleet(backend) as shared:
        first, *others = shared.daemons
        assert first.request(site.domain, timeout=15.0) == site.reply()
        queries, gets = _txt_queries(hostile_dns, site), site.gets
        assert (queries, gets) == (1, 1)
        for daemon in others:
            assert daemon.request(site.domain) == site.reply()
        # Not one more DNS query, not one more GET: the others read the store.
        assert (_txt_queries(hostile_dns, site), site.gets) == (1, 1)


@pytest.mark.parametrize("backend", ["redis", "postgresql"])
def test_a_stampede_on_three_daemons_makes_one_lookup(
    backend: str, fleet: Shared, bed: Bed, hostile_dns: HostileDNS
) -> None:
    """Every daemon is asked for the same new domains at the same moment: the fleet fetches each
    policy once (the lease), and every daemon answers it."""
    import concurrent.futures

    sites = [Site(bed, "stampede") for _ in range(5)]
    for site in sites:
        # A slow policy host: the lookups overlap for certain.
        bed.https.set(site.host, body=policy_text("enforce", (site.mx,), 86400), delay=0.5)
    with fleet(backend) as shared:
        asks = [(d, s) for s in sites for d in shared.daemons for _ in range(3)]
        with concurrent.futures.ThreadPoolExecutor(len(asks)) as pool:
            replies = list(pool.map(lambda a: a[0].request(a[1].domain, timeout=20.0), asks))
    assert replies == [site.reply() for site in sites for _ in range(9)]
    assert [site.gets for site in sites] == [1] * 5
    assert [_txt_queries(hostile_dns, site) for site in sites] == [1] * 5


@pytest.mark.parametrize("backend", ["redis", "postgresql"])
def test_one_daemon_of_the_fleet_makes_a_due_check_and_the_others_pick_it_up(
    backend: str, fleet: Shared, bed: Bed, hostile_dns: HostileDNS
) -> None:
    site = Site(bed, "refresh")
    with fleet(backend, txt_check_interval=1.0) as shared:
        for daemon in shared.daemons:
            assert daemon.request(site.domain, timeout=15.0) == site.reply()
        assert site.gets == 1
        # The domain publishes a new policy (new id, new MX host); every daemon's check falls due.
        new_mx = f"mx2.{site.domain}"
        site.serve(new_mx)
        site.set_record("2")
        queries = _txt_queries(hostile_dns, site)
        time.sleep(1.2)
        # Every daemon is asked at once: each finds its check due.
        import concurrent.futures

        with concurrent.futures.ThreadPoolExecutor(3) as pool:
            list(pool.map(lambda d: d.request(site.domain), shared.daemons))

        def all_new() -> bool:
            return all(d.request(site.domain) == site.reply(new_mx) for d in shared.daemons)

        assert _eventually(all_new, 10.0) is not None, [d.log() for d in shared.daemons]
        # One refresh cycle for the fleet: one TXT query (made by the lease holder; the others
        # read its result), one GET.
        assert site.gets == 2
        assert _txt_queries(hostile_dns, site) - queries == 1


# --------------------------------------------------------------------------------------------------
# Changes made elsewhere.


@pytest.mark.parametrize("backend", ["redis", "postgresql", "sqlite"])
def test_a_change_in_the_store_reaches_every_daemon_within_the_bound(
    backend: str, fleet: Shared, bed: Bed
) -> None:
    site = Site(bed, "notify")
    with fleet(backend) as shared:
        for daemon in shared.daemons:
            assert daemon.request(site.domain, timeout=15.0) == site.reply()
        held = shared.store.get(site.domain)
        assert held is not None and held.expires_at is not None
        # Another daemon (here: the test) stores a newer policy for the domain.
        new_mx = f"new.{site.domain}"
        newer = Entry(
            domain=site.domain,
            record_id="2",
            policy_text=policy_text("enforce", (new_mx,), 86400).decode(),
            fetched_at=held.fetched_at + 1 if held.fetched_at else time.time(),
            expires_at=held.expires_at + 1,
            checked_at=time.time(),
            last_used=time.time(),
        )
        shared.store.put(newer)
        for daemon in shared.daemons:
            took = _eventually(lambda d=daemon: d.request(site.domain) == site.reply(new_mx), 10.0)
            assert took is not None and took <= CHANGE_BOUND, (took, daemon.log())
        # A forgotten domain: every daemon stops answering from its memory, and looks it up anew
        # (one GET for the fleet).
        gets = site.gets
        shared.store.delete([site.domain])
        time.sleep(CHANGE_BOUND)
        for daemon in shared.daemons:
            assert daemon.request(site.domain, timeout=15.0) == site.reply()
        assert site.gets == gets + 1


def test_a_change_never_downgrades_a_policy_in_force(fleet: Shared, bed: Bed) -> None:
    """A store entry without a policy (written by a confused or attacked daemon) does not take
    away a policy a daemon holds in force; only a newer fetched policy replaces it."""
    site = Site(bed, "nodowngrade")
    with fleet("redis", count=1) as shared:
        (daemon,) = shared.daemons
        assert daemon.request(site.domain, timeout=15.0) == site.reply()
        shared.store.put(
            Entry(
                domain=site.domain,
                record_id=None,
                policy_text=None,
                fetched_at=None,
                expires_at=None,
                checked_at=time.time(),
                last_used=time.time(),
            )
        )
        time.sleep(CHANGE_BOUND)
        assert daemon.request(site.domain) == site.reply()


# --------------------------------------------------------------------------------------------------
# Outages.


def _log_count(daemon: Daemon, text: str) -> int:
    return daemon.log_path.read_text(errors="replace").count(text)


@pytest.mark.parametrize("backend", ["redis", "postgresql"])
def test_a_dead_store_costs_no_answer_and_gets_what_was_learnt_when_it_returns(
    backend: str, request: pytest.FixtureRequest, fleet: Shared, bed: Bed
) -> None:
    server: RedisServer | PostgresServer = request.getfixturevalue(SERVERS[backend])
    known, new = Site(bed, "known"), Site(bed, "during")
    with fleet(backend, count=1) as shared:
        (daemon,) = shared.daemons
        assert daemon.request(known.domain, timeout=15.0) == known.reply()
        server.stop()
        try:
            # Known: from memory. New: through a lookup, within the store's bound.
            for _ in range(50):
                assert daemon.request(known.domain) == known.reply()
            started = time.monotonic()
            assert daemon.request(new.domain, timeout=15.0) == new.reply()
            assert time.monotonic() - started < 5.0
            for _ in range(50):
                assert daemon.request(new.domain) == new.reply()
        finally:
            server.start()
        # Logged once, not once per request.
        assert _log_count(daemon, "cannot read the cache") <= 2, daemon.log()
        # What was learnt meanwhile reaches the store once it is back.
        store = _open(shared.settings)
        try:
            took = _eventually(lambda: store.get(new.domain) is not None, 15.0, step=0.2)
        finally:
            store.close()
        assert took is not None, daemon.log()


@pytest.mark.parametrize("backend", ["redis", "postgresql"])
def test_a_store_that_stops_answering_holds_no_request_longer_than_its_bound(
    backend: str, request: pytest.FixtureRequest, fleet: Shared, bed: Bed
) -> None:
    """SIGSTOP: the server accepts connections and answers nothing, the worst a store can do."""
    server: RedisServer | PostgresServer = request.getfixturevalue(SERVERS[backend])
    known, new = Site(bed, "known"), Site(bed, "paused")
    with fleet(backend, count=1, timeout=0.5) as shared:
        (daemon,) = shared.daemons
        assert daemon.request(known.domain, timeout=15.0) == known.reply()
        server.pause()
        try:
            started = time.monotonic()
            assert daemon.request(known.domain) == known.reply()
            assert daemon.request(new.domain, timeout=15.0) == new.reply()
            # The store's bound (cache.timeout, 0.5 s here) at most twice, plus the lookup.
            waited = time.monotonic() - started
        finally:
            server.resume()
        assert waited < 2 * 0.5 + 2.0, daemon.log()


@pytest.mark.parametrize("backend", ["redis", "postgresql"])
def test_a_daemon_started_while_its_store_is_down_uses_it_once_it_is_up(
    backend: str, request: pytest.FixtureRequest, bed: Bed, hostile_dns: HostileDNS, tmp_path: Path
) -> None:
    server: RedisServer | PostgresServer = request.getfixturevalue(SERVERS[backend])
    settings = _cache_settings(backend, request, tmp_path)
    site = Site(bed, "late")
    server.stop()
    try:
        with running_daemon(
            bed, tmp_path / "late", nameservers=[hostile_dns.address], settings={"cache": settings}
        ) as daemon:
            assert daemon.request(site.domain, timeout=15.0) == site.reply()
            server.start()
            store = _open(settings)
            try:
                # Written once the store answers (the next store call after 5 s, at the latest
                # the next maintenance round); asked again to make a call happen.
                def stored() -> bool:
                    daemon.request(site.domain)
                    daemon.request(Site(bed, "poke").domain, timeout=15.0)
                    return store.get(site.domain) is not None

                assert _eventually(stored, 20.0, step=1.0) is not None, daemon.log()
            finally:
                store.close()
            assert "trying again every few seconds" in daemon.log_path.read_text()
    finally:
        if server.process is None:
            server.start()


def _cache_command(daemon: Daemon, *args: str) -> subprocess.CompletedProcess[str]:
    """``postfix-mtasts cache ARGS`` as the operator runs it, on the daemon's configuration."""
    found = shutil.which("postfix-mtasts")
    assert found is not None, "postfix-mtasts is not on PATH (install the package, see tests/run)"
    return subprocess.run(
        [found, "cache", *args, "-c", str(daemon.config_path)],
        capture_output=True,
        text=True,
        timeout=30,
        check=False,
    )


@pytest.mark.parametrize("backend", ["redis", "postgresql", "sqlite"])
def test_cache_forget_makes_every_daemon_read_the_policy_again_within_the_bound(
    backend: str, fleet: Shared, bed: Bed
) -> None:
    """The operator fixed a broken policy at the remote side and wants it read now."""
    site = Site(bed, "forget")
    with fleet(backend) as shared:
        for daemon in shared.daemons:
            assert daemon.request(site.domain, timeout=15.0) == site.reply()
        fixed_mx = f"fixed.{site.domain}"
        site.serve(fixed_mx)
        site.set_record("2")
        done = _cache_command(shared.daemons[0], "forget", site.domain)
        assert done.returncode == 0, done.stderr
        time.sleep(CHANGE_BOUND)
        for daemon in shared.daemons:
            assert daemon.request(site.domain, timeout=15.0) == site.reply(fixed_mx)
        # One new fetch for the fleet.
        assert site.gets == 2


@pytest.mark.parametrize("backend", ["redis", "postgresql"])
def test_a_store_password_never_reaches_the_log(
    backend: str, request: pytest.FixtureRequest, bed: Bed, hostile_dns: HostileDNS, tmp_path: Path
) -> None:
    """An outage makes the daemon and the client libraries talk about the server: never with its
    password (debug level, so that every line is there to leak it)."""
    server: RedisServer | PostgresServer = request.getfixturevalue(SERVERS[backend])
    settings = {**_cache_settings(backend, request, tmp_path), "url": server.password_url}
    site = Site(bed, "secret")
    with running_daemon(
        bed, tmp_path / "secret", nameservers=[hostile_dns.address], settings={"cache": settings}
    ) as daemon:
        assert daemon.request(site.domain, timeout=15.0) == site.reply()
        server.stop()
        try:
            assert daemon.request(Site(bed, "secret").domain, timeout=15.0).startswith("OK secure")
            time.sleep(1.0)
        finally:
            server.start()
        forgotten = _cache_command(daemon, "show", "unknown.example")
    log = daemon.log_path.read_text(errors="replace")
    assert "cannot read the cache" in log
    assert "***@" in log
    assert PASSWORD not in log
    assert PASSWORD not in forgotten.stdout + forgotten.stderr
