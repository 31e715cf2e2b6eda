"""The PostgreSQL store: one cache shared by a fleet of daemons, in three tables of a database
the operator already runs (psycopg 3 and its connection pool, the `postgresql` extra).

Layout (``TABLE`` is `cache.table`, by default ``postfix_mtasts_cache``):

- ``TABLE``: one row per policy domain, the fields of `Entry` (times as double precision Unix
  timestamps, as the daemon holds them), indexed on ``last_used`` for `purge_unused`;
- ``TABLE_leases``: who looks a domain up for the fleet (``holder``) and until when
  (``expires``, a timestamptz set and compared by the server's clock, so that the machines of a
  fleet need not agree on the time);
- ``TABLE_meta``: ``schema_version``, raised with a migration in `_create_or_migrate`. A table
  of a newer version is refused and never written to.

Two daemons starting at once create the tables once: the creation runs in one transaction
holding an advisory lock named after the table. The tables are created only when they are
missing, so an operator may create them in advance and grant the daemon's role nothing but
SELECT, INSERT, UPDATE and DELETE.

Changes are announced with ``pg_notify()`` on the channel ``TABLE_changes``, in the transaction
of the write itself: a watcher never hears of a change that was rolled back, nor misses one that
was committed while it listened. A payload is ``ORIGIN DOMAIN DOMAIN ...`` (ASCII, at most
`MAX_DOMAIN_NAMES` names, under PostgreSQL's 8000-byte limit for a payload; bigger batches are
split).

Connections: a pool of at most `POOL_SIZE` autocommit connections, and one more for each
watcher. Every connection attempt is bounded by libpq's ``connect_timeout`` (whole seconds, at
least 2: ``max(2, ceil(timeout))``), every statement by the server's ``statement_timeout``
(``timeout``), and the wait for a pooled connection by ``timeout``. A server that went away is
noticed by the first call that meets a dead connection; that call and the next ones try a
connection of their own, which fails at once while the server refuses connections, and once one
succeeds the pool drops its dead connections and the store works again, without a reopen.

psycopg has no client-side bound on a statement, and a server that accepts connections and then
never answers (a stopped process, a frozen machine) never runs its statement_timeout: a watchdog
thread shuts down the socket of a call that has had no answer for `ANSWER_GRACE` seconds past
``timeout``, which fails the call and discards its connection.

Bounded reads: a row whose text fields are longer than `MAX_POLICY_TEXT` characters (a tampered
table) is filtered out by the server and reads as absent, so it is never transferred; the next
put() for the domain overwrites it. A notification that is malformed or too long is ignored.
"""

from __future__ import annotations

import hashlib
import itertools
import math
import os
import re
import secrets
import socket
import threading
import time
from collections.abc import Callable, Iterable, Iterator, Mapping
from typing import Any, Literal, TypeVar

from postfix_mtasts.store import (
    ALL,
    DEFAULT_TABLE,
    ENTRY_FIELDS,
    MAX_POLICY_TEXT,
    Entry,
    ForeignFileError,
    NewerSchemaError,
    StoreError,
    announced,
    announcements,
    check_entry,
    entry_from_row,
    where_of,
)

try:
    import psycopg
    from psycopg import sql
    from psycopg.conninfo import conninfo_to_dict, make_conninfo
    from psycopg_pool import ConnectionPool, PoolTimeout
except ImportError as _exc:  # the optional extra is not installed
    _MISSING: ImportError | None = _exc
else:
    _MISSING = None

__all__ = ["POOL_SIZE", "SCHEMA_VERSION", "PostgresStore"]

# The value of schema_version in TABLE_meta. Raise it with a migration in _create_or_migrate().
SCHEMA_VERSION = 1
# The most pooled connections of one store: the daemon's store calls come from a small thread
# pool and take a round trip each, so more would only hold server processes idle.
POOL_SIZE = 4
# How many entries one round trip of entries() reads.
ENTRIES_BATCH = 500
# PostgreSQL refuses a NOTIFY payload of 8000 bytes or more.
MAX_PAYLOAD = 7999
# The table name config.py accepts (a PostgreSQL identifier, leaving room below the 63-byte
# limit for the suffixes of the other tables, the index and the channel).
_TABLE = re.compile(r"[a-z_][a-z0-9_]{0,47}")
# A dead peer (a machine gone without closing its connections) is noticed within about
# KEEPALIVE_IDLE + KEEPALIVE_INTERVAL * KEEPALIVE_COUNT seconds on an idle connection (the
# watcher's), and a write nobody acknowledges fails after DEAD_PEER seconds.
KEEPALIVE_IDLE = 5
KEEPALIVE_INTERVAL = 2
KEEPALIVE_COUNT = 3
DEAD_PEER = 10.0
# How long past the store's timeout a call waits for an answer before its connection is shut
# down: the server's statement_timeout (the store's timeout) fires first whenever the server
# runs at all, and leaves the connection usable.
ANSWER_GRACE = 1.0

