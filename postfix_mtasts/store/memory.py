"""The memory store: a dict behind a lock. Nothing survives the process; for tests, for
`cache.backend = "memory"`, and as the fallback when the cache file cannot be used."""

from __future__ import annotations

import threading
from collections.abc import Mapping
from dataclasses import replace

from postfix_mtasts.store import Entry, StoreError, check_entry

__all__ = ["MemoryStore"]


class MemoryStore:
    def __init__(self) -> None:
        self._lock = threading.Lock()
        self._entries: dict[str, Entry] | None = {}

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
            self._open()[entry.domain] = entry

    def delete(self, domain: str) -> None:
        with self._lock:
            self._open().pop(domain, None)

    def entries(self) -> list[Entry]:
        with self._lock:
            return list(self._open().values())

    def touch(self, last_used: Mapping[str, float]) -> None:
        with self._lock:
            entries = self._open()
            for domain, when in last_used.items():
                entry = entries.get(domain)
                if entry is not None and when > entry.last_used:
                    entries[domain] = replace(entry, last_used=when)

    def purge_unused(self, before: float) -> int:
        with self._lock:
            entries = self._open()
            unused = [domain for domain, entry in entries.items() if entry.last_used < before]
            for domain in unused:
                del entries[domain]
            return len(unused)

    def close(self) -> None:
        with self._lock:
            self._entries = None
