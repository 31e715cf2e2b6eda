"""config.py: every key read, every mistake named with its file and key, dump() read back."""

from __future__ import annotations

import os
import string
from collections.abc import Callable
from pathlib import Path

import pytest
from hypothesis import given
from hypothesis import strategies as st

from postfix_mtasts import config
from postfix_mtasts.config import Config, ConfigError, Profile, dump, load, loads

SOURCE = "/etc/postfix-mtasts/config.toml"


@pytest.fixture
def ca_file(tmp_path: Path) -> str:
    path = tmp_path / "ca.pem"
    path.write_text("not checked here\n")
    return str(path)


def test_no_file_and_empty_file_give_the_defaults() -> None:
    assert loads("") == Config()
    c = Config()
    assert c.listen == ("inet:127.0.0.1:8461",)
    assert (c.server.max_connections, c.server.idle_timeout, c.server.request_timeout) == (
        1000,
        60.0,
        90.0,
    )
    assert c.server.socket_mode == 0o660
    assert (c.server.socket_owner, c.server.socket_group, c.server.user, c.server.group) == (
        "",
        "",
        "",
        "",
    )
    assert c.server.pid_file == "/run/postfix-mtasts/postfix-mtasts.pid"
    assert (c.log.level, c.log.syslog, c.log.syslog_facility, c.log.file) == (
        "info",
        False,
        "mail",
        "",
    )
    assert (c.dns.nameservers, c.dns.timeout, c.dns.lifetime) == ((), 5.0, 10.0)
    assert c.https == config.HttpsConfig("", 10.0, 5.0, False, "")
    assert c.cache.backend == "sqlite"
    assert c.cache.path == config.default_cache_path()
    assert (
        c.cache.txt_check_interval,
        c.cache.refresh_interval,
        c.cache.unused_after,
        c.cache.no_record_ttl,
        c.cache.fetch_retry_interval,
        c.cache.first_lookup_deadline,
    ) == (300.0, 86400.0, 2592000.0, 300.0, 300.0, 30.0)
    assert c.policy == Profile("notfound", False)
    assert c.maps == {}
    assert c.dane == config.DaneConfig(False, "")


