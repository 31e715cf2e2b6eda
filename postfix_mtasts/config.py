"""The configuration: one TOML file into typed, validated, frozen settings.

Every key is optional; with no file at all the daemon runs on a loopback listener, the system
resolver, the system CA store and a SQLite cache in a writable default place. A key this module
does not know, a value of the wrong type or out of range, is a `ConfigError` whose message names the
file, the dotted key and the cause, so `postfix-mtasts check-config` can tell a postmaster exactly
what to fix. `dump()` writes the effective settings back as TOML that `load()` accepts.

docs/configuration.md is the reference of every key; keep the two in step.
"""

from __future__ import annotations

import math
import os
import re
import tomllib
from collections.abc import Mapping
from dataclasses import dataclass, field
from logging.handlers import SysLogHandler
from typing import Literal, NoReturn, TypeVar, get_args
from urllib.parse import urlsplit

from postfix_mtasts.resolver import parse_nameserver
from postfix_mtasts.server import ListenerError, parse_listener

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
Backend = Literal["sqlite", "memory"]
LogLevel = Literal["debug", "info", "warning", "error"]

# Postfix waits up to 100 s for a socketmap reply (socketmap_table(5)); a later answer is lost.
POSTFIX_TIMEOUT = 100.0


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
    # Each as written in the file; resolver.parse_nameserver() splits one into (address, port).
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

    def profile(self, name: str) -> Profile:
        """The profile for socketmap NAME; a name without `[maps.NAME]` gets `[policy]`."""
        return self.maps.get(name, self.policy)


# --- loading -------------------------------------------------------------------------------------


def load(path: str | None) -> Config:
    """Read and validate the file at `path`.

    None (no -c FILE): DEFAULT_PATH when it exists, else the built-in defaults. A path given
    explicitly must exist.
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
    return loads(text, source=path)


def loads(text: str, source: str = "<string>") -> Config:
    """Validate TOML text; `source` names it in error messages."""
    try:
        data = tomllib.loads(text)
    except tomllib.TOMLDecodeError as exc:
        # The message ends "(at line N, column M)".
        raise ConfigError(f"{source}: TOML syntax error: {exc}") from exc
    return _parse(_Table(data, "", source))


def _parse(top: _Table) -> Config:
    d = Config()
    listen = top.strings("listen", d.listen)
    for i, spec in enumerate(listen):
        try:
            parse_listener(spec)
        except ListenerError as exc:
            top.fail(f"listen[{i}]", str(exc))

    t = top.table("server")
    s = d.server
    server = ServerConfig(
        max_connections=t.integer("max_connections", s.max_connections, minimum=1),
        idle_timeout=t.seconds("idle_timeout", s.idle_timeout),
        request_timeout=t.seconds("request_timeout", s.request_timeout),
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
        timeout=t.seconds("timeout", dn.timeout),
        lifetime=t.seconds("lifetime", dn.lifetime),
    )
    t.close()

    t = top.table("https")
    h = d.https
    ca_file = t.path("ca_file", h.ca_file)
    # A CA file that is not there would fail every fetch, and every domain would silently fall
    # back to "no policy" (RFC 8461 fails open): refuse it now rather than at the first fetch.
    if ca_file and not os.path.isfile(ca_file):
        t.fail("ca_file", f"{_show(ca_file)}: no such file")
    https = HttpsConfig(
        ca_file=ca_file,
        timeout=t.seconds("timeout", h.timeout),
        connect_timeout=t.seconds("connect_timeout", h.connect_timeout),
        allow_private_addresses=t.boolean("allow_private_addresses", h.allow_private_addresses),
        proxy=t.proxy_url("proxy", h.proxy),
    )
    t.close()

    t = top.table("cache")
    c = d.cache
    cache = CacheConfig(
        backend=t.choice("backend", c.backend, get_args(Backend)),
        path=t.path("path", c.path, required=True),
        txt_check_interval=t.seconds("txt_check_interval", c.txt_check_interval, zero=True),
        refresh_interval=t.seconds("refresh_interval", c.refresh_interval),
        unused_after=t.seconds("unused_after", c.unused_after),
        no_record_ttl=t.seconds("no_record_ttl", c.no_record_ttl, zero=True),
        fetch_retry_interval=t.seconds("fetch_retry_interval", c.fetch_retry_interval, zero=True),
        first_lookup_deadline=t.seconds(
            "first_lookup_deadline", c.first_lookup_deadline, below=POSTFIX_TIMEOUT
        ),
    )
    t.close()

    t = top.table("policy")
    policy = _profile(t, d.policy)
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
    )


def _profile(t: _Table, fallback: Profile) -> Profile:
    return Profile(
        testing=t.choice("testing", fallback.testing, get_args(Testing)),
        tlsrpt=t.boolean("tlsrpt", fallback.tlsrpt),
    )


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
        self._known: list[str] = []

    def fail(self, key: str, message: str) -> NoReturn:
        raise ConfigError(f"{self._source}: {self._prefix}{key}: {message}")

    def names(self) -> list[str]:
        return list(self._data)

    def _get(self, key: str) -> object:
        self._known.append(key)
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

    def integer(self, key: str, default: int, *, minimum: int) -> int:
        value = self._get(key)
        if value is _MISSING:
            return default
        if isinstance(value, bool) or not isinstance(value, int):
            self.fail(key, f"expected an integer, got {_show(value)}")
        if value < minimum:
            self.fail(key, f"expected an integer of at least {minimum}, got {value}")
        return value

    def seconds(
        self, key: str, default: float, *, zero: bool = False, below: float = math.inf
    ) -> float:
        """A duration in seconds: an integer or a float, positive (or zero when `zero`)."""
        value = self._get(key)
        if value is _MISSING:
            return default
        if isinstance(value, bool) or not isinstance(value, int | float):
            self.fail(key, f"expected a number of seconds, got {_show(value)}")
        seconds = float(value)
        lowest = "0 or more" if zero else "more than 0"
        if not math.isfinite(seconds) or seconds < 0 or (seconds == 0 and not zero):
            self.fail(key, f"expected a number of seconds, {lowest}, got {_show(value)}")
        if seconds >= below:
            self.fail(key, f"expected less than {below:g} seconds, got {_show(value)}")
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


def _show(value: object) -> str:
    """A value as TOML would write it, for error messages."""
    if isinstance(value, bool):
        return "true" if value else "false"
    if isinstance(value, str):
        shown = _toml_string(value)
        return shown if len(shown) <= 80 else shown[:76] + '..."'
    if isinstance(value, int | float):
        return repr(value)
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
    for header, section in sections:
        lines += ["", f"[{header}]"]
        for key, value in vars(section).items():
            if key == "socket_mode":
                value = f"{value:04o}"
            lines.append(f"{key} = {_toml_value(value)}")
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
