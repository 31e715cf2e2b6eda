"""Cache files in the states the tests need them in."""

from __future__ import annotations

from pathlib import Path

from postfix_mtasts.store import Entry
from postfix_mtasts.store.sqlite import SqliteStore


def damaged_cache(path: Path | str) -> bytes:
    """Write a cache of ours with 300 entries at ``path``, then damage four of its pages (as a
    disk or a careless hand would); return the damaged file's bytes."""
    store = SqliteStore(str(path))
    for n in range(300):
        store.put(Entry(f"d{n}.example", "1", None, None, None, None, 1.0))
    store.close()
    with open(path, "r+b") as f:
        f.seek(4096 * 2)
        f.write(b"\x55" * 4096 * 4)
    return Path(path).read_bytes()
