"""The Redis store: one cache shared by a fleet of daemons, through redis-py.

Key layout (version `SCHEMA_VERSION`, under a prefix, "postfix-mtasts:" unless configured):

- ``{prefix}schema``: the layout's version. A store of a newer version is refused at open and
  never written to; every write checks it again on the server (in the same script), so a store
  that a newer postfix-mtasts took over while this daemon ran is not written to either, and a
  store emptied by a server restart gets its version back with the first write.
- ``{prefix}d:{domain}``: a hash per domain with the fields of `Entry` except ``domain`` and
  ``last_used``; a field that is None is absent.
- ``{prefix}used``: a sorted set of the domains by ``last_used``. It is the index that
  `purge_unused` and `entries` walk, and it alone holds ``last_used``, so that `touch` is one
  ``ZADD XX GT``: it skips domains without an entry and never moves a time backwards.
- ``{prefix}lease:{domain}``: the holder of the domain's lease, expiring by itself (``PX``: the
  server's clock, so the machines of a fleet need not agree on the time).
- ``{prefix}changes``: the pub/sub channel on which `put` and `delete` announce the changed
  domains (``ORIGIN DOMAIN DOMAIN ...``), published by the script that makes the change.

Every write is one Lua script: a script runs atomically, so an entry, its index and its
announcement are written together or not at all. Reads of an entry go through a script too,
which measures each field before sending it: a tampered entry with an oversized field reads as
absent without being transferred.

One client with one connection pool serves the store's threads; every socket operation,
connecting included, is bounded by the store's ``timeout``. A failed command is retried once at
once when the connection broke (a pooled connection that the server closed while it restarted),
never after a timeout: a stopped server fails at once, a hung one after ``timeout``. Every failure
is StoreError("<url> prefix "<prefix>": <doing>: <cause>"), never with a password; the next call
after the server came back works again.

redis-py is an extra (``pip install 'postfix-mtasts[redis]'``), imported only when a Redis store is
opened.
"""

from __future__ import annotations

import math
import re
import secrets
import threading
import time
from collections.abc import Iterable, Iterator, Mapping
from contextlib import contextmanager
from typing import TYPE_CHECKING, Any, Literal

from postfix_mtasts.store import (
    ALL,
    DEFAULT_PREFIX,
    MAX_DOMAIN_NAMES,
    MAX_POLICY_TEXT,
    Entry,
    ForeignFileError,
    NewerSchemaError,
    StoreError,
    announced,
    announcements,
    check_entry,
    where_of,
)

if TYPE_CHECKING:
    import redis as redis_py
    from redis.client import PubSub
    from redis.commands.core import Script

__all__ = ["DEFAULT_PREFIX", "SCHEMA_VERSION", "RedisStore"]

# The version of the key layout above, in {prefix}schema. Raise it with a migration in _open().
SCHEMA_VERSION = 1
# A prefix is part of every key: printable, without spaces, of a sensible length.
_PREFIX = re.compile(r"[!-~]{1,200}")
# A field of an entry read from the server: policy_text is at most MAX_POLICY_TEXT characters of
# up to 4 bytes each in UTF-8; the other fields are short by nature (numbers, a record id, an
# error message). Anything longer was not written by us.
_MAX_POLICY_BYTES = 4 * MAX_POLICY_TEXT
_MAX_FIELD_BYTES = MAX_POLICY_TEXT
# How often an idle pooled connection is checked with a PING before use.
_HEALTH_CHECK_INTERVAL = 30
# Domains per script call in touch, delete, purge_unused and entries: each script blocks the
# server while it runs, so big batches are split.
_BATCH = 500
# An announcement: an origin (secrets.token_hex(8) of another store object) and up to
# MAX_DOMAIN_NAMES names; anything longer is ignored.
_MAX_PAYLOAD = 65 + 254 * MAX_DOMAIN_NAMES
# Messages a watcher takes in one wait() once the first came: it returns promptly under a flood.
_MAX_MESSAGES_PER_WAIT = 1000

