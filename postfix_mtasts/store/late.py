"""A Redis or PostgreSQL store whose server could not be reached when the daemon started.

A fleet's daemons outlive their store's restarts, and may also start while it is down (a machine
booting before the database, a maintenance window). Rather than caching in memory until the next
restart, the daemon opens a `LateStore`: every call tries to open the real store (at most once per
`retry_interval` seconds) and fails with StoreError until it is open, which the cache takes as a
store outage (lookups go on, what is learnt is kept in memory and written once the store answers).
Once open, every call goes to the real store.
"""

from __future__ import annotations

import secrets
import threading
import time
from collections.abc import Callable, Iterable, Iterator, Mapping

from postfix_mtasts.store import Entry, Store, StoreError, Watcher

__all__ = ["LateStore"]


class LateStore:
    instant = False
    shared = True

    def __init__(
        self, opener: Callable[[], Store], where: str, cause: str, retry_interval: float = 5.0
    ) -> None:
        self._opener = opener
        self.where = where
        self._cause = cause
        self._retry_interval = retry_interval
        self._retry_at = time.monotonic() + retry_interval
        self._lock = threading.Lock()
        self._store: Store | None = None
        self._closed = False
        # Until the real store is open; its own origin marks the changes made through it.
        self._origin = secrets.token_hex(8)

    @property
    def origin(self) -> str:
        store = self._store
        return self._origin if store is None else store.origin

    def _real(self) -> Store:
        store = self._store
        if store is not None:
            return store
        with self._lock:
            if self._closed:
                raise StoreError(f"{self.where}: the store is closed")
            if self._store is not None:
                return self._store
            if time.monotonic() < self._retry_at:
                raise StoreError(self._cause)
            self._retry_at = time.monotonic() + self._retry_interval
            try:
                self._store = self._opener()
            except StoreError as exc:
                self._cause = str(exc)
                raise
            return self._store

    def get(self, domain: str) -> Entry | None:
        return self._real().get(domain)

    def put(self, entry: Entry) -> None:
        self._real().put(entry)

    def touch(self, last_used: Mapping[str, float]) -> None:
        self._real().touch(last_used)

    def purge_unused(self, before: float, without_policy_before: float | None = None) -> int:
        return self._real().purge_unused(before, without_policy_before)

    def delete(self, domains: Iterable[str]) -> int:
        return self._real().delete(domains)

    def entries(self) -> Iterator[Entry]:
        return self._real().entries()

    def lease(self, domain: str, holder: str, seconds: float) -> bool:
        return self._real().lease(domain, holder, seconds)

    def release(self, domain: str, holder: str) -> None:
        self._real().release(domain, holder)

    def watch(self) -> Watcher:
        return self._real().watch()

    def close(self) -> None:
        with self._lock:
            self._closed = True
            store, self._store = self._store, None
        if store is not None:
            store.close()
