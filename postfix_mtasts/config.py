"""The configuration: one TOML file into typed, validated, frozen settings.

Every key is optional; with no file at all the daemon runs on a loopback listener, the system
resolver, the system CA store and a SQLite cache in a writable default place. A key this module
does not know, a value of the wrong type or out of range, is a `ConfigError` whose message names the
file, the dotted key and the cause, so `postfix-mtasts check-config` can tell a postmaster exactly
what to fix. `dump()` writes the effective settings back as TOML that `load()` accepts.

A value that cannot work is refused here, not found out later by the daemon: every duration and
count has an upper bound as well as a lower one, and the files the daemon will open (the CA file,
the log file, the cache file) are tried now, by the process reading the configuration, the way the
daemon opens them. `check-config` and `serve` both read the file through `load()`, so what one
accepts the other can start with.

docs/configuration.md is the reference of every key; keep the two in step.
"""

from __future__ import annotations

import contextlib
import importlib.util
import math
import os
import re
import ssl
import stat
import tomllib
from collections.abc import Mapping
from dataclasses import dataclass, field, replace
from logging.handlers import SysLogHandler
from typing import Literal, NoReturn, TypeVar, get_args
from urllib.parse import urlsplit

from postfix_mtasts.listeners import (
    InetListener,
    ListenerError,
    parse_listener,
    parse_nameserver,
)
from postfix_mtasts.store import DEFAULT_PREFIX, DEFAULT_TABLE

__all__ = [
    "DEFAULT_PATH",
    "CacheConfig",
    "Config",
    "ConfigError",
    "DaneConfig",
    "DnsConfig",
    "HttpsConfig",
    "LogConfig",
    "Profile",
    "ServerConfig",
    "default_cache_path",
    "dump",
    "load",
    "loads",
]

# Read by load(None), that is when no -c FILE was given, if it exists.
DEFAULT_PATH = "/etc/postfix-mtasts/config.toml"

Testing = Literal["notfound", "may", "secure"]
Backend = Literal["sqlite", "memory", "redis", "postgresql"]
LogLevel = Literal["debug", "info", "warning", "error"]
# How a fetched policy is read: "tolerant" accepts the defects whose meaning leaves no doubt
# (mtasts.DEFECTS), "strict" is RFC 8461's grammar exactly.
Parsing = Literal["tolerant", "strict"]

# The longest line read. tomllib reads a dotted key of n parts in time quadratic in n (it
# checks every prefix against the tables defined so far); with lines this short, what a line
# can cost is bounded, and reading a file takes time linear in its size (and no integer is
# longer than the 4300 digits int() reads). No key of ours needs more than three parts, and an
# array may span lines.
MAX_LINE = 1024

# Postfix waits up to 100 s for a socketmap reply (socketmap_table(5)); a later answer is lost.
POSTFIX_TIMEOUT = 100.0

# --- Upper bounds. None is unbounded: past each bound a value no longer does what its key is for,
# and a huge one breaks the arithmetic it feeds (https.timeout = 1e10 made every fetch fail with an
# OverflowError in the socket layer).

# Postfix's clients close a socketmap connection after 10 s idle (built in); an idle connection
# kept much longer only holds a slot that another client could use. An hour is ample.
MAX_IDLE_TIMEOUT = 3600.0
# One DNS query or question, one policy fetch or connection. No request waits past Postfix's
# 100 s; a longer network wait serves only a background lookup, holding a lookup slot
# (cache.max_lookups) all the while. Five times RFC 8461 §3.3's suggested one minute for a fetch.
MAX_NETWORK_TIMEOUT = 300.0
# RFC 8461 §3.2: max_age is at most 31557600 s (one year), so no policy lives longer; an interval
# of the cache (a check, a refresh, a remembered absence, a retry) need not be longer either.
MAX_CACHE_INTERVAL = 31557600.0
# Ten years without a use: past that an entry is history, not cache, and a longer bound would let
# the store keep every domain ever asked for for good.
MAX_UNUSED_AFTER = 10 * MAX_CACHE_INTERVAL
# Each connection is a file descriptor and buffers; a Postfix runs at most default_process_limit
# (100) smtp processes, each with one connection, so 100000 leaves room for a fleet behind one port.
MAX_CONNECTIONS = 100000
# Each running lookup holds sockets (DNS, HTTPS) and a worker; beyond 10000 the daemon would run
# out of file descriptors (issue 10: local exhaustion must never become a verdict on a domain).
MAX_LOOKUPS = 10000
# Ten million domains held take gigabytes of memory (benchmarks/README.md gives the cost of one).
# Below 1000 the memory front would keep reading a small site's everyday domains back from the
# store.
MIN_MEMORY_DOMAINS = 1000
# A store operation that takes longer than this is as good as failed: the cache is off the hot
# path, and a lookup waits for it.
MAX_STORE_TIMEOUT = 30.0
_PREFIX = re.compile(r"[!-~]{1,64}")
_TABLE = re.compile(r"[a-z_][a-z0-9_]{0,47}")
# The URL schemes of each shared backend.
_STORE_SCHEMES = {
    "redis": ("redis", "rediss", "unix"),
    "postgresql": ("postgresql", "postgres"),
}
MAX_MEMORY_DOMAINS = 10000000