# The fields of the hash, in the order the read script returns them.
_FIELDS = (
    "record_id",
    "policy_text",
    "fetched_at",
    "expires_at",
    "checked_at",
    "last_error",
    "backoff_until",
)

# Every writing script starts by checking the layout's version (KEYS[1], ARGV[1]): set when the
# store is new (emptied by a restart without persistence), refused when it is not ours.
_CHECK_SCHEMA = """
local version = redis.call('GET', KEYS[1])
if version == false then
  redis.call('SET', KEYS[1], ARGV[1])
elseif version ~= ARGV[1] then
  return redis.error_reply('SCHEMA the store has cache schema ' .. string.sub(version, 1, 20)
    .. ', this version knows ' .. ARGV[1])
end
"""

# KEYS: schema. ARGV: version. Returns the version held (new stores get ours), or false when the
# value is too long to be a version.
_OPEN = """
redis.call('SET', KEYS[1], ARGV[1], 'NX')
if redis.call('STRLEN', KEYS[1]) > 20 then return false end
return redis.call('GET', KEYS[1])
"""

# KEYS: entry hash, index. ARGV: domain, MAX_POLICY_TEXT, byte limit of policy_text, byte limit
# of the others. Returns {last_used, field values in _FIELDS order}, or false when absent or
# oversized. A policy_text is counted in characters (the UTF-8 bytes that do not continue a
# character) on the server, and only when its length in bytes leaves a doubt.
_GET = f"""
if redis.call('EXISTS', KEYS[1]) == 0 then return false end
local fields = {{{", ".join(f"'{name}'" for name in _FIELDS)}}}
for _, field in ipairs(fields) do
  local limit = tonumber(ARGV[4])
  if field == 'policy_text' then limit = tonumber(ARGV[3]) end
  if redis.call('HSTRLEN', KEYS[1], field) > limit then return false end
end
if redis.call('HSTRLEN', KEYS[1], 'policy_text') > tonumber(ARGV[2]) then
  local text = redis.call('HGET', KEYS[1], 'policy_text')
  local _, characters = string.gsub(text, '[^\\128-\\191]', '')
  if characters > tonumber(ARGV[2]) then return false end
end
local used = redis.call('ZSCORE', KEYS[2], ARGV[1])
if used == false then return false end
local values = redis.call('HMGET', KEYS[1], unpack(fields))
table.insert(values, 1, used)
return values
"""

# KEYS: schema, entry hash, index. ARGV: version, domain, last_used, channel, announcement
# ("" for none), then field, value pairs.
_PUT = (
    _CHECK_SCHEMA
    + """
redis.call('DEL', KEYS[2])
redis.call('HSET', KEYS[2], unpack(ARGV, 6))
redis.call('ZADD', KEYS[3], ARGV[3], ARGV[2])
if ARGV[5] ~= '' then redis.call('PUBLISH', ARGV[4], ARGV[5]) end
return 1
"""
)

# KEYS: schema, index. ARGV: version, then last_used, domain pairs.
_TOUCH = (
    _CHECK_SCHEMA
    + """
redis.call('ZADD', KEYS[2], 'XX', 'GT', unpack(ARGV, 2))
return 1
"""
)

# KEYS: schema, index. ARGV: version, prefix, channel, origin, then domains. Deletes the entries,
# announces those that existed (and can be announced); returns how many existed.
_DELETE = (
    _CHECK_SCHEMA
    + """
local gone = {}
local count = 0
for i = 5, #ARGV do
  local domain = ARGV[i]
  redis.call('ZREM', KEYS[2], domain)
  if redis.call('DEL', ARGV[2] .. 'd:' .. domain) == 1 then
    count = count + 1
    if #domain <= 253 and not string.find(domain, '[^!-~]') then
      gone[#gone + 1] = domain
    end
  end
end
if #gone > 0 then redis.call('PUBLISH', ARGV[3], ARGV[4] .. ' ' .. table.concat(gone, ' ')) end
return count
"""
)

