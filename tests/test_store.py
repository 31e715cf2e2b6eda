"""store/: the same behaviour from every backend, and a SQLite file that survives restarts, other
processes, locks and damage without ever crashing its caller."""

from __future__ import annotations

import math
import multiprocessing
import os
import pwd
import shutil
import sqlite3
import stat
import tempfile
import threading
import time
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import pytest
from cachefiles import damaged_cache, version_1_cache
from storekit import BACKENDS, POLICY, SHARED, entry, opener

from postfix_mtasts.store import (
    ALL,
    MAX_DOMAIN_NAMES,
    MAX_POLICY_TEXT,
    CorruptStoreError,
    Entry,
    ForeignFileError,
    Store,
    StoreError,
    Watcher,
    open_store,
)
from postfix_mtasts.store import sqlite as sqlite_store
from postfix_mtasts.store.sqlite import APPLICATION_ID, POLL_INTERVAL, SCHEMA_VERSION, move_aside

Opener = Callable[..., Store]


@pytest.fixture
def cache_path(tmp_path: Path) -> str:
    return str(tmp_path / "state" / "postfix-mtasts" / "cache.sqlite")


@pytest.fixture(params=BACKENDS)
def open_any(request: pytest.FixtureRequest, tmp_path: Path) -> Iterator[Opener]:
    """Opens stores of one backend (every backend in turn) on this test's own namespace."""
    yield from opener(request, request.param, tmp_path)


@pytest.fixture(params=SHARED)
def open_shared(request: pytest.FixtureRequest, tmp_path: Path) -> Iterator[Opener]:
    """As ``open_any``, for the backends that other processes share."""
    yield from opener(request, request.param, tmp_path)


@pytest.fixture
def store(open_any: Opener) -> Store:
    return open_any()


@pytest.fixture
def open_sqlite(cache_path: str) -> Iterator[Opener]:
    """Opens SQLite stores on one file; closes them all at the end."""
    opened: list[Store] = []

    def open_(path: str = cache_path, **kwargs: Any) -> Store:
        s = open_store("sqlite", path, **kwargs)
        opened.append(s)
        return s

    yield open_
    for s in opened:
        s.close()


# --- every backend -------------------------------------------------------------------------------


def test_an_unknown_domain_has_no_entry(store: Store) -> None:
    assert store.get("example.com") is None
    # Nothing held: purging everything removes nothing.
    assert store.purge_unused(math.inf) == 0


@pytest.mark.parametrize(
    "stored",
    [
        entry(),
        entry(last_error="policy fetch failed (certificate expired)", backoff_until=1500.5),
        # A domain remembered as having no policy.
        entry(record_id=None, policy_text=None, fetched_at=None, expires_at=None),
        entry(checked_at=None),
        entry("xn--bcher-kva.example", policy_text=POLICY + "note: grüße ✉\n"),
        entry(policy_text="x" * MAX_POLICY_TEXT),
    ],
)
def test_an_entry_reads_back_as_it_was_put(store: Store, stored: Entry) -> None:
    store.put(stored)
    assert store.get(stored.domain) == stored
    # One entry held, no other: purging everything removes that one.
    assert store.purge_unused(math.inf) == 1


def test_put_replaces_the_entry_of_the_domain(store: Store) -> None:
    store.put(entry())
    newer = entry(record_id="2", policy_text=None, last_error="mode none", last_used=5.0)
    store.put(newer)
    assert store.get("example.com") == newer
    assert store.purge_unused(math.inf) == 1


def test_touch_moves_last_used_forward_only(store: Store) -> None:
    store.put(entry("a.example", last_used=100.0))
    store.put(entry("b.example", last_used=100.0))
    store.touch({"a.example": 200.0, "b.example": 50.0, "unknown.example": 300.0})
    store.touch({})
    assert store.get("a.example") == entry("a.example", last_used=200.0)
    assert store.get("b.example") == entry("b.example", last_used=100.0)
    assert store.get("unknown.example") is None


def test_purge_unused_deletes_entries_last_used_before_the_time(store: Store) -> None:
    for i in range(5):
        store.put(entry(f"d{i}.example", last_used=float(i)))
    assert store.purge_unused(3.0) == 3
    assert [d for i in range(5) if store.get(d := f"d{i}.example")] == ["d3.example", "d4.example"]
    assert store.purge_unused(3.0) == 0