class ConfigError(Exception):
    """A configuration that cannot be used; the message names the file, the key and the cause."""


def default_cache_path() -> str:
    """Where the SQLite cache lives when `cache.path` is not set.

    root: /var/lib/postfix-mtasts/cache.sqlite; any other user: the XDG state directory
    ($XDG_STATE_HOME, or ~/.local/state when that is unset or not absolute).
    """
    if os.geteuid() == 0:
        return "/var/lib/postfix-mtasts/cache.sqlite"
    state_home = os.environ.get("XDG_STATE_HOME", "")
    if not os.path.isabs(state_home):
        state_home = os.path.join(os.path.expanduser("~"), ".local", "state")
    return os.path.join(state_home, "postfix-mtasts", "cache.sqlite")


@dataclass(frozen=True)
class ServerConfig:
    max_connections: int = 1000
    idle_timeout: float = 60.0
    request_timeout: float = 90.0
    socket_mode: int = 0o660
    socket_owner: str = ""
    socket_group: str = ""
    user: str = ""
    group: str = ""
    pid_file: str = "/run/postfix-mtasts/postfix-mtasts.pid"


@dataclass(frozen=True)
class LogConfig:
    level: LogLevel = "info"
    syslog: bool = False
    syslog_facility: str = "mail"
    file: str = ""


@dataclass(frozen=True)
class DnsConfig:
    # Each as written in the file; listeners.parse_nameserver() splits one into (address, port).
    nameservers: tuple[str, ...] = ()
    timeout: float = 5.0
    lifetime: float = 10.0


@dataclass(frozen=True)
class HttpsConfig:
    ca_file: str = ""
    timeout: float = 10.0
    connect_timeout: float = 5.0
    allow_private_addresses: bool = False
    proxy: str = ""


@dataclass(frozen=True)
class CacheConfig:
    backend: Backend = "sqlite"
    path: str = field(default_factory=default_cache_path)
    txt_check_interval: float = 300.0
    refresh_interval: float = 86400.0
    unused_after: float = 2592000.0
    no_record_ttl: float = 300.0
    # RFC 8461 §3.3: after a failed fetch, at most one attempt per domain and id every five minutes.
    fetch_retry_interval: float = 300.0
    first_lookup_deadline: float = 30.0
    # The most network lookups (DNS and HTTPS of one policy domain) running at once; more wait
    # their turn within first_lookup_deadline.
    max_lookups: int = 100
    # The most policy domains held in memory: beyond it, domains without a policy are dropped
    # first, then the least recently used, which are read back from the store when asked again.
    memory_domains: int = 200000
    # The Redis or PostgreSQL server (backend "redis" or "postgresql"), the Redis key prefix and
    # the PostgreSQL table, and the bound on every operation on them, connecting included.
    url: str = ""
    prefix: str = DEFAULT_PREFIX
    table: str = DEFAULT_TABLE
    timeout: float = 1.0


@dataclass(frozen=True)
class Profile:
    """What one socketmap name answers: `[policy]`, or a `[maps.NAME]` that falls back to it."""

    testing: Testing = "notfound"
    tlsrpt: bool = False


@dataclass(frozen=True)
class DaneConfig:
    enabled: bool = False
    check_name: str = ""


@dataclass(frozen=True)
class MetricsConfig:
    # "" (off) or "inet:HOST:PORT": where Prometheus scrapes, never a socketmap listener.
    listen: str = ""