# KEYS: schema, index. ARGV: version, prefix, before, negative (bounds as ZRANGEBYSCORE takes
# them), before as a number, offset, count. Looks at up to `count` domains last used before
# `negative` from `offset` on, and deletes those last used before `before` and those without a
# policy. Returns {deleted, kept, looked at}.
_PURGE = (
    _CHECK_SCHEMA
    + """
local found = redis.call('ZRANGEBYSCORE', KEYS[2], '-inf', '(' .. ARGV[4], 'WITHSCORES',
  'LIMIT', ARGV[6], ARGV[7])
local before = tonumber(ARGV[5])
local deleted, kept = 0, 0
for i = 1, #found, 2 do
  local domain = found[i]
  local key = ARGV[2] .. 'd:' .. domain
  if tonumber(found[i + 1]) < before or redis.call('HEXISTS', key, 'policy_text') == 0 then
    deleted = deleted + redis.call('DEL', key)
    redis.call('ZREM', KEYS[2], domain)
  else
    kept = kept + 1
  end
end
return {deleted, kept, #found / 2}
"""
)

# KEYS: index. ARGV: first and last rank. Returns {how many were looked at, the names among them
# short enough to be domain names}: a tampered index cannot make the daemon read long names.
_NAMES = """
local found = redis.call('ZRANGE', KEYS[1], ARGV[1], ARGV[2])
local names = {}
for _, name in ipairs(found) do
  if #name <= 253 then names[#names + 1] = name end
end
return {#found, names}
"""

# KEYS: lease. ARGV: holder, milliseconds. Taken when free (an expired lease is gone), renewed by
# its holder.
_LEASE = """
local holder = redis.call('GET', KEYS[1])
if holder == false or holder == ARGV[1] then
  redis.call('SET', KEYS[1], ARGV[1], 'PX', ARGV[2])
  return 1
end
return 0
"""

# KEYS: lease. ARGV: holder.
_RELEASE = """
if redis.call('GET', KEYS[1]) == ARGV[1] then redis.call('DEL', KEYS[1]) end
return 1
"""


def _redis_module(where: str) -> Any:
    try:
        import redis
    except ImportError as exc:
        raise StoreError(
            f"{where}: cannot open: the Python package redis is not installed"
            " (pip install 'postfix-mtasts[redis]')"
        ) from exc
    return redis


def _number(value: float) -> str:
    # repr() gives the shortest text that reads back as the same float; Redis and Lua read
    # "inf" and "-inf" too.
    return repr(float(value))


