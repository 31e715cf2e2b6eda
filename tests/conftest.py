"""Shared fixtures. ``bed``: the real DNS and HTTPS servers of tests/bed.py, once per session;
``hostile_dns``: a DNS server in front of them that an attacker controls; ``redis_server`` and
``postgres_server``: the shared caches' servers of tests/dbservers.py, once per session."""

from __future__ import annotations

from collections.abc import Iterator
from typing import TypeVar

import pytest

# Helper modules with asserts are rewritten like test modules, whoever imports them first.
pytest.register_assert_rewrite("mtasts_daemon")

from bed import Bed, BedError  # noqa: E402
from dbservers import PostgresServer, RedisServer, ServerError  # noqa: E402
from hostile_dns import HostileDNS  # noqa: E402


@pytest.fixture(scope="session")
def bed(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Bed]:
    """knot, unbound, the HTTPS policy hosts and a dead nameserver, with every scenario published.

    A bed that cannot start fails the tests that need it (never skips them): on CI a missing server
    is a broken machine, not a reason to pass.
    """
    try:
        test_bed = Bed.start(tmp_path_factory.mktemp("bed"))
    except BedError as exc:
        pytest.fail(f"the test bed did not start: {exc}", pytrace=False)
    try:
        yield test_bed
    finally:
        test_bed.stop()


@pytest.fixture(scope="session")
def hostile_dns(bed: Bed) -> Iterator[HostileDNS]:
    """A DNS server in front of the bed's resolver that misbehaves on the names it is told to
    (tests/hostile_dns.py); every test clears the rules it set."""
    server = HostileDNS(bed.resolver_nameservers[0])
    try:
        yield server
    finally:
        server.close()


_Server = TypeVar("_Server", RedisServer, PostgresServer)


def _started(kind: type[_Server], what: str) -> Iterator[_Server]:
    """A server of ``kind`` for the session; one that does not start fails the tests that use
    it, never skips them."""
    try:
        server = kind()
        server.start()
    except ServerError as exc:
        pytest.fail(f"{what} did not start: {exc}", pytrace=False)
    try:
        yield server
    finally:
        server.cleanup()


@pytest.fixture(scope="session")
def redis_server() -> Iterator[RedisServer]:
    """Debian's redis-server on loopback, in a temporary directory."""
    yield from _started(RedisServer, "redis-server")


@pytest.fixture(scope="session")
def postgres_server() -> Iterator[PostgresServer]:
    """A PostgreSQL cluster of its own on loopback."""
    yield from _started(PostgresServer, "PostgreSQL")