@dataclass(frozen=True)
class Config:
    listen: tuple[str, ...] = ("inet:127.0.0.1:8461",)
    server: ServerConfig = field(default_factory=ServerConfig)
    log: LogConfig = field(default_factory=LogConfig)
    dns: DnsConfig = field(default_factory=DnsConfig)
    https: HttpsConfig = field(default_factory=HttpsConfig)
    cache: CacheConfig = field(default_factory=CacheConfig)
    policy: Profile = field(default_factory=Profile)
    # Every map's profile is complete (fallbacks already applied), so profile() is one dict lookup.
    maps: Mapping[str, Profile] = field(default_factory=dict)
    dane: DaneConfig = field(default_factory=DaneConfig)
    metrics: MetricsConfig = field(default_factory=MetricsConfig)
    # [policy] parsing: one reading for every fetch, whichever map asked, so not in a Profile.
    parsing: Parsing = "tolerant"

    def profile(self, name: str) -> Profile:
        """The profile for socketmap NAME; a name without `[maps.NAME]` gets `[policy]`."""
        return self.maps.get(name, self.policy)

    @property
    def tolerant(self) -> bool:
        """Whether policies are read tolerantly (``[policy] parsing``)."""
        return self.parsing == "tolerant"


# --- loading -------------------------------------------------------------------------------------


def load(path: str | None, *, daemon_files: bool = True) -> Config:
    """Read and validate the file at `path`.

    None (no -c FILE): DEFAULT_PATH when it exists, else the built-in defaults. A path given
    explicitly must exist. `daemon_files`: also try the files only a starting daemon opens (the
    log file, the cache file); `query` and a reload (SIGHUP, maybe after dropping privileges,
    where a log file that cannot be reopened keeps the old one) do without.
    """
    if path is None:
        if not os.path.exists(DEFAULT_PATH):
            return Config()
        path = DEFAULT_PATH
    try:
        with open(path, "rb") as f:
            raw = f.read()
    except OSError as exc:
        raise ConfigError(f"{path}: cannot read: {exc.strerror or exc}") from exc
    try:
        text = raw.decode("utf-8")
    except UnicodeDecodeError as exc:
        line = raw[: exc.start].count(b"\n") + 1
        raise ConfigError(f"{path}: line {line}: not valid UTF-8") from exc
    return loads(text, source=path, daemon_files=daemon_files)


def loads(text: str, source: str = "<string>", *, daemon_files: bool = True) -> Config:
    """Validate TOML text; `source` names it in error messages (`daemon_files`: see load)."""
    for number, line in enumerate(text.split("\n"), start=1):
        if len(line) > MAX_LINE:
            raise ConfigError(
                f"{source}: line {number}: longer than {MAX_LINE} characters"
                " (split an array over several lines)"
            )
    try:
        data = tomllib.loads(text)
    except tomllib.TOMLDecodeError as exc:
        # The message ends "(at line N, column M)".
        raise ConfigError(f"{source}: TOML syntax error: {exc}") from exc
    except RecursionError as exc:
        # tomllib parses nested arrays and inline tables recursively; no key of ours nests.
        raise ConfigError(f"{source}: arrays or inline tables nested too deep") from exc
    return _parse(_Table(data, "", source), daemon_files)