_COLUMNS = ENTRY_FIELDS
_TEXT_COLUMNS = ("record_id", "policy_text", "last_error")

T = TypeVar("T")


class PostgresStore:
    """The cache in the table ``table`` (and its companions) of the PostgreSQL database named by
    ``url``: ``postgresql://USER[:PASSWORD]@HOST:PORT/DBNAME`` (or ``postgres://``), or a libpq
    connection string such as ``host=/run/postgresql dbname=mail user=postfix``. ``timeout``
    bounds every operation (connecting included, as far as libpq allows: see the module)."""

    instant = False
    shared = True

    def __init__(self, url: str, *, table: str = "", timeout: float = 1.0) -> None:
        table = table or DEFAULT_TABLE
        self.where = where_of("postgresql", "", url, table)
        self.origin = secrets.token_hex(8)
        self._timeout = timeout
        self._lock = threading.Lock()
        self._closed = False
        # True once a call met a dead connection or no connection at all: the next calls
        # connect by themselves (failing fast while the server is down) until one succeeds.
        self._down = False
        if _MISSING is not None:
            raise StoreError(
                f"{self.where}: cannot open: {_MISSING.name or 'psycopg'} is not installed"
                " (pip install 'postfix-mtasts[postgresql]')"
            )
        if not _TABLE.fullmatch(table):
            raise StoreError(
                f"{self.where}: cannot open: the table name must be lowercase letters, digits"
                " and '_' (at most 48, not starting with a digit)"
            )
        self._table = table
        self._conninfo, self._password = _conninfo(url, timeout, self.where)
        self._sql = _Statements(table)
        conn = self._connect("cannot open")
        try:
            self._create_or_migrate(conn)
        finally:
            conn.close()
        self._pool: ConnectionPool[psycopg.Connection[Any]] = ConnectionPool(
            self._conninfo,
            kwargs={"autocommit": True},
            min_size=1,
            max_size=POOL_SIZE,
            timeout=timeout,
            name=self.where,
            # The pool gives up reconnecting in the background soon: while the server is down,
            # the store's calls find out for themselves (and fast), see _run().
            reconnect_timeout=max(timeout, 1.0),
            num_workers=1,
            open=True,
        )

    def __repr__(self) -> str:
        return f"PostgresStore({self.where!r})"

    # -- connections ------------------------------------------------------------------------------

    def _scrub(self, text: str) -> str:
        # libpq does not quote passwords in its messages; this makes sure of it.
        return text.replace(self._password, "***") if self._password else text

    def _error(self, doing: str, exc: BaseException) -> StoreError:
        cause = re.sub(r"\s*\n\s*", "; ", str(exc).strip()) or type(exc).__name__
        return StoreError(self._scrub(f"{self.where}: {doing}: {cause}"))

    def _bounded(self, doing: str, conn: psycopg.Connection[Any], work: Callable[..., T]) -> T:
        """``work(conn)``, its connection shut down when the server does not answer in time."""
        bound = self._timeout + ANSWER_GRACE
        key = _WATCHDOG.watch(conn.pgconn.socket, bound)
        try:
            return work(conn)
        except psycopg.Error:
            if _WATCHDOG.done(key):
                raise StoreError(
                    f"{self.where}: {doing}: no answer from the server within {bound:g} s"
                ) from None
            raise
        finally:
            _WATCHDOG.done(key)

    def _connect(self, doing: str) -> psycopg.Connection[Any]:
        try:
            return psycopg.Connection.connect(self._conninfo, autocommit=True)
        except psycopg.Error as exc:
            raise self._error(doing, exc) from None

    def _run(self, doing: str, work: Callable[[psycopg.Connection[Any]], T]) -> T:
        """``work(connection)``, on a pooled connection, or on one of its own while the server
        is thought down; StoreError("<where>: <doing>: <cause>") when it fails. A call that meets
        a dead pooled connection (the server restarted since) is tried again once on a new
        connection: every statement of the store may be repeated without harm."""
        if self._closed:
            raise StoreError(f"{self.where}: {doing}: the store is closed")
        if not self._down:
            try:
                conn = self._pool.getconn(self._timeout)
            except PoolTimeout:
                self._down = True
                raise StoreError(
                    f"{self.where}: {doing}: no connection to the server within {self._timeout:g} s"
                ) from None
            except psycopg.Error as exc:  # the pool was closed meanwhile
                raise self._error(doing, exc) from None
            try:
                return self._bounded(doing, conn, work)
            except psycopg.Error as exc:
                if not conn.closed:
                    raise self._error(doing, exc) from None
                self._down = True
            except StoreError:
                self._down = True
                raise
            finally:
                self._pool.putconn(conn)
        conn = self._connect(doing)
        try:
            result = self._bounded(doing, conn, work)
        except psycopg.Error as exc:
            raise self._error(doing, exc) from None
        finally:
            conn.close()
        self._recovered()
        return result

    def _recovered(self) -> None:
        """The server answers again: drop the pool's dead connections, use the pool again."""
        with self._lock:
            if not self._down or self._closed:
                return
            self._down = False
            self._pool.check()

    def _create_or_migrate(self, conn: psycopg.Connection[Any]) -> None:
        version = self._schema_version(conn)
        if version == SCHEMA_VERSION:
            return
        try:
            with conn.transaction():
                # Two daemons meeting a new table at once: the second waits here, then finds
                # the tables made.
                conn.execute("SELECT pg_advisory_xact_lock(%s)", (_lock_key(self._table),))
                version = self._schema_version(conn)
                if version > SCHEMA_VERSION:
                    raise self._newer(version)
                if version == 0:
                    for statement in self._sql.create:
                        conn.execute(statement)
                    conn.execute(self._sql.set_version, (str(SCHEMA_VERSION),))
        except psycopg.Error as exc:
            raise self._error("cannot create the cache tables", exc) from None

    def _schema_version(self, conn: psycopg.Connection[Any]) -> int:
        """The schema version of the tables, 0 when there are none; refuses a newer one."""
        try:
            (exists,) = _one(conn.execute("SELECT to_regclass(%s)", (f"{self._table}_meta",)))
            if exists is None:
                return 0
            row = conn.execute(self._sql.get_version).fetchone()
        except psycopg.Error as exc:
            raise self._error("cannot read the schema version", exc) from None
        if row is None:
            return 0
        value = row[0]
        if not (isinstance(value, str) and value.isdigit() and len(value) < 10):
            raise ForeignFileError(
                f"{self.where}: cannot open: schema_version {str(value)[:20]!r} in"
                f" {self._table}_meta is not a version number"
            )
        if int(value) > SCHEMA_VERSION:
            raise self._newer(int(value))
        return int(value)

    def _newer(self, version: int) -> StoreError:
        return NewerSchemaError(
            f"{self.where}: written by a newer postfix-mtasts (cache schema {version},"
            f" this version knows {SCHEMA_VERSION})"
        )

    # -- the Store interface ----------------------------------------------------------------------

    def get(self, domain: str) -> Entry | None:
        def work(conn: psycopg.Connection[Any]) -> Entry | None:
            row = conn.execute(self._sql.get, (domain,)).fetchone()
            return None if row is None else entry_from_row(row)

        return self._run(f"cannot read {domain}", work)

    def put(self, entry: Entry) -> None:
        check_entry(entry, self.where)
        values = tuple(getattr(entry, column) for column in _COLUMNS)
        payloads = announcements(self.origin, [entry.domain], MAX_PAYLOAD)

        def work(conn: psycopg.Connection[Any]) -> None:
            # One statement, one transaction: the row and its announcement commit together.
            if payloads:
                conn.execute(self._sql.put_notify, (*values, self._sql.channel, payloads[0]))
            else:
                conn.execute(self._sql.put, values)

        self._run(f"cannot store {entry.domain}", work)

    def touch(self, last_used: Mapping[str, float]) -> None:
        if not last_used:
            return
        domains = sorted(last_used)
        times = [float(last_used[d]) for d in domains]

        def work(conn: psycopg.Connection[Any]) -> None:
            conn.execute(self._sql.touch, (domains, times))

        self._run(f"cannot update last use of {len(domains)} domains", work)

    def purge_unused(self, before: float, without_policy_before: float | None = None) -> int:
        negative = before if without_policy_before is None else max(before, without_policy_before)

        def work(conn: psycopg.Connection[Any]) -> int:
            count = conn.execute(self._sql.purge, (before, negative)).rowcount
            # Expired leases are only ever read to be replaced: they go with the unused entries.
            conn.execute(self._sql.purge_leases)
            return max(count, 0)

        return self._run("cannot purge unused entries", work)

    def delete(self, domains: Iterable[str]) -> int:
        wanted = sorted(set(domains))
        if not wanted:
            if self._closed:
                raise StoreError(f"{self.where}: cannot delete: the store is closed")
            return 0

        def work(conn: psycopg.Connection[Any]) -> int:
            with conn.transaction():
                rows = conn.execute(self._sql.delete, (wanted,)).fetchall()
                gone = [row[0] for row in rows]
                for payload in announcements(self.origin, gone, MAX_PAYLOAD):
                    conn.execute("SELECT pg_notify(%s, %s)", (self._sql.channel, payload))
            return len(gone)

        return self._run(f"cannot delete {len(wanted)} domains", work)

    def entries(self) -> Iterator[Entry]:
        if self._closed:
            raise StoreError(f"{self.where}: cannot list entries: the store is closed")
        return self._entries()

    def _entries(self) -> Iterator[Entry]:
        after = ""
        while True:

            def work(conn: psycopg.Connection[Any], after: str = after) -> list[Any]:
                return conn.execute(self._sql.entries, (after, ENTRIES_BATCH)).fetchall()

            rows = self._run("cannot list entries", work)
            for row in rows:
                entry = entry_from_row(row)
                if entry is not None:
                    yield entry
            if len(rows) < ENTRIES_BATCH:
                return
            after = rows[-1][0]

    def lease(self, domain: str, holder: str, seconds: float) -> bool:
        def work(conn: psycopg.Connection[Any]) -> bool:
            return conn.execute(self._sql.lease, (domain, holder, seconds)).fetchone() is not None

        return self._run(f"cannot take the lease on {domain}", work)

    def release(self, domain: str, holder: str) -> None:
        def work(conn: psycopg.Connection[Any]) -> None:
            conn.execute(self._sql.release, (domain, holder))

        self._run(f"cannot release the lease on {domain}", work)

    def watch(self) -> PostgresWatcher:
        if self._closed:
            raise StoreError(f"{self.where}: cannot watch for changes: the store is closed")
        return PostgresWatcher(self)

    def close(self) -> None:
        with self._lock:
            if self._closed:
                return
            self._closed = True
        self._pool.close(timeout=self._timeout)