# Every key, set to something other than its default, and where it lands.
EVERY_KEY: list[tuple[str, Callable[[Config], object], object]] = [
    ('listen = ["unix:/run/m.sock", "inet:[::1]:8461", "systemd"]', lambda c: c.listen,
     ("unix:/run/m.sock", "inet:[::1]:8461", "systemd")),
    ("listen = []", lambda c: c.listen, ()),
    ("[server]\nmax_connections = 5", lambda c: c.server.max_connections, 5),
    ("[server]\nidle_timeout = 2.5", lambda c: c.server.idle_timeout, 2.5),
    ("[server]\nrequest_timeout = 7", lambda c: c.server.request_timeout, 7.0),
    ('[server]\nsocket_mode = "0600"', lambda c: c.server.socket_mode, 0o600),
    ('[server]\nsocket_mode = "2770"', lambda c: c.server.socket_mode, 0o2770),
    ('[server]\nsocket_mode = "666"', lambda c: c.server.socket_mode, 0o666),
    ('[server]\nsocket_owner = "postfix"', lambda c: c.server.socket_owner, "postfix"),
    ('[server]\nsocket_group = "postdrop"', lambda c: c.server.socket_group, "postdrop"),
    ('[server]\nuser = "mtasts"', lambda c: c.server.user, "mtasts"),
    ('[server]\ngroup = "mtasts"', lambda c: c.server.group, "mtasts"),
    ('[server]\npid_file = "/run/x/y.pid"', lambda c: c.server.pid_file, "/run/x/y.pid"),
    ('[server]\npid_file = ""', lambda c: c.server.pid_file, ""),
    ('[log]\nlevel = "debug"', lambda c: c.log.level, "debug"),
    ('[log]\nlevel = "warning"', lambda c: c.log.level, "warning"),
    ('[log]\nlevel = "error"', lambda c: c.log.level, "error"),
    ("[log]\nsyslog = true", lambda c: c.log.syslog, True),
    ('[log]\nsyslog_facility = "local3"', lambda c: c.log.syslog_facility, "local3"),
    ('[log]\nfile = "/var/log/mtasts.log"', lambda c: c.log.file, "/var/log/mtasts.log"),
    ('[dns]\nnameservers = ["127.0.0.1:5353", "::1", "[2001:db8::53]:53", "192.0.2.1"]',
     lambda c: c.dns.nameservers, ("127.0.0.1:5353", "::1", "[2001:db8::53]:53", "192.0.2.1")),
    ("[dns]\ntimeout = 1", lambda c: c.dns.timeout, 1.0),
    ("[dns]\nlifetime = 0.5", lambda c: c.dns.lifetime, 0.5),
    ('[https]\nca_file = "{ca}"', lambda c: c.https.ca_file, "{ca}"),
    ("[https]\ntimeout = 3", lambda c: c.https.timeout, 3.0),
    ("[https]\nconnect_timeout = 1.5", lambda c: c.https.connect_timeout, 1.5),
    ("[https]\nallow_private_addresses = true", lambda c: c.https.allow_private_addresses, True),
    ('[https]\nproxy = "http://proxy.example:3128"', lambda c: c.https.proxy,
     "http://proxy.example:3128"),
    ('[https]\nproxy = "https://u:p@[2001:db8::1]:8443/"', lambda c: c.https.proxy,
     "https://u:p@[2001:db8::1]:8443/"),
    ('[cache]\nbackend = "memory"', lambda c: c.cache.backend, "memory"),
    ('[cache]\npath = "/srv/cache.db"', lambda c: c.cache.path, "/srv/cache.db"),
    ("[cache]\ntxt_check_interval = 60", lambda c: c.cache.txt_check_interval, 60.0),
    ("[cache]\ntxt_check_interval = 0", lambda c: c.cache.txt_check_interval, 0.0),
    ("[cache]\nrefresh_interval = 3600", lambda c: c.cache.refresh_interval, 3600.0),
    ("[cache]\nunused_after = 86400", lambda c: c.cache.unused_after, 86400.0),
    ("[cache]\nno_record_ttl = 0", lambda c: c.cache.no_record_ttl, 0.0),
    ("[cache]\nfetch_retry_interval = 0.2", lambda c: c.cache.fetch_retry_interval, 0.2),
    ("[cache]\nfirst_lookup_deadline = 99.5", lambda c: c.cache.first_lookup_deadline, 99.5),
    ('[policy]\ntesting = "may"', lambda c: c.policy.testing, "may"),
    ('[policy]\ntesting = "secure"', lambda c: c.policy.testing, "secure"),
    ("[policy]\ntlsrpt = true", lambda c: c.policy.tlsrpt, True),
    ('[maps.postfix]\ntesting = "secure"', lambda c: c.profile("postfix").testing, "secure"),
    ("[maps.postfix]\ntlsrpt = true", lambda c: c.profile("postfix").tlsrpt, True),
    ("[dane]\nenabled = true", lambda c: c.dane.enabled, True),
    ('[dane]\ncheck_name = "isc.org."', lambda c: c.dane.check_name, "isc.org."),
    ('[dane]\ncheck_name = "."', lambda c: c.dane.check_name, "."),
    ('[dane]\ncheck_name = "_25._tcp.mx.example"', lambda c: c.dane.check_name,
     "_25._tcp.mx.example"),
]  # fmt: skip


@pytest.mark.parametrize(("text", "read", "expected"), EVERY_KEY)
def test_every_key_is_read(
    text: str, read: Callable[[Config], object], expected: object, ca_file: str
) -> None:
    settings = loads(text.replace("{ca}", ca_file), SOURCE)
    if isinstance(expected, str):
        expected = expected.replace("{ca}", ca_file)
    assert read(settings) == expected