def _parse(top: _Table, daemon_files: bool = True) -> Config:
    d = Config()
    listen = top.strings("listen", d.listen)
    if not listen:
        top.fail("listen", 'expected at least one listener; use "systemd" for socket activation')
    for i, spec in enumerate(listen):
        try:
            parse_listener(spec)
        except ListenerError as exc:
            top.fail(f"listen[{i}]", str(exc))

    t = top.table("server")
    s = d.server
    server = ServerConfig(
        max_connections=t.integer(
            "max_connections", s.max_connections, minimum=1, maximum=MAX_CONNECTIONS
        ),
        idle_timeout=t.seconds("idle_timeout", s.idle_timeout, at_most=MAX_IDLE_TIMEOUT),
        request_timeout=t.seconds(
            "request_timeout", s.request_timeout, below=POSTFIX_TIMEOUT, why=_POSTFIX_GIVES_UP
        ),
        socket_mode=t.file_mode("socket_mode", s.socket_mode),
        socket_owner=t.string("socket_owner", s.socket_owner),
        socket_group=t.string("socket_group", s.socket_group),
        user=t.string("user", s.user),
        group=t.string("group", s.group),
        pid_file=t.path("pid_file", s.pid_file),
    )
    t.close()

    t = top.table("log")
    lg = d.log
    log = LogConfig(
        level=t.choice("level", lg.level, get_args(LogLevel)),
        syslog=t.boolean("syslog", lg.syslog),
        syslog_facility=t.choice(
            "syslog_facility", lg.syslog_facility, tuple(sorted(SysLogHandler.facility_names))
        ),
        file=t.path("file", lg.file),
    )
    if log.file and daemon_files:
        _check_log_file(t, "file", log.file)
    t.close()

    t = top.table("dns")
    dn = d.dns
    nameservers = t.strings("nameservers", dn.nameservers)
    for i, spec in enumerate(nameservers):
        try:
            parse_nameserver(spec)
        except ValueError as exc:
            t.fail(f"nameservers[{i}]", str(exc))
    dns = DnsConfig(
        nameservers=nameservers,
        timeout=t.seconds("timeout", dn.timeout, at_most=MAX_NETWORK_TIMEOUT),
        lifetime=t.seconds("lifetime", dn.lifetime, at_most=MAX_NETWORK_TIMEOUT),
    )
    t.close()

    t = top.table("https")
    h = d.https
    ca_file = t.path("ca_file", h.ca_file)
    # A CA file that is not there, or holds no certificate, would fail every fetch, and every
    # domain would silently fall back to "no policy" (RFC 8461 fails open): refuse it now rather
    # than at the first fetch.
    if ca_file:
        _check_ca_file(t, "ca_file", ca_file)
    https = HttpsConfig(
        ca_file=ca_file,
        timeout=t.seconds("timeout", h.timeout, at_most=MAX_NETWORK_TIMEOUT),
        connect_timeout=t.seconds(
            "connect_timeout", h.connect_timeout, at_most=MAX_NETWORK_TIMEOUT
        ),
        allow_private_addresses=t.boolean("allow_private_addresses", h.allow_private_addresses),
        proxy=t.proxy_url("proxy", h.proxy),
    )
    t.close()

    t = top.table("cache")
    c = d.cache
    cache = CacheConfig(
        backend=t.choice("backend", c.backend, get_args(Backend)),
        path=t.path("path", c.path, required=True),
        txt_check_interval=t.seconds(
            "txt_check_interval", c.txt_check_interval, zero=True, at_most=MAX_CACHE_INTERVAL
        ),
        refresh_interval=t.seconds(
            "refresh_interval", c.refresh_interval, at_most=MAX_CACHE_INTERVAL
        ),
        unused_after=t.seconds("unused_after", c.unused_after, at_most=MAX_UNUSED_AFTER),
        no_record_ttl=t.seconds(
            "no_record_ttl", c.no_record_ttl, zero=True, at_most=MAX_CACHE_INTERVAL
        ),
        fetch_retry_interval=t.seconds(
            "fetch_retry_interval", c.fetch_retry_interval, zero=True, at_most=MAX_CACHE_INTERVAL
        ),
        first_lookup_deadline=t.seconds(
            "first_lookup_deadline",
            c.first_lookup_deadline,
            below=POSTFIX_TIMEOUT,
            why=_POSTFIX_GIVES_UP,
        ),
        max_lookups=t.integer("max_lookups", c.max_lookups, minimum=1, maximum=MAX_LOOKUPS),
        memory_domains=t.integer(
            "memory_domains",
            c.memory_domains,
            minimum=MIN_MEMORY_DOMAINS,
            maximum=MAX_MEMORY_DOMAINS,
        ),
    )
    if cache.backend == "sqlite" and daemon_files:
        _check_cache_file(t, "path", cache.path)
    cache = replace(
        cache,
        url=_store_url(t, cache.backend, c.url),
        prefix=t.string("prefix", c.prefix),
        table=t.string("table", c.table),
        timeout=t.seconds("timeout", c.timeout, at_most=MAX_STORE_TIMEOUT),
    )
    if not _PREFIX.fullmatch(cache.prefix):
        t.fail(
            "prefix",
            f"expected 1 to 64 printable characters without spaces, got {_show(cache.prefix)}",
        )
    if not _TABLE.fullmatch(cache.table):
        t.fail(
            "table",
            "expected a PostgreSQL name of lowercase letters, digits and '_' (at most 48,"
            f" not starting with a digit), got {_show(cache.table)}",
        )
    t.close()

    t = top.table("policy")
    policy = _profile(t, d.policy)
    parsing = t.choice("parsing", d.parsing, get_args(Parsing))
    t.close()

    maps_table = top.table("maps")
    maps: dict[str, Profile] = {}
    for name in maps_table.names():
        # Postfix takes the NAME after the last ':' of "socketmap:...:NAME" and sends "NAME key".
        if not name or not name.isprintable() or any(ch.isspace() or ch == ":" for ch in name):
            maps_table.fail(
                _dotted(name), "a socketmap name must be non-empty, without spaces or ':'"
            )
        t = maps_table.table(name)
        maps[name] = _profile(t, policy)
        t.close()
    maps_table.close()

    t = top.table("dane")
    dane = DaneConfig(
        enabled=t.boolean("enabled", d.dane.enabled),
        check_name=t.domain_name("check_name", d.dane.check_name),
    )
    t.close()

    t = top.table("metrics")
    metrics = MetricsConfig(listen=t.string("listen", d.metrics.listen))
    _check_metrics_listener(t, metrics.listen, listen)
    t.close()

    top.close()
    return Config(
        listen=listen,
        server=server,
        log=log,
        dns=dns,
        https=https,
        cache=cache,
        policy=policy,
        maps=maps,
        dane=dane,
        metrics=metrics,
        parsing=parsing,
    )