class PostgresWatcher:
    """LISTEN on the store's channel, on a connection of its own (subscribed when made)."""

    def __init__(self, store: PostgresStore) -> None:
        self._store = store
        self._lock = threading.Lock()
        self._closed = False
        self._conn: psycopg.Connection[Any] | None = self._listen()

    def _listen(self) -> psycopg.Connection[Any]:
        store = self._store
        conn = store._connect("cannot watch for changes")
        try:
            conn.execute(sql.SQL("LISTEN {}").format(sql.Identifier(store._sql.channel)))
        except psycopg.Error as exc:
            conn.close()
            raise store._error("cannot watch for changes", exc) from None
        return conn

    def wait(self, timeout: float) -> frozenset[str] | Literal["all"]:
        with self._lock:
            if self._closed:
                raise StoreError(f"{self._store.where}: cannot watch for changes: closed")
            try:
                if self._conn is None:
                    # Changes made while the connection was down were not heard.
                    self._conn = self._listen()
                    return ALL
                return self._changes(self._conn, timeout)
            finally:
                if self._closed and self._conn is not None:
                    self._conn.close()
                    self._conn = None

    def _changes(self, conn: psycopg.Connection[Any], timeout: float) -> frozenset[str]:
        changed: set[str] = set()
        try:
            # The first batch within `timeout`, then whatever else already arrived. Each
            # generator is run to its end: one stopped early would drop the rest of its batch.
            for notify in conn.notifies(timeout=timeout, stop_after=1):
                changed |= announced(notify.payload, self._store.origin, MAX_PAYLOAD)
            for notify in conn.notifies(timeout=0.0):
                changed |= announced(notify.payload, self._store.origin, MAX_PAYLOAD)
        except psycopg.Error as exc:
            conn.close()
            self._conn = None
            raise self._store._error("lost the connection for changes", exc) from None
        return frozenset(changed)

    def close(self) -> None:
        self._closed = True
        # A wait() in progress closes the connection itself when it returns.
        if self._lock.acquire(blocking=False):
            try:
                if self._conn is not None:
                    self._conn.close()
                    self._conn = None
            finally:
                self._lock.release()