def test_integers_are_accepted_where_seconds_are_expected() -> None:
    settings = loads("[dns]\ntimeout = 2\n[cache]\nunused_after = 10")
    assert settings.dns.timeout == 2.0 and isinstance(settings.dns.timeout, float)
    assert isinstance(settings.cache.unused_after, float)


# A mistake, and the key and cause its message must name.
MISTAKES: list[tuple[str, str, str]] = [
    ('listen = "inet:127.0.0.1:8461"', "listen", "expected an array of strings"),
    ("listen = [8461]", "listen[0]", "expected a string, got 8461"),
    ('listen = [""]', "listen[0]", "expected inet:HOST:PORT, unix:PATH or systemd"),
    ('listen = ["inet:127.0.0.1"]', "listen[0]", "expected inet:HOST:PORT"),
    ('listen = ["systemd", "tcp:127.0.0.1:8461"]', "listen[1]", "unknown type 'tcp'"),
    ('listen = ["unix:run/mtasts.sock"]', "listen[0]", "must be absolute"),
    ("server = 1", "server", "expected a table, got 1"),
    ("[server]\nmax_connections = 0", "server.max_connections", "at least 1, got 0"),
    ("[server]\nmax_connections = 10.0", "server.max_connections", "expected an integer"),
    ("[server]\nmax_connections = true", "server.max_connections", "expected an integer"),
    ('[server]\nidle_timeout = "60s"', "server.idle_timeout", 'seconds, got "60s"'),
    ("[server]\nidle_timeout = 0", "server.idle_timeout", "more than 0, got 0"),
    ("[server]\nrequest_timeout = -1.0", "server.request_timeout", "more than 0"),
    ("[server]\nrequest_timeout = inf", "server.request_timeout", "got inf"),
    ("[server]\nrequest_timeout = true", "server.request_timeout", "seconds, got true"),
    ("[server]\nsocket_mode = 660", "server.socket_mode", 'such as "0660", got 660'),
    ("[server]\nsocket_mode = 0o660", "server.socket_mode", "got 432"),
    ('[server]\nsocket_mode = "0880"', "server.socket_mode", 'got "0880"'),
    ('[server]\nsocket_mode = "10660"', "server.socket_mode", 'got "10660"'),
    ("[server]\nuser = 0", "server.user", "expected a string, got 0"),
    ("[server]\ngroup = []", "server.group", "expected a string, got an array"),
    ("[server]\nsocket_owner = 1", "server.socket_owner", "expected a string"),
    ("[server]\nsocket_group = {}", "server.socket_group", "got a table"),
    ('[server]\npid_file = "run/x.pid"', "server.pid_file", "expected an absolute path"),
    ('[log]\nlevel = "INFO"', "log.level", '"debug", "info", "warning" or "error", got "INFO"'),
    ('[log]\nsyslog = "yes"', "log.syslog", 'expected true or false, got "yes"'),
    ('[log]\nsyslog_facility = "mial"', "log.syslog_facility", 'got "mial"'),
    ('[log]\nfile = "mtasts.log"', "log.file", "expected an absolute path"),
    ('[log]\nfile = "/var/log/\\u0000"', "log.file", "cannot contain NUL"),
    ("[log]\nfile = 1979-05-27", "log.file", "expected a string, got a date or time"),
    ('[dns]\nnameservers = "127.0.0.1"', "dns.nameservers", "expected an array of strings"),
    ('[dns]\nnameservers = ["ns.example"]', "dns.nameservers[0]", "not an IP address"),
    ('[dns]\nnameservers = ["::1", "127.0.0.1:99999"]', "dns.nameservers[1]", "99999"),
    ('[dns]\nnameservers = ["[127.0.0.1]:53"]', "dns.nameservers[0]", "brackets"),
    ("[dns]\ntimeout = 0", "dns.timeout", "more than 0"),
    ("[dns]\nlifetime = nan", "dns.lifetime", "got nan"),
    ('[https]\nca_file = "/nonexistent/ca.pem"', "https.ca_file", "no such file"),
    ('[https]\nca_file = "ca.pem"', "https.ca_file", "expected an absolute path"),
    ("[https]\ntimeout = -5", "https.timeout", "more than 0"),
    ('[https]\nconnect_timeout = "5"', "https.connect_timeout", "seconds"),
    ("[https]\nallow_private_addresses = 1", "https.allow_private_addresses", "true or false"),
    ('[https]\nproxy = "socks5://127.0.0.1:1080"', "https.proxy", "http:// or https://"),
    ('[https]\nproxy = "proxy.example:3128"', "https.proxy", "http:// or https://"),
    ('[https]\nproxy = "http://proxy.example:99999"', "https.proxy", "out of range"),
    ('[cache]\nbackend = "mysql"', "cache.backend", 'expected "sqlite" or "memory", got "mysql"'),
    ('[cache]\npath = ""', "cache.path", "expected an absolute path"),
    ('[cache]\npath = "cache.sqlite"', "cache.path", "expected an absolute path"),
    ("[cache]\ntxt_check_interval = -1", "cache.txt_check_interval", "0 or more, got -1"),
    ("[cache]\nrefresh_interval = 0", "cache.refresh_interval", "more than 0"),
    ("[cache]\nunused_after = 0", "cache.unused_after", "more than 0"),
    ("[cache]\nno_record_ttl = -0.5", "cache.no_record_ttl", "0 or more"),
    ("[cache]\nfetch_retry_interval = -300", "cache.fetch_retry_interval", "0 or more"),
    ("[cache]\nfirst_lookup_deadline = 100", "cache.first_lookup_deadline", "less than 100"),
    ("[cache]\nfirst_lookup_deadline = 0", "cache.first_lookup_deadline", "more than 0"),
    ('[policy]\ntesting = "enforce"', "policy.testing",
     'expected "notfound", "may" or "secure", got "enforce"'),
    ('[policy]\ntlsrpt = "true"', "policy.tlsrpt", "expected true or false"),
    ("maps = 1", "maps", "expected a table"),
    ("[maps]\npostfix = 1", "maps.postfix", "expected a table, got 1"),
    ('[maps.postfix]\ntesting = "none"', "maps.postfix.testing", 'got "none"'),
    ("[maps.postfix]\ntlsrpt = 0", "maps.postfix.tlsrpt", "expected true or false, got 0"),
    ('[maps."a b"]', 'maps."a b"', "without spaces"),
    ('[maps."x:y"]', 'maps."x:y"', "without spaces or ':'"),
    ('[maps.""]', 'maps.""', "non-empty"),
    ('[dane]\nenabled = "yes"', "dane.enabled", "expected true or false"),
    ('[dane]\ncheck_name = "a..b"', "dane.check_name", "expected a DNS name"),
    ('[dane]\ncheck_name = "bücher.example"', "dane.check_name", "in ASCII"),
    ('[dane]\ncheck_name = "has space.example"', "dane.check_name", "expected a DNS name"),
]  # fmt: skip


