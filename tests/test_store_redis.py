"""store/redis.py against a real redis-server: every URL form, passwords kept out of messages, the
versioned key layout, a tampered store, notifications from strangers, and the server going away
and coming back. (What every backend does is in test_store.py.)"""

from __future__ import annotations

import itertools
import subprocess
import sys
import threading
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
import redis
from dbservers import PASSWORD, RedisServer, ServerError, _wait_for_port, free_port
from storekit import POLICY, entry

from postfix_mtasts.store import (
    ALL,
    MAX_DOMAIN_NAMES,
    MAX_POLICY_TEXT,
    StoreError,
    open_store,
)
from postfix_mtasts.store.redis import SCHEMA_VERSION, RedisStore, RedisWatcher

_prefixes = itertools.count()


@pytest.fixture
def prefix() -> str:
    return f"redis-test{next(_prefixes)}:"


@pytest.fixture
def raw(redis_server: RedisServer) -> Iterator[redis.Redis]:
    """A plain client on the test server, to look at and tamper with what the store wrote."""
    client = redis.Redis.from_url(redis_server.url, socket_timeout=10)
    yield client
    client.close()


@pytest.fixture
def opened() -> Iterator[list[RedisStore]]:
    """Stores to close at the end of the test."""
    stores: list[RedisStore] = []
    yield stores
    for store in stores:
        store.close()


def open_redis(opened: list[RedisStore], url: str, prefix: str, **kwargs: Any) -> RedisStore:
    store = RedisStore(url, prefix=prefix, **kwargs)
    opened.append(store)
    return store


# --- URLs, passwords, the layout ------------------------------------------------------------------


@pytest.mark.parametrize("form", ["url", "password_url", "unix_url"])
def test_every_url_form_reaches_the_server(
    redis_server: RedisServer, opened: list[RedisStore], prefix: str, form: str
) -> None:
    url = getattr(redis_server, form)
    store = open_redis(opened, url, prefix)
    store.put(entry())
    assert store.get("example.com") == entry()
    other = open_redis(opened, redis_server.url, prefix)
    assert other.get("example.com") == entry()
    assert PASSWORD not in store.where and PASSWORD not in repr(store)


def test_open_store_passes_url_prefix_and_timeout(
    redis_server: RedisServer, opened: list[RedisStore], prefix: str
) -> None:
    store = open_store("redis", "", url=redis_server.password_url, name=prefix, timeout=2.5)
    assert isinstance(store, RedisStore)
    opened.append(store)
    assert store.where == f'redis://fleet:***@127.0.0.1:{redis_server.port}/0 prefix "{prefix}"'
    assert store.timeout == 2.5
    assert (store.instant, store.shared) == (False, True)
    assert len(store.origin) == 16 and store.origin != RedisStore(redis_server.url).origin


def test_the_default_prefix_is_postfix_mtasts(redis_server: RedisServer) -> None:
    # Database 15 of the session's server is this test's alone.
    url = f"redis://127.0.0.1:{redis_server.port}/15"
    store = RedisStore(url)
    try:
        store.put(entry())
        client = redis.Redis.from_url(url)
        assert sorted(client.keys()) == [
            b"postfix-mtasts:d:example.com",
            b"postfix-mtasts:schema",
            b"postfix-mtasts:used",
        ]
        client.flushdb()
        client.close()
    finally:
        store.close()


def test_a_wrong_password_names_the_store_and_not_the_password(
    redis_server: RedisServer, prefix: str
) -> None:
    url = redis_server.password_url.replace(PASSWORD, "not-" + PASSWORD)
    with pytest.raises(StoreError) as caught:
        RedisStore(url, prefix=prefix)
    message = str(caught.value)
    assert message.startswith(
        f'redis://fleet:***@127.0.0.1:{redis_server.port}/0 prefix "{prefix}": cannot open: '
    )
    assert "password" in message.lower()
    assert PASSWORD not in message


@pytest.mark.parametrize(
    ("url", "cause"),
    [
        ("http://127.0.0.1:6379/0", "Redis URL must specify one of the following schemes"),
        ("", "Redis URL must specify"),
        ("redis://127.0.0.1:6379/0", None),  # a prefix with a space
    ],
)
def test_a_url_or_prefix_that_cannot_be_used_is_a_store_error(url: str, cause: str | None) -> None:
    prefix = "a b" if cause is None else ""
    with pytest.raises(StoreError, match="cannot open: ") as caught:
        RedisStore(url, prefix=prefix)
    assert cause is None or cause in str(caught.value)


