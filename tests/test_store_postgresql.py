"""store/postgresql.py against a real PostgreSQL server: the URL forms, passwords kept out of
every message, the versioned schema, an outage and the recovery from it, and what a tampered
table or a stranger's notification cannot make the store do."""

from __future__ import annotations

import itertools
import math
import os
import subprocess
import sys
import threading
import time
from collections.abc import Iterator

import pytest
from dbservers import PASSWORD, PostgresServer, free_port
from storekit import entry

from postfix_mtasts.store import ALL, MAX_POLICY_TEXT, StoreError, Watcher
from postfix_mtasts.store.postgresql import SCHEMA_VERSION, PostgresStore

_names = itertools.count()


@pytest.fixture
def table() -> str:
    return f"pgtest_{os.getpid()}_{next(_names)}"


@pytest.fixture
def stores(postgres_server: PostgresServer, table: str) -> Iterator[list[PostgresStore]]:
    """Stores opened by a test (``opened.append``) are closed at its end."""
    opened: list[PostgresStore] = []
    yield opened
    for store in opened:
        store.close()


def open_(opened: list[PostgresStore], url: str, table: str, timeout: float = 1.0) -> PostgresStore:
    store = PostgresStore(url, table=table, timeout=timeout)
    opened.append(store)
    return store


def heard(watcher: Watcher, wanted: set[str], within: float = 10.0) -> set[str]:
    seen: set[str] = set()
    deadline = time.monotonic() + within
    while not wanted <= seen and time.monotonic() < deadline:
        got = watcher.wait(0.2)
        assert got != ALL
        seen |= set(got)
    return seen


@pytest.mark.parametrize("form", ["postgresql", "postgres", "password", "socket"])
def test_every_url_form_reaches_the_server(
    postgres_server: PostgresServer, stores: list[PostgresStore], table: str, form: str
) -> None:
    url = {
        "postgresql": postgres_server.url,
        "postgres": postgres_server.url.replace("postgresql://", "postgres://"),
        "password": postgres_server.password_url,
        "socket": postgres_server.socket_url,
    }[form]
    store = open_(stores, url, table)
    store.put(entry())
    assert store.get("example.com") == entry()
    assert store.where.endswith(f" table {table}")
    assert PASSWORD not in store.where
    assert PASSWORD not in repr(store)
    if form == "password":
        assert store.where.startswith("postgresql://fleet:***@127.0.0.1:")


def test_the_table_defaults_to_the_configured_default(
    postgres_server: PostgresServer, stores: list[PostgresStore]
) -> None:
    store = open_(stores, postgres_server.url, "")
    assert store.where == f"{postgres_server.url} table postfix_mtasts_cache"
    assert postgres_server.psql(
        "SELECT value FROM postfix_mtasts_cache_meta", postgres_server.database
    ).split() == [str(SCHEMA_VERSION)]


def test_a_wrong_password_names_the_store_and_not_the_password(
    postgres_server: PostgresServer, table: str
) -> None:
    url = postgres_server.password_url.replace(PASSWORD, "wrong-secret-0815")
    with pytest.raises(StoreError) as caught:
        PostgresStore(url, table=table)
    message = str(caught.value)
    assert message.startswith(
        f"postgresql://fleet:***@127.0.0.1:{postgres_server.port}/mtasts table {table}:"
        " cannot open: "
    )
    assert "password authentication failed" in message
    assert "wrong-secret" not in message


@pytest.mark.parametrize(
    ("url", "cause"),
    [
        ("mysql://root@127.0.0.1/mail", "expected a postgresql:// or postgres:// URL"),
        ("host=/run/postgresql password=sec ret", "cannot be parsed"),
        ("postgresql://u:sec%zzret@h/db", "cannot be parsed"),
    ],
)
def test_a_url_that_is_not_postgresql_is_refused_without_the_password(url: str, cause: str) -> None:
    with pytest.raises(StoreError, match=cause) as caught:
        PostgresStore(url)
    assert "sec" not in str(caught.value).replace("postgresql://", "")


@pytest.mark.parametrize("table", ["Cache", "1cache", "cache-table", "x" * 49, 'a"b'])
def test_a_table_name_that_is_not_a_plain_identifier_is_refused(
    postgres_server: PostgresServer, table: str
) -> None:
    with pytest.raises(StoreError, match="the table name must be"):
        PostgresStore(postgres_server.url, table=table)


def test_a_stopped_server_fails_fast_and_nothing_else(table: str) -> None:
    port = free_port()
    started = time.monotonic()
    with pytest.raises(StoreError, match=r"cannot open: .*refused") as caught:
        PostgresStore(f"postgresql://postgres@127.0.0.1:{port}/mtasts", table=table)
    assert time.monotonic() - started < 2.0
    assert str(caught.value).startswith(f"postgresql://postgres@127.0.0.1:{port}/mtasts table")