# Hosts that bind every address: a listener on one of them takes the port on all.
_ANY_ADDRESS = {"0.0.0.0", "::", ""}


def _check_metrics_listener(t: _Table, spec: str, socketmap: tuple[str, ...]) -> None:
    """``metrics.listen``: "" (off) or ``inet:HOST:PORT``, not one of the socketmap listeners
    (Prometheus speaks HTTP, Postfix the socketmap protocol: one port cannot serve both)."""
    if not spec:
        return
    try:
        where = parse_listener(spec)
    except ListenerError as exc:
        t.fail("listen", str(exc))
    if not isinstance(where, InetListener):
        t.fail("listen", f"expected inet:HOST:PORT (an HTTP listener), got {_show(spec)}")
    for other in socketmap:
        with contextlib.suppress(ListenerError):
            bound = parse_listener(other)
            if (
                isinstance(bound, InetListener)
                and bound.port == where.port
                and (bound.host == where.host or {bound.host, where.host} & _ANY_ADDRESS)
            ):
                t.fail("listen", f"{_show(spec)} takes the socketmap listener {_show(other)}")
    if importlib.util.find_spec("prometheus_client") is None:
        t.fail(
            "listen",
            "metrics need the prometheus-client package, which is not installed:"
            " pip install 'postfix-mtasts[metrics]'",
        )


def _profile(t: _Table, fallback: Profile) -> Profile:
    return Profile(
        testing=t.choice("testing", fallback.testing, get_args(Testing)),
        tlsrpt=t.boolean("tlsrpt", fallback.tlsrpt),
    )


_POSTFIX_GIVES_UP = f"Postfix gives up on a reply after {POSTFIX_TIMEOUT:.0f} s"
_PEM_LABEL = re.compile(r"-----BEGIN ([^-\r\n]*)-----")
_SSL_SOURCE_LINE = re.compile(r"\s*\(_ssl\.c:\d+\)$")


def _check_ca_file(t: _Table, key: str, path: str) -> None:
    """Refuse a CA file the policy fetch cannot use: not a readable file, not ASCII PEM, or
    without a certificate that the ssl module loads as a trust anchor.

    The check is the fetch's own way of loading it (fetch.Fetcher reads the file as ASCII and
    hands it to SSLContext.load_verify_locations as PEM text), so a file accepted here loads
    there; the message says what the file holds instead.
    """
    # In full, unlike _show(): a path cut short would not say which file is meant.
    shown = _toml_string(path)
    expected = "expected PEM CA certificates"
    if not os.path.exists(path):
        t.fail(key, f"{shown}: no such file")
    if not os.path.isfile(path):
        t.fail(key, f"{shown}: not a regular file")
    try:
        with open(path, "rb") as f:
            data = f.read()
    except OSError as exc:
        t.fail(key, f"{shown}: cannot read: {exc.strerror or exc}")
    if not data.strip():
        t.fail(key, f"{shown}: the file is empty; {expected}")
    try:
        text = data.decode("ascii")
    except UnicodeDecodeError as exc:
        try:
            utf8 = data.decode("utf-8")
        except UnicodeDecodeError:
            utf8 = "\0"
        if "\0" in utf8:
            # A DER certificate is the usual binary CA file.
            found = "binary data, not PEM text (DER? openssl x509 -inform der converts it)"
        else:
            line = data[: exc.start].count(b"\n") + 1
            found = f"line {line} is not ASCII"
        t.fail(key, f"{shown}: {found}; {expected}")
    context = ssl.SSLContext(ssl.PROTOCOL_TLS_CLIENT)
    reason = "no certificate loaded"
    try:
        context.load_verify_locations(cadata=text)
    except (ssl.SSLError, ValueError) as exc:
        # ssl's own words, without the "(_ssl.c:4035)" that names its source line.
        reason = _SSL_SOURCE_LINE.sub("", str(exc.args[-1] if exc.args else exc))
    else:
        if context.cert_store_stats()["x509"] > 0:
            return
    labels = sorted(set(_PEM_LABEL.findall(text)))
    if not labels:
        found = "no PEM block in it"
    elif "CERTIFICATE" not in labels:
        found = f"only PEM {', '.join(labels)}, no CERTIFICATE"
    else:
        found = f"its certificates cannot be loaded ({reason})"
    t.fail(key, f"{shown}: {found}; {expected}")


