"""Cache files in the states the tests need them in."""

from __future__ import annotations

import sqlite3
from pathlib import Path

from postfix_mtasts.store import Entry
from postfix_mtasts.store.sqlite import APPLICATION_ID, SqliteStore


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


def version_1_cache(path: Path | str, entries: list[Entry]) -> None:
    """Write ``entries`` into a new cache of schema version 1 at ``path``, as postfix-mtasts wrote
    it before the fleet's tables came (the same statements and pragmas, in WAL mode)."""
    db = sqlite3.connect(path, isolation_level=None)
    try:
        db.execute("PRAGMA journal_mode = WAL")
        db.execute("BEGIN IMMEDIATE")
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
        db.execute("PRAGMA user_version = 1")
        db.execute(f"PRAGMA application_id = {APPLICATION_ID}")
        db.execute("COMMIT")
        db.executemany(
            "INSERT INTO entries VALUES (?, ?, ?, ?, ?, ?, ?, ?, ?)",
            [
                (
                    e.domain,
                    e.record_id,
                    e.policy_text,
                    e.fetched_at,
                    e.expires_at,
                    e.checked_at,
                    e.last_used,
                    e.last_error,
                    e.backoff_until,
                )
                for e in entries
            ],
        )
    finally:
        db.close()
