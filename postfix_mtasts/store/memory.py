"""The memory store: a dict behind a lock. Nothing survives the process; for tests, for
`cache.backend = "memory"`, and as the fallback when the cache file cannot be used.

It holds at most `max_entries` entries (the daemon passes `cache.memory_domains`): a client that
asks for millions of names must not grow it without end. At the bound a tenth of the entries go,
those without a policy first, then the least recently used."""

from __future__ import annotations

import heapq
import threading
import time
from collections.abc import Iterable, Iterator, Mapping
from dataclasses import replace
from typing import Literal

from postfix_mtasts.store import Entry, StoreError, check_entry

__all__ = ["MemoryStore"]


class _NoChanges:
    """A memory store has no other users: nothing ever changes behind its back."""

    def __init__(self) -> None:
        self._closed = threading.Event()

    def wait(self, timeout: float) -> frozenset[str] | Literal["all"]:
        self._closed.wait(timeout)
        return frozenset()

    def close(self) -> None:
        self._closed.set()


class MemoryStore:
    # A dict behind a lock held for a dict operation: read on the event loop.
    instant = True
    # Nobody else sees it.
    shared = False
    where = "memory store"
    origin = "memory"

    def __init__(self, max_entries: int | None = None) -> None:
        self._lock = threading.Lock()
        self._entries: dict[str, Entry] | None = {}
        self._leases: dict[str, tuple[str, float]] = {}
        self.max_entries = max_entries

    def _open(self) -> dict[str, Entry]:
        if self._entries is None:
            raise StoreError("memory store: closed")
        return self._entries

    def get(self, domain: str) -> Entry | None:
        with self._lock:
            return self._open().get(domain)

    def put(self, entry: Entry) -> None:
        check_entry(entry, "memory store")
        with self._lock:
            entries = self._open()
            if (
                self.max_entries is not None
                and entry.domain not in entries
                and len(entries) >= self.max_entries
            ):
                self._shrink(entries, max(1, self.max_entries // 10))
            entries[entry.domain] = entry

    @staticmethod
    def _shrink(entries: dict[str, Entry], count: int) -> None:
        doomed = heapq.nsmallest(
            count, entries.values(), key=lambda e: (e.policy_text is not None, e.last_used)
        )
        for entry in doomed:
            del entries[entry.domain]

    def touch(self, last_used: Mapping[str, float]) -> None:
        with self._lock:
            entries = self._open()
            for domain, when in last_used.items():
                entry = entries.get(domain)
                if entry is not None and when > entry.last_used:
                    entries[domain] = replace(entry, last_used=when)

    def purge_unused(self, before: float, without_policy_before: float | None = None) -> int:
        negative = before if without_policy_before is None else max(before, without_policy_before)
        with self._lock:
            entries = self._open()
            unused = [
                domain
                for domain, entry in entries.items()
                if entry.last_used < (before if entry.policy_text is not None else negative)
            ]
            for domain in unused:
                del entries[domain]
            return len(unused)

    def delete(self, domains: Iterable[str]) -> int:
        with self._lock:
            entries = self._open()
            return sum(entries.pop(domain, None) is not None for domain in set(domains))

    def entries(self) -> Iterator[Entry]:
        with self._lock:
            held = sorted(self._open().values(), key=lambda e: e.domain)
        return iter(held)

    def lease(self, domain: str, holder: str, seconds: float) -> bool:
        now = time.monotonic()
        with self._lock:
            self._open()
            current = self._leases.get(domain)
            if current is not None and current[0] != holder and current[1] > now:
                return False
            if len(self._leases) >= 10000:
                # Expired leases are only ever read to be replaced: drop them at a bound.
                self._leases = {d: h for d, h in self._leases.items() if h[1] > now}
            self._leases[domain] = (holder, now + seconds)
            return True

    def release(self, domain: str, holder: str) -> None:
        with self._lock:
            current = self._leases.get(domain)
            if current is not None and current[0] == holder:
                del self._leases[domain]

    def watch(self) -> _NoChanges:
        return _NoChanges()

    def close(self) -> None:
        with self._lock:
            self._entries = None