def _store_url(t: _Table, backend: str, default: str) -> str:
    """``cache.url``: required by the shared backends, with a scheme of theirs; a PostgreSQL
    connection string (``host=/run/postgresql dbname=mail``) is taken as it is. Messages show it
    without its password."""
    from postfix_mtasts.store import redact_url

    value = t.string("url", default)
    schemes = _STORE_SCHEMES.get(backend)
    if schemes is None:
        return value
    if not value:
        t.fail("url", f'backend = "{backend}" needs the server\'s URL, e.g. {schemes[0]}://HOST')
    if backend == "postgresql" and "://" not in value:
        if "=" not in value:
            t.fail("url", "expected postgresql://USER@HOST:PORT/DBNAME or 'host=... dbname=...'")
        return value
    try:
        url = urlsplit(value)
        url.port  # noqa: B018 -- raises ValueError for a port out of range
    except ValueError as exc:
        t.fail("url", f"{_show(redact_url(value))}: {exc}")
    if url.scheme not in schemes:
        t.fail(
            "url",
            f"expected a {' or '.join(s + '://' for s in schemes)} URL for backend"
            f' "{backend}", got {_show(redact_url(value))}',
        )
    if url.scheme == "unix" and not url.path:
        t.fail("url", "a unix:// URL names the socket's path: unix:///run/redis/redis.sock?db=0")
    if url.scheme != "unix" and not url.hostname and backend == "redis":
        t.fail("url", f"no host in {_show(redact_url(value))}")
    return value


def _check_cache_file(t: _Table, key: str, path: str) -> None:
    """Refuse a cache path that names a file which is not a postfix-mtasts cache (a text file,
    another program's database): the daemon would neither use nor move it. Reads, changes
    nothing; whether the file can be written is the daemon's to find out (it reads what it can)."""
    from postfix_mtasts.store import ForeignFileError
    from postfix_mtasts.store.sqlite import check_ours

    try:
        check_ours(path)
    except ForeignFileError as exc:
        t.fail(key, str(exc))


def _check_log_file(t: _Table, key: str, path: str) -> None:
    """Refuse a log file that this process cannot open for appending.

    The daemon opens it as logging.FileHandler does (append, create when absent) when it starts
    and on every SIGHUP; a file it cannot open would lose every line after that. Nothing is
    created or written here, so check-config changes nothing on disk: an existing regular file
    is opened for appending and closed; an absent one needs a directory this process may create
    it in; a device or FIFO (/dev/null, a pipe to a log collector) is only asked whether it may
    be written, since opening one can act on it (closing a FIFO's last writer ends its reader).
    """
    shown = _toml_string(path)
    directory = os.path.dirname(path)
    if not os.path.exists(directory):
        t.fail(key, f"{shown}: directory {_toml_string(directory)} does not exist")
    if not os.path.isdir(directory):
        t.fail(key, f"{shown}: {_toml_string(directory)} is not a directory")
    try:
        mode = os.stat(path).st_mode
    except FileNotFoundError:
        # access(2) with the effective ids: the daemon's own; it also refuses a read-only mount.
        if not os.access(directory, os.W_OK | os.X_OK, effective_ids=True):
            t.fail(key, f"{shown}: cannot be created in {_toml_string(directory)}")
        return
    except OSError as exc:
        t.fail(key, f"{shown}: {exc.strerror or exc}")
    if stat.S_ISDIR(mode):
        t.fail(key, f"{shown}: is a directory")
    if stat.S_ISSOCK(mode):
        t.fail(key, f"{shown}: is a socket, which cannot be opened as a file")
    if not stat.S_ISREG(mode):
        if not os.access(path, os.W_OK, effective_ids=True):
            t.fail(key, f"{shown}: cannot be opened for appending: Permission denied")
        return
    try:
        fd = os.open(path, os.O_WRONLY | os.O_APPEND | os.O_NOCTTY | os.O_CLOEXEC)
    except OSError as exc:
        t.fail(key, f"{shown}: cannot be opened for appending: {exc.strerror or exc}")
    os.close(fd)


_S = TypeVar("_S", bound=str)
_MISSING = object()
_BARE_KEY = re.compile(r"[A-Za-z0-9_-]+")
_LABEL = re.compile(r"[A-Za-z0-9_](?:[A-Za-z0-9_-]{0,61}[A-Za-z0-9_])?")


