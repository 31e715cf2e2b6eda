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

Sharing (`shared = True`): the daemons of one machine share the file, and two tables serve them
besides `entries` (schema version 2; a version-1 file is migrated with its entries when opened for
writing, and read as it is when it can only be read). `changes` is a change log: each put and
delete adds a row (seq, domain, origin) in the same transaction as the write, and rows more than
`KEEP_CHANGES` behind the newest are deleted whenever the row numbers pass a multiple of
`TRIM_EVERY`, so it stays bounded. A watcher (`SqliteWatcher`) has a read-only connection of its
own and polls `PRAGMA data_version`, which moves when another connection commits, every
`POLL_INTERVAL` seconds; when it moved, the watcher reads the change log after the last row it
saw. So a change reaches a watcher within `POLL_INTERVAL` plus one read of the log. A watcher
that fell so far behind that rows it never saw were deleted reports `ALL`.
`leases` holds one row per leased domain (holder, expiry by `time.time()`: the daemons sharing a
file share the machine's clock); expired rows are deleted by `purge_unused` and now and then by
`lease`.

Open the store in the process that uses it (after `--daemon` detached and dropped privileges): a
SQLite connection must not cross a fork.

A file that cannot be written (a read-only directory or file system, a full disk) is opened for
reading: its policies are still answered, and writes fail with StoreError until the file can be
written again (tried again at most once a minute).

Failures: every sqlite3 or OS error becomes StoreError("<file>: <what>: <cause>"). A file that is
not a postfix-mtasts cache by its header or schema (a text file, another program's database) is
ForeignFileError and is never touched; a cache of ours that is damaged is CorruptStoreError, found
when opening (`PRAGMA quick_check`) or at the first read that meets the damage. The store never
deletes a file; `move_aside()` renames a damaged cache so that the next open starts an empty one,
if the caller chooses to.
"""

from __future__ import annotations

import errno
import os
import secrets
import sqlite3
import threading
import time
import urllib.parse
from collections.abc import Iterable, Iterator, Mapping, Sequence
from contextlib import contextmanager, suppress
from typing import Literal

from postfix_mtasts.store import (
    ALL,
    ENTRY_FIELDS,
    MAX_DOMAIN_NAMES,
    MAX_POLICY_TEXT,
    CorruptStoreError,
    Entry,
    ForeignFileError,
    StoreError,
    check_entry,
    entry_from_row,
    is_announced_name,
)

__all__ = [
    "APPLICATION_ID",
    "KEEP_CHANGES",
    "POLL_INTERVAL",
    "SCHEMA_VERSION",
    "SqliteStore",
    "SqliteWatcher",
    "check_ours",
    "move_aside",
]

# PRAGMA user_version of the file. Raise it with a migration in _create_or_migrate().
# 1: entries. 2: the change log and the leases of a fleet (changes, leases).
SCHEMA_VERSION = 2
# The versions whose entries this version reads from a file it cannot write (and so cannot
# migrate): the entries table is the same in all of them.
_READABLE_VERSIONS = (1, 2)
# The change log keeps about this many rows behind the newest; a watcher further behind than
# that reports ALL. Trimming is one indexed DELETE, done when a write's row number crosses a
# multiple of TRIM_EVERY (whichever process writes it), so not on every write.
KEEP_CHANGES = 10000
TRIM_EVERY = 256
# How often a watcher looks at PRAGMA data_version: the bound on how late it hears of a change,
# plus one read of the log.
POLL_INTERVAL = 0.1
# Rows of the change log a watcher reads at a time (a tampered log is read in bounded pieces).
_CHANGES_BATCH = MAX_DOMAIN_NAMES
# Entries read at a time by entries().
_ENTRIES_BATCH = 500
# Every this many lease() calls of a store, expired leases are deleted (purge_unused does too).
_LEASE_SWEEP_EVERY = 256
# A domain name in the change log is ignored unless it is this long at most (RFC 1035: 253
# characters in text form).
_MAX_DOMAIN = 253
# PRAGMA application_id of the file (the SQLite header's field for "which program's file is
# this", offset 68): "MTST". Files made before it was set are recognised by their schema.
APPLICATION_ID = 0x4D545354
# How long a file that looks damaged to a lock-free read is read again (check_ours).
DAMAGE_RECHECK = 1.0
# How often a store opened read-only tries to open its file for writing again.
WRITE_RETRY_INTERVAL = 60.0
_SQLITE_MAGIC = b"SQLite format 3\x00"
# Failures that mean "this file cannot be written here and now" (permissions, a read-only file
# system, a full disk, an I/O error): the file may still be read.
_CANNOT_WRITE = ("SQLITE_READONLY", "SQLITE_CANTOPEN", "SQLITE_FULL", "SQLITE_IOERR", "SQLITE_PERM")
_CANNOT_WRITE_ERRNOS = frozenset(
    {errno.EACCES, errno.EPERM, errno.EROFS, errno.ENOSPC, errno.EDQUOT, errno.EIO}
)


# Reading only: as usual, then (where the -shm file of a WAL cannot be made) as immutable.
_READ_ONLY_MODES = ("mode=ro", "mode=ro&immutable=1")


def _connect_read_only(path: str, mode: str, busy_timeout: float) -> sqlite3.Connection:
    uri = f"file:{urllib.parse.quote(os.path.abspath(path))}?{mode}"
    return sqlite3.connect(
        uri, uri=True, timeout=busy_timeout, isolation_level=None, check_same_thread=False
    )


class _CannotWrite(StoreError):
    """The file could not be opened for writing; reading it may still work."""


_COLUMNS = ENTRY_FIELDS
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
    """The cache file at ``path``, opened for reading and writing when it can be, else for reading
    only (``read_only``): a read-only directory or file system, or a full disk, still gives the
    daemon every policy the file holds. A read-only store tries to become writable again at most
    every ``WRITE_RETRY_INTERVAL`` seconds, when something is to be written."""

    # A read may wait for the disk or for another process's lock.
    instant = False
    # The daemons of one machine may share the file.
    shared = True

    def __init__(self, path: str, *, busy_timeout: float = 5.0) -> None:
        self.path = path
        self.where = path
        self.origin = secrets.token_hex(8)
        # Counts lease() calls, to delete expired leases now and then.
        self._leases_taken = 0
        self._busy_timeout = busy_timeout
        self._lock = threading.Lock()
        # Why the store is read-only ("" while it is writable), and when to try writing again.
        self.read_only = ""
        self._write_retry_at = 0.0
        check_ours(path)
        try:
            self._db: sqlite3.Connection | None = self._open_writable()
        except _CannotWrite as exc:
            if not os.path.isfile(path):
                raise
            # Read what can be read: a policy in the file must still be applied (RFC 8461 §5).
            self._db = self._open_read_only(exc)
            self.read_only = str(exc)
            self._write_retry_at = time.monotonic() + WRITE_RETRY_INTERVAL

    # -- opening ---------------------------------------------------------------------------------

    def _open_writable(self) -> sqlite3.Connection:
        self._create_file()
        try:
            db = sqlite3.connect(
                self.path, timeout=self._busy_timeout, isolation_level=None, check_same_thread=False
            )
        except sqlite3.Error as exc:
            raise self._error("cannot open", exc) from exc
        try:
            self._prepare_when_free(db, self._busy_timeout)
        except BaseException as exc:
            db.close()
            if isinstance(exc, sqlite3.Error):
                raise self._error("cannot open", exc) from exc
            raise
        return db

    def _open_read_only(self, why: StoreError) -> sqlite3.Connection:
        """The file opened for reading only. A WAL file needs its -shm file to be read; where that
        cannot be created (a read-only directory, a full disk), the file is read as immutable,
        which sees no later change by another process: better than no policies at all."""
        failure: StoreError | None = None
        for mode in _READ_ONLY_MODES:
            try:
                db = _connect_read_only(self.path, mode, self._busy_timeout)
            except sqlite3.Error as exc:
                failure = self._error("cannot open for reading", exc)
                continue
            try:
                self._check_read_only(db)
            except sqlite3.Error as exc:
                db.close()
                failure = self._error("cannot read", exc)
                if isinstance(failure, CorruptStoreError):
                    raise failure from exc
                continue
            except BaseException:
                db.close()
                raise
            return db
        assert failure is not None
        raise StoreError(f"{why}; {failure}") from failure

    def _check_read_only(self, db: sqlite3.Connection) -> None:
        # Only what reading needs: the file is ours, sound, and of a schema this version reads.
        self._check_ours(db)
        problems = [row[0] for row in db.execute("PRAGMA quick_check")]
        if problems != ["ok"]:
            raise CorruptStoreError(f"{self.path}: damaged: {'; '.join(problems[:3])}")
        version = db.execute("PRAGMA user_version").fetchone()[0]
        if version > SCHEMA_VERSION:
            raise self._newer(version)
        if version not in _READABLE_VERSIONS:
            raise StoreError(
                f"{self.path}: cache schema {version}, this version reads {SCHEMA_VERSION}"
                " (and cannot write the file to change it)"
            )

    def _newer(self, version: int) -> StoreError:
        return StoreError(
            f"{self.path}: written by a newer postfix-mtasts (cache schema {version},"
            f" this version knows {SCHEMA_VERSION})"
        )

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
        kind = _CannotWrite if exc.errno in _CANNOT_WRITE_ERRNOS else StoreError
        return kind(f"{self.path}: cannot open: {where}{exc.strerror or exc}")

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
        # Whose file it is comes first: a file that is not ours is not touched, not even by the
        # switch to WAL. (A file that is not SQLite at all was refused by check_ours().)
        self._check_ours(db)
        # A newer version's file is not written at all, not even by the switch to WAL.
        version = db.execute("PRAGMA user_version").fetchone()[0]
        if version > SCHEMA_VERSION:
            raise self._newer(version)
        db.execute("PRAGMA journal_mode = WAL")
        db.execute("PRAGMA synchronous = NORMAL")
        problems = [row[0] for row in db.execute("PRAGMA quick_check")]
        if problems != ["ok"]:
            raise CorruptStoreError(f"{self.path}: damaged: {'; '.join(problems[:3])}")
        application_id = db.execute("PRAGMA application_id").fetchone()[0]
        if version != SCHEMA_VERSION or application_id != APPLICATION_ID:
            self._create_or_migrate(db)

    def _check_ours(self, db: sqlite3.Connection) -> None:
        _judge(db, self.path)

    def _create_or_migrate(self, db: sqlite3.Connection) -> None:
        # IMMEDIATE: two daemons starting on a new file create the schema once, one after the other.
        db.execute("BEGIN IMMEDIATE")
        try:
            version = db.execute("PRAGMA user_version").fetchone()[0]
            if version == 0:
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
            elif version > SCHEMA_VERSION:
                # Another process upgraded the file since _prepare() looked.
                raise self._newer(version)
            if version < 2:
                # Version 1 to 2 keeps every entry: the fleet's tables are added beside them.
                # AUTOINCREMENT: a row number is never used twice, so a watcher's position in
                # the log stays valid when the newest rows are deleted.
                db.execute(
                    """CREATE TABLE changes (
                        seq INTEGER PRIMARY KEY AUTOINCREMENT,
                        domain TEXT NOT NULL,
                        origin TEXT NOT NULL
                    )"""
                )
                db.execute(
                    """CREATE TABLE leases (
                        domain TEXT PRIMARY KEY NOT NULL,
                        holder TEXT NOT NULL,
                        expires REAL NOT NULL
                    )"""
                )
            if version < SCHEMA_VERSION:
                db.execute(f"PRAGMA user_version = {SCHEMA_VERSION}")
            # Marks the file as ours in its header, where check_ours() reads it.
            db.execute(f"PRAGMA application_id = {APPLICATION_ID}")
            db.execute("COMMIT")
        except BaseException:
            if db.in_transaction:
                db.execute("ROLLBACK")
            raise

    def _error(self, doing: str, exc: sqlite3.Error) -> StoreError:
        name = getattr(exc, "sqlite_errorname", "")
        kind: type[StoreError] = StoreError
        if name.startswith(("SQLITE_CORRUPT", "SQLITE_NOTADB")):
            kind = CorruptStoreError
        elif name.startswith(_CANNOT_WRITE):
            kind = _CannotWrite
        return kind(f"{self.path}: {doing}: {exc}")

    @contextmanager
    def _connection(self, doing: str, *, writing: bool = False) -> Iterator[sqlite3.Connection]:
        with self._lock:
            db = self._db
            if db is None:
                raise StoreError(f"{self.path}: {doing}: the store is closed")
            if writing and self.read_only:
                db = self._writable_again(doing)
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

    def _writable_again(self, doing: str) -> sqlite3.Connection:
        """The connection of a read-only store reopened for writing, when the retry interval
        has passed and the file can now be written; else StoreError (the lock is held)."""
        now = time.monotonic()
        if now < self._write_retry_at:
            raise StoreError(f"{self.path}: {doing}: opened read-only ({self.read_only})")
        self._write_retry_at = now + WRITE_RETRY_INTERVAL
        try:
            db = self._open_writable()
        except StoreError as exc:
            self.read_only = str(exc)
            raise StoreError(f"{self.path}: {doing}: opened read-only ({exc})") from exc
        assert self._db is not None
        self._db.close()
        self._db = db
        self.read_only = ""
        return db

    def get(self, domain: str) -> Entry | None:
        with self._connection(f"cannot read {domain}") as db:
            row = db.execute(f"{_SELECT} AND domain = ?", (domain,)).fetchone()
        return None if row is None else entry_from_row(row)

    def put(self, entry: Entry) -> None:
        check_entry(entry, self.path)
        with self._connection(f"cannot store {entry.domain}", writing=True) as db:
            db.execute("BEGIN IMMEDIATE")
            db.execute(_UPSERT, tuple(getattr(entry, column) for column in _COLUMNS))
            self._announce(db, (entry.domain,))
            db.execute("COMMIT")

    def delete(self, domains: Iterable[str]) -> int:
        names = sorted(set(domains))
        doing = f"cannot delete {len(names)} domains"
        if not names:
            with self._connection(doing):
                return 0
        with self._connection(doing, writing=True) as db:
            db.execute("BEGIN IMMEDIATE")
            deleted = sum(
                db.execute("DELETE FROM entries WHERE domain = ?", (name,)).rowcount
                for name in names
            )
            # Every name is announced, held here or not: another daemon may hold in memory a
            # domain whose entry this file lost, and `cache forget` must reach it too.
            self._announce(db, names)
            db.execute("COMMIT")
        return deleted

    def _announce(self, db: sqlite3.Connection, domains: Sequence[str]) -> None:
        """Log the change of ``domains`` for the watchers, in the caller's transaction, and
        trim the log when its row numbers crossed a multiple of TRIM_EVERY."""
        newest = 0
        for domain in domains:
            newest = (
                db.execute(
                    "INSERT INTO changes (domain, origin) VALUES (?, ?)", (domain, self.origin)
                ).lastrowid
                or 0
            )
        if (newest - len(domains)) // TRIM_EVERY != newest // TRIM_EVERY:
            db.execute("DELETE FROM changes WHERE seq <= ?", (newest - KEEP_CHANGES,))

    def entries(self) -> Iterator[Entry]:
        after: object = None
        while True:
            # One batch at a time, the lock held only while it is read: a long listing does not
            # stop the daemon's reads and writes.
            with self._connection("cannot list entries") as db:
                if after is None:
                    rows = db.execute(
                        f"{_SELECT} ORDER BY domain LIMIT ?", (_ENTRIES_BATCH,)
                    ).fetchall()
                else:
                    rows = db.execute(
                        f"{_SELECT} AND domain > ? ORDER BY domain LIMIT ?",
                        (after, _ENTRIES_BATCH),
                    ).fetchall()
            for row in rows:
                found = entry_from_row(row)
                if found is not None:
                    yield found
            if len(rows) < _ENTRIES_BATCH:
                return
            after = rows[-1][0]

    def lease(self, domain: str, holder: str, seconds: float) -> bool:
        # time.time(): the daemons sharing the file share the machine's clock.
        now = time.time()
        with self._connection(f"cannot take the lease on {domain}", writing=True) as db:
            self._leases_taken += 1
            if self._leases_taken % _LEASE_SWEEP_EVERY == 0:
                db.execute("DELETE FROM leases WHERE expires <= ?", (now,))
            # One statement: taking, renewing and refusing cannot interleave with another
            # process's. The update only happens for the holder, or over an expired lease.
            return (
                db.execute(
                    "INSERT INTO leases (domain, holder, expires) VALUES (?1, ?2, ?3)"
                    " ON CONFLICT(domain) DO UPDATE SET"
                    " holder = excluded.holder, expires = excluded.expires"
                    " WHERE leases.holder = excluded.holder OR leases.expires <= ?4",
                    (domain, holder, now + seconds, now),
                ).rowcount
                == 1
            )

    def release(self, domain: str, holder: str) -> None:
        with self._connection(f"cannot release the lease on {domain}", writing=True) as db:
            db.execute("DELETE FROM leases WHERE domain = ? AND holder = ?", (domain, holder))

    def watch(self) -> SqliteWatcher:
        with self._connection("cannot watch for changes"):
            pass  # a closed store is not watched
        return SqliteWatcher(self.path, self.origin, busy_timeout=self._busy_timeout)

    def touch(self, last_used: Mapping[str, float]) -> None:
        if not last_used:
            return
        with self._connection(
            f"cannot update last use of {len(last_used)} domains", writing=True
        ) as db:
            # One transaction: one commit for the batch instead of one per domain.
            db.execute("BEGIN IMMEDIATE")
            db.executemany(
                "UPDATE entries SET last_used = ?2 WHERE domain = ?1 AND last_used < ?2",
                last_used.items(),
            )
            db.execute("COMMIT")

    def purge_unused(self, before: float, without_policy_before: float | None = None) -> int:
        negative = before if without_policy_before is None else max(before, without_policy_before)
        with self._connection("cannot purge unused entries", writing=True) as db:
            db.execute("DELETE FROM leases WHERE expires <= ?", (time.time(),))
            return db.execute(
                "DELETE FROM entries WHERE last_used < ?"
                " OR (policy_text IS NULL AND last_used < ?)",
                (before, negative),
            ).rowcount

    def close(self) -> None:
        with self._lock:
            if self._db is not None:
                self._db.close()
                self._db = None


class SqliteWatcher:
    """The changes other stores made to the file at ``path``, read from its change log by a
    read-only connection of the watcher's own (so a store opened read-only can be watched too).

    ``wait`` looks at ``PRAGMA data_version`` every ``POLL_INTERVAL`` seconds and reads the log
    after the last row it saw when it moved, skipping the rows of ``origin`` (its own store's)
    and rows that are not a domain name. The "connection" is lost when reading fails or the file
    at ``path`` is no longer the one opened (moved aside, deleted, replaced): ``wait`` raises
    StoreError, and the next ``wait`` opens the file again (waiting for a lock at most
    ``busy_timeout`` seconds) and returns ``ALL``."""

    def __init__(self, path: str, origin: str, *, busy_timeout: float = 5.0) -> None:
        self.path = path
        self.origin = origin
        self._busy_timeout = busy_timeout
        self._lock = threading.Lock()
        self._closed = threading.Event()
        self._db: sqlite3.Connection | None = None
        # The file opened (st_dev, st_ino), PRAGMA data_version when last read, and the last row
        # of the log seen (None: the file has no log, a version-1 cache read only).
        self._file = (0, 0)
        self._data_version = 0
        self._position: int | None = None
        # The last read filled a batch: more rows wait, read them without waiting.
        self._more = False
        with self._lock:
            self._connect()

    def wait(self, timeout: float) -> frozenset[str] | Literal["all"]:
        if self._closed.is_set():
            raise StoreError(f"{self.path}: cannot watch for changes: the watcher is closed")
        deadline = time.monotonic() + timeout
        with self._lock:
            if self._closed.is_set():
                return frozenset()
            if self._db is None:
                self._connect()
                # Changes made while the file could not be read were not seen.
                return ALL
        while True:
            with self._lock:
                if self._db is None:
                    # Closed by another thread while this one slept.
                    return frozenset()
                changed = self._poll(self._db)
            if changed:
                return changed
            remaining = deadline - time.monotonic()
            if remaining <= 0:
                return frozenset()
            if not self._more and self._closed.wait(min(POLL_INTERVAL, remaining)):
                return frozenset()

    def close(self) -> None:
        self._closed.set()
        with self._lock:
            if self._db is not None:
                self._db.close()
                self._db = None

    def _connect(self) -> None:
        """Open the file for reading, starting at the newest row of its log (the lock is
        held). As the store's reading does, fall back to reading it as immutable where its
        -shm file cannot be made: such a watcher never hears of a change."""
        failure: StoreError | None = None
        for mode in _READ_ONLY_MODES:
            try:
                stat = os.stat(self.path)
                db = _connect_read_only(self.path, mode, self._busy_timeout)
            except OSError as exc:
                raise StoreError(
                    f"{self.path}: cannot watch for changes: {exc.strerror or exc}"
                ) from exc
            except sqlite3.Error as exc:
                failure = StoreError(f"{self.path}: cannot watch for changes: {exc}")
                continue
            try:
                _judge(db, self.path)
                version = db.execute("PRAGMA user_version").fetchone()[0]
                if version > SCHEMA_VERSION:
                    raise StoreError(
                        f"{self.path}: written by a newer postfix-mtasts (cache schema"
                        f" {version}, this version knows {SCHEMA_VERSION})"
                    )
                # data_version first: a commit between the two reads is read again, not lost.
                self._data_version = db.execute("PRAGMA data_version").fetchone()[0]
                self._position = _newest_change(db)
            except sqlite3.Error as exc:
                db.close()
                failure = StoreError(f"{self.path}: cannot watch for changes: {exc}")
                continue
            except BaseException:
                db.close()
                raise
            self._db = db
            self._file = (stat.st_dev, stat.st_ino)
            self._more = False
            return
        assert failure is not None
        raise failure

    def _poll(self, db: sqlite3.Connection) -> frozenset[str] | Literal["all"]:
        """What changed since the last poll (empty when nothing did); on a failure the
        connection is dropped and StoreError raised (the lock is held)."""
        try:
            try:
                stat = os.stat(self.path)
            except OSError as exc:
                raise StoreError(
                    f"{self.path}: cannot watch for changes: {exc.strerror or exc}"
                ) from exc
            if (stat.st_dev, stat.st_ino) != self._file:
                raise StoreError(
                    f"{self.path}: cannot watch for changes: the file was replaced"
                    " (moved, deleted or created anew)"
                )
            data_version = db.execute("PRAGMA data_version").fetchone()[0]
            if data_version == self._data_version and not self._more:
                return frozenset()
            self._data_version = data_version
            return self._read_changes(db)
        except BaseException as exc:
            self._db = None
            db.close()
            if isinstance(exc, sqlite3.Error):
                raise StoreError(f"{self.path}: cannot watch for changes: {exc}") from exc
            raise

    def _read_changes(self, db: sqlite3.Connection) -> frozenset[str] | Literal["all"]:
        position = self._position
        if position is None:
            # A file without a log (a version-1 cache) moved: anything may have changed. Once a
            # newer daemon migrated it, the log is read from its newest row on.
            self._position = _newest_change(db)
            return ALL
        rows = db.execute(
            # Only names of a bounded length are read into memory; others read as NULL.
            "SELECT seq, CASE WHEN typeof(domain) = 'text' AND length(domain) <= ?"
            " THEN domain END, origin = ? FROM changes WHERE seq > ? ORDER BY seq LIMIT ?",
            (_MAX_DOMAIN, self.origin, position, _CHANGES_BATCH),
        ).fetchall()
        self._more = len(rows) == _CHANGES_BATCH
        if not rows:
            return frozenset()
        if rows[0][0] != position + 1:
            # Rows this watcher never saw were trimmed away: it fell too far behind.
            self._more = False
            self._position = _newest_change(db)
            return ALL
        self._position = rows[-1][0]
        return frozenset(domain for _, domain, own in rows if not own and is_announced_name(domain))


def _newest_change(db: sqlite3.Connection) -> int | None:
    """The row number of the newest change ever logged in the file (0: none yet), or None
    when the file has no change log."""
    if (
        db.execute(
            "SELECT 1 FROM sqlite_master WHERE type = 'table' AND name = 'changes'"
        ).fetchone()
        is None
    ):
        return None
    # sqlite_sequence keeps the highest row number ever given, even when those rows are gone.
    newest = db.execute(
        "SELECT max(coalesce((SELECT max(seq) FROM changes), 0),"
        " coalesce((SELECT seq FROM sqlite_sequence WHERE name = 'changes'), 0))"
    ).fetchone()[0]
    return newest if isinstance(newest, int) else 0


def check_ours(path: str) -> None:
    """Raise ForeignFileError when the file at ``path`` exists and is not a postfix-mtasts cache:
    not a SQLite database at all, one another program marked as its own (application_id), or one
    with tables that are not ours. Changes nothing (the file is read as immutable: no lock, no
    -wal or -shm file); a missing or empty file is a cache to be created, and a file that cannot
    be read is left to the open to report.

    Read without locks, a file that another process is checkpointing (copying its WAL into the
    file) can look damaged for a moment: a file that looks damaged is read again for up to
    DAMAGE_RECHECK seconds before it is called damaged."""
    deadline = time.monotonic() + DAMAGE_RECHECK
    while True:
        damage = _damage(path)
        if damage is None:
            return
        if time.monotonic() >= deadline:
            raise ForeignFileError(
                f"{path}: not a postfix-mtasts cache (a damaged SQLite file without our mark:"
                f" {damage}); refusing to use or move it"
            )
        time.sleep(0.05)


def _damage(path: str) -> str | None:
    """What makes the unmarked SQLite file at ``path`` unreadable, or None when it reads (and
    is ours, or empty, or missing); ForeignFileError when it is somebody else's."""
    try:
        with open(path, "rb") as file:
            header = file.read(100)
    except (OSError, ValueError):
        # ValueError: a name the file system cannot encode (a lone surrogate); no such file.
        return None
    if not header:
        return None
    if len(header) < 100 or not header.startswith(_SQLITE_MAGIC):
        raise ForeignFileError(
            f"{path}: not a postfix-mtasts cache (not a SQLite database); refusing to use or"
            " move it"
        )
    application_id = int.from_bytes(header[68:72], "big")
    if application_id == APPLICATION_ID:
        return None  # ours by its header, whatever state the rest is in
    if application_id != 0:
        raise ForeignFileError(
            f"{path}: not a postfix-mtasts cache (a SQLite database of another program,"
            f" application_id {application_id:#x}); refusing to use or move it"
        )
    uri = f"file:{urllib.parse.quote(os.path.abspath(path))}?mode=ro&immutable=1"
    try:
        db = sqlite3.connect(uri, uri=True)
    except sqlite3.Error:
        return None
    try:
        _judge(db, path)
    except sqlite3.Error as exc:
        # Unmarked and unreadable: nothing says it is ours, so it is not ours to move aside.
        if getattr(exc, "sqlite_errorname", "").startswith(("SQLITE_CORRUPT", "SQLITE_NOTADB")):
            return str(exc)
    finally:
        db.close()
    return None


def _judge(db: sqlite3.Connection, path: str) -> None:
    """Refuse a SQLite file that is not a postfix-mtasts cache (ForeignFileError)."""
    application_id = db.execute("PRAGMA application_id").fetchone()[0]
    if application_id == APPLICATION_ID:
        return
    if application_id != 0:
        raise ForeignFileError(
            f"{path}: not a postfix-mtasts cache (a SQLite database of another program,"
            f" application_id {application_id:#x}); refusing to use or move it"
        )
    tables = {row[0] for row in db.execute("SELECT name FROM sqlite_master")}
    if not tables:
        return  # an empty database: a new cache
    version = db.execute("PRAGMA user_version").fetchone()[0]
    # Caches written before the application_id was set: a schema version and our table.
    if version >= 1 and "entries" in tables:
        return
    raise ForeignFileError(
        f"{path}: not a postfix-mtasts cache (a SQLite database with tables"
        f" {', '.join(sorted(tables)[:5])}); refusing to use or move it"
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