@pytest.mark.parametrize(("text", "key", "cause"), MISTAKES)
def test_mistakes_name_the_file_the_key_and_the_cause(text: str, key: str, cause: str) -> None:
    with pytest.raises(ConfigError) as caught:
        loads(text, SOURCE)
    message = str(caught.value)
    assert message.startswith(f"{SOURCE}: {key}: "), message
    assert cause in message


@pytest.mark.parametrize(
    ("text", "key", "known"),
    [
        ("lisen = []", "lisen", "known top-level keys: listen, server, log"),
        ("[serve]", "serve", "known top-level keys"),
        ("[server]\nmax_conections = 1", "server.max_conections", "[server]: max_connections"),
        ("[log]\nlevels = 1", "log.levels", "[log]: level"),
        ("[dns]\nnameserver = []", "dns.nameserver", "[dns]: nameservers"),
        ("[https]\ncafile = 1", "https.cafile", "[https]: ca_file"),
        ("[cache]\nbakend = 1", "cache.bakend", "[cache]: backend"),
        ("[cache]\nmax_entries = 1", "cache.max_entries", "[cache]: backend"),
        ("[policy]\nmode = 1", "policy.mode", "[policy]: testing, tlsrpt"),
        ("[maps.postfix]\nmode = 1", "maps.postfix.mode", "[maps.postfix]: testing, tlsrpt"),
        ('[maps."x.y"]\nmode = 1', 'maps."x.y".mode', '[maps."x.y"]: testing'),
        ("[dane]\nenable = true", "dane.enable", "[dane]: enabled, check_name"),
        ("[server.tls]\nx = 1", "server.tls", "[server]"),
    ],
)
def test_unknown_keys_are_errors_at_every_level(text: str, key: str, known: str) -> None:
    with pytest.raises(ConfigError) as caught:
        loads(text, SOURCE)
    message = str(caught.value)
    assert message.startswith(f"{SOURCE}: {key}: unknown key"), message
    assert known in message