class _Table:
    """One TOML table being read: typed getters that remember which keys exist, so close() can
    name any key the file has and this module does not know."""

    def __init__(self, data: Mapping[str, object], prefix: str, source: str) -> None:
        self._data = data
        self._prefix = prefix
        self._source = source
        # A dict, in reading order: close() looks up every key of a file with many [maps.NAME].
        self._known: dict[str, None] = {}

    def fail(self, key: str, message: str) -> NoReturn:
        raise ConfigError(f"{self._source}: {self._prefix}{key}: {message}")

    def names(self) -> list[str]:
        return list(self._data)

    def _get(self, key: str) -> object:
        self._known[key] = None
        return self._data.get(key, _MISSING)

    def table(self, key: str) -> _Table:
        value = self._get(key)
        if value is _MISSING:
            value = {}
        if not isinstance(value, dict):
            self.fail(_dotted(key), f"expected a table, got {_show(value)}")
        return _Table(value, f"{self._prefix}{_dotted(key)}.", self._source)

    def close(self) -> None:
        for key in self._data:
            if key not in self._known:
                where = f"keys in [{self._prefix[:-1]}]" if self._prefix else "top-level keys"
                known = ", ".join(self._known) or "none"
                self.fail(_dotted(key), f"unknown key (known {where}: {known})")

    def string(self, key: str, default: str) -> str:
        value = self._get(key)
        if value is _MISSING:
            return default
        if not isinstance(value, str):
            self.fail(key, f"expected a string, got {_show(value)}")
        return value

    def strings(self, key: str, default: tuple[str, ...]) -> tuple[str, ...]:
        value = self._get(key)
        if value is _MISSING:
            return default
        if not isinstance(value, list):
            self.fail(key, f"expected an array of strings, got {_show(value)}")
        for i, item in enumerate(value):
            if not isinstance(item, str):
                self.fail(f"{key}[{i}]", f"expected a string, got {_show(item)}")
        return tuple(value)

    def boolean(self, key: str, default: bool) -> bool:
        value = self._get(key)
        if value is _MISSING:
            return default
        if not isinstance(value, bool):
            self.fail(key, f"expected true or false, got {_show(value)}")
        return value

    def integer(self, key: str, default: int, *, minimum: int, maximum: int) -> int:
        value = self._get(key)
        if value is _MISSING:
            return default
        if isinstance(value, bool) or not isinstance(value, int):
            self.fail(key, f"expected an integer, got {_show(value)}")
        if not minimum <= value <= maximum:
            self.fail(
                key,
                f"expected an integer, at most {maximum} and at least {minimum}, "
                f"got {_show(value)}",
            )
        return value

    def seconds(
        self,
        key: str,
        default: float,
        *,
        zero: bool = False,
        at_most: float | None = None,
        below: float | None = None,
        why: str = "",
    ) -> float:
        """A duration in seconds: an integer or a float, positive (or zero when `zero`), and
        `at_most` or `below` a bound that one of them must give; `why` explains the bound."""
        if (at_most is None) == (below is None):
            raise TypeError("seconds() needs exactly one upper bound: at_most or below")
        value = self._get(key)
        if value is _MISSING:
            return default
        if isinstance(value, bool) or not isinstance(value, int | float):
            self.fail(key, f"expected a number of seconds, got {_show(value)}")
        try:
            seconds = float(value)
        except OverflowError:
            seconds = math.inf  # an integer beyond every float is beyond every bound too
        if at_most is not None:
            upper, too_high = f"at most {_number(at_most)}", seconds > at_most
        else:
            assert below is not None
            upper, too_high = f"less than {_number(below)}", seconds >= below
        lower = "0 or more" if zero else "more than 0"
        too_low = seconds < 0 or (seconds == 0 and not zero)
        if not math.isfinite(seconds) or too_low or too_high:
            because = f" ({why})" if why and too_high else ""
            self.fail(
                key,
                f"expected a number of seconds, {upper} and {lower}, got {_show(value)}{because}",
            )
        return seconds

    def choice(self, key: str, default: _S, choices: tuple[_S, ...]) -> _S:
        value = self._get(key)
        if value is _MISSING:
            return default
        if value not in choices:
            quoted = [_show(c) for c in choices]
            expected = ", ".join(quoted[:-1]) + " or " + quoted[-1]
            self.fail(key, f"expected {expected}, got {_show(value)}")
        return value

    def path(self, key: str, default: str, *, required: bool = False) -> str:
        # Absolute only: a daemon changes its working directory to / when it detaches.
        value = self.string(key, default)
        if value and not os.path.isabs(value):
            self.fail(key, f"expected an absolute path, got {_show(value)}")
        if required and not value:
            self.fail(key, 'expected an absolute path, got ""')
        if "\0" in value:
            self.fail(key, f"a path cannot contain NUL, got {_show(value)}")
        return value

    def file_mode(self, key: str, default: int) -> int:
        value = self._get(key)
        if value is _MISSING:
            return default
        if not isinstance(value, str) or not re.fullmatch(r"[0-7]{3,4}", value):
            self.fail(key, f'expected an octal mode as a string such as "0660", got {_show(value)}')
        return int(value, 8)

    def proxy_url(self, key: str, default: str) -> str:
        value = self.string(key, default)
        if value:
            try:
                url = urlsplit(value)
                url.port  # noqa: B018 -- raises ValueError for a port out of range
            except ValueError as exc:
                self.fail(key, f"{_show(value)}: {exc}")
            if url.scheme not in ("http", "https") or not url.hostname:
                self.fail(key, f"expected an http:// or https:// proxy URL, got {_show(value)}")
        return value

    def domain_name(self, key: str, default: str) -> str:
        value = self.string(key, default)
        labels = value.removesuffix(".").split(".")
        if (
            value
            and value != "."
            and not (len(value) <= 254 and all(_LABEL.fullmatch(label) for label in labels))
        ):
            self.fail(key, f"expected a DNS name in ASCII, got {_show(value)}")
        return value