class RedisStore:
    """The cache in the Redis server named by ``url`` (``redis://[user:password@]host:port/db``,
    ``rediss://...`` for TLS checked against the system's CA store, ``unix:///path?db=N``), under
    the key prefix ``prefix`` ("" for ``DEFAULT_PREFIX``); ``timeout`` bounds every operation on
    the server (connecting included)."""

    instant = False
    shared = True

    def __init__(self, url: str, *, prefix: str = "", timeout: float = 1.0) -> None:
        self.prefix = prefix or DEFAULT_PREFIX
        self.where = where_of("redis", "", url, self.prefix)
        self.origin = secrets.token_hex(8)
        self.timeout = timeout
        if not _PREFIX.fullmatch(self.prefix):
            raise StoreError(
                f"{self.where}: cannot open: a key prefix is 1 to 200 printable ASCII characters"
                " without spaces"
            )
        self._redis = _redis_module(self.where)
        self._errors: tuple[type[BaseException], ...] = (self._redis.RedisError, UnicodeError)
        # Kept only to mask it, should a library put it into an error message.
        self._password = ""
        self._lock = threading.Lock()
        self._closed = False
        self._url = url
        try:
            self._password = self._redis.connection.parse_url(url).get("password") or ""
        except ValueError as exc:
            raise StoreError(f"{self.where}: cannot open: {exc}") from exc
        self._client: redis_py.Redis = self._redis.Redis(connection_pool=self._pool(retries=1))
        self._schema_key = f"{self.prefix}schema"
        self._index_key = f"{self.prefix}used"
        self._channel = f"{self.prefix}changes"
        self._scripts: dict[str, Script] = {
            name: self._client.register_script(source)
            for name, source in (
                ("open", _OPEN),
                ("get", _GET),
                ("put", _PUT),
                ("touch", _TOUCH),
                ("delete", _DELETE),
                ("purge", _PURGE),
                ("names", _NAMES),
                ("lease", _LEASE),
                ("release", _RELEASE),
            )
        }
        try:
            self._open()
        except BaseException:
            self._client.connection_pool.disconnect()
            raise

    def __repr__(self) -> str:
        return f"<RedisStore {self.where}>"

    def _pool(self, *, retries: int) -> redis_py.ConnectionPool:
        """A connection pool on the store's server. ``retries``: how often a command is sent
        again at once on a new connection when its connection broke (not when it timed out)."""
        retry = self._redis.retry.Retry(
            self._redis.backoff.NoBackoff(),
            retries,
            supported_errors=(self._redis.ConnectionError,),
        )
        try:
            pool: redis_py.ConnectionPool = self._redis.ConnectionPool.from_url(
                self._url,
                socket_timeout=self.timeout,
                socket_connect_timeout=self.timeout,
                health_check_interval=_HEALTH_CHECK_INTERVAL,
                retry=retry,
                protocol=2,
            )
        except (ValueError, TypeError) as exc:
            raise StoreError(f"{self.where}: cannot open: {exc}") from exc
        return pool

    def _open(self) -> None:
        with self._doing("cannot open"):
            held = self._scripts["open"](
                keys=[self._schema_key], args=[str(SCHEMA_VERSION)], client=self._client
            )
        text = held.decode("ascii", "replace") if isinstance(held, bytes) else ""
        if text.isdigit() and int(text) > SCHEMA_VERSION:
            raise NewerSchemaError(
                f"{self.where}: written by a newer postfix-mtasts (cache schema {int(text)},"
                f" this version knows {SCHEMA_VERSION})"
            )
        if text != str(SCHEMA_VERSION):
            held_text = repr(text) if text else "something else"
            raise ForeignFileError(
                f"{self.where}: not a postfix-mtasts cache: {self._schema_key} holds"
                f" {held_text} where a cache schema version belongs; refusing to use it"
            )

    @contextmanager
    def _doing(self, doing: str) -> Iterator[None]:
        """Turn every failure of the library into StoreError naming the store and ``doing``."""
        if self._closed:
            raise StoreError(f"{self.where}: {doing}: the store is closed")
        try:
            yield
        except self._errors as exc:
            raise self._error(doing, exc) from exc

    def _error(self, doing: str, exc: BaseException) -> StoreError:
        cause = str(exc) or type(exc).__name__
        if cause.startswith("SCHEMA "):
            cause = cause.removeprefix("SCHEMA ") + " (a newer postfix-mtasts took it over?)"
        if self._password:
            cause = cause.replace(self._password, "***")
        if self._closed:
            cause = f"the store is closed ({cause})"
        return StoreError(f"{self.where}: {doing}: {cause}")

    def _key(self, domain: str) -> str:
        return f"{self.prefix}d:{domain}"

    # -- entries ---------------------------------------------------------------------------------

    def get(self, domain: str) -> Entry | None:
        with self._doing(f"cannot read {domain}"):
            found = self._scripts["get"](
                keys=[self._key(domain), self._index_key],
                args=[domain, MAX_POLICY_TEXT, _MAX_POLICY_BYTES, _MAX_FIELD_BYTES],
                client=self._client,
            )
        return _entry(domain, found)

    def put(self, entry: Entry) -> None:
        check_entry(entry, self.where)
        pairs: list[str] = []
        for name in _FIELDS:
            value = getattr(entry, name)
            if value is not None:
                pairs += [name, value if isinstance(value, str) else _number(value)]
        announcement = "".join(announcements(self.origin, [entry.domain], _MAX_PAYLOAD))
        with self._doing(f"cannot store {entry.domain}"):
            self._scripts["put"](
                keys=[self._schema_key, self._key(entry.domain), self._index_key],
                args=[
                    str(SCHEMA_VERSION),
                    entry.domain,
                    _number(entry.last_used),
                    self._channel,
                    announcement,
                    *pairs,
                ],
                client=self._client,
            )

    def touch(self, last_used: Mapping[str, float]) -> None:
        items = list(last_used.items())
        with self._doing(f"cannot update last use of {len(items)} domains"):
            for start in range(0, len(items), _BATCH):
                args: list[str] = [str(SCHEMA_VERSION)]
                for domain, when in items[start : start + _BATCH]:
                    args += [_number(when), domain]
                self._scripts["touch"](
                    keys=[self._schema_key, self._index_key], args=args, client=self._client
                )

    def purge_unused(self, before: float, without_policy_before: float | None = None) -> int:
        negative = before if without_policy_before is None else max(before, without_policy_before)
        deleted = 0
        offset = 0
        with self._doing("cannot purge unused entries"):
            while True:
                done, kept, looked_at = self._scripts["purge"](
                    keys=[self._schema_key, self._index_key],
                    args=[
                        str(SCHEMA_VERSION),
                        self.prefix,
                        _number(before),
                        _number(negative),
                        _number(before),
                        offset,
                        _BATCH,
                    ],
                    client=self._client,
                )
                deleted += int(done)
                # Deleted domains left the range; the kept ones are skipped next time.
                offset += int(kept)
                if int(looked_at) < _BATCH:
                    return deleted

    def delete(self, domains: Iterable[str]) -> int:
        unique = sorted(set(domains))
        deleted = 0
        # One announcement per batch: at most MAX_DOMAIN_NAMES names each.
        size = min(_BATCH, MAX_DOMAIN_NAMES)
        with self._doing(f"cannot delete {len(unique)} entries"):
            for start in range(0, len(unique), size):
                deleted += int(
                    self._scripts["delete"](
                        keys=[self._schema_key, self._index_key],
                        args=[
                            str(SCHEMA_VERSION),
                            self.prefix,
                            self._channel,
                            self.origin,
                            *unique[start : start + size],
                        ],
                        client=self._client,
                    )
                )
        return deleted

    def entries(self) -> Iterator[Entry]:
        names: set[str] = set()
        with self._doing("cannot list entries"):
            start = 0
            while True:
                looked_at, batch = self._scripts["names"](
                    keys=[self._index_key], args=[start, start + _BATCH - 1], client=self._client
                )
                for name in batch:
                    try:
                        names.add(name.decode("utf-8"))
                    except UnicodeDecodeError:
                        continue  # not a name we wrote
                if int(looked_at) < _BATCH:
                    break
                start += _BATCH
        return self._entries(sorted(names))

    def _entries(self, names: list[str]) -> Iterator[Entry]:
        for start in range(0, len(names), _BATCH):
            batch = names[start : start + _BATCH]
            with self._doing("cannot list entries"):
                pipe = self._client.pipeline(transaction=False)
                for domain in batch:
                    self._scripts["get"](
                        keys=[self._key(domain), self._index_key],
                        args=[domain, MAX_POLICY_TEXT, _MAX_POLICY_BYTES, _MAX_FIELD_BYTES],
                        client=pipe,
                    )
                found = pipe.execute()
            for domain, values in zip(batch, found, strict=True):
                entry = _entry(domain, values)
                if entry is not None:
                    yield entry

    # -- leases ----------------------------------------------------------------------------------

    def lease(self, domain: str, holder: str, seconds: float) -> bool:
        milliseconds = max(1, math.ceil(seconds * 1000))
        with self._doing(f"cannot take the lease on {domain}"):
            taken = self._scripts["lease"](
                keys=[f"{self.prefix}lease:{domain}"],
                args=[holder, milliseconds],
                client=self._client,
            )
        return bool(taken)

    def release(self, domain: str, holder: str) -> None:
        with self._doing(f"cannot release the lease on {domain}"):
            self._scripts["release"](
                keys=[f"{self.prefix}lease:{domain}"], args=[holder], client=self._client
            )

    # -- changes ---------------------------------------------------------------------------------

    def watch(self) -> RedisWatcher:
        if self._closed:
            raise StoreError(f"{self.where}: cannot watch for changes: the store is closed")
        return RedisWatcher(self)

    def close(self) -> None:
        with self._lock:
            if self._closed:
                return
            self._closed = True
        self._client.connection_pool.disconnect()