def test_a_store_that_cannot_be_reached_fails_at_once(prefix: str) -> None:
    port = free_port()
    started = time.monotonic()
    with pytest.raises(StoreError, match=rf'^redis://127.0.0.1:{port}/0 prefix "{prefix}": cannot'):
        RedisStore(f"redis://127.0.0.1:{port}/0", prefix=prefix, timeout=5.0)
    assert time.monotonic() - started < 4.0


def test_without_redis_py_the_store_says_what_to_install(
    monkeypatch: pytest.MonkeyPatch, redis_server: RedisServer
) -> None:
    monkeypatch.setitem(sys.modules, "redis", None)
    with pytest.raises(StoreError, match=r"pip install 'postfix-mtasts\[redis\]'"):
        RedisStore(redis_server.url)


def test_the_keys_are_the_documented_layout(
    redis_server: RedisServer, opened: list[RedisStore], raw: redis.Redis, prefix: str
) -> None:
    store = open_redis(opened, redis_server.url, prefix)
    store.put(entry(checked_at=None, last_error="timeout"))
    assert store.lease("example.com", "daemon-1", 30.0)
    assert raw.get(f"{prefix}schema") == str(SCHEMA_VERSION).encode()
    assert raw.hgetall(f"{prefix}d:example.com") == {
        b"record_id": b"20240101T000000",
        b"policy_text": POLICY.encode(),
        b"fetched_at": b"1000.0",
        b"expires_at": b"87400.0",
        b"last_error": b"timeout",
        b"backoff_until": b"0.0",
    }
    assert raw.zrange(f"{prefix}used", 0, -1, withscores=True) == [(b"example.com", 1200.0)]
    assert raw.get(f"{prefix}lease:example.com") == b"daemon-1"
    assert 25_000 < raw.pttl(f"{prefix}lease:example.com") <= 30_000
    store.release("example.com", "daemon-1")
    assert raw.exists(f"{prefix}lease:example.com") == 0


