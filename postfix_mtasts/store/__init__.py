"""Persistence of the policy cache, behind one small interface.

A store keeps one `Entry` per policy domain and knows nothing of what the fields mean:
freshness, revalidation, backoff and expiry are the cache rules' (`cache_rules`, RFC 8461 §3.3
and §5), carried out by `policydb`. The cache is the daemon's only state, and losing it costs
lookups, never correctness; so every failure of a backend is a `StoreError` naming the backend's
file or address and the cause, and the caller decides how to go on (log it, and answer from
lookups or from a memory store).

Backends: `memory` (a dict, for tests and `cache.backend = "memory"`), `sqlite` (a file, the
default), and for a fleet of daemons sharing one cache `redis` (redis-py) and `postgresql`
(psycopg 3), installed as extras. `open_store()` picks one by name.

Sharing. Several daemons (processes, machines) may use one store. Three things serve them:

- **Changes.** `put` and `delete` tell the store's other users which domains changed, through the
  backend's own mechanism (PostgreSQL NOTIFY, Redis pub/sub, a change log read when SQLite's
  `data_version` moves). A daemon reads them with a `Watcher` (`watch()`), in a thread of its own,
  and reads the changed entries again. A store never reports its own changes to its own watcher
  (they carry the store object's `origin`). When changes may have been lost (the watcher's
  connection broke), `wait` returns `ALL`: every domain may have changed.
- **Leases.** `lease(domain, holder, seconds)` lets one daemon of the fleet look a domain up while
  the others wait for its result: it is taken when free or expired, renewed by its holder, and
  expires by itself, so that a crashed holder blocks nobody for longer than `seconds`.
- **Versions.** Each backend's schema (tables, key layout) carries a version. A store written by a
  newer postfix-mtasts is refused with a `StoreError` saying so, never written to.
"""

from __future__ import annotations

import re
from collections.abc import Iterable, Iterator, Mapping, Sequence
from dataclasses import dataclass, fields
from typing import Final, Literal, Protocol
from urllib.parse import urlsplit, urlunsplit

__all__ = [
    "ALL",
    "ENTRY_FIELDS",
    "MAX_DOMAIN_NAMES",
    "MAX_POLICY_TEXT",
    "CorruptStoreError",
    "Entry",
    "ForeignFileError",
    "NewerSchemaError",
    "Store",
    "StoreError",
    "Watcher",
    "announced",
    "announcements",
    "entry_from_row",
    "is_announced_name",
    "open_store",
    "redact_url",
    "where_of",
]

# The largest policy_text a store accepts and returns. A fetched policy is at most 64 KiB
# (RFC 8461 §3.3, enforced by fetch.py), so this only bounds what a damaged or tampered file can
# make the daemon read into memory.
MAX_POLICY_TEXT = 65536
# The most domain names one change notification carries (each at most 253 characters, as DNS
# names are): what another process sends is bounded like any input.
MAX_DOMAIN_NAMES = 1000
# The Redis key prefix and the PostgreSQL table when none is configured (cache.prefix, cache.table).
DEFAULT_PREFIX = "postfix-mtasts:"
DEFAULT_TABLE = "postfix_mtasts_cache"
# What `Watcher.wait` returns when changes may have been lost: re-read every domain.
ALL: Final = "all"


@dataclass(frozen=True, slots=True)
class Entry:
    """What is remembered of one policy domain. Times are Unix timestamps (seconds)."""

    domain: str
    record_id: str | None
    # The policy as served (after decoding), or None when the domain has no policy.
    policy_text: str | None
    fetched_at: float | None
    expires_at: float | None
    # The last TXT check of _mta-sts.<domain>.
    checked_at: float | None
    last_used: float
    last_error: str = ""
    backoff_until: float = 0.0

    @classmethod
    def unknown(cls, domain: str, last_used: float) -> Entry:
        """The entry of a domain nothing is known about yet."""
        return cls(domain, None, None, None, None, None, last_used)


# The fields of an Entry, in order: the columns of the SQL backends' tables.
ENTRY_FIELDS: tuple[str, ...] = tuple(field.name for field in fields(Entry))


class StoreError(Exception):
    """The store cannot do what was asked; the message names the file (or address) and the cause."""


class CorruptStoreError(StoreError):
    """The store's file is ours (a postfix-mtasts cache) but damaged: reopening it will not help.
    Such a file may be moved aside and replaced by an empty cache."""


class NewerSchemaError(StoreError):
    """The store was written by a newer postfix-mtasts (a higher schema version than this one
    knows): it is neither written to nor changed."""