class RedisWatcher:
    """The changes other users of a Redis store announce on its channel, read on a connection of
    its own (subscribed before the constructor returns). A broken connection is not reconnected
    behind the caller's back: `wait` raises, and the next `wait` subscribes again and returns
    ``ALL``, since announcements made in between are lost (pub/sub keeps nothing)."""

    def __init__(self, store: RedisStore) -> None:
        self._store = store
        self._channel = store._channel.encode()
        self._origin = store.origin
        # Never retried inside the library: a lost connection must be seen, to answer ALL.
        self._pool = store._pool(retries=0)
        self._pubsub: PubSub | None = None
        self._closed = False
        self._subscribe("cannot watch for changes")

    def _subscribe(self, doing: str) -> None:
        store = self._store
        pubsub = store._redis.Redis(connection_pool=self._pool).pubsub()
        try:
            with store._doing(doing):
                pubsub.subscribe(self._channel)
                # Subscribed once the server confirmed it: changes made after this are heard.
                deadline = time.monotonic() + store.timeout
                while True:
                    message = pubsub.get_message(timeout=max(0.0, deadline - time.monotonic()))
                    if message is not None and message.get("type") == "subscribe":
                        break
                    if time.monotonic() >= deadline:
                        raise store._redis.TimeoutError("no confirmation of SUBSCRIBE in time")
        except BaseException:
            pubsub.close()
            self._pool.disconnect()
            raise
        self._pubsub = pubsub

    def wait(self, timeout: float) -> frozenset[str] | Literal["all"]:
        store = self._store
        if self._closed:
            raise StoreError(f"{store.where}: cannot watch for changes: the watcher is closed")
        if self._pubsub is None:
            self._subscribe("cannot watch for changes again")
            return ALL
        pubsub = self._pubsub
        changed: set[str] = set()
        deadline = time.monotonic() + timeout
        taken = 0
        try:
            with store._doing("cannot watch for changes"):
                while taken < _MAX_MESSAGES_PER_WAIT:
                    # Block for the first announcement; then take what has come already.
                    left = 0.0 if changed else deadline - time.monotonic()
                    message = pubsub.get_message(timeout=max(0.0, left))
                    if message is None:
                        if changed or time.monotonic() >= deadline:
                            break
                        continue
                    taken += 1
                    if message.get("type") == "message":
                        data = message.get("data")
                        if isinstance(data, bytes):
                            changed |= announced(data, self._origin, _MAX_PAYLOAD)
        except StoreError:
            self._pubsub = None
            pubsub.close()
            self._pool.disconnect()
            if self._closed:
                # close() from another thread broke the connection: not a failure of the store.
                return frozenset()
            raise
        return frozenset(changed)

    def close(self) -> None:
        self._closed = True
        pubsub, self._pubsub = self._pubsub, None
        if pubsub is not None:
            pubsub.close()
        self._pool.disconnect()


def _entry(domain: str, found: object) -> Entry | None:
    """The entry the read script returned, or None when it was absent, oversized, or holds a
    field that is not what we write (a tampered store reads as absent, like SQLite's)."""
    if not isinstance(found, list) or len(found) != len(_FIELDS) + 1:
        return None
    try:
        used, record_id, policy, fetched, expires, checked, error, until = (
            value.decode("utf-8") if isinstance(value, bytes) else None for value in found
        )
        if used is None or error is None or until is None:
            return None
        if policy is not None and len(policy) > MAX_POLICY_TEXT:
            return None
        return Entry(
            domain=domain,
            record_id=record_id,
            policy_text=policy,
            fetched_at=None if fetched is None else float(fetched),
            expires_at=None if expires is None else float(expires),
            checked_at=None if checked is None else float(checked),
            last_used=float(used),
            last_error=error,
            backoff_until=float(until),
        )
    except ValueError:
        # UnicodeDecodeError is a ValueError too.
        return None