def test_stores_opened_at_once_on_a_new_prefix_agree_on_its_version(
    redis_server: RedisServer, opened: list[RedisStore], raw: redis.Redis, prefix: str
) -> None:
    barrier = threading.Barrier(8)
    errors: list[BaseException] = []

    def open_one() -> None:
        barrier.wait()
        try:
            open_redis(opened, redis_server.url, prefix).put(entry())
        except BaseException as exc:
            errors.append(exc)

    threads = [threading.Thread(target=open_one) for _ in range(8)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert errors == []
    assert raw.get(f"{prefix}schema") == b"1"


def test_a_store_of_a_newer_version_is_refused_and_left_as_it_was(
    redis_server: RedisServer, opened: list[RedisStore], raw: redis.Redis, prefix: str
) -> None:
    open_redis(opened, redis_server.url, prefix).put(entry())
    raw.set(f"{prefix}schema", "2")
    before = {key: raw.dump(key) for key in raw.keys(f"{prefix}*")}
    with pytest.raises(StoreError) as caught:
        RedisStore(redis_server.url, prefix=prefix)
    assert str(caught.value) == (
        f'{redis_server.url} prefix "{prefix}": written by a newer postfix-mtasts'
        f" (cache schema 2, this version knows {SCHEMA_VERSION})"
    )
    assert {key: raw.dump(key) for key in raw.keys(f"{prefix}*")} == before


def test_a_store_taken_over_by_a_newer_version_is_no_longer_written(
    redis_server: RedisServer, opened: list[RedisStore], raw: redis.Redis, prefix: str
) -> None:
    store = open_redis(opened, redis_server.url, prefix)
    store.put(entry("a.example"))
    raw.set(f"{prefix}schema", "2")
    for call in (
        lambda: store.put(entry("b.example")),
        lambda: store.touch({"a.example": 5000.0}),
        lambda: store.delete(["a.example"]),
        lambda: store.purge_unused(1e9),
    ):
        with pytest.raises(StoreError, match="cache schema 2, this version knows 1"):
            call()
    assert raw.exists(f"{prefix}d:b.example") == 0
    assert raw.zscore(f"{prefix}used", "a.example") == 1200.0
    # Reading is still allowed: the entries it holds are still ours to read.
    assert store.get("a.example") == entry("a.example")


def test_a_prefix_holding_something_else_is_refused(
    redis_server: RedisServer, raw: redis.Redis, prefix: str
) -> None:
    raw.set(f"{prefix}schema", "x" * 1000)
    with pytest.raises(StoreError, match="not a postfix-mtasts cache"):
        RedisStore(redis_server.url, prefix=prefix)
    assert raw.get(f"{prefix}schema") == b"x" * 1000


def test_a_store_emptied_by_a_restart_gets_its_version_back_with_the_next_write(
    redis_server: RedisServer, opened: list[RedisStore], raw: redis.Redis, prefix: str
) -> None:
    store = open_redis(opened, redis_server.url, prefix)
    raw.delete(f"{prefix}schema")
    store.put(entry())
    assert raw.get(f"{prefix}schema") == b"1"


# --- a tampered store -----------------------------------------------------------------------------


def test_tampered_entries_read_as_absent(
    redis_server: RedisServer, opened: list[RedisStore], raw: redis.Redis, prefix: str
) -> None:
    store = open_redis(opened, redis_server.url, prefix)
    for domain in (
        "huge.example",
        "wide.example",
        "long.example",
        "typed.example",
        "bytes.example",
    ):
        store.put(entry(domain))
    store.put(entry("good.example"))
    store.put(entry("grüße.example", policy_text="ü" * MAX_POLICY_TEXT))
    raw.hset(f"{prefix}d:huge.example", "policy_text", "x" * (MAX_POLICY_TEXT + 1))
    raw.hset(f"{prefix}d:wide.example", "policy_text", "ü" * (MAX_POLICY_TEXT + 1))
    raw.hset(f"{prefix}d:long.example", "last_error", "e" * (10 * MAX_POLICY_TEXT))
    raw.hset(f"{prefix}d:typed.example", "fetched_at", "soon")
    raw.hset(f"{prefix}d:bytes.example", "record_id", b"\xff\xfe")
    for domain in ("huge.example", "wide.example", "long.example", "typed.example"):
        assert store.get(domain) is None, domain
    assert store.get("bytes.example") is None
    assert store.get("good.example") == entry("good.example")
    assert store.get("grüße.example") == entry("grüße.example", policy_text="ü" * MAX_POLICY_TEXT)
    assert [e.domain for e in store.entries()] == ["good.example", "grüße.example"]
    # The next put for such a domain overwrites it.
    store.put(entry("huge.example"))
    assert store.get("huge.example") == entry("huge.example")


def test_an_oversized_entry_is_not_sent_to_the_daemon(
    redis_server: RedisServer, opened: list[RedisStore], raw: redis.Redis, prefix: str
) -> None:
    store = open_redis(opened, redis_server.url, prefix)
    store.put(entry("huge.example"))
    raw.hset(f"{prefix}d:huge.example", "policy_text", "x" * (64 * MAX_POLICY_TEXT))
    before = int(raw.info("stats")["total_net_output_bytes"])
    for _ in range(20):
        assert store.get("huge.example") is None
    sent = int(raw.info("stats")["total_net_output_bytes"]) - before
    # 20 reads of a 4 MiB text would be 80 MiB; 20 refusals are a few bytes each.
    assert sent < MAX_POLICY_TEXT


def test_an_index_with_names_that_cannot_be_domains_lists_what_it_can(
    redis_server: RedisServer, opened: list[RedisStore], raw: redis.Redis, prefix: str
) -> None:
    store = open_redis(opened, redis_server.url, prefix)
    store.put(entry("a.example"))
    names: dict[bytes, float] = {b"x" * 100_000: 1.0, b"\xff.example": 2.0, b"ghost.example": 3.0}
    raw.zadd(f"{prefix}used", names)
    assert [e.domain for e in store.entries()] == ["a.example"]


# --- notifications --------------------------------------------------------------------------------


def _collect(watcher: RedisWatcher, wanted: set[str], within: float = 5.0) -> set[str]:
    seen: set[str] = set()
    deadline = time.monotonic() + within
    while not wanted <= seen and time.monotonic() < deadline:
        got = watcher.wait(0.2)
        assert got != ALL
        seen |= got
    return seen


def test_malformed_announcements_are_ignored(
    redis_server: RedisServer, opened: list[RedisStore], raw: redis.Redis, prefix: str
) -> None:
    store = open_redis(opened, redis_server.url, prefix)
    watcher = store.watch()
    try:
        channel = f"{prefix}changes"
        for payload in [
            b"",
            b"0123456789abcdef",  # an origin and no name
            b"0123456789abcdef  two.spaces.example",
            b"0123456789abcdef caf\xc3\xa9.example",
            b"\xff\xfe garbage",
            b"0123456789abcdef " + b"x" * 254,  # a name too long
            b"0123456789abcdef "
            + b" ".join(b"d%d.example" % n for n in range(MAX_DOMAIN_NAMES + 1)),
            b"0123456789abcdef " + b"a" * 10_000_000,
            f"{store.origin} own.example".encode(),  # its own, however it came
        ]:
            raw.publish(channel, payload)
        raw.publish(channel, b"0123456789abcdef good.example other.example")
        assert _collect(watcher, {"good.example", "other.example"}) == {
            "good.example",
            "other.example",
        }
        assert watcher.wait(0.3) == frozenset()
    finally:
        watcher.close()


def test_a_big_delete_is_announced_in_batches_another_watcher_reads(
    redis_server: RedisServer, opened: list[RedisStore], prefix: str
) -> None:
    writer = open_redis(opened, redis_server.url, prefix)
    reader = open_redis(opened, redis_server.url, prefix)
    domains = {f"d{n}.example" for n in range(2 * MAX_DOMAIN_NAMES + 10)}
    for domain in sorted(domains):
        writer.put(entry(domain))
    watcher = reader.watch()
    try:
        assert writer.delete(domains | {"never.example"}) == len(domains)
        assert _collect(watcher, domains, 10.0) == domains
    finally:
        watcher.close()


# --- the server going away ------------------------------------------------------------------------


def test_a_stopped_server_fails_calls_quickly_and_the_same_store_works_after_it_returns(
    redis_server: RedisServer, opened: list[RedisStore], prefix: str
) -> None:
    store = open_redis(opened, redis_server.url, prefix, timeout=1.0)
    writer = open_redis(opened, redis_server.url, prefix)
    store.put(entry("before.example"))
    watcher = store.watch()
    try:
        redis_server.stop()
        where = f'{redis_server.url} prefix "{prefix}"'
        for call in (
            lambda: store.get("before.example"),
            lambda: store.put(entry("during.example")),
            lambda: store.touch({"before.example": 2000.0}),
            lambda: store.lease("before.example", "me", 10.0),
            lambda: list(store.entries()),
        ):
            started = time.monotonic()
            with pytest.raises(StoreError) as caught:
                call()
            assert str(caught.value).startswith(f"{where}: cannot ")
            assert time.monotonic() - started < 4.0
        with pytest.raises(StoreError, match=rf"^{where}: cannot watch for changes"):
            watcher.wait(1.0)
        # Still down: the watcher's next try fails too, without waiting long.
        started = time.monotonic()
        with pytest.raises(StoreError, match=rf"^{where}: cannot watch for changes again"):
            watcher.wait(1.0)
        assert time.monotonic() - started < 4.0
    finally:
        redis_server.start()
    # The server came back empty (it keeps nothing on disk): the same objects work again.
    assert store.get("before.example") is None
    store.put(entry("after.example"))
    assert store.get("after.example") == entry("after.example")
    assert watcher.wait(1.0) == ALL
    writer.put(entry("news.example"))
    assert _collect(watcher, {"news.example"}) == {"news.example"}
    watcher.close()


def test_a_hung_server_fails_calls_after_the_timeout(
    redis_server: RedisServer, opened: list[RedisStore], prefix: str
) -> None:
    store = open_redis(opened, redis_server.url, prefix, timeout=0.5)
    store.put(entry())
    redis_server.pause()
    try:
        started = time.monotonic()
        with pytest.raises(StoreError, match=r"cannot read example\.com: .*[Tt]imeout"):
            store.get("example.com")
        assert time.monotonic() - started < 4.0
        # A new connection is bounded too (the server accepts it and never answers).
        started = time.monotonic()
        with pytest.raises(StoreError, match="cannot open"):
            RedisStore(redis_server.url, prefix=prefix, timeout=0.5)
        assert time.monotonic() - started < 4.0
    finally:
        redis_server.resume()
    assert store.get("example.com") == entry()


# --- TLS ------------------------------------------------------------------------------------------


class _TlsRedis:
    """A redis-server of this module's own that speaks only TLS, with a certificate for
    localhost from a CA made for the test (which the system's CA store does not know)."""

    def __init__(self, directory: Path) -> None:
        self.dir = directory
        self.ca = directory / "ca.pem"
        self.port = free_port()
        self.process: subprocess.Popen[bytes] | None = None

    def _openssl(self, *args: str) -> None:
        subprocess.run(["openssl", *args], cwd=self.dir, check=True, capture_output=True)

    def start(self) -> None:
        self._openssl(
            "req", "-x509", "-newkey", "rsa:2048", "-nodes", "-keyout", "ca.key", "-out",
            "ca.pem", "-days", "2", "-subj", "/CN=postfix-mtasts test CA",
        )  # fmt: skip
        self._openssl(
            "req", "-newkey", "rsa:2048", "-nodes", "-keyout", "server.key", "-out",
            "server.csr", "-subj", "/CN=localhost",
        )  # fmt: skip
        (self.dir / "san.ext").write_text("subjectAltName=DNS:localhost,IP:127.0.0.1\n")
        self._openssl(
            "x509", "-req", "-in", "server.csr", "-CA", "ca.pem", "-CAkey", "ca.key",
            "-CAcreateserial", "-out", "server.pem", "-days", "2", "-extfile", "san.ext",
        )  # fmt: skip
        config = self.dir / "redis.conf"
        config.write_text(
            f'port 0\ntls-port {self.port}\nbind 127.0.0.1\ndir {self.dir}\nsave ""\n'
            f"tls-cert-file {self.dir}/server.pem\ntls-key-file {self.dir}/server.key\n"
            f"tls-ca-cert-file {self.dir}/ca.pem\ntls-auth-clients no\n"
        )
        log = self.dir / "redis.log"
        with log.open("ab") as out:
            self.process = subprocess.Popen(
                ["redis-server", str(config)], stdout=out, stderr=subprocess.STDOUT
            )
        _wait_for_port(self.port, self.process, log, "redis-server (TLS)")

    def stop(self) -> None:
        if self.process is not None:
            self.process.terminate()
            self.process.wait(10)


@pytest.fixture(scope="module")
def tls_redis(tmp_path_factory: pytest.TempPathFactory) -> Iterator[_TlsRedis]:
    server = _TlsRedis(tmp_path_factory.mktemp("redis-tls"))
    try:
        server.start()
    except (ServerError, subprocess.CalledProcessError) as exc:
        server.stop()
        pytest.fail(f"a TLS redis-server did not start: {exc}", pytrace=False)
    yield server
    server.stop()


def test_rediss_checks_the_certificate_against_the_system_ca_store(
    tls_redis: _TlsRedis, prefix: str
) -> None:
    with pytest.raises(StoreError, match="certificate verify failed"):
        RedisStore(f"rediss://localhost:{tls_redis.port}/0", prefix=prefix)


def test_rediss_reaches_a_server_whose_ca_is_named_in_the_url(
    tls_redis: _TlsRedis, opened: list[RedisStore], prefix: str
) -> None:
    url = f"rediss://localhost:{tls_redis.port}/0?ssl_ca_certs={tls_redis.ca}"
    store = open_redis(opened, url, prefix)
    store.put(entry())
    assert store.get("example.com") == entry()


def test_a_watcher_closed_while_another_thread_waits_ends_that_wait_quietly(
    redis_server: RedisServer, opened: list[RedisStore], prefix: str
) -> None:
    store = open_redis(opened, redis_server.url, prefix)
    watcher = store.watch()
    outcome: list[object] = []

    def wait() -> None:
        try:
            outcome.append(watcher.wait(3.0))
        except BaseException as exc:
            outcome.append(exc)

    thread = threading.Thread(target=wait)
    thread.start()
    time.sleep(0.3)
    watcher.close()
    thread.join(10)
    assert outcome == [frozenset()]
    with pytest.raises(StoreError, match="closed"):
        watcher.wait(0.1)
    store.close()
    with pytest.raises(StoreError, match=r"cannot watch for changes: the store is closed"):
        store.watch()