class ForeignFileError(StoreError):
    """The file (or the Redis prefix, the PostgreSQL table) is not a postfix-mtasts cache (a text
    file, another program's database or keys): it is neither used nor moved, whatever state it is
    in."""


def entry_from_row(row: Sequence[object]) -> Entry | None:
    """A table row (the fields of `Entry` in order) as an Entry, or None when a damaged or
    tampered table gave a field the wrong type: the row then counts as absent, like an oversized
    one (for the SQL backends)."""
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
        domain, record_id, policy_text, fetched_at, expires_at, checked_at, last_used, error, until
    )


# A domain name as a change notification carries it: a DNS name is at most 253 characters of
# printable ASCII, and the names of a notification are separated by spaces.
_ANNOUNCED_NAME = re.compile(r"[!-~]{1,253}")
# An origin: secrets.token_hex(8) of the store object that made the change.
_ORIGIN = re.compile(r"[0-9a-f]{16}")


def is_announced_name(name: object) -> bool:
    """Whether ``name`` may be carried by a change notification (a domain name in ASCII)."""
    return isinstance(name, str) and _ANNOUNCED_NAME.fullmatch(name) is not None


def announcements(origin: str, domains: Iterable[str], max_bytes: int) -> list[str]:
    """The notifications ``ORIGIN DOMAIN DOMAIN ...`` that announce ``domains``: at most
    MAX_DOMAIN_NAMES names and ``max_bytes`` bytes each. A name no watcher would accept (not
    ASCII, too long) is left out: no daemon holds such a domain."""
    payloads: list[str] = []
    names: list[str] = []
    size = len(origin)
    for domain in domains:
        if not is_announced_name(domain):
            continue
        if names and (len(names) >= MAX_DOMAIN_NAMES or size + 1 + len(domain) > max_bytes):
            payloads.append(" ".join([origin, *names]))
            names, size = [], len(origin)
        names.append(domain)
        size += 1 + len(domain)
    if names:
        payloads.append(" ".join([origin, *names]))
    return payloads


def announced(payload: str | bytes, own_origin: str, max_bytes: int) -> frozenset[str]:
    """The domains a notification names; none when it is the watching store's own (``own_origin``),
    longer than ``max_bytes``, or malformed in any way (another process's input is checked like
    any other)."""
    if len(payload) > max_bytes:
        return frozenset()
    if isinstance(payload, bytes):
        try:
            payload = payload.decode("ascii")
        except UnicodeDecodeError:
            return frozenset()
    if not payload.isascii():
        return frozenset()
    origin, *names = payload.split(" ")
    if (
        origin == own_origin
        or not _ORIGIN.fullmatch(origin)
        or not 1 <= len(names) <= MAX_DOMAIN_NAMES
        or not all(_ANNOUNCED_NAME.fullmatch(name) for name in names)
    ):
        return frozenset()
    return frozenset(names)


def check_entry(entry: Entry, where: str) -> None:
    """Refuse an entry no backend may hold (for the backends; `where` names the store)."""
    if entry.policy_text is not None and len(entry.policy_text) > MAX_POLICY_TEXT:
        raise StoreError(
            f"{where}: cannot store {entry.domain}: policy text of {len(entry.policy_text)}"
            f" characters is over the limit of {MAX_POLICY_TEXT}"
        )


class Watcher(Protocol):
    """The changes other users of a store made, for one thread of one daemon."""

    def wait(self, timeout: float) -> frozenset[str] | Literal["all"]:
        """The domains whose entries other users changed (put or deleted) since the last call,
        waiting up to ``timeout`` seconds for one; an empty set when none came; ``ALL`` when
        changes may have been lost (the first call after a reconnection). Raises StoreError
        when the store cannot be reached (the caller waits and calls again: the watcher
        reconnects by itself)."""
        ...

    def close(self) -> None:
        """Release the watcher's connection; closing twice is harmless."""
        ...


