"""The memory store: a dict behind a lock. Nothing survives the process; for tests, for
`cache.backend = "memory"`, and as the fallback when the cache file cannot be used.

It holds at most `max_entries` entries (the daemon passes `cache.memory_domains`): a client that
asks for millions of names must not grow it without end. At the bound a tenth of the entries go,
those without a policy first, then the least recently used."""

from __future__ import annotations

import heapq
import threading
from collections.abc import Mapping
from dataclasses import replace

from postfix_mtasts.store import Entry, StoreError, check_entry

__all__ = ["MemoryStore"]


class MemoryStore:
    # A dict behind a lock held for a dict operation: read on the event loop.
    instant = True

    def __init__(self, max_entries: int | None = None) -> None:
        self._lock = threading.Lock()
        self._entries: dict[str, Entry] | None = {}
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

    def close(self) -> None:
        with self._lock:
            self._entries = None
