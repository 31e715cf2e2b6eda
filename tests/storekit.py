"""Opening every backend of the store for the shared store suite: each test gets a namespace of
its own (a SQLite file, a Redis key prefix, a PostgreSQL table) on the session's servers, and may
open several stores on it, as several daemons would."""

from __future__ import annotations

import itertools
from collections.abc import Callable, Iterator
from dataclasses import replace
from pathlib import Path
from typing import Any

import pytest

from postfix_mtasts.store import Entry, Store, open_store

BACKENDS = ("memory", "sqlite", "redis", "postgresql")
# Those that other processes can share.
SHARED = ("sqlite", "redis", "postgresql")

_names = itertools.count()

POLICY = "version: STSv1\nmode: enforce\nmx: mail.example.com\nmx: *.example.net\nmax_age: 86400\n"


def entry(domain: str = "example.com", **changes: Any) -> Entry:
    """An entry as a fetch left it, with ``changes``."""
    base = Entry(
        domain=domain,
        record_id="20240101T000000",
        policy_text=POLICY,
        fetched_at=1000.0,
        expires_at=87400.0,
        checked_at=1100.0,
        last_used=1200.0,
        last_error="",
        backoff_until=0.0,
    )
    return replace(base, **changes)


Opener = Callable[..., Store]


def opener(request: pytest.FixtureRequest, backend: str, tmp_path: Path) -> Iterator[Opener]:
    """``open_(**kwargs)`` opens a store of ``backend`` on this test's namespace; all are closed
    at the end."""
    n = next(_names)
    kwargs: dict[str, Any] = {}
    if backend == "redis":
        server = request.getfixturevalue("redis_server")
        kwargs = {"url": server.url, "name": f"test{n}:"}
    elif backend == "postgresql":
        server = request.getfixturevalue("postgres_server")
        kwargs = {"url": server.url, "name": f"test_{n}"}
    path = str(tmp_path / f"store{n}" / "cache.sqlite")
    opened: list[Store] = []

    def open_(**more: Any) -> Store:
        store = open_store(backend, path, **{**kwargs, **more})
        opened.append(store)
        return store

    yield open_
    for store in opened:
        store.close()
