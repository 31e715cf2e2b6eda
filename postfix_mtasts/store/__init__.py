"""Persistence of the policy cache, behind one small interface.

A store keeps one `Entry` per policy domain and knows nothing of what the fields mean:
freshness, revalidation, backoff and expiry are the cache rules' (`cache_rules`, RFC 8461 §3.3
and §5), carried out by `policydb`. The cache is the daemon's only state, and losing it costs
lookups, never correctness; so every failure of a backend is a `StoreError` naming the backend's
file or address and the cause, and the caller decides how to go on (log it, and answer from
lookups or from a memory store).

Backends: `memory` (a dict, for tests and `cache.backend = "memory"`) and `sqlite` (a file, the
default). `open_store()` picks one by name.
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass
from typing import Protocol

__all__ = [
    "MAX_POLICY_TEXT",
    "CorruptStoreError",
    "Entry",
    "ForeignFileError",
    "Store",
    "StoreError",
    "open_store",
]

# The largest policy_text a store accepts and returns. A fetched policy is at most 64 KiB
# (RFC 8461 §3.3, enforced by fetch.py), so this only bounds what a damaged or tampered file can
# make the daemon read into memory.
MAX_POLICY_TEXT = 65536


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


class StoreError(Exception):
    """The store cannot do what was asked; the message names the file (or address) and the cause."""


class CorruptStoreError(StoreError):
    """The store's file is ours (a postfix-mtasts cache) but damaged: reopening it will not help.
    Such a file may be moved aside and replaced by an empty cache."""


class ForeignFileError(StoreError):
    """The file is not a postfix-mtasts cache (a text file, another program's database): it is
    neither used nor moved, whatever state it is in."""


def check_entry(entry: Entry, where: str) -> None:
    """Refuse an entry no backend may hold (for the backends; `where` names the store)."""
    if entry.policy_text is not None and len(entry.policy_text) > MAX_POLICY_TEXT:
        raise StoreError(
            f"{where}: cannot store {entry.domain}: policy text of {len(entry.policy_text)}"
            f" characters is over the limit of {MAX_POLICY_TEXT}"
        )


class Store(Protocol):
    """The interface every backend provides. All methods are safe to call from several threads.

    ``instant``: reading never waits for I/O (the memory store), so the cache reads it on its
    event loop rather than handing each read to a thread."""

    instant: bool

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
        used before `without_policy_before`; return how many."""
        ...

    def close(self) -> None:
        """Release the backend; further calls raise StoreError. Closing twice is harmless."""
        ...


def open_store(
    backend: str, path: str, *, busy_timeout: float = 5.0, memory_entries: int | None = None
) -> Store:
    """Open the store named by `backend` ("sqlite" or "memory", as in `cache.backend`).

    `path` is the SQLite file (ignored by the memory store); `busy_timeout` is how long an
    operation on a SQLite file locked by another process waits before it fails;
    `memory_entries` bounds the memory store (None: no bound).
    Raises StoreError (CorruptStoreError for a damaged cache, ForeignFileError for a file that is
    not a cache) when the store cannot be used.
    """
    if backend == "memory":
        from postfix_mtasts.store.memory import MemoryStore

        return MemoryStore(memory_entries)
    if backend == "sqlite":
        from postfix_mtasts.store.sqlite import SqliteStore

        return SqliteStore(path, busy_timeout=busy_timeout)
    raise ValueError(f"unknown cache backend {backend!r}")