def test_maps_fall_back_to_policy_key_by_key() -> None:
    settings = loads(
        """
        [policy]
        testing = "may"
        tlsrpt = true
        [maps.postfix]
        testing = "secure"
        [maps.reporting]
        tlsrpt = false
        [maps.plain]
        """
    )
    assert settings.profile("postfix") == Profile(testing="secure", tlsrpt=True)
    assert settings.profile("reporting") == Profile(testing="may", tlsrpt=False)
    assert settings.profile("plain") == settings.policy == Profile(testing="may", tlsrpt=True)
    assert settings.profile("unknown-name") is settings.policy


def test_unknown_map_name_gets_the_built_in_default_profile() -> None:
    assert Config().profile("postfix") == Profile(testing="notfound", tlsrpt=False)


def test_load_names_the_file_in_errors(tmp_path: Path) -> None:
    path = tmp_path / "config.toml"
    path.write_text('[cache]\nbackend = "mysql"\n')
    with pytest.raises(ConfigError, match=rf"^{path}: cache\.backend: expected"):
        load(str(path))


def test_toml_syntax_error_names_the_file_and_the_line(tmp_path: Path) -> None:
    path = tmp_path / "config.toml"
    path.write_text('listen = ["inet:127.0.0.1:8461"]\n[cache]\nbackend = sqlite\n')
    with pytest.raises(ConfigError) as caught:
        load(str(path))
    message = str(caught.value)
    assert message.startswith(f"{path}: TOML syntax error: ")
    assert "line 3" in message


def test_a_key_given_twice_is_a_syntax_error() -> None:
    with pytest.raises(ConfigError, match="line 3"):
        loads("[dns]\ntimeout = 1\ntimeout = 2\n", SOURCE)


def test_a_file_that_is_not_utf8_names_the_line(tmp_path: Path) -> None:
    path = tmp_path / "config.toml"
    path.write_bytes(b"[log]\nfile = '/var/log/\xe9.log'\n")
    with pytest.raises(ConfigError, match=rf"^{path}: line 2: not valid UTF-8$"):
        load(str(path))


def test_a_missing_file_given_explicitly_is_an_error(tmp_path: Path) -> None:
    path = tmp_path / "absent.toml"
    with pytest.raises(ConfigError, match=rf"^{path}: cannot read: No such file or directory$"):
        load(str(path))


def test_a_directory_is_not_a_config_file(tmp_path: Path) -> None:
    with pytest.raises(ConfigError, match=rf"^{tmp_path}: cannot read: Is a directory$"):
        load(str(tmp_path))