def test_an_oversized_policy_text_is_refused(store: Store) -> None:
    with pytest.raises(StoreError, match=r"example\.com: policy text of 65537 characters"):
        store.put(entry(policy_text="x" * (MAX_POLICY_TEXT + 1)))
    assert store.get("example.com") is None


def test_a_closed_store_raises_store_error(store: Store) -> None:
    store.put(entry())
    store.close()
    store.close()
    for call in (
        lambda: store.get("example.com"),
        lambda: store.put(entry()),
        lambda: store.touch({"example.com": 1.0}),
        lambda: store.purge_unused(1.0),
    ):
        with pytest.raises(StoreError, match="closed"):
            call()


def test_threads_share_one_store(store: Store) -> None:
    errors: list[BaseException] = []

    def work(n: int) -> None:
        try:
            for i in range(100):
                domain = f"d{i}.t{n}.example"
                store.put(entry(domain, last_used=float(i)))
                assert store.get(domain) == entry(domain, last_used=float(i))
                store.touch({domain: 1e6})
                if i % 10 == 0:
                    store.purge_unused(-1.0)
        except BaseException as exc:
            errors.append(exc)

    threads = [threading.Thread(target=work, args=(n,)) for n in range(8)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert errors == []
    held = [store.get(f"d{i}.t{n}.example") for i in range(100) for n in range(8)]
    assert {e.last_used if e is not None else None for e in held} == {1e6}
    assert store.purge_unused(math.inf) == 800


def test_open_store_rejects_an_unknown_backend(cache_path: str) -> None:
    with pytest.raises(ValueError, match="mysql"):
        open_store("mysql", cache_path)


# --- every backend: what the cache commands and a fleet use ---------------------------------------


def test_delete_removes_the_entries_named_and_counts_them(store: Store) -> None:
    for domain in ("a.example", "b.example", "c.example"):
        store.put(entry(domain))
    assert store.delete(["a.example", "c.example", "unknown.example", "a.example"]) == 2
    assert [store.get(d) for d in ("a.example", "b.example", "c.example")] == [
        None,
        entry("b.example"),
        None,
    ]
    assert store.delete([]) == 0


def test_entries_gives_every_entry_in_domain_order(store: Store) -> None:
    domains = [f"d{n:04d}.example" for n in range(1200)]
    for n, domain in enumerate(reversed(domains)):
        store.put(entry(domain, policy_text=None if n % 3 else POLICY, last_used=float(n)))
    listed = list(store.entries())
    assert [e.domain for e in listed] == domains
    assert listed[0] == store.get(domains[0])
    assert list(open_store("memory", "").entries()) == []


def test_a_lease_has_one_holder_until_released_or_expired(store: Store) -> None:
    assert store.lease("a.example", "daemon-1", 30.0)
    assert not store.lease("a.example", "daemon-2", 30.0)
    # Its holder renews it; a lease on another domain is another lease.
    assert store.lease("a.example", "daemon-1", 30.0)
    assert store.lease("b.example", "daemon-2", 30.0)
    # Only the holder gives it up.
    store.release("a.example", "daemon-2")
    assert not store.lease("a.example", "daemon-2", 30.0)
    store.release("a.example", "daemon-1")
    assert store.lease("a.example", "daemon-2", 30.0)
    # A holder that never comes back blocks nobody for longer than its lease.
    assert store.lease("c.example", "crashed", 0.3)
    assert not store.lease("c.example", "daemon-1", 30.0)
    time.sleep(0.5)
    assert store.lease("c.example", "daemon-1", 30.0)


def test_a_closed_store_refuses_the_fleet_operations(store: Store) -> None:
    store.close()
    for call in (
        lambda: store.delete(["example.com"]),
        lambda: list(store.entries()),
        lambda: store.lease("example.com", "me", 1.0),
    ):
        with pytest.raises(StoreError, match="closed"):
            call()


def test_stores_on_one_namespace_share_entries_and_leases(open_shared: Opener) -> None:
    first, second = open_shared(), open_shared()
    assert first.shared and second.shared
    first.put(entry("a.example"))
    assert second.get("a.example") == entry("a.example")
    assert first.lease("a.example", "daemon-1", 30.0)
    assert not second.lease("a.example", "daemon-2", 30.0)
    assert second.delete(["a.example"]) == 1
    assert first.get("a.example") is None


def _changes(watcher: Watcher, wanted: set[str], within: float) -> tuple[set[str], float]:
    """What ``watcher`` reports until ``wanted`` is among it or ``within`` seconds passed, and
    when the last of it came (seconds after the call)."""
    started = time.monotonic()
    seen: set[str] = set()
    while not wanted <= seen and time.monotonic() - started < within:
        got = watcher.wait(0.2)
        assert got != ALL, "a watcher that never lost its connection reported ALL"
        seen |= set(got)
    return seen, time.monotonic() - started


def test_a_watcher_hears_of_the_changes_other_users_make(open_shared: Opener) -> None:
    writer, reader = open_shared(), open_shared()
    writer.put(entry("before.example"))
    watcher = reader.watch()
    try:
        # Changes made before the watcher existed are not news to it.
        assert watcher.wait(0.3) == frozenset()
        writer.put(entry("a.example"))
        writer.put(entry("b.example"))
        writer.delete(["before.example"])
        seen, took = _changes(watcher, {"a.example", "b.example", "before.example"}, 5.0)
        assert seen == {"a.example", "b.example", "before.example"}
        assert took < 2.0
        # The reader's own changes are not reported back to it.
        reader.put(entry("own.example"))
        reader.delete(["a.example"])
        writer.put(entry("c.example"))
        seen, _ = _changes(watcher, {"c.example"}, 5.0)
        assert seen == {"c.example"}
    finally:
        watcher.close()
        watcher.close()


def test_a_watcher_of_a_busy_store_misses_nothing(open_shared: Opener) -> None:
    writer, reader = open_shared(), open_shared()
    watcher = reader.watch()
    try:
        domains = {f"d{n}.example" for n in range(500)}
        for domain in sorted(domains):
            writer.put(entry(domain))
        seen, _ = _changes(watcher, domains, 10.0)
        assert seen == domains
    finally:
        watcher.close()


# --- SQLite: the file ----------------------------------------------------------------------------


def test_the_cache_survives_a_reopen(open_sqlite: Opener) -> None:
    first = open_sqlite()
    first.put(entry("a.example"))
    first.put(entry("b.example", policy_text=None))
    first.close()
    second = open_sqlite()
    assert [second.get("a.example"), second.get("b.example")] == [
        entry("a.example"),
        entry("b.example", policy_text=None),
    ]
    assert second.purge_unused(math.inf) == 2


def test_the_file_is_created_private_in_wal_mode(open_sqlite: Opener, cache_path: str) -> None:
    old_umask = os.umask(0o022)
    try:
        open_sqlite().put(entry())
    finally:
        os.umask(old_umask)
    assert stat.S_IMODE(os.stat(os.path.dirname(cache_path)).st_mode) == 0o750
    assert stat.S_IMODE(os.stat(cache_path).st_mode) == 0o640
    assert stat.S_IMODE(os.stat(cache_path + "-wal").st_mode) == 0o640
    raw = sqlite3.connect(cache_path)
    try:
        assert raw.execute("PRAGMA journal_mode").fetchone() == ("wal",)
        assert raw.execute("PRAGMA user_version").fetchone() == (SCHEMA_VERSION,)
    finally:
        raw.close()


def test_two_stores_on_one_file_see_each_others_writes(open_sqlite: Opener) -> None:
    one, two = open_sqlite(), open_sqlite()
    one.put(entry("a.example"))
    two.put(entry("b.example"))
    two.touch({"a.example": 5000.0})
    assert one.purge_unused(5000.0) == 1
    assert two.get("b.example") is None
    assert two.get("a.example") == entry("a.example", last_used=5000.0)
    assert one.get("a.example") == entry("a.example", last_used=5000.0)


def _write_from_process(path: str, n: int) -> None:
    s = open_store("sqlite", path, busy_timeout=30.0)
    for i in range(100):
        s.put(entry(f"d{i}.p{n}.example", last_used=float(i)))
        s.touch({f"shared{i}.example": 1e6 + n})
    s.close()


def test_several_processes_write_one_file(cache_path: str, open_sqlite: Opener) -> None:
    parent = open_sqlite()
    for i in range(100):
        parent.put(entry(f"shared{i}.example", last_used=float(i)))
    ctx = multiprocessing.get_context("fork")
    processes = [ctx.Process(target=_write_from_process, args=(cache_path, n)) for n in range(4)]
    for p in processes:
        p.start()
    for p in processes:
        p.join(60)
    assert [p.exitcode for p in processes] == [0, 0, 0, 0]
    assert all(parent.get(f"d{i}.p{n}.example") for i in range(100) for n in range(4))
    # Every process touched the shared rows; the latest time wins, whatever the order.
    shared = [parent.get(f"shared{i}.example") for i in range(100)]
    assert {e.last_used if e is not None else None for e in shared} == {1e6 + 3}
    assert parent.purge_unused(math.inf) == 500


def _open_new_file_at_once(path: str, n: int, barrier: Any) -> None:
    barrier.wait()
    s = open_store("sqlite", path, busy_timeout=30.0)
    s.put(entry(f"p{n}.example"))
    s.close()


def test_several_processes_create_one_new_file_at_once(
    cache_path: str, open_sqlite: Opener
) -> None:
    ctx = multiprocessing.get_context("fork")
    barrier = ctx.Barrier(8)
    processes = [
        ctx.Process(target=_open_new_file_at_once, args=(cache_path, n, barrier)) for n in range(8)
    ]
    for p in processes:
        p.start()
    for p in processes:
        p.join(60)
    assert [p.exitcode for p in processes] == [0] * 8
    s = open_sqlite()
    assert all(s.get(f"p{n}.example") == entry(f"p{n}.example") for n in range(8))
    assert s.purge_unused(math.inf) == 8


def test_a_file_of_garbage_is_refused_and_left_alone(tmp_path: Path) -> None:
    path = tmp_path / "cache.sqlite"
    garbage = bytes(range(256)) * 64
    path.write_bytes(garbage)
    with pytest.raises(ForeignFileError) as caught:
        open_store("sqlite", str(path))
    assert str(caught.value) == (
        f"{path}: not a postfix-mtasts cache (not a SQLite database); refusing to use or move it"
    )
    assert not isinstance(caught.value, CorruptStoreError)
    assert path.read_bytes() == garbage


def test_a_cache_with_damaged_pages_is_a_corrupt_store_error(
    open_sqlite: Opener, cache_path: str
) -> None:
    damaged_cache(cache_path)
    with pytest.raises(CorruptStoreError, match=rf"^{cache_path}: .*malformed"):
        open_sqlite()


def test_a_damaged_cache_moved_aside_gives_an_empty_cache(
    open_sqlite: Opener, cache_path: str
) -> None:
    damaged = damaged_cache(cache_path)
    with pytest.raises(CorruptStoreError):
        open_sqlite()
    aside = move_aside(cache_path)
    assert aside.startswith(f"{cache_path}.damaged-")
    assert Path(aside).read_bytes() == damaged
    fresh = open_sqlite()
    assert all(fresh.get(f"d{n}.example") is None for n in range(300))
    assert fresh.purge_unused(math.inf) == 0
    fresh.close()


def test_move_aside_of_a_missing_file_is_a_store_error(tmp_path: Path) -> None:
    with pytest.raises(StoreError, match="cannot move aside: No such file"):
        move_aside(str(tmp_path / "absent.sqlite"))


def test_a_sqlite_file_of_another_program_is_refused(tmp_path: Path) -> None:
    path = tmp_path / "other.sqlite"
    raw = sqlite3.connect(path)
    raw.execute("CREATE TABLE accounts (name TEXT)")
    raw.commit()
    raw.close()
    before = path.read_bytes()
    with pytest.raises(ForeignFileError, match="not a postfix-mtasts cache") as caught:
        open_store("sqlite", str(path))
    assert "tables accounts" in str(caught.value)
    assert path.read_bytes() == before
    assert not Path(f"{path}-wal").exists()


def test_a_sqlite_file_marked_by_another_program_is_refused(tmp_path: Path) -> None:
    path = tmp_path / "other.sqlite"
    raw = sqlite3.connect(path)
    raw.execute("PRAGMA application_id = 1234")
    raw.execute("CREATE TABLE entries (domain TEXT)")
    raw.commit()
    raw.close()
    with pytest.raises(ForeignFileError, match="application_id 0x4d2"):
        open_store("sqlite", str(path))


def test_a_cache_made_before_the_application_id_is_ours_and_gets_it(
    open_sqlite: Opener, cache_path: str
) -> None:
    s = open_sqlite()
    s.put(entry("old.example"))
    s.close()
    raw = sqlite3.connect(cache_path)
    raw.execute("PRAGMA application_id = 0")
    raw.commit()
    raw.close()
    s = open_sqlite()
    assert s.get("old.example") == entry("old.example")
    s.close()
    raw = sqlite3.connect(cache_path)
    assert raw.execute("PRAGMA application_id").fetchone()[0] == APPLICATION_ID
    raw.close()


def test_a_cache_of_a_newer_version_is_refused_and_left_alone(
    open_sqlite: Opener, cache_path: str
) -> None:
    open_sqlite().close()
    raw = sqlite3.connect(cache_path)
    raw.execute(f"PRAGMA user_version = {SCHEMA_VERSION + 1}")
    raw.commit()
    raw.close()
    before = Path(cache_path).read_bytes()
    with pytest.raises(
        StoreError,
        match=rf"^{cache_path}: written by a newer postfix-mtasts \(cache schema"
        rf" {SCHEMA_VERSION + 1}, this version knows {SCHEMA_VERSION}\)$",
    ) as caught:
        open_sqlite()
    assert not isinstance(caught.value, CorruptStoreError)
    assert Path(cache_path).read_bytes() == before


def tamper(cache_path: str, *, oversized: str, mistyped: str) -> None:
    """Write two rows into the cache file behind the store's back, as a tamperer would: one
    whose policy text is over the limit, one with a text where a time belongs."""
    raw = sqlite3.connect(cache_path)
    raw.execute(
        "INSERT INTO entries VALUES (?, 'x', ?, 1, 2, 3, 4, '', 0)",
        (oversized, "x" * (MAX_POLICY_TEXT + 1)),
    )
    raw.execute("INSERT INTO entries VALUES (?, 'x', 'p', 'soon', 2, 3, 4, '', 0)", (mistyped,))
    raw.commit()
    raw.close()


def test_tampered_rows_read_as_absent(open_sqlite: Opener, cache_path: str) -> None:
    s = open_sqlite()
    s.put(entry("good.example"))
    tamper(cache_path, oversized="huge.example", mistyped="typed.example")
    assert s.get("huge.example") is None
    assert s.get("typed.example") is None
    assert s.get("good.example") == entry("good.example")
    # The next put for such a domain overwrites the row.
    s.put(entry("huge.example"))
    assert s.get("huge.example") == entry("huge.example")


def test_a_locked_file_fails_writes_after_the_busy_timeout(
    open_sqlite: Opener, cache_path: str
) -> None:
    s = open_sqlite(busy_timeout=0.3)
    s.put(entry("a.example"))
    holder = sqlite3.connect(cache_path, isolation_level=None)
    holder.execute("BEGIN EXCLUSIVE")
    try:
        started = time.monotonic()
        with pytest.raises(StoreError, match=rf"^{cache_path}: cannot store b\.example: .*locked"):
            s.put(entry("b.example"))
        assert time.monotonic() - started >= 0.25
        with pytest.raises(StoreError, match="locked"):
            s.touch({"a.example": 2000.0})
        with pytest.raises(StoreError, match="locked"):
            s.purge_unused(1e9)
        # WAL: readers do not wait for the writer.
        assert s.get("a.example") == entry("a.example")
        # Nor does opening a file whose schema exists.
        open_sqlite(busy_timeout=0.3).get("a.example")
    finally:
        holder.execute("ROLLBACK")
        holder.close()
    s.put(entry("b.example"))
    s.touch({"a.example": 2000.0})
    assert s.get("a.example") == entry("a.example", last_used=2000.0)
    assert s.get("b.example") == entry("b.example")
    assert s.purge_unused(math.inf) == 2


@pytest.mark.parametrize(
    ("relative", "cause"),
    [
        ("file/cache.sqlite", "{tmp}/file: not a directory"),
        ("file/sub/cache.sqlite", "{tmp}/file/sub: Not a directory"),
    ],
)
def test_a_path_below_a_regular_file_is_a_store_error(
    tmp_path: Path, relative: str, cause: str
) -> None:
    (tmp_path / "file").write_text("")
    path = tmp_path / relative
    with pytest.raises(StoreError) as caught:
        open_store("sqlite", str(path))
    assert str(caught.value) == f"{path}: cannot open: {cause.format(tmp=tmp_path)}"


def test_a_directory_as_the_cache_file_is_a_store_error(tmp_path: Path) -> None:
    with pytest.raises(StoreError, match=rf"^{tmp_path}: cannot open: Is a directory"):
        open_store("sqlite", str(tmp_path))


def _open_unprivileged(path: str, results: Any) -> None:
    if os.geteuid() == 0:
        # root ignores file permissions: become nobody to meet them.
        nobody = pwd.getpwnam("nobody")
        os.setgroups([])
        os.setgid(nobody.pw_gid)
        os.setuid(nobody.pw_uid)
    try:
        open_store("sqlite", path).close()
        results.put("opened")
    except StoreError as exc:
        results.put(f"StoreError: {exc}")


@pytest.mark.parametrize(
    ("relative", "cause"),
    [
        ("cache.sqlite", "cannot open: Permission denied"),
        ("sub/cache.sqlite", "cannot open: {dir}/sub: Permission denied"),
    ],
)
def test_an_unwritable_place_is_a_store_error(relative: str, cause: str) -> None:
    # Under /tmp rather than tmp_path: the unprivileged user must be able to reach it.
    directory = tempfile.mkdtemp(prefix="postfix-mtasts-test-")
    try:
        readonly = os.path.join(directory, "readonly.sqlite")
        open_store("sqlite", readonly).close()
        os.chmod(readonly, 0o444)
        os.chmod(directory, 0o555)
        path = os.path.join(directory, relative)
        ctx = multiprocessing.get_context("fork")
        results = ctx.SimpleQueue()
        process = ctx.Process(target=_open_unprivileged, args=(path, results))
        process.start()
        process.join(30)
        assert process.exitcode == 0
        assert results.get() == f"StoreError: {path}: {cause.format(dir=directory)}"
    finally:
        os.chmod(directory, 0o755)
        shutil.rmtree(directory)


# --- SQLite: a fleet on one machine --------------------------------------------------------------


def test_a_version_1_cache_is_migrated_and_keeps_its_entries(
    open_sqlite: Opener, cache_path: str
) -> None:
    os.makedirs(os.path.dirname(cache_path))
    old = [entry("a.example"), entry("b.example", policy_text=None, last_used=7.0)]
    version_1_cache(cache_path, old)
    first, second = open_sqlite(), open_sqlite()
    assert [first.get("a.example"), first.get("b.example")] == old
    assert list(second.entries()) == old
    # The fleet's tables work on the migrated file.
    watcher = second.watch()
    try:
        first.put(entry("c.example"))
        assert _changes(watcher, {"c.example"}, 5.0)[0] == {"c.example"}
    finally:
        watcher.close()
    assert first.lease("a.example", "daemon-1", 30.0)
    assert not second.lease("a.example", "daemon-2", 30.0)
    raw = sqlite3.connect(cache_path)
    try:
        assert raw.execute("PRAGMA user_version").fetchone() == (SCHEMA_VERSION,)
        assert raw.execute("PRAGMA application_id").fetchone() == (APPLICATION_ID,)
    finally:
        raw.close()


def test_a_store_is_shared_and_names_its_file(open_sqlite: Opener, cache_path: str) -> None:
    one, two = open_sqlite(), open_sqlite()
    assert (one.shared, one.instant, one.where) == (True, False, cache_path)
    assert len(one.origin) == 16 and one.origin != two.origin


def test_a_change_reaches_a_watcher_within_the_poll_interval_and_a_read(
    open_sqlite: Opener,
) -> None:
    writer, reader = open_sqlite(), open_sqlite()
    watcher = reader.watch()
    try:
        delays = []
        for n in range(10):
            written = time.monotonic()
            writer.put(entry(f"d{n}.example"))
            assert watcher.wait(5.0) == frozenset({f"d{n}.example"})
            delays.append(time.monotonic() - written)
        # POLL_INTERVAL plus one read; loose, for a machine busy with other tests.
        assert sorted(delays)[5] < POLL_INTERVAL + 1.0
    finally:
        watcher.close()


def _put_from_process(path: str, domains: list[str]) -> None:
    s = open_store("sqlite", path, busy_timeout=30.0)
    for domain in domains:
        s.put(entry(domain))
    s.delete(domains[:1])
    s.close()


def test_a_watcher_hears_the_changes_of_another_process(
    open_sqlite: Opener, cache_path: str
) -> None:
    watcher = open_sqlite().watch()
    try:
        domains = [f"p{n}.example" for n in range(20)]
        process = multiprocessing.get_context("fork").Process(
            target=_put_from_process, args=(cache_path, domains)
        )
        process.start()
        seen, _ = _changes(watcher, set(domains), 30.0)
        process.join(30)
        assert process.exitcode == 0
        assert seen == set(domains)
    finally:
        watcher.close()


def test_the_change_log_stays_bounded(
    open_sqlite: Opener, cache_path: str, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setattr(sqlite_store, "KEEP_CHANGES", 40)
    monkeypatch.setattr(sqlite_store, "TRIM_EVERY", 16)
    one, two = open_sqlite(), open_sqlite()
    for n in range(300):
        (one if n % 2 else two).put(entry(f"d{n}.example"))
    one.delete([f"d{n}.example" for n in range(100)])
    raw = sqlite3.connect(cache_path)
    try:
        (count, newest) = raw.execute("SELECT count(*), max(seq) FROM changes").fetchone()
    finally:
        raw.close()
    assert newest == 400
    assert 40 <= count < 40 + 16 + 100


def test_a_watcher_that_fell_behind_the_trimmed_log_reports_all(
    open_sqlite: Opener, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setattr(sqlite_store, "KEEP_CHANGES", 40)
    monkeypatch.setattr(sqlite_store, "TRIM_EVERY", 16)
    writer, reader = open_sqlite(), open_sqlite()
    watcher = reader.watch()
    try:
        for n in range(100):
            writer.put(entry(f"d{n}.example"))
        assert watcher.wait(5.0) == ALL
        # From the newest row on, nothing is lost again.
        assert watcher.wait(0.3) == frozenset()
        writer.put(entry("later.example"))
        assert watcher.wait(5.0) == frozenset({"later.example"})
    finally:
        watcher.close()


def test_a_watcher_reads_a_long_log_in_batches_and_misses_nothing(open_sqlite: Opener) -> None:
    writer, reader = open_sqlite(), open_sqlite()
    watcher = reader.watch()
    try:
        domains = [f"d{n:04d}.example" for n in range(2500)]
        writer.delete(domains)
        batches: list[frozenset[str]] = []
        while len(seen := set().union(*batches)) < len(domains):
            got = watcher.wait(5.0)
            assert got != ALL and got
            batches.append(got)
        assert seen == set(domains)
        assert max(len(b) for b in batches) <= MAX_DOMAIN_NAMES
    finally:
        watcher.close()


def test_malformed_rows_in_the_change_log_are_ignored(open_sqlite: Opener, cache_path: str) -> None:
    writer, reader = open_sqlite(), open_sqlite()
    watcher = reader.watch()
    try:
        raw = sqlite3.connect(cache_path)
        raw.executemany(
            "INSERT INTO changes (domain, origin) VALUES (?, 'tamperer')",
            [("x" * 100000,), ("a" * 254,), (b"blob.example",), ("two names.example",), ("",)],
        )
        raw.commit()
        raw.close()
        writer.put(entry("good.example"))
        seen, _ = _changes(watcher, {"good.example"}, 5.0)
        assert seen == {"good.example"}
    finally:
        watcher.close()


def test_a_watcher_whose_file_was_replaced_raises_then_reports_all(
    open_sqlite: Opener, cache_path: str
) -> None:
    reader = open_sqlite()
    watcher = reader.watch()
    try:
        assert watcher.wait(0.2) == frozenset()
        # Another daemon found the file damaged, moved it aside and started a new cache.
        move_aside(cache_path)
        fresh = open_sqlite()
        with pytest.raises(
            StoreError, match=rf"^{cache_path}: cannot watch for changes: .*replaced"
        ):
            watcher.wait(1.0)
        assert watcher.wait(1.0) == ALL
        fresh.put(entry("new.example"))
        assert _changes(watcher, {"new.example"}, 5.0)[0] == {"new.example"}
        # A file that is gone: an error each time, until there is a file again.
        os.rename(cache_path, cache_path + ".gone")
        with pytest.raises(StoreError, match=rf"^{cache_path}: cannot watch for changes: "):
            watcher.wait(1.0)
        with pytest.raises(StoreError, match="No such file"):
            watcher.wait(1.0)
        os.rename(cache_path + ".gone", cache_path)
        assert watcher.wait(1.0) == ALL
    finally:
        watcher.close()


def test_a_closed_watcher_stops_waiting_and_refuses_to_wait_again(open_sqlite: Opener) -> None:
    watcher = open_sqlite().watch()
    closer = threading.Timer(0.3, watcher.close)
    closer.start()
    started = time.monotonic()
    assert watcher.wait(30.0) == frozenset()
    assert time.monotonic() - started < 10.0
    closer.join()
    with pytest.raises(StoreError, match="closed"):
        watcher.wait(0.1)
    watcher.close()


def test_a_closed_store_is_not_watched(open_sqlite: Opener, cache_path: str) -> None:
    s = open_sqlite()
    s.close()
    with pytest.raises(StoreError, match=rf"^{cache_path}: .*closed"):
        s.watch()


def test_expired_leases_do_not_pile_up(open_sqlite: Opener, cache_path: str) -> None:
    s = open_sqlite()
    for n in range(20):
        assert s.lease(f"d{n}.example", "crashed", 0.01)
    assert s.lease("held.example", "daemon-1", 300.0)
    time.sleep(0.1)
    s.purge_unused(0.0)
    raw = sqlite3.connect(cache_path)
    try:
        assert raw.execute("SELECT domain FROM leases").fetchall() == [("held.example",)]
    finally:
        raw.close()


def test_entries_skips_tampered_rows(open_sqlite: Opener, cache_path: str) -> None:
    s = open_sqlite()
    for n in range(3):
        s.put(entry(f"d{n}.example"))
    tamper(cache_path, oversized="d1a.example", mistyped="d1b.example")
    assert [e.domain for e in s.entries()] == ["d0.example", "d1.example", "d2.example"]


def _watch_unprivileged(path: str, results: Any) -> None:
    nobody = pwd.getpwnam("nobody")
    os.setgroups([])
    os.setgid(nobody.pw_gid)
    os.setuid(nobody.pw_uid)
    try:
        s = open_store("sqlite", path)
        results.put(("read_only", bool(getattr(s, "read_only", ""))))
        results.put(("get", s.get("a.example") == entry("a.example")))
        watcher = s.watch()
        results.put(("watching", True))
        results.put(("seen", sorted(_changes(watcher, {"b.example"}, 10.0)[0])))
        watcher.close()
        s.close()
    except StoreError as exc:
        results.put(("StoreError", str(exc)))


def test_a_store_opened_read_only_can_be_watched() -> None:
    # Under /tmp rather than tmp_path: the unprivileged user must be able to reach it.
    directory = tempfile.mkdtemp(prefix="postfix-mtasts-test-")
    try:
        path = os.path.join(directory, "cache.sqlite")
        writer = open_store("sqlite", path)
        writer.put(entry("a.example"))
        os.chmod(directory, 0o755)
        for suffix in ("", "-wal", "-shm"):
            os.chmod(path + suffix, 0o644)
        ctx = multiprocessing.get_context("fork")
        results = ctx.SimpleQueue()
        process = ctx.Process(target=_watch_unprivileged, args=(path, results))
        process.start()
        got: dict[str, Any] = {}
        while "watching" not in got and "StoreError" not in got:
            key, value = results.get()
            got[key] = value
        writer.put(entry("b.example"))
        process.join(30)
        while not results.empty():
            key, value = results.get()
            got[key] = value
        writer.close()
        assert process.exitcode == 0
        assert got == {"read_only": True, "get": True, "watching": True, "seen": ["b.example"]}
    finally:
        shutil.rmtree(directory)


def _read_version_1_unprivileged(path: str, results: Any) -> None:
    nobody = pwd.getpwnam("nobody")
    os.setgroups([])
    os.setgid(nobody.pw_gid)
    os.setuid(nobody.pw_uid)
    try:
        s = open_store("sqlite", path)
        results.put(s.get("a.example") == entry("a.example"))
        s.close()
    except StoreError as exc:
        results.put(f"StoreError: {exc}")


def test_a_version_1_cache_that_cannot_be_written_is_still_read() -> None:
    directory = tempfile.mkdtemp(prefix="postfix-mtasts-test-")
    try:
        path = os.path.join(directory, "cache.sqlite")
        version_1_cache(path, [entry("a.example")])
        os.chmod(directory, 0o755)
        ctx = multiprocessing.get_context("fork")
        results = ctx.SimpleQueue()
        process = ctx.Process(target=_read_version_1_unprivileged, args=(path, results))
        process.start()
        process.join(30)
        assert process.exitcode == 0
        assert results.get() is True
        raw = sqlite3.connect(path)
        try:
            assert raw.execute("PRAGMA user_version").fetchone() == (1,)
        finally:
            raw.close()
    finally:
        shutil.rmtree(directory)