def test_a_newer_schema_is_refused_and_left_as_it_was(
    postgres_server: PostgresServer, stores: list[PostgresStore], table: str
) -> None:
    open_(stores, postgres_server.url, table).put(entry())
    db = postgres_server.database
    postgres_server.psql(f"UPDATE {table}_meta SET value = '{SCHEMA_VERSION + 1}'", db)
    before = postgres_server.psql(f"SELECT * FROM {table} ORDER BY domain", db)
    with pytest.raises(StoreError) as caught:
        PostgresStore(postgres_server.url, table=table)
    assert str(caught.value) == (
        f"{postgres_server.url} table {table}: written by a newer postfix-mtasts"
        f" (cache schema {SCHEMA_VERSION + 1}, this version knows {SCHEMA_VERSION})"
    )
    assert postgres_server.psql(f"SELECT * FROM {table} ORDER BY domain", db) == before
    assert postgres_server.psql(f"SELECT value FROM {table}_meta", db).split() == [
        str(SCHEMA_VERSION + 1)
    ]


def test_daemons_starting_at_once_create_the_tables_once(
    postgres_server: PostgresServer, stores: list[PostgresStore], table: str
) -> None:
    barrier = threading.Barrier(6)
    errors: list[BaseException] = []

    def start() -> None:
        barrier.wait()
        try:
            stores.append(PostgresStore(postgres_server.url, table=table, timeout=5.0))
        except BaseException as exc:
            errors.append(exc)

    threads = [threading.Thread(target=start) for _ in range(6)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()
    assert errors == []
    stores[0].put(entry())
    assert all(store.get("example.com") == entry() for store in stores)


def test_a_stopped_server_fails_calls_then_the_same_store_works_again(
    postgres_server: PostgresServer, stores: list[PostgresStore], table: str
) -> None:
    store = open_(stores, postgres_server.url, table)
    other = open_(stores, postgres_server.url, table)
    store.put(entry("before.example"))
    watcher = store.watch()
    try:
        postgres_server.stop()
        for call in (
            lambda: store.get("before.example"),
            lambda: store.put(entry("during.example")),
            lambda: store.lease("before.example", "me", 30.0),
            lambda: list(store.entries()),
            lambda: store.get("before.example"),
        ):
            started = time.monotonic()
            with pytest.raises(StoreError) as caught:
                call()
            # Connection refused: no waiting for the timeout.
            assert time.monotonic() - started < 1.0
            assert str(caught.value).startswith(f"{postgres_server.url} table {table}: ")
        with pytest.raises(StoreError, match=rf"^{postgres_server.url} table {table}: "):
            watcher.wait(1.0)
        with pytest.raises(StoreError, match="refused"):
            watcher.wait(1.0)
        postgres_server.start()
        assert store.get("before.example") == entry("before.example")
        store.put(entry("after.example"))
        assert other.get("after.example") == entry("after.example")
        assert store.lease("after.example", "me", 30.0)
        # Changes made while it was away may have been missed: it says so once.
        assert watcher.wait(1.0) == ALL
        other.put(entry("later.example"))
        assert heard(watcher, {"later.example"}) == {"later.example"}
    finally:
        watcher.close()
        if postgres_server.process is None:
            postgres_server.start()


def test_a_server_restarted_while_idle_costs_no_failed_call(
    postgres_server: PostgresServer, stores: list[PostgresStore], table: str
) -> None:
    store = open_(stores, postgres_server.url, table)
    store.put(entry())
    try:
        postgres_server.stop()
    finally:
        postgres_server.start()
    assert store.get("example.com") == entry()
    assert store.get("example.com") == entry()


def test_an_oversized_policy_text_in_the_table_reads_as_absent(
    postgres_server: PostgresServer, stores: list[PostgresStore], table: str
) -> None:
    store = open_(stores, postgres_server.url, table)
    store.put(entry("good.example"))
    huge = MAX_POLICY_TEXT + 1
    postgres_server.psql(
        f"INSERT INTO {table} VALUES ('huge.example', 'x', repeat('x', {huge}), 1, 2, 3, 4, '', 0),"
        f" ('error.example', 'x', NULL, 1, 2, 3, 4, repeat('e', {huge}), 0)",
        postgres_server.database,
    )
    assert store.get("huge.example") is None
    assert store.get("error.example") is None
    assert [e.domain for e in store.entries()] == ["good.example"]
    # The next put() for the domain overwrites the row.
    store.put(entry("huge.example"))
    assert store.get("huge.example") == entry("huge.example")


def test_malformed_notifications_are_ignored(
    postgres_server: PostgresServer, stores: list[PostgresStore], table: str
) -> None:
    store = open_(stores, postgres_server.url, table)
    writer = open_(stores, postgres_server.url, table)
    watcher = store.watch()
    try:
        channel = f"{table}_changes"
        stranger = "0123456789abcdef"
        for payload in [
            "",
            "garbage",
            f"{stranger}",
            f"{stranger} ",
            f"{stranger}  two.example",
            f"{stranger} {'a' * 254}.example",
            f"{stranger} grüße.example",
            # More names than a watcher takes (short ones: the server limits a payload's size).
            f"{stranger} " + " ".join(str(n) for n in range(1001)),
            "not-an-origin one.example",
            f"{store.origin} own.example",
        ]:
            postgres_server.psql(
                f"SELECT pg_notify('{channel}', '{payload}')", postgres_server.database
            )
        assert watcher.wait(0.5) == frozenset()
        postgres_server.psql(
            f"SELECT pg_notify('{channel}', '{stranger} a.example b.example')",
            postgres_server.database,
        )
        writer.put(entry("c.example"))
        assert heard(watcher, {"a.example", "b.example", "c.example"}) == {
            "a.example",
            "b.example",
            "c.example",
        }
    finally:
        watcher.close()


def test_a_big_delete_is_announced_in_payloads_the_server_takes(
    postgres_server: PostgresServer, stores: list[PostgresStore], table: str
) -> None:
    writer = open_(stores, postgres_server.url, table)
    reader = open_(stores, postgres_server.url, table)
    domains = {f"{n:05d}-{'x' * 50}.example" for n in range(2500)}
    for domain in domains:
        writer.put(entry(domain))
    watcher = reader.watch()
    try:
        assert writer.delete(domains) == len(domains)
        assert heard(watcher, domains) == domains
    finally:
        watcher.close()


def test_expired_leases_go_with_the_unused_entries(
    postgres_server: PostgresServer, stores: list[PostgresStore], table: str
) -> None:
    store = open_(stores, postgres_server.url, table)
    for n in range(20):
        assert store.lease(f"d{n}.example", "crashed", 0.05)
    assert store.lease("held.example", "alive", 60.0)
    time.sleep(0.3)
    assert store.purge_unused(0.0) == 0
    held = postgres_server.psql(f"SELECT domain FROM {table}_leases", postgres_server.database)
    assert held.split() == ["held.example"]


def test_a_lease_expires_by_the_servers_clock(
    postgres_server: PostgresServer, stores: list[PostgresStore], table: str
) -> None:
    store = open_(stores, postgres_server.url, table)
    assert store.lease("a.example", "one", 3600.0)
    expires = postgres_server.psql(
        f"SELECT extract(epoch FROM expires - now()) FROM {table}_leases",
        postgres_server.database,
    )
    assert 3500 < float(expires) <= 3600


def test_infinite_and_negative_times_purge_as_they_should(
    postgres_server: PostgresServer, stores: list[PostgresStore], table: str
) -> None:
    store = open_(stores, postgres_server.url, table)
    store.put(entry("a.example", last_used=-5.0))
    store.put(entry("b.example", policy_text=None, last_used=10.0))
    assert store.purge_unused(-10.0, without_policy_before=20.0) == 1
    assert store.purge_unused(math.inf) == 1


def test_without_psycopg_the_store_says_which_extra_to_install() -> None:
    program = (
        "import sys; sys.modules['psycopg'] = None\n"
        "from postfix_mtasts.store import StoreError, open_store\n"
        "try:\n"
        "    open_store('postgresql', '', url='postgresql://u:pw@h/db')\n"
        "except StoreError as exc:\n"
        "    print(exc)\n"
    )
    done = subprocess.run(
        [sys.executable, "-c", program], capture_output=True, text=True, timeout=60, check=True
    )
    assert done.stdout.strip() == (
        "postgresql://u:***@h/db table postfix_mtasts_cache: cannot open: psycopg is not"
        " installed (pip install 'postfix-mtasts[postgresql]')"
    )


def test_a_server_that_never_answers_fails_the_call_within_its_bound(
    postgres_server: PostgresServer, stores: list[PostgresStore], table: str
) -> None:
    store = open_(stores, postgres_server.url, table, timeout=1.0)
    store.put(entry())
    postgres_server.pause()
    try:
        started = time.monotonic()
        with pytest.raises(StoreError, match=r"cannot read example\.com: no answer .* 2 s"):
            store.get("example.com")
        # The bound is the timeout and ANSWER_GRACE, a second each; a loaded machine adds some.
        assert 1.9 < time.monotonic() - started < 6.0
    finally:
        postgres_server.resume()
    assert store.get("example.com") == entry()