def test_without_a_path_the_default_file_is_read_when_it_exists(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    default = tmp_path / "config.toml"
    monkeypatch.setattr(config, "DEFAULT_PATH", str(default))
    assert load(None) == Config()
    default.write_text('[cache]\nbackend = "memory"\n')
    assert load(None).cache.backend == "memory"
    default.write_text("[cache]\nbackend = 1\n")
    with pytest.raises(ConfigError, match=rf"^{default}: cache\.backend: "):
        load(None)


def test_default_cache_path_for_root(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(os, "geteuid", lambda: 0)
    monkeypatch.setenv("XDG_STATE_HOME", "/somewhere")
    assert config.default_cache_path() == "/var/lib/postfix-mtasts/cache.sqlite"


@pytest.mark.parametrize(
    ("xdg_state_home", "expected"),
    [
        ("/state", "/state/postfix-mtasts/cache.sqlite"),
        (None, "/home/u/.local/state/postfix-mtasts/cache.sqlite"),
        ("", "/home/u/.local/state/postfix-mtasts/cache.sqlite"),
        # The XDG spec says to ignore a relative path.
        ("relative", "/home/u/.local/state/postfix-mtasts/cache.sqlite"),
    ],
)
def test_default_cache_path_for_other_users(
    monkeypatch: pytest.MonkeyPatch, xdg_state_home: str | None, expected: str
) -> None:
    monkeypatch.setattr(os, "geteuid", lambda: 1000)
    monkeypatch.setenv("HOME", "/home/u")
    if xdg_state_home is None:
        monkeypatch.delenv("XDG_STATE_HOME", raising=False)
    else:
        monkeypatch.setenv("XDG_STATE_HOME", xdg_state_home)
    assert config.default_cache_path() == expected
    assert loads("").cache.path == expected


def test_dump_of_the_defaults_reads_back_equal() -> None:
    assert loads(dump(Config())) == Config()


def test_dump_of_every_key_changed_reads_back_equal(ca_file: str) -> None:
    # EVERY_KEY's snippets merged into one file: one table per header, the last value of a key.
    tables: dict[str, dict[str, str]] = {}
    for snippet, _, _ in EVERY_KEY:
        header, _, line = snippet.rpartition("\n")
        tables.setdefault(header, {})[line.split(" = ")[0]] = line.replace("{ca}", ca_file)
    text = "\n".join(header + "\n" + "\n".join(lines.values()) for header, lines in tables.items())
    settings = loads(text, SOURCE)
    assert settings.maps and settings.server.socket_mode != Config().server.socket_mode
    assert loads(dump(settings)) == settings
    assert dump(loads(dump(settings))) == dump(settings)


@given(
    path=st.text(st.characters(blacklist_characters="\0")).map(lambda s: "/" + s),
    name=st.text(alphabet=string.printable.strip().replace(":", ""), min_size=1),
    facility=st.sampled_from(["mail", "daemon", "local0", "local7", "user"]),
    testing=st.sampled_from(["notfound", "may", "secure"]),
    tlsrpt=st.booleans(),
    seconds=st.floats(min_value=1e-6, max_value=1e9) | st.integers(1, 10**9),
    mode=st.integers(0, 0o7777),
)
def test_dump_reads_back_equal_for_any_values(
    path: str,
    name: str,
    facility: str,
    testing: config.Testing,
    tlsrpt: bool,
    seconds: float,
    mode: int,
) -> None:
    settings = Config(
        listen=("systemd", "inet:127.0.0.1:8461"),
        server=config.ServerConfig(socket_mode=mode, user=path, pid_file=path),
        log=config.LogConfig(syslog_facility=facility, file=path),
        cache=config.CacheConfig(path=path, unused_after=float(seconds)),
        maps={name: Profile(testing, tlsrpt)},
    )
    assert loads(dump(settings)) == settings
