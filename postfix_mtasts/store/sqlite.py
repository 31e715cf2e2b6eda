"""The SQLite store: the default cache, one file that survives restarts.

Several daemon processes may share the file: it runs in WAL mode (readers never wait for the
writer), every write is one statement or one short `BEGIN IMMEDIATE` transaction, and a writer that
finds the file locked retries for `busy_timeout` seconds before it fails. `synchronous = NORMAL`
is enough for a cache: a power cut may lose the last writes, never the file, and a lost write costs
one lookup.

Threads share one connection behind a lock (`check_same_thread=False`) rather than one connection
per thread: the store is off the hot path (policydb answers cached domains from memory and writes
after lookups), each statement takes microseconds, and one connection is closed, reopened and
accounted for in one place, where per-thread connections would outlive their pool's threads.

Open the store in the process that uses it (after `--daemon` detached and dropped privileges): a
SQLite connection must not cross a fork.

Failures: every sqlite3 or OS error becomes StoreError("<file>: <what>: <cause>"); a damaged file
or one that is not a cache is CorruptStoreError, found when opening (`PRAGMA quick_check`) or at
the first read that meets the damage. The store never deletes a file; `move_aside()` renames a
damaged one so that the next open starts an empty cache, if the caller chooses to.
"""

from __future__ import annotations

import os
import sqlite3
import threading
import time
from collections.abc import Iterator, Mapping
from contextlib import contextmanager, suppress

from postfix_mtasts.store import MAX_POLICY_TEXT, CorruptStoreError, Entry, StoreError, check_entry

__all__ = ["SCHEMA_VERSION", "SqliteStore", "move_aside"]

# PRAGMA user_version of the file. Raise it with a migration in _create_or_migrate().
SCHEMA_VERSION = 1

_COLUMNS = (
    "domain",
    "record_id",
    "policy_text",
    "fetched_at",
    "expires_at",
    "checked_at",
    "last_used",
    "last_error",
    "backoff_until",
)
_SELECT = (
    f"SELECT {', '.join(_COLUMNS)} FROM entries"
    # Rows a damaged or tampered file holds with an oversized text are not read into memory; they
    # count as absent, so the domain is looked up again and its next put() overwrites the row.
    f" WHERE (policy_text IS NULL OR length(policy_text) <= {MAX_POLICY_TEXT})"
)
_UPSERT = (
    f"INSERT INTO entries ({', '.join(_COLUMNS)}) VALUES ({', '.join('?' * len(_COLUMNS))})"
    " ON CONFLICT(domain) DO UPDATE SET "
    + ", ".join(f"{column} = excluded.{column}" for column in _COLUMNS[1:])
)