class _Watchdog:
    """Shuts down the socket of a call that outlived its bound, waking the thread blocked on it
    (psycopg then reports the connection lost). One thread for every store, started when first
    needed. A socket is touched only between watch() and done(), while its call holds it open."""

    def __init__(self) -> None:
        self._lock = threading.Condition()
        self._calls: dict[int, tuple[float, int]] = {}
        self._fired: set[int] = set()
        self._keys = itertools.count()
        self._thread: threading.Thread | None = None
        # When the thread wakes up next (inf: when told).
        self._wake_at = math.inf

    def watch(self, fd: int, seconds: float) -> int:
        deadline = time.monotonic() + seconds
        with self._lock:
            key = next(self._keys)
            self._calls[key] = (deadline, fd)
            if self._thread is None:
                self._thread = threading.Thread(
                    target=self._run, name="postgresql store watchdog", daemon=True
                )
                self._thread.start()
            if deadline < self._wake_at:
                self._lock.notify()
            return key

    def done(self, key: int) -> bool:
        """Forget the call; True when its socket was shut down."""
        with self._lock:
            self._calls.pop(key, None)
            if key in self._fired:
                self._fired.discard(key)
                return True
            return False

    def _run(self) -> None:
        with self._lock:
            while True:
                now = time.monotonic()
                for key, (deadline, fd) in list(self._calls.items()):
                    if deadline <= now:
                        del self._calls[key]
                        self._fired.add(key)
                        _shut_down(fd)
                self._wake_at = min((d for d, _ in self._calls.values()), default=math.inf)
                self._lock.wait(None if self._wake_at == math.inf else self._wake_at - now)