class Store(Protocol):
    """The interface every backend provides. All methods are safe to call from several threads.

    ``instant``: reading never waits for I/O (the memory store), so the cache reads it on its
    event loop rather than handing each read to a thread. ``shared``: other processes may use the
    store too (leases and watching are worth their cost). ``where``: the store named for messages,
    never with a password. ``origin``: this store object's mark on the changes it makes."""

    instant: bool
    shared: bool
    where: str

    @property
    def origin(self) -> str: ...

    def get(self, domain: str) -> Entry | None:
        """The entry for `domain`, or None."""
        ...

    def put(self, entry: Entry) -> None:
        """Insert or replace the entry for `entry.domain`."""
        ...

    def touch(self, last_used: Mapping[str, float]) -> None:
        """Record when domains were last used, in one batch. Domains without an entry are
        skipped, and a time never moves last_used backwards (another daemon may have used the
        domain later)."""
        ...

    def purge_unused(self, before: float, without_policy_before: float | None = None) -> int:
        """Delete the entries last used before `before`, and those without a policy_text last
        used before `without_policy_before`; return how many. (Not announced to watchers: an
        entry unused that long is held in no daemon's memory.)"""
        ...

    def delete(self, domains: Iterable[str]) -> int:
        """Delete the entries of `domains` (those without one are skipped) and announce it to
        the other users; return how many were deleted."""
        ...

    def entries(self) -> Iterator[Entry]:
        """Every entry, ordered by domain (for the cache commands; not for the daemon's paths).
        The store may be read in batches while it is iterated."""
        ...

    def lease(self, domain: str, holder: str, seconds: float) -> bool:
        """Take the lease on `domain` for `holder` for `seconds`, when nobody else holds an
        unexpired one; renew it when `holder` holds it. True when `holder` holds it now."""
        ...

    def release(self, domain: str, holder: str) -> None:
        """Give up the lease on `domain` if `holder` holds it."""
        ...

    def watch(self) -> Watcher:
        """A new watcher of the changes other users make (with a connection of its own)."""
        ...

    def close(self) -> None:
        """Release the backend; further calls raise StoreError. Closing twice is harmless."""
        ...


def redact_url(url: str) -> str:
    """``url`` with its password (if any) replaced by ``***``, for logs and messages. A
    ``password=`` parameter (of a URL or of a ``key=value`` PostgreSQL connection string) is
    masked as well."""
    if "://" not in url:
        return re.sub(r"(?i)(password\s*=\s*)('(?:[^'\\]|\\.)*'|\S+)", r"\1***", url)
    try:
        parts = urlsplit(url)
    except ValueError:
        return "(a URL that cannot be parsed)"
    if parts.password is None and "password=" not in parts.query.lower():
        return url
    netloc = parts.netloc
    if parts.password is not None:
        userinfo, _, hostport = netloc.rpartition("@")
        user = userinfo.split(":", 1)[0]
        netloc = f"{user}:***@{hostport}"
    query = "&".join(
        f"{key}=***" if key.lower() == "password" else part
        for part in parts.query.split("&")
        if part
        for key in (part.split("=", 1)[0],)
    )
    return urlunsplit((parts.scheme, netloc, parts.path, query, parts.fragment))


def where_of(backend: str, path: str, url: str = "", name: str = "") -> str:
    """A store as messages name it, before it is open (each backend's ``where``): the SQLite
    file, or the server's URL without its password and the key prefix or table."""
    if backend == "redis":
        return f'{redact_url(url) or "(no url)"} prefix "{name or DEFAULT_PREFIX}"'
    if backend == "postgresql":
        return f"{redact_url(url)} table {name or DEFAULT_TABLE}"
    if backend == "sqlite":
        return path
    return "memory store"


def open_store(
    backend: str,
    path: str,
    *,
    busy_timeout: float = 5.0,
    memory_entries: int | None = None,
    url: str = "",
    name: str = "",
    timeout: float = 1.0,
) -> Store:
    """Open the store named by `backend` (as in `cache.backend`).

    `path` is the SQLite file (ignored by the others); `busy_timeout` is how long an operation on
    a SQLite file locked by another process waits before it fails; `memory_entries` bounds the
    memory store (None: no bound). `url` names the Redis or PostgreSQL server, `name` the Redis
    key prefix or the PostgreSQL table, and `timeout` bounds every operation on them (connecting
    included).
    Raises StoreError (CorruptStoreError for a damaged cache, ForeignFileError for a file that is
    not a cache) when the store cannot be used.
    """
    if backend == "memory":
        from postfix_mtasts.store.memory import MemoryStore

        return MemoryStore(memory_entries)
    if backend == "sqlite":
        from postfix_mtasts.store.sqlite import SqliteStore

        return SqliteStore(path, busy_timeout=busy_timeout)
    if backend == "redis":
        from postfix_mtasts.store.redis import RedisStore

        return RedisStore(url, prefix=name, timeout=timeout)
    if backend == "postgresql":
        from postfix_mtasts.store.postgresql import PostgresStore

        return PostgresStore(url, table=name, timeout=timeout)
    raise ValueError(f"unknown cache backend {backend!r}")