def _dotted(key: str) -> str:
    """A key as it is written in a dotted TOML key: bare when it can be, else quoted."""
    return key if _BARE_KEY.fullmatch(key) else _toml_string(key)


def _number(value: float) -> str:
    """A bound as a postmaster would write it: 300, not 300.0 or 3e+02."""
    return str(int(value)) if value.is_integer() else repr(value)


def _show(value: object) -> str:
    """A value as TOML would write it, for error messages."""
    if isinstance(value, bool):
        return "true" if value else "false"
    if isinstance(value, str):
        shown = _toml_string(value)
        return shown if len(shown) <= 80 else shown[:76] + '..."'
    if isinstance(value, int | float):
        shown = repr(value)
        return shown if len(shown) <= 80 else f"{shown[:40]}... ({len(shown)} digits)"
    if isinstance(value, list):
        return "an array"
    if isinstance(value, dict):
        return "a table"
    return f"a date or time ({value})"


# --- dumping -------------------------------------------------------------------------------------


def dump(config: Config) -> str:
    """The effective settings, every key, as TOML text that load() reads back to an equal Config."""
    lines = [
        "# postfix-mtasts: effective configuration (every key, defaults included)",
        f"listen = {_toml_value(config.listen)}",
    ]
    sections: list[tuple[str, object]] = [
        ("server", config.server),
        ("log", config.log),
        ("dns", config.dns),
        ("https", config.https),
        ("cache", config.cache),
        ("policy", config.policy),
    ]
    sections += [(f"maps.{_dotted(name)}", profile) for name, profile in config.maps.items()]
    sections.append(("dane", config.dane))
    sections.append(("metrics", config.metrics))
    for header, section in sections:
        lines += ["", f"[{header}]"]
        for key, value in vars(section).items():
            if key == "socket_mode":
                value = f"{value:04o}"
            elif key == "url" and header == "cache":
                from postfix_mtasts.store import redact_url

                # A password never leaves the file it was written in.
                value = redact_url(value)
            lines.append(f"{key} = {_toml_value(value)}")
        if header == "policy":
            lines.append(f"parsing = {_toml_value(config.parsing)}")
    return "\n".join(lines) + "\n"


def _toml_value(value: object) -> str:
    if isinstance(value, bool):
        return "true" if value else "false"
    if isinstance(value, str):
        return _toml_string(value)
    if isinstance(value, int | float):
        return repr(value)
    if isinstance(value, tuple | list):
        return "[" + ", ".join(_toml_value(item) for item in value) + "]"
    raise TypeError(f"no TOML form for {value!r}")


def _toml_string(text: str) -> str:
    # TOML 1.0 basic string: escape '"', '\\' and the control characters other than tab.
    escaped = []
    for ch in text:
        if ch in '"\\':
            escaped.append("\\" + ch)
        elif (ch < " " and ch != "\t") or ch == "\x7f":
            escaped.append(f"\\u{ord(ch):04x}")
        else:
            escaped.append(ch)
    return '"' + "".join(escaped) + '"'