def _shut_down(fd: int) -> None:
    try:
        # A duplicate of the descriptor: shutting it down shuts the connection's socket down.
        with socket.socket(fileno=os.dup(fd)) as sock:
            sock.shutdown(socket.SHUT_RDWR)
    except OSError:
        pass


_WATCHDOG = _Watchdog()


class _Statements:
    """The statements of one table, composed once with its names quoted."""

    def __init__(self, table: str) -> None:
        t = sql.Identifier(table)
        leases = sql.Identifier(f"{table}_leases")
        meta = sql.Identifier(f"{table}_meta")
        self.channel = f"{table}_changes"
        columns = sql.SQL(", ").join(map(sql.Identifier, _COLUMNS))
        placeholders = sql.SQL(", ").join(sql.Placeholder() * len(_COLUMNS))
        # A row a tampered table holds with an oversized text is never sent by the server.
        bounded = sql.SQL(" AND ").join(
            sql.SQL("({0} IS NULL OR length({0}) <= {1})").format(
                sql.Identifier(column), sql.Literal(MAX_POLICY_TEXT)
            )
            for column in _TEXT_COLUMNS
        )
        select = sql.SQL("SELECT {} FROM {} WHERE {}").format(columns, t, bounded)
        self.create = [
            sql.SQL(
                """CREATE TABLE IF NOT EXISTS {} (
                    domain text COLLATE "C" PRIMARY KEY,
                    record_id text,
                    policy_text text,
                    fetched_at double precision,
                    expires_at double precision,
                    checked_at double precision,
                    last_used double precision NOT NULL,
                    last_error text NOT NULL DEFAULT '',
                    backoff_until double precision NOT NULL DEFAULT 0
                )"""
            ).format(t),
            sql.SQL("CREATE INDEX IF NOT EXISTS {} ON {} (last_used)").format(
                sql.Identifier(f"{table}_last_used"), t
            ),
            sql.SQL(
                """CREATE TABLE IF NOT EXISTS {} (
                    domain text PRIMARY KEY,
                    holder text NOT NULL,
                    expires timestamptz NOT NULL
                )"""
            ).format(leases),
            sql.SQL(
                "CREATE TABLE IF NOT EXISTS {} (key text PRIMARY KEY, value text NOT NULL)"
            ).format(meta),
        ]
        self.get_version = sql.SQL("SELECT value FROM {} WHERE key = 'schema_version'").format(meta)
        self.set_version = sql.SQL(
            "INSERT INTO {} (key, value) VALUES ('schema_version', %s)"
            " ON CONFLICT (key) DO UPDATE SET value = excluded.value"
        ).format(meta)
        self.get = sql.SQL("{} AND domain = %s").format(select)
        self.entries = sql.SQL("{} AND domain > %s ORDER BY domain LIMIT %s").format(select)
        self.put = sql.SQL(
            "INSERT INTO {} ({}) VALUES ({}) ON CONFLICT (domain) DO UPDATE SET {}"
        ).format(
            t,
            columns,
            placeholders,
            sql.SQL(", ").join(
                sql.SQL("{0} = excluded.{0}").format(sql.Identifier(column))
                for column in _COLUMNS[1:]
            ),
        )
        # A data-modifying WITH runs whether or not its result is read.
        self.put_notify = sql.SQL("WITH written AS ({}) SELECT pg_notify(%s, %s)").format(self.put)
        # Rows are locked in domain order, so that two daemons touching the same domains wait
        # for each other instead of deadlocking.
        self.touch = sql.SQL(
            """WITH used (domain, last_used) AS (SELECT * FROM unnest(%s::text[], %s::float8[])),
            locked AS (
                SELECT t.domain FROM {0} t JOIN used USING (domain)
                WHERE t.last_used < used.last_used ORDER BY t.domain FOR UPDATE OF t
            )
            UPDATE {0} t SET last_used = greatest(t.last_used, used.last_used)
            FROM used WHERE t.domain = used.domain AND t.domain IN (SELECT domain FROM locked)"""
        ).format(t)
        self.purge = sql.SQL(
            "DELETE FROM {} WHERE last_used < %s OR (policy_text IS NULL AND last_used < %s)"
        ).format(t)
        self.purge_leases = sql.SQL("DELETE FROM {} WHERE expires < now()").format(leases)
        self.delete = sql.SQL("DELETE FROM {} WHERE domain = ANY(%s) RETURNING domain").format(t)
        # Taken when free or expired, renewed by its holder; by the server's clock.
        self.lease = sql.SQL(
            """INSERT INTO {0} AS held (domain, holder, expires)
            VALUES (%s, %s, now() + make_interval(secs => %s))
            ON CONFLICT (domain) DO UPDATE SET holder = excluded.holder, expires = excluded.expires
            WHERE held.expires < now() OR held.holder = excluded.holder
            RETURNING holder"""
        ).format(leases)
        self.release = sql.SQL("DELETE FROM {} WHERE domain = %s AND holder = %s").format(leases)