class SqliteStore:
    def __init__(self, path: str, *, busy_timeout: float = 5.0) -> None:
        self.path = path
        self._lock = threading.Lock()
        self._create_file()
        try:
            self._db: sqlite3.Connection | None = sqlite3.connect(
                path, timeout=busy_timeout, isolation_level=None, check_same_thread=False
            )
        except sqlite3.Error as exc:
            raise self._error("cannot open", exc) from exc
        try:
            self._prepare_when_free(self._db, busy_timeout)
        except BaseException as exc:
            self._db.close()
            if isinstance(exc, sqlite3.Error):
                raise self._error("cannot open", exc) from exc
            raise

    def _create_file(self) -> None:
        # The directory 0750 and the file 0640 (SQLite gives its -wal and -shm files the file's
        # mode): a cache names every domain the server sends mail to.
        directory = os.path.dirname(os.path.abspath(self.path))
        try:
            os.makedirs(directory, mode=0o750, exist_ok=True)
        except FileExistsError as exc:
            # makedirs' word for "a part of the path is a file".
            raise StoreError(f"{self.path}: cannot open: {directory}: not a directory") from exc
        except OSError as exc:
            raise self._os_error(exc) from exc
        try:
            # Opening for writing here turns a file the daemon may only read into an error now;
            # SQLite would open it read-only and fail at the first write.
            os.close(os.open(self.path, os.O_RDWR | os.O_CREAT | os.O_CLOEXEC, 0o640))
        except OSError as exc:
            raise self._os_error(exc) from exc

    def _os_error(self, exc: OSError) -> StoreError:
        where = f"{exc.filename}: " if exc.filename and exc.filename != self.path else ""
        return StoreError(f"{self.path}: cannot open: {where}{exc.strerror or exc}")

    def _prepare_when_free(self, db: sqlite3.Connection, busy_timeout: float) -> None:
        # Switching a new file to WAL takes an exclusive lock, and SQLite reports a competing
        # switch by another process as "database is locked" at once, without waiting for the
        # busy timeout: wait for it here.
        deadline = time.monotonic() + busy_timeout
        while True:
            try:
                self._prepare(db)
                return
            except sqlite3.OperationalError as exc:
                if exc.sqlite_errorcode != sqlite3.SQLITE_BUSY or time.monotonic() >= deadline:
                    raise
            time.sleep(0.02)

    def _prepare(self, db: sqlite3.Connection) -> None:
        # The first statement reads the header: a file that is not SQLite fails here (NOTADB).
        db.execute("PRAGMA journal_mode = WAL")
        db.execute("PRAGMA synchronous = NORMAL")
        problems = [row[0] for row in db.execute("PRAGMA quick_check")]
        if problems != ["ok"]:
            raise CorruptStoreError(f"{self.path}: damaged: {'; '.join(problems[:3])}")
        version = db.execute("PRAGMA user_version").fetchone()[0]
        if version != SCHEMA_VERSION:
            self._create_or_migrate(db)

    def _create_or_migrate(self, db: sqlite3.Connection) -> None:
        # IMMEDIATE: two daemons starting on a new file create the schema once, one after the other.
        db.execute("BEGIN IMMEDIATE")
        try:
            version = db.execute("PRAGMA user_version").fetchone()[0]
            if version == 0:
                tables = db.execute("SELECT count(*) FROM sqlite_master").fetchone()[0]
                if tables:
                    raise CorruptStoreError(
                        f"{self.path}: not a postfix-mtasts cache (a SQLite file with other tables)"
                    )
                db.execute(
                    """CREATE TABLE entries (
                        domain TEXT PRIMARY KEY NOT NULL,
                        record_id TEXT,
                        policy_text TEXT,
                        fetched_at REAL,
                        expires_at REAL,
                        checked_at REAL,
                        last_used REAL NOT NULL,
                        last_error TEXT NOT NULL DEFAULT '',
                        backoff_until REAL NOT NULL DEFAULT 0
                    )"""
                )
                db.execute("CREATE INDEX entries_last_used ON entries (last_used)")
                db.execute(f"PRAGMA user_version = {SCHEMA_VERSION}")
            elif version > SCHEMA_VERSION:
                raise StoreError(
                    f"{self.path}: written by a newer postfix-mtasts (cache schema {version},"
                    f" this version knows {SCHEMA_VERSION})"
                )
            db.execute("COMMIT")
        except BaseException:
            if db.in_transaction:
                db.execute("ROLLBACK")
            raise

    def _error(self, doing: str, exc: sqlite3.Error) -> StoreError:
        name = getattr(exc, "sqlite_errorname", "")
        damaged = name.startswith(("SQLITE_CORRUPT", "SQLITE_NOTADB"))
        return (CorruptStoreError if damaged else StoreError)(f"{self.path}: {doing}: {exc}")

    @contextmanager
    def _connection(self, doing: str) -> Iterator[sqlite3.Connection]:
        with self._lock:
            db = self._db
            if db is None:
                raise StoreError(f"{self.path}: {doing}: the store is closed")
            try:
                yield db
            except BaseException as exc:
                # Never leave a transaction open on the shared connection. SQLite may have rolled
                # back already; the original error is the one to report.
                if db.in_transaction:
                    with suppress(sqlite3.Error):
                        db.execute("ROLLBACK")
                if isinstance(exc, sqlite3.Error):
                    raise self._error(doing, exc) from exc
                raise

    def get(self, domain: str) -> Entry | None:
        with self._connection(f"cannot read {domain}") as db:
            row = db.execute(f"{_SELECT} AND domain = ?", (domain,)).fetchone()
        return None if row is None else _entry(row)

    def put(self, entry: Entry) -> None:
        check_entry(entry, self.path)
        with self._connection(f"cannot store {entry.domain}") as db:
            db.execute(_UPSERT, tuple(getattr(entry, column) for column in _COLUMNS))

    def delete(self, domain: str) -> None:
        with self._connection(f"cannot delete {domain}") as db:
            db.execute("DELETE FROM entries WHERE domain = ?", (domain,))

    def entries(self) -> list[Entry]:
        with self._connection("cannot read the cache") as db:
            rows = db.execute(_SELECT).fetchall()
        return [entry for entry in map(_entry, rows) if entry is not None]

    def touch(self, last_used: Mapping[str, float]) -> None:
        if not last_used:
            return
        with self._connection(f"cannot update last use of {len(last_used)} domains") as db:
            # One transaction: one commit for the batch instead of one per domain.
            db.execute("BEGIN IMMEDIATE")
            db.executemany(
                "UPDATE entries SET last_used = ?2 WHERE domain = ?1 AND last_used < ?2",
                last_used.items(),
            )
            db.execute("COMMIT")

    def purge_unused(self, before: float) -> int:
        with self._connection("cannot purge unused entries") as db:
            return db.execute("DELETE FROM entries WHERE last_used < ?", (before,)).rowcount

    def close(self) -> None:
        with self._lock:
            if self._db is not None:
                self._db.close()
                self._db = None


def _entry(row: tuple[object, ...]) -> Entry | None:
    """The row as an Entry, or None when a damaged or tampered file gave a field the wrong type
    (the row then counts as absent, like an oversized one)."""
    domain, record_id, policy_text, fetched_at, expires_at, checked_at, last_used, error, until = (
        row
    )
    if not (
        isinstance(domain, str)
        and isinstance(record_id, str | None)
        and isinstance(policy_text, str | None)
        and isinstance(fetched_at, float | None)
        and isinstance(expires_at, float | None)
        and isinstance(checked_at, float | None)
        and isinstance(last_used, float)
        and isinstance(error, str)
        and isinstance(until, float)
    ):
        return None
    return Entry(
        domain=domain,
        record_id=record_id,
        policy_text=policy_text,
        fetched_at=fetched_at,
        expires_at=expires_at,
        checked_at=checked_at,
        last_used=last_used,
        last_error=error,
        backoff_until=until,
    )


def move_aside(path: str) -> str:
    """Rename a damaged cache file (with its -wal and -shm files) to `<path>.damaged-<time>`, so the
    next open starts an empty cache and the old file stays for a postmaster to look at. Returns the
    new name of the file. Raises StoreError when the file cannot be renamed."""
    aside = f"{path}.damaged-{time.strftime('%Y%m%dT%H%M%S')}"
    try:
        os.rename(path, aside)
        for suffix in ("-wal", "-shm"):
            if os.path.exists(path + suffix):
                os.rename(path + suffix, aside + suffix)
    except OSError as exc:
        raise StoreError(f"{path}: cannot move aside: {exc.strerror or exc}") from exc
    return aside