def _conninfo(url: str, timeout: float, where: str) -> tuple[str, str]:
    """The libpq connection string for ``url`` with the store's bounds, and its password."""
    if "://" in url and not url.startswith(("postgresql://", "postgres://")):
        raise StoreError(
            f"{where}: cannot open: expected a postgresql:// or postgres:// URL or a libpq"
            " connection string (host=... dbname=...)"
        )
    try:
        params = conninfo_to_dict(url)
    except psycopg.Error:
        # libpq's message may quote a piece of the string, which may be a password.
        raise StoreError(
            f"{where}: cannot open: the URL or connection string cannot be parsed"
        ) from None
    password = str(params.get("password") or "")
    options = str(params.get("options") or "")
    statement_ms = max(1, math.ceil(timeout * 1000))
    ours = f"-c statement_timeout={statement_ms}"
    extra: dict[str, Any] = {
        # libpq counts whole seconds and takes less than 2 as 2.
        "connect_timeout": max(2, math.ceil(timeout)),
        "options": f"{options} {ours}".strip(),
        "keepalives": 1,
        "keepalives_idle": KEEPALIVE_IDLE,
        "keepalives_interval": KEEPALIVE_INTERVAL,
        "keepalives_count": KEEPALIVE_COUNT,
        "tcp_user_timeout": int(DEAD_PEER * 1000),
    }
    if "application_name" not in params:
        extra["application_name"] = "postfix-mtasts"
    return make_conninfo(url, **extra), password


def _lock_key(table: str) -> int:
    """The advisory lock that serialises the creation of ``table``'s schema, as a bigint."""
    digest = hashlib.blake2b(f"postfix-mtasts:{table}".encode(), digest_size=8).digest()
    return int.from_bytes(digest, "big", signed=True)


def _one(cursor: psycopg.Cursor[Any]) -> tuple[Any, ...]:
    row = cursor.fetchone()
    assert row is not None
    return tuple(row)
